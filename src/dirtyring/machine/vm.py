"""``Machine``: a runnable VM built from a MachineConfig: memory, vCPU threads, devices, tracker.

Two ways to build one (as Firecracker's builder): ``Machine(config)`` boots the guest program
fresh; ``Machine(config, boot=False)`` builds the same hardware with empty memory and parked
vCPUs, to be filled by restoring a checkpoint or snapshot (``restore_state``). A Linux program
(``config.guest == "linux"``) is booted by the layer above, which passes its boot function:
``Machine(config, boot=program.boot)``; its restore target needs nothing more than the config.
"""
from __future__ import annotations

import ctypes as C
import threading
import time
from collections.abc import Callable
from typing import Any

from .._bindings import Cap, Kvm, VcpuFd
from .._bindings import _uapi as U
from .._bindings.caps import REQUIRED
from .._bindings.mapping import keep_freed_memory
from ..errors import CapabilityMissing, ConfigError, GuestCrashed, KvmError
from ..guests import load_guest
from ..guests.protocol import CONTROL_MAGIC, CONTROL_OFFSET
from ..tracking import KINDS, BitmapTracker, HotSetTracker, RingTracker, TrackedSlot, Tracker
from . import layout, native
from .config import LINUX_GUEST, MachineConfig
from .devices import Console, ControlPorts, Device, KvDevice, OutputSink, StdioDevice
from .devices.stdio import ContractBroken
from .exits import out_value
from .memory import GuestMemory, plan_slots
from .state import DeviceState, MachineState, VcpuState
from .stateblob import StateBlob
from .vcpu import VcpuRunner, install_alarm_handler, install_kick_handler

#: MSRs captured with every vCPU state (those KVM saves that a CPL3 guest can depend on).
STATE_MSRS = (U.MSR_IA32_TSC, U.MSR_IA32_SYSENTER_CS, U.MSR_IA32_SYSENTER_ESP,
              U.MSR_IA32_SYSENTER_EIP, U.MSR_STAR, U.MSR_LSTAR, U.MSR_CSTAR, U.MSR_SYSCALL_MASK,
              U.MSR_KERNEL_GS_BASE, U.MSR_IA32_CR_PAT, U.MSR_KVM_SYSTEM_TIME_NEW,
              U.MSR_KVM_STEAL_TIME)
KVMCLOCK_GPA = 0x9000   # 32 bytes per vCPU (pvclock_vcpu_time_info)
STEAL_TIME_GPA = 0xA000  # 64 bytes per vCPU (kvm_steal_time)


#: KVM_GET_SUPPORTED_CPUID's answer by KVM device path. It describes the host's KVM module,
#: which cannot change while this process has it open, and the ioctl cost ~0.47 ms per
#: machine here (of a Linux program's ~1.3 ms of building between the irqchip and its first
#: re-arm). Kept as bytes; every machine gets its own buffer.
_SUPPORTED_CPUID: dict[str, bytes] = {}


def _supported_cpuid(kvm: Kvm) -> C.Array[C.c_uint8]:
    """``kvm.get_supported_cpuid()``, asked once per device (a Kvm wrapped around a bare fd,
    ``Kvm.from_fd``, names no device and is always asked)."""
    path = getattr(kvm, "path", "<fd>")
    kept = _SUPPORTED_CPUID.get(path)
    if kept is None:
        buf = kvm.get_supported_cpuid()
        if path != "<fd>":
            _SUPPORTED_CPUID[path] = bytes(buf)
        return buf
    return (C.c_uint8 * len(kept)).from_buffer_copy(kept)


