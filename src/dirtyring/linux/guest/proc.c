/* Signals, futexes and the small process calls of a lone single-threaded program: rt_sigaction,
 * rt_sigprocmask, rt_sigpending, sigaltstack, kill/tkill/tgkill aimed at itself, handlers with
 * a Linux signal frame and rt_sigreturn, pause/rt_sigsuspend/rt_sigtimedwait, futex, sleeps,
 * sched_yield/sched_getaffinity/getcpu, getrusage/times, process groups and sessions.
 *
 * Signals come from the program itself, or from outside: the VMM forwards those it gets (no
 * other process, no timers, no fault is turned into a signal: a real fault stops the guest and
 * the VMM reports it). A self-sent signal is acted on exactly where Linux would act on it: when
 * the syscall that made it deliverable returns (kill, an unblocking sigprocmask, rt_sigreturn,
 * sigsuspend). One from outside (libos.h struct ext_signals) is taken when the syscall being
 * served returns, or interrupts a sleep or a wait for stdin (EINTR), or, when the program was
 * running its own code, is delivered at once: the VMM saved its registers and sent it to
 * proc_async_stub, which delivers on top of that context as a kernel does after an interrupt.
 * Invariant: after every call served here, no signal is both pending and unblocked.
 *
 * Default actions: terminate ends the program with DONE_KILLED(sig) (the VMM reports "killed by
 * signal N" and exits 128+N); ignore discards; stop (SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU) would
 * stop a lone program for ever (nothing can send SIGCONT), so it ends with FAULT_STOPPED.
 *
 * A handler is entered the way Linux enters it. kill() returns through entry.S as usual, but to
 * proc_signal_stub instead of the program: there every register is exactly the program's after
 * its syscall, the stub stores them all in proc_ctx (without touching the program's stack: its
 * red zone may be live), switches to the library OS's stack and calls proc_signal_entry, which
 * writes an rt_sigframe (ucontext with all registers, the FPU state by fxsave64, siginfo; below
 * the red zone or on the alternate stack) and jumps to the handler with every register loaded
 * (proc_ctx_jump). rt_sigreturn loads a context back the same way. This keeps entry.S unchanged.
 *
 * The FPU state is the x87/SSE state only: the VMM leaves CR4.OSXSAVE off, so there is no AVX
 * state for a program to have (glibc checks OSXSAVE before it uses AVX). */
#include "kernel.h"

extern u64 libos_user_rsp;             /* the program's RSP in the current syscall (entry.S) */

#define NSIG 64
#define SIGILL 4
#define SIGTRAP 5
#define SIGBUS 7
#define SIGFPE 8
#define SIGKILL 9
#define SIGSEGV 11
#define SIGCHLD 17
#define SIGCONT 18
#define SIGSTOP 19
#define SIGTSTP 20
#define SIGTTIN 21
#define SIGTTOU 22
#define SIGURG 23
#define SIGWINCH 28
#define SIGSYS 31
#define SIGRTMIN 32
#define BIT(s) (1UL << ((s) - 1))
#define UNBLOCKABLE (BIT(SIGKILL) | BIT(SIGSTOP))
/* Linux takes these (faults' signals) before the others. */
#define SYNCHRONOUS (BIT(SIGSEGV) | BIT(SIGBUS) | BIT(SIGILL) | BIT(SIGTRAP) | BIT(SIGFPE) | \
                     BIT(SIGSYS))

#define SIG_DFL 0UL
#define SIG_IGN 1UL
#define SA_NOCLDSTOP 0x1UL
#define SA_NOCLDWAIT 0x2UL
#define SA_SIGINFO 0x4UL
#define SA_EXPOSE_TAGBITS 0x800UL
#define SA_RESTORER 0x04000000UL
#define SA_ONSTACK 0x08000000UL
#define SA_RESTART 0x10000000UL
#define SA_NODEFER 0x40000000UL
#define SA_RESETHAND 0x80000000UL
/* What Linux (5.11+) keeps of sa_flags: the rest is cleared, so a program can detect it. */
#define SA_KNOWN (SA_NOCLDSTOP | SA_NOCLDWAIT | SA_SIGINFO | SA_EXPOSE_TAGBITS | SA_RESTORER | \
                  SA_ONSTACK | SA_RESTART | SA_NODEFER | SA_RESETHAND)

#define SI_USER 0
#define SI_TKILL (-6)
#define SS_ONSTACK 1
#define SS_DISABLE 2
#define SS_AUTODISARM (1U << 31)
#define MINSIGSTKSZ 2048

/* The flags rt_sigreturn takes from the frame (Linux's FIX_EFLAGS, without TF: a trap flag
 * would single-step into the library OS's own return path). */
#define FLAGS_FROM_FRAME 0x40DD5UL     /* AC OF DF SF ZF AF PF CF */
#define FLAGS_CLEARED_FOR_HANDLER 0x10500UL   /* RF DF TF */

struct ksigaction { u64 handler, flags, restorer, mask; };
struct kstack { u64 sp; s32 flags; s32 pad; u64 size; };
/* The registers in struct sigcontext's order (glibc's REG_R8 ... REG_EFL). */
struct sigctx { u64 r8, r9, r10, r11, r12, r13, r14, r15, rdi, rsi, rbp, rbx, rdx, rax, rcx,
                rsp, rip, eflags; };
struct kucontext {                     /* Linux's struct ucontext on x86-64: 304 bytes */
    u64 flags, link;
    struct kstack stack;
    struct sigctx regs;                /* uc_mcontext: gregs[0..17] */
    u16 cs, gs, fs, ss;                /*   gregs[18] (CSGSFS) */
    u64 err, trapno, oldmask, cr2, fpstate, reserved[8];
    u64 sigmask;
};
struct siginfo_kill { s32 signo, errno_, code, pad; s32 pid; u32 uid; u8 rest[104]; };
struct rt_sigframe { u64 pretcode; struct kucontext uc; struct siginfo_kill info; };
#define UC_SIGCONTEXT_SS 2
#define UC_STRICT_RESTORE_SS 4

