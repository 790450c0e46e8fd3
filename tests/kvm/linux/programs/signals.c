/* Conformance program for signals, futex, sleeps and the small process calls: it prints a
 * transcript of results and errno values that must be byte-identical natively and under
 * dirtyring (tests/kvm/linux/test_exec_signals.py). Nothing printed depends on the host: no
 * pids, no CPU counts, no times (a sleep prints only whether it took long enough).
 *
 * With an argument it ends the way it is named instead: "abort" (SIGABRT, status 134), "term"
 * (kill(getpid(), SIGTERM): 143), "futex" (waits for ever on a futex: in the guest only),
 * "pause" (waits for a signal nothing sends: in the guest only). */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/futex.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/times.h>
#include <sys/stat.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

struct ksigaction { unsigned long handler, flags, restorer, mask; };

static void say(const char *what, long r) {
    if (r == -1) printf("%s = -1 %s\n", what, strerrorname_np(errno));
    else printf("%s = %ld\n", what, r);
}
/* glibc functions that return an errno value instead of setting errno. */
static void say_rc(const char *what, int rc) {
    printf("%s = %s\n", what, rc ? strerrorname_np(rc) : "0");
}
static unsigned long kmask(void) {
    unsigned long m = 0;
    syscall(SYS_rt_sigprocmask, SIG_BLOCK, NULL, &m, 8);
    return m;
}

static volatile int order[8], norder, last_code, last_signo, pid_ok, in_mask, on_alt;
static volatile unsigned long saved_mask;
static char *alt;
#define ALT_SIZE (64 * 1024)

static void handler(int sig) {
    order[norder++] = sig;
    in_mask = (kmask() >> (sig - 1)) & 1;
}
static void info_handler(int sig, siginfo_t *si, void *ucv) {
    ucontext_t *uc = ucv;
    order[norder++] = sig;
    last_signo = si->si_signo;
    last_code = si->si_code;
    pid_ok = si->si_pid == getpid();
    saved_mask = *(unsigned long *)&uc->uc_sigmask;
    in_mask = (kmask() >> (sig - 1)) & 1;
}
/* Rewrites the interrupted context: rt_sigreturn must take RAX from the frame. */
static void rax_handler(int sig, siginfo_t *si, void *ucv) {
    (void)sig; (void)si;
    ((ucontext_t *)ucv)->uc_mcontext.gregs[REG_RAX] = 42;
}
static void alt_handler(int sig) {
    char here;
    stack_t now;
    order[norder++] = sig;
    on_alt = &here >= alt && &here < alt + ALT_SIZE;
    sigaltstack(NULL, &now);
    printf("  in handler: on the alternate stack %s, ss_flags %d\n", on_alt ? "yes" : "no",
           now.ss_flags);
    stack_t other = {.ss_sp = alt, .ss_size = ALT_SIZE, .ss_flags = 0};
    say("  sigaltstack while on it", sigaltstack(&other, NULL));
}

static void print_order(const char *what) {
    printf("%s:", what);
    for (int i = 0; i < norder; i++) printf(" %d", order[i]);
    printf("\n");
    norder = 0;
}

