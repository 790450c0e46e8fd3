/* Syscall sites the library OS may rewrite, and sites it must not, run natively and in the
 * guest (test_exec_rewrite.py): the output is the same both ways except the last line, the
 * first byte of each site as the program sees its own code after running it (b8: as linked;
 * e9: rewritten into a jump to a trampoline).
 *   site_getpid      mov $39,%eax; syscall         rewritable
 *   jump_to_syscall  a jump straight to site_getpid's syscall instruction, with any number
 *   r8d_site         41 b8 27 00 00 00 0f 05       mov $39,%r8d; syscall: never rewritten
 *                                                  (returns r8: still 39 if the mov ran)
 *   disp8_site       c7 44 24 b8 27 00 00 00 0f 05 movl $39,-0x48(%rsp); syscall, with eax 39:
 *                                                  b8 is a displacement, never rewritten
 *                                                  (returns what the movl stored: 39)        */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

long site_getpid(void);
long jump_to_syscall(long nr);
long r8d_site(long nr);
long disp8_site(void);
extern const unsigned char site_getpid_syscall[];

__asm__(".text\n"
        ".globl site_getpid, site_getpid_syscall, jump_to_syscall, r8d_site, disp8_site\n"
        "site_getpid:\n"
        "    mov $39, %eax\n"
        "site_getpid_syscall:\n"
        "    syscall\n"
        "    ret\n"
        "jump_to_syscall:\n"
        "    mov %rdi, %rax\n"
        "    jmp site_getpid_syscall\n"
        "r8d_site:\n"
        "    mov %rdi, %rax\n"
        "    .byte 0x41, 0xb8, 0x27, 0, 0, 0\n"      /* mov $39, %r8d */
        "    syscall\n"
        "    mov %r8, %rax\n"
        "    ret\n"
        "disp8_site:\n"
        "    mov $39, %eax\n"
        "    movl $39, -0x48(%rsp)\n"                  /* in the red zone */
        "    syscall\n"
        "    movl -0x48(%rsp), %eax\n"
        "    ret\n");

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 1000;
    long pid = getpid(), bad = 0;
    /* A jump to the syscall before its site was ever rewritten, with another number. */
    printf("jump before: getppid %d\n", jump_to_syscall(110) == getppid());
    for (long i = 0; i < n; i++) bad += site_getpid() != pid;
    printf("site_getpid x%ld: %ld wrong\n", n, bad);
    printf("jump after: getppid %d getuid %d getpid %d\n", jump_to_syscall(110) == getppid(),
           jump_to_syscall(102) == getuid(), jump_to_syscall(39) == pid);
    for (long i = 0; i < n; i++) bad += r8d_site(39) != 39;
    for (long i = 0; i < n; i++) bad += r8d_site(110) != 39;
    printf("r8d_site: %ld wrong\n", bad);
    for (long i = 0; i < n; i++) bad += disp8_site() != 39;
    printf("disp8_site: %ld wrong\n", bad);
    const unsigned char *r8d = (const unsigned char *)r8d_site + 4;
    const unsigned char *d8 = (const unsigned char *)disp8_site + 8;
    printf("first bytes: site_getpid %02x (syscall %02x%02x) r8d_site %02x%02x disp8_site %02x\n",
           ((const unsigned char *)site_getpid)[0], site_getpid_syscall[0],
           site_getpid_syscall[1], r8d[-1], r8d[0], d8[0]);
    return 0;
}