_Static_assert(sizeof(struct kucontext) == 304, "ucontext layout");
_Static_assert(sizeof(struct siginfo_kill) == 128, "siginfo layout");
_Static_assert(sizeof(struct rt_sigframe) == 440, "rt_sigframe layout");

/* Everything lives in .bss (the loader copies no .data): zero means "not yet set up". */
static int ready;
static struct ksigaction actions[NSIG + 1];
static u64 blocked;
/* Pending signals in the order sent: a standard signal at most once, real-time ones queued. */
#define QUEUE_MAX 128
#define RT_QUEUE_MAX (QUEUE_MAX - 31)  /* RLIMIT_SIGPENDING's role: kill then says EAGAIN */
static struct { s32 sig, code; } queue[QUEUE_MAX];
static u32 queued;
static u64 alt_sp, alt_size;
static u32 alt_flags;
static u32 mxcsr_mask;
static u8 fpbuf[512] __attribute__((aligned(64)));

/* Set by the stub path: the program's registers, where its syscall returns, the mask a
 * sigsuspend replaced (its frame must restore that one). */
struct sigctx proc_ctx;
u64 proc_resume_rip, proc_jump_rip;
static u64 saved_mask;
static int have_saved_mask;

void proc_signal_stub(void);
__attribute__((noreturn)) void proc_ctx_jump(struct sigctx *c);
__attribute__((noreturn, used)) void proc_signal_entry(void);
__attribute__((noreturn, used)) void proc_async_entry(void);
_Static_assert(sizeof(struct sigctx) == sizeof(((struct ext_signals *)0)->ctx), "ext ctx");

__asm__(
"    .pushsection .text\n"
"    .globl proc_signal_stub\n"
"proc_signal_stub:\n"                  /* the program's registers, just after its syscall */
"    movq %r8, proc_ctx+0(%rip)\n"
"    movq %r9, proc_ctx+8(%rip)\n"
"    movq %r10, proc_ctx+16(%rip)\n"
"    movq %r11, proc_ctx+24(%rip)\n"
"    movq %r12, proc_ctx+32(%rip)\n"
"    movq %r13, proc_ctx+40(%rip)\n"
"    movq %r14, proc_ctx+48(%rip)\n"
"    movq %r15, proc_ctx+56(%rip)\n"
"    movq %rdi, proc_ctx+64(%rip)\n"
"    movq %rsi, proc_ctx+72(%rip)\n"
"    movq %rbp, proc_ctx+80(%rip)\n"
"    movq %rbx, proc_ctx+88(%rip)\n"
"    movq %rdx, proc_ctx+96(%rip)\n"
"    movq %rax, proc_ctx+104(%rip)\n"
"    movq %rsp, proc_ctx+120(%rip)\n"
"    movq %r11, proc_ctx+136(%rip)\n"  /* entry.S loaded RFLAGS from R11 */
"    movq $0x100000, %rsp\n"           /* LIBOS_STACK_TOP: nothing of the library OS is live */
"    call proc_signal_entry\n"
"    ud2\n"
"    .globl proc_async_stub\n"
"proc_async_stub:\n"                   /* the VMM interrupted the program in its own code */
"    movq $0x100000, %rsp\n"           /* (its registers are in ext_signals.ctx) */
"    call proc_async_entry\n"
"    ud2\n"
"    .globl proc_ctx_jump\n"
"proc_ctx_jump:\n"                     /* RDI: a struct sigctx in library OS memory */
"    movq 128(%rdi), %rax\n"
"    movq %rax, proc_jump_rip(%rip)\n"
"    pushq 136(%rdi)\n"
"    popfq\n"                          /* (plain moves from here on keep the flags) */
"    movq 0(%rdi), %r8\n"
"    movq 8(%rdi), %r9\n"
"    movq 16(%rdi), %r10\n"
"    movq 24(%rdi), %r11\n"
"    movq 32(%rdi), %r12\n"
"    movq 40(%rdi), %r13\n"
"    movq 48(%rdi), %r14\n"
"    movq 56(%rdi), %r15\n"
"    movq 72(%rdi), %rsi\n"
"    movq 80(%rdi), %rbp\n"
"    movq 88(%rdi), %rbx\n"
"    movq 96(%rdi), %rdx\n"
"    movq 104(%rdi), %rax\n"
"    movq 112(%rdi), %rcx\n"
"    movq 120(%rdi), %rsp\n"
"    movq 64(%rdi), %rdi\n"
"    jmpq *proc_jump_rip(%rip)\n"
"    .popsection\n");

static void setup(void) {
    if (ready) return;
    ready = 1;
    alt_flags = SS_DISABLE;
    __asm__ volatile("fxsave64 %0" : "=m"(fpbuf));
    mxcsr_mask = *(u32 *)(fpbuf + 28);
    if (!mxcsr_mask) mxcsr_mask = 0xFFBF;
}

/* --- ending the program --------------------------------------------------------------------- */
__attribute__((noreturn)) static void killed(int sig) {
    libos_end(DONE_KILLED(sig));
}
__attribute__((noreturn)) static void fault(u32 code) {
    stdio_flush();
    for (;;) outl(PORT_FAULT, code);
}

/* --- time ----------------------------------------------------------------------------------- */
struct timespec { s64 sec, nsec; };
#define NS 1000000000UL
static u64 mono_ns(void) { return now_ns() - ctl()->boot_realtime_ns; }

/* A user timespec as nanoseconds (saturating: a deadline centuries away is "never"). */
static s64 read_timespec(u64 p, u64 *ns) {
    if (!user_ok(p, sizeof(struct timespec))) return -EFAULT;
    struct timespec t = *(struct timespec *)p;
    if (t.sec < 0 || t.nsec < 0 || (u64)t.nsec >= NS) return -EINVAL;
    *ns = (u64)t.sec > (~0UL - (u64)t.nsec) / NS ? ~0UL : (u64)t.sec * NS + (u64)t.nsec;
    return 0;
}
static u64 add_sat(u64 a, u64 b) { return a + b < a ? ~0UL : a + b; }
/* Busy-wait until `deadline` (CPL3 cannot halt, and the vCPU has nothing else to run; the VMM
 * still pauses it for its checkpoints meanwhile); 1 if a signal from outside interrupted the
 * wait first. */
