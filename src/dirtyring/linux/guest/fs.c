/* The library OS's file system: files, directories, pipes, devices and descriptors, all in
 * guest memory, so every checkpoint captures them with the program.
 *
 * Storage: inodes in .bss; file and directory contents in 4 KiB blocks taken from the file
 * system's region (ctl->fs_lo..fs_hi, a sparse part of the data slot: untouched blocks cost
 * nothing), through a two-level block map per inode (512 x 512 blocks: 1 GiB per file). Freed
 * blocks go to a free list and are zeroed when reused. A directory's contents are 256-byte
 * entries {u32 ino, u32 name length, name}, read and written with the file code.
 *
 * At start the VMM's archive (at fs_lo) is unpacked: the files the user named. At exit, when
 * asked, every regular file, directory and symbolic link is packed into an archive for the
 * VMM (PORT_EXPORT).
 *
 * Symbolic links hold their target as their contents and are followed by path walks (at most
 * MAXSYMLINKS per path); hard links are further directory entries of one inode (nlink).
 *
 * One process, one thread: record locks always succeed, a pipe never blocks (an empty pipe
 * with a writer still open reads as EAGAIN, not a deadlock), shared file mappings are copies
 * written back at munmap and exit. */
#include "kernel.h"

#define BLK 4096UL
#define MAX_INODES 2048
#define MAX_OFD 1024
#define MAX_FD 1024
#define MAX_SHARED 64
#define NAME_MAX 247
#define PATH_MAX 4096
#define ROOT 1
#define MAX_DEPTH 256      /* directory nesting the library OS follows */
#define EXPORT_DEPTH 64    /* ... and packs at exit (recursive: bounded by the stack) */
#define AT_FDCWD (-100)

#define S_IFMT 0170000
#define S_IFIFO 0010000
#define S_IFCHR 0020000
#define S_IFDIR 0040000
#define S_IFREG 0100000
#define S_IFLNK 0120000
#define MAXSYMLINKS 40     /* symbolic links followed in one path, as Linux does */
#define AT_SYMLINK_NOFOLLOW 0x100
#define AT_SYMLINK_FOLLOW 0x400
#define AT_EMPTY_PATH 0x1000
#define O_NOFOLLOW 0400000
#define UTIME_NOW ((1L << 30) - 1)
#define UTIME_OMIT ((1L << 30) - 2)

#define O_ACCMODE 3
#define O_WRONLY 1
#define O_RDWR 2
#define O_CREAT 0100
#define O_EXCL 0200
#define O_TRUNC 01000
#define O_APPEND 02000
#define O_NONBLOCK 04000
#define O_DIRECTORY 0200000
#define O_CLOEXEC 02000000

enum { DEV_NONE, DEV_NULL, DEV_ZERO, DEV_RANDOM, DEV_STDIN, DEV_STDOUT, DEV_STDERR };

struct inode {
    u32 mode, nlink;      /* mode 0: free */
    u64 size;
    u64 *root;            /* block map: 512 pointers to 512-pointer blocks */
    u32 parent;           /* directories: the parent's inode */
    u32 dev;              /* character devices */
    u32 opens;            /* open file descriptions that refer to it */
    u32 writers;          /* pipes: write ends open */
    u64 rpos;             /* pipes: bytes consumed */
    s64 mtime;
};
struct ofd { u32 refs, ino, flags, pad; u64 off; };
struct shared_map { u64 addr, len, off; u32 ino, used; };
struct dirent_rec { u32 ino, len; char name[NAME_MAX + 1]; };

static struct inode inodes[MAX_INODES];
static struct ofd ofds[MAX_OFD];
static u32 fds[MAX_FD];                /* open file description + 1; 0: free */
static u8 cloexec[MAX_FD];
static struct shared_map shared[MAX_SHARED];
static u32 cwd, cur_umask;          /* set by fs_init: .bss only (the loader copies no .data) */
/* Path buffers: static, not on the library OS's 16 KiB stack (one thread, no reentry). */
static char path_a[PATH_MAX], path_b[PATH_MAX], link_tmp[PATH_MAX];
static u64 bump, free_list;

/* --- blocks -------------------------------------------------------------------------------- */
static void *blk_alloc(void) {
    if (free_list) {
        u64 b = free_list;
        free_list = *(u64 *)b;
        lmemset((void *)b, 0, BLK);
        return (void *)b;
    }
    if (bump + BLK > ctl()->fs_hi) return 0;
    bump += BLK;
    return (void *)(bump - BLK);       /* never used: reads as zero */
}
static void blk_free(void *b) {
    *(u64 *)b = free_list;
    free_list = (u64)b;
}

static u8 *block_of(struct inode *ip, u64 idx, int create) {
    u64 hi = idx / 512, lo = idx % 512;
    if (hi >= 512) return 0;
    if (!ip->root) { if (!create || !(ip->root = blk_alloc())) return 0; }
    u64 *mid = (u64 *)ip->root[hi];
    if (!mid) { if (!create || !(mid = blk_alloc())) return 0; ip->root[hi] = (u64)mid; }
    u8 *data = (u8 *)mid[lo];
    if (!data) { if (!create || !(data = blk_alloc())) return 0; mid[lo] = (u64)data; }
    return data;
}

/* Free the blocks from block index ``from`` on. */
static void free_from(struct inode *ip, u64 from) {
    if (!ip->root) return;
    for (u64 hi = from / 512; hi < 512; hi++) {
        u64 *mid = (u64 *)ip->root[hi];
        if (!mid) continue;
        u64 lo0 = hi == from / 512 ? from % 512 : 0;
        for (u64 lo = lo0; lo < 512; lo++)
            if (mid[lo]) { blk_free((void *)mid[lo]); mid[lo] = 0; }
        if (lo0 == 0) { blk_free(mid); ip->root[hi] = 0; }
    }
    if (from == 0) { blk_free(ip->root); ip->root = 0; }
}

static u64 file_read(struct inode *ip, u64 off, u8 *buf, u64 n) {
    if (off >= ip->size) return 0;
    if (n > ip->size - off) n = ip->size - off;
    for (u64 done = 0; done < n;) {
        u64 at = off + done, in = at % BLK, k = BLK - in;
        if (k > n - done) k = n - done;
        u8 *b = block_of(ip, at / BLK, 0);
        if (b) lmemcpy(buf + done, b + in, k); else lmemset(buf + done, 0, k);
        done += k;
    }
    return n;
}

static s64 file_write(struct inode *ip, u64 off, const u8 *buf, u64 n) {
    if (off + n < off || off + n > 512UL * 512 * BLK) return -EFBIG;
    for (u64 done = 0; done < n;) {
        u64 at = off + done, in = at % BLK, k = BLK - in;
        if (k > n - done) k = n - done;
        u8 *b = block_of(ip, at / BLK, 1);
        if (!b) { if (done) break; return -ENOSPC; }
        lmemcpy(b + in, buf + done, k);
        done += k;
        if (at + k > ip->size) ip->size = at + k;
    }
    ip->mtime = (s64)now_ns();
    return (s64)n;
}

