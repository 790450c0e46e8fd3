/* getrandom and /dev/urandom: 64 KiB of each (many pool refills), in odd-sized pieces. Prints
 * the first 16 bytes (two runs must differ), whether any two 1 KiB blocks are equal (a pool
 * handed out twice), and how many bytes are zero (about 1/256 of them for real entropy). */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

static unsigned char buf[2][65536];

int main(void) {
    for (size_t at = 0; at < sizeof buf[0];) {
        size_t n = sizeof buf[0] - at < 100 ? sizeof buf[0] - at : 100;
        if (getrandom(buf[0] + at, n, 0) != (ssize_t)n) { puts("getrandom failed"); return 1; }
        at += n;
    }
    int fd = open("/dev/urandom", O_RDONLY);
    if (fd < 0 || read(fd, buf[1], sizeof buf[1]) != (ssize_t)sizeof buf[1]) {
        puts("urandom failed");
        return 1;
    }
    for (int i = 0; i < 16; i++) printf("%02x", buf[0][i]);
    printf("\n");
    int same = 0;
    long zeros = 0;
    unsigned char *all = &buf[0][0];
    for (int a = 0; a < 128; a++)
        for (int b = a + 1; b < 128; b++)
            same += !memcmp(all + 1024 * a, all + 1024 * b, 1024);
    for (size_t i = 0; i < sizeof buf; i++) zeros += all[i] == 0;
    printf("equal blocks %d\nzeros %ld of %zu\n", same, zeros, sizeof buf);
    return 0;
}
