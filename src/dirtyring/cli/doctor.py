"""``dirtyring doctor``: what this host's KVM can do, in words and as JSON, plus the self-test
for the KVM_RESET_DIRTY_RINGS signal defect."""
from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

from .._bindings import Cap, Kvm
from .commands import command_help


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


def selftest(seconds: float, protected_seconds: float,
             max_epochs: int | None = None) -> dict[str, Any]:
    """The KVM_RESET_DIRTY_RINGS signal defect: looked for with signals aimed at the reset and
    the tracker's protection off (stops at the first lost page, at most ``seconds``), then the
    same stimulus with the protection on for ``protected_seconds``: nothing may be lost."""
    from ..machine.verify import reset_defect_probe

    off = reset_defect_probe(protected=False, seconds=seconds, max_epochs=max_epochs)
    out: dict[str, Any] = {
        "verdict": off.verdict,
        "epochs": off.epochs,
        "pages_lost": len(off.lost),
        "seconds": round(off.seconds, 3),
        "budget_seconds": seconds,
        "lost_at_epoch": off.lost_epoch,
        "lost_pages": [[p.slot, p.page] for p in off.lost],
        "still_lost": off.still_lost,
        "stimulus": {"hot_pages": off.hot_pages, "exit_every": off.exit_every,
                     "signal_period_us": off.period_us,
                     "signalled_epochs": off.signalled_epochs},
    }
    if protected_seconds > 0:
        on = reset_defect_probe(protected=True, seconds=protected_seconds)
        out["protected"] = {"verdict": on.verdict, "epochs": on.epochs,
                            "pages_lost": len(on.lost), "seconds": round(on.seconds, 3)}
        out["protection_works"] = not on.lost
    return out


def _positive(text: str) -> float:
    v = float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return v


def add_parser(sub: Any) -> None:
    p = sub.add_parser("doctor", help=command_help("doctor"))
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-selftest", action="store_true",
                   help="skip the reset-defect self-test and the CPL3 speed check")
    p.add_argument("--seconds", type=_positive, default=5.0,
                   help="at most this many seconds looking for the reset defect (default 5)")
    p.add_argument("--protected-seconds", type=float, default=1.0,
                   help="then this many seconds checking that dirtyring's protection loses "
                        "nothing (default 1; 0 skips it)")
    p.add_argument("--epochs", type=int, default=None,
                   help="stop looking for the reset defect after this many epochs "
                        "(default: no limit)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with Kvm() as kvm:
        facts = probe(kvm)
    if not args.no_selftest:
        facts.update(cpl3_speed())
        facts["selftest"] = selftest(args.seconds, args.protected_seconds, args.epochs)
    broken = facts.get("selftest", {}).get("protection_works") is False
    if args.json:
        print(json.dumps(facts, indent=2))
        return 2 if broken else 0
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
        from ..machine.verify import FOUND_WITHIN_EPOCHS

        st = facts["selftest"]
        if st["verdict"] == "present":
            n = st["pages_lost"]
            print(f"KVM_RESET_DIRTY_RINGS signal defect: present: {n} page{'s' * (n != 1)} lost "
                  f"after {st['epochs']:,} epochs ({st['seconds']:.2f} s)")
        else:
            print(f"KVM_RESET_DIRTY_RINGS signal defect: not seen in {st['epochs']:,} epochs "
                  f"({st['seconds']:.2f} s) (on a host that has it, this stimulus found it "
                  f"within ~{FOUND_WITHIN_EPOCHS:,} epochs every time)")
        if "protected" not in st:
            return 0
        on = st["protected"]
        if not broken:
            print(f"dirtyring's protection (signals blocked during reset): no page lost in "
                  f"{on['epochs']:,} epochs of the same stimulus ({on['seconds']:.2f} s)")
        else:
            print(f"WARNING: {on['pages_lost']} pages lost even with signals blocked (after "
                  f"{on['epochs']:,} epochs): do not trust ring tracking here")
            return 2
    return 0
