"""A machine configuration also arrives from the network (a primary's Hello) and from snapshot
files: anything but a well-typed one is a ConfigError with the reason, never a later crash."""
from __future__ import annotations

import pytest

from dirtyring.errors import ConfigError
from dirtyring.machine.config import MachineConfig


def test_a_configuration_survives_its_json() -> None:
    c = MachineConfig(guest="kvstore", vcpus=2, data_slots=(4096, 8192), tracker="hotset")
    assert MachineConfig.from_json(c.to_json()) == c


@pytest.mark.parametrize("old,new,why", [
    (b'"vcpus": 1', b'"vcpus": 1.5', "vcpus must be an integer"),
    (b'"vcpus": 1', b'"vcpus": true', "vcpus must be an integer"),
    (b'"data_slots": [67108864]', b'"data_slots": [4096.0]', "data_slots"),
    (b'"data_slots": [67108864]', b'"data_slots": [-4096]', "data_slots"),
    (b'"kvmclock": false', b'"kvmclock": 0', "kvmclock"),
    (b'"hot_pages": 64', b'"hot_pages": "64"', "guest parameters"),
    (b'"guest": "dirtier"', b'"guest": 3', "guest and tracker"),
])
def test_a_badly_typed_field_is_named(old: bytes, new: bytes, why: str) -> None:
    good = MachineConfig().to_json()
    assert old in good
    with pytest.raises(ConfigError, match=why):
        MachineConfig.from_json(good.replace(old, new))


@pytest.mark.parametrize("doc", [b"[1]", b'"x"', b"null", b"{}", b'{"params": 1}', b"{"])
def test_not_a_configuration_object_is_malformed(doc: bytes) -> None:
    with pytest.raises(ConfigError, match="malformed"):
        MachineConfig.from_json(doc)
