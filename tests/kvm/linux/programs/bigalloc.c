/* malloc 256 MiB (glibc takes it from mmap) and touch one byte of every MiB of it: runs with
 * `run --exec`'s default address space as it does natively. */
#include <stdio.h>
#include <stdlib.h>

int main(void) {
    size_t n = 256UL << 20;
    unsigned char *p = malloc(n);
    if (!p) { puts("malloc failed"); return 1; }
    unsigned long sum = 0;
    for (size_t i = 0; i < n; i += 1 << 20) p[i] = (unsigned char)(i >> 20);
    for (size_t i = 0; i < n; i += 1 << 20) sum += p[i];
    printf("sum %lu\n", sum);
    return 0;
}
