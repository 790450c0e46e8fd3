"""A Linux program as a guest: load it, boot it under the library OS, run it to its end.

``LinuxProgram`` reads and checks the ELF file and plans its address space when it is made, so
every problem with the user's input is a clear error before a VM exists. ``boot(machine)``
then fills a fresh machine (``Machine(program.config(), boot=program.boot)``):

- the system slot: GDT, TSS, the system area's page tables, the library OS at 0x10000 (LSTAR
  points at its syscall entry), the Linux control block the library OS reads its settings from
  (among them the trampoline region, where it puts a jump target for each syscall site it
  rewrites, and whether it may rewrite: ``rewrite_syscalls``);
- the program's page tables (``addrspace``), its segments, its initial stack (``initstack``);
- the vCPU: RIP at the program's entry, RSP at argc, EFER.SCE on (``syscall`` works),
  CR4.FSGSBASE on (arch_prctl is a ``wrfsbase``), FMASK 0 (the entry runs at CPL3 here and
  returns with ``jmp *%rcx``, so no flags may be masked).

Everything the program and the library OS know is then in guest memory, so checkpoints,
snapshots and migration need nothing from this object: a restore target is built from the
machine configuration alone.
"""
from __future__ import annotations

import os
import stat
import struct
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .._bindings import _uapi as U
from ..errors import ConfigError, ProgramError
from ..machine import layout
from ..machine.config import LINUX_GUEST, MachineConfig
from ..machine.vm import Machine
from . import archive, initstack
from .addrspace import AddressSpace, plan
from .build import load_libos, load_vdso
from .elf import ElfImage

LINUX_CTL_GPA = 0x7400
LINUX_CTL_MAGIC = int.from_bytes(b"DRLINUX1", "little")
#: The Linux control block (libos.h ``struct linux_ctl``), field by field.
LINUX_CTL_FIELDS = ("magic", "image_lo", "brk_start", "brk_max", "mmap_lo", "mmap_hi",
                    "stack_lo", "stack_hi", "pid", "tsc_khz", "boot_tsc", "boot_realtime_ns",
                    "seed0", "seed1", "seed2", "seed3", "fs_lo", "fs_hi", "import_len",
                    "export_files", "strace", "tramp_lo", "tramp_hi", "rewrite")
#: Where the library OS counts what rewriting syscall sites did (libos.h struct rewrite_stats).
REWRITE_STATS_GPA = layout.QUEUE_GPA + 0x800
REWRITE_STATS_FIELDS = ("sites", "fast_calls", "trapped_calls")
#: A program's address space (image, heap, mmap area, stack) when none is asked for: 1 GiB, so
#: a program that mallocs hundreds of MiB runs as it does natively (with 64 MiB, a 64 MiB malloc
#: failed and a program that did not check crashed). It is sparse: a page costs host memory,
#: snapshot and sync time only once the program touches it.
DEFAULT_MEMORY = 1 << 30
#: Where the vDSO sits: in the code area (read-only, mapped in every program), after the
#: library OS. AT_SYSINFO_EHDR points here.
VDSO_GPA = 0x60000
#: The file system's room beyond what the named files take (sparse: only what is written
#: costs memory); the files the program writes, and their export at exit, live in it.
DEFAULT_FS_ROOM = 256 << 20
PID = 1
CR4_FSGSBASE = 1 << 16
EFER_SCE = 1
#: STAR: the CPL0 code selector `syscall` loads on hardware KVM (GDT entry 1; SS = entry 2), and
#: the base `sysretq` returns through (user data and code at + 8 and + 16: machine/layout.py).
STAR = (layout.SYSRET_BASE << 48) | ((1 << 3) << 32)


