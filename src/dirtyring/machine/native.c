/* The C helpers of dirtyring (see native.py for why each is C, with the measurements).
 *
 * dirtyring_gather_nt: dst[i] = src[idx[i]] for 4096-byte pages, with non-temporal stores
 * (the destination is read by another process on the other core).
 *
 * dirtyring_program: a replication checkpoint's steady pause in one call: the ioctls (the
 * dirty logs, XSAVE) and the guest's TSC (from the host's, see DR_OP_TSC), then a check that
 * each dirty log equals the last one, then, only if all do, the gathers of the hot set into
 * staging (pages and their indices, or only the words that changed since the last checkpoint)
 * and the copies that lay the vCPU state into the checkpoint's state blob and staging.
 *
 * dirtyring_batch: several steady epochs in one call: arm the epoch timer, run the vCPU until
 * the timer ends the epoch, run that epoch's program, and again; it returns at the first thing
 * that needs Python (any other exit, a changed log, an error) or after the last epoch. It
 * reads the vCPU's TSC offset for the programs first and voids the batch if it moved.
 *
 * dirtyring_sparse_delta: the uplink's XOR delta of staged pages against its shadow of the
 * standby's copy, as the changed 64-bit words, in one pass; dirtyring_take_words: the uplink's
 * side of a delta the pause staged. */
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <immintrin.h>
#include <linux/kvm.h>

#include "native.h"  /* the structs and constants native.py mirrors */

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

/* The differing words among words j .. j+count-1 of a page at word offset base: to where
 * and diff at *k. 0, or -1 past max. */
static inline int record(const uint64_t *pa, const uint64_t *pb, int64_t base, int64_t j,
                         int count, int64_t *where, uint64_t *diff, int64_t *k, int64_t max)
{
    for (int t = 0; t < count; t++) {
        uint64_t d = pa[j + t] ^ pb[j + t];
        if (!d)
            continue;
        if (*k == max)
            return -1;
        where[*k] = base + j + t;
        diff[(*k)++] = d;
    }
    return 0;
}

/* The words of n pages that differ from their shadow rows idx[i]: page i is a + idx[i] * W
 * if indexed (guest memory), else a + i * W (staged pages). Each goes to where (its offset in
 * the n pages, in words) and diff (the XOR). Returns how many, or -1 past max. */
static int64_t diff_words_sse2(const uint64_t *a, int indexed, const uint64_t *shadow,
                               const int64_t *idx, int64_t n, int64_t *where, uint64_t *diff,
                               int64_t max)
{
    const int64_t W = 4096 / 8;
    const __m128i zero = _mm_setzero_si128();
    int64_t k = 0;
    for (int64_t i = 0; i < n; i++) {
        const uint64_t *pa = a + (indexed ? idx[i] : i) * W, *pb = shadow + idx[i] * W;
        for (int64_t j = 0; j < W; j += 8) { /* 64 bytes at a time; almost all are equal */
            const __m128i *va = (const __m128i *)(pa + j), *vb = (const __m128i *)(pb + j);
            __m128i x = _mm_or_si128(
                _mm_or_si128(_mm_xor_si128(_mm_loadu_si128(va), _mm_loadu_si128(vb)),
                             _mm_xor_si128(_mm_loadu_si128(va + 1), _mm_loadu_si128(vb + 1))),
                _mm_or_si128(_mm_xor_si128(_mm_loadu_si128(va + 2), _mm_loadu_si128(vb + 2)),
                             _mm_xor_si128(_mm_loadu_si128(va + 3), _mm_loadu_si128(vb + 3))));
            if (_mm_movemask_epi8(_mm_cmpeq_epi8(x, zero)) != 0xFFFF &&
                    record(pa, pb, i * W, j, 8, where, diff, &k, max) < 0)
                return -1;
        }
    }
    return k;
}

/* The same, 128 bytes at a time with AVX2 (the pause's compare: ~2x faster where the pages are
 * in cache, which they are right after the guest wrote them). */
__attribute__((target("avx2")))
static int64_t diff_words_avx2(const uint64_t *a, int indexed, const uint64_t *shadow,
                               const int64_t *idx, int64_t n, int64_t *where, uint64_t *diff,
                               int64_t max)
{
    const int64_t W = 4096 / 8;
    int64_t k = 0;
    for (int64_t i = 0; i < n; i++) {
        const uint64_t *pa = a + (indexed ? idx[i] : i) * W, *pb = shadow + idx[i] * W;
        for (int64_t j = 0; j < W; j += 16) {
            const __m256i *va = (const __m256i *)(pa + j), *vb = (const __m256i *)(pb + j);
            __m256i x = _mm256_or_si256(
                _mm256_or_si256(
                    _mm256_xor_si256(_mm256_loadu_si256(va), _mm256_loadu_si256(vb)),
                    _mm256_xor_si256(_mm256_loadu_si256(va + 1), _mm256_loadu_si256(vb + 1))),
                _mm256_or_si256(
                    _mm256_xor_si256(_mm256_loadu_si256(va + 2), _mm256_loadu_si256(vb + 2)),
                    _mm256_xor_si256(_mm256_loadu_si256(va + 3), _mm256_loadu_si256(vb + 3))));
            if (!_mm256_testz_si256(x, x) &&
                    record(pa, pb, i * W, j, 16, where, diff, &k, max) < 0)
                return -1;
        }
    }
    return k;
}

