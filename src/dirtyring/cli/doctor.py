"""``dirtyring doctor``: what this host's KVM can do, in words and as JSON, plus the self-test
for the KVM_RESET_DIRTY_RINGS signal defect."""
from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

from .._bindings import Cap, Kvm


def probe(kvm: Kvm) -> dict[str, Any]:
    ring_max = kvm.check_extension_int(Cap.DIRTY_LOG_RING)
    acq = kvm.check_extension_int(Cap.DIRTY_LOG_RING_ACQ_REL)
    return {
        "kernel": platform.release(),
        "api_version": kvm.get_api_version(),
        "dirty_ring": ring_max > 0,
        "dirty_ring_max_bytes": ring_max,
        "dirty_ring_max_entries": ring_max // 16,
        "dirty_ring_acq_rel_max_bytes": acq,
        "dirty_ring_with_bitmap": kvm.check_extension_int(Cap.DIRTY_LOG_RING_WITH_BITMAP),
        "manual_dirty_log_protect": kvm.check_extension_int(Cap.MANUAL_DIRTY_LOG_PROTECT2),
        "immediate_exit": kvm.check_extension(Cap.IMMEDIATE_EXIT),
        "nr_vcpus": kvm.check_extension_int(Cap.NR_VCPUS),
        "max_vcpus": kvm.check_extension_int(Cap.MAX_VCPUS),
        "nr_memslots": kvm.check_extension_int(Cap.NR_MEMSLOTS),
        "vcpu_mmap_size": kvm.get_vcpu_mmap_size(),
        "binary_stats_fd": kvm.check_extension(Cap.BINARY_STATS_FD),
    }


def cpl3_speed(seconds: float = 0.3) -> dict[str, Any]:
    """Run the dirtier untracked at CPL3 over 64 hot pages and measure page writes per second.

    Native execution does tens of millions per second; KVM's instruction emulator manages
    roughly a million instructions per second, so the threshold is unambiguous."""
    from ..guests.protocol import GuestParams, Pattern
    from ..machine.config import MachineConfig
    from ..machine.vm import Machine

    m = Machine(MachineConfig(guest="dirtier", tracker="none", data_slots=(64 * 4096,),
                              params=GuestParams(pattern=Pattern.HOT, hot_pages=64)))
    try:
        time.sleep(0.05)
        a, t = m.progress(), time.monotonic()
        time.sleep(seconds)
        rate = (m.progress() - a) / (time.monotonic() - t)
        m.check()
    finally:
        m.close()
    return {"cpl3_page_writes_per_s": rate, "cpl3_native": rate > 5e6}


def selftest(epochs: int) -> dict[str, Any]:
    from ..machine.verify import reset_defect_run

    off = reset_defect_run(protected=False, epochs=epochs, storm_us=100)
    on = reset_defect_run(protected=True, epochs=epochs, storm_us=100)
    return {
        "reset_defect": off.lost,
        "unprotected": {"epochs": off.epochs, "lost_at_epoch": off.lost_epoch,
                        "stale_pages": off.stale_pages},
        "protected": {"epochs": on.epochs, "lost_at_epoch": on.lost_epoch,
                      "stale_pages": on.stale_pages},
        "protection_works": not on.lost,
    }


def add_parser(sub: Any) -> None:
    p = sub.add_parser("doctor", help="print this host's KVM facts and run the self-tests")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-selftest", action="store_true",
                   help="skip the reset-defect self-test and the CPL3 speed check")
    p.add_argument("--epochs", type=int, default=3000,
                   help="epochs per side of the reset-defect self-test (default 3000)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with Kvm() as kvm:
        facts = probe(kvm)
    if not args.no_selftest:
        facts.update(cpl3_speed())
        facts["selftest"] = selftest(args.epochs)
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    yn = {True: "yes", False: "no"}
    print(f"kernel {facts['kernel']}, KVM API {facts['api_version']}")
    if facts["dirty_ring"]:
        print(f"dirty ring: yes, at most {facts['dirty_ring_max_entries']} entries per vCPU "
              f"({facts['dirty_ring_max_bytes']} bytes); acquire/release variant: "
              f"{yn[facts['dirty_ring_acq_rel_max_bytes'] > 0]}; with bitmap backup: "
              f"{yn[facts['dirty_ring_with_bitmap'] > 0]}")
    else:
        print("dirty ring: NO (ring tracking unavailable; bitmap modes still work)")
    print(f"manual dirty-log protect: {yn[facts['manual_dirty_log_protect'] > 0]} "
          f"(flags {facts['manual_dirty_log_protect']})")
    print(f"vCPUs: {facts['nr_vcpus']} recommended, {facts['max_vcpus']} max; "
          f"memslots: {facts['nr_memslots']}; immediate_exit: {yn[facts['immediate_exit']]}")
    if "cpl3_native" in facts:
        print(f"guest code at CPL3 runs natively: {yn[facts['cpl3_native']]} "
              f"({facts['cpl3_page_writes_per_s'] / 1e6:.1f} M page writes/s)")
        st = facts["selftest"]
        if st["reset_defect"]:
            print(f"KVM_RESET_DIRTY_RINGS signal defect: PRESENT (unprotected, pages went stale "
                  f"at epoch {st['unprotected']['lost_at_epoch']}: "
                  f"{st['unprotected']['stale_pages']} pages)")
        else:
            print(f"KVM_RESET_DIRTY_RINGS signal defect: not seen in "
                  f"{st['unprotected']['epochs']} unprotected epochs")
        if st["protection_works"]:
            print(f"dirtyring's protection (signals blocked during reset): no page lost in "
                  f"{st['protected']['epochs']} epochs")
        else:
            print(f"WARNING: pages lost even with signals blocked (epoch "
                  f"{st['protected']['lost_at_epoch']}): do not trust ring tracking here")
            return 2
    return 0
