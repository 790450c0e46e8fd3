/* The C helpers of dirtyring (see native.py for why each is C, with the measurements).
 *
 * dirtyring_gather_nt: dst[i] = src[idx[i]] for 4096-byte pages, with non-temporal stores
 * (the destination is read by another process on the other core).
 *
 * dirtyring_pause: a replication checkpoint's steady pause in one call: the ioctls (the
 * dirty logs, XSAVE, the TSC), then a check that each dirty log equals the last one, then,
 * only if all do, the gathers of the hot set into staging (pages and their indices) and the
 * copies that lay the vCPU state into the checkpoint's state blob. */
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <emmintrin.h>

static void page_nt(uint8_t *dst, const uint8_t *src)
{
    const __m128i *s = (const __m128i *)src;
    __m128i *d = (__m128i *)dst;
    for (int j = 0; j < 256; j += 4) {
        __m128i a = _mm_loadu_si128(s + j), b = _mm_loadu_si128(s + j + 1);
        __m128i c = _mm_loadu_si128(s + j + 2), e = _mm_loadu_si128(s + j + 3);
        _mm_stream_si128(d + j, a);
        _mm_stream_si128(d + j + 1, b);
        _mm_stream_si128(d + j + 2, c);
        _mm_stream_si128(d + j + 3, e);
    }
}

int dirtyring_gather_nt(uint8_t *dst, const uint8_t *src, const int64_t *idx, int64_t n,
                        int64_t src_pages)
{
    for (int64_t i = 0; i < n; i++)
        if (idx[i] < 0 || idx[i] >= src_pages)
            return -1;
    for (int64_t i = 0; i < n; i++)
        page_nt(dst + i * 4096, src + idx[i] * 4096);
    _mm_sfence(); /* the stores are visible before the caller tells the reader */
    return 0;
}

struct dr_op { int fd; int expect; unsigned long request; void *arg; };
struct dr_same { const void *a; const void *b; int64_t n; };
struct dr_gather {
    uint8_t *dst; int64_t *dst_idx; const uint8_t *src; const int64_t *idx;
    int64_t n; int64_t src_pages;
};
struct dr_copy { void *dst; const void *src; int64_t n; };

/* 0: done; 1: a compared pair differed (no gather or copy done); -(i+1): op i failed (errno
 * set, or it returned other than its expect >= 0); -1000 - k: gather k names a page outside its
 * slot (nothing gathered or copied). */
int dirtyring_pause(const struct dr_op *ops, int nops, const struct dr_same *same, int nsame,
                    const struct dr_gather *g, int ngathers, const struct dr_copy *copies,
                    int ncopies)
{
    for (int i = 0; i < nops; i++) {
        int r = ioctl(ops[i].fd, ops[i].request, ops[i].arg);
        if (r < 0 || (ops[i].expect >= 0 && r != ops[i].expect))
            return -(i + 1);
    }
    for (int i = 0; i < nsame; i++)
        if (memcmp(same[i].a, same[i].b, (size_t)same[i].n) != 0)
            return 1;
    for (int k = 0; k < ngathers; k++)
        for (int64_t i = 0; i < g[k].n; i++)
            if (g[k].idx[i] < 0 || g[k].idx[i] >= g[k].src_pages)
                return -1000 - k;
    for (int k = 0; k < ngathers; k++)
        for (int64_t i = 0; i < g[k].n; i++) {
            page_nt(g[k].dst + i * 4096, g[k].src + g[k].idx[i] * 4096);
            g[k].dst_idx[i] = g[k].idx[i];
        }
    for (int i = 0; i < ncopies; i++)
        memcpy(copies[i].dst, copies[i].src, (size_t)copies[i].n);
    _mm_sfence();
    return 0;
}