static s64 file_truncate(struct inode *ip, u64 len) {
    if (len > 512UL * 512 * BLK) return -EFBIG;
    if (len < ip->size) {
        free_from(ip, (len + BLK - 1) / BLK);
        if (len % BLK) {
            u8 *b = block_of(ip, len / BLK, 0);
            if (b) lmemset(b + len % BLK, 0, BLK - len % BLK);
        }
    }
    ip->size = len;
    ip->mtime = (s64)now_ns();
    return 0;
}

/* --- inodes and directories ---------------------------------------------------------------- */
static u32 inode_new(u32 mode) {
    for (u32 i = 2; i < MAX_INODES; i++)
        if (!inodes[i].mode) {
            struct inode *ip = &inodes[i];
            lmemset(ip, 0, sizeof *ip);
            ip->mode = mode;
            ip->nlink = 1;
            ip->mtime = (s64)now_ns();
            return i;
        }
    return 0;
}
static void inode_put(u32 ino) {      /* drop it once nothing names or holds it */
    struct inode *ip = &inodes[ino];
    if (ino < 2 || ip->nlink || ip->opens) return;
    free_from(ip, 0);
    ip->mode = 0;
}

/* The inode of the entry ``name`` (its offset in the directory to *at, if asked), or 0. */
static u32 dir_find(u32 dir, const char *name, u32 len, u64 *at) {
    struct inode *dp = &inodes[dir];
    struct dirent_rec e;
    for (u64 off = 0; off < dp->size; off += sizeof e) {
        file_read(dp, off, (u8 *)&e, 8);
        if (!e.ino || e.len != len) continue;
        file_read(dp, off + 8, (u8 *)e.name, len);
        u32 i = 0;
        while (i < len && e.name[i] == name[i]) i++;
        if (i == len) {
            if (at) *at = off;
            return e.ino;
        }
    }
    return 0;
}
static u32 dir_lookup(u32 dir, const char *name, u32 len) {
    if (len == 1 && name[0] == '.') return dir;
    if (len == 2 && name[0] == '.' && name[1] == '.') return inodes[dir].parent;
    return dir_find(dir, name, len, 0);
}
static s64 dir_add(u32 dir, const char *name, u32 len, u32 ino) {
    struct inode *dp = &inodes[dir];
    struct dirent_rec e;
    u64 off = 0;
    for (; off < dp->size; off += sizeof e) {
        file_read(dp, off, (u8 *)&e, 8);
        if (!e.ino) break;
    }
    lmemset(&e, 0, sizeof e);
    e.ino = ino; e.len = len;
    lmemcpy(e.name, name, len);
    s64 r = file_write(dp, off, (const u8 *)&e, sizeof e);
    return r < 0 ? r : 0;
}
/* Remove the entry ``name`` (not "the entry of inode N": hard links give an inode several). */
static void dir_remove(u32 dir, const char *name, u32 len) {
    u64 off;
    u32 z = 0;
    if (dir_find(dir, name, len, &off)) file_write(&inodes[dir], off, (const u8 *)&z, 4);
}
/* One name of ``ino`` fewer: a directory has only one; the inode goes once nothing names or
 * holds it. */
static void unname(u32 ino) {
    struct inode *ip = &inodes[ino];
    if ((ip->mode & S_IFMT) == S_IFDIR || ip->nlink <= 1) ip->nlink = 0;
    else ip->nlink--;
    inode_put(ino);
}
static int dir_empty(u32 dir) {
    struct inode *dp = &inodes[dir];
    u32 ino;
    for (u64 off = 0; off < dp->size; off += sizeof(struct dirent_rec)) {
        file_read(dp, off, (u8 *)&ino, 4);
        if (ino) return 0;
    }
    return 1;
}
static int is_dir(u32 ino) { return (inodes[ino].mode & S_IFMT) == S_IFDIR; }
static int is_link(u32 ino) { return (inodes[ino].mode & S_IFMT) == S_IFLNK; }

/* The working directory holds its inode like an open descriptor: removed, it stays valid
 * (and nameless) until the program leaves it. */
static void set_cwd(u32 ino) {
    u32 old = cwd;
    inodes[ino].opens++;
    cwd = ino;
    inodes[old].opens--;
    inode_put(old);
}

/* --- paths --------------------------------------------------------------------------------- */
static s64 copy_path(u64 user, char *out) {
    for (u64 i = 0; i < PATH_MAX; i++) {
        if (!user_ok(user + i, 1)) return -EFAULT;
        out[i] = *(const char *)(user + i);
        if (!out[i]) return (s64)i;
    }
    return -ENAMETOOLONG;
}

static u32 fd_ino(s64 fd);

/* Walk ``path`` (a PATH_MAX buffer it may rewrite) from ``dirfd``; stop before the last
 * component when ``parent`` is set (its directory goes to dir, its name to name and len; the
 * inode it names, or 0, is returned). Symbolic links are followed on the way, and in the last
 * component when ``follow`` is set or a slash follows it: the link's target replaces it in
 * the buffer (at most MAXSYMLINKS times: ELOOP). Returns the inode or -errno. */
static s64 walk(s64 dirfd, char *path, int parent, int follow, u32 *dir, const char **name,
                u32 *len) {
    u32 cur;
    if (path[0] == '/') cur = ROOT;
    else if ((s32)dirfd == AT_FDCWD) cur = cwd;
    else { cur = fd_ino(dirfd); if (!cur) return -EBADF; if (!is_dir(cur)) return -ENOTDIR; }
    char *p = path;
    int links = 0;
    for (;;) {
        while (*p == '/') p++;
        const char *s = p;
        while (*p && *p != '/') p++;
        u32 n = (u32)(p - s);
        const char *rest = p;
        while (*rest == '/') rest++;
        if (n == 0) {                                  /* "" or trailing slashes */
            if (parent) { *dir = cur; *name = "."; *len = 1; }
            return cur;
        }
        if (n > NAME_MAX) return -ENAMETOOLONG;
        if (!is_dir(cur)) return -ENOTDIR;
        int last = !*rest;
        u32 next = dir_lookup(cur, s, n);
        int through = next && is_link(next) && (!last || follow || *p == '/');
        if (!through) {
            if (parent && last) { *dir = cur; *name = s; *len = n; return next; }
            if (!next) return -ENOENT;
            cur = next;
            continue;
        }
        /* The link's target, then what followed the link's name: the path from here on. */
        if (++links > MAXSYMLINKS) return -ELOOP;
        u64 tl = inodes[next].size, rl = 0;
        while (p[rl]) rl++;
        if (tl == 0) return -ENOENT;
        if (tl >= PATH_MAX || tl + rl + 1 > PATH_MAX) return -ENAMETOOLONG;
        file_read(&inodes[next], 0, (u8 *)link_tmp, tl);
        lmemcpy(link_tmp + tl, p, rl + 1);
        lmemcpy(path, link_tmp, tl + rl + 1);
        p = path;
        if (path[0] == '/') cur = ROOT;                /* else: from the link's directory */
    }
}
static s64 lookup(s64 dirfd, u64 upath, int empty_ok, s64 fd_for_empty, int follow) {
    char *path = path_a;
    s64 r = copy_path(upath, path);
    if (r < 0) return r;
    if (r == 0) {
        if (!empty_ok) return -ENOENT;
        u32 ino = fd_ino(fd_for_empty);
        return ino ? (s64)ino : -EBADF;
    }
    u32 d; const char *n; u32 l;
    return walk(dirfd, path, 0, follow, &d, &n, &l);
}

