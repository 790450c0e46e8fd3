"""The arbiter against a real etcd member (Debian's etcd-server, started by the test on
loopback): the group's key is created only when absent, bound to a lease; its revision is the
fencing token; a standby takes it only while ``replica`` names it; a lease that runs out or is
revoked frees it; renewals keep it; and an unreachable etcd is an error, never a yes."""
from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from dirtyring.bench.etcd_member import EtcdMember
from dirtyring.cli.child import free_port
from dirtyring.errors import DirtyringError
from dirtyring.replication.arbiter import Arbiter, ArbiterUnavailable, Revoker, parse_endpoints

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def etcd() -> Iterator[str]:
    """One etcd member on loopback, ended by its PID."""
    with EtcdMember() as member:
        yield member.url


_groups = iter(range(1 << 30))


def group() -> str:
    return f"t{time.monotonic_ns()}-{next(_groups)}"


def test_endpoints_are_parsed_and_bad_ones_named() -> None:
    assert parse_endpoints("http://10.0.0.1:2379, 127.0.0.1:23790") == [
        ("http", "10.0.0.1", 2379), ("http", "127.0.0.1", 23790)]
    for bad in ("", "ftp://x:1", "http://:80", "http://h:notaport"):
        with pytest.raises(DirtyringError):
            parse_endpoints(bad)


def test_the_key_is_taken_once_and_its_revision_is_the_fencing_token(etcd: str) -> None:
    g = group()
    a = Arbiter(etcd, g, who="primary", ttl=2, margin=0.5)
    b = Arbiter(etcd, g, who="other", ttl=2, margin=0.5)
    try:
        token = a.acquire(wait=0)
        assert token > 0 and a.may_release()
        owner = a.read()
        assert owner.revision == token and json.loads(owner.holder)["who"] == "primary"
        with pytest.raises(DirtyringError, match="is held by"):
            b.acquire(wait=0.3)
        a.release()
        assert not a.may_release()
        token2 = b.acquire(wait=3)
        assert token2 > token  # revisions only grow: a newer tenure has a larger token
    finally:
        a.release()
        b.release()


def test_a_standby_takes_the_key_only_when_free_and_while_it_is_the_named_replica(
        etcd: str) -> None:
    g = group()
    p = Arbiter(etcd, g, who="primary", ttl=2, margin=0.5)
    s = Arbiter(etcd, g, who="standby", ttl=2, margin=0.5)
    try:
        p.acquire(wait=0)
        assert p.set_replica("aa")
        got = s.take_over("aa")
        assert not got.token and not got.stale and "primary" in got.holder  # held: wait
        assert not s.take_over("bb").token and s.take_over("bb").stale  # not the named one
        Revoker(p.handoff()).revoke()  # as the uplink does when the primary dies
        got = s.take_over("aa")
        assert got.token > p.token and s.may_release()
        assert s.read().replica == ""  # nobody else may take over from the new copy
        assert not p.set_replica("cc")  # the old primary's tenure is over: it must fence
        assert p.lost
    finally:
        p.release()
        s.release()


@pytest.fixture
def pair(etcd: str) -> Iterator[tuple[Arbiter, Arbiter]]:
    """A primary holding a fresh group's key with standby "aa" named, and that standby."""
    g = group()
    p = Arbiter(etcd, g, who="primary", ttl=2, margin=0.5)
    s = Arbiter(etcd, g, who="standby", ttl=2, margin=0.5)
    try:
        p.acquire(wait=0)
        assert p.set_replica("aa")
        yield p, s
    finally:
        p.release()
        s.release()


def test_a_primary_that_went_on_alone_leaves_its_standby_stale(
        pair: tuple[Arbiter, Arbiter]) -> None:
    p, s = pair
    p.set_replica("")  # alone
    p.release()  # even once the key is free
    got = s.take_over("aa")
    assert not got.token and got.stale


def test_renewals_keep_the_key_and_a_lease_left_to_run_out_frees_it(
        pair: tuple[Arbiter, Arbiter]) -> None:
    p, s = pair
    end = time.monotonic() + 3.5  # longer than the TTL: only renewals keep it
    while time.monotonic() < end:
        assert not s.take_over("aa").token
        time.sleep(0.1)
    assert p.may_release() and not p.lost
    p._stop.set()  # renewals stop (a frozen or cut-off primary), the lease is not revoked
    deadline = time.monotonic() + 30
    while not s.take_over("aa").token:
        assert time.monotonic() < deadline, "the lease never ran out"
        time.sleep(0.05)
    # by its own clock the old primary stopped releasing a margin before that
    assert not p.may_release()


def test_an_unreachable_etcd_is_an_error_and_a_dead_member_is_skipped(etcd: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    nobody = Arbiter(dead, group(), who="primary", ttl=2, margin=0.5)
    with pytest.raises(ArbiterUnavailable):
        nobody.acquire(wait=0)
    with pytest.raises(ArbiterUnavailable):
        nobody.take_over("aa")
    assert not nobody.may_release()
    both = Arbiter(f"{dead},{etcd}", group(), who="primary", ttl=2, margin=0.5)
    try:
        assert both.acquire(wait=0) > 0  # the dead member first, then the live one
    finally:
        both.release()
