/* What native.c shares with native.py: every struct Python fills in or reads through ctypes,
 * and every constant and result code both sides use. native.py mirrors this file field by
 * field (its ctypes Structures keep these member names); tests/unit/machine/test_native_header.py
 * compiles a program that prints sizeof/offsetof of each struct and the value of each constant
 * here, and compares them with native.py. Change both together.
 *
 * The build (native.py) hashes native.c and this file together to name the shared object, so a
 * change to either builds anew. */
#ifndef DIRTYRING_NATIVE_H
#define DIRTYRING_NATIVE_H

#include <stdint.h>

struct kvm_run;  /* linux/kvm.h; only pointed to here */

/* Guest pages are 4096 bytes (native.py PAGE). */
#define DR_PAGE 4096
/* A delta gather keeps at most this many changed 64-bit words per page, an eighth of them
 * (native.py DELTA_WORDS). */
#define DR_DELTA_WORDS 64

/* --- the steady pause: one program (dirtyring_program) ----------------------------------- */

/* An op with this request is no ioctl: it stores the guest's TSC, the host's plus *offset (the
 * vCPU's TSC offset, which the batch reads at its start and checks at its end), at arg
 * (native.py _TSC_OP). */
#define DR_OP_TSC 0UL

struct dr_op { int fd; int expect; unsigned long request; void *arg; const int64_t *offset; };
struct dr_same { const void *a; const void *b; int64_t n; };
/* With a shadow (a copy of the slot as of the last checkpoint), a delta gather: dst gets only
 * the words that changed since, as where[n * DR_DELTA_WORDS] then diff[n * DR_DELTA_WORDS]
 * (int64, uint64), *count how many, and the shadow is brought up to date; if more changed,
 * the pages as a plain gather, *count = -1. */
struct dr_gather {
    uint8_t *dst; int64_t *dst_idx; const uint8_t *src; const int64_t *idx;
    int64_t n; int64_t src_pages; uint8_t *shadow; int64_t *count;
};
struct dr_copy { void *dst; const void *src; int64_t n; };
struct dr_program {
    const struct dr_op *ops; const struct dr_same *same; const struct dr_gather *gathers;
    const struct dr_copy *copies; int nops, nsame, ngathers, ncopies;
};

/* dirtyring_program's result: DR_PROGRAM_DONE; DR_PROGRAM_CHANGED (a compared pair differed,
 * no gather or copy done); -(i+1): op i failed (errno set, or it returned other than its
 * expect >= 0); DR_PROGRAM_BAD_PAGE - k: gather k names a page outside its slot (nothing
 * gathered or copied). */
#define DR_PROGRAM_DONE 0
#define DR_PROGRAM_CHANGED 1
#define DR_PROGRAM_BAD_PAGE (-1000)

/* --- the steady batch (dirtyring_batch) ---------------------------------------------------- */

#define DR_MAX_BATCH 64
/* Why a batch returned (dr_batch.why). machine/exits.py BATCH_STOPS maps each onto the
 * StopReason the epoch that ended the batch has (or an error). */
enum {
    DR_ALL_DONE = 0,        /* every epoch ran and was paused with its program done */
    DR_EXIT = 1,            /* an exit other than KVM_EXIT_INTR (detail): Python serves it */
    DR_CHANGED = 2,         /* a log changed (detail: the program's result) or DR_VMM_WROTE */
    DR_PROGRAM_FAILED = 3,  /* detail: the program's result < 0, or DR_NO_TSC_OFFSET; err */
    DR_RUN_FAILED = 4,      /* KVM_RUN failed other than by EINTR; err */
};
/* dr_batch.detail of a DR_CHANGED that was the watched counter, not a dirty log. */
#define DR_VMM_WROTE 2
/* dr_batch.detail of a DR_PROGRAM_FAILED before any epoch: the TSC offset's read. */
#define DR_NO_TSC_OFFSET (-999)

struct dr_batch {
    /* in */
    int vcpu_fd, n;                  /* the vCPU (run in this thread); epochs to run */
    struct kvm_run *run;             /* its mapping */
    void *timer;                     /* a timer_t whose SIGALRM goes to this thread */
    int64_t interval_ns;
    const volatile int64_t *watch;   /* a counter of VMM writes into guest memory ... */
    int64_t watch_value;             /* ... and its value when the batch was set up */
    const struct dr_program *progs[DR_MAX_BATCH];  /* epoch i's pause */
    int64_t *tsc_offset;             /* the offset DR_OP_TSC ops add (NULL: none of them) */
    /* out */
    int done;                        /* epochs run and paused with their program done */
    int why;                         /* DR_*: why it returned */
    int detail;                      /* exit reason (DR_EXIT), the program's result, or
                                        DR_VMM_WROTE (DR_CHANGED: the watched counter moved) */
    int err;                         /* errno of a failed KVM_RUN or program ioctl */
    int intr;                        /* KVM_EXIT_INTR exits taken */
    int64_t enter_ns[DR_MAX_BATCH];  /* CLOCK_MONOTONIC before epoch i's first KVM_RUN */
    int64_t exit_ns[DR_MAX_BATCH];   /* ... when epoch i's run ended */
    int tsc_moved;                   /* the TSC offset changed: no epoch counts (done = 0) */
};

#endif
