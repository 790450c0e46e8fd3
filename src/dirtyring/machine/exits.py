"""Why a vCPU stopped, and the one dispatch of its exits.

Theory of operation
-------------------
Every run loop (the vCPU thread's, ``VcpuRunner.run_inline``, the rollback's fast path and the
steady batch in ``native.c``) does the same after KVM_RUN returns: it asks ``serve`` what the
exit was and serves it, and gets back one ``Exit``:

========================  ===============================================  ================
KVM exit                  served by                                        ``Exit``
========================  ===============================================  ================
``KVM_EXIT_INTR``         nothing: a signal or ``immediate_exit``          ``SIGNAL``
``KVM_EXIT_IO``           ``Machine.handle_io`` (the port's device)        ``RUN_ON``, or
                                                                           ``FINISHED`` if
                                                                           the guest said
                                                                           DONE
``KVM_EXIT_MMIO``         ``Machine.handle_mmio``                          ``RUN_ON``
``KVM_EXIT_DIRTY_RING_FULL``  ``runner.ring_full``, ``Machine.on_ring_full``  ``RING_FULL``
anything else             ``runner.crash`` (``describe``), ``on_crash``    ``CRASHED``
========================  ===============================================  ================

What a ``SIGNAL`` means is the loop's own business (the threaded loop parks if asked to, the
inline loops check their epoch timer). The inline loops then stop with a ``StopReason``
(``STOP_OF``): the epoch's time ran out (``INTERVAL``), the ring filled (``BUDGET``), or the guest
finished or crashed (``STOPPED``). A ``FINISHED`` guest's ``out`` completes on the next KVM_RUN
(run with ``immediate_exit``) before its state may be captured.

The steady batch (``native.c`` ``dirtyring_batch``) takes ``KVM_EXIT_INTR`` itself, as
``run_inline`` does, and returns every other exit to Python (``DR_EXIT``), where ``run_inline``
serves it through ``serve`` (``first_exit``). ``BATCH_STOPS`` reads each of its results as a
``StopReason``.

The decoding of a port exit's value is here too (``out_value``), shared by ``Machine.handle_io``
and the rollback's shortcut for the guest's DONE.
"""
from __future__ import annotations

import ctypes as C
from enum import IntEnum, StrEnum
from typing import TYPE_CHECKING

from .._bindings import _uapi as U
from ..errors import KvmError
from . import native

if TYPE_CHECKING:
    from .vcpu import VcpuRunner


class StopReason(StrEnum):
    """Why a run of the guest stopped. Each is also its string (``"interval"`` …): the CLI's
    and the JSON's words, and what callers compare with."""

    #: The epoch's time ran out (or the caller asked the vCPU to pause); the guest is paused.
    INTERVAL = "interval"
    #: The dirty ring filled: harvest before running on.
    BUDGET = "budget"
    #: The guest finished, crashed (``runner.crash``), or the runner was told to quit.
    STOPPED = "stopped"
    #: Only from ``VcpuRunner.run_batch``: an exit the native batch does not handle stopped the
    #: epoch in progress; ``run_inline(first_exit=batch.detail)`` serves it and runs on.
    EXIT = "exit"


# Module constants: looking a member up on the enum class costs ~70 ns, a global ~20.
INTERVAL, BUDGET, STOPPED, EXIT = (StopReason.INTERVAL, StopReason.BUDGET, StopReason.STOPPED,
                                   StopReason.EXIT)


class Exit(IntEnum):
    """What ``serve`` made of an exit: what the run loop does next (see the module)."""

    #: Served (a port or MMIO access): enter the guest again.
    RUN_ON = 0
    #: ``KVM_EXIT_INTR``: a signal or ``immediate_exit`` ended KVM_RUN; the loop decides.
    SIGNAL = 1
    #: The guest said DONE by I/O: ``runner.finished``. Its ``out`` completes on the next KVM_RUN.
    FINISHED = 2
    #: The dirty ring is full (``runner.ring_full``).
    RING_FULL = 3
    #: The guest crashed or exited in a way no device serves (``runner.crash`` says how).
    CRASHED = 4


RUN_ON, SIGNAL, FINISHED, RING_FULL, CRASHED = (Exit.RUN_ON, Exit.SIGNAL, Exit.FINISHED,
                                                Exit.RING_FULL, Exit.CRASHED)

