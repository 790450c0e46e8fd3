/* Hostile program 2: scribbles over the library OS's memory and the stdio queue it shares with
 * the VMM (one address space, as in any unikernel), then keeps making system calls. Whatever
 * happens to it, the VMM must stay up and say what happened.
 *
 *   scribbler SEED ROUNDS [os]   random bytes over the library OS's state and the stdio
 *                                queue (with "os": over the library OS's state only)
 *   scribbler prod          only the queue's producer index, set far ahead, then a write */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <unistd.h>

static unsigned long state;
static unsigned long rnd(void) {
    unsigned long z = (state += 0x9E3779B97F4A7C15UL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
    return z ^ (z >> 31);
}

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "prod")) {
        printf("before\n");
        fflush(stdout);
        *(volatile unsigned long *)0x100000UL += 1UL << 40;     /* the stdio producer index */
        printf("after\n");
        fflush(stdout);
        return 0;
    }
    state = argc > 1 ? strtoul(argv[1], 0, 10) : 1;
    int rounds = argc > 2 ? atoi(argv[2]) : 100;
    int os_only = argc > 3 && !strcmp(argv[3], "os");
    for (int r = 0; r < rounds; r++) {
        for (int k = 0; k < 8; k++) {
            unsigned long at;
            switch (os_only ? 0 : rnd() % 3) {
            case 0: at = 0x80000 + rnd() % 0x26000; break;       /* the library OS's state */
            case 1: at = 0x100000 + rnd() % 0x200; break;        /* the queue's header */
            default: at = 0x101000 + rnd() % 0x8000; break;      /* the queue's records */
            }
            *(volatile unsigned char *)at = (unsigned char)rnd();
        }
        printf("round %d\n", r);
        fflush(stdout);
        int fd = open("/tmp/a", O_CREAT | O_RDWR, 0600);
        if (fd >= 0) { write(fd, "data", 4); close(fd); }
        char buf[64];
        (void)getcwd(buf, sizeof buf);
        free(malloc(1000 + r));
    }
    printf("survived\n");
    return 0;
}
