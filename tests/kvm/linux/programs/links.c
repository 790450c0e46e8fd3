/* Symbolic links, hard links, modes and times: a transcript a native run and a guest run must
 * print identically (errno values as numbers; no inode numbers or absolute host paths). */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <unistd.h>
#include <utime.h>

#define SAY(what, expr) do { errno = 0; long r_ = (long)(expr); \
    printf("%-28s %ld errno %d\n", what, r_, r_ < 0 ? errno : 0); } while (0)

static void put(const char *path, const char *text) {
    int fd = open(path, O_CREAT | O_WRONLY | O_TRUNC, 0644);
    write(fd, text, strlen(text));
    close(fd);
}
static void show(const char *path) {
    char buf[64] = {0};
    int fd = open(path, O_RDONLY);
    if (fd < 0) { printf("read %-23s errno %d\n", path, errno); return; }
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    printf("read %-23s [%.*s]\n", path, (int)(n < 0 ? 0 : n), buf);
}
static void link_of(const char *path, size_t cap) {
    char buf[64];
    errno = 0;
    ssize_t n = readlink(path, buf, cap);
    printf("readlink %-19s %zd errno %d [%.*s]\n", path, n, n < 0 ? errno : 0,
           (int)(n < 0 ? 0 : n), buf);
}
static void modes(const char *path) {
    struct stat st, lst;
    int a = stat(path, &st), b = lstat(path, &lst);
    printf("stat %-23s %d %d | lstat %d lnk %d size %ld\n", path, a,
           a == 0 ? (int)(st.st_mode & 07777) : -errno, b, b == 0 && S_ISLNK(lst.st_mode),
           b == 0 ? (long)lst.st_size : -1L);
}
static int by_name(const struct dirent **a, const struct dirent **b) {
    return strcmp((*a)->d_name, (*b)->d_name);
}

