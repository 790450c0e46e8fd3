/* Signals sent from outside, wherever a program can be: computing in its own code (no
 * syscall), sleeping, blocked reading stdin (and again with SA_RESTART), in sigsuspend and in
 * sigwait. Before each it prints "ready-<phase>" and
 * waits there for the signal the test then sends; after, which signal its handler caught.
 * "plain": no handlers, it only computes, so the signal's default action ends it. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t got;

static void on_signal(int sig) { got = sig; }
static void on_restart(int sig) {
    got = sig;
    write(1, "handled\n", 8);
}

static void ready(const char *phase) {
    printf("ready-%s\n", phase);
    fflush(stdout);
}

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "plain")) {
        ready("compute");
        for (volatile unsigned long i = 0;; i++) {
        }
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;              /* no SA_RESTART: an interrupted call fails */
    sigaction(SIGINT, &sa, 0);
    sigaction(SIGTERM, &sa, 0);
    sigaction(SIGHUP, &sa, 0);

    ready("compute");
    unsigned long spins = 0;
    while (!got) spins++;                   /* no syscall in here */
    printf("compute: caught %d\n", got);
    got = 0;

    /* The signal may come before the call starts (the test sends it once it has read the
     * line), so each waits in a loop until the handler ran; whether a call was cut short
     * (EINTR) goes to stderr, which the test does not compare. */
    ready("sleep");
    int cut = 0;
    while (!got) {
        struct timespec t = {1000, 0}, rem = {0, 0};
        if (nanosleep(&t, &rem) == -1 && errno == EINTR && rem.tv_sec > 900) cut = 1;
    }
    printf("sleep: caught %d\n", got);
    fprintf(stderr, "sleep %s\n", cut ? "cut short" : "not entered");
    got = 0;

    ready("read");
    cut = 0;
    while (!got) {
        char c;
        if (read(0, &c, 1) == -1 && errno == EINTR) cut = 1;
    }
    printf("read: caught %d\n", got);
    fprintf(stderr, "read %s\n", cut ? "cut short" : "not entered");
    got = 0;

    /* SA_RESTART: a read of stdin the signal cuts short goes on after the handler (which
     * says "handled"; the test then writes the byte the read returns). */
    sa.sa_handler = on_restart;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGHUP, &sa, 0);
    ready("restart");
    char b = 0;
    ssize_t n = read(0, &b, 1);
    printf("restart: read %zd byte %c caught %d\n", n, n == 1 ? b : '-', got);
    got = 0;
    sa.sa_handler = on_signal;
    sa.sa_flags = 0;

    /* Waits only a signal can end, made race-free the usual way: the signal is blocked until
     * the wait itself unblocks it (sigsuspend) or takes it (sigwait). */
    sigset_t quit, term, old;
    sigemptyset(&quit);
    sigaddset(&quit, SIGQUIT);
    sigaction(SIGQUIT, &sa, 0);
    sigprocmask(SIG_BLOCK, &quit, &old);
    ready("suspend");
    int r = sigsuspend(&old);
    int e = errno;
    printf("suspend: returned %d errno %s, caught %d\n", r, e == EINTR ? "EINTR" : "other", got);

    sigemptyset(&term);
    sigaddset(&term, SIGTERM);
    sigprocmask(SIG_BLOCK, &term, 0);
    ready("sigwait");
    int sig = 0;
    sigwait(&term, &sig);
    printf("sigwait: got %d\n", sig);
    return 0;
}
