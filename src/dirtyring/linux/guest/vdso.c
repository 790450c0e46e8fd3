/* The vDSO: clock_gettime, gettimeofday, time and getcpu without a `syscall`, from the TSC
 * and the boot time the VMM wrote into the Linux control block (read-only to the guest). */
#include "kernel.h"  /* ctl(), rdtsc() and now_ns(): the library OS's own clock */

struct kts { s64 sec, nsec; };
struct ktv { s64 sec, usec; };
static long sys2(long n, long a, long b) {
    long r;
    __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b) : "rcx", "r11", "memory");
    return r;
}

int __vdso_clock_gettime(int clk, struct kts *ts) {
    if (clk < 0 || clk > 7 || clk == 2 || clk == 3) return (int)sys2(228, clk, (long)ts);
    u64 ns = now_ns();
    if (clk != 0 && clk != 5) ns -= ctl()->boot_realtime_ns;
    ts->sec = (s64)(ns / 1000000000UL);
    ts->nsec = (s64)(ns % 1000000000UL);
    return 0;
}
int __vdso_gettimeofday(struct ktv *tv, void *tz) {
    if (tz) return (int)sys2(96, (long)tv, (long)tz);
    if (tv) {
        u64 ns = now_ns();
        tv->sec = (s64)(ns / 1000000000UL);
        tv->usec = (s64)(ns % 1000000000UL / 1000);
    }
    return 0;
}
long __vdso_time(long *t) {
    long s = (long)(now_ns() / 1000000000UL);
    if (t) *t = s;
    return s;
}
long __vdso_getcpu(unsigned *cpu, unsigned *node, void *unused) {
    (void)unused;
    if (cpu) *cpu = 0;
    if (node) *node = 0;
    return 0;
}
int clock_gettime(int, struct kts *) __attribute__((weak, alias("__vdso_clock_gettime")));
int gettimeofday(struct ktv *, void *) __attribute__((weak, alias("__vdso_gettimeofday")));
long time(long *) __attribute__((weak, alias("__vdso_time")));
long getcpu(unsigned *, unsigned *, void *) __attribute__((weak, alias("__vdso_getcpu")));