static int wait_until(u64 deadline) {
    while (now_ns() < deadline) {
        if (proc_ext_interrupts()) return 1;
        __asm__ volatile("pause");
    }
    return 0;
}

/* --- signal state --------------------------------------------------------------------------- */
static u64 pending_set(void) {
    u64 s = 0;
    for (u32 i = 0; i < queued; i++) s |= BIT(queue[i].sig);
    return s;
}
static int default_ignored(int sig) {
    return sig == SIGCHLD || sig == SIGCONT || sig == SIGURG || sig == SIGWINCH;
}
static int default_stops(int sig) { return sig >= SIGSTOP && sig <= SIGTTOU; }
static int ignored(int sig) {
    u64 h = actions[sig].handler;
    return h == SIG_IGN || (h == SIG_DFL && default_ignored(sig));
}
static void dequeue(int sig, s32 *code) {
    for (u32 i = 0; i < queued; i++) {
        if (queue[i].sig != sig) continue;
        if (code) *code = queue[i].code;
        for (u32 j = i + 1; j < queued; j++) queue[j - 1] = queue[j];
        queued--;
        return;
    }
}
static void discard_all(int sig) {
    while (pending_set() & BIT(sig)) dequeue(sig, 0);
}

/* Generate a signal for ourselves (Linux's send_signal for a lone process). */
static s64 send_self(int sig, s32 code) {
    if (sig == 0) return 0;
    if (ignored(sig) && !(blocked & BIT(sig))) return 0;     /* dropped at once, as Linux does */
    if (sig < SIGRTMIN) {
        if (pending_set() & BIT(sig)) return 0;              /* standard signals do not queue */
    } else {
        u32 rt = 0;
        for (u32 i = 0; i < queued; i++) rt += queue[i].sig >= SIGRTMIN;
        if (rt >= RT_QUEUE_MAX || queued >= QUEUE_MAX) return -EAGAIN;
    }
    queue[queued].sig = sig;
    queue[queued].code = code;
    queued++;
    return 0;
}

static int next_deliverable(void) {
    u64 d = pending_set() & ~blocked;
    if (!d) return 0;
    if (d & SYNCHRONOUS) d &= SYNCHRONOUS;
    return __builtin_ctzl(d) + 1;
}

/* Act on every pending unblocked signal that needs no handler frame: discard the ignored, end
 * the program for a fatal one. Returns the first that has a handler (still queued), or 0. */
static int settle(void) {
    for (;;) {
        int sig = next_deliverable();
        if (!sig) return 0;
        u64 h = actions[sig].handler;
        if (h == SIG_IGN || (h == SIG_DFL && default_ignored(sig))) { dequeue(sig, 0); continue; }
        if (h != SIG_DFL) return sig;
        if (default_stops(sig)) fault(FAULT_STOPPED);
        killed(sig);
    }
}

/* --- signals from outside ------------------------------------------------------------------- */
static inline struct ext_signals *ext(void) { return (struct ext_signals *)EXT_SIGNALS_GPA; }
static int ext_taken;   /* signals from outside were queued since the last syscall's exit */

static void take_external(void) {
    u64 p = ext()->pending;
    if (!p) return;
    ext()->pending = 0;
    for (int sig = 1; sig <= NSIG; sig++)
        if (p & BIT(sig)) send_self(sig, SI_USER);
    ext_taken = 1;
}

int proc_ext_interrupts(void) {
    if (!ext()->pending) return 0;
    setup();
    take_external();
    return next_deliverable() != 0;
}

/* A wait only a signal can end: one from outside, if the VMM forwards them (else nothing ever
 * will: stop with `fault_code`). Waits in the VMM a slice at a time, so it does not spin. */
static void wait_outside(u32 fault_code) {
    if (!ext()->forwarding) fault(fault_code);
    while (!proc_ext_interrupts()) outl(PORT_SIGNAL_WAIT, 0);
}

/* After a call that may have made a signal deliverable: if a handler must run, return to the
 * stub instead of the program. */
static s64 after(s64 r, u64 *rip) {
    if (settle()) {
        proc_resume_rip = *rip;
        *rip = (u64)proc_signal_stub;
    }
    return r;
}

/* A read of stdin a signal from outside cut short is restarted after the handler when the
 * handler has SA_RESTART, as Linux restarts a read of a terminal or a pipe: the handler returns
 * to the `syscall` instruction (2 bytes before the return address: a rewritten site keeps it
 * after its jump) with RAX = the call's number again, every other register as the call found
 * it. Sleeps, pause, sigsuspend and sigtimedwait are never restarted, on Linux either. */
static s64 after_interrupted(s64 r, u64 *rip, u64 nr) {
    int sig = settle();
    if (!sig) return r;
    proc_resume_rip = *rip;
    *rip = (u64)proc_signal_stub;
    u64 at = proc_resume_rip - 2;
    if (r == -EINTR && (nr == 0 || nr == 19) && (actions[sig].flags & SA_RESTART) &&
        user_ok(at, 2) && *(const u16 *)at == 0x050f) {
        proc_resume_rip = at;
        return (s64)nr;
    }
    return r;
}

/* --- handler frames ------------------------------------------------------------------------- */
static int on_altstack(u64 sp) {
    if (alt_flags & SS_AUTODISARM) return 0;
    return alt_size && sp > alt_sp && sp - alt_sp <= alt_size;
}
static s32 altstack_flags(u64 sp) {
    if (!alt_size) return SS_DISABLE;
    return on_altstack(sp) ? SS_ONSTACK : 0;
}

static void fpu_init(void) {
    u32 m = 0x1F80;
    __asm__ volatile("fninit\n\tldmxcsr %0" :: "m"(m));
}

static u16 selector_cs(void) { u16 v; __asm__("movw %%cs, %0" : "=r"(v)); return v; }
static u16 selector_ss(void) { u16 v; __asm__("movw %%ss, %0" : "=r"(v)); return v; }

