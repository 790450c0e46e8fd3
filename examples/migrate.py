"""Live migration on loopback: a receiver waits on a thread of this process, the source
migrates a guest that keeps dirtying memory (pre-copy rounds, then a short stop-and-copy), and
the guest goes on on the receiver.

Across two hosts, run ``dirtyring receive --listen HOST:PORT`` on the target and
``dirtyring migrate GUEST --to HOST:PORT`` on the source.

Run: python examples/migrate.py   (needs /dev/kvm; about 2 seconds)
"""
from __future__ import annotations

import os
import sys
import time

import dirtyring


def fail(msg: str) -> int:
    print(f"migrate: {msg}", file=sys.stderr)
    return 1


def main() -> int:
    key = os.urandom(32)
    rx = dirtyring.receive("127.0.0.1:0", key, verify=True)  # checks the memory digest
    try:
        params = dirtyring.GuestParams(pattern=dirtyring.Pattern.RANDOM, rate_pps=20_000)
        cfg = dirtyring.MachineConfig(guest="dirtier", tracker="ring", data_slots=(32 << 20,),
                                      ring_entries=1024, params=params)
        # The source runs its one vCPU inline, on this (main) thread.
        with dirtyring.Machine(cfg, threaded=False) as m:
            opt = dirtyring.MigrationOptions(downtime_limit=0.1, timeout=10.0, verify=True)
            try:
                rep = dirtyring.migrate(m, rx.address, key, options=opt)
            except dirtyring.MigrationError as e:
                return fail(f"failed: {e}")
        print(f"migrated: {rep.stop_reason} after {len(rep.rounds)} rounds, "
              f"{rep.total_s:.2f} s total, {rep.downtime_ms:.1f} ms downtime, "
              f"{rep.pages_sent} pages sent")
        if rx.wait_for("failover_done", 5.0) is None or rx.machine is None:
            return fail(f"the receiver did not resume the guest ({rx.status()['state']})")
        before = rx.machine.progress()
        time.sleep(0.3)
        after = rx.machine.progress()
        print(f"receiver: guest progress {before} -> {after}")
        if after <= before:
            return fail("the guest does not run on the receiver")
        print("migrate: OK")
        return 0
    finally:
        rx.close()


if __name__ == "__main__":
    sys.exit(main())
