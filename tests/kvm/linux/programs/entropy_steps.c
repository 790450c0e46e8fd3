/* One line per step: its number and 8 bytes from getrandom, a step every 2 ms of the
 * monotonic clock (so a run lasts steps * 2 ms at any speed). Each line is written at once. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/random.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    int steps = argc > 1 ? atoi(argv[1]) : 500;
    for (int i = 0; i < steps; i++) {
        double until = now() + 0.002;
        while (now() < until) {
        }
        unsigned long long v;
        if (getrandom(&v, sizeof v, 0) != sizeof v) { puts("getrandom failed"); return 1; }
        printf("%d %016llx\n", i, v);
        fflush(stdout);
    }
    return 0;
}