static void sigaction_tests(void) {
    printf("-- sigaction\n");
    struct sigaction sa = {0}, old;
    sa.sa_sigaction = info_handler;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaddset(&sa.sa_mask, SIGUSR2);
    say("sigaction(USR1)", sigaction(SIGUSR1, &sa, &old));
    printf("old handler is SIG_DFL: %s\n", old.sa_handler == SIG_DFL ? "yes" : "no");
    say("sigaction(USR1, NULL, &cur)", sigaction(SIGUSR1, NULL, &old));
    printf("cur: same handler %s, flags %#x, USR2 in mask %d, USR1 in mask %d\n",
           old.sa_sigaction == info_handler ? "yes" : "no", old.sa_flags,
           sigismember(&old.sa_mask, SIGUSR2), sigismember(&old.sa_mask, SIGUSR1));

    struct ksigaction k = {(unsigned long)SIG_IGN, 0, 0, ~0UL}, ko;
    say("raw rt_sigaction(65)", syscall(SYS_rt_sigaction, 65, &k, NULL, 8));
    say("raw rt_sigaction(0)", syscall(SYS_rt_sigaction, 0, &k, NULL, 8));
    say("raw rt_sigaction(KILL, act)", syscall(SYS_rt_sigaction, SIGKILL, &k, NULL, 8));
    say("raw rt_sigaction(STOP, act)", syscall(SYS_rt_sigaction, SIGSTOP, &k, NULL, 8));
    say("raw rt_sigaction(KILL, NULL, old)", syscall(SYS_rt_sigaction, SIGKILL, NULL, &ko, 8));
    say("raw rt_sigaction(size 4)", syscall(SYS_rt_sigaction, SIGUSR2, &k, NULL, 4));
    say("raw rt_sigaction(bad act)", syscall(SYS_rt_sigaction, SIGUSR2, (void *)8, NULL, 8));
    say("raw rt_sigaction(bad oact)", syscall(SYS_rt_sigaction, SIGUSR2, NULL, (void *)8, 8));
    k.flags = 0x400 | SA_RESTART;                 /* SA_UNSUPPORTED: Linux clears it */
    say("raw rt_sigaction(USR2, all mask)", syscall(SYS_rt_sigaction, SIGUSR2, &k, NULL, 8));
    say("raw rt_sigaction(USR2, NULL, old)", syscall(SYS_rt_sigaction, SIGUSR2, NULL, &ko, 8));
    printf("stored: handler %lu flags %#lx mask %#lx\n", ko.handler, ko.flags, ko.mask);
    signal(SIGUSR2, SIG_DFL);
    say("raw rt_sigaction(64, NULL, old)", syscall(SYS_rt_sigaction, 64, NULL, &ko, 8));
}

static void mask_tests(void) {
    printf("-- masks\n");
    unsigned long m = 1UL << (SIGUSR1 - 1), o = 0;
    say("raw BLOCK USR1", syscall(SYS_rt_sigprocmask, SIG_BLOCK, &m, &o, 8));
    printf("old %#lx now %#lx\n", o, kmask());
    say("raw UNBLOCK USR1", syscall(SYS_rt_sigprocmask, SIG_UNBLOCK, &m, NULL, 8));
    printf("now %#lx\n", kmask());
    m = ~0UL;
    say("raw SETMASK all", syscall(SYS_rt_sigprocmask, SIG_SETMASK, &m, NULL, 8));
    printf("now %#lx (KILL and STOP cannot be blocked)\n", kmask());
    m = 0;
    say("raw SETMASK none", syscall(SYS_rt_sigprocmask, SIG_SETMASK, &m, NULL, 8));
    say("raw how 3", syscall(SYS_rt_sigprocmask, 3, &m, NULL, 8));
    say("raw how 3, no set", syscall(SYS_rt_sigprocmask, 3, NULL, NULL, 8));
    say("raw size 16", syscall(SYS_rt_sigprocmask, SIG_BLOCK, &m, NULL, 16));
    say("raw bad set", syscall(SYS_rt_sigprocmask, SIG_BLOCK, (void *)8, NULL, 8));
    say("raw bad oset", syscall(SYS_rt_sigprocmask, SIG_BLOCK, NULL, (void *)8, 8));
}