static int64_t diff_words(const uint64_t *a, int indexed, const uint64_t *shadow,
                          const int64_t *idx, int64_t n, int64_t *where, uint64_t *diff,
                          int64_t max)
{
    static int avx2 = -1;
    if (avx2 < 0)
        avx2 = __builtin_cpu_supports("avx2");
    return (avx2 ? diff_words_avx2 : diff_words_sse2)(a, indexed, shadow, idx, n, where, diff,
                                                      max);
}

static void apply_words(uint64_t *shadow, const int64_t *idx, const int64_t *where,
                        const uint64_t *diff, int64_t k)
{
    for (int64_t m = 0; m < k; m++)
        shadow[idx[where[m] / 512] * 512 + where[m] % 512] ^= diff[m];
}

/* Compare n staged pages with their shadow rows idx[i]; record each differing 64-bit word's
 * offset into the staged data and its XOR, then write those words into the shadow. Returns the
 * number of words, or -1 with the shadow untouched if more than max differ. */
int64_t dirtyring_sparse_delta(const uint64_t *staged, uint64_t *shadow, const int64_t *idx,
                               int64_t n, int64_t *where, uint64_t *diff, int64_t max)
{
    int64_t k = diff_words(staged, 0, shadow, idx, n, where, diff, max);
    if (k >= 0)
        apply_words(shadow, idx, where, diff, k);
    return k;
}

/* The uplink's side of a delta gather (dr_gather with a shadow): copy the k staged words of
 * n pages out, and apply them to its own shadow (if any). -1, with nothing applied, if k or
 * an offset is out of range. */
int dirtyring_take_words(const uint8_t *staged, int64_t n, int64_t k, const int64_t *idx,
                         uint64_t *shadow, int64_t *where, uint64_t *diff)
{
    if (k < 0 || k > n * DR_DELTA_WORDS)
        return -1;
    memcpy(where, staged, (size_t)k * 8);
    memcpy(diff, staged + n * DR_DELTA_WORDS * 8, (size_t)k * 8);
    for (int64_t m = 0; m < k; m++)
        if (where[m] < 0 || where[m] >= n * 512)
            return -1;
    if (shadow)
        apply_words(shadow, idx, where, diff, k);
    return 0;
}

/* DR_OP_TSC (native.h): an op that is no ioctl but stores the guest's TSC. The ioctl
 * (KVM_GET_MSRS) costs ~7.5 µs here, like every vCPU ioctl (vcpu_load and put), at every pause;
 * rdtsc ~0.1 µs. Used only where KVM's TSC is the host's plus that offset (no scaling;
 * StateBlob checks). */
uint64_t dirtyring_rdtsc(void) { return __rdtsc(); }

/* The program's results are native.h's DR_PROGRAM_*. */
int dirtyring_program(const struct dr_program *p)
{
    for (int i = 0; i < p->nops; i++) {
        const struct dr_op *o = &p->ops[i];
        if (o->request == DR_OP_TSC) {
            *(uint64_t *)o->arg = __rdtsc() + (uint64_t)*o->offset;
            continue;
        }
        int r = ioctl(o->fd, o->request, o->arg);
        if (r < 0 || (o->expect >= 0 && r != o->expect))
            return -(i + 1);
    }
    for (int i = 0; i < p->nsame; i++)
        if (memcmp(p->same[i].a, p->same[i].b, (size_t)p->same[i].n) != 0)
            return DR_PROGRAM_CHANGED;
    for (int k = 0; k < p->ngathers; k++)
        for (int64_t i = 0; i < p->gathers[k].n; i++)
            if (p->gathers[k].idx[i] < 0 || p->gathers[k].idx[i] >= p->gathers[k].src_pages)
                return DR_PROGRAM_BAD_PAGE - k;
    for (int k = 0; k < p->ngathers; k++) {
        const struct dr_gather *g = &p->gathers[k];
        int64_t words = -1;
        if (g->shadow) {
            const int64_t max = g->n * DR_DELTA_WORDS;  /* as the uplink's delta */
            int64_t *where = (int64_t *)g->dst;
            uint64_t *diff = (uint64_t *)(where + max);
            words = diff_words((const uint64_t *)g->src, 1, (const uint64_t *)g->shadow,
                               g->idx, g->n, where, diff, max);
            if (words >= 0)
                apply_words((uint64_t *)g->shadow, g->idx, where, diff, words);
            *g->count = words;
        }
        for (int64_t i = 0; i < g->n; i++) {
            if (words < 0)
                page_nt(g->dst + i * 4096, g->src + g->idx[i] * 4096);
            if (words < 0 && g->shadow)
                memcpy(g->shadow + g->idx[i] * 4096, g->src + g->idx[i] * 4096, 4096);
            g->dst_idx[i] = g->idx[i];
        }
    }
    for (int i = 0; i < p->ncopies; i++)
        memcpy(p->copies[i].dst, p->copies[i].src, (size_t)p->copies[i].n);
    _mm_sfence();
    return DR_PROGRAM_DONE;
}