/* --- descriptors --------------------------------------------------------------------------- */
static struct ofd *ofd_of(s64 fd) {
    if (fd < 0 || fd >= MAX_FD || !fds[fd]) return 0;
    return &ofds[fds[fd] - 1];
}
static u32 fd_ino(s64 fd) { struct ofd *o = ofd_of(fd); return o ? o->ino : 0; }

static s64 ofd_new(u32 ino, u32 flags) {
    for (u32 i = 0; i < MAX_OFD; i++)
        if (!ofds[i].refs) {
            ofds[i] = (struct ofd){.refs = 1, .ino = ino, .flags = flags, .off = 0};
            inodes[ino].opens++;
            if ((inodes[ino].mode & S_IFMT) == S_IFIFO && (flags & O_ACCMODE) == O_WRONLY)
                inodes[ino].writers++;
            return i;
        }
    return -EMFILE;
}
static void ofd_put(u32 i) {
    struct ofd *o = &ofds[i];
    if (--o->refs) return;
    struct inode *ip = &inodes[o->ino];
    if ((ip->mode & S_IFMT) == S_IFIFO && (o->flags & O_ACCMODE) == O_WRONLY) ip->writers--;
    ip->opens--;
    inode_put(o->ino);
}
static s64 fd_install(u32 o, s64 lowest, int cloexec_flag) {
    for (s64 fd = lowest; fd < MAX_FD; fd++)
        if (!fds[fd]) { fds[fd] = o + 1; cloexec[fd] = (u8)cloexec_flag; return fd; }
    return -EMFILE;
}
static s64 fd_close(s64 fd) {
    struct ofd *o = ofd_of(fd);
    if (!o) return -EBADF;
    u32 i = fds[fd] - 1;
    fds[fd] = 0;
    ofd_put(i);
    return 0;
}

/* --- start and end ------------------------------------------------------------------------- */
static u32 mkdev(u32 dir, const char *name, u32 dev) {
    u32 ino = inode_new(S_IFCHR | 0666);
    inodes[ino].dev = dev;
    u32 len = 0;
    while (name[len]) len++;
    dir_add(dir, name, len, ino);
    return ino;
}
static u32 mkdir_in(u32 dir, const char *name, u32 len) {
    u32 ino = dir_lookup(dir, name, len);
    if (ino) return ino;
    ino = inode_new(S_IFDIR | 0755);
    if (!ino) return 0;
    inodes[ino].parent = dir;
    dir_add(dir, name, len, ino);
    return ino;
}

static void import_archive(void) {
    u64 p = ctl()->fs_lo, end = p + ctl()->import_len;
    if (ctl()->import_len < 16 || *(u64 *)p != FS_ARCHIVE_MAGIC) return;
    u64 count = *(u64 *)(p + 8);
    p += 16;
    for (u64 i = 0; i < count && p + 16 <= end; i++) {
        u32 plen = *(u32 *)p, mode = *(u32 *)(p + 4);
        u64 size = *(u64 *)(p + 8);
        const char *path = (const char *)(p + 16);
        u64 data = (p + 16 + plen + 7) & ~7UL;
        if (data + size > end || data + size < data) return;
        /* mkdir -p the directories, then the file */
        u32 dir = ROOT, s = 0;
        while (s < plen && path[s] == '/') s++;
        for (u32 k = s; k <= plen; k++) {
            if (k < plen && path[k] != '/') continue;
            u32 n = k - s;
            if (n && n <= NAME_MAX) {
                u32 type = mode & S_IFMT;
                if (k == plen && (type == S_IFREG || (type == S_IFLNK && size))) {
                    u32 ino = inode_new(type == S_IFLNK ? S_IFLNK | 0777 : mode);
                    if (!ino) return;
                    dir_add(dir, path + s, n, ino);
                    file_write(&inodes[ino], 0, (const u8 *)data, size);   /* a link: target */
                } else {
                    dir = mkdir_in(dir, path + s, n);
                    if (!dir) return;
                }
            }
            s = k + 1;
        }
        p = (data + size + 7) & ~7UL;
    }
}

void fs_init(void) {
    bump = (ctl()->fs_lo + ctl()->import_len + BLK - 1) & ~(BLK - 1);
    inodes[ROOT].mode = S_IFDIR | 0755;
    inodes[ROOT].nlink = 2;
    inodes[ROOT].parent = ROOT;
    u32 dev = mkdir_in(ROOT, "dev", 3);
    mkdev(dev, "null", DEV_NULL);
    mkdev(dev, "zero", DEV_ZERO);
    mkdev(dev, "urandom", DEV_RANDOM);
    mkdev(dev, "random", DEV_RANDOM);
    mkdir_in(ROOT, "tmp", 3);
    u32 std[3] = {DEV_STDIN, DEV_STDOUT, DEV_STDERR};
    for (int fd = 0; fd < 3; fd++) {
        u32 ino = inode_new(S_IFCHR | 0620);
        inodes[ino].dev = std[fd];
        inodes[ino].nlink = 0;       /* not in any directory */
        s64 o = ofd_new(ino, fd == 0 ? 0 : O_WRONLY);
        fds[fd] = (u32)o + 1;
    }
    cwd = ROOT;
    inodes[ROOT].opens = 1;
    cur_umask = 022;
    import_archive();
}

/* Append the path of ``ino`` (a directory) to buf, from the root; returns its length. */
static u64 path_of(u32 dir, char *buf, u64 cap);

static void export_tree(u32 dir, char *path, u64 plen, u8 **out, u8 *end, u64 *count,
                        int depth) {
    struct inode *dp = &inodes[dir];
    if (depth > EXPORT_DEPTH) return;
    static struct dirent_rec e;    /* static: each level copies what it needs before recursing */
    for (u64 off = 0; off < dp->size; off += sizeof e) {
        file_read(dp, off, (u8 *)&e, sizeof e);
        if (!e.ino || e.len > NAME_MAX || plen + 1 + e.len >= PATH_MAX) continue;
        struct inode *ip = &inodes[e.ino];
        u64 n = plen;
        path[n++] = '/';
        lmemcpy(path + n, e.name, e.len);
        n += e.len;
        u32 type = ip->mode & S_IFMT;
        if (type != S_IFREG && type != S_IFDIR && type != S_IFLNK) continue;
        u64 size = type == S_IFDIR ? 0 : ip->size;     /* a link's: its target */
        u8 *p = *out;
        u64 need = 16 + ((n + 7) & ~7UL) + ((size + 7) & ~7UL);
        if (p + need > end || p + need < p) { *out = end + 1; return; }
        *(u32 *)p = (u32)n; *(u32 *)(p + 4) = ip->mode; *(u64 *)(p + 8) = size;
        lmemcpy(p + 16, path, n);
        u8 *data = p + 16 + ((n + 7) & ~7UL);
        file_read(ip, 0, data, size);
        *out = p + need;
        (*count)++;
        if (type == S_IFDIR && e.ino != dir) export_tree(e.ino, path, n, out, end, count, depth + 1);
        if (*out > end) return;
    }
}

