/* bench exec's micro-benchmarks, run natively and as a guest: per-operation times, timed
 * inside the program with clock_gettime(CLOCK_MONOTONIC), printed as "name ns_per_op" lines.
 *   floor     syscall 1000: the library OS returns at once (natively: ENOSYS, also at once)
 *   getpid    a syscall the library OS serves
 *   brk       brk(0)
 *   clock     clock_gettime through the C library (a vDSO call natively)
 *   write64   write(1, 64 bytes)
 *   getpid_rw getpid through the C library: its `mov $39,%eax; syscall` site is one the
 *             library OS rewrites into a jump (after the first call: no trap)          */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static long raw(long n, long a, long b, long c) {
    long ret;
    __asm__ volatile("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c)
                     : "rcx", "r11", "memory");
    return ret;
}
static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 100000;
    char buf[64];
    memset(buf, 'x', 63);
    buf[63] = '\n';
    double t, r[6];
    t = now(); for (long i = 0; i < n; i++) raw(1000, 0, 0, 0); r[0] = (now() - t) / n;
    t = now(); for (long i = 0; i < n; i++) raw(39, 0, 0, 0); r[1] = (now() - t) / n;
    t = now(); for (long i = 0; i < n; i++) raw(12, 0, 0, 0); r[2] = (now() - t) / n;
    struct timespec ts;
    t = now(); for (long i = 0; i < n; i++) clock_gettime(CLOCK_MONOTONIC, &ts); r[3] = (now() - t) / n;
    long w = n / 10;
    t = now(); for (long i = 0; i < w; i++) raw(1, 1, (long)buf, 64); r[4] = (now() - t) / w;
    long pid = 0;
    t = now(); for (long i = 0; i < n; i++) pid += getpid(); r[5] = (now() - t) / n;
    fprintf(stderr, "floor %.1f\ngetpid %.1f\nbrk %.1f\nclock %.1f\nwrite64 %.1f\n"
            "getpid_rw %.1f\n", r[0], r[1], r[2], r[3], r[4], r[5] + (pid == 0));
    return 0;
}