static void pending_and_delivery_tests(void) {
    printf("-- pending and delivery\n");
    struct sigaction sa = {0};
    sigset_t s, p;
    sa.sa_handler = handler;
    sigaction(SIGUSR2, &sa, NULL);
    sigemptyset(&s);
    sigaddset(&s, SIGUSR1);
    sigaddset(&s, SIGUSR2);
    sigprocmask(SIG_BLOCK, &s, NULL);
    say("raise(USR1) blocked", raise(SIGUSR1));
    say("kill(self, USR2) blocked", kill(getpid(), SIGUSR2));
    say("raise(USR1) again", raise(SIGUSR1));
    say("sigpending", sigpending(&p));
    printf("pending USR1 %d USR2 %d TERM %d; handlers ran: %d\n", sigismember(&p, SIGUSR1),
           sigismember(&p, SIGUSR2), sigismember(&p, SIGTERM), norder);
    unsigned long raw = 0;
    say("raw rt_sigpending(size 16)", syscall(SYS_rt_sigpending, &raw, 16));
    say("raw rt_sigpending(bad)", syscall(SYS_rt_sigpending, (void *)8, 8));
    sigprocmask(SIG_UNBLOCK, &s, NULL);
    /* Both become deliverable at once: USR1 first (the lower number); its sa_mask blocks USR2
     * until its handler returns. */
    print_order("handlers ran");
    printf("USR1 handler: signo %d code %d pid ok %d, USR1 blocked inside %d, saved mask %#lx\n",
           last_signo, last_code, pid_ok, in_mask, saved_mask);
    printf("mask after the handlers %#lx\n", kmask());
    say("syscall(kill, self, USR1)", syscall(SYS_kill, getpid(), SIGUSR1));
    printf("code %d (SI_USER)\n", last_code);
    print_order("ran");

    /* A blocked, ignored signal is still queued; setting SIG_IGN discards a pending one. */
    signal(SIGUSR2, SIG_IGN);
    sigprocmask(SIG_BLOCK, &s, NULL);
    raise(SIGUSR2);
    sigpending(&p);
    printf("blocked+ignored USR2 pending %d\n", sigismember(&p, SIGUSR2));
    sigprocmask(SIG_UNBLOCK, &s, NULL);
    sigpending(&p);
    printf("after unblock pending %d, handlers ran %d\n", sigismember(&p, SIGUSR2), norder);
    sa.sa_handler = handler;
    sigaction(SIGUSR2, &sa, NULL);
    sigprocmask(SIG_BLOCK, &s, NULL);
    raise(SIGUSR2);
    signal(SIGUSR2, SIG_IGN);
    sigpending(&p);
    printf("SIG_IGN discards a pending USR2: pending %d\n", sigismember(&p, SIGUSR2));
    sigprocmask(SIG_UNBLOCK, &s, NULL);
    print_order("ran");

    /* SA_RESETHAND and SA_NODEFER. */
    sa.sa_flags = SA_RESETHAND | SA_NODEFER;
    sigaction(SIGUSR2, &sa, NULL);
    say("raise(USR2) resethand+nodefer", raise(SIGUSR2));
    printf("USR2 blocked inside %d\n", in_mask);
    struct sigaction cur;
    sigaction(SIGUSR2, NULL, &cur);
    printf("handler reset to SIG_DFL %s\n", cur.sa_handler == SIG_DFL ? "yes" : "no");
    print_order("ran");

    /* The handler rewrites the interrupted RAX: rt_sigreturn restores the frame's. */
    sa.sa_sigaction = rax_handler;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGUSR1, &sa, NULL);
    say("syscall(kill) with the handler rewriting RAX", syscall(SYS_kill, getpid(), SIGUSR1));

    /* Real-time signals queue; standard ones do not. */
    sa.sa_handler = handler;
    sa.sa_flags = 0;
    sigaction(SIGRTMIN + 1, &sa, NULL);
    sigaction(SIGUSR1, &sa, NULL);
    sigemptyset(&s);
    sigaddset(&s, SIGRTMIN + 1);
    sigaddset(&s, SIGUSR1);
    sigprocmask(SIG_BLOCK, &s, NULL);
    raise(SIGRTMIN + 1); raise(SIGRTMIN + 1); raise(SIGUSR1); raise(SIGUSR1);
    sigprocmask(SIG_UNBLOCK, &s, NULL);
    /* USR1's frame is set up first, then RTMIN+1's on top (it runs first); the second
     * RTMIN+1 waits for the first's rt_sigreturn to unblock it. */
    printf("queued: ");
    for (int i = 0; i < norder; i++) printf("%s ", order[i] == SIGUSR1 ? "USR1" : "RTMIN+1");
    printf("\n");
    norder = 0;

    /* sigtimedwait takes a pending signal without running its handler. */
    sigprocmask(SIG_BLOCK, &s, NULL);
    raise(SIGUSR1);
    siginfo_t si;
    struct timespec zero = {0, 0};
    say("sigtimedwait(USR1 pending)", sigtimedwait(&s, &si, &zero));
    printf("si_signo %d si_code %d\n", si.si_signo, si.si_code);
    say("sigtimedwait(nothing pending, 0 s)", sigtimedwait(&s, &si, &zero));
    sigprocmask(SIG_UNBLOCK, &s, NULL);
    print_order("ran");
}