void fs_export(void) {
    /* The archive goes into free file-system blocks, past everything in use. */
    u64 start = (bump + BLK - 1) & ~(BLK - 1);
    u8 *p = (u8 *)start + 16, *end = (u8 *)ctl()->fs_hi;
    u64 count = 0;
    export_tree(ROOT, path_a, 0, &p, end, &count, 0);
    struct stdio_header *h = stdio();
    if (p > end || start + 16 > (u64)end) { h->export_va = 0; h->export_len = 0; }
    else {
        *(u64 *)start = FS_ARCHIVE_MAGIC;
        *(u64 *)(start + 8) = count;
        h->export_va = start;
        h->export_len = (u64)p - start;
    }
    outl(PORT_EXPORT, 0);
}

/* --- reading and writing ------------------------------------------------------------------- */
/* read_into and write_from take a buffer already checked (the program's) or the library OS's
 * own (sendfile's bounce buffer); do_read and do_write check the program's first. */
static s64 read_into(struct ofd *o, u8 *buf, u64 n, u64 *off) {
    if ((o->flags & O_ACCMODE) == O_WRONLY) return -EBADF;
    struct inode *ip = &inodes[o->ino];
    switch (ip->mode & S_IFMT) {
    case S_IFDIR: return -EISDIR;
    case S_IFCHR:
        if (ip->dev == DEV_ZERO) { lmemset(buf, 0, n); return (s64)n; }
        if (ip->dev == DEV_RANDOM) { fill_random(buf, n); return (s64)n; }
        if (ip->dev == DEV_STDIN) return stdin_read(buf, n, (o->flags & O_NONBLOCK) != 0);
        return 0;                                     /* null */
    case S_IFIFO: {
        u64 avail = ip->size - ip->rpos;
        if (!avail) return ip->writers ? -EAGAIN : 0;
        if (n > avail) n = avail;
        file_read(ip, ip->rpos, buf, n);
        ip->rpos += n;
        if (ip->rpos == ip->size) { file_truncate(ip, 0); ip->rpos = 0; }
        return (s64)n;
    }
    default: {
        u64 got = file_read(ip, *off, buf, n);
        *off += got;
        return (s64)got;
    }
    }
}

static s64 do_read(struct ofd *o, u64 buf, u64 n, u64 *off) {
    if (!user_ok(buf, n)) return -EFAULT;
    return read_into(o, (u8 *)buf, n, off);
}

static s64 write_from(struct ofd *o, const u8 *buf, u64 n, u64 *off, int positioned) {
    if ((o->flags & O_ACCMODE) == 0) return -EBADF;
    struct inode *ip = &inodes[o->ino];
    switch (ip->mode & S_IFMT) {
    case S_IFDIR: return -EISDIR;
    case S_IFCHR:
        if (ip->dev == DEV_STDOUT || ip->dev == DEV_STDERR)
            return n ? stdio_write(ip->dev == DEV_STDOUT ? 1 : 2, buf, n) : 0;
        return (s64)n;                                /* null, zero, random: discarded */
    case S_IFIFO: return file_write(ip, ip->size, buf, n);
    default: {
        if ((o->flags & O_APPEND) && !positioned) *off = ip->size;
        s64 r = file_write(ip, *off, buf, n);
        if (r > 0) *off += (u64)r;
        return r;
    }
    }
}

static s64 do_write(struct ofd *o, u64 buf, u64 n, u64 *off, int positioned) {
    if (!user_ok(buf, n)) return -EFAULT;
    return write_from(o, (const u8 *)buf, n, off, positioned);
}

/* sendfile: `count` bytes from in_fd (at *offp, which it advances, or at in_fd's offset) to
 * out_fd, through a bounce buffer of the library OS's. As Linux: the bytes moved, or the
 * error if none were; a short write ends it (and leaves the input unread past it). */
static u8 bounce[4096];
static s64 sys_sendfile(s64 out_fd, s64 in_fd, u64 offp, u64 count) {
    struct ofd *out = ofd_of(out_fd), *in = ofd_of(in_fd);
    if (!out || !in) return -EBADF;
    if ((in->flags & O_ACCMODE) == O_WRONLY || (out->flags & O_ACCMODE) == 0) return -EBADF;
    u64 off = 0, *pos = &in->off;
    if (offp) {
        if (!user_ok(offp, 8)) return -EFAULT;
        off = *(u64 *)offp;
        if ((s64)off < 0) return -EINVAL;
        pos = &off;
    }
    s64 total = 0;
    while ((u64)total < count) {
        u64 want = count - (u64)total < sizeof bounce ? count - (u64)total : sizeof bounce;
        u64 at = *pos;
        s64 r = read_into(in, bounce, want, pos);
        if (r <= 0) { if (!total) total = r; break; }
        s64 w = write_from(out, bounce, (u64)r, &out->off, 0);
        if (w < r) {
            if ((inodes[in->ino].mode & S_IFMT) == S_IFREG) *pos = at + (w > 0 ? (u64)w : 0);
            if (w > 0) total += w;
            else if (!total) total = w;
            break;
        }
        total += w;
    }
    if (offp) *(u64 *)offp = off;
    return total;
}

struct iovec { u64 base, len; };
static s64 do_rw_vec(struct ofd *o, u64 iov, u64 cnt, u64 *off, int write, int positioned) {
    if (cnt > 1024 || !user_ok(iov, cnt * sizeof(struct iovec))) return -EINVAL;
    s64 total = 0;
    for (u64 i = 0; i < cnt; i++) {
        const struct iovec *v = (const struct iovec *)iov + i;
        s64 r = write ? do_write(o, v->base, v->len, off, positioned)
                      : do_read(o, v->base, v->len, off);
        if (r < 0) return total ? total : r;
        total += r;
        if ((u64)r < v->len) break;
    }
    return total;
}

/* --- metadata ------------------------------------------------------------------------------ */
static s64 fill_stat(u32 ino, u64 st) {
    if (!user_ok(st, 144)) return -EFAULT;
    struct inode *ip = &inodes[ino];
    u8 *s = (u8 *)st;
    lmemset(s, 0, 144);
    *(u64 *)(s + 0) = 0x2a;                 /* st_dev */
    *(u64 *)(s + 8) = ino;
    *(u64 *)(s + 16) = ip->nlink ? ip->nlink : 1;
    *(u32 *)(s + 24) = ip->mode;
    *(u64 *)(s + 40) = ip->dev ? ip->dev : 0;
    *(u64 *)(s + 48) = (ip->mode & S_IFMT) == S_IFIFO ? ip->size - ip->rpos : ip->size;
    *(u64 *)(s + 56) = BLK;
    *(u64 *)(s + 64) = (ip->size + 511) / 512;
    for (int t = 0; t < 3; t++) {
        *(s64 *)(s + 72 + 16 * t) = ip->mtime / 1000000000;
        *(s64 *)(s + 80 + 16 * t) = ip->mtime % 1000000000;
    }
    return 0;
}
static s64 fill_statx(u32 ino, u64 st) {
    if (!user_ok(st, 256)) return -EFAULT;
    struct inode *ip = &inodes[ino];
    u8 *s = (u8 *)st;
    lmemset(s, 0, 256);
    *(u32 *)(s + 0) = 0x7ff;                /* STATX_BASIC_STATS */
    *(u32 *)(s + 4) = BLK;
    *(u32 *)(s + 16) = ip->nlink ? ip->nlink : 1;
    *(u16 *)(s + 28) = (u16)ip->mode;
    *(u64 *)(s + 32) = ino;
    *(u64 *)(s + 40) = ip->size;
    *(u64 *)(s + 48) = (ip->size + 511) / 512;
    for (int t = 0; t < 4; t++) {
        *(s64 *)(s + 64 + 16 * t) = ip->mtime / 1000000000;
        *(u32 *)(s + 72 + 16 * t) = (u32)(ip->mtime % 1000000000);
    }
    *(u32 *)(s + 136) = 0; *(u32 *)(s + 140) = 0x2a;
    return 0;
}