/* Write the frame for `sig` below c's stack (or on the alternate stack) and make c the
 * handler's entry state, as Linux's setup_rt_frame does. A frame that cannot be written (or a
 * handler without a restorer, which x86-64 Linux refuses too) ends the program with SIGSEGV. */
static void push_frame(int sig, struct sigctx *c, u64 mask) {
    struct ksigaction *ka = &actions[sig];
    s32 code = SI_USER;
    dequeue(sig, &code);
    if (!(ka->flags & SA_RESTORER)) killed(SIGSEGV);
    int was_on_alt = on_altstack(c->rsp);
    u64 sp = c->rsp - 128;                                /* the red zone */
    if ((ka->flags & SA_ONSTACK) && altstack_flags(sp) == 0) sp = alt_sp + alt_size;
    u64 fp = (sp - 512) & ~63UL;                          /* the FPU state (fxsave64) */
    sp = fp - sizeof(struct rt_sigframe);
    sp = ((sp + 8) & ~15UL) - 8;                          /* as if the handler was called */
    if (was_on_alt && !on_altstack(sp)) killed(SIGSEGV);  /* it would overflow the alt stack */
    if (sp > fp || !user_ok(sp, fp + 512 - sp)) killed(SIGSEGV);

    __asm__ volatile("fxsave64 %0" : "=m"(*(u8 (*)[512])fp));
    lmemset((u8 *)fp + 464, 0, 48);                       /* no xstate extension */
    struct rt_sigframe *f = (struct rt_sigframe *)sp;
    lmemset(f, 0, sizeof *f);
    f->pretcode = ka->restorer;
    f->uc.flags = UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS;
    f->uc.stack.sp = alt_sp;
    f->uc.stack.flags = (s32)alt_flags;
    f->uc.stack.size = alt_size;
    f->uc.regs = *c;
    f->uc.cs = selector_cs();
    f->uc.ss = selector_ss();
    f->uc.oldmask = mask;
    f->uc.fpstate = fp;
    f->uc.sigmask = mask;
    f->info.signo = sig;
    f->info.code = code;
    f->info.pid = (s32)ctl()->pid;
    f->info.uid = 0;
    if (alt_flags & SS_AUTODISARM) { alt_sp = 0; alt_size = 0; alt_flags = SS_DISABLE; }

    c->rdi = (u64)sig;
    c->rsi = (u64)&f->info;
    c->rdx = (u64)&f->uc;
    c->rax = 0;
    c->rip = ka->handler;
    c->rsp = sp;
    c->eflags &= ~FLAGS_CLEARED_FOR_HANDLER;
    blocked |= ka->mask | ((ka->flags & SA_NODEFER) ? 0 : BIT(sig));
    blocked &= ~UNBLOCKABLE;
    if (ka->flags & SA_RESETHAND) ka->handler = SIG_DFL;
    fpu_init();                                            /* a handler starts clean */
}

/* Deliver everything deliverable on top of context c, then run it. */
__attribute__((noreturn)) static void deliver_and_jump(struct sigctx *c, u64 frame_mask) {
    int sig;
    while ((sig = settle())) {
        push_frame(sig, c, frame_mask);
        frame_mask = blocked;
    }
    proc_ctx_jump(c);
}

void proc_signal_entry(void) {
    proc_ctx.rip = proc_resume_rip;
    proc_ctx.rcx = proc_resume_rip;   /* what `syscall` leaves in RCX: the return address */
    u64 mask = have_saved_mask ? saved_mask : blocked;
    have_saved_mask = 0;
    deliver_and_jump(&proc_ctx, mask);
}

/* The VMM paused the program in its own code with a signal from outside for it: deliver on
 * top of the registers it saved, as after an interrupt (an ignored or blocked one: back to
 * where the program was, every register as it was). */
void proc_async_entry(void) {
    setup();
    lmemcpy(&proc_ctx, ext()->ctx, sizeof proc_ctx);
    take_external();
    ext_taken = 0;
    deliver_and_jump(&proc_ctx, blocked);
}

s64 proc_syscall_exit(s64 r, u64 *rip, u64 nr) {
    if (ext()->pending) { setup(); take_external(); }
    if (!ext_taken) return r;
    ext_taken = 0;
    if (*rip == (u64)proc_signal_stub) return r;   /* already bound for a handler */
    return after_interrupted(r, rip, nr);
}

/* --- the calls ------------------------------------------------------------------------------ */
static s64 sys_rt_sigaction(s64 sig, u64 act, u64 oact, u64 size) {
    if (size != 8) return -EINVAL;
    struct ksigaction n;
    if (act) {
        if (!user_ok(act, sizeof n)) return -EFAULT;
        n = *(struct ksigaction *)act;
    }
    if (sig < 1 || sig > NSIG || (act && (sig == SIGKILL || sig == SIGSTOP))) return -EINVAL;
    struct ksigaction old = actions[sig];
    if (act) {
        n.mask &= ~UNBLOCKABLE;
        n.flags &= SA_KNOWN;
        actions[sig] = n;
        if (ignored((int)sig)) discard_all((int)sig);    /* POSIX: even if blocked */
    }
    if (oact) {
        if (!user_ok(oact, sizeof old)) return -EFAULT;
        *(struct ksigaction *)oact = old;
    }
    return 0;
}

static s64 sys_rt_sigprocmask(u64 how, u64 set, u64 oset, u64 size) {
    if (size != 8) return -EINVAL;
    u64 old = blocked;
    if (set) {
        if (!user_ok(set, 8)) return -EFAULT;
        u64 n = *(u64 *)set & ~UNBLOCKABLE;
        if ((u32)how == 0) blocked |= n;
        else if ((u32)how == 1) blocked &= ~n;
        else if ((u32)how == 2) blocked = n;
        else return -EINVAL;
    }
    if (oset) {
        if (!user_ok(oset, 8)) return -EFAULT;
        *(u64 *)oset = old;
    }
    return 0;
}

