"""The events that carry guest pages: :class:`Pages` (one slot's pages) and
:class:`Checkpoint` (a whole epoch: its pages and machine state at once).

Don't subclass these: the codec and the state tables dispatch on the exact type.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from dirtyring.errors import LocalProtocolError

from .values import (EPOCH_KINDS, MAX_DIGEST_LEN, MAX_PAGE_SIZE, MIN_PAGE_SIZE, U32_MAX,
                     Event, check_bytes, check_choice, check_uint, set_field)

__all__ = ["Pages", "Checkpoint"]


@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Pages(Event):
    """A batch of guest pages of one memory slot, in ascending page-index order.

    ``pages`` may be given as a tuple or any integer array; it is stored as a read-only 1-D
    ``numpy.int64`` array (use :attr:`indices` for a precisely typed view). Indices must be
    strictly increasing so the codec can find runs with one vectorized pass and the receiver can
    apply them in one sweep. ``data`` holds ``len(pages) * page_size`` bytes, page ``i`` at
    ``data[i*page_size:(i+1)*page_size]``. With ``delta`` the data is the XOR of the new
    contents with the receiver's copy (mostly zero when a page changed a little: the codec
    sends sparse words). Equality compares values (arrays by content)."""

    epoch: int
    slot: int
    page_size: int
    pages: npt.NDArray[np.int64] | tuple[int, ...]
    data: bytes
    delta: bool = False
    #: Set by the decoder when the frame carried only the non-zero 64-bit words of ``data``:
    #: (word offsets into ``data``, their values). A receiver can apply a mostly-zero delta
    #: from these without touching every byte. Not part of equality.
    words: tuple[npt.NDArray[np.int64], npt.NDArray[np.uint64]] | None = field(
        default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        set_field(self, "epoch", check_uint("epoch", self.epoch))
        set_field(self, "slot", check_uint("slot", self.slot, U32_MAX))
        ps = check_uint("page_size", self.page_size, U32_MAX)
        if ps < MIN_PAGE_SIZE or ps > MAX_PAGE_SIZE or ps & (ps - 1):
            raise LocalProtocolError(
                f"page_size={ps} must be a power of two in [{MIN_PAGE_SIZE}, {MAX_PAGE_SIZE}]")
        set_field(self, "page_size", ps)
        given = isinstance(self.pages, np.ndarray)
        try:
            raw = self.pages if given else np.asarray(self.pages)
        except (TypeError, ValueError, OverflowError) as exc:
            raise LocalProtocolError(f"pages must be integer page indices: {exc}") from None
        assert isinstance(raw, np.ndarray)
        if raw.ndim != 1 or raw.size == 0:
            raise LocalProtocolError("pages must be a non-empty 1-D sequence of page indices")
        if raw.dtype.kind not in "iu":  # floats would truncate silently, bools are a bug
            raise LocalProtocolError(f"pages must be integer page indices, not {raw.dtype}")
        if raw.dtype == np.uint64 and raw.size and int(raw.max()) > np.iinfo(np.int64).max:
            raise LocalProtocolError("page index does not fit in int64")
        # Own an immutable copy: the caller may reuse its array for the next harvest.
        idx = raw.astype(np.int64, copy=given)
        if idx[0] < 0:
            raise LocalProtocolError("page indices must be non-negative")
        if idx.size > 1 and not (idx[1:] > idx[:-1]).all():
            raise LocalProtocolError("page indices must be strictly increasing")
        idx.setflags(write=False)
        set_field(self, "pages", idx)
        data = check_bytes("data", self.data)
        if len(data) != idx.size * ps:
            raise LocalProtocolError(
                f"data is {len(data)} bytes, expected {idx.size} pages * {ps} = {idx.size * ps}")
        set_field(self, "data", data)

    @classmethod
    def decoded(cls, *, epoch: int, slot: int, page_size: int, pages: npt.NDArray[np.int64],
                data: bytes | None, delta: bool,
                words: tuple[npt.NDArray[np.int64], npt.NDArray[np.uint64]] | None = None
                ) -> Pages:
        """Build from values already checked (by the wire decoder, or our own sender) without
        checking them again: replication builds thousands a second. ``data=None`` with
        ``words`` (increasing word offsets, all other words zero) builds the bytes only when
        read: whoever works from the words never pays for 256 KiB of mostly zero bytes."""
        obj = object.__new__(cls)
        pages.setflags(write=False)
        put = object.__setattr__  # (a loop over set_field was ~5 % of a standby's time)
        put(obj, "epoch", epoch)
        put(obj, "slot", slot)
        put(obj, "page_size", page_size)
        put(obj, "pages", pages)
        put(obj, "data", data)
        put(obj, "delta", delta)
        put(obj, "words", words)
        return obj

    @property
    def nbytes(self) -> int:  # of page data, without building lazy data
        return len(self.pages) * self.page_size

    @property
    def lazy(self) -> bool:  # is ``data`` still only its sparse ``words``?
        return _PAGES_DATA.__get__(self, Pages) is None

    @property
    def indices(self) -> npt.NDArray[np.int64]:
        """The page indices as the read-only int64 array they are stored as."""
        assert isinstance(self.pages, np.ndarray)
        return self.pages

    @property
    def n_pages(self) -> int:
        return len(self.pages)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Pages):
            return NotImplemented
        return (self.epoch == other.epoch and self.slot == other.slot
                and self.page_size == other.page_size and self.delta == other.delta
                and np.array_equal(self.indices, other.indices) and self.data == other.data)

    def __hash__(self) -> int:
        return hash((self.epoch, self.slot, self.page_size, self.indices.tobytes(), self.data))

    def __repr__(self) -> str:  # never dump megabytes of page data into a log line
        return (f"Pages(epoch={self.epoch}, slot={self.slot}, page_size={self.page_size}, "
                f"{'delta, ' if self.delta else ''}"
                f"n_pages={self.n_pages}, first={int(self.indices[0])}, "
                f"last={int(self.indices[-1])})")


class _LazyData:
    """``Pages.data`` over the dataclass's own slot: built from the words on first read."""

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return self
        if (data := _PAGES_DATA.__get__(obj, owner)) is None:
            out = np.zeros(len(obj.pages) * obj.page_size // 8, np.uint64)
            out[obj.words[0]] = obj.words[1]
            _PAGES_DATA.__set__(obj, data := out.tobytes())
        return data

    def __set__(self, obj: Any, value: Any) -> None:
        _PAGES_DATA.__set__(obj, value)


_PAGES_DATA: Final = Pages.__dict__["data"]
Pages.data = _LazyData()  # type: ignore[assignment,misc]


@dataclass(frozen=True, slots=True, kw_only=True)
class Checkpoint(Event):
    """A whole epoch in one event: its EpochBegin, Pages, MachineBlob and EpochEnd together.

    Why: a replicated guest is checkpointed thousands of times a second, each time with a few
    small events, and the per-event work on both ends (building, the state machine, encoding,
    dispatch) was about half of what the sender and the receiver spend per checkpoint. A
    receiver treats it exactly as that sequence; it is legal wherever EpochBegin is, and
    leaves no epoch open. ``blob`` empty means no machine state (as no MachineBlob).
    """

    epoch: int
    kind: str
    pages: tuple[Pages, ...]
    blob: bytes = field(repr=False)
    digest: bytes = b""
    output_seq: int

    def __post_init__(self) -> None:
        set_field(self, "epoch", check_uint("epoch", self.epoch))
        set_field(self, "kind", check_choice("kind", self.kind, EPOCH_KINDS))
        pages = tuple(self.pages) if isinstance(self.pages, (tuple, list)) else None
        if pages is None or not all(type(p) is Pages for p in pages):
            raise LocalProtocolError("pages must be a tuple of Pages events")
        for p in pages:
            if p.epoch != self.epoch:
                raise LocalProtocolError(
                    f"Pages for epoch {p.epoch} inside the checkpoint of epoch {self.epoch}")
        set_field(self, "pages", pages)
        set_field(self, "blob", check_bytes("blob", self.blob))
        set_field(self, "digest", check_bytes("digest", self.digest, limit=MAX_DIGEST_LEN))
        set_field(self, "output_seq", check_uint("output_seq", self.output_seq))

    @classmethod
    def decoded(cls, *, epoch: int, kind: str, pages: tuple[Pages, ...], blob: bytes,
                digest: bytes, output_seq: int) -> Checkpoint:
        """Build from values already checked (the decoder's, or our own sender's), as
        :meth:`Pages.decoded` does."""
        obj = object.__new__(cls)
        put = object.__setattr__
        put(obj, "epoch", epoch)
        put(obj, "kind", kind)
        put(obj, "pages", pages)
        put(obj, "blob", blob)
        put(obj, "digest", digest)
        put(obj, "output_seq", output_seq)
        return obj

    @property
    def n_pages(self) -> int:
        return sum(len(p.pages) for p in self.pages)

    @property
    def nbytes(self) -> int:  # of page data, as Pages.nbytes
        return sum(p.nbytes for p in self.pages)