static void ignore_tests(void) {
    printf("-- ignored and default-ignored\n");
    signal(SIGUSR1, SIG_IGN);
    say("raise(USR1) ignored", raise(SIGUSR1));
    int ign[] = {SIGCHLD, SIGURG, SIGWINCH, SIGCONT};
    for (int i = 0; i < 4; i++) {
        signal(ign[i], SIG_DFL);
        char what[64];
        snprintf(what, sizeof what, "raise(%s) default", sigabbrev_np(ign[i]));
        say(what, raise(ign[i]));
    }
    say("kill(self, 0)", kill(getpid(), 0));
    say("kill(0, 0)", kill(0, 0));
    say("kill(self, 65)", kill(getpid(), 65));
    say("kill(self, -1)", kill(getpid(), -1));
    say("kill(nobody, 0)", kill(0x7ffffff0, 0));
    say("tgkill(self, self, 0)", syscall(SYS_tgkill, getpid(), getpid(), 0));
    say("tgkill(0, self, 0)", syscall(SYS_tgkill, 0, getpid(), 0));
    say("tgkill(self, nobody, 0)", syscall(SYS_tgkill, getpid(), 0x7ffffff0, 0));
    say("tkill(-5, 0)", syscall(SYS_tkill, -5, 0));
    say("tkill(self, 99)", syscall(SYS_tkill, getpid(), 99));
    signal(SIGUSR1, SIG_DFL);
}

static void altstack_tests(void) {
    printf("-- sigaltstack\n");
    stack_t ss = {0}, old;
    say("sigaltstack(NULL, &old)", sigaltstack(NULL, &old));
    printf("old flags %d size %zu\n", old.ss_flags, old.ss_size);
    alt = malloc(ALT_SIZE);
    ss.ss_sp = alt;
    ss.ss_size = 1024;
    say("sigaltstack(1 KiB)", sigaltstack(&ss, NULL));
    ss.ss_size = ALT_SIZE;
    ss.ss_flags = 99;
    say("sigaltstack(flags 99)", sigaltstack(&ss, NULL));
    ss.ss_flags = 0;
    say("sigaltstack(64 KiB)", sigaltstack(&ss, NULL));
    say("raw sigaltstack(bad)", syscall(SYS_sigaltstack, (void *)8, NULL));
    sigaltstack(NULL, &old);
    printf("now flags %d size %zu same sp %d\n", old.ss_flags, old.ss_size, old.ss_sp == alt);
    struct sigaction sa = {0};
    sa.sa_handler = alt_handler;
    sa.sa_flags = SA_ONSTACK;
    sigaction(SIGUSR1, &sa, NULL);
    say("raise(USR1) on the alternate stack", raise(SIGUSR1));
    print_order("ran");
    ss.ss_flags = SS_DISABLE;
    say("sigaltstack(disable)", sigaltstack(&ss, NULL));
    sigaltstack(NULL, &old);
    printf("disabled: flags %d size %zu\n", old.ss_flags, old.ss_size);
    say("raise(USR1) with SA_ONSTACK and no stack", raise(SIGUSR1));
    printf("  on the alternate stack %s\n", on_alt ? "yes" : "no");
    print_order("ran");
    signal(SIGUSR1, SIG_DFL);
}

static long futex(void *a, int op, unsigned val, const struct timespec *t, void *a2,
                  unsigned v3) {
    return syscall(SYS_futex, a, op, val, t, a2, v3);
}

