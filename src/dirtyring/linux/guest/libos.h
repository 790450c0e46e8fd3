/* The library OS's contract with the VMM (dirtyring/linux/protocol.py mirrors it; a test
 * compares them). The library OS runs at CPL3 in the program's own address space: code at
 * 0x10000 (read-only), its state in .bss at 0x80000, its stack below LIBOS_STACK_TOP. It reads
 * the VMM's settings from the Linux control block (read-only to the guest) and talks to the VMM
 * through the stdio queue and three I/O ports. Nothing the VMM reads back from guest memory is
 * trusted by the VMM: it checks every index and length itself. */
#ifndef DIRTYRING_LIBOS_H
#define DIRTYRING_LIBOS_H

typedef unsigned long u64;
typedef long s64;
typedef unsigned int u32;
typedef int s32;
typedef unsigned short u16;
typedef unsigned char u8;

#define LINUX_CTL_GPA 0x7400UL      /* inside the control page (the VMM writes, guest reads) */
#define LIBOS_STACK_TOP 0x100000UL  /* all four vCPU stacks of the machine layout: one vCPU */
#define STDIO_GPA 0x100000UL        /* the device queues' area */
#define STDIO_RING_GPA (STDIO_GPA + 0x1000UL)
#define STDIO_RING 0x8000UL         /* bytes; records never wrap */
#define STDIO_MAX_RECORD 0x1000UL   /* payload bytes per record */
#define TRACE_GPA (STDIO_GPA + 0x9000UL)
#define TRACE_RECORDS 192UL         /* of struct trace_record: 12 KiB */
#define STDIN_GPA (STDIO_GPA + 0xC000UL)
#define STDIN_RING 0x4000UL         /* bytes, to the queue area's end; the VMM fills it */

/* Ports (the machine's device ports: DONE is shared with the built-in guests). */
#define PORT_DONE 0x10              /* out32: exit status; the program has ended */
/* DONE's value for a program a signal killed: the status a shell shows (128 + sig) in the low
 * byte, the signal above it, so the VMM can say which signal (it checks the two agree). */
#define DONE_KILLED(sig) (((u32)(sig) << 8) | (128U + (u32)(sig)))
#define PORT_STDIO_FLUSH 0x30       /* out32: the queue is full; drain it (the VMM updates cons) */
#define PORT_UNSUPPORTED 0x31       /* out32: a syscall number the library OS does not serve */
#define PORT_FAULT 0x32             /* out32: the library OS stopped the program (a FAULT_ code) */
#define PORT_EXPORT 0x33            /* out32: the export archive is at stdio_header.export_va */
#define PORT_TRACE_FLUSH 0x34       /* out32: the trace ring is full; drain it */
#define PORT_STDIN_WAIT 0x35        /* out32: stdin is empty; fill it (or set eof), or wait a bit:
                                       at most the value's microseconds, if not 0 */
#define PORT_ENTROPY 0x36           /* out32: the entropy pool is used up; refill it */
#define PORT_SIGNAL_WAIT 0x37       /* out32: waiting for a signal from outside; wait a bit */

/* PORT_FAULT's values: why the library OS stopped the program. */
#define FAULT_FUTEX_WAIT 2          /* it waits on a futex with no timeout: no thread can wake it */
#define FAULT_SIGNAL_WAIT 3         /* pause/sigsuspend/sigtimedwait with nothing pending */
#define FAULT_STOPPED 4             /* a stop signal (SIGSTOP...): nothing can send SIGCONT */
#define FAULT_POLL_WAIT 5           /* poll/select with no timeout on what cannot become ready */

