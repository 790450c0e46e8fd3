"""Applying a received delta from its sparse words gives the same memory as XOR-ing the whole
pages, and a decoded wire frame carries the words that make that possible."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from dirtyring.machine.checkpoint import apply_runs
from dirtyring.wire.pagecodec import decode_pages, encode_pages_parts
from dirtyring.wire import Pages

PAGE = 4096


def fake_memory(pages: int, seed: int) -> SimpleNamespace:
    rng = np.random.default_rng(seed)
    view = rng.integers(0, 256, pages * PAGE, dtype=np.uint8)
    return SimpleNamespace(slots=[SimpleNamespace(view=view, rows=view.reshape(-1, PAGE))])


def test_sparse_delta_apply_equals_whole_page_xor() -> None:
    rng = np.random.default_rng(7)
    pages = np.array([0, 3, 4, 5, 40, 63], np.int64)
    delta = np.zeros((len(pages), PAGE), np.uint8)
    for i in range(len(pages)):
        at = rng.integers(0, PAGE - 24)
        delta[i, at:at + 24] = rng.integers(1, 256, 24, dtype=np.uint8)
    ev = Pages(epoch=2, slot=0, page_size=PAGE, pages=pages, data=delta.tobytes(), delta=True)
    got = decode_pages(memoryview(b"".join(encode_pages_parts(ev))), 1 << 30)
    assert got.words is not None and len(got.words[0]) < len(pages) * PAGE // 8 // 8
    a, b = fake_memory(64, 1), fake_memory(64, 1)
    apply_runs(a, [(0, got.indices, got.data, True, got.words)])   # sparse path
    apply_runs(b, [(0, got.indices, got.data, True)])              # whole pages
    assert np.array_equal(a.slots[0].view, b.slots[0].view)
    before = fake_memory(64, 1).slots[0].view.reshape(-1, PAGE)
    changed = np.flatnonzero((a.slots[0].view.reshape(-1, PAGE) != before).any(axis=1))
    assert set(changed.tolist()) == set(pages.tolist())
