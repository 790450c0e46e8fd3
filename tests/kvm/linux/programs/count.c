#include <stdlib.h>
#include <stdio.h>
int main(int argc, char **argv) {
    unsigned long h = 1;
    int n = argc > 1 ? atoi(argv[1]) : 200;
    for (int i = 0; i < n; i++) {
        for (int j = 0; j < 1000000; j++) h = h * 6364136223846793005UL + (unsigned long)j;
        printf("%d %lx\n", i, h);
        fflush(stdout);
    }
    return (int)(h & 0x7f);
}