int main(void) {
    mkdir("w", 0755);
    chdir("w");
    put("target.txt", "the target");
    mkdir("dir", 0755);
    put("dir/inside.txt", "inside");

    /* symbolic links */
    SAY("symlink l1", symlink("target.txt", "l1"));
    SAY("symlink again", symlink("target.txt", "l1"));
    SAY("symlink empty target", symlink("", "l0"));
    link_of("l1", 64);
    link_of("l1", 3);
    link_of("target.txt", 64);
    link_of("missing", 64);
    show("l1");
    modes("l1");
    modes("target.txt");
    SAY("symlink dl -> dir", symlink("dir", "dl"));
    show("dl/inside.txt");
    SAY("chdir dl", chdir("dl"));
    show("inside.txt");
    chdir("..");
    mkdir("sub", 0755);
    SAY("symlink sub/up", symlink("../target.txt", "sub/up"));
    show("sub/up");
    SAY("symlink sub/chain", symlink("up", "sub/chain"));
    show("sub/chain");
    SAY("symlink dangling", symlink("made-later.txt", "dangling"));
    modes("dangling");
    SAY("open O_CREAT via dangling", open("dangling", O_CREAT | O_WRONLY, 0644));
    modes("made-later.txt");
    SAY("open O_NOFOLLOW", open("l1", O_RDONLY | O_NOFOLLOW));
    SAY("open O_CREAT|O_EXCL on link", open("l1", O_CREAT | O_EXCL | O_WRONLY, 0644));
    SAY("symlink loop a", symlink("loop-b", "loop-a"));
    SAY("symlink loop b", symlink("loop-a", "loop-b"));
    SAY("open loop", open("loop-a", O_RDONLY));
    SAY("symlink null", symlink("/dev/null", "null"));
    SAY("write to null via link", ({ int f = open("null", O_WRONLY); long w = write(f, "x", 1);
                                    close(f); w; }));
    SAY("rename l1 -> l2", rename("l1", "l2"));
    show("l2");
    SAY("unlink l2", unlink("l2"));
    show("target.txt");
    SAY("mkdir over a link", mkdir("dl", 0755));
    SAY("lstat dl/ trailing slash",
        ({ struct stat s; lstat("dl/", &s) == 0 && S_ISDIR(s.st_mode); }));
    SAY("rmdir via link", rmdir("dl"));

    /* hard links */
    SAY("link h1", link("target.txt", "h1"));
    SAY("link h2", link("target.txt", "h2"));
    SAY("link again", link("target.txt", "h1"));
    SAY("link a directory", link("dir", "hd"));
    SAY("link missing", link("missing", "hm"));
    struct stat st;
    stat("target.txt", &st);
    printf("nlink %ld\n", (long)st.st_nlink);
    put("h1", "changed through h1");
    show("target.txt");
    SAY("unlink target.txt", unlink("target.txt"));
    show("h2");
    stat("h2", &st);
    printf("nlink %ld\n", (long)st.st_nlink);
    SAY("unlink h1", unlink("h1"));
    show("h2");
    put("target.txt", "again");
    SAY("link via symlink (follow)", linkat(AT_FDCWD, "sub/up", AT_FDCWD, "hl", AT_SYMLINK_FOLLOW));
    modes("sub/up");

    /* modes and times */
    put("m.txt", "mode");
    SAY("chmod 0600", chmod("m.txt", 0600));
    modes("m.txt");
    int fd = open("m.txt", O_RDONLY);
    SAY("fchmod 0640", fchmod(fd, 0640));
    modes("m.txt");
    SAY("fchmodat 0755", fchmodat(AT_FDCWD, "m.txt", 0755, 0));
    modes("m.txt");
    SAY("chmod missing", chmod("missing", 0600));
    struct timespec ts[2] = {{.tv_sec = 5, .tv_nsec = 0}, {.tv_sec = 1000000000, .tv_nsec = 7}};
    SAY("utimensat", utimensat(AT_FDCWD, "m.txt", ts, 0));
    stat("m.txt", &st);
    printf("mtime %ld.%09ld\n", (long)st.st_mtim.tv_sec, st.st_mtim.tv_nsec);
    ts[1].tv_nsec = UTIME_OMIT;
    SAY("utimensat omit", utimensat(AT_FDCWD, "m.txt", ts, 0));
    stat("m.txt", &st);
    printf("mtime %ld.%09ld\n", (long)st.st_mtim.tv_sec, st.st_mtim.tv_nsec);
    ts[1].tv_sec = 1234567890; ts[1].tv_nsec = 0;
    SAY("futimens", futimens(fd, ts));
    fstat(fd, &st);
    printf("mtime %ld.%09ld\n", (long)st.st_mtim.tv_sec, st.st_mtim.tv_nsec);
    SAY("utimensat missing", utimensat(AT_FDCWD, "missing", NULL, 0));
    /* the old calls, made directly (glibc's wrappers may use utimensat) */
    struct timeval tv[2] = {{.tv_sec = 1, .tv_usec = 0}, {.tv_sec = 1500000000, .tv_usec = 42}};
    SAY("utimes", syscall(SYS_utimes, "m.txt", tv));
    stat("m.txt", &st);
    printf("mtime %ld.%09ld\n", (long)st.st_mtim.tv_sec, st.st_mtim.tv_nsec);
    struct utimbuf ub = {.actime = 2, .modtime = 1600000000};
    SAY("utime", syscall(SYS_utime, "m.txt", &ub));
    stat("m.txt", &st);
    printf("mtime %ld.%09ld\n", (long)st.st_mtim.tv_sec, st.st_mtim.tv_nsec);
    tv[1].tv_usec = 1000000;
    SAY("utimes bad usec", syscall(SYS_utimes, "m.txt", tv));
    SAY("futimesat", syscall(SYS_futimesat, AT_FDCWD, "m.txt", NULL));
    SAY("chown", chown("m.txt", getuid(), getgid()));
    SAY("lchown", lchown("sub/up", getuid(), getgid()));
    SAY("syncfs", syncfs(fd));
    close(fd);
    sync();
    printf("synced\n");

    /* what a listing says */
    struct dirent **names;
    int n = scandir(".", &names, NULL, by_name);
    for (int i = 0; i < n; i++) {
        printf("entry %-20s type %d\n", names[i]->d_name, names[i]->d_type);
        free(names[i]);
    }
    free(names);
    return 0;
}
