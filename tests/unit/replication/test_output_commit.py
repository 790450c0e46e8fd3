"""Output commit: nothing is released before its checkpoint is acknowledged."""
from __future__ import annotations

import threading

from dirtyring.replication.output_commit import OutputGate


def test_output_waits_for_its_epoch() -> None:
    out: list[tuple[str, object, int]] = []
    g = OutputGate(lambda k, p, e: out.append((k, p, e)))
    g.emit("kv", "a")            # epoch 1
    g.advance(2)                 # checkpoint 1 captured
    g.emit("kv", "b")            # epoch 2
    assert out == []
    g.commit(1)
    assert out == [("kv", "a", 1)]
    g.advance(3)
    g.commit(2)
    assert out == [("kv", "a", 1), ("kv", "b", 2)]
    assert g.violations == 0 and g.statistics().held == 0


def test_ack_is_cumulative_and_order_is_kept() -> None:
    out: list[object] = []
    g = OutputGate(lambda k, p, e: out.append(p))
    for epoch in range(1, 6):
        g.emit("console", epoch)
        g.advance(epoch + 1)
    g.commit(4)
    assert out == [1, 2, 3, 4]
    g.commit(2)  # an older ack changes nothing
    assert out == [1, 2, 3, 4]


def test_unhold_releases_everything_when_the_standby_is_lost() -> None:
    out: list[object] = []
    g = OutputGate(lambda k, p, e: out.append(p))
    g.emit("kv", 1)
    g.advance(2)
    g.emit("kv", 2)
    g.unhold()
    assert out == [1, 2]
    g.emit("kv", 3)  # unprotected: straight out
    assert out == [1, 2, 3]


def test_unsafe_mode_releases_at_once() -> None:
    out: list[object] = []
    g = OutputGate(lambda k, p, e: out.append(p), hold=False)
    g.emit("kv", 1)
    assert out == [1]


def test_concurrent_emitters_lose_nothing() -> None:
    out: list[object] = []
    lock = threading.Lock()

    def rel(k: str, p: object, e: int) -> None:
        with lock:
            out.append(p)
    g = OutputGate(rel)
    ts = [threading.Thread(target=lambda i=i: [g.emit("kv", (i, j)) for j in range(500)])
          for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    g.advance(2)
    g.commit(1)
    assert len(out) == 2000


def test_two_committing_threads_release_in_order() -> None:
    """The epoch loop and the uplink's ack reader may both commit: output still leaves in
    the order it was produced (a slow release would otherwise let the later commit overtake)."""
    import time
    out: list[int] = []

    def slow_release(kind: str, payload: object, epoch: int) -> None:
        time.sleep(0.0005)
        out.append(int(payload))  # type: ignore[call-overload]

    g = OutputGate(slow_release, hold=True)
    for i in range(40):
        g.advance(i // 10 + 1)
        g.emit("x", i)
    first = threading.Thread(target=g.commit, args=(2,))
    first.start()
    time.sleep(0.002)  # the first commit is releasing epochs 1-2 now
    g.commit(4)
    first.join()
    assert out == list(range(40))


def test_each_released_piece_is_reported_delivered_after_its_release() -> None:
    """A Linux program's stdio device forgets a chunk only once it was written: the hook runs
    after the release, never for a piece still held or dropped."""
    log: list[str] = []
    g = OutputGate(lambda k, p, e: log.append(f"release {p}"), hold=True,
                   delivered=lambda k: log.append(f"delivered {k}"))
    g.emit("stdout", "a")
    g.advance(2)
    g.emit("stderr", "b")
    assert log == []
    g.commit(1)
    assert log == ["release a", "delivered stdout"]
    g.drop()
    assert log == ["release a", "delivered stdout"]


def test_releasing_alone_while_statistics_are_read_raises_nothing() -> None:
    """Alone (released at once) on several threads while another reads the statistics (a
    fold of the delay window): a copy of the window that meets an append is taken again, never
    'deque mutated during iteration' (which once killed a degraded primary)."""
    out: list[object] = []
    g = OutputGate(lambda k, p, e: out.append(p), hold=False)
    errors: list[BaseException] = []

    def emit(base: int) -> None:
        for i in range(20000):
            g.emit("kv", base + i)

    def read() -> None:
        try:
            for _ in range(2000):
                g.statistics()
        except BaseException as e:  # (reported below, not lost on the thread)
            errors.append(e)

    threads = [threading.Thread(target=emit, args=(n * 100000,)) for n in range(3)]
    threads.append(threading.Thread(target=read))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(out) == 60000 and g.statistics().released == 60000
