/* The library OS: Linux system calls served inside the guest, so that a program's syscalls
 * cost no exit to the VMM and everything the syscall layer knows lives in guest memory, where
 * every checkpoint captures it with the program's own pages.
 *
 * This file: the dispatcher, memory (brk, mmap, mremap; munmap/mprotect/madvise bookkeeping),
 * arch_prctl through wrfsbase, ids, uname, rlimits, getrandom, time from rdtsc (for programs
 * that do not use the vDSO, vdso.c), the stdio queue and exit. Files, directories, pipes and descriptors are in fs.c;
 * signals, futexes, sleeps and process groups in proc.c. Anything else is reported to
 * the VMM once per number (PORT_UNSUPPORTED) and returns -ENOSYS.
 *
 * The program may scribble over any of this (one address space, as in any unikernel); the VMM
 * trusts none of it and checks what it reads. */
#include "kernel.h"

struct frame { u64 rdi, rsi, rdx, r10, r8, r9, rax, rcx, r11; };

u64 libos_user_rsp;                 /* the program's RSP while a syscall runs (entry.S) */
static u64 cur_brk, mmap_next;
static u8 reported[512 / 8];
static char comm[16];               /* prctl(PR_SET_NAME) */

void *lmemset(void *d, int c, u64 n) {
    u8 *p = d;
    while (n--) *p++ = (u8)c;
    return d;
}
void *lmemcpy(void *d, const void *s, u64 n) {
    u8 *p = d;
    const u8 *q = s;
    if (p < q || p >= q + n) { while (n--) *p++ = *q++; }
    else { p += n; q += n; while (n--) *--p = *--q; }   /* overlapping: copy backwards */
    return d;
}
static void strfill(char *d, const char *s, u64 n) {
    u64 i = 0;
    for (; i + 1 < n && s[i]; i++) d[i] = s[i];
    for (; i < n; i++) d[i] = 0;
}

