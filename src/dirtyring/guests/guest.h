/* Shared definitions of dirtyring's guest programs. The VMM side is dirtyring/guests/protocol.py;
 * both must agree (tests/unit/guests/test_protocol.py compares them).
 *
 * Guests run at CPL3 with IOPL=3, identity-mapped (see dirtyring/machine/layout.py). They have no
 * IDT, so they never fault on purpose; they talk to the VMM through I/O ports and two shared
 * pages: the read-only control page the VMM fills in, and a per-vCPU status block they update.
 */
#ifndef DIRTYRING_GUEST_H
#define DIRTYRING_GUEST_H

typedef unsigned long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#define CONTROL_GPA 0x7000UL
#define STATUS_GPA 0x8000UL
#define STATUS_STRIDE 256UL
#define QUEUE_GPA 0x100000UL

/* Control page (VMM writes, guest reads). */
struct control {
    u64 magic;        /* 0   "DRGUEST1" */
    u64 data_gpa;     /* 8   first byte of the data slots */
    u64 data_pages;   /* 16  4 KiB pages of data memory */
    u64 pattern;      /* 24  dirtier: 0 sequential, 1 random, 2 hot set */
    u64 hot_pages;    /* 32  dirtier: size of the hot set */
    u64 rate_pps;     /* 40  dirtier: page writes per second per vCPU, 0 = unlimited */
    u64 tsc_khz;      /* 48  for rate limits */
    u64 seed;         /* 56  PRNG / hash-chain seed */
    u64 iteration;    /* 64  the value the dirtier writes (the VMM bumps it) */
    u64 nr_vcpus;     /* 72 */
    u64 exit_every;   /* 80  dirtier: out PORT_TICK after this many writes, 0 = never */
    u64 report_every; /* 88  compute: report through PORT_REPORT every N steps */
    u64 stop;         /* 96  nonzero: finish and out PORT_DONE */
    u64 max_writes;   /* 104 dirtier: stop after this many writes, 0 = never */
    u64 stride;       /* 112 dirtier: page step for sequential and hot patterns, 0 = 1 */
};

/* Per-vCPU status block (guest writes, VMM reads). */
struct status {
    u64 progress;     /* 0   page writes (dirtier), steps (compute), requests (kv) */
    u64 passes;       /* 8   full passes over the pattern */
    u64 report_i;     /* 16  compute: step of the last report */
    u64 report_h;     /* 24  compute: hash after that step */
    u64 hash;         /* 32  compute: current chain value */
    u64 step;         /* 40  compute: next step */
};

/* I/O ports. */
#define PORT_DONE 0x10    /* out32: exit code; the guest is finished */
#define PORT_CONSOLE 0x11 /* out8: one byte of console output */
#define PORT_REPORT 0x12  /* out32: vCPU index; report fields of its status block are fresh */
#define PORT_TICK 0x13    /* out32: vCPU index; dirtier did exit_every writes */
#define PORT_KV_WAIT 0x20 /* in32: request producer index (the VMM may block until one comes) */
#define PORT_KV_DONE 0x21 /* out32: response producer index */

/* Key-value device queues at QUEUE_GPA: a header page then request and response rings. */
#define KV_RING 128
#define KV_PUT 1
#define KV_GET 2
#define KV_OK 0
#define KV_NOT_FOUND 1
#define KV_FULL 2
#define KV_BAD_OP 3
struct kv_header {
    volatile u64 req_prod;  u64 pad0[7];   /* VMM writes */
    volatile u64 req_cons;  u64 pad1[7];   /* guest writes */
    volatile u64 resp_prod; u64 pad2[7];   /* guest writes */
    volatile u64 resp_cons; u64 pad3[7];   /* VMM writes */
};
struct kv_entry { u32 op_or_status; u32 id; u64 key; u64 value; u64 pad; };
#define KV_REQ_GPA (QUEUE_GPA + 0x1000UL)
#define KV_RESP_GPA (QUEUE_GPA + 0x2000UL)

static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u64 rdtsc(void) { u32 lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return ((u64)hi << 32) | lo; }
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
#define barrier() __asm__ volatile("" ::: "memory")

static inline volatile struct control *control(void) { return (volatile struct control *)CONTROL_GPA; }
static inline volatile struct status *status(u64 idx) { return (volatile struct status *)(STATUS_GPA + idx * STATUS_STRIDE); }

static inline u64 splitmix64(u64 x) {
    x += 0x9E3779B97F4A7C15UL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9UL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBUL;
    return x ^ (x >> 31);
}

static inline void done(u32 code) { for (;;) outl(PORT_DONE, code); }

#endif