static s64 getdents(struct ofd *o, u64 buf, u64 cap) {
    struct inode *dp = &inodes[o->ino];
    if (!is_dir(o->ino)) return -ENOTDIR;
    if (!user_ok(buf, cap)) return -EFAULT;
    u64 used = 0;
    for (;;) {
        u32 ino; const char *name; u32 len; u8 type = 4;
        struct dirent_rec e;
        u64 idx = o->off;
        if (idx == 0) { ino = o->ino; name = "."; len = 1; }
        else if (idx == 1) { ino = dp->parent; name = ".."; len = 2; }
        else {
            u64 off = (idx - 2) * sizeof e;
            if (off >= dp->size) break;
            file_read(dp, off, (u8 *)&e, sizeof e);
            if (!e.ino || e.len > NAME_MAX) { o->off++; continue; }
            ino = e.ino; name = e.name; len = e.len;
            u32 t = inodes[ino].mode & S_IFMT;
            type = t == S_IFDIR ? 4 : t == S_IFREG ? 8 : t == S_IFLNK ? 10 : t == S_IFCHR ? 2
                 : t == S_IFIFO ? 1 : 0;
        }
        u64 rec = (19 + len + 1 + 7) & ~7UL;
        if (used + rec > cap) { if (!used) return -EINVAL; break; }
        u8 *p = (u8 *)buf + used;
        lmemset(p, 0, rec);
        *(u64 *)p = ino;
        *(s64 *)(p + 8) = (s64)idx + 1;
        *(u16 *)(p + 16) = (u16)rec;
        p[18] = type;
        lmemcpy(p + 19, name, len);
        used += rec;
        o->off++;
    }
    return (s64)used;
}

/* The path of directory ``dir``, built leaf-first into the end of ``tmp`` and then copied:
 * iterative and bounded (a deep or damaged tree never overflows the 16 KiB stack). A
 * directory that was removed has no path: returns 0. */
static u64 path_of(u32 dir, char *buf, u64 cap) {
    static char tmp[PATH_MAX];
    u64 at = PATH_MAX;
    for (int depth = 0; dir != ROOT; depth++) {
        u32 parent = inodes[dir].parent;
        if (depth >= MAX_DEPTH || !inodes[dir].mode || parent >= MAX_INODES) return 0;
        struct inode *pp = &inodes[parent];
        struct dirent_rec e;
        int found = 0;
        for (u64 off = 0; off < pp->size && !found; off += sizeof e) {
            file_read(pp, off, (u8 *)&e, sizeof e);
            if (e.ino != dir || e.len > NAME_MAX) continue;
            if (at < e.len + 1) return 0;
            at -= e.len;
            lmemcpy(tmp + at, e.name, e.len);
            tmp[--at] = '/';
            found = 1;
        }
        if (!found) return 0;
        dir = parent;
    }
    if (at == PATH_MAX) tmp[--at] = '/';
    u64 n = PATH_MAX - at;
    if (n > cap) return 0;
    lmemcpy(buf, tmp + at, n);
    return n;
}

/* Whether directory ``d`` is ``anc`` or lies below it (renaming a directory into its own
 * subtree would make a cycle). */
static int is_within(u32 d, u32 anc) {
    for (int depth = 0; depth < MAX_DEPTH; depth++) {
        if (d == anc) return 1;
        if (d == ROOT) return 0;
        d = inodes[d].parent;
    }
    return 1;
}

/* --- readiness (poll, select) --------------------------------------------------------------- */
#define POLLIN 0x1
#define POLLOUT 0x4
#define POLLERR 0x8
#define POLLHUP 0x10
#define POLLNVAL 0x20
#define POLLRDNORM 0x40
#define POLLWRNORM 0x100

/* As Linux answers: files, directories and devices are always ready (its DEFAULT_POLLMASK);
 * a pipe's read end has POLLIN with data and POLLHUP once no writer is left; a write end, and
 * stdout and stderr, are always writable (they never block here); stdin as a pipe would be. */
u32 fs_poll_one(s64 fd, u32 events, int *may_change) {
    struct ofd *o = ofd_of(fd);
    if (!o) return POLLNVAL;
    struct inode *ip = &inodes[o->ino];
    u32 t = ip->mode & S_IFMT, r;
    if (t == S_IFCHR && ip->dev == DEV_STDIN) {
        int st = stdin_state();
        r = (st & STDIN_DATA) ? POLLIN | POLLRDNORM : (st & STDIN_EOF) ? POLLHUP : 0;
        if (!st) *may_change = 1;
    } else if (t == S_IFCHR && (ip->dev == DEV_STDOUT || ip->dev == DEV_STDERR)) {
        r = POLLOUT | POLLWRNORM;
    } else if (t == S_IFIFO) {
        if ((o->flags & O_ACCMODE) == O_WRONLY) r = POLLOUT | POLLWRNORM;
        else r = (ip->size != ip->rpos ? POLLIN | POLLRDNORM : 0) | (ip->writers ? 0 : POLLHUP);
    } else {
        r = POLLIN | POLLRDNORM | POLLOUT | POLLWRNORM;
    }
    return r & (events | POLLERR | POLLHUP | POLLNVAL);
}

/* --- the system calls ---------------------------------------------------------------------- */
static s64 sys_openat(s64 dirfd, u64 upath, u64 flags, u64 mode) {
    char *path = path_a;
    s64 r = copy_path(upath, path);
    if (r < 0) return r;
    if (r == 0) return -ENOENT;
    u32 dir; const char *name; u32 len;
    int excl = (flags & O_CREAT) && (flags & O_EXCL);
    s64 ino = walk(dirfd, path, 1, !excl && !(flags & O_NOFOLLOW), &dir, &name, &len);
    if (ino < 0) return ino;
    if (ino && excl) return -EEXIST;                 /* a symbolic link too, dangling or not */
    if (ino && is_link((u32)ino)) return -ELOOP;     /* O_NOFOLLOW */
    if (!ino) {
        if (!(flags & O_CREAT)) return -ENOENT;
        ino = inode_new(S_IFREG | ((u32)mode & 07777 & ~cur_umask));
        if (!ino) return -ENOSPC;
        r = dir_add(dir, name, len, (u32)ino);
        if (r < 0) { inodes[ino].nlink = 0; inode_put((u32)ino); return r; }
    }
    struct inode *ip = &inodes[ino];
    if ((flags & O_DIRECTORY) && !is_dir((u32)ino)) return -ENOTDIR;
    if (is_dir((u32)ino) && (flags & O_ACCMODE)) return -EISDIR;
    if ((flags & O_TRUNC) && (flags & O_ACCMODE) && (ip->mode & S_IFMT) == S_IFREG)
        file_truncate(ip, 0);
    s64 o = ofd_new((u32)ino, (u32)flags & ~(O_CREAT | O_EXCL | O_TRUNC | O_CLOEXEC));
    if (o < 0) return o;
    s64 fd = fd_install((u32)o, 0, (flags & O_CLOEXEC) != 0);
    if (fd < 0) ofd_put((u32)o);
    return fd;
}

