"""The scripting layer's checks and plumbing that need no KVM: addresses (port 0 allowed), key
rules, and the event queue the handles drain."""
from __future__ import annotations

import threading
import time

import pytest

from dirtyring.errors import ConfigError
from dirtyring.replication.api import _addr, _Events, standby


def test_addresses_accept_port_zero_and_tuples() -> None:
    assert _addr("127.0.0.1:0") == ("127.0.0.1", 0)
    assert _addr(":0") == ("127.0.0.1", 0)
    assert _addr("10.0.0.2:7000") == ("10.0.0.2", 7000)
    assert _addr(("::1", "7000")) == ("::1", 7000)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        _addr("nowhere")


def test_standby_refuses_bad_keys_before_building_anything() -> None:
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        standby("127.0.0.1:0", b"short")
    with pytest.raises(ConfigError, match="no key"):
        standby("127.0.0.1:0", b"k" * 32, insecure=True)


def test_events_are_queued_passed_on_and_drained_once() -> None:
    seen: list[dict[str, object]] = []
    ev = _Events(seen.append)
    ev({"event": "a"})
    ev({"event": "b"})
    assert [e["event"] for e in ev.drain(None)] == ["a", "b"]
    assert list(ev.drain(None)) == []  # drained
    assert [e["event"] for e in seen] == ["a", "b"]
    assert ev.wait("b", 0) == {"event": "b"}  # wait_for looks at everything seen
    assert ev.wait("c", 0) is None


def test_drain_with_a_timeout_waits_for_late_events() -> None:
    ev = _Events(None)
    threading.Timer(0.05, lambda: ev({"event": "late"})).start()
    t0 = time.monotonic()
    got = [e["event"] for e in ev.drain(0.3)]
    assert got == ["late"] and time.monotonic() - t0 >= 0.25
