/* The library OS: Linux system calls served inside the guest, so that a program's syscalls
 * cost no exit to the VMM and everything the syscall layer knows lives in guest memory, where
 * every checkpoint captures it with the program's own pages.
 *
 * First cut (issue 15): what a static glibc program needs to start, print and end: memory
 * (brk, anonymous mmap, munmap/mprotect/madvise bookkeeping), arch_prctl through wrfsbase, ids,
 * uname, rlimits, getrandom, time from rdtsc, fstat/ioctl of the standard streams, write/writev
 * to stdout and stderr through the stdio queue, exit. Anything else is reported to the VMM once
 * per number (PORT_UNSUPPORTED) and returns -ENOSYS.
 *
 * The program may scribble over any of this (one address space, as in any unikernel); the VMM
 * trusts none of it and checks what it reads. */
#include "libos.h"

#define ENOENT 2
#define EBADF 9
#define ENOMEM 12
#define EFAULT 14
#define EINVAL 22
#define ENOTTY 25
#define ENOSYS 38

struct frame { u64 rdi, rsi, rdx, r10, r8, r9, rax, rcx, r11; };

u64 libos_user_rsp;                 /* the program's RSP while a syscall runs (entry.S) */
static u64 cur_brk, mmap_next, rng[4];
static u8 reported[512 / 8];

