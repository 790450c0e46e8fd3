"""Shared test fixtures. KVM tests are marked ``kvm`` and skipped only where /dev/kvm is absent;
``.ci/run`` fails the run if /dev/kvm exists and any KVM test was skipped."""
from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

HAVE_KVM = os.path.exists("/dev/kvm")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="KVM_SKIP: /dev/kvm is absent on this host")
    for item in items:
        if "/tests/kvm/" in str(item.fspath) or "/tests/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.kvm)
        if item.get_closest_marker("kvm") and not HAVE_KVM:
            item.add_marker(skip)


@pytest.fixture
def make_machine() -> Iterator:
    """Build machines that are always closed (threads joined, fds and memory released)."""
    from dirtyring.machine.config import MachineConfig
    from dirtyring.machine.vm import Machine

    made: list[Machine] = []

    def make(**kw: object) -> Machine:
        m = Machine(MachineConfig(**kw))  # type: ignore[arg-type]
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


_skipped_kvm: list[str] = []


@pytest.fixture
def machines() -> Iterator[list]:
    """A list the test appends the machines it builds to; all are closed at its end."""
    made: list = []
    yield made
    for m in made:
        m.close()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and "kvm" in report.keywords and not hasattr(report, "wasxfail"):
        _skipped_kvm.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Where /dev/kvm exists, a skipped KVM test is a failure of the run (ground rule)."""
    if HAVE_KVM and _skipped_kvm:
        print(f"\nERROR: /dev/kvm exists but {len(_skipped_kvm)} KVM test(s) were skipped:")
        for n in _skipped_kvm[:20]:
            print(f"  {n}")
        session.exitstatus = 1