static void futex_tests(void) {
    printf("-- futex\n");
    static unsigned w = 1, w2 = 5;
    struct timespec ms = {0, 1000000}, bad = {0, 2000000000};
    say("WAIT differs", futex(&w, FUTEX_WAIT, 0, NULL, NULL, 0));
    say("WAIT_PRIVATE differs", futex(&w, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0));
    say("WAIT equal, 1 ms", futex(&w, FUTEX_WAIT, 1, &ms, NULL, 0));
    say("WAIT_PRIVATE equal, 1 ms", futex(&w, FUTEX_WAIT_PRIVATE, 1, &ms, NULL, 0));
    say("WAIT bad timeout", futex(&w, FUTEX_WAIT, 1, &bad, NULL, 0));
    say("WAIT bad address", futex((void *)8, FUTEX_WAIT, 1, NULL, NULL, 0));
    say("WAIT misaligned", futex((char *)&w + 1, FUTEX_WAIT, 1, NULL, NULL, 0));
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    now.tv_nsec += 1000000;
    if (now.tv_nsec >= 1000000000) { now.tv_sec++; now.tv_nsec -= 1000000000; }
    say("WAIT_BITSET equal, absolute +1 ms",
        futex(&w, FUTEX_WAIT_BITSET_PRIVATE, 1, &now, NULL, FUTEX_BITSET_MATCH_ANY));
    say("WAIT_BITSET bitset 0", futex(&w, FUTEX_WAIT_BITSET, 1, &now, NULL, 0));
    say("WAIT_BITSET differs", futex(&w, FUTEX_WAIT_BITSET, 0, NULL, NULL, ~0U));
    say("WAKE", futex(&w, FUTEX_WAKE, 1, NULL, NULL, 0));
    say("WAKE_PRIVATE", futex(&w, FUTEX_WAKE_PRIVATE, 10, NULL, NULL, 0));
    say("WAKE_BITSET", futex(&w, FUTEX_WAKE_BITSET, 1, NULL, NULL, ~0U));
    say("WAKE_BITSET bitset 0", futex(&w, FUTEX_WAKE_BITSET, 1, NULL, NULL, 0));
    say("WAKE misaligned", futex((char *)&w + 2, FUTEX_WAKE, 1, NULL, NULL, 0));
    say("CMP_REQUEUE differs", futex(&w, FUTEX_CMP_REQUEUE, 1, (void *)1, &w2, 7));
    say("CMP_REQUEUE equal", futex(&w, FUTEX_CMP_REQUEUE, 1, (void *)1, &w2, 1));
    say("op 99", futex(&w, 99, 1, NULL, NULL, 0));
}

static long elapsed_ns(const struct timespec *a, const struct timespec *b) {
    return (b->tv_sec - a->tv_sec) * 1000000000L + (b->tv_nsec - a->tv_nsec);
}

static void sleep_tests(void) {
    printf("-- sleeps\n");
    struct timespec t0, t1, ten = {0, 10000000}, bad = {0, 1000000000};
    clock_gettime(CLOCK_MONOTONIC, &t0);
    say("nanosleep(10 ms)", nanosleep(&ten, NULL));
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("10 ms passed: %s\n", elapsed_ns(&t0, &t1) >= 10000000 ? "ok" : "NO");
    say("nanosleep(1e9 ns)", nanosleep(&bad, NULL));
    say("raw nanosleep(bad)", syscall(SYS_nanosleep, (void *)8, NULL));
    clock_gettime(CLOCK_MONOTONIC, &t0);
    say_rc("clock_nanosleep(MONOTONIC, 10 ms)", clock_nanosleep(CLOCK_MONOTONIC, 0, &ten, NULL));
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("10 ms passed: %s\n", elapsed_ns(&t0, &t1) >= 10000000 ? "ok" : "NO");
    struct timespec until = t1;
    until.tv_nsec += 10000000;
    if (until.tv_nsec >= 1000000000) { until.tv_sec++; until.tv_nsec -= 1000000000; }
    say_rc("clock_nanosleep(MONOTONIC, ABSTIME +10 ms)",
           clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &until, NULL));
    clock_gettime(CLOCK_MONOTONIC, &t0);
    printf("reached: %s\n", elapsed_ns(&until, &t0) >= 0 ? "ok" : "NO");
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec -= 1;
    say_rc("clock_nanosleep(REALTIME, ABSTIME in the past)",
           clock_nanosleep(CLOCK_REALTIME, TIMER_ABSTIME, &until, NULL));
    say_rc("clock_nanosleep(THREAD_CPUTIME)",
           clock_nanosleep(CLOCK_THREAD_CPUTIME_ID, 0, &ten, NULL));
    say_rc("clock_nanosleep(MONOTONIC_RAW)", clock_nanosleep(CLOCK_MONOTONIC_RAW, 0, &ten, NULL));
    say_rc("clock_nanosleep(1e9 ns)", clock_nanosleep(CLOCK_MONOTONIC, 0, &bad, NULL));
}