static s64 sys_rt_sigpending(u64 set, u64 size) {
    if (size > 8) return -EINVAL;
    if (!user_ok(set, size)) return -EFAULT;
    u64 p = pending_set() & blocked;
    lmemcpy((void *)set, &p, size);
    return 0;
}

static s64 set_altstack(u64 uss, u64 uoss, u64 sp) {
    struct kstack n, old;
    if (uss) {
        if (!user_ok(uss, sizeof n)) return -EFAULT;
        n = *(struct kstack *)uss;
    }
    old.sp = alt_sp;
    old.size = alt_size;
    old.flags = altstack_flags(sp) | (s32)(alt_flags & SS_AUTODISARM);
    old.pad = 0;
    if (uss) {
        u32 flags = (u32)n.flags, mode = flags & ~SS_AUTODISARM;
        if (on_altstack(sp)) return -EPERM;
        if (mode != SS_DISABLE && mode != SS_ONSTACK && mode != 0) return -EINVAL;
        if (mode == SS_DISABLE) { n.sp = 0; n.size = 0; }
        else if (n.size < MINSIGSTKSZ) return -ENOMEM;
        alt_sp = n.sp;
        alt_size = n.size;
        alt_flags = flags;
    }
    if (uoss) {
        if (!user_ok(uoss, sizeof old)) return -EFAULT;
        *(struct kstack *)uoss = old;
    }
    return 0;
}

/* rt_sigreturn: the frame's ucontext is at the program's RSP (the handler's `ret` popped the
 * restorer's address). A frame that cannot be right ends the program with SIGSEGV, as on Linux. */
__attribute__((noreturn)) static void sys_rt_sigreturn(const u64 *args) {
    u64 ucp = libos_user_rsp;
    if (!user_ok(ucp, sizeof(struct kucontext))) killed(SIGSEGV);
    struct kucontext *uc = (struct kucontext *)ucp;
    struct sigctx *c = &proc_ctx;
    u64 cur;
    __asm__ volatile("pushfq\n\tpopq %0" : "=r"(cur));
    *c = uc->regs;
    c->eflags = (cur & ~FLAGS_FROM_FRAME) | (uc->regs.eflags & FLAGS_FROM_FRAME);
    u64 fp = uc->fpstate;
    if (fp) {
        if (!user_ok(fp, 512)) killed(SIGSEGV);
        lmemcpy(fpbuf, (void *)fp, 512);
        if (*(u32 *)(fpbuf + 24) & ~mxcsr_mask) killed(SIGSEGV);   /* fxrstor would fault */
        __asm__ volatile("fxrstor64 %0" :: "m"(fpbuf));
    } else {
        fpu_init();
    }
    blocked = uc->sigmask & ~UNBLOCKABLE;
    set_altstack(ucp + __builtin_offsetof(struct kucontext, stack), 0, c->rsp);  /* errors: kept */
    if (ctl()->strace) trace(15, args, (s64)c->rax);
    deliver_and_jump(c, blocked);
}

/* pause / rt_sigsuspend: wait with `mask` blocked until a handler runs. Only a signal already
 * pending can come; if none is deliverable, nothing ever will be. */
static s64 suspend(u64 mask, u64 *rip) {
    u64 old = blocked;
    blocked = mask & ~UNBLOCKABLE;
    while (!settle()) wait_outside(FAULT_SIGNAL_WAIT);
    saved_mask = old;                 /* the handler's frame restores the mask it replaced */
    have_saved_mask = 1;
    proc_resume_rip = *rip;
    *rip = (u64)proc_signal_stub;
    return -EINTR;
}

/* --- poll, ppoll, select, pselect6 ----------------------------------------------------------- */
struct kpollfd { s32 fd; u16 events, revents; };
/* select's sets as poll events (POLLIN|POLLRDNORM, POLLOUT|POLLWRNORM, POLLPRI), and the
 * revents that make a descriptor readable (POLLIN, POLLHUP, POLLERR, POLLRDNORM) or writable
 * (POLLOUT, POLLERR, POLLWRNORM), as Linux's select counts them. */
static const u16 select_events[3] = {0x41, 0x104, 0x2}, select_ready[3] = {0x59, 0x10c, 0};
#define POLL_MAX 1024                       /* descriptors: as many as the file system has */
static struct kpollfd select_fds[POLL_MAX]; /* select's sets as poll entries */
#define NO_DEADLINE (~0UL)

/* Wait until one of `p` is ready (its count), `deadline` passes (0), or a signal from outside
 * must be taken (-EINTR). Only stdin can become ready while a lone program waits (the VMM
 * brings its input), so with no stdin to wait on the wait is a plain sleep, and without a
 * timeout it could only end by a signal: where the VMM forwards none, the program ends with
 * a report instead of hanging for ever. */
static s64 poll_core(struct kpollfd *p, u64 n, u64 deadline) {
    int filled = 0;
    for (;;) {
        s64 count = 0;
        int may_change = 0;
        for (u64 i = 0; i < n; i++) {
            p[i].revents = p[i].fd < 0 ? 0 : (u16)fs_poll_one(p[i].fd, p[i].events,
                                                               &may_change);
            if (p[i].revents) count++;
        }
        if (count) return count;
        u64 now = now_ns();
        if (!may_change) {
            if (deadline == NO_DEADLINE) { wait_outside(FAULT_POLL_WAIT); return -EINTR; }
            return wait_until(deadline) ? -EINTR : 0;
        }
        if (proc_ext_interrupts()) return -EINTR;
        if (now >= deadline && filled) return 0;
        u64 us = deadline == NO_DEADLINE ? 0 : now >= deadline ? 1 : (deadline - now) / 1000 + 1;
        stdin_fill(us > 10000 ? 0 : (u32)us);   /* (1 us: input already there counts) */
        filled = 1;
    }
}

/* The mask a ppoll or pselect6 waits with: on -EINTR the handler's frame restores the old one
 * (as sigsuspend's), else it is restored here. Returns -errno or 0; *had says whether one was
 * set. */
