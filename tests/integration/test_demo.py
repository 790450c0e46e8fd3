"""The README's main job, as a user runs it: ``dirtyring demo --kill-after 2 --json``. A
key-value guest protected by a local standby under client load; the primary is killed (-9);
the standby must take over, every write a client saw acknowledged must be on it, and no
response from an uncommitted checkpoint may have been released. The demo states that verdict
in its last JSON record; this test checks the verdict and that it is made of real figures.

No speed is assumed: the demo waits for each step with generous deadlines, and this test gives
the whole run minutes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

DEADLINE_S = 300.0


def _run_demo(*args: str) -> tuple[int, list[dict[str, Any]], str]:
    """Run the demo in a session of its own; on a hang, interrupt it (its ``finally`` ends its
    children by PID), and as a last resort kill that session's processes."""
    p = subprocess.Popen([sys.executable, "-m", "dirtyring.cli.main", "demo", *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         stdin=subprocess.DEVNULL, start_new_session=True,
                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        out, err = p.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGINT)
        try:
            out, err = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # the group this test created, by its id
            out, err = p.communicate()
        raise AssertionError(f"the demo did not finish within {DEADLINE_S:g} s: "
                             f"{out[-2000:]} {err[-2000:]}") from None
    records = []
    for line in out.splitlines():
        rec = json.loads(line)  # --json: every stdout line is one JSON record
        assert isinstance(rec, dict) and "event" in rec, line
        records.append(rec)
    return p.returncode, records, err


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_demo_kill_after_2_json_proves_no_acknowledged_write_lost() -> None:
    rc, recs, err = _run_demo("--kill-after", "2", "--json")
    kinds = [r["event"] for r in recs]
    assert recs and kinds[-1] == "verdict", (kinds, err[-2000:])
    v = recs[-1]
    assert kinds.count("verdict") == 1, kinds
    assert v["ok"] is True and rc == 0, (v, err[-2000:])
    # The verdict is made of real figures, and "ok" follows from them.
    assert v["acked"] > 0, v  # something to prove: writes were acknowledged before the kill
    assert v["missing"] == 0, v  # every one of them is on the standby
    # Responses carry their checkpoint's epoch; the first consistent one is epoch 2.
    assert 2 <= v["max_released_epoch"] <= v["committed_epoch"], v
    assert v["took_over"] is True and v["client_errors"] == 0, v
    # The story, in order: started (with the PIDs), protected, the kill, the takeover.
    start = recs[0]
    assert start["event"] == "demo" and start["primary_pid"] != start["standby_pid"], start
    killed = [i for i, r in enumerate(recs)
              if r["event"] == "demo" and f"kill -9 {start['primary_pid']}" in r["msg"]]
    took = [i for i, r in enumerate(recs) if r["event"] == "failover"]
    assert len(killed) == 1 and len(took) == 1 and killed[0] < took[0], kinds
    f = recs[took[0]]
    assert f["kill_to_resume_ms"] > 0 and f["detect_to_resume_ms"] > 0, f
    assert f"committed epoch {v['committed_epoch']}" in f["msg"], (f, v)
    # The demo ended what it started.
    assert _gone(start["primary_pid"]) and _gone(start["standby_pid"]), start


def test_demo_help_documents_the_json_verdict() -> None:
    r = subprocess.run([sys.executable, "-m", "dirtyring.cli.main", "demo", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for word in ("--json", "verdict", "acked", "missing", "max_released_epoch",
                 "committed_epoch", "ok"):
        assert word in text, word