static void process_tests(void) {
    printf("-- scheduling, accounting, process groups\n");
    say("sched_yield", sched_yield());
    cpu_set_t set;
    CPU_ZERO(&set);
    say("sched_getaffinity", sched_getaffinity(0, sizeof set, &set));
    printf("at least one CPU: %s\n", CPU_COUNT(&set) >= 1 ? "ok" : "NO");
    say("raw sched_getaffinity(len 0)", syscall(SYS_sched_getaffinity, 0, 0, &set));
    say("raw sched_getaffinity(len 12)", syscall(SYS_sched_getaffinity, 0, 12, &set));
    say("raw sched_getaffinity(nobody)", syscall(SYS_sched_getaffinity, 0x7ffffff0, 8, &set));
    say("raw sched_getaffinity(bad)", syscall(SYS_sched_getaffinity, 0, 8, (void *)8));
    unsigned cpu = 99, node = 99;
    say("raw getcpu", syscall(SYS_getcpu, &cpu, &node, NULL));
    printf("cpu valid: %s\n", cpu < 4096 ? "ok" : "NO");
    say("raw getcpu(bad)", syscall(SYS_getcpu, (void *)8, NULL, NULL));
    struct rusage ru;
    say("getrusage(SELF)", getrusage(RUSAGE_SELF, &ru));
    say("getrusage(CHILDREN)", getrusage(RUSAGE_CHILDREN, &ru));
    say("getrusage(5)", getrusage(5, &ru));
    say("raw getrusage(bad)", syscall(SYS_getrusage, RUSAGE_SELF, (void *)8));
    struct tms t;
    printf("times: %s\n", times(&t) != (clock_t)-1 ? "ok" : "NO");
    say("raw times(bad)", syscall(SYS_times, (void *)8));
    umask(022);
    printf("umask round trip: %#o\n", umask(027));
    printf("umask now: %#o\n", umask(022));
    printf("getpgid(0) == getpgrp(): %s\n", getpgid(0) == getpgrp() ? "yes" : "no");
    printf("getsid(0) == getsid(self): %s\n", getsid(0) == getsid(getpid()) ? "yes" : "no");
    say("getpgid(nobody)", getpgid(0x7ffffff0));
    say("getsid(nobody)", getsid(0x7ffffff0));
    say("setpgid(nobody, 0)", setpgid(0x7ffffff0, 0));
    say("setpgid(0, -1)", setpgid(0, -1));
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc > 1) {
        const char *how = argv[1];
        write(1, "before\n", 7);
        if (!strcmp(how, "abort")) abort();
        if (!strcmp(how, "term")) kill(getpid(), SIGTERM);
        if (!strcmp(how, "futex")) {
            static unsigned w = 0;
            futex(&w, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
        }
        if (!strcmp(how, "pause")) pause();
        write(1, "after\n", 6);
        return 3;
    }
    /* A native run inherits its parent's blocked and ignored signals: start from Linux's
     * defaults, as the guest does. */
    struct ksigaction dfl = {0, 0, 0, 0};
    for (int sig = 1; sig <= 64; sig++)
        if (sig != SIGKILL && sig != SIGSTOP) syscall(SYS_rt_sigaction, sig, &dfl, NULL, 8);
    unsigned long none = 0;
    syscall(SYS_rt_sigprocmask, SIG_SETMASK, &none, NULL, 8);
    sigaction_tests();
    mask_tests();
    pending_and_delivery_tests();
    ignore_tests();
    altstack_tests();
    futex_tests();
    sleep_tests();
    process_tests();
    printf("-- end\n");
    return 0;
}
