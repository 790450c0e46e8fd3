/* Page gather with non-temporal stores: see pagecopy.py for why this is C.
 * dst[i] = src[idx[i]] for 4096-byte pages; dst is 16-byte aligned (staging slots are). */
#include <stdint.h>
#include <emmintrin.h>

int dirtyring_gather_nt(uint8_t *dst, const uint8_t *src, const int64_t *idx, int64_t n,
                        int64_t src_pages)
{
    for (int64_t i = 0; i < n; i++)
        if (idx[i] < 0 || idx[i] >= src_pages)
            return -1;
    for (int64_t i = 0; i < n; i++) {
        const __m128i *s = (const __m128i *)(src + idx[i] * 4096);
        __m128i *d = (__m128i *)(dst + i * 4096);
        for (int j = 0; j < 256; j += 4) {
            __m128i a = _mm_loadu_si128(s + j), b = _mm_loadu_si128(s + j + 1);
            __m128i c = _mm_loadu_si128(s + j + 2), e = _mm_loadu_si128(s + j + 3);
            _mm_stream_si128(d + j, a);
            _mm_stream_si128(d + j + 1, b);
            _mm_stream_si128(d + j + 2, c);
            _mm_stream_si128(d + j + 3, e);
        }
    }
    _mm_sfence(); /* the stores are visible before the caller tells the reader */
    return 0;
}