static s64 sys_unlinkat(s64 dirfd, u64 upath, u64 flags) {
    char *path = path_a;
    s64 r = copy_path(upath, path);
    if (r < 0) return r;
    u32 dir; const char *name; u32 len;
    s64 ino = walk(dirfd, path, 1, 0, &dir, &name, &len);
    if (ino < 0) return ino;
    if (!ino) return -ENOENT;
    if (ino == ROOT || (len == 1 && name[0] == '.')) return -EINVAL;
    if (flags & 0x200) {                                 /* AT_REMOVEDIR */
        if (!is_dir((u32)ino)) return -ENOTDIR;
        if (!dir_empty((u32)ino)) return -ENOTEMPTY;
    } else if (is_dir((u32)ino)) return -EISDIR;
    dir_remove(dir, name, len);
    unname((u32)ino);
    return 0;
}

static s64 sys_mkdirat(s64 dirfd, u64 upath, u64 mode) {
    char *path = path_a;
    s64 r = copy_path(upath, path);
    if (r < 0) return r;
    u32 dir; const char *name; u32 len;
    s64 ino = walk(dirfd, path, 1, 0, &dir, &name, &len);
    if (ino < 0) return ino;
    if (ino) return -EEXIST;
    u32 d = inode_new(S_IFDIR | ((u32)mode & 07777 & ~cur_umask));
    if (!d) return -ENOSPC;
    inodes[d].parent = dir;
    r = dir_add(dir, name, len, d);
    if (r < 0) { inodes[d].nlink = 0; inode_put(d); }
    return r;
}

static s64 sys_renameat(s64 ofd_, u64 uold, s64 nfd, u64 unew, u64 flags) {
    char *a = path_a, *b = path_b;
    s64 r = copy_path(uold, a);
    if (r < 0) return r;
    r = copy_path(unew, b);
    if (r < 0) return r;
    u32 od, nd; const char *on, *nn; u32 ol, nl;
    s64 src = walk(ofd_, a, 1, 0, &od, &on, &ol);
    if (src < 0) return src;
    if (!src) return -ENOENT;
    s64 dst = walk(nfd, b, 1, 0, &nd, &nn, &nl);
    if (dst < 0) return dst;
    if (dst == src) return 0;
    if (is_dir((u32)src) && is_within(nd, (u32)src)) return -EINVAL;
    if (dst) {
        if (flags & 1) return -EEXIST;                   /* RENAME_NOREPLACE */
        if (is_dir((u32)dst)) {
            if (!is_dir((u32)src)) return -EISDIR;
            if (!dir_empty((u32)dst)) return -ENOTEMPTY;
        } else if (is_dir((u32)src)) return -ENOTDIR;
        dir_remove(nd, nn, nl);
        unname((u32)dst);
    }
    r = dir_add(nd, nn, nl, (u32)src);
    if (r < 0) return r;
    dir_remove(od, on, ol);
    if (is_dir((u32)src)) inodes[src].parent = nd;
    return 0;
}

/* symlinkat: a link holds its target as its contents (any bytes but NUL, at most
 * PATH_MAX - 1 of them). */
static s64 sys_symlinkat(u64 utarget, s64 dirfd, u64 upath) {
    s64 tl = copy_path(utarget, path_b);
    if (tl < 0) return tl;
    if (tl == 0) return -ENOENT;
    s64 r = copy_path(upath, path_a);
    if (r < 0) return r;
    if (r == 0) return -ENOENT;
    u32 dir; const char *name; u32 len;
    s64 ino = walk(dirfd, path_a, 1, 0, &dir, &name, &len);
    if (ino < 0) return ino;
    if (ino) return -EEXIST;
    u32 l = inode_new(S_IFLNK | 0777);
    if (!l) return -ENOSPC;
    r = file_write(&inodes[l], 0, (const u8 *)path_b, (u64)tl);
    if (r >= 0) r = dir_add(dir, name, len, l);
    if (r < 0) { inodes[l].nlink = 0; inode_put(l); return r; }
    return 0;
}
static s64 sys_readlinkat(s64 dirfd, u64 upath, u64 buf, s64 cap) {
    if (cap <= 0) return -EINVAL;
    s64 ino = lookup(dirfd, upath, 0, 0, 0);
    if (ino < 0) return ino;
    if (!is_link((u32)ino)) return -EINVAL;
    u64 n = inodes[ino].size < (u64)cap ? inodes[ino].size : (u64)cap;
    if (!user_ok(buf, n)) return -EFAULT;
    file_read(&inodes[ino], 0, (u8 *)buf, n);
    return (s64)n;
}
/* linkat: another name for a file (never for a directory, as on Linux). */
static s64 sys_linkat(s64 ofd_, u64 uold, s64 nfd, u64 unew, u64 flags) {
    s64 r = copy_path(uold, path_a);
    if (r < 0) return r;
    if (r == 0) return -ENOENT;
    r = copy_path(unew, path_b);
    if (r < 0) return r;
    if (r == 0) return -ENOENT;
    u32 od, nd; const char *on, *nn; u32 ol, nl;
    s64 src = walk(ofd_, path_a, 1, (flags & AT_SYMLINK_FOLLOW) != 0, &od, &on, &ol);
    if (src < 0) return src;
    if (!src) return -ENOENT;
    if (is_dir((u32)src)) return -EPERM;
    s64 dst = walk(nfd, path_b, 1, 0, &nd, &nn, &nl);
    if (dst < 0) return dst;
    if (dst) return -EEXIST;
    r = dir_add(nd, nn, nl, (u32)src);
    if (r < 0) return r;
    inodes[src].nlink++;
    return 0;
}
static s64 set_mode(s64 ino, u64 mode) {
    if (ino < 0) return ino;
    inodes[ino].mode = (inodes[ino].mode & S_IFMT) | ((u32)mode & 07777);
    return 0;
}
/* The modification time from a timespec[2] (its second one), or now when ``ts`` is 0. */
static s64 set_mtime(s64 ino, u64 ts) {
    if (ino < 0) return ino;
    s64 t = (s64)now_ns();
    if (ts) {
        if (!user_ok(ts, 32)) return -EFAULT;
        s64 sec = *(s64 *)(ts + 16), nsec = *(s64 *)(ts + 24);
        if (nsec == UTIME_OMIT) return 0;
        if (nsec != UTIME_NOW) {
            if (nsec < 0 || nsec >= 1000000000) return -EINVAL;
            t = sec * 1000000000 + nsec;
        }
    }
    inodes[ino].mtime = t;
    return 0;
}