static s64 wait_mask(u64 set, u64 size, u64 *old, int *had) {
    *had = 0;
    if (!set) return 0;
    if (size != 8) return -EINVAL;
    if (!user_ok(set, 8)) return -EFAULT;
    *old = blocked;
    blocked = *(u64 *)set & ~UNBLOCKABLE;
    *had = 1;
    return 0;
}
static s64 unmask(s64 r, u64 old, int had) {
    if (!had) return r;
    if (r == -EINTR) { saved_mask = old; have_saved_mask = 1; }
    else blocked = old;
    return r;
}

static s64 sys_ppoll(u64 fds, u64 n, u64 deadline, u64 set, u64 size) {
    if (n > POLL_MAX) return -EINVAL;
    if (n && !user_ok(fds, n * sizeof(struct kpollfd))) return -EFAULT;
    u64 old = 0;
    int had;
    s64 e = wait_mask(set, size, &old, &had);
    if (e) return e;
    return unmask(poll_core((struct kpollfd *)fds, n, deadline), old, had);
}
static u64 deadline_ms(s64 ms) {
    return ms < 0 ? NO_DEADLINE : add_sat(now_ns(), (u64)ms * 1000000);
}
/* ppoll and pselect6 write back into their timespec how much of it is left, as Linux does
 * (glibc's select, made with pselect6, reports it from there). */
static s64 time_left(s64 r, u64 ts, u64 deadline) {
    if (ts && (r >= 0 || r == -EINTR)) {
        u64 now = now_ns(), left = deadline > now ? deadline - now : 0;
        *(s64 *)ts = (s64)(left / NS);
        *(s64 *)(ts + 8) = (s64)(left % NS);
    }
    return r;
}
static s64 deadline_ts(u64 ts, u64 *deadline) {
    if (!ts) { *deadline = NO_DEADLINE; return 0; }
    u64 ns;
    s64 e = read_timespec(ts, &ns);
    if (e) return e;
    *deadline = add_sat(now_ns(), ns);
    return 0;
}

/* select's three sets (u64 words of `nfds` bits) as poll entries, and back: POLLIN, POLLHUP
 * and POLLERR make a descriptor readable, POLLOUT and POLLERR writable, as on Linux; nothing
 * is ever exceptional. A set descriptor that is not open: EBADF. */
static s64 sys_pselect(s64 nfds, u64 r, u64 w, u64 x, u64 deadline, u64 set, u64 size) {
    if (nfds < 0 || nfds > POLL_MAX) return -EINVAL;
    u64 bytes = ((u64)nfds + 63) / 64 * 8;
    u64 *sets[3] = {(u64 *)r, (u64 *)w, (u64 *)x};
    for (int k = 0; k < 3; k++)
        if (sets[k] && !user_ok((u64)sets[k], bytes)) return -EFAULT;
    u64 n = 0;
    for (s64 fd = 0; fd < nfds; fd++) {
        u16 ev = 0;
        for (int k = 0; k < 3; k++)
            if (sets[k] && (sets[k][fd / 64] >> (fd % 64) & 1)) ev |= select_events[k];
        if (!ev) continue;
        int dummy = 0;
        if (fs_poll_one(fd, 0, &dummy) & 0x20) return -EBADF;
        select_fds[n].fd = (s32)fd;
        select_fds[n].events = ev;
        n++;
    }
    u64 old = 0;
    int had;
    s64 e = wait_mask(set, size, &old, &had);
    if (e) return e;
    s64 got = unmask(poll_core(select_fds, n, deadline), old, had);
    if (got < 0) return got;
    for (int k = 0; k < 3; k++)
        if (sets[k]) lmemset(sets[k], 0, bytes);
    s64 bits = 0;
    for (u64 i = 0; i < n; i++) {
        s64 fd = select_fds[i].fd;
        u16 re = select_fds[i].revents, ev = select_fds[i].events;
        for (int k = 0; k < 3; k++)
            if (sets[k] && (ev & select_events[k]) && (re & select_ready[k])) {
                sets[k][fd / 64] |= 1UL << (fd % 64);
                bits++;
            }
    }
    return bits;
}
/* select(2): its timeval says how much of the timeout is left afterwards, as Linux's does. */
static s64 sys_select(s64 nfds, u64 r, u64 w, u64 x, u64 tv) {
    u64 deadline = NO_DEADLINE;
    if (tv) {
        if (!user_ok(tv, 16)) return -EFAULT;
        s64 sec = *(s64 *)tv, usec = *(s64 *)(tv + 8);
        if (sec < 0 || usec < 0 || usec >= 1000000) return -EINVAL;
        deadline = add_sat(now_ns(), (u64)sec * NS + (u64)usec * 1000);
    }
    s64 got = sys_pselect(nfds, r, w, x, deadline, 0, 0);
    if (tv && got >= 0) {
        u64 now = now_ns(), left = deadline > now ? deadline - now : 0;
        *(s64 *)tv = (s64)(left / NS);
        *(s64 *)(tv + 8) = (s64)(left % NS / 1000);
    }
    return got;
}

static s64 sys_rt_sigtimedwait(u64 set, u64 info, u64 timeout, u64 size) {
    if (size != 8) return -EINVAL;
    if (!user_ok(set, 8)) return -EFAULT;
    u64 want = *(u64 *)set & ~UNBLOCKABLE, ns = 0;
    if (timeout) { s64 e = read_timespec(timeout, &ns); if (e) return e; }
    u64 have = pending_set() & want;
    if (have) {
        int sig = __builtin_ctzl(have) + 1;
        s32 code = SI_USER;
        dequeue(sig, &code);
        if (info) {
            if (!user_ok(info, sizeof(struct siginfo_kill))) return -EFAULT;
            struct siginfo_kill *i = (struct siginfo_kill *)info;
            lmemset(i, 0, sizeof *i);
            i->signo = sig;
            i->code = code;
            i->pid = (s32)ctl()->pid;
        }
        return sig;
    }
    if (!timeout) {
        if (!ext()->forwarding) fault(FAULT_SIGNAL_WAIT);
        for (;;) {                                 /* only one from outside can come */
            int deliverable = proc_ext_interrupts();
            if (pending_set() & want) return sys_rt_sigtimedwait(set, info, 0, size);
            if (deliverable) return -EINTR;
            outl(PORT_SIGNAL_WAIT, 0);
        }
    }
    if (wait_until(add_sat(now_ns(), ns))) {   /* one from outside: maybe one of `want` */
        if (pending_set() & want) return sys_rt_sigtimedwait(set, info, 0, size);
        return -EINTR;
    }
    return -EAGAIN;
}