/* A program's pointer is usable when it lies inside one of its regions. */
int user_ok(u64 p, u64 n) {
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
    fs_init();
    ((struct ext_signals *)EXT_SIGNALS_GPA)->entry = (u64)proc_async_stub;
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

s64 stdio_write(u32 fd, const u8 *buf, u64 len) {
    for (u64 done = 0; done < len;) {
        u64 n = len - done > STDIO_MAX_RECORD ? STDIO_MAX_RECORD : len - done;
        queue_put(fd, buf + done, n);
        done += n;
    }
    return (s64)len;
}

/* Bytes of stdin, without an exit while the VMM has put some in the ring; when it is empty,
 * ask the VMM (which waits for input a little at a time, so the guest can still be paused). */
s64 stdin_read(u8 *buf, u64 len, int nonblock) {
    struct stdio_header *h = stdio();
    for (;;) {
        u64 prod = h->stdin_prod, cons = h->stdin_cons;
        if (prod != cons) {
            u64 avail = prod - cons;
            if (avail > STDIN_RING) return -EIO;               /* the VMM never does this */
            u64 n = len < avail ? len : avail;
            for (u64 i = 0; i < n; i++) buf[i] = ((u8 *)STDIN_GPA)[(cons + i) % STDIN_RING];
            __asm__ volatile("" ::: "memory");
            h->stdin_cons = cons + n;
            return (s64)n;
        }
        if (h->stdin_eof || len == 0) return 0;
        if (nonblock) return -EAGAIN;
        if (proc_ext_interrupts()) return -EINTR;
        outl(PORT_STDIN_WAIT, 0);
    }
}

int stdin_state(void) {
    struct stdio_header *h = stdio();
    return (h->stdin_prod != h->stdin_cons ? STDIN_DATA : 0) | (h->stdin_eof ? STDIN_EOF : 0);
}

void stdin_fill(u32 us) { outl(PORT_STDIN_WAIT, us); }

void stdio_flush(void) { outl(PORT_STDIO_FLUSH, (u32)stdio()->prod); }

void trace(u64 nr, const u64 *args, s64 ret) {
    struct stdio_header *h = stdio();
    while (h->trace_prod - h->trace_cons >= TRACE_RECORDS) outl(PORT_TRACE_FLUSH, 0);
    struct trace_record *t = (struct trace_record *)TRACE_GPA + h->trace_prod % TRACE_RECORDS;
    t->nr = nr;
    for (int i = 0; i < 6; i++) t->args[i] = args[i];
    t->ret = ret;
    __asm__ volatile("" ::: "memory");
    h->trace_prod++;
}

void libos_end(u32 done) {
    if (ctl()->export_files) fs_export();
    stdio_flush();
    for (;;) outl(PORT_DONE, done);
}

/* --- memory -------------------------------------------------------------------------------- */
static s64 sys_brk(u64 want) {
    if (want < ctl()->brk_start || want > ctl()->brk_max) return (s64)cur_brk;
    if (want > cur_brk) lmemset((void *)cur_brk, 0, want - cur_brk);  /* Linux gives zeros */
    cur_brk = want;
    return (s64)cur_brk;
}

#define MAP_SHARED 0x01
#define MAP_FIXED 0x10
#define MAP_ANONYMOUS 0x20
static s64 anon(u64 len) {
    if (len > mmap_next - ctl()->mmap_lo) return -ENOMEM;
    mmap_next -= len;              /* fresh pages read as zero: the area is never handed out twice */
    return (s64)mmap_next;
}

static s64 sys_mmap(u64 addr, u64 len, u64 prot, u64 flags, u64 fd, u64 off) {
    (void)prot;
    len = (len + 4095) & ~4095UL;
    if (len == 0) return -EINVAL;
    if (!(flags & MAP_ANONYMOUS)) {
        if (off & 4095) return -EINVAL;
        s64 at = (flags & MAP_FIXED) ? (s64)addr : anon(len);
        if (at < 0) return at;
        if ((u64)at & 4095 || !user_ok((u64)at, len)) return -ENOMEM;
        return fs_mmap_file((u64)at, len, flags, fd, off);
    }
    if (flags & MAP_FIXED) {
        if (addr & 4095 || !user_ok(addr, len)) return -ENOMEM;
        lmemset((void *)addr, 0, len);
        return (s64)addr;
    }
    return anon(len);
}

#define MREMAP_MAYMOVE 1
static s64 sys_mremap(u64 old, u64 old_len, u64 new_len, u64 flags) {
    old_len = (old_len + 4095) & ~4095UL;
    new_len = (new_len + 4095) & ~4095UL;
    if (old & 4095 || !new_len || !user_ok(old, old_len)) return -EINVAL;
    if (new_len <= old_len) return (s64)old;
    if (!(flags & MREMAP_MAYMOVE)) return -ENOMEM;     /* growing in place needs room above */
    if (old == mmap_next && new_len - old_len <= mmap_next - ctl()->mmap_lo) {
        /* The newest mapping grows downward in place: move its bytes down. */
        u64 to = old - (new_len - old_len);
        lmemcpy((void *)to, (void *)old, old_len);
        mmap_next = to;
        lmemset((void *)(to + old_len), 0, new_len - old_len);
        return (s64)to;
    }
    s64 to = anon(new_len);
    if (to < 0) return to;
    lmemcpy((void *)to, (void *)old, old_len);
    return to;
}

/* --- the rest ------------------------------------------------------------------------------ */
struct timespec { s64 sec, nsec; };
static s64 sys_clock_gettime(u64 clk, u64 tp) {
    if (!user_ok(tp, sizeof(struct timespec))) return -EFAULT;
    u64 ns = now_ns();
    if (clk != 0 && clk != 5) ns -= ctl()->boot_realtime_ns;   /* monotonic clocks from boot */
    ((struct timespec *)tp)->sec = (s64)(ns / 1000000000UL);
    ((struct timespec *)tp)->nsec = (s64)(ns % 1000000000UL);
    return 0;
}
struct timeval { s64 sec, usec; };
static s64 sys_gettimeofday(u64 tv) {
    if (!tv) return 0;
    if (!user_ok(tv, sizeof(struct timeval))) return -EFAULT;
    u64 ns = now_ns();
    ((struct timeval *)tv)->sec = (s64)(ns / 1000000000UL);
    ((struct timeval *)tv)->usec = (s64)(ns % 1000000000UL / 1000);
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

static s64 sys_sysinfo(u64 info) {
    if (!user_ok(info, 112)) return -EFAULT;
    u8 *p = (u8 *)info;
    lmemset(p, 0, 112);
    const volatile struct linux_ctl *c = ctl();
    u64 total = (c->brk_max - c->image_lo) + (c->mmap_hi - c->mmap_lo);
    u64 free = (c->brk_max - cur_brk) + (mmap_next - c->mmap_lo);
    *(s64 *)p = (s64)((now_ns() - c->boot_realtime_ns) / 1000000000UL);   /* uptime */
    *(u64 *)(p + 32) = total;                                              /* totalram */
    *(u64 *)(p + 40) = free;                                               /* freeram */
    *(u16 *)(p + 80) = 1;                                                  /* procs */
    *(u32 *)(p + 104) = 1;                                                 /* mem_unit */
    return 0;
}

/* Random bytes (getrandom, /dev/urandom). */
/* Random bytes for the program: from the pool the VMM fills with its host's entropy, asking
 * for more whenever it is used up (one exit per 1 KiB). Each byte is handed out once. */
void fill_random(u8 *buf, u64 len) {
    struct stdio_header *h = stdio();
    u8 *pool = (u8 *)h + ENTROPY_OFFSET;
    while (len) {
        u64 used = h->entropy_used;
        if (used >= ENTROPY_POOL) { outl(PORT_ENTROPY, 0); continue; }
        u64 n = ENTROPY_POOL - used < len ? ENTROPY_POOL - used : len;
        lmemcpy(buf, pool + used, n);
        lmemset(pool + used, 0, n);            /* (gone from the pool once given) */
        h->entropy_used = used + n;
        buf += n; len -= n;
    }
}

static s64 sys_getrandom(u64 buf, u64 len) {
    if (!user_ok(buf, len)) return -EFAULT;
    fill_random((u8 *)buf, len);
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

/* --- rewriting syscall sites --------------------------------------------------------------
 * A `syscall` instruction traps on kvm_pvm (~20 us); a jump does not. So when a `syscall`
 * traps, the site it came from is rewritten, if it is the 7 bytes `b8 imm32 0f 05`
 * (mov $nr,%eax; syscall): the mov becomes `e9 rel32`, a jump to a trampoline of this site
 * that does the mov, sets RCX as `syscall` would and jumps to syscall_fast (entry.S). The
 * `0f 05` stays: code that jumps straight to the syscall instruction still traps and is
 * still right.
 *
 * Doing it here, lazily, is what makes it safe: RCX - 2 is known to be a syscall instruction
 * that just ran (bytes that only look like one are never touched), the imm32 must equal the
 * number the program actually put in RAX (a valid one, < 512), and a byte before the b8 that
 * would be a prefix of the mov (REX: mov to r8d-r15d; 66; 67; f2/f3; lock; segments) refuses
 * the site, as do bytes that make the b8 a displacement (disp8_of_imm_op). What is left is a
 * coincidence no compiler emits on purpose: b8 and the number being the tail of a longer
 * instruction (a disp32 or an immediate) whose value equals RAX. Only the program's loaded
 * image is rewritten (not code it wrote into the heap or an mmap). Everything (the rewritten
 * text, the trampolines, the counts) is guest memory, so checkpoints, snapshots and migration
 * carry it. */
extern char syscall_fast[];
#define TRAMP_BYTES 32
static u64 tramp_next;

static inline struct rewrite_stats *rw_stats(void) {
    return (struct rewrite_stats *)REWRITE_STATS_GPA;
}

static int mov_prefix(u8 b) {
    return (b >= 0x40 && b <= 0x4f) || b == 0x66 || b == 0x67 || b == 0xf2 || b == 0xf3 ||
           b == 0xf0 || b == 0x26 || b == 0x2e || b == 0x36 || b == 0x3e || b == 0x64 ||
           b == 0x65;
}

/* The one false pattern a compiler plausibly puts before a syscall: b8 as the disp8 of
 * `op $imm32, disp8(base)` (c7 mov, 81 arith, 69 imul, f7 test), e.g. `movl $39,-0x48(%rbp)`,
 * whose imm32 then looks like a mov's. site[-1] is its ModRM (mod 01), or its SIB with the
 * ModRM before it. A real mov's site is refused only if the bytes before it look so too. */
static int disp8_of_imm_op(const u8 *site) {
    u8 m1 = site[-1], m2 = site[-2], m3 = site[-3];
#define IMM_OP(b) ((b) == 0xc7 || (b) == 0x81 || (b) == 0x69 || (b) == 0xf7)
    if ((m1 & 0xc0) == 0x40 && (m1 & 7) != 4 && IMM_OP(m2)) return 1;
    if ((m2 & 0xc7) == 0x44 && IMM_OP(m3)) return 1;
#undef IMM_OP
    return 0;
}

static int fits_rel32(s64 v) { return v == (s64)(s32)v; }

static void put32(u8 *p, u32 v) { for (int i = 0; i < 4; i++) p[i] = (u8)(v >> (8 * i)); }

static void rewrite_site(const struct frame *f) {
    const volatile struct linux_ctl *c = ctl();
    u64 ret = f->rcx;                               /* just after the syscall instruction */
    if (!c->rewrite || !c->tramp_lo || f->rax >= 512) return;
    if (ret < c->image_lo + 10 || ret > c->brk_start) return;
    u8 *site = (u8 *)(ret - 7);
    if (site[0] != 0xb8 || site[5] != 0x0f || site[6] != 0x05 || mov_prefix(site[-1]) ||
        disp8_of_imm_op(site)) return;
    u32 imm = (u32)site[1] | (u32)site[2] << 8 | (u32)site[3] << 16 | (u32)site[4] << 24;
    if (imm != f->rax) return;
    if (!tramp_next) tramp_next = c->tramp_lo;
    u64 t = tramp_next;
    if (t + TRAMP_BYTES > c->tramp_hi) return;      /* full: the site keeps trapping */
    s64 to_tramp = (s64)(t - (ret - 2)), to_ret = (s64)(ret - (t + 12));
    if (!fits_rel32(to_tramp) || !fits_rel32(to_ret)) return;
    u8 *p = (u8 *)t;
    p[0] = 0xb8; put32(p + 1, imm);                 /* mov $nr, %eax */
    p[5] = 0x48; p[6] = 0x8d; p[7] = 0x0d;          /* lea ret(%rip), %rcx */
    put32(p + 8, (u32)to_ret);
    p[12] = 0xff; p[13] = 0x25; put32(p + 14, 6);   /* jmp *24(trampoline) */
    for (int i = 18; i < 24; i++) p[i] = 0xcc;      /* int3 */
    *(u64 *)(p + 24) = (u64)syscall_fast;
    tramp_next = t + TRAMP_BYTES;
    __asm__ volatile("" ::: "memory");              /* the trampoline before the jump to it */
    put32(site + 1, (u32)to_tramp);
    __asm__ volatile("" ::: "memory");
    site[0] = 0xe9;                                 /* jmp trampoline */
    rw_stats()->sites++;
}

static s64 dispatch(struct frame *f);

static s64 serve(struct frame *f) {
    init_once();
    u64 nr = f->rax;
    if (!ctl()->strace) return proc_syscall_exit(dispatch(f), &f->rcx, nr);
    u64 args[6] = {f->rdi, f->rsi, f->rdx, f->r10, f->r8, f->r9};
    if (f->rax == 60 || f->rax == 231) trace(f->rax, args, 0);   /* it will not return */
    s64 r = dispatch(f);
    trace(f->rax, args, r);
    return proc_syscall_exit(r, &f->rcx, nr);
}

/* A `syscall` instruction trapped into syscall_entry. */
s64 libos_syscall(struct frame *f) {
    rw_stats()->trapped_calls++;
    rewrite_site(f);
    return serve(f);
}

/* A rewritten site's trampoline jumped to syscall_fast. */
s64 libos_fast_syscall(struct frame *f) {
    rw_stats()->fast_calls++;
    return serve(f);
}

static s64 dispatch(struct frame *f) {
    u64 a = f->rdi, b = f->rsi, c = f->rdx, d = f->r10, e = f->r8, g = f->r9;
    int handled = 0;
    s64 r = fs_syscall(f->rax, a, b, c, d, e, &handled);
    if (handled) return r;
    r = proc_syscall(f->rax, a, b, c, d, e, g, &f->rcx, &handled);
    if (handled) return r;
    switch (f->rax) {
    case 9: return sys_mmap(a, b, c, d, e, g);
    case 10: return 0;                                     /* mprotect: recorded, not enforced */
    case 11: fs_munmap(a, b); return 0;                    /* munmap: shared files written back */
    case 12: return sys_brk(a);
    case 25: return sys_mremap(a, b, c, d);
    case 26: return 0;                                     /* msync: see munmap */
    case 28:                                               /* madvise */
        if (c == 4 && user_ok(a, b)) lmemset((void *)a, 0, b);   /* MADV_DONTNEED: zeros */
        return 0;
    case 39: case 186: return (s64)ctl()->pid;             /* getpid, gettid */
    case 60: case 231: libos_end((u32)(a & 0xFF));        /* exit, exit_group */
    case 63: return sys_uname(a);
    case 96: return sys_gettimeofday(a);
    case 99: return sys_sysinfo(a);
    case 102: case 104: case 107: case 108: return 0;      /* get[e]uid, get[e]gid: root */
    case 110: return 1;                                    /* getppid */
    case 157:                                              /* prctl */
        if (a == 15 || a == 16) {                          /* PR_SET_NAME, PR_GET_NAME */
            if (!user_ok(b, 16)) return -EFAULT;
            if (a == 15) { lmemcpy(comm, (void *)b, 15); comm[15] = 0; }
            else lmemcpy((void *)b, comm, 16);
            return 0;
        }
        return -EINVAL;
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
    case 273: return 0;                                    /* set_robust_list */
    case 302: return sys_prlimit(a, b, c, d);
    case 318: return sys_getrandom(a, b);
    case 334: return -ENOSYS;                              /* rseq: glibc copes, quietly */
    default: return unsupported(f->rax);
    }
}