static inline const volatile struct linux_ctl *ctl(void) {
    return (const volatile struct linux_ctl *)LINUX_CTL_GPA;
}
static inline struct stdio_header *stdio(void) { return (struct stdio_header *)STDIO_GPA; }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(port)); }
static inline u64 rdtsc(void) {
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

static void *lmemset(void *d, int c, u64 n) {
    u8 *p = d;
    while (n--) *p++ = (u8)c;
    return d;
}
static void *lmemcpy(void *d, const void *s, u64 n) {
    u8 *p = d;
    const u8 *q = s;
    while (n--) *p++ = *q++;
    return d;
}
static void strfill(char *d, const char *s, u64 n) {
    u64 i = 0;
    for (; i + 1 < n && s[i]; i++) d[i] = s[i];
    for (; i < n; i++) d[i] = 0;
}

/* A program's pointer is usable when it lies inside one of its regions. */
static int user_ok(u64 p, u64 n) {
    const volatile struct linux_ctl *c = ctl();
    u64 end = p + n;
    if (end < p) return 0;
    return (p >= c->mmap_lo && end <= c->mmap_hi) || (p >= c->stack_lo && end <= c->stack_hi) ||
           (p >= c->image_lo && end <= c->brk_max);
}

static void init_once(void) {
    if (cur_brk) return;
    cur_brk = ctl()->brk_start;
    mmap_next = ctl()->mmap_hi;
    for (int i = 0; i < 4; i++) rng[i] = ctl()->seed[i] | (i == 0);
}

/* xoshiro256** (getrandom's bytes; seeded by the VMM from the host's entropy). */
static u64 rotl(u64 x, int k) { return (x << k) | (x >> (64 - k)); }
static u64 next_random(void) {
    u64 r = rotl(rng[1] * 5, 7) * 9, t = rng[1] << 17;
    rng[2] ^= rng[0]; rng[3] ^= rng[1]; rng[1] ^= rng[2]; rng[0] ^= rng[3];
    rng[2] ^= t; rng[3] = rotl(rng[3], 45);
    return r;
}

/* --- stdio queue --------------------------------------------------------------------------- */
static void queue_put(u32 fd, const u8 *buf, u64 len) {
    struct stdio_header *h = stdio();
    u64 need = (sizeof(struct stdio_record) + len + 7) & ~7UL;
    for (;;) {
        u64 prod = h->prod, off = prod % STDIO_RING, room = STDIO_RING - (prod - h->cons);
        if (STDIO_RING - off < need) {          /* no wrap: pad to the end first */
            if (room < STDIO_RING - off) { outl(PORT_STDIO_FLUSH, (u32)prod); continue; }
            struct stdio_record *r = (struct stdio_record *)(STDIO_RING_GPA + off);
            r->fd = 0; r->len = (u32)(STDIO_RING - off - sizeof *r);
            __asm__ volatile("" ::: "memory");
            h->prod = prod + (STDIO_RING - off);
            continue;
        }
        if (room < need) { outl(PORT_STDIO_FLUSH, (u32)prod); continue; }
        struct stdio_record *r = (struct stdio_record *)(STDIO_RING_GPA + off);
        r->fd = fd; r->len = (u32)len;
        lmemcpy(r + 1, buf, len);
        __asm__ volatile("" ::: "memory");   /* x86 keeps stores in order: data, then prod */
        h->prod = prod + need;
        return;
    }
}

static s64 sys_write(u64 fd, u64 buf, u64 len) {
    if (fd != 1 && fd != 2) return -EBADF;
    if (len == 0) return 0;
    if (!user_ok(buf, len)) return -EFAULT;
    for (u64 done = 0; done < len;) {
        u64 n = len - done > STDIO_MAX_RECORD ? STDIO_MAX_RECORD : len - done;
        queue_put((u32)fd, (const u8 *)(buf + done), n);
        done += n;
    }
    return (s64)len;
}

struct iovec { u64 base, len; };
static s64 sys_writev(u64 fd, u64 iov, u64 cnt) {
    if (cnt > 1024 || !user_ok(iov, cnt * sizeof(struct iovec))) return -EFAULT;
    s64 total = 0;
    for (u64 i = 0; i < cnt; i++) {
        const struct iovec *v = (const struct iovec *)iov + i;
        s64 r = sys_write(fd, v->base, v->len);
        if (r < 0) return total ? total : r;
        total += r;
    }
    return total;
}

static void flush_and_exit(u64 status) {
    outl(PORT_STDIO_FLUSH, (u32)stdio()->prod);
    for (;;) outl(PORT_DONE, (u32)(status & 0xFF));
}

/* --- memory -------------------------------------------------------------------------------- */
static s64 sys_brk(u64 want) {
    if (want < ctl()->brk_start || want > ctl()->brk_max) return (s64)cur_brk;
    if (want > cur_brk) lmemset((void *)cur_brk, 0, want - cur_brk);  /* Linux gives zeros */
    cur_brk = want;
    return (s64)cur_brk;
}

#define MAP_FIXED 0x10
#define MAP_ANONYMOUS 0x20
static s64 sys_mmap(u64 addr, u64 len, u64 prot, u64 flags, u64 fd, u64 off) {
    (void)prot; (void)fd; (void)off;
    if (!(flags & MAP_ANONYMOUS)) return -ENOSYS;           /* file mappings: to come */
    len = (len + 4095) & ~4095UL;
    if (len == 0) return -EINVAL;
    if (flags & MAP_FIXED) {
        if (addr & 4095 || !user_ok(addr, len)) return -ENOMEM;
        lmemset((void *)addr, 0, len);
        return (s64)addr;
    }
    if (len > mmap_next - ctl()->mmap_lo) return -ENOMEM;
    mmap_next -= len;              /* fresh pages read as zero: the area is never handed out twice */
    return (s64)mmap_next;
}

/* --- the rest ------------------------------------------------------------------------------ */
struct timespec { s64 sec, nsec; };
static u64 now_ns(void) {
    u64 khz = ctl()->tsc_khz ? ctl()->tsc_khz : 1000000;
    u64 d = rdtsc() - ctl()->boot_tsc;
    return ctl()->boot_realtime_ns + d / khz * 1000000UL + d % khz * 1000000UL / khz;
}
static s64 sys_clock_gettime(u64 clk, u64 tp) {
    if (!user_ok(tp, sizeof(struct timespec))) return -EFAULT;
    u64 ns = now_ns();
    if (clk != 0 && clk != 5) ns -= ctl()->boot_realtime_ns;   /* monotonic clocks from boot */
    ((struct timespec *)tp)->sec = (s64)(ns / 1000000000UL);
    ((struct timespec *)tp)->nsec = (s64)(ns % 1000000000UL);
    return 0;
}

struct rlimit { u64 cur, max; };
static s64 sys_prlimit(u64 pid, u64 res, u64 new, u64 old) {
    (void)new;
    if (pid != 0 && pid != ctl()->pid) return -EINVAL;
    if (old) {
        if (!user_ok(old, sizeof(struct rlimit))) return -EFAULT;
        u64 v = ~0UL;
        if (res == 3) v = ctl()->stack_hi - ctl()->stack_lo;   /* RLIMIT_STACK */
        if (res == 7) v = 1024;                                 /* RLIMIT_NOFILE */
        ((struct rlimit *)old)->cur = v;
        ((struct rlimit *)old)->max = v;
    }
    return 0;
}

static s64 sys_uname(u64 buf) {
    if (!user_ok(buf, 6 * 65)) return -EFAULT;
    char *u = (char *)buf;
    strfill(u, "Linux", 65);
    strfill(u + 65, "dirtyring", 65);
    strfill(u + 130, "6.1.0-dirtyring", 65);
    strfill(u + 195, "#1 SMP", 65);
    strfill(u + 260, "x86_64", 65);
    strfill(u + 325, "(none)", 65);
    return 0;
}

static s64 sys_fstat(u64 fd, u64 st) {
    if (fd > 2) return -EBADF;
    if (!user_ok(st, 144)) return -EFAULT;
    lmemset((void *)st, 0, 144);
    *(u32 *)(st + 24) = 0020620;    /* st_mode: a character device, like a terminal or /dev/null */
    *(u64 *)(st + 56) = 4096;       /* st_blksize */
    return 0;
}

static s64 sys_getrandom(u64 buf, u64 len) {
    if (!user_ok(buf, len)) return -EFAULT;
    for (u64 i = 0; i < len; i += 8) {
        u64 r = next_random();
        lmemcpy((void *)(buf + i), &r, len - i < 8 ? len - i : 8);
    }
    return (s64)len;
}

static s64 unsupported(u64 nr) {
    if (nr < 512 && !(reported[nr / 8] & (1 << (nr % 8)))) {
        reported[nr / 8] |= (u8)(1 << (nr % 8));
        outl(PORT_UNSUPPORTED, (u32)nr);
    } else if (nr >= 512) {
        outl(PORT_UNSUPPORTED, (u32)nr);
    }
    return -ENOSYS;
}

s64 libos_syscall(struct frame *f) {
    u64 a = f->rdi, b = f->rsi, c = f->rdx, d = f->r10, e = f->r8, g = f->r9;
    init_once();
    switch (f->rax) {
    case 0: return a == 0 ? 0 : -EBADF;                    /* read: stdin is empty for now */
    case 1: return sys_write(a, b, c);
    case 3: return a <= 2 ? 0 : -EBADF;                   /* close */
    case 5: return sys_fstat(a, b);                        /* fstat */
    case 9: return sys_mmap(a, b, c, d, e, g);
    case 10: case 28: return 0;                            /* mprotect, madvise: bookkeeping */
    case 11: return 0;                                     /* munmap: the area is not reused */
    case 12: return sys_brk(a);
    case 16: return -ENOTTY;                               /* ioctl: no terminal */
    case 20: return sys_writev(a, b, c);
    case 39: case 186: return (s64)ctl()->pid;             /* getpid, gettid */
    case 60: case 231: flush_and_exit(a); return 0;        /* exit, exit_group */
    case 63: return sys_uname(a);
    case 89: case 267: return -ENOENT;                     /* readlink(at): no /proc */
    case 102: case 104: case 107: case 108: return 0;      /* get[e]uid, get[e]gid: root */
    case 110: return 1;                                    /* getppid */
    case 158:                                              /* arch_prctl */
        if (a == 0x1002) { __asm__ volatile("wrfsbase %0" :: "r"(b)); return 0; }
        if (a == 0x1003) {
            if (!user_ok(b, 8)) return -EFAULT;
            u64 v; __asm__ volatile("rdfsbase %0" : "=r"(v)); *(u64 *)b = v; return 0;
        }
        return -EINVAL;
    case 201: {                                            /* time */
        s64 t = (s64)(now_ns() / 1000000000UL);
        if (a) { if (!user_ok(a, 8)) return -EFAULT; *(s64 *)a = t; }
        return t;
    }
    case 218: return (s64)ctl()->pid;                      /* set_tid_address */
    case 228: return sys_clock_gettime(a, b);
    case 262:                                              /* newfstatat(fd, "", st, EMPTY_PATH) */
        if (!(d & 0x1000)) return -ENOENT;
        return sys_fstat(a, c);
    case 273: return 0;                                    /* set_robust_list */
    case 302: return sys_prlimit(a, b, c, d);
    case 318: return sys_getrandom(a, b);
    case 334: return -ENOSYS;                              /* rseq: glibc copes, quietly */
    default: return unsupported(f->rax);
    }
}
