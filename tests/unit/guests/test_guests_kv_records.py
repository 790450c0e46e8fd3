"""Host-side records of the kvstore guest's device: request validation and the device's saved
state (the host-side queue of requests not yet in the guest's ring)."""
from __future__ import annotations

import pytest

from dirtyring.guests.protocol import KV_GET, KV_PUT
from dirtyring.machine.devices.kv import KvDevice, KvRequest

M64 = (1 << 64) - 1


def _device() -> KvDevice:
    # save/restore only touch the host-side queue, never guest memory.
    return KvDevice(None, lambda kind, payload: None)  # type: ignore[arg-type]


def test_key_zero_is_rejected() -> None:
    with pytest.raises(ValueError, match="keys"):
        KvRequest(id=1, op=KV_PUT, key=0, value=5)
    with pytest.raises(ValueError):
        KvRequest(id=1, op=KV_GET, key=0)


@pytest.mark.parametrize("kw", [dict(key=1 << 64), dict(key=-1), dict(key=1, value=-1),
                                dict(key=1, value=1 << 64)])
def test_key_and_value_ranges(kw: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        KvRequest(id=1, op=KV_PUT, **kw)


@pytest.mark.parametrize("op", [0, 3, -1, 255])
def test_bad_op_is_rejected(op: int) -> None:
    with pytest.raises(ValueError, match="op"):
        KvRequest(id=1, op=op, key=1)


def test_extreme_valid_requests() -> None:
    KvRequest(id=0, op=KV_PUT, key=M64, value=M64)
    KvRequest(id=0xFFFFFFFF, op=KV_GET, key=1)


def test_pending_queue_survives_save_restore() -> None:
    dev = _device()
    reqs = [KvRequest(id=i, op=KV_PUT if i % 2 else KV_GET, key=i + 1, value=(i * 7919) & M64)
            for i in range(300)]
    reqs.append(KvRequest(id=0xFFFFFFFF, op=KV_PUT, key=M64, value=M64))
    for r in reqs:
        dev.submit(r)
    blob = dev.save()
    other = _device()
    other.restore(blob)
    assert list(other._pending) == reqs
    assert other.save() == blob
    empty = _device()
    empty.restore(_device().save())
    assert list(empty._pending) == []


@pytest.mark.parametrize("rid", [1 << 32, (1 << 32) + 7, -1])
def test_request_ids_outside_u32_are_rejected(rid: int) -> None:
    """The guest's ring entry and the saved queue both hold the id as a u32: an id outside
    0..2^32-1 would come back as another id (its response matched to the wrong caller), so it
    is refused when the request is made, before it can reach either."""
    with pytest.raises(ValueError, match="ids are 0..2\\^32-1"):
        KvRequest(id=rid, op=KV_GET, key=1)


@pytest.mark.parametrize("rid", [0, 1, (1 << 32) - 1])
def test_request_ids_at_the_u32_bounds_survive_save_restore(rid: int) -> None:
    req = KvRequest(id=rid, op=KV_GET, key=1)
    dev = _device()
    dev.submit(req)
    other = _device()
    other.restore(dev.save())
    assert list(other._pending) == [req]
    assert other._pending[0].id == rid
