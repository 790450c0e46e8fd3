"""Remus-style replication in one script: a standby and a primary on loopback, a few hundred
checkpoints, then a manual failover while the primary runs, and a check that the guest went on
on the standby from its last committed checkpoint.

In production the two run on different hosts (``dirtyring standby`` and ``dirtyring protect``);
here the standby is served on a thread of this process and its replica VM runs here after the
failover.

Run: python examples/protect_standby.py   (needs /dev/kvm; about 2 seconds)
"""
from __future__ import annotations

import os
import sys
import threading
import time

import dirtyring


def fail(msg: str) -> int:
    print(f"protect_standby: {msg}", file=sys.stderr)
    return 1


def main() -> int:
    key = os.urandom(32)  # the shared key: both sides must use the same one
    # The standby first: port 0 picks a free port, sb.address says which.
    sb = dirtyring.standby("127.0.0.1:0", key)
    try:
        cfg = dirtyring.MachineConfig(guest="dirtier", tracker="hotset", data_slots=(8 << 20,),
                                      params=dirtyring.GuestParams(
                                          pattern=dirtyring.Pattern.HOT, hot_pages=64))
        with dirtyring.Machine(cfg, threaded=False) as m:
            p = dirtyring.protect(m, sb.address, key,
                                  options=dirtyring.PrimaryOptions(interval=0.001))
            # The failover is driven from another thread: the primary's epoch loop holds this
            # one. Once the standby is protected, let it commit for half a second more, then
            # take over. The standby tells the primary, which then stops by itself (fenced);
            # ``stop`` only bounds the run if something went wrong.
            stop = threading.Event()

            def fail_over() -> None:
                if sb.wait_for("protected", 30.0) is not None:
                    time.sleep(0.5)
                    sb.failover()
                stop.wait(2.0)
                stop.set()

            driver = threading.Thread(target=fail_over)
            driver.start()
            state = p.run(60.0, stop=stop)
            stop.set()
            driver.join()
            st = p.status()
            p.close()
        print(f"primary: {state}, {st['epoch']} epochs, {st['acked']} acknowledged, "
              f"pause p50 {st['pause_us_p50']:.0f} us")
        if sb.wait_for("protected", 0) is None:
            return fail("the standby never held a consistent checkpoint")
        done = sb.wait_for("failover_done", 5.0)
        if done is None or sb.status()["state"] != "failed_over" or sb.machine is None:
            return fail(f"no failover: standby state {sb.status()['state']}")
        # The replica runs the guest now: its write counter moves on.
        before = sb.machine.progress()
        time.sleep(0.3)
        after = sb.machine.progress()
        print(f"standby: took over at epoch {done['epoch']} in {done['resume_ms']:.1f} ms; "
              f"guest progress {before} -> {after}")
        if after <= before:
            return fail("the guest does not run on the standby")
        print("protect_standby: OK")
        return 0
    finally:
        sb.close()


if __name__ == "__main__":
    sys.exit(main())
