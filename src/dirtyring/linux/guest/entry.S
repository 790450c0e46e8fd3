/* The library OS's syscall entries: `syscall_entry` at 0x10000 (the VMM points LSTAR here), and
 * `syscall_fast`, where the trampolines of rewritten syscall sites jump (libos.c).
 *
 * On these hosts (kvm_pvm) a CPL3 `syscall` lands here still at CPL3, with RCX = the return
 * address and R11 = RFLAGS (FMASK is 0, so nothing was masked). The program's stack must not be
 * touched: the 128 bytes below its RSP (the red zone) may hold live data. So: save RSP, switch
 * to the library OS's stack, save every register Linux preserves across a syscall (all but RAX,
 * RCX and R11), call the C dispatcher with a pointer to them, restore, and return with
 * `jmp *%rcx` (`sysretq` is privileged at CPL3). On hardware KVM the same `syscall` enters CPL0:
 * everything is the same up to the return, which reads CS's RPL and, at CPL0, returns with
 * `sysretq` instead (RIP from RCX, RFLAGS from R11, CS/SS from STAR's user selectors: the GDT has
 * them where sysret looks, see machine/layout.py). That path cannot run on kvm_pvm, where this
 * entry always runs at CPL3; it is checked here only by the layout test (STAR and the GDT).
 *
 * Each `syscall` instruction traps on kvm_pvm (~20 us), so the trapped entry rewrites the site
 * it came from when it can (libos.c: rewrite_site) into a jump to a trampoline that sets RAX and
 * RCX as `syscall` would and jumps to `syscall_fast`, with no trap. `syscall_fast` leaves the
 * registers exactly as the trapped path does: RCX = return address, R11 = RFLAGS, the flags
 * restored; it saves the flags itself (pushfq) before any instruction that changes them. */
/* The rest of struct frame (libos.h) below R11's slot, which the caller pushed; then RDI
 * points at it and the stack is realigned to 16 for the call (9 pushes). */
    .macro save_frame
    pushq %rcx
    pushq %rax
    pushq %r9
    pushq %r8
    pushq %r10
    pushq %rdx
    pushq %rsi
    pushq %rdi
    movq %rsp, %rdi
    subq $8, %rsp
    .endm

    .section .text.start, "ax"
    .globl syscall_entry, syscall_fast, _start
syscall_entry:
_start:
    cmpq $1000, %rax             /* the floor (bench exec): a syscall that returns at once; */
    je 3f                        /* (it alone does not keep the flags) */
    movq %rsp, libos_user_rsp
    movq $0x100000, %rsp         /* LIBOS_STACK_TOP */
    pushq %r11
    save_frame                   /* struct frame, RDI pointing at it, the stack aligned */
    call libos_syscall           /* returns the result in RAX */
    jmp 1f
syscall_fast:                    /* from a trampoline: RAX = nr, RCX = return address */
    movq %rsp, libos_user_rsp    /* (mov changes no flags) */
    movq $0x100000, %rsp
    pushfq                       /* R11's slot: what `syscall` would have put in R11 */
    save_frame
    call libos_fast_syscall
1:  addq $8, %rsp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %r10
    popq %r8
    popq %r9
    addq $8, %rsp                /* the saved RAX: the result replaces it */
    popq %rcx
    popq %r11
    pushq %rax                   /* (the result, while CS is looked at) */
    movl %cs, %eax
    testl $3, %eax
    popq %rax                    /* (pop keeps the flags the test set) */
    jz 4f
    pushq %r11                   /* CPL3 (kvm_pvm): restore the flags, jump back */
    popfq
    movq libos_user_rsp, %rsp
    jmpq *%rcx
4:  movq libos_user_rsp, %rsp    /* CPL0 (hardware KVM): sysretq restores RFLAGS from R11 */
    sysretq
3:  movl %cs, %eax               /* the floor: return at once, the same two ways */
    testl $3, %eax
    movl $0, %eax                /* (mov keeps the flags) */
    jz 5f
    jmpq *%rcx
5:  sysretq