struct linux_ctl {                  /* the VMM fills it before the program starts */
    u64 magic;        /* 0   "DRLINUX1" */
    u64 image_lo;     /* 8   start of the image+heap region */
    u64 brk_start;    /* 16  first byte after the image, page-aligned */
    u64 brk_max;      /* 24  end of the image+heap region */
    u64 mmap_lo;      /* 32  the anonymous mmap area, handed out top-down */
    u64 mmap_hi;      /* 40 */
    u64 stack_lo;     /* 48  the main stack region */
    u64 stack_hi;     /* 56 */
    u64 pid;          /* 64 */
    u64 tsc_khz;      /* 72  for time from rdtsc */
    u64 boot_tsc;     /* 80  rdtsc at boot_realtime_ns */
    u64 boot_realtime_ns; /* 88 CLOCK_REALTIME at boot, in ns */
    u64 seed[4];      /* 96  getrandom's generator starts from these */
    u64 fs_lo;        /* 128 the file system's region: the import archive, then blocks */
    u64 fs_hi;        /* 136 */
    u64 import_len;   /* 144 bytes of the import archive at fs_lo (0: an empty file system) */
    u64 export_files; /* 152 nonzero: at exit, hand the VMM an archive of every file */
    u64 strace;       /* 160 nonzero: record every syscall in the trace ring */
    u64 tramp_lo;     /* 168 the trampoline region for rewritten syscall sites (0: none) */
    u64 tramp_hi;     /* 176 */
    u64 rewrite;      /* 184 nonzero: rewrite `mov $nr,%eax; syscall` sites that trap */
};

struct stdio_header {               /* at STDIO_GPA */
    volatile u64 prod; u64 pad0[7]; /* guest writes: bytes ever queued */
    volatile u64 cons; u64 pad1[7]; /* VMM writes: bytes ever drained */
    volatile u64 export_va;         /* guest writes before PORT_EXPORT: the archive's address */
    volatile u64 export_len;        /*   and length (0: it did not fit) */
    volatile u64 trace_prod;        /* guest writes: trace records ever written */
    volatile u64 trace_cons;        /* VMM writes: trace records ever drained */
    volatile u64 stdin_prod;        /* VMM writes: stdin bytes ever provided */
    volatile u64 stdin_cons;        /* guest writes: stdin bytes ever read */
    volatile u64 stdin_eof;         /* VMM writes: nonzero once stdin has ended */
    volatile u64 entropy_used;      /* bytes of the pool handed out; the VMM refills, sets 0 */
};
/* getrandom's and /dev/urandom's bytes: a pool in the header page that the VMM fills from its
 * own getrandom (at boot and on PORT_ENTROPY), never a generator a program could predict. */
#define ENTROPY_OFFSET 0xC00        /* from STDIO_GPA, after the rewrite counters */
#define ENTROPY_POOL 0x400

/* What rewriting syscall sites did, counted by the library OS (the VMM reports it): in the
 * queue area's header page, after stdio_header. */
#define REWRITE_STATS_GPA (STDIO_GPA + 0x800UL)
struct rewrite_stats {
    volatile u64 sites;             /* syscall sites rewritten into jumps to a trampoline */
    volatile u64 fast_calls;        /* syscalls that came through a trampoline: no trap */
    volatile u64 trapped_calls;     /* syscalls that trapped (a `syscall` instruction ran) */
};

/* Signals sent to the program from outside (the VMM forwards the SIGINT, SIGTERM... it gets):
 * in the queue area's header page, after rewrite_stats. With the program paused, the VMM sets
 * the signal's bit in `pending`; if the program was in its own code (not the library OS's), the
 * VMM also stores its registers in `ctx` (struct sigctx's order, proc.c) and points its RIP at
 * `entry`, which delivers the signal as a kernel would on an interrupt. Otherwise the library OS
 * takes the bits when the syscall it is serving returns, or while it waits. */
#define EXT_SIGNALS_GPA (STDIO_GPA + 0x900UL)
struct ext_signals {
    volatile u64 pending;           /* VMM sets bit (sig - 1); the library OS clears it */
    volatile u64 entry;             /* library OS writes at start: proc_async_stub */
    volatile u64 forwarding;        /* VMM sets nonzero while it forwards signals: a wait only
                                       a signal can end (pause...) then waits for one */
    u64 ctx[18];                    /* VMM writes: the interrupted registers (r8 ... eflags) */
};

/* The file archive the VMM hands in (at fs_lo) and gets back (PORT_EXPORT): a header
 * {u64 magic "DRFSARC1", u64 count}, then per file {u32 path_len, u32 mode, u64 size, the
 * absolute path, padding to 8, the data, padding to 8}. Directories have size 0. */
#define FS_ARCHIVE_MAGIC 0x3143524153465244UL

/* A record in the ring: header then payload, padded to 8 bytes; fd 0 = padding to the end. */
struct stdio_record { u32 fd; u32 len; };

/* --strace: one record per system call, written after it returns (exit: before it ends). */
struct trace_record { u64 nr; u64 args[6]; s64 ret; };

#endif
