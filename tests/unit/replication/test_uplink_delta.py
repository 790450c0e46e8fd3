"""The uplink's XOR delta against its shadow of the standby's memory (``_delta``), with the
compiled compare and with numpy alone, and ``apply_runs`` writing runs from sparse words
(delta or fresh) or from page data."""
from __future__ import annotations

import sys
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
import pytest

from dirtyring.machine import native
from dirtyring.replication import uplink_process as uplink_process
from dirtyring.machine.checkpoint import apply_runs
from dirtyring.replication.uplink_process import _delta
from dirtyring.wire.pagecodec import decode_pages, encode_pages_parts

PAGE = 4096
WPP = PAGE // 8  # 64-bit words per page
N_SHADOW = 64


@pytest.fixture(params=["c", "numpy"])
def backend(request: pytest.FixtureRequest,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Every test runs with the compiled compare and without it (no compiler on the host)."""
    if request.param == "c":
        assert native.BACKEND == "c-nt", "gcc is part of this machine kind"
        calls: list[int] = []

        def counted(*a: object) -> object:
            calls.append(1)
            return native.sparse_delta(*a)  # type: ignore[arg-type]
        monkeypatch.setattr(uplink_process, "sparse_delta", counted)
        yield "c"
        assert calls, "the compiled compare was used"
    else:
        monkeypatch.setattr(uplink_process, "sparse_delta", lambda *a: None)
        yield "numpy"


def _slot(view: np.ndarray) -> SimpleNamespace:
    return SimpleNamespace(view=view, rows=view.reshape(-1, PAGE))


def shadow_and_data(idx: np.ndarray, changes: dict[int, list[int]],
                    seed: int) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """A random shadow, and staged data for ``idx`` equal to it except at the word offsets
    ``changes[row]`` (row = position in ``idx``), each of which is made to differ.
    Also returns the expected sparse words as (offset into the concatenated pages, xor)."""
    rng = np.random.default_rng(seed)
    shadow = rng.integers(0, 256, (N_SHADOW, PAGE), dtype=np.uint8)
    data = shadow[idx].copy()
    words = data.view(np.uint64)
    expected: list[tuple[int, int]] = []
    for row in sorted(changes):
        for w in sorted(changes[row]):
            x = int(rng.integers(1, 2**63)) | (1 << 63)  # non-zero, top bit set
            words[row, w] ^= np.uint64(x)
            expected.append((row * WPP + w, x))
    return shadow, data, expected


def memory_of(pages: np.ndarray) -> SimpleNamespace:
    """A fake GuestMemory with one slot whose view is a 1-D uint8 copy of ``pages``."""
    view = pages.reshape(-1).copy()
    return SimpleNamespace(slots=[SimpleNamespace(view=view, rows=view.reshape(-1, PAGE))])


CONTIGUOUS = np.arange(20, 28, dtype=np.int64)
SCATTERED = np.array([0, 3, 4, 17, 40, 63], np.int64)


@pytest.mark.parametrize("idx", [CONTIGUOUS, SCATTERED], ids=["contiguous", "scattered"])
@pytest.mark.usefixtures("backend")
def test_small_changes_give_lazy_sparse_words_and_update_the_shadow(idx: np.ndarray) -> None:
    # a few words on most pages; page 1 of the set unchanged; first and last word of a page
    changes = {0: [0, 5, 511], 2: [100], 3: [7, 8, 9, 300]}
    changes[len(idx) - 1] = [0, 256]
    shadow, data, expected = shadow_and_data(idx, changes, seed=1)
    old_shadow, old_data = shadow.copy(), data.copy()

    p = _delta(5, 2, idx, data, shadow)

    assert p.lazy and p.delta
    assert (p.epoch, p.slot, p.page_size) == (5, 2, PAGE)
    assert p.indices.tolist() == idx.tolist()
    assert p.nbytes == len(idx) * PAGE
    assert p.words is not None
    assert p.words[0].tolist() == [w for w, _ in expected]
    assert p.words[1].tolist() == [x for _, x in expected]
    assert np.array_equal(data, old_data), "the staged data is not touched"
    # the shadow now holds the data at those pages, and nothing else moved
    assert np.array_equal(shadow[idx], data)
    others = np.setdiff1d(np.arange(N_SHADOW), idx)
    assert np.array_equal(shadow[others], old_shadow[others])
    # the delta's bytes are the XOR, and applied to the old copy they give the data
    xor = np.frombuffer(p.data, np.uint8).reshape(-1, PAGE)
    assert np.array_equal(old_shadow[idx] ^ xor, data)
    assert not xor[1].any(), "the unchanged page carries no words"


@pytest.mark.parametrize("idx", [CONTIGUOUS, SCATTERED], ids=["contiguous", "scattered"])
@pytest.mark.usefixtures("backend")
def test_unchanged_pages_give_no_words(idx: np.ndarray) -> None:
    shadow, data, _ = shadow_and_data(idx, {}, seed=2)
    old_shadow = shadow.copy()
    p = _delta(1, 0, idx, data, shadow)
    assert p.lazy and p.words is not None
    assert len(p.words[0]) == 0 and len(p.words[1]) == 0
    assert p.data == bytes(len(idx) * PAGE)
    assert np.array_equal(shadow, old_shadow)


@pytest.mark.parametrize("idx", [CONTIGUOUS, SCATTERED], ids=["contiguous", "scattered"])
@pytest.mark.usefixtures("backend")
def test_dense_changes_give_full_xor_data(idx: np.ndarray) -> None:
    rng = np.random.default_rng(3)
    shadow = rng.integers(0, 256, (N_SHADOW, PAGE), dtype=np.uint8)
    old_shadow = shadow.copy()
    data = rng.integers(0, 256, (len(idx), PAGE), dtype=np.uint8)  # whole pages new
    data[1] = shadow[idx[1]]  # one page unchanged: its XOR is zero
    old_data = data.copy()

    p = _delta(9, 1, idx, data, shadow)

    assert not p.lazy and p.delta
    assert (p.epoch, p.slot) == (9, 1) and p.indices.tolist() == idx.tolist()
    assert p.data == (old_data ^ old_shadow[idx]).tobytes()
    assert np.array_equal(data, old_data)
    assert np.array_equal(shadow[idx], data)
    others = np.setdiff1d(np.arange(N_SHADOW), idx)
    assert np.array_equal(shadow[others], old_shadow[others])


@pytest.mark.parametrize("idx", [np.array([10, 11], np.int64), np.array([10, 30], np.int64)],
                         ids=["contiguous", "scattered"])
@pytest.mark.usefixtures("backend")
def test_sparse_up_to_one_eighth_of_the_words(idx: np.ndarray) -> None:
    limit = len(idx) * WPP // 8
    at_limit = {0: list(range(0, limit, 2)), 1: list(range(1, limit, 2))}
    assert sum(map(len, at_limit.values())) == limit
    shadow, data, expected = shadow_and_data(idx, at_limit, seed=4)
    p = _delta(1, 0, idx, data, shadow)
    assert p.lazy and p.words is not None and len(p.words[0]) == limit
    assert np.array_equal(shadow[idx], data)

    one_more = {0: at_limit[0] + [500], 1: at_limit[1]}
    shadow, data, _ = shadow_and_data(idx, one_more, seed=4)
    old = shadow[idx].copy()
    p = _delta(1, 0, idx, data, shadow)
    assert not p.lazy
    assert p.data == (data ^ old).tobytes()
    assert np.array_equal(shadow[idx], data)


@pytest.mark.usefixtures("backend")
def test_successive_deltas_track_the_standby() -> None:
    """Epoch after epoch, applying each delta to the standby's memory keeps it equal to the
    staged data, and the shadow equal to the standby."""
    rng = np.random.default_rng(5)
    standby = memory_of(np.zeros((N_SHADOW, PAGE), np.uint8))
    shadow = np.zeros((N_SHADOW, PAGE), np.uint8)
    truth = np.zeros((N_SHADOW, PAGE), np.uint8)
    for epoch, idx in enumerate([CONTIGUOUS, SCATTERED, CONTIGUOUS, np.arange(N_SHADOW)], 1):
        if epoch == 4:  # everything rewritten: the dense path
            truth[idx] = rng.integers(0, 256, (len(idx), PAGE), dtype=np.uint8)
        else:
            for i in idx:
                w = rng.choice(WPP, 3, replace=False)
                truth[i].view(np.uint64)[w] = rng.integers(1, 2**63, 3, dtype=np.uint64)
        p = _delta(epoch, 0, idx, truth[idx].copy(), shadow)
        assert p.lazy is (epoch != 4)
        got = decode_pages(memoryview(b"".join(bytes(b) for b in encode_pages_parts(p))),
                           1 << 30)
        apply_runs(standby, [(0, got.indices, None if got.lazy else got.data, True, got.words)])
        assert np.array_equal(standby.slots[0].view.reshape(-1, PAGE), truth), epoch
        assert np.array_equal(shadow, truth), epoch


# ------------------------------------------------------------------ apply_runs


def two_slot_memory(seed: int) -> SimpleNamespace:
    rng = np.random.default_rng(seed)
    return SimpleNamespace(slots=[
        _slot(rng.integers(0, 256, 16 * PAGE, dtype=np.uint8)),
        _slot(rng.integers(0, 256, 32 * PAGE, dtype=np.uint8))])


PAGES = np.array([1, 2, 7, 30], np.int64)
WHERE = np.array([0, 3, 511, 512, 1000, 3 * WPP + 17, 3 * WPP + 511], np.int64)
VALS = np.array([1, 2**64 - 1, 0x0123456789ABCDEF, 5, 1 << 63, 42, 7], np.uint64)


def word_at(view: np.ndarray, page: int, word: int) -> int:
    return int.from_bytes(view[page * PAGE + word * 8:page * PAGE + word * 8 + 8].tobytes(),
                          sys.byteorder)


def test_apply_delta_words_xors_only_those_words() -> None:
    mem, before = two_slot_memory(6), two_slot_memory(6)
    n = apply_runs(mem, [(1, PAGES, None, True, (WHERE, VALS))])
    assert n == len(PAGES)
    view, old = mem.slots[1].view, before.slots[1].view
    for w, v in zip(WHERE.tolist(), VALS.tolist()):
        page, word = int(PAGES[w // WPP]), w % WPP
        assert word_at(view, page, word) == word_at(old, page, word) ^ v
    changed = set(np.flatnonzero(view.view(np.uint64) != old.view(np.uint64)).tolist())
    assert changed == {int(PAGES[w // WPP]) * WPP + w % WPP for w in WHERE.tolist()}
    assert np.array_equal(mem.slots[0].view, before.slots[0].view), "other slot untouched"


def test_apply_fresh_words_zeroes_the_pages_then_sets_the_words() -> None:
    mem, before = two_slot_memory(7), two_slot_memory(7)
    n = apply_runs(mem, [(1, PAGES, None, False, (WHERE, VALS))])
    assert n == len(PAGES)
    view, old = mem.slots[1].view.reshape(-1, PAGE), before.slots[1].view.reshape(-1, PAGE)
    expected = np.zeros((len(PAGES), WPP), np.uint64)
    for w, v in zip(WHERE.tolist(), VALS.tolist()):
        expected[w // WPP, w % WPP] = v
    assert np.array_equal(view[PAGES].view(np.uint64), expected)
    assert not view[PAGES[2]].any(), "a page without words ends up all zero"
    others = np.setdiff1d(np.arange(32), PAGES)
    assert np.array_equal(view[others], old[others])
    assert np.array_equal(mem.slots[0].view, before.slots[0].view)


def test_apply_plain_and_delta_data_runs() -> None:
    rng = np.random.default_rng(8)
    mem, before = two_slot_memory(9), two_slot_memory(9)
    fresh = rng.integers(0, 256, (len(PAGES), PAGE), dtype=np.uint8)
    xor = rng.integers(0, 256, (3, PAGE), dtype=np.uint8)
    delta_pages = np.array([0, 5, 15], np.int64)
    n = apply_runs(mem, [(1, PAGES, fresh.tobytes()),
                         (0, delta_pages, xor.tobytes(), True)])
    assert n == len(PAGES) + len(delta_pages)
    v1, o1 = mem.slots[1].view.reshape(-1, PAGE), before.slots[1].view.reshape(-1, PAGE)
    assert np.array_equal(v1[PAGES], fresh)
    others = np.setdiff1d(np.arange(32), PAGES)
    assert np.array_equal(v1[others], o1[others])
    v0, o0 = mem.slots[0].view.reshape(-1, PAGE), before.slots[0].view.reshape(-1, PAGE)
    assert np.array_equal(v0[delta_pages], o0[delta_pages] ^ xor)
    others = np.setdiff1d(np.arange(16), delta_pages)
    assert np.array_equal(v0[others], o0[others])


@pytest.mark.parametrize("pages", [PAGES, np.arange(9, 13, dtype=np.int64)],
                         ids=["scattered", "one-run"])
@pytest.mark.parametrize("delta", [True, False])
def test_words_and_data_runs_agree(delta: bool, pages: np.ndarray) -> None:
    """The same run given as words or as its bytes writes the same memory."""
    flat = np.zeros(len(pages) * WPP, np.uint64)
    flat[WHERE] = VALS
    data = flat.tobytes()
    by_words, by_data = two_slot_memory(10), two_slot_memory(10)
    apply_runs(by_words, [(1, pages, None, delta, (WHERE, VALS))])
    apply_runs(by_data, [(1, pages, data, delta)])
    assert np.array_equal(by_words.slots[1].view, by_data.slots[1].view)
    assert not np.array_equal(by_words.slots[1].view, two_slot_memory(10).slots[1].view)
    # with both given, a fresh run still writes its full content
    both = two_slot_memory(10)
    apply_runs(both, [(1, pages, data, delta, (WHERE, VALS))])
    assert np.array_equal(both.slots[1].view, by_data.slots[1].view)
