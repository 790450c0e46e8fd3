/* poll, ppoll, select and pselect over the descriptors a lone program has: files, /dev/null,
 * pipes (empty, with data, with no writer left), stdin (data, then its end), bad descriptors,
 * and timeouts that run out. Prints a transcript a native run and a guest run must print
 * identically; stdin must be a pipe holding some bytes and then closed.
 *   poll forever   waits in poll with no timeout on an empty pipe (natively: for ever). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/select.h>
#include <time.h>
#include <unistd.h>

static long ms_since(const struct timespec *t0) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (t.tv_sec - t0->tv_sec) * 1000 + (t.tv_nsec - t0->tv_nsec) / 1000000;
}

static void show(const char *what, int n, struct pollfd *p, int k) {
    printf("%-26s %d errno %d:", what, n, n < 0 ? errno : 0);
    for (int i = 0; i < k; i++) printf(" %#x", p[i].revents);
    printf("\n");
}

int main(int argc, char **argv) {
    int pp[2];
    pipe(pp);
    if (argc > 1 && !strcmp(argv[1], "forever")) {
        struct pollfd p = {pp[0], POLLIN, 0};
        printf("polling\n");
        fflush(stdout);
        poll(&p, 1, -1);
        return 0;
    }
    int fd = open("f.txt", O_CREAT | O_RDWR | O_TRUNC, 0644);
    write(fd, "abc", 3);
    int null = open("/dev/null", O_RDWR);
    struct pollfd p[4] = {{fd, POLLIN | POLLOUT, 0}, {null, POLLIN | POLLOUT, 0},
                          {-1, POLLIN, 0}, {999, POLLIN, 0}};
    show("file null -1 999", poll(p, 4, 0), p, 4);
    struct pollfd q[2] = {{pp[0], POLLIN, 0}, {pp[1], POLLOUT, 0}};
    show("empty pipe", poll(q, 2, 0), q, 2);
    write(pp[1], "xy", 2);
    show("pipe with data", poll(q, 2, 0), q, 2);
    char buf[64];
    read(pp[0], buf, 2);
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int n = poll(q, 1, 30);
    long ms = ms_since(&t0);
    printf("poll 30 ms on an empty pipe: %d, waited enough %d\n", n, ms >= 30);
    struct timespec ts = {0, 20 * 1000000};
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGUSR1);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    n = ppoll(q, 1, &ts, &mask);
    printf("ppoll 20 ms with a mask: %d, waited enough %d\n", n, ms_since(&t0) >= 20);
    sigprocmask(SIG_SETMASK, 0, &mask);
    printf("mask restored %d\n", !sigismember(&mask, SIGUSR1));

    /* stdin: its bytes, then its end */
    struct pollfd in = {0, POLLIN, 0};
    n = poll(&in, 1, -1);
    printf("stdin: %d readable %d\n", n, (in.revents & POLLIN) != 0);
    long total = 0, r;
    while ((r = read(0, buf, sizeof buf)) > 0) total += r;
    n = poll(&in, 1, -1);
    printf("stdin read %ld, then: %d %#x\n", total, n, in.revents & (POLLIN | POLLHUP));

    close(pp[1]);
    show("pipe, no writer left", poll(q, 1, 0), q, 1);

    /* select */
    int pp2[2];
    pipe(pp2);
    write(pp2[1], "z", 1);
    fd_set rs, ws;
    FD_ZERO(&rs);
    FD_ZERO(&ws);
    FD_SET(fd, &rs);
    FD_SET(pp2[0], &rs);
    FD_SET(pp2[1], &ws);
    FD_SET(pp[0], &rs);           /* no writer: readable (its end) */
    int top = fd > pp2[1] ? fd : pp2[1];
    if (pp[0] > top) top = pp[0];
    struct timeval tv = {0, 0};
    n = select(top + 1, &rs, &ws, 0, &tv);
    printf("select: %d file %d pipe %d write end %d ended pipe %d\n", n, FD_ISSET(fd, &rs),
           FD_ISSET(pp2[0], &rs), FD_ISSET(pp2[1], &ws), FD_ISSET(pp[0], &rs));
    read(pp2[0], buf, 1);
    FD_ZERO(&rs);
    FD_SET(pp2[0], &rs);
    tv.tv_sec = 0;
    tv.tv_usec = 20000;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    n = select(pp2[0] + 1, &rs, 0, 0, &tv);
    printf("select 20 ms: %d, waited enough %d, left %d\n", n, ms_since(&t0) >= 20,
           tv.tv_sec == 0 && tv.tv_usec < 20000);
    FD_ZERO(&rs);
    FD_SET(50, &rs);
    errno = 0;
    n = select(51, &rs, 0, 0, &tv);
    printf("select on a closed descriptor: %d errno %d\n", n, errno);
    FD_ZERO(&ws);
    FD_SET(1, &ws);
    ts.tv_nsec = 0;
    n = pselect(2, 0, &ws, 0, &ts, &mask);
    printf("pselect stdout writable: %d %d\n", n, FD_ISSET(1, &ws));
    return 0;
}
