/* NEVER RUN THIS NATIVELY (as root it may kill every process or worse): only in a guest.
 *
 * Hostile program 1: a million system calls with random numbers and random arguments
 * (pointers inside and outside its memory, huge lengths, bad descriptors), made with a raw
 * `syscall` instruction so that nothing in the C library depends on their results. It must
 * run to its end: every call returns (an error, mostly), and the VMM stays up.
 *
 * Left out, because a real kernel would let them destroy the caller too: exit and exit_group
 * (60, 231), arch_prctl (158: a random FS base breaks the C library's TLS), the calls that
 * may legally zero or move the caller's own memory (mmap 9, brk 12, mremap 25, madvise 28),
 * rt_sigreturn (15: it loads a random context), and the waits that never end for a lone
 * process (pause 34, rt_sigsuspend 130: they end the program with a report).
 *
 * Signals: the library OS serves kill/tkill/tgkill aimed at the program itself (pid 1; also 0
 * and -pgid), which random arguments hit often. So that the million calls still run, the program
 * first ignores every signal and blocks them all, and puts that back after every random
 * rt_sigaction or rt_sigprocmask (both are still fuzzed); a pending signal found unblocked is
 * then discarded, never delivered. SIGKILL and SIGSTOP cannot be ignored or blocked: a kill
 * call carrying one of them is left out. Timed waits (nanosleep 35, clock_nanosleep 230,
 * futex 202, rt_sigtimedwait 128, poll 7, ppoll 271, select 23, pselect6 270) get a short
 * timeout unless theirs surely faults: random bytes in the program's memory (its ELF header,
 * say) can ask for years, and NULL (or a negative poll timeout) is for ever. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

static unsigned long state = 0x9E3779B97F4A7C15UL;
static unsigned long rnd(void) {
    unsigned long z = (state += 0x9E3779B97F4A7C15UL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
    return z ^ (z >> 31);
}
/* Where "inside" pointers point: the program's first anonymous mapping, so at the top of its
 * mmap area: a long write from there runs off the end of its memory (EFAULT), not into its own
 * variables, which a real kernel would let it corrupt too. */
static char *scratch;
#define SCRATCH (16UL << 20)

static long raw(long n, long a, long b, long c, long d, long e, long f) {
    long ret;
    register long r10 __asm__("r10") = d, r8 __asm__("r8") = e, r9 __asm__("r9") = f;
    __asm__ volatile("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8),
                     "r"(r9) : "rcx", "r11", "memory");
    return ret;
}

/* Ignore every signal that can be ignored and block them all (raw calls: glibc refuses some). */
static void shield_signal(long sig) {
    unsigned long ign[4] = {1 /* SIG_IGN */, 0, 0, 0};
    if (sig >= 1 && sig <= 64 && sig != 9 && sig != 19) raw(13, sig, (long)ign, 0, 8, 0, 0);
}
static void shield_mask(void) {
    unsigned long all = ~0UL;
    raw(14, 2 /* SIG_SETMASK */, (long)&all, 0, 8, 0, 0);
}

/* A short timeout for a wait whose own could be long (see the top): only a pointer surely
 * outside the program's memory (the low 2 MiB, the kernel half) is kept, to fault. */
static long short_time(long t) {
    static struct { long sec, nsec; } ts;
    if (t != 0 && ((unsigned long)t < 0x200000 || (unsigned long)t >= 0x800000000000UL))
        return t;
    ts.sec = 0;
    ts.nsec = (long)(rnd() % 1000);
    return (long)&ts;
}

static long arg(void) {
    switch (rnd() % 12) {
    case 0: return 0;
    case 1: return (long)(scratch + rnd() % SCRATCH);               /* inside, writable */
    case 2: return 0x1000 + (long)(rnd() % 0x100000);                /* the library OS */
    case 3: return (long)0xffff800000000000UL + (long)(rnd() % 4096); /* kernel half */
    case 4: return (long)rnd();                                      /* anything */
    case 5: return -1;
    case 6: return (long)(rnd() % 10);                               /* small: fds, flags */
    case 7: return (long)(rnd() % 4096);
    case 8: return 1L << (rnd() % 63);                               /* huge lengths */
    case 9: return 0x600000000000L + (long)(rnd() % (1 << 28));      /* its file system */
    case 10: return (long)scratch;                                   /* a path: "/tmp/f" */
    default: return 1000 + (long)(rnd() % 100);                      /* bad fds */
    }
}

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 1000000;
    int out = fcntl(1, F_DUPFD, 900);  /* our report goes here, whatever the calls do to fd 1 */
    scratch = mmap(0, SCRATCH, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (scratch == MAP_FAILED) { printf("no scratch memory\n"); return 2; }
    strcpy(scratch, "/tmp/f");
    for (long sig = 1; sig <= 64; sig++) shield_signal(sig);
    shield_mask();
    long errors = 0, ok = 0;
    for (long i = 0; i < n; i++) {
        long nr = rnd() % 1000 == 0 ? 512 + (long)(rnd() % 100) : (long)(rnd() % 460);
        if (nr == 60 || nr == 231 || nr == 158 || nr == 9 || nr == 12 || nr == 25 || nr == 28 ||
            nr == 15 || nr == 34 || nr == 130)
            continue;
        long a[6];
        for (int k = 5; k >= 0; k--) a[k] = arg();  /* last first: the order gcc evaluated the
                                                     * arguments of raw(nr, arg(), ...) in */
        int sig = (int)(nr == 62 || nr == 200 ? a[1] : nr == 234 ? a[2] : 0);
        if (sig == 9 || sig == 19)                        /* SIGKILL, SIGSTOP */
            continue;
        if (nr == 35) a[0] = short_time(a[0]);
        if (nr == 230) a[2] = short_time(a[2]);
        if (nr == 202 || nr == 128) a[3 - (nr == 128)] = short_time(a[3 - (nr == 128)]);
        if (nr == 7) a[2] = (long)(rnd() % 3);                        /* poll: milliseconds */
        if (nr == 271) a[2] = short_time(a[2]);                        /* ppoll */
        if (nr == 23 || nr == 270) a[4] = short_time(a[4]);            /* select, pselect6 */
        long r = raw(nr, a[0], a[1], a[2], a[3], a[4], a[5]);
        if (nr == 13) shield_signal((int)a[0]);
        if (nr == 14) shield_mask();
        if (r < 0 && r > -4096) errors++; else ok++;
    }
    char line[128];
    int len = snprintf(line, sizeof line, "done %ld calls: %ld errors, %ld returned\n",
                       errors + ok, errors, ok);
    raw(1, out, (long)line, len, 0, 0, 0);
    return 0;
}