static s64 sys_lseek(s64 fd, s64 off, u64 whence) {
    struct ofd *o = ofd_of(fd);
    if (!o) return -EBADF;
    struct inode *ip = &inodes[o->ino];
    u32 t = ip->mode & S_IFMT;
    if (t == S_IFIFO) return -ESPIPE;
    if (t == S_IFCHR) return 0;
    s64 base;
    switch (whence) {
    case 0: base = 0; break;
    case 1: base = (s64)o->off; break;
    case 2: base = (s64)ip->size; break;
    case 3: if ((u64)off >= ip->size) return -6; base = 0; break;      /* SEEK_DATA: ENXIO */
    case 4: if ((u64)off >= ip->size) return -6; return (s64)(o->off = ip->size);  /* HOLE */
    default: return -EINVAL;
    }
    if (base + off < 0) return -EINVAL;
    o->off = (u64)(base + off);
    return (s64)o->off;
}

static s64 sys_fcntl(s64 fd, u64 cmd, u64 arg) {
    struct ofd *o = ofd_of(fd);
    if (!o) return -EBADF;
    switch (cmd) {
    case 0: case 1030:                                   /* F_DUPFD, F_DUPFD_CLOEXEC */
        if (arg >= MAX_FD) return -EINVAL;
        o->refs++;
        { s64 r = fd_install(fds[fd] - 1, (s64)arg, cmd == 1030);
          if (r < 0) o->refs--;
          return r; }
    case 1: return cloexec[fd];                          /* F_GETFD */
    case 2: cloexec[fd] = arg & 1; return 0;             /* F_SETFD */
    case 3: return o->flags;                             /* F_GETFL */
    case 4: o->flags = (o->flags & ~(u32)(O_APPEND | O_NONBLOCK)) |
                       ((u32)arg & (O_APPEND | O_NONBLOCK)); return 0;
    case 5: case 36:                                     /* F_GETLK, F_OFD_GETLK: unlocked */
        if (!user_ok(arg, 32)) return -EFAULT;
        *(u16 *)arg = 2;                                 /* F_UNLCK */
        return 0;
    case 6: case 7: case 37: case 38: return 0;          /* locks: one process holds all */
    default: return -EINVAL;
    }
}

static s64 sys_dup3(s64 oldfd, s64 newfd, u64 flags, int dup2) {
    struct ofd *o = ofd_of(oldfd);
    if (!o) return -EBADF;
    if (newfd < 0 || newfd >= MAX_FD) return -EBADF;
    if (oldfd == newfd) return dup2 ? newfd : -EINVAL;
    if (fds[newfd]) fd_close(newfd);
    o->refs++;
    fds[newfd] = fds[oldfd];
    cloexec[newfd] = (flags & O_CLOEXEC) != 0;
    return newfd;
}

static s64 sys_pipe2(u64 ufds, u64 flags) {
    if (!user_ok(ufds, 8)) return -EFAULT;
    u32 ino = inode_new(S_IFIFO | 0600);
    if (!ino) return -ENOSPC;
    inodes[ino].nlink = 0;
    s64 r = ofd_new(ino, 0), w = ofd_new(ino, O_WRONLY);
    if (r < 0 || w < 0) return -EMFILE;
    s64 a = fd_install((u32)r, 0, (flags & O_CLOEXEC) != 0);
    s64 b = a < 0 ? a : fd_install((u32)w, 0, (flags & O_CLOEXEC) != 0);
    if (a < 0 || b < 0) return -EMFILE;
    ((s32 *)ufds)[0] = (s32)a;
    ((s32 *)ufds)[1] = (s32)b;
    return 0;
}

/* --- file mappings ------------------------------------------------------------------------- */
s64 fs_mmap_file(u64 addr, u64 len, u64 flags, u64 fd, u64 off) {
    struct ofd *o = ofd_of((s64)fd);
    if (!o) return -EBADF;
    struct inode *ip = &inodes[o->ino];
    if ((ip->mode & S_IFMT) != S_IFREG) return -19;      /* ENODEV */
    lmemset((void *)addr, 0, len);
    if (off < ip->size) file_read(ip, off, (u8 *)addr, len);
    if (flags & 1) {                                      /* MAP_SHARED: written back later */
        for (int i = 0; i < MAX_SHARED; i++)
            if (!shared[i].used) {
                shared[i] = (struct shared_map){addr, len, off, o->ino, 1};
                ip->opens++;
                return (s64)addr;
            }
        return -ENOMEM;
    }
    return (s64)addr;
}

static void write_back(struct shared_map *m) {
    struct inode *ip = &inodes[m->ino];
    u64 n = m->len;
    if (m->off >= ip->size) return;
    if (n > ip->size - m->off) n = ip->size - m->off;   /* a mapping never grows the file */
    file_write(ip, m->off, (const u8 *)m->addr, n);
}

void fs_munmap(u64 addr, u64 len) {
    for (int i = 0; i < MAX_SHARED; i++) {
        struct shared_map *m = &shared[i];
        if (m->used && m->addr >= addr && m->addr + m->len <= addr + len) {
            write_back(m);
            m->used = 0;
            inodes[m->ino].opens--;
            inode_put(m->ino);
        }
    }
}

static void sync_all(void) {
    for (int i = 0; i < MAX_SHARED; i++) if (shared[i].used) write_back(&shared[i]);
}