static s64 sys_kill(s64 pid_arg, s64 sig_arg) {
    s32 pid = (s32)pid_arg, sig = (s32)sig_arg, me = (s32)ctl()->pid;
    /* kill(0): our process group; kill(-1): every other process (none); kill(-pgid). */
    int us = (pid > 0 && pid == me) || pid == 0 || (pid < -1 && pid != (s32)0x80000000 &&
                                                    -pid == me);
    if (!us) return -ESRCH;
    if (sig < 0 || sig > NSIG) return -EINVAL;
    return send_self(sig, SI_USER);
}

static s64 sys_tgkill(s64 tgid_arg, s64 tid_arg, s64 sig_arg, int with_tgid) {
    s32 tgid = (s32)tgid_arg, tid = (s32)tid_arg, sig = (s32)sig_arg, me = (s32)ctl()->pid;
    if (tid <= 0 || (with_tgid && tgid <= 0)) return -EINVAL;
    if (tid != me || (with_tgid && tgid != me)) return -ESRCH;
    if (sig < 0 || sig > NSIG) return -EINVAL;
    return send_self(sig, SI_TKILL);
}

/* --- futex ---------------------------------------------------------------------------------- */
#define FUTEX_WAIT 0
#define FUTEX_WAKE 1
#define FUTEX_REQUEUE 3
#define FUTEX_CMP_REQUEUE 4
#define FUTEX_WAIT_BITSET 9
#define FUTEX_WAKE_BITSET 10
#define FUTEX_PRIVATE_FLAG 128
#define FUTEX_CLOCK_REALTIME 256
#define USER_TOP (1UL << 47)

/* The futex word's address: aligned, and (shared futexes, or a value to read) mapped. */
static s64 futex_addr(u64 uaddr, int read) {
    if (uaddr & 3) return -EINVAL;
    if (read ? !user_ok(uaddr, 4) : uaddr > USER_TOP - 4) return -EFAULT;
    return 0;
}

/* One thread: nobody else waits, so a wake wakes no one, and a wait that matches can only end
 * by its timeout. */
static s64 sys_futex(u64 uaddr, u64 op, u64 val, u64 utime, u64 uaddr2, u64 val3) {
    op = (u32)op;
    u64 cmd = op & ~(u64)(FUTEX_PRIVATE_FLAG | FUTEX_CLOCK_REALTIME);
    int shared = !(op & FUTEX_PRIVATE_FLAG);
    u64 deadline = 0, ns;
    int timed = 0;
    s64 e;
    if ((op & FUTEX_CLOCK_REALTIME) && cmd != FUTEX_WAIT && cmd != FUTEX_WAIT_BITSET)
        return -ENOSYS;
    if ((cmd == FUTEX_WAIT || cmd == FUTEX_WAIT_BITSET) && utime) {
        if ((e = read_timespec(utime, &ns))) return e;
        timed = 1;
        if (cmd == FUTEX_WAIT) deadline = add_sat(now_ns(), ns);        /* relative */
        else if (op & FUTEX_CLOCK_REALTIME) deadline = ns;              /* absolute */
        else deadline = add_sat(ns, ctl()->boot_realtime_ns);           /* CLOCK_MONOTONIC */
    }
    switch (cmd) {
    case FUTEX_WAIT:
    case FUTEX_WAIT_BITSET:
        if (cmd == FUTEX_WAIT_BITSET && (u32)val3 == 0) return -EINVAL;
        if ((e = futex_addr(uaddr, 1))) return e;
        if (*(volatile u32 *)uaddr != (u32)val) return -EAGAIN;
        if (!timed) { wait_outside(FAULT_FUTEX_WAIT); return -EINTR; }
        return wait_until(deadline) ? -EINTR : -ETIMEDOUT;
    case FUTEX_WAKE:
    case FUTEX_WAKE_BITSET:
        if (cmd == FUTEX_WAKE_BITSET && (u32)val3 == 0) return -EINVAL;
        if ((e = futex_addr(uaddr, shared))) return e;
        return 0;
    case FUTEX_REQUEUE:
    case FUTEX_CMP_REQUEUE:
        if ((s32)val < 0 || (s32)utime < 0) return -EINVAL;
        if ((e = futex_addr(uaddr, shared || cmd == FUTEX_CMP_REQUEUE))) return e;
        if ((e = futex_addr(uaddr2, shared))) return e;
        if (cmd == FUTEX_CMP_REQUEUE && *(volatile u32 *)uaddr != (u32)val3) return -EAGAIN;
        return 0;
    default:
        return -ENOSYS;              /* WAKE_OP, the PI operations: not served */
    }
}

/* --- sleeps, scheduling, accounting, process groups ----------------------------------------- */
/* A sleep a signal from outside cut short: EINTR, with the time left in `rem` if given. */
static s64 interrupted_sleep(u64 deadline, u64 rem) {
    if (rem && user_ok(rem, sizeof(struct timespec))) {
        u64 now = now_ns(), left = deadline > now ? deadline - now : 0;
        struct timespec *t = (struct timespec *)rem;
        t->sec = (s64)(left / NS);
        t->nsec = (s64)(left % NS);
    }
    return -EINTR;
}

static s64 sys_nanosleep(u64 req, u64 rem) {
    u64 ns;
    s64 e = read_timespec(req, &ns);
    if (e) return e;
    u64 deadline = add_sat(now_ns(), ns);
    if (wait_until(deadline)) return interrupted_sleep(deadline, rem);
    return 0;
}

