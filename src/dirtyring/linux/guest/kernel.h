/* What the library OS's own files share (not part of the VMM contract: that is libos.h). */
#ifndef DIRTYRING_KERNEL_H
#define DIRTYRING_KERNEL_H
#include "libos.h"

#define EPERM 1
#define ENOENT 2
#define ESRCH 3
#define EINTR 4
#define EIO 5
#define EBADF 9
#define EAGAIN 11
#define ENOMEM 12
#define EFAULT 14
#define EEXIST 17
#define EXDEV 18
#define ENOTDIR 20
#define EISDIR 21
#define EINVAL 22
#define EMFILE 24
#define ENOTTY 25
#define EFBIG 27
#define ENOSPC 28
#define ESPIPE 29
#define ENAMETOOLONG 36
#define ELOOP 40
#define ENOSYS 38
#define ENOTEMPTY 39
#define EOPNOTSUPP 95
#define ETIMEDOUT 110

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

/* Nanoseconds of CLOCK_REALTIME from the TSC and the boot time the VMM wrote: one formula for
 * the library OS's clock syscalls and the vDSO (which includes this header), so they agree. */
static inline u64 now_ns(void) {
    u64 khz = ctl()->tsc_khz ? ctl()->tsc_khz : 1000000;
    u64 d = rdtsc() - ctl()->boot_tsc;
    return ctl()->boot_realtime_ns + d / khz * 1000000UL + d % khz * 1000000UL / khz;
}

void *lmemset(void *d, int c, u64 n);
void *lmemcpy(void *d, const void *s, u64 n);
int user_ok(u64 p, u64 n);
void fill_random(u8 *buf, u64 len);
s64 stdio_write(u32 fd, const u8 *buf, u64 len);
s64 stdin_read(u8 *buf, u64 len, int nonblock);
/* What stdin's ring holds now: STDIN_DATA and/or STDIN_EOF. */
#define STDIN_DATA 1
#define STDIN_EOF 2
int stdin_state(void);
/* Ask the VMM for stdin's next bytes, waiting at most `us` microseconds (0: its own slice). */
void stdin_fill(u32 us);
/* poll(2)'s revents of descriptor `fd` for `events`; *may_change set if they can change
 * while the program waits (stdin: the VMM may bring input or its end). */
u32 fs_poll_one(s64 fd, u32 events, int *may_change);
void stdio_flush(void);
void trace(u64 nr, const u64 *args, s64 ret);
/* End the program: export its files if asked, flush its output, then DONE with `done`. */
__attribute__((noreturn)) void libos_end(u32 done);

/* Signals, futexes, sleeps and the small process calls (proc.c). `rip`: where the syscall
 * returns (entry.S's saved RCX), which a signal handler's delivery redirects. */
s64 proc_syscall(u64 nr, u64 a, u64 b, u64 c, u64 d, u64 e, u64 g, u64 *rip, int *handled);
/* Every syscall's way out: takes the signals sent from outside meanwhile and, if one must be
 * acted on, routes the return as a self-sent signal's would be (call `nr`: a stdin read it cut
 * short is restarted after a SA_RESTART handler). */
s64 proc_syscall_exit(s64 r, u64 *rip, u64 nr);
/* While a syscall waits: has a signal from outside arrived that must interrupt it (EINTR)? */
int proc_ext_interrupts(void);
/* Where the VMM sends a program it interrupted in its own code (ext_signals.entry). */
void proc_async_stub(void);

/* The file system (fs.c). */
void fs_init(void);
s64 fs_syscall(u64 nr, u64 a, u64 b, u64 c, u64 d, u64 e, int *handled);
void fs_export(void);
s64 fs_mmap_file(u64 addr, u64 len, u64 flags, u64 fd, u64 off);
void fs_munmap(u64 addr, u64 len);

#endif
