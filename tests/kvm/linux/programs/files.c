#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/mman.h>
#include <unistd.h>
static int cmp(const void *a, const void *b) { return strcmp(*(char **)a, *(char **)b); }
int main(void) {
    char buf[256];
    FILE *in = fopen("input.txt", "r");
    if (!in) { printf("no input: %d\n", errno); return 1; }
    int lines = 0;
    while (fgets(buf, sizeof buf, in)) lines++;
    fclose(in);
    printf("input lines %d\n", lines);
    mkdir("out", 0755);
    printf("mkdir again %d %d\n", mkdir("out", 0755), errno);
    int fd = open("out/a.bin", O_CREAT | O_RDWR | O_TRUNC, 0644);
    for (int i = 0; i < 1000; i++) { snprintf(buf, sizeof buf, "record %04d\n", i); write(fd, buf, strlen(buf)); }
    printf("size %ld\n", (long)lseek(fd, 0, SEEK_END));
    pwrite(fd, "XXXX", 4, 12 * 500);
    char r[13] = {0};
    pread(fd, r, 12, 12 * 500);
    printf("pread [%.12s]\n", r);
    ftruncate(fd, 12 * 10);
    struct stat st; fstat(fd, &st);
    printf("truncated %ld reg %d\n", (long)st.st_size, S_ISREG(st.st_mode));
    lseek(fd, 100000, SEEK_SET); write(fd, "end", 3);
    fstat(fd, &st); printf("sparse size %ld\n", (long)st.st_size);
    pread(fd, r, 4, 50000); printf("hole zero %d\n", r[0] == 0 && r[3] == 0);
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET};
    printf("lock %d\n", fcntl(fd, F_SETLK, &fl));
    int fd2 = dup(fd); lseek(fd2, 0, SEEK_SET);
    printf("dup shares offset %ld\n", (long)lseek(fd, 0, SEEK_CUR));
    close(fd2); close(fd);
    printf("rename %d\n", rename("out/a.bin", "out/b.bin"));
    printf("old gone %d %d\n", access("out/a.bin", F_OK), errno);
    int p[2]; pipe(p); write(p[1], "through a pipe", 14); close(p[1]);
    memset(buf, 0, sizeof buf); read(p[0], buf, sizeof buf); printf("pipe [%s] eof %ld\n", buf, (long)read(p[0], buf, 1)); close(p[0]);
    for (int i = 0; i < 5; i++) { snprintf(buf, sizeof buf, "out/f%d", i); close(open(buf, O_CREAT | O_WRONLY, 0600)); }
    DIR *d = opendir("out"); struct dirent *e; char *names[64]; int n = 0;
    while ((e = readdir(d))) names[n++] = strdup(e->d_name);
    closedir(d);
    qsort(names, n, sizeof *names, cmp);
    printf("dir:"); for (int i = 0; i < n; i++) printf(" %s", names[i]); printf("\n");
    printf("unlink %d rmdir-nonempty %d %d\n", unlink("out/f0"), rmdir("out"), errno);
    FILE *w = fopen("result.txt", "w"); fprintf(w, "lines=%d\n", lines); fclose(w);
    int mf = open("out/b.bin", O_RDWR);
    char *m = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, mf, 0);
    m[0] = 'R'; munmap(m, 4096); close(mf);
    mf = open("out/b.bin", O_RDONLY); read(mf, buf, 6); close(mf); printf("shared map [%.6s]\n", buf);
    printf("getcwd %s\n", getcwd(buf, sizeof buf) ? "ok" : "fail");
    printf("chdir %d\n", chdir("out"));
    printf("relative after chdir %d\n", access("b.bin", F_OK));
    return 0;
}