class Machine:
    """One VM. Not thread-safe: one controller thread drives pause/resume/capture.

    Example::

        cfg = dirtyring.MachineConfig(guest="compute", vcpus=2)
        with dirtyring.Machine(cfg) as m:        # boots; vCPU threads run the guest
            time.sleep(0.1)
            m.pause_all()
            print(m.progress())
            m.resume_all()
    """

    def __init__(self, config: MachineConfig, *, sink: OutputSink | None = None,
                 boot: bool | Callable[[Machine], None] = True, kvm: Kvm | None = None,
                 threaded: bool = True) -> None:
        install_kick_handler()
        keep_freed_memory()
        # The C helper is built (first time on this host) or loaded here, not at import and not
        # inside the first checkpoint's pause (its gathers are the first native path used).
        native.backend()
        if not threaded:
            if config.vcpus != 1:
                raise ConfigError("the single-threaded (inline) mode runs exactly one vCPU")
            install_alarm_handler()
        self.threaded = threaded
        self.config = config
        self._config_json = config.to_json()
        #: The machine's state encoded from kept pieces (``encode_state``; steady pauses).
        self.state_blob = StateBlob(self)
        self.cv = threading.Condition()
        self.outputs: list[tuple[str, Any]] = []
        self.sink: OutputSink = sink or (lambda kind, payload: self.outputs.append((kind, payload)))
        #: Set when the controller should look: a ring is full, or the guest stopped or crashed.
        self.attention = threading.Event()
        self.stopped_event = threading.Event()
        self._own_kvm = kvm is None
        self.kvm = kvm or Kvm()
        self._check_caps()
        self.vm = self.kvm.create_vm()
        self.memory: GuestMemory | None = None
        self.runners: list[VcpuRunner] = []
        self.tracker: Tracker | None = None
        self._closed = False
        try:
            self._build(boot)
        except BaseException:
            self.close()
            raise

    # --- construction ---------------------------------------------------------------------------
    def _check_caps(self) -> None:
        need = list(REQUIRED["machine"]) + list(REQUIRED.get(self.config.tracker, ()))
        missing = [c.name for c in need if not self.kvm.check_extension(c)]
        if missing:
            raise CapabilityMissing(missing, f"a {self.config.tracker}-tracked machine")
        if self.config.tracker == "ring":
            max_bytes = self.kvm.check_extension_int(Cap.DIRTY_LOG_RING)
            if self.config.ring_entries * 16 > max_bytes:
                raise ConfigError(f"ring of {self.config.ring_entries} entries is larger than "
                                  f"this host allows ({max_bytes // 16})")
        nr = self.kvm.check_extension_int(Cap.MAX_VCPUS) or self.kvm.check_extension_int(
            Cap.NR_VCPUS)
        if self.config.vcpus > nr:
            raise ConfigError(f"{self.config.vcpus} vCPUs asked, this host allows {nr}")

    def _build(self, boot: bool | Callable[[Machine], None]) -> None:
        cfg = self.config
        vm = self.vm
        if cfg.tracker == "ring":
            vm.enable_dirty_log_ring(cfg.ring_entries * 16)
        elif cfg.tracker in ("bitmap-clear", "hotset"):
            vm.enable_manual_dirty_log_protect()
        # Untracked, KVM may map guest memory with 2 MiB pages if the host memory is huge pages
        # (GuestMemory's "anonymous" backing); tracked, dirty logging keeps it on 4 KiB pages.
        self.memory = GuestMemory(plan_slots(list(cfg.data_slots)),
                                  backing="memfd" if self._will_track() else "anonymous")
        # Memslots before the irqchip, and created with dirty logging on when a tracker will
        # turn it on (every tracker's start() does; the same flags again are a no-op for KVM).
        # Why: every memslot change waits for an SRCU grace period, and KVM_CREATE_IRQCHIP
        # leaves a slow (not expedited) one in flight, most likely from registering its
        # devices on the I/O buses (recent kernels free the old buses with call_srcu). The
        # first memslot change after the irqchip waits for it: 5.4-7.6 ms right after it here,
        # 0.1 ms with no irqchip; with 3 ms of other work in between, ~4 ms (it ends on a
        # timer tick ~7 ms after the irqchip). In this order the wait overlaps vCPU creation
        # and booting, and only the tracker's first re-arm (a flags toggle) pays what is left.
        log = U.KVM_MEM_LOG_DIRTY_PAGES if self._will_track() else 0
        for s in self.memory.slots:
            vm.set_user_memory_region(s.info.slot, s.info.gpa, s.info.size, s.map.addr, log)
        try:
            vm.create_irqchip()  # before any vCPU (KVM refuses it after)
            self.has_irqchip = True
        except KvmError:
            self.has_irqchip = False
        self.tsc_khz = 0
        cpuid = _supported_cpuid(self.kvm)
        for i in range(cfg.vcpus):
            fd = vm.create_vcpu(i)
            fd.set_cpuid2(cpuid)
            self.runners.append(VcpuRunner(self, fd, i))
        if self.runners:
            try:
                self.tsc_khz = self.runners[0].fd.get_tsc_khz()
            except KvmError:
                self.tsc_khz = 0
        self.console = Console(self._emit)
        self.control = ControlPorts(self.memory, self._emit)
        self.kv = KvDevice(self.memory, self._emit)
        self.devices: list[Device] = [self.console, self.control, self.kv]
        #: The library OS's stdout/stderr queue (Linux programs only).
        self.stdio: StdioDevice | None = None
        if cfg.guest == LINUX_GUEST:
            self.stdio = StdioDevice(self.memory, self._emit)
            self.devices.append(self.stdio)
        self._ports: dict[int, Device] = {p: d for d in self.devices for p in d.ports}
        self.tracker = self._make_tracker()
        if self.tracker is not None:
            self.tracker.start()
        if callable(boot):
            boot(self)
        elif boot:
            self._boot()
        else:
            for r in self.runners:
                r.pause_requested = True
        if not self.threaded:
            for r in self.runners:
                r.parked = True  # runs only inside run_inline() on the caller's thread
            return
        for r in self.runners:
            r.start()
        if not boot:
            # A restore target: return only once every vCPU thread is parked, so that
            # restore_state() can follow at once.
            with self.cv:
                while not all(r.parked for r in self.runners):
                    self.cv.wait(1.0)

    def _will_track(self) -> bool:
        """Will ``_make_tracker`` make a tracker (whose start() turns dirty logging on)?"""
        return self.config.tracker in KINDS

    def _make_tracker(self) -> Tracker | None:
        assert self.memory is not None
        slots = [TrackedSlot(slot=s.info.slot, gpa=s.info.gpa, pages=s.info.pages,
                             userspace_addr=s.map.addr) for s in self.memory.slots]
        src = self.memory.take_vmm_dirty
        cfg = self.config
        if cfg.tracker == "ring":
            return RingTracker(self.vm, [r.fd for r in self.runners], slots, src,
                               block_signals=cfg.block_signals_in_reset)
        if cfg.tracker == "bitmap":
            return BitmapTracker(self.vm, slots, src)
        if cfg.tracker == "bitmap-clear":
            return BitmapTracker(self.vm, slots, src, manual=True)
        if cfg.tracker == "hotset":
            return HotSetTracker(self.vm, slots, src, hot_epochs=cfg.hot_epochs)
        return None

    def _boot(self) -> None:
        mem = self.memory
        assert mem is not None
        cfg = self.config
        if cfg.guest == LINUX_GUEST:
            raise ConfigError("a Linux program's machine is booted by dirtyring.linux "
                              "(Machine(config, boot=program.boot))")
        layout.build_system_slot(mem.slots[0].view, mem.data_bytes)
        code = load_guest(cfg.guest)
        if len(code) > layout.CODE_LIMIT - layout.CODE_GPA:
            raise ConfigError(f"guest {cfg.guest} is too large ({len(code)} bytes)")
        mem.slots[0].view[layout.CODE_GPA:layout.CODE_GPA + len(code)] = bytearray(code)
        p = cfg.params
        ctl = {"magic": CONTROL_MAGIC, "data_gpa": layout.DATA_GPA,
               "data_pages": mem.data_bytes // layout.PAGE, "pattern": int(p.pattern),
               "hot_pages": p.hot_pages, "rate_pps": p.rate_pps, "tsc_khz": self.tsc_khz,
               "seed": p.seed, "iteration": 1, "nr_vcpus": cfg.vcpus,
               "exit_every": p.exit_every, "report_every": p.report_every, "stop": 0,
               "max_writes": p.max_writes, "stride": p.stride}
        for k, v in ctl.items():
            self.set_control(k, v)
        mem.mark_dirty(0, 0, layout.SYSTEM_SLOT_SIZE // layout.PAGE)
        for r in self.runners:
            self._setup_vcpu(r.fd, r.index)
        if cfg.kvmclock:
            for r in self.runners:
                self.enable_kvmclock(r.fd, r.index)

    def setup_vcpu(self, fd: VcpuFd, index: int) -> None:
        """Long mode at CPL3 with the machine's segments and page tables, RIP at the code,
        RSP at the vCPU's stack (a booting layer adjusts what its program needs after)."""
        self._setup_vcpu(fd, index)

    def _setup_vcpu(self, fd: VcpuFd, index: int) -> None:
        s = fd.get_sregs()
        code = dict(base=0, limit=0xFFFFFFFF, selector=layout.SEL_USER_CODE, type=11, present=1,
                    dpl=3, db=0, s=1, l=1, g=1)
        data = dict(base=0, limit=0xFFFFFFFF, selector=layout.SEL_USER_DATA, type=3, present=1,
                    dpl=3, db=1, s=1, l=0, g=1)
        for name, vals in [("cs", code), ("ds", data), ("es", data), ("fs", data), ("gs", data),
                           ("ss", data)]:
            seg = getattr(s, name)
            for k, v in vals.items():
                setattr(seg, k, v)
            seg.avl = seg.unusable = 0
        s.tr.base, s.tr.limit, s.tr.selector = layout.TSS_GPA, layout.TSS_LIMIT, layout.SEL_TSS
        s.tr.type, s.tr.present, s.tr.dpl, s.tr.s, s.tr.l, s.tr.g, s.tr.unusable = \
            11, 1, 0, 0, 0, 0, 0
        s.gdt.base, s.gdt.limit = layout.GDT_GPA, layout.GDT_LIMIT
        s.idt.base, s.idt.limit = 0, 0
        s.cr0, s.cr3, s.cr4, s.efer = layout.CR0, layout.PML4_GPA, layout.CR4, layout.EFER
        fd.set_sregs(s)
        r = U.kvm_regs()
        r.rip = layout.CODE_GPA
        r.rsp = layout.stack_top(index)
        r.rdi = index
        r.rflags = layout.RFLAGS
        fd.set_regs(r)
        fd.set_mp_state(U.KVM_MP_STATE_RUNNABLE)
        for x in self.runners:
            if x.fd is fd:
                x.static_state = None

    def enable_kvmclock(self, fd: VcpuFd, index: int) -> None:
        """Turn on kvmclock and steal time: from now on KVM itself writes those guest pages
        (on this vCPU's behalf, so they land in its dirty ring)."""
        fd.set_msrs({U.MSR_KVM_SYSTEM_TIME_NEW: (KVMCLOCK_GPA + 32 * index) | 1,
                     U.MSR_KVM_STEAL_TIME: (STEAL_TIME_GPA + 64 * index) | 1})
        for x in self.runners:
            if x.fd is fd:
                x.static_state = None

    # --- control page -------------------------------------------------------------------------
    def set_control(self, field: str, value: int) -> None:
        assert self.memory is not None
        self.memory.write_u64(layout.CONTROL_GPA + CONTROL_OFFSET[field], value)

    def get_control(self, field: str) -> int:
        assert self.memory is not None
        return self.memory.read_u64(layout.CONTROL_GPA + CONTROL_OFFSET[field])

    def status(self, vcpu: int, field: str) -> int:
        from ..guests.protocol import STATUS_OFFSET
        assert self.memory is not None
        return self.memory.read_u64(layout.status_gpa(vcpu) + STATUS_OFFSET[field])

    def progress(self) -> int:
        """Sum of the guest's progress counters over all vCPUs (read without pausing)."""
        return sum(self.status(r.index, "progress") for r in self.runners)

    # --- vCPU callbacks (called on vCPU threads) --------------------------------------------------
    def _emit(self, kind: str, payload: Any) -> None:
        self.sink(kind, payload)

    def handle_io(self, r: VcpuRunner) -> None:
        """Serve a ``KVM_EXIT_IO``: the port's device (``exits.serve`` calls this)."""
        io = r.run_struct.u.io
        dev = self._ports.get(io.port)
        size = io.size
        if io.direction == U.KVM_EXIT_IO_OUT:
            if dev is not None:
                dev.io_out(r, io.port, out_value(r.run_address, io), size)
        else:
            data = r.fd.io_data(io.data_offset, size * max(1, io.count))
            value = dev.io_in(r, io.port, size) if dev is not None else 0xFFFFFFFF
            C.memmove(data, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"), size)

    def handle_mmio(self, r: VcpuRunner) -> None:
        """No MMIO devices exist: reads return all ones, writes are dropped (counted)."""
        mm = r.run_struct.u.mmio
        if not mm.is_write:
            for i in range(8):
                mm.data[i] = 0xFF

    def drain_output(self, *, live: bool = False) -> int:
        """Send what a Linux program queued on stdout/stderr to the sink (call with the vCPUs
        paused: at a checkpoint, or after the program ended). A ring the guest broke stops the
        machine as a crash with the reason; nothing of it is released.

        ``live=True``: while the vCPUs run, with nothing to keep consistent with a checkpoint
        (an untracked run). The rings are single-producer, single-consumer: the guest writes a
        record before it moves the producer index and never writes where the consumer has not
        been, so the complete records below the index read here are final. A ring that looks
        broken is read again with the machine paused, which reports it as above."""
        if self.stdio is None:
            return 0
        if live:
            try:
                return self.stdio.drain()
            except ContractBroken:
                self.pause_all()
                n = self.drain_output()
                if not self.crashed:
                    self.resume_all()  # (it read well paused: it was caught mid-write)
                return n
        try:
            return self.stdio.drain()
        except ContractBroken as e:
            r = self.runners[0]
            r.crash = f"the guest broke its contract: {e}"
            self.on_crash(r)
            return 0

    def on_ring_full(self, r: VcpuRunner) -> None:
        rt = self.tracker
        if isinstance(rt, RingTracker):
            rt.note_ring_full()
        self.attention.set()

    def on_finished(self, r: VcpuRunner) -> None:
        if all(not x.runnable for x in self.runners):
            self.stopped_event.set()
            self.attention.set()

    def on_crash(self, r: VcpuRunner) -> None:
        self.stopped_event.set()
        self.attention.set()

    # --- controller API -------------------------------------------------------------------------
    def pause_all(self) -> None:
        """Stop every vCPU and wait until all are parked (out of KVM_RUN, I/O completed)."""
        if not self.threaded:
            return
        with self.cv:
            for r in self.runners:
                r.pause_requested = True
        for r in self.runners:
            r.kick()
        self.kv.wake()
        with self.cv:
            while not all(r.parked for r in self.runners):
                if not self.cv.wait(5.0):
                    stuck = [r.index for r in self.runners if not r.parked]
                    raise GuestCrashed(f"vCPU(s) {stuck} did not stop within 5 s")

    def resume_all(self) -> None:
        """Let every runnable vCPU go on. Clears ring-full parks (call only after a harvest)."""
        if not self.threaded:
            return
        with self.cv:
            for r in self.runners:
                r.pause_requested = False
                r.ring_full = False
            if not self.stopped_event.is_set():
                self.attention.clear()
            self.cv.notify_all()

    @property
    def crashed(self) -> str | None:
        for r in self.runners:
            if r.crash:
                return r.crash
        return None

    @property
    def finished(self) -> bool:
        return all(r.finished for r in self.runners)

    def check(self) -> None:
        """Raise GuestCrashed if any vCPU crashed."""
        c = self.crashed
        if c:
            raise GuestCrashed(c)

    def capture_state(self) -> MachineState:
        """Every vCPU's and device's state. All vCPUs must be parked (``pause_all``).

        Costs here are ~6 µs per ioctl, so the capture is built to need few of them per epoch:
        regs, sregs and events come from kvm_run's sync area (filled by KVM on every exit);
        XSAVE covers the FPU; of the MSRs only the TSC can change at CPL3 (the others need
        WRMSR, a CPL0 instruction), and XCR0 (XSETBV), the LAPIC (not mapped in the guest) and
        the MP state (no INIT/SIPI without a LAPIC) can only be changed by the VMM. Those are
        read once and again after every restore (``static_state``).
        """
        assert all(r.parked for r in self.runners), "capture_state needs paused vCPUs"
        vcpus = []
        for r in self.runners:
            fd = r.fd
            st = r.static_state
            if st is None:
                others = fd.get_msrs([i for i in STATE_MSRS if i != U.MSR_IA32_TSC])
                # The MSRs in order, the TSC's place kept: each capture fills in its value.
                order = sorted([*others, U.MSR_IA32_TSC])
                st = r.static_state = {
                    "xcrs": bytes(fd.get_xcrs()),
                    "lapic": bytes(fd.get_lapic()) if self.has_irqchip else b"",
                    "mp_state": fd.get_mp_state(),
                    "msrs_before": tuple((i, others[i]) for i in order[:order.index(
                        U.MSR_IA32_TSC)]),
                    "msrs_after": tuple((i, others[i]) for i in order[order.index(
                        U.MSR_IA32_TSC) + 1:])}
            if fd.sync_valid:
                sr = r.run_struct.s.regs
                regs, sregs, events = bytes(sr.regs), bytes(sr.sregs), bytes(sr.events)
            else:
                regs = bytes(fd.get_regs())
                sregs = bytes(fd.get_sregs())
                events = bytes(fd.get_vcpu_events())
            msrs = (st["msrs_before"] + ((U.MSR_IA32_TSC, fd.get_tsc()),)  # type: ignore
                    + st["msrs_after"])
            vcpus.append(VcpuState(
                index=r.index, regs=regs, sregs=sregs, fpu=b"", xsave=bytes(fd.get_xsave()),
                xcrs=st["xcrs"], msrs=msrs,  # type: ignore[arg-type]
                lapic=st["lapic"], events=events, mp_state=st["mp_state"],  # type: ignore[arg-type]
                finished=r.finished))
        devices = tuple(DeviceState(name=d.name, data=d.save()) for d in self.devices)
        return MachineState(config=self._config_json, vcpus=tuple(vcpus), devices=devices)

    def encode_state(self) -> bytes:
        """``capture_state().encode()`` (vCPUs parked), built from kept pieces: see
        ``stateblob.py``. Checkpoints take this at every pause."""
        assert all(r.parked for r in self.runners), "encode_state needs paused vCPUs"
        return self.state_blob.encode()

    def capture_regs(self) -> list[U.kvm_regs]:
        """Only the general registers (the cheapest capture, for the ceiling benchmark)."""
        return [r.fd.get_regs() for r in self.runners]

    def restore_state(self, state: MachineState) -> None:
        """Load vCPU and device state (vCPUs parked). Memory is restored by the caller."""
        assert all(r.parked for r in self.runners), "restore_state needs paused vCPUs"
        if len(state.vcpus) != len(self.runners):
            raise ConfigError(f"state has {len(state.vcpus)} vCPUs, machine has "
                              f"{len(self.runners)}")
        for r, v in zip(self.runners, state.vcpus):
            fd = r.fd
            fd.set_sregs(U.kvm_sregs.from_buffer_copy(v.sregs))
            fd.set_msrs({i: d for i, d in v.msrs if d or i not in (
                U.MSR_KVM_SYSTEM_TIME_NEW, U.MSR_KVM_STEAL_TIME)})
            fd.set_regs(U.kvm_regs.from_buffer_copy(v.regs))
            if v.fpu:
                fd.set_fpu(U.kvm_fpu.from_buffer_copy(v.fpu))
            fd.set_xsave(U.kvm_xsave.from_buffer_copy(v.xsave))
            fd.set_xcrs(U.kvm_xcrs.from_buffer_copy(v.xcrs))
            if v.lapic and self.has_irqchip:
                fd.set_lapic(U.kvm_lapic_state.from_buffer_copy(v.lapic))
            fd.set_vcpu_events(U.kvm_vcpu_events.from_buffer_copy(v.events))
            fd.set_mp_state(v.mp_state)
            r.finished = v.finished
            r.crash = None
            r.static_state = None
        by_name = {d.name: d for d in state.devices}
        for d in self.devices:
            if d.name in by_name:
                d.restore(by_name[d.name].data)
        for r in self.runners:  # how a guest that had finished ended (its DONE's value)
            r.exit_code = self.control.exit_codes.get(r.index) if r.finished else None
        self.stopped_event.clear()
        if all(r.finished for r in self.runners):  # (nothing will run to say so)
            self.stopped_event.set()
            self.attention.set()

    def wait_stopped(self, timeout: float | None = None) -> bool:
        """Block until every vCPU finished or one crashed; True if that happened in time."""
        return self.stopped_event.wait(timeout)

    def stop_guest(self) -> None:
        """Ask the guest to finish (control page ``stop``) and wake an idle one."""
        self.set_control("stop", 1)
        self.kv.wake()

    def close(self) -> None:
        """Stop and join every vCPU thread, then release fds and memory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with self.cv:
            for r in self.runners:
                r.quit = True
            self.cv.notify_all()
        for r in self.runners:
            r.kick()
        if hasattr(self, "kv"):
            self.kv.wake()
        deadline = time.monotonic() + 5
        for r in self.runners:
            if r.thread is not None:
                while r.thread.is_alive() and time.monotonic() < deadline:
                    r.kick()
                    r.thread.join(0.05)
        for r in self.runners:
            r.fd.close()
        if self.memory is not None:
            self.memory.close()
        self.vm.close()
        if self._own_kvm:
            self.kvm.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
