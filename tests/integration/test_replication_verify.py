"""Verify mode over real KVM and loopback TCP: the standby's committed memory must equal the
primary's paused guest at every epoch (the primary sends a memory digest with each EpochEnd, the
standby recomputes it after the commit), for thousands of epochs and several write patterns;
and a standby whose committed memory goes bad must notice, ask for a full resync, and be clean
again afterwards."""
from __future__ import annotations

import os
import signal
import sys

import numpy as np
import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # repl_helpers sits beside the tests; works in any import mode
    sys.path.insert(0, _HERE)
from repl_helpers import (  # noqa: E402
    HB_CALM, PATIENCE, Spawner, StandbyThread, control, failover_cli, free_port, spawn,
    wait_advancing,
)

__all__ = ["spawn"]  # the fixture, imported so pytest finds it

#: Epochs per verify run (REPL_VERIFY_EPOCHS overrides all of them). A verified epoch costs a
#: blake2b digest of all guest memory, the 4 MiB system slot included, on each side: ~10 ms
#: alone, ~15-30 ms with both sides and the guest sharing two cores, so these runs went at
#: ~30-50 epochs/s when written and the counts are what fits the suite's time budget there. A
#: slower host takes longer: a run only fails if its commits stop advancing.
EPOCHS = int(os.environ.get("REPL_VERIFY_EPOCHS", "0"))
#: 1 MiB of data = 256 pages; at 5000 writes/s and ~20-30 ms epochs a random epoch dirties about
#: a third of them and a sequential one a moving run of ~100: real deltas, not full copies.
#: (How many depends on how long an epoch takes, i.e. on the host: the figure is printed, not
#: asserted.)
DATA = "1M"
RATE = ["--rate", "5000"]


@pytest.mark.slow
@pytest.mark.parametrize("name,extra,epochs", [
    ("random", ["--pattern", "random", *RATE], 3000),
    ("sequential", ["--pattern", "sequential", *RATE], 1000),
    ("random-2vcpu", ["--pattern", "random", *RATE, "--vcpus", "2"], 1000),
    # A steady hot set: most checkpoints go through the steady pause (one native call).
    ("hotset", ["--tracker", "hotset", "--pattern", "hot", *RATE], 1000),
])
def test_verify_mode_thousands_of_epochs_without_mismatch(spawn: Spawner, name: str,
                                                          extra: list[str], epochs: int) -> None:
    """Digest checked at every commit; none may differ, none may be skipped, none resynced."""
    epochs = EPOCHS or epochs
    sport, cport = free_port(), free_port()
    sb = spawn.standby(sport, "--verify", control=cport, hb_timeout=HB_CALM)
    pr = spawn.primary("dirtier", sport, "--verify", *extra, memory=DATA, hb_timeout=HB_CALM)
    assert pr.wait_event("protected", PATIENCE) is not None, pr.describe()

    def healthy() -> None:
        assert not sb.of("verify_mismatch"), sb.of("verify_mismatch")[:3]
        assert pr.alive(), (pr.of("fenced"), sb.of("primary_lost"), pr.describe(),
                            sb.describe())

    # However long this host takes, as long as commits keep coming.
    wait_advancing(lambda: int(control(cport)["committed_epoch"]), epochs, check=healthy)
    if name == "hotset":
        # ... and until the steady pause has taken more than half as many checkpoints.
        wait_advancing(lambda: int(pr.last_stats.get("steady_pauses", 0)), epochs // 2 + 1,
                       check=healthy)

    # The status through the real command, while the primary still runs.
    st = failover_cli(cport, status_only=True, env=spawn.env)
    assert st["state"] == "protected" and st["consistent"] is True, st
    assert st["committed_epoch"] >= epochs
    assert st["mismatches"] == 0, st
    # Every epoch 1..N was committed, one by one (no epoch skipped or merged).
    assert st["epochs"] == st["committed_epoch"], st
    assert st["rejected"] == 0, st

    pr.signal(signal.SIGTERM)
    assert pr.wait_exit(PATIENCE) is not None, pr.describe()
    assert sb.of("verify_mismatch") == [], sb.of("verify_mismatch")[:3]
    assert pr.of("resync_requested") == [], pr.of("resync_requested")[:3]
    assert not pr.of("degraded"), pr.of("degraded")
    done = pr.of("done")
    assert done, pr.describe()
    assert done[-1]["epoch"] >= epochs and done[-1]["resyncs"] == 0, done[-1]
    assert done[-1]["output_violations"] == 0
    if name == "hotset":
        assert done[-1]["steady_pauses"] > epochs // 2, done[-1]
    # The epochs carried the guest's writes (how many pages each depends on the host's speed).
    print(f"{name}: {st['committed_epoch']} verified epochs, "
          f"{done[-1]['dirty_pages_per_epoch']:.0f} dirty pages per epoch")
    assert done[-1]["dirty_pages_per_epoch"] >= 1, done[-1]