class LinuxProgram:
    """One program to run: ``LinuxProgram("./hello", ["hello", "world"], {"LANG": "C"})``.

    Example::

        prog = LinuxProgram("/usr/bin/busybox", ["busybox", "echo", "hi"])
        with Machine(prog.config(), boot=prog.boot) as m:
            ...
    """

    def __init__(self, path: str | os.PathLike[str], argv: Sequence[str] | None = None,
                 env: dict[str, str] | None = None, *, memory: int = DEFAULT_MEMORY,
                 files: Sequence[tuple[str, str | None]] = (), fs_room: int = DEFAULT_FS_ROOM,
                 export_files: bool = False, strace: bool = False,
                 rewrite_syscalls: bool = True) -> None:
        """``files``: (host path, guest path or None for the same path) pairs copied into
        the guest's file system (a directory brings its whole tree). ``export_files``: at
        exit, hand back every file the program's file system holds (``ProgramResult.files``).
        ``rewrite_syscalls``: let the library OS rewrite each ``mov $nr,%eax; syscall`` site
        of the program's image, the first time it traps, into a jump to a trampoline (no trap
        from then on: a ``syscall`` costs ~20 us on kvm_pvm, a jump next to nothing). Off, the
        program's text stays byte for byte as loaded."""
        self.path = Path(path)
        try:
            self.data = self.path.read_bytes()
        except OSError as e:
            raise ProgramError(f"{path}: cannot read the program: {e.strerror}") from None
        self.name = self.path.name
        self.argv = list(argv) if argv else [str(path)]
        self.env = dict(env or {})
        for k in self.env:
            if not k or "=" in k:
                raise ConfigError(f"bad environment variable name {k!r}")
        self.image = ElfImage.parse(self.data, str(path))
        self.archive = archive.pack(_collect(files))
        self.export_files = export_files
        self.strace = strace
        self.rewrite_syscalls = rewrite_syscalls
        fs = len(self.archive) * 2 + fs_room
        self.space: AddressSpace = plan(self.image, memory=memory, fs=fs)

    def config(self, **kw: object) -> MachineConfig:
        """The machine this program needs (one vCPU; the data slot holds its whole address
        space). ``kw`` sets the rest (tracker, ...)."""
        return MachineConfig(guest=LINUX_GUEST, vcpus=1, data_slots=(self.space.data_bytes,),
                             **kw)  # type: ignore[arg-type]

    # --- boot ----------------------------------------------------------------------------------
    def boot(self, m: Machine) -> None:
        """Fill a fresh machine with the library OS and this program, ready to run."""
        mem = m.memory
        assert mem is not None
        if m.config.guest != LINUX_GUEST or len(m.runners) != 1:
            raise ConfigError("a Linux program boots on its own config() (one vCPU)")
        system = mem.slots[0].view
        layout.build_system_slot(system, 0)  # no identity-mapped data: the plan maps it
        code = load_libos()
        vdso = load_vdso()
        if layout.CODE_GPA + len(code) > VDSO_GPA or VDSO_GPA + len(vdso) > layout.CODE_LIMIT:
            raise ConfigError("the library OS or its vDSO outgrew the code area")
        system[layout.CODE_GPA:layout.CODE_GPA + len(code)] = np.frombuffer(code, np.uint8)
        system[VDSO_GPA:VDSO_GPA + len(vdso)] = np.frombuffer(vdso, np.uint8)
        self.space.install(system.view(np.uint64), layout.DATA_GPA, layout.DATA_PD_GPA,
                           layout.SYSTEM_SLOT_SIZE)
        self.image.load(self.data, lambda va, b: self._write(m, va, bytes(b)),
                        bias=self.space.bias)
        stack = self._initial_stack()
        self._write(m, stack.rsp, stack.data)
        self._write(m, self.space.region("fs").va, self.archive)
        self._write_control(m, m.runners[0].fd.get_tsc())
        assert m.stdio is not None
        m.stdio.refill_entropy()  # getrandom's first bytes
        mem.mark_dirty(0, 0, layout.SYSTEM_SLOT_SIZE // layout.PAGE)
        r = m.runners[0]
        m.setup_vcpu(r.fd, 0)
        s = r.fd.get_sregs()
        s.cr4 |= CR4_FSGSBASE
        s.efer |= EFER_SCE
        r.fd.set_sregs(s)
        regs = r.fd.get_regs()
        regs.rip = self.image.entry + self.space.bias
        regs.rsp = stack.rsp
        regs.rdi = regs.rdx = 0  # rdx: no rtld_fini for a static program
        r.fd.set_regs(regs)
        r.fd.set_msrs({U.MSR_STAR: STAR, U.MSR_LSTAR: layout.CODE_GPA, U.MSR_SYSCALL_MASK: 0})
        if m.config.kvmclock:
            m.enable_kvmclock(r.fd, 0)
        r.static_state = None

    def read(self, m: Machine, va: int, n: int) -> bytes:
        """``n`` bytes of the program's memory at ``va``; ProgramError if any of it is outside
        the plan (an address the guest handed us is never trusted)."""
        assert m.memory is not None
        return b"".join(m.memory.read(layout.DATA_GPA + off, k)
                        for off, k in self.space.translate(va, n))

    def read_str(self, m: Machine, va: int, limit: int = 256) -> str | None:
        """The NUL-terminated string at ``va`` (at most ``limit`` bytes), or None if it is not
        in the program's memory."""
        out = b""
        try:
            while len(out) < limit:
                chunk = self.read(m, va + len(out), min(64, limit - len(out)))
                end = chunk.find(b"\0")
                if end >= 0:
                    return (out + chunk[:end]).decode("utf-8", "replace")
                out += chunk
        except ProgramError:
            if not out:
                return None
        return out.decode("utf-8", "replace")

    def exported(self, m: Machine, va: int, n: int) -> list[archive.Entry]:
        """The files the library OS packed at exit, read and checked."""
        fs = self.space.region("fs")
        if n == 0:
            raise ProgramError("the program's files did not fit in its file system's free "
                               "room at exit; give it more (fs_room)")
        if not (fs.va <= va and va + n <= fs.end):
            raise ProgramError(f"the guest broke its contract: its file archive at {va:#x} "
                               f"(+{n}) is outside its file system")
        return archive.unpack(self.read(m, va, n))

    def _write(self, m: Machine, va: int, data: bytes) -> None:
        assert m.memory is not None
        done = 0
        for off, n in self.space.translate(va, len(data)):
            m.memory.write(layout.DATA_GPA + off, data[done:done + n])
            done += n

    def _initial_stack(self) -> initstack.InitialStack:
        img, bias = self.image, self.space.bias
        aux = [(initstack.AT_PHDR, img.phdr_vaddr + bias), (initstack.AT_PHENT, img.phentsize),
               (initstack.AT_PHNUM, img.phnum), (initstack.AT_PAGESZ, layout.PAGE),
               (initstack.AT_BASE, 0), (initstack.AT_FLAGS, 0),
               (initstack.AT_ENTRY, img.entry + bias), (initstack.AT_UID, 0),
               (initstack.AT_EUID, 0), (initstack.AT_GID, 0), (initstack.AT_EGID, 0),
               (initstack.AT_HWCAP, 0), (initstack.AT_CLKTCK, 100), (initstack.AT_SECURE, 0),
               (initstack.AT_SYSINFO_EHDR, VDSO_GPA)]
        env = [f"{k}={v}".encode() for k, v in self.env.items()]
        return initstack.build(self.space.stack_top, [a.encode() for a in self.argv], env, aux,
                               os.urandom(16), execfn=str(self.path).encode())

    def _write_control(self, m: Machine, guest_tsc: int) -> None:
        """Settings the library OS reads; its clock starts at the host's realtime now, with
        the guest's TSC read at the same moment."""
        sp = self.space
        image, mm, stack = sp.region("image+heap"), sp.region("mmap"), sp.region("stack")
        fs = sp.region("fs")
        tramp = sp.find("tramp")
        seeds = struct.unpack("<4Q", os.urandom(32))
        values = (LINUX_CTL_MAGIC, image.va, sp.brk_start, image.end, mm.va, mm.end, stack.va,
                  stack.end, PID, m.tsc_khz, guest_tsc, time.time_ns(), *seeds, fs.va, fs.end,
                  len(self.archive), int(self.export_files), int(self.strace),
                  tramp.va if tramp else 0, tramp.end if tramp else 0,
                  int(self.rewrite_syscalls and tramp is not None))
        assert m.memory is not None
        m.memory.write(LINUX_CTL_GPA, struct.pack(f"<{len(values)}Q", *values))

    @staticmethod
    def rewrite_stats(m: Machine) -> dict[str, int]:
        """What rewriting syscall sites did so far: ``sites`` rewritten, ``fast_calls`` that
        came through a trampoline, ``trapped_calls`` (a ``syscall`` instruction ran). Counted
        by the library OS in guest memory: a program can scribble on them, so they are figures
        to report, never to act on."""
        assert m.memory is not None
        return {k: m.memory.read_u64(REWRITE_STATS_GPA + 8 * i)
                for i, k in enumerate(REWRITE_STATS_FIELDS)}


def _entry(host: str, guest: str) -> archive.Entry:
    """The entry for ``host`` inside a directory named with --file: a symbolic link stays a
    link (as cp -a and tar keep it; os.walk does not go into one that points to a
    directory), a directory is a directory, anything else is read as a file."""
    st = os.lstat(host)
    if stat.S_ISLNK(st.st_mode):
        return archive.Entry(guest, st.st_mode, os.fsencode(os.readlink(host)))
    if stat.S_ISDIR(st.st_mode):
        return archive.Entry(guest, st.st_mode)
    return archive.Entry(guest, stat.S_IFREG | (st.st_mode & 0o7777), Path(host).read_bytes())


def _collect(files: Sequence[tuple[str, str | None]]) -> list[archive.Entry]:
    """Archive entries for the (host, guest) pairs; a directory brings its tree, its symbolic
    links as links (a path named itself is followed, as the user named what it points to). A
    host path that cannot be read is a clear ProgramError naming it."""
    out: list[archive.Entry] = []
    for host, guest in files:
        target = archive.guest_path(guest if guest else host)
        try:
            st = os.stat(host)
            if stat.S_ISDIR(st.st_mode):
                out.append(archive.Entry(target, st.st_mode))
                for root, dirs, names in os.walk(host):
                    rel = os.path.relpath(root, host)
                    for n in sorted(dirs) + sorted(names):
                        p = os.path.join(root, n)
                        out.append(_entry(p, archive.guest_path(os.path.join(target, rel, n))))
            else:
                out.append(archive.Entry(target, stat.S_IFREG | (st.st_mode & 0o7777),
                                         Path(host).read_bytes()))
        except OSError as e:
            raise ProgramError(f"--file {host}: {e.strerror}") from None
    return out