#: How an inline run stops after an exit that ends it.
STOP_OF: dict[Exit, StopReason] = {FINISHED: STOPPED, RING_FULL: BUDGET, CRASHED: STOPPED}

#: What ``VcpuRunner.run_batch`` returns for each result of the native batch (native.h DR_*):
#: the stop of the epoch that ended the batch. None: an error, raised (``batch_error``).
#: ``INTERVAL`` becomes ``STOPPED`` if the runner was told to quit, as in ``run_inline``.
BATCH_STOPS: dict[int, StopReason | None] = {
    native.ALL_DONE: INTERVAL,        # the batch ran out: its last epoch is paused
    native.CHANGED: INTERVAL,         # that epoch's program found a change: paused, no checkpoint
    native.EXIT: EXIT,                # an exit for Python: run_inline(first_exit=...) goes on
    native.PROGRAM_FAILED: None,      # native.program_error
    native.RUN_FAILED: None,          # KvmError("KVM_RUN")
}

_INTR, _IO, _MMIO, _RING_FULL_EXIT = (U.KVM_EXIT_INTR, U.KVM_EXIT_IO, U.KVM_EXIT_MMIO,
                                      U.KVM_EXIT_DIRTY_RING_FULL)

#: KVM exit reasons by number, for messages ("SHUTDOWN", "INTERNAL_ERROR", …).
EXIT_NAMES = {v: k[len("KVM_EXIT_"):] for k, v in vars(U).items()
              if k.startswith("KVM_EXIT_") and isinstance(v, int) and k not in
              ("KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT")}


def serve(runner: VcpuRunner, reason: int) -> Exit:
    """Serve the exit ``reason`` (``kvm_run.exit_reason``) of ``runner``'s vCPU: the one
    dispatch every run loop uses (see the module for the table).

    Side effects: a port or MMIO access reaches its device; a full ring sets
    ``runner.ring_full`` and calls ``Machine.on_ring_full``; any exit no device serves sets
    ``runner.crash`` and calls ``Machine.on_crash``.
    """
    if reason == _IO:
        runner.machine.handle_io(runner)
        return FINISHED if runner.finished else RUN_ON
    if reason == _INTR:
        return SIGNAL
    if reason == _MMIO:
        runner.machine.handle_mmio(runner)
        return RUN_ON
    if reason == _RING_FULL_EXIT:
        runner.ring_full = True
        runner.machine.on_ring_full(runner)
        return RING_FULL
    runner.crash = describe(runner, reason)
    runner.machine.on_crash(runner)
    return CRASHED


def describe(runner: VcpuRunner, reason: int) -> str:
    """What an exit no device serves means, for ``runner.crash`` (and ``GuestCrashed``)."""
    name = EXIT_NAMES.get(reason, str(reason))
    extra = ""
    try:
        regs = runner.fd.get_regs()
        extra = f" at rip={regs.rip:#x}"
    except KvmError:
        pass
    index = runner.index
    if reason == U.KVM_EXIT_SHUTDOWN:
        return f"guest on vCPU {index} triple-faulted (KVM_EXIT_SHUTDOWN){extra}"
    if reason == U.KVM_EXIT_INTERNAL_ERROR:
        sub = runner.run_struct.u.internal.suberror
        return f"KVM internal error {sub} on vCPU {index}{extra}"
    if reason == U.KVM_EXIT_FAIL_ENTRY:
        why = runner.run_struct.u.fail_entry.hardware_entry_failure_reason
        return f"VM entry failed on vCPU {index} (reason {why:#x}){extra}"
    return f"unexpected exit {name} on vCPU {index}{extra}"


#: The bytes of a port access that are its value, by access size.
SIZE_MASK = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF}


def out_value(run_address: int, io: U._run_io) -> int:
    """The value an ``out`` wrote (``KVM_EXIT_IO``, direction ``KVM_EXIT_IO_OUT``): the first
    ``io.size`` bytes at ``io.data_offset`` of the vCPU's kvm_run mapping at ``run_address``,
    little-endian (of a string ``out``, the first element, as the devices take it)."""
    # SAFETY: data_offset is set by KVM and points inside the vCPU mmap area, at a data page
    # (KVM_PIO_PAGE_OFFSET) of which 4 bytes are always readable.
    return C.c_uint32.from_address(run_address + io.data_offset).value \
        & SIZE_MASK.get(io.size, 0xFFFFFFFF)