def test_verify_detects_corrupted_standby_memory_and_resyncs(spawn: Spawner) -> None:
    """Flip one byte of the standby's committed memory in a page the guest never writes: the
    next verified commit must report verify_mismatch and drop consistency, the standby sends
    Resync, the primary answers with a full epoch, and from then on commits verify clean."""
    port = free_port()
    s = StandbyThread(port, spawn.key, verify=True, heartbeat_timeout=30.0,
                      auto_failover=False)
    try:
        pr = spawn.primary("dirtier", port, "--verify", "--pattern", "hot", "--hot-pages", "16",
                           memory="4M", hb_timeout=HB_CALM)
        assert pr.wait_event("protected", 60) is not None, pr.describe()
        assert s.wait(lambda: len(s.commits) >= 20, 60), (s.commits[-3:], pr.describe())
        assert s.sb.mismatches == 0 and s.sb.consistent
        assert not s.of("verify_mismatch")

        m = s.sb.machine
        assert m is not None and m.memory is not None
        view = m.memory.slots[1].view          # data slot: the dirtier writes pages 0..15 only
        off = 1000 * 4096 + 123
        before = int(view[off])
        with s.lock:
            n0 = len(s.commits)
        view[off] = before ^ 0x5A             # the corruption

        assert s.wait(lambda: s.of("verify_mismatch") != [], 30), (s.commits[-3:], s.events)
        bad = s.of("verify_mismatch")[0]
        assert bad["epoch"] >= s.commits[n0 - 1][0]
        # The primary heard the Resync and sent a full epoch after the mismatch ...
        assert pr.wait_event("resync_requested", 30) is not None, pr.describe()
        assert s.wait(lambda: any(k == "full" and e > bad["epoch"] for e, k, _, _ in s.commits),
                      30), s.commits[-10:]
        # ... which repaired the page, and later commits verify clean again.
        assert s.wait(lambda: len(s.commits) >= n0 + 120, 60), s.commits[-3:]
        with s.lock:
            commits = list(s.commits)
        full_i = next(i for i, c in enumerate(commits) if c[1] == "full" and c[0] > bad["epoch"])
        # Between the corruption and the full epoch the standby never claimed consistency.
        first_bad = next(i for i, c in enumerate(commits) if c[0] == bad["epoch"])
        assert all(not c[2] for c in commits[first_bad:full_i]), commits[first_bad:full_i + 1]
        settled = commits[-60:]
        assert all(c[2] for c in settled), settled          # consistent again
        assert len({c[3] for c in settled}) == 1, settled   # mismatches stopped growing
        assert int(view[off]) == before                     # the byte is the primary's again
        assert s.sb.consistent and s.sb.state == "protected"
        assert s.sb.mismatches >= 1
        st = s.sb.status()
        assert st["consistent"] is True, st
        assert pr.alive() and not pr.of("degraded"), pr.describe()
    finally:
        for p in spawn.procs:
            p.end()
        s.close()


@pytest.mark.slow
def test_a_new_session_full_sync_replaces_what_an_earlier_primary_left(spawn: Spawner) -> None:
    """A full epoch is all of memory: the primary sends only pages that hold data, and the
    standby zeroes its memory before applying it. A standby that still holds a finished
    session's pages must end up equal to the new primary's guest, which has not written most
    of them yet: its first verified commits must be clean."""
    port = free_port()
    s = StandbyThread(port, spawn.key, verify=True, heartbeat_timeout=30.0,
                      auto_failover=False)
    args = ["--verify", "--pattern", "random", "--rate", "50"]
    try:
        first = spawn.primary("dirtier", port, *args, "--seconds", "4", memory="1M",
                              hb_timeout=HB_CALM)
        assert first.wait_exit(60) == 0, first.describe()
        m = s.sb.machine
        assert m is not None and m.memory is not None
        left = int(np.count_nonzero(m.memory.slots[1].view.reshape(-1, 4096).any(axis=1)))
        assert left >= 50, f"the first guest left only {left} non-zero data pages"
        n0 = len(s.commits)
        second = spawn.primary("dirtier", port, *args, memory="1M", hb_timeout=HB_CALM)
        assert second.wait_event("protected", 60) is not None, second.describe()
        assert s.wait(lambda: len(s.commits) >= n0 + 20, 60), s.commits[-3:]
        assert not s.of("verify_mismatch"), s.of("verify_mismatch")[:3]
        with s.lock:
            fresh = s.commits[n0:]
        assert fresh[0][1] == "full" and all(c[3] == 0 for c in fresh), fresh[:5]
    finally:
        for p in spawn.procs:
            p.end()
        s.close()
