/* The library OS's syscall entry, at 0x10000 (the VMM points LSTAR here).
 *
 * On these hosts (kvm_pvm) a CPL3 `syscall` lands here still at CPL3, with RCX = the return
 * address and R11 = RFLAGS (FMASK is 0, so nothing was masked). The program's stack must not be
 * touched: the 128 bytes below its RSP (the red zone) may hold live data. So: save RSP, switch
 * to the library OS's stack, save every register Linux preserves across a syscall (all but RAX,
 * RCX and R11), call the C dispatcher with a pointer to them, restore, and return with
 * `jmp *%rcx` (`sysretq` is privileged at CPL3). On hardware KVM the same `syscall` enters CPL0,
 * where `sysretq` is right; that path is not done yet: the entry reports it and stops. */
    .section .text.start, "ax"
    .globl syscall_entry, _start
syscall_entry:
_start:
    cmpq $1000, %rax             /* the floor (bench exec): a syscall that returns at once; */
    je 3f                        /* (it alone does not keep the flags) */
    movq %rsp, libos_user_rsp
    movq $0x100000, %rsp         /* LIBOS_STACK_TOP */
    pushq %r11
    pushq %rcx
    pushq %rax
    pushq %r9
    pushq %r8
    pushq %r10
    pushq %rdx
    pushq %rsi
    pushq %rdi
    movl %cs, %eax
    testl $3, %eax
    jz 2f
    movq %rsp, %rdi
    subq $8, %rsp                /* 9 pushes: realign to 16 for the call */
    call libos_syscall           /* returns the result in RAX */
    addq $8, %rsp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %r10
    popq %r8
    popq %r9
    addq $8, %rsp                /* the saved RAX: the result replaces it */
    popq %rcx
    popq %r11
    pushq %r11
    popfq
    movq libos_user_rsp, %rsp
    jmpq *%rcx
3:  xorl %eax, %eax
    jmpq *%rcx
2:  movl $1, %eax                /* entered at CPL0: hardware KVM, not supported yet */
    outl %eax, $0x32             /* PORT_FAULT */
    hlt
    jmp 2b