static s64 sys_clock_nanosleep(s64 clk, u64 flags, u64 req, u64 rem) {
    int realtime;
    switch (clk) {
    case 0: case 11: realtime = 1; break;              /* REALTIME, TAI */
    case 1: case 7: case 2: realtime = 0; break;       /* MONOTONIC, BOOTTIME, PROCESS_CPUTIME */
    case 4: case 5: case 6: return -EOPNOTSUPP;        /* clocks Linux cannot sleep on */
    default: return -EINVAL;
    }
    u64 ns;
    s64 e = read_timespec(req, &ns);
    if (e) return e;
    u64 deadline = !(flags & 1) ? add_sat(now_ns(), ns)            /* TIMER_ABSTIME */
                   : realtime ? ns : add_sat(ns, ctl()->boot_realtime_ns);
    if (wait_until(deadline)) return interrupted_sleep(deadline, (flags & 1) ? 0 : rem);
    return 0;
}

static s64 sys_sched_getaffinity(s64 pid, u64 len, u64 mask) {
    if (len * 8 < 1 || (len & 7)) return -EINVAL;
    if ((s32)pid != 0 && (s32)pid != (s32)ctl()->pid) return -ESRCH;
    if (!user_ok(mask, 8)) return -EFAULT;
    *(u64 *)mask = 1;                                  /* one CPU: the one vCPU */
    return 8;
}

static s64 sys_getcpu(u64 cpu, u64 node) {
    if (cpu) { if (!user_ok(cpu, 4)) return -EFAULT; *(u32 *)cpu = 0; }
    if (node) { if (!user_ok(node, 4)) return -EFAULT; *(u32 *)node = 0; }
    return 0;
}

/* The program is the only thing the vCPU runs: its CPU time is its time since it started. */
static s64 sys_getrusage(s64 who, u64 ru) {
    if ((s32)who != 0 && (s32)who != -1 && (s32)who != 1) return -EINVAL;
    if (!user_ok(ru, 144)) return -EFAULT;
    s64 *r = (s64 *)ru;
    lmemset(r, 0, 144);
    if ((s32)who != -1) {                              /* RUSAGE_CHILDREN: none */
        u64 t = mono_ns();
        r[0] = (s64)(t / NS);
        r[1] = (s64)(t % NS / 1000);
    }
    return 0;
}

static s64 sys_times(u64 buf) {
    u64 ticks = mono_ns() / (NS / 100);                /* USER_HZ */
    if (buf) {
        if (!user_ok(buf, 32)) return -EFAULT;
        u64 *t = (u64 *)buf;
        t[0] = ticks; t[1] = 0; t[2] = 0; t[3] = 0;
    }
    return (s64)ticks;
}

/* Our process group and session are our pid (a group leader, as a shell's job is). */
static s64 same_process(s64 pid) {
    s32 p = (s32)pid;
    return p == 0 || p == (s32)ctl()->pid ? (s64)ctl()->pid : -ESRCH;
}

static s64 sys_setpgid(s64 pid, s64 pgid) {
    s32 me = (s32)ctl()->pid, p = (s32)pid ? (s32)pid : me, g = (s32)pgid ? (s32)pgid : p;
    if (g < 0) return -EINVAL;
    if (p != me) return -ESRCH;
    return g == me ? 0 : -EPERM;       /* no other group in our session to join */
}

s64 proc_syscall(u64 nr, u64 a, u64 b, u64 c, u64 d, u64 e, u64 g, u64 *rip, int *handled) {
    setup();
    *handled = 1;
    switch (nr) {
    case 13: return sys_rt_sigaction((s32)a, b, c, d);        /* int arguments: 32 bits */
    case 14: return after(sys_rt_sigprocmask(a, b, c, d), rip);
    case 15: { u64 args[6] = {a, b, c, d, e, g}; sys_rt_sigreturn(args); }
    case 24: return 0;                                  /* sched_yield: no one else to run */
    case 34: return suspend(blocked, rip);              /* pause */
    case 35: return sys_nanosleep(a, b);
    case 7: return sys_ppoll(a, b, deadline_ms((s32)c), 0, 0);               /* poll */
    case 271: {                                                               /* ppoll */
        u64 dl;
        s64 e2 = deadline_ts(c, &dl);
        return e2 ? e2 : time_left(sys_ppoll(a, b, dl, d, e), c, dl);
    }
    case 23: return sys_select((s64)(s32)a, b, c, d, e);                     /* select */
    case 270: {                                                               /* pselect6 */
        u64 dl, set = 0, size = 0;
        s64 e2 = deadline_ts(e, &dl);
        if (e2) return e2;
        if (g) {                                   /* {const sigset_t *ss; size_t ss_len} */
            if (!user_ok(g, 16)) return -EFAULT;
            set = *(u64 *)g;
            size = *(u64 *)(g + 8);
        }
        return time_left(sys_pselect((s64)(s32)a, b, c, d, dl, set, size), e, dl);
    }
    case 62: return after(sys_kill((s64)a, (s64)b), rip);
    case 98: return sys_getrusage((s64)a, b);
    case 100: return sys_times(a);
    case 109: return sys_setpgid((s64)a, (s64)b);
    case 111: return (s64)ctl()->pid;                   /* getpgrp */
    case 112: return -EPERM;                            /* setsid: a group leader cannot */
    case 121: case 124: return same_process((s64)a);    /* getpgid, getsid */
    case 127: return sys_rt_sigpending(a, b);
    case 128: return sys_rt_sigtimedwait(a, b, c, d);
    case 130:                                           /* rt_sigsuspend */
        if (b != 8) return -EINVAL;
        if (!user_ok(a, 8)) return -EFAULT;
        return suspend(*(u64 *)a, rip);
    case 131: return set_altstack(a, b, libos_user_rsp);
    case 200: return after(sys_tgkill(0, (s64)a, (s64)b, 0), rip);
    case 202: return sys_futex(a, b, c, d, e, g);
    case 204: return sys_sched_getaffinity((s64)a, (u32)b, c);
    case 230: return sys_clock_nanosleep((s32)a, (u32)b, c, d);
    case 234: return after(sys_tgkill((s64)a, (s64)b, (s64)c, 1), rip);
    case 309: return sys_getcpu(a, b);
    default:
        *handled = 0;
        return 0;
    }
}
