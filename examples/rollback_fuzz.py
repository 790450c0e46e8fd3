"""A rollback loop as a snapshot fuzzer uses it: mark a root once, then for every input run the
guest from the root, look at what it did, and roll back. Only the pages the run dirtied are
copied back (the tracker says which), plus the vCPU state.

The "input" here is what the dirtier guest reads from its control page: a seed and how many
writes to make. A real fuzzer would write its test case into guest memory instead.

Run: python examples/rollback_fuzz.py   (needs /dev/kvm; about a second)
"""
from __future__ import annotations

import random
import sys
import time

import dirtyring

ITERATIONS = 500


def main() -> int:
    params = dirtyring.GuestParams(pattern=dirtyring.Pattern.RANDOM)
    cfg = dirtyring.MachineConfig(guest="dirtier", tracker="hotset", data_slots=(1 << 20,),
                                  params=params)
    # threaded=False: the one vCPU runs on this thread, so a pause costs nothing.
    with dirtyring.Machine(cfg, threaded=False) as m:
        rb = dirtyring.Rollback(m)
        root = rb.mark()                      # the root every run starts from
        base = m.status(0, "progress")        # the guest's write counter at the root
        rng = random.Random(1)
        t0 = time.perf_counter()
        for i in range(ITERATIONS):
            writes = rng.randint(1, 300)      # mutate the input ...
            m.set_control("seed", rng.getrandbits(62))
            m.set_control("max_writes", base + writes)
            if rb.run(5.0) != "stopped":      # ... run it until the guest says DONE ...
                print(f"rollback_fuzz: run {i} did not finish", file=sys.stderr)
                return 1
            m.check()                         # a crash would be a finding
            if m.status(0, "progress") != base + writes:
                print(f"rollback_fuzz: run {i} made the wrong number of writes",
                      file=sys.stderr)
                return 1
            rb.rollback()                     # ... and back to the root
        elapsed = time.perf_counter() - t0
        # The guest's memory is the root's again, page for page.
        if dirtyring.fingerprint(m.memory) != root.digest:  # type: ignore[arg-type]
            print("rollback_fuzz: memory differs from the root", file=sys.stderr)
            return 1
        st = rb.statistics()
        print(f"{st.rollbacks} rollbacks in {elapsed:.2f} s "
              f"({st.rollbacks / elapsed:.0f}/s), {st.pages_restored / st.rollbacks:.1f} "
              f"pages restored per rollback, {st.full_restores} full restores")
        print("rollback_fuzz: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