static int read_tsc_offset(int vcpu_fd, int64_t *out)
{
    struct kvm_device_attr a = {.group = KVM_VCPU_TSC_CTRL, .attr = KVM_VCPU_TSC_OFFSET,
                                .addr = (uint64_t)(uintptr_t)out};
    return ioctl(vcpu_fd, KVM_GET_DEVICE_ATTR, &a);
}

/* The TSC values the batch's pauses stored are right only if the offset they added held all
 * along (the guest may write its TSC; KVM may move the offset on an unstable host). If it
 * moved, none of the epochs counts: the caller checkpoints them as one, the ordinary way. */
static int settle_tsc(struct dr_batch *b)
{
    int64_t now;
    if (!b->tsc_offset || !b->done)
        return 0;
    if (read_tsc_offset(b->vcpu_fd, &now) == 0 && now == *b->tsc_offset)
        return 0;
    b->done = 0;
    b->tsc_moved = 1;
    if (b->why == DR_ALL_DONE)
        b->why = DR_CHANGED;  /* the last epoch is over and paused, without its checkpoint */
    return 0;
}

static int64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* The same decisions as VcpuRunner.run_inline: KVM_EXIT_INTR is the timer's (or another
 * signal's) and handled here, as run_inline does; every other exit returns DR_EXIT for Python
 * to serve (machine/exits.py serve, through run_inline's first_exit). SIGALRM is blocked in this thread and only
 * unblocked inside KVM_RUN (KVM_SET_SIGNAL_MASK), so a pending one makes KVM_RUN return EINTR
 * and is then taken here with sigtimedwait. Returns with the timer disarmed and no stale
 * SIGALRM pending, except on DR_EXIT, where epoch `done` is still running: the timer stays
 * armed and the caller goes on with the exit in run->exit_reason. */
int dirtyring_batch(struct dr_batch *b)
{
    sigset_t alrm;
    sigemptyset(&alrm);
    sigaddset(&alrm, SIGALRM);
    const struct timespec zero = {0, 0};
    struct itimerspec spec, off, left;
    memset(&spec, 0, sizeof spec);
    memset(&off, 0, sizeof off);
    spec.it_value.tv_sec = b->interval_ns / 1000000000;
    spec.it_value.tv_nsec = b->interval_ns % 1000000000;
    timer_t timer = (timer_t)b->timer;
    b->done = 0;
    b->why = DR_ALL_DONE;
    b->detail = b->err = 0;
    b->intr = 0;
    b->tsc_moved = 0;
    if (b->n > DR_MAX_BATCH)
        b->n = DR_MAX_BATCH;
    if (b->tsc_offset && read_tsc_offset(b->vcpu_fd, b->tsc_offset) < 0) {
        b->why = DR_PROGRAM_FAILED;
        b->detail = DR_NO_TSC_OFFSET;
        b->err = errno;
        return 0;
    }
    for (int i = 0; i < b->n; i++) {
        b->run->immediate_exit = 0;
        b->enter_ns[i] = now_ns();
        timer_settime(timer, 0, &spec, NULL);
        int fired = 0;
        for (;;) {
            int r = ioctl(b->vcpu_fd, KVM_RUN, 0);
            if (r < 0 && errno != EINTR) {
                b->why = DR_RUN_FAILED;
                b->err = errno;
                timer_settime(timer, 0, &off, NULL);
                sigtimedwait(&alrm, NULL, &zero);
                return 0;
            }
            if (r >= 0 && b->run->exit_reason != KVM_EXIT_INTR) {
                b->why = DR_EXIT;
                b->detail = (int)b->run->exit_reason;
                return settle_tsc(b);
            }
            b->intr++;
            siginfo_t si;
            fired = sigtimedwait(&alrm, &si, &zero) == SIGALRM && si.si_code == SI_TIMER;
            if (fired || b->run->immediate_exit)
                break;
            timer_gettime(timer, &left);
            if (!left.it_value.tv_sec && !left.it_value.tv_nsec)
                break;
        }
        b->exit_ns[i] = now_ns();
        if (!fired) { /* ended otherwise: the timer must not fire into the next run */
            timer_settime(timer, 0, &off, NULL);
            sigtimedwait(&alrm, NULL, &zero);
        }
        b->run->immediate_exit = 0;
        /* The VMM wrote guest memory (another thread, while the GIL was free): no log shows
         * that, so this epoch's checkpoint must be the ordinary one, which merges the record. */
        if (b->watch && *b->watch != b->watch_value) {
            b->why = DR_CHANGED;
            b->detail = DR_VMM_WROTE;
            return settle_tsc(b);
        }
        int rc = dirtyring_program(b->progs[i]);
        if (rc != DR_PROGRAM_DONE) {
            b->why = rc == DR_PROGRAM_CHANGED ? DR_CHANGED : DR_PROGRAM_FAILED;
            b->detail = rc;
            b->err = errno;
            return settle_tsc(b);
        }
        b->done = i + 1;
    }
    return settle_tsc(b);
}
