/* Entry of every guest: the VMM sets rip here, rsp to the vCPU's stack and rdi to its index. */
    .section .text.start, "ax"
    .globl _start
_start:
    call guest_main          /* guest_main(u64 vcpu_index) never returns normally */
1:  movl $0xdead, %eax
    outl %eax, $0x10         /* PORT_DONE */
    jmp 1b
