/* The warm server's test program.
 *   warm STATUS ARGS...  prints its arguments and then its stdin on stdout, a line on stderr,
 *                        and exits with STATUS;
 *   warm spin            prints "ready", then computes until a signal ends it. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "spin") == 0) {
        printf("ready\n");
        fflush(stdout);
        volatile unsigned long x = 0;
        for (;;)
            x++;
    }
    for (int i = 1; i < argc; i++)
        printf("arg %d: %s\n", i, argv[i]);
    char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, stdin)) > 0)
        fwrite(buf, 1, n, stdout);
    fprintf(stderr, "to stderr\n");
    return argc > 1 ? atoi(argv[1]) : 0;
}