s64 fs_syscall(u64 nr, u64 a, u64 b, u64 c, u64 d, u64 e, int *handled) {
    *handled = 1;
    struct ofd *o;
    switch (nr) {
    case 0: if (!(o = ofd_of((s64)a))) return -EBADF; return do_read(o, b, c, &o->off);
    case 1: if (!(o = ofd_of((s64)a))) return -EBADF; return do_write(o, b, c, &o->off, 0);
    case 2: return sys_openat(AT_FDCWD, a, b, c);
    case 3: return fd_close((s64)a);
    case 4: case 6: {                                    /* stat, lstat */
        s64 ino = lookup(AT_FDCWD, a, 0, 0, nr == 4);
        return ino < 0 ? ino : fill_stat((u32)ino, b);
    }
    case 5: if (!(o = ofd_of((s64)a))) return -EBADF; return fill_stat(o->ino, b);
    case 8: return sys_lseek((s64)a, (s64)b, c);
    case 16: if (!ofd_of((s64)a)) return -EBADF; return -ENOTTY;   /* ioctl: no terminal */
    case 17: case 18: {                                  /* pread64, pwrite64 */
        if (!(o = ofd_of((s64)a))) return -EBADF;
        if ((inodes[o->ino].mode & S_IFMT) != S_IFREG) return -ESPIPE;
        u64 off = d;
        return nr == 17 ? do_read(o, b, c, &off) : do_write(o, b, c, &off, 1);
    }
    case 40: return sys_sendfile((s64)a, (s64)b, c, d);
    case 19: if (!(o = ofd_of((s64)a))) return -EBADF; return do_rw_vec(o, b, c, &o->off, 0, 0);
    case 20: if (!(o = ofd_of((s64)a))) return -EBADF; return do_rw_vec(o, b, c, &o->off, 1, 0);
    case 295: case 296: {                                /* preadv, pwritev */
        if (!(o = ofd_of((s64)a))) return -EBADF;
        u64 off = d;
        return do_rw_vec(o, b, c, &off, nr == 296, 1);
    }
    case 21: { s64 ino = lookup(AT_FDCWD, a, 0, 0, 1); return ino < 0 ? ino : 0; } /* access */
    case 22: return sys_pipe2(a, 0);
    case 293: return sys_pipe2(a, b);
    case 32: {                                           /* dup */
        if (!(o = ofd_of((s64)a))) return -EBADF;
        o->refs++;
        s64 r = fd_install(fds[a] - 1, 0, 0);
        if (r < 0) o->refs--;
        return r;
    }
    case 33: return sys_dup3((s64)a, (s64)b, 0, 1);
    case 292: return sys_dup3((s64)a, (s64)b, c, 0);
    case 72: return sys_fcntl((s64)a, b, c);
    case 73: return ofd_of((s64)a) ? 0 : -EBADF;         /* flock */
    case 74: case 75:                                    /* fsync, fdatasync */
        if (!ofd_of((s64)a)) return -EBADF;
        sync_all();
        return 0;
    case 76: {                                           /* truncate */
        s64 ino = lookup(AT_FDCWD, a, 0, 0, 1);
        if (ino < 0) return ino;
        if ((inodes[ino].mode & S_IFMT) != S_IFREG) return -EISDIR;
        return file_truncate(&inodes[ino], b);
    }
    case 77:                                             /* ftruncate */
        if (!(o = ofd_of((s64)a))) return -EBADF;
        if ((inodes[o->ino].mode & S_IFMT) != S_IFREG || !(o->flags & O_ACCMODE)) return -EINVAL;
        return file_truncate(&inodes[o->ino], b);
    case 217: if (!(o = ofd_of((s64)a))) return -EBADF; return getdents(o, b, c);
    case 79: {                                           /* getcwd */
        char *buf = path_b;
        u64 n = path_of(cwd, buf, PATH_MAX - 1);
        if (n == 0) return -ENOENT;                      /* its directory was removed */
        if (n + 1 > b) return -34;                       /* ERANGE */
        if (!user_ok(a, n + 1)) return -EFAULT;
        lmemcpy((void *)a, buf, n);
        ((char *)a)[n] = 0;
        return (s64)(n + 1);
    }
    case 80: {                                           /* chdir */
        s64 ino = lookup(AT_FDCWD, a, 0, 0, 1);
        if (ino < 0) return ino;
        if (!is_dir((u32)ino)) return -ENOTDIR;
        set_cwd((u32)ino);
        return 0;
    }
    case 81:                                             /* fchdir */
        if (!(o = ofd_of((s64)a))) return -EBADF;
        if (!is_dir(o->ino)) return -ENOTDIR;
        set_cwd(o->ino);
        return 0;
    case 82: return sys_renameat(AT_FDCWD, a, AT_FDCWD, b, 0);
    case 264: return sys_renameat((s64)a, b, (s64)c, d, 0);
    case 316: return sys_renameat((s64)a, b, (s64)c, d, e);
    case 83: return sys_mkdirat(AT_FDCWD, a, b);
    case 258: return sys_mkdirat((s64)a, b, c);
    case 84: return sys_unlinkat(AT_FDCWD, a, 0x200);   /* rmdir */
    case 85: return sys_openat(AT_FDCWD, a, O_CREAT | O_WRONLY | O_TRUNC, b);  /* creat */
    case 87: return sys_unlinkat(AT_FDCWD, a, 0);
    case 263: return sys_unlinkat((s64)a, b, c);
    case 86: return sys_linkat(AT_FDCWD, a, AT_FDCWD, b, 0);
    case 265: return sys_linkat((s64)a, b, (s64)c, d, e);
    case 88: return sys_symlinkat(a, AT_FDCWD, b);
    case 266: return sys_symlinkat(a, (s64)b, c);
    case 89: return sys_readlinkat(AT_FDCWD, a, b, (s64)c);
    case 267: return sys_readlinkat((s64)a, b, c, (s64)d);
    case 90: return set_mode(lookup(AT_FDCWD, a, 0, 0, 1), b);          /* chmod */
    case 91: if (!(o = ofd_of((s64)a))) return -EBADF; return set_mode(o->ino, b);
    case 268: return set_mode(lookup((s64)a, b, 0, 0, 1), c);           /* fchmodat */
    case 92: case 94: {                                  /* chown, lchown: one user here */
        s64 ino = lookup(AT_FDCWD, a, 0, 0, nr == 92);
        return ino < 0 ? ino : 0;
    }
    case 93: return ofd_of((s64)a) ? 0 : -EBADF;         /* fchown */
    case 260: {                                          /* fchownat */
        s64 ino = lookup((s64)a, b, (e & AT_EMPTY_PATH) != 0, (s64)a,
                         !(e & AT_SYMLINK_NOFOLLOW));
        return ino < 0 ? ino : 0;
    }
    case 280:                                            /* utimensat (futimens: no path) */
        if (!b) {
            if (!(o = ofd_of((s64)a))) return -EBADF;
            return set_mtime(o->ino, c);
        }
        return set_mtime(lookup((s64)a, b, 0, 0, !(d & AT_SYMLINK_NOFOLLOW)), c);
    case 132: case 235: case 261: {                      /* utime, utimes, futimesat */
        u64 t = nr == 261 ? c : b;
        s64 ino = lookup(nr == 261 ? (s64)a : AT_FDCWD, nr == 261 ? b : a, 0, 0, 1);
        if (ino < 0 || !t) return set_mtime(ino, 0);
        if (!user_ok(t, 16 * (nr != 132) + 16)) return -EFAULT;
        s64 sec = nr == 132 ? *(s64 *)(t + 8) : *(s64 *)(t + 16);    /* modtime / tv[1] */
        s64 sub = nr == 132 ? 0 : *(s64 *)(t + 24);                   /* tv_usec */
        if (sub < 0 || sub >= 1000000) return -EINVAL;
        inodes[ino].mtime = sec * 1000000000 + sub * 1000;
        return 0;
    }
    case 162: sync_all(); return 0;                      /* sync */
    case 306: if (!ofd_of((s64)a)) return -EBADF; sync_all(); return 0;   /* syncfs */
    case 95: { u32 old = cur_umask; cur_umask = (u32)a & 0777; return old; }
    case 221: return ofd_of((s64)a) ? 0 : -EBADF;        /* fadvise64 */
    case 285:                                            /* fallocate */
        if (!(o = ofd_of((s64)a))) return -EBADF;
        if (b == 0 && c + d > inodes[o->ino].size) return file_truncate(&inodes[o->ino], c + d);
        return 0;
    case 257: return sys_openat((s64)a, b, c, d);
    case 262: {                                          /* newfstatat */
        s64 ino = lookup((s64)a, b, (d & AT_EMPTY_PATH) != 0, (s64)a,
                         !(d & AT_SYMLINK_NOFOLLOW));
        return ino < 0 ? ino : fill_stat((u32)ino, c);
    }
    case 332: {                                          /* statx */
        s64 ino = lookup((s64)a, b, (c & AT_EMPTY_PATH) != 0, (s64)a,
                         !(c & AT_SYMLINK_NOFOLLOW));
        return ino < 0 ? ino : fill_statx((u32)ino, e);
    }
    case 269: case 439: {                                /* faccessat, faccessat2 */
        s64 ino = lookup((s64)a, b, 0, 0, 1);
        return ino < 0 ? ino : 0;
    }
    default:
        *handled = 0;
        return 0;
    }
}
