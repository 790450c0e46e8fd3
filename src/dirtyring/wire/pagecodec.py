"""Pages bodies: runs of consecutive pages, each RAW, ZERO or ZLIB-compressed.

Why runs: dirty sets are clustered, so one 17-byte head per run of consecutive page indices is
cheap, and a run is the natural unit for both zero-page elision and compression. Layout::

    head  25 bytes  epoch u64, slot u32, page_size u32, n_pages u32, n_runs u32, flags u8
                    (flags bit 0: the data is an XOR delta against the receiver's copy)
    run   17 bytes  first page u64, count u32, encoding u8, payload length u32; then payload

When the whole frame is mostly zero words (an XOR delta, fresh memory) it is sent instead as
one SPARSE body (flags bit 1), built and parsed in a few vectorized passes whatever the number
of runs::

    head  25 bytes  as above, flags bit 1 set
    runs  12 bytes  first page u64, count u32 (per run; no per-run payload)
    words           count u32, word offsets u32[count] into the frame's data, values u64[count]

Otherwise each run carries its own encoding:
RAW (the pages as they are), ZERO (no payload: every page in the run is zero),
SPARSE64 (only the non-zero 64-bit words: count u32, word offsets u32[count], values
u64[count]; chosen when a run is mostly zero, which is what an XOR delta of a page that changed
a little looks like: 64 pages with 24 changed bytes each cost ~2 KiB instead of 256 KiB),
ZLIB (the pages deflated; used only when that saves at least 1/8, so incompressible data costs
just the run head), XOR_DELTA (reserved, rejected). Zero-page and run detection is one vectorized numpy pass; RAW
payloads are memoryviews into the event's data, so big pages are never copied on the way out.
"""
from __future__ import annotations

import enum
import struct
import zlib
from typing import Final, TypeAlias

import numpy as np
import numpy.typing as npt

from dirtyring.errors import LocalProtocolError

from . import events as ev

__all__ = ["Buffer", "PageEncoding", "MAX_RUN_BYTES", "EPOCH_KIND_CODES", "encode_pages_parts",
           "decode_pages", "encode_checkpoint_parts", "decode_checkpoint", "epoch_kind",
           "page_bytes", "nbytes"]

Buffer: TypeAlias = bytes | bytearray | memoryview

#: Non-zero runs are cut at this size so zlib works on bounded chunks and a receiver never
#: inflates more than this from one run.
MAX_RUN_BYTES: Final = 1024 * 1024
#: Parts at least this big are passed through as separate buffers (zero copy); smaller ones are
#: coalesced, which keeps the number of iovecs for sendmsg low.
_PASSTHROUGH_MIN: Final = 64 * 1024
#: Bytes of a run test-deflated to decide whether deflating the whole run is worth trying.
_PROBE_BYTES: Final = 8 * 1024


class PageEncoding(enum.IntEnum):
    """How a run's payload represents its pages (one byte in the run head)."""

    RAW = 0
    ZERO = 1
    ZLIB = 2
    XOR_DELTA = 3  # reserved (deltas are a Pages flag; their runs use the other encodings)
    SPARSE64 = 4


#: A run goes SPARSE64 when its non-zero words are at most this fraction of its words.
_SPARSE_MAX_FRACTION: Final = 1 / 8


_PAGES_HEAD: Final = struct.Struct("!QIIIIB")  # epoch, slot, page_size, n_pages, n_runs, flags
_FLAG_DELTA: Final = 1
_FLAG_SPARSE: Final = 2
_RUN: Final = struct.Struct("!QIBI")          # first page, count, encoding, payload length
_SPARSE_RUN: Final = np.dtype([("first", ">u8"), ("count", ">u4")])  # packed: 12 bytes
_SPARSE_RUN1: Final = struct.Struct("!QI")  # the same, for a table of one run
_U32: Final = struct.Struct("!I")
# epoch, kind, output_seq, number of Pages, blob length, digest length; then the digest, the
# blob, and each Pages body after its u32 length
_CHECKPOINT: Final = struct.Struct("!QBQHIB")
EPOCH_KIND_CODES: Final = {"full": 0, "delta": 1}


def nbytes(b: Buffer) -> int:
    """Size in bytes of any part (``len`` of a memoryview counts items, not bytes)."""
    return b.nbytes if isinstance(b, memoryview) else len(b)


class _Parts:
    """Collects body pieces: big ones by reference, small ones coalesced into one bytearray."""

    def __init__(self) -> None:
        self.parts: list[Buffer] = []
        self._small = bytearray()

    def add(self, b: Buffer) -> None:
        if nbytes(b) >= _PASSTHROUGH_MIN:
            self._flush()
            self.parts.append(b)
        else:
            self._small += b

    def _flush(self) -> None:
        if self._small:
            self.parts.append(self._small)
            self._small = bytearray()

    def finish(self) -> list[Buffer]:
        self._flush()
        return self.parts


def _worth_deflating(chunk: memoryview, level: int) -> bool:
    """Probe the start of a run before deflating all of it.

    Deflating incompressible pages (encrypted or already-compressed guest data) costs ~20x a
    plain copy for nothing, so a run is only deflated if its first _PROBE_BYTES would be.
    """
    if len(chunk) <= 2 * _PROBE_BYTES:
        return True
    sample = chunk[:_PROBE_BYTES]
    return len(zlib.compress(sample, level)) <= _PROBE_BYTES - _PROBE_BYTES // 8


def encode_pages_parts(event: ev.Pages, *, compress_level: int = 1) -> list[Buffer]:
    """Encode a Pages body as a list of buffers (for ``b"".join`` or ``socket.sendmsg``).

    Zero pages cost only their run head; non-zero runs are deflated at ``compress_level``
    (0 = never try) when a probe of the run's start and then the whole run save at least 1/8,
    else passed through as memoryviews of ``event.data``. Large frames can exceed IOV_MAX
    parts: a transport must batch its sendmsg calls.
    """
    if not 0 <= compress_level <= 9:
        raise LocalProtocolError(f"compress_level must be 0..9, got {compress_level}")
    if event.lazy:  # only its sparse words exist (our sender built it so): send those
        assert event.words is not None
        return _encode_sparse(event, *event.words)
    idx, ps, n = event.indices, event.page_size, event.n_pages
    words = np.frombuffer(event.data, dtype=np.uint64).reshape(n, ps // 8)
    flat = words.reshape(-1)
    mask = flat != 0  # (``flatnonzero`` on the bool mask is 6x faster than on the words)
    if int(np.count_nonzero(mask)) <= len(flat) * _SPARSE_MAX_FRACTION and len(flat) < 1 << 32:
        where = np.flatnonzero(mask)
        return _encode_sparse(event, where, flat[where])
    nonzero: npt.NDArray[np.bool_] = np.asarray(mask.reshape(n, -1).any(axis=1))
    brk = np.ones(n, dtype=bool)  # brk[i]: page i starts a new run
    if n > 1:
        brk[1:] = (np.diff(idx) != 1) | (nonzero[1:] != nonzero[:-1])
    max_run = max(1, MAX_RUN_BYTES // ps)
    if n > max_run:  # cut long non-zero runs every max_run pages
        starts = np.flatnonzero(brk)
        pos = np.arange(n) - starts[np.cumsum(brk) - 1]
        brk |= nonzero & (pos > 0) & (pos % max_run == 0)
    starts = np.flatnonzero(brk)
    ends = np.append(starts[1:], n)
    out = _Parts()
    out.add(_PAGES_HEAD.pack(event.epoch, event.slot, ps, n, len(starts),
                             _FLAG_DELTA if event.delta else 0))
    data = memoryview(event.data)
    wpp = ps // 8
    for s, e, first, nz in zip(starts.tolist(), ends.tolist(), idx[starts].tolist(),
                               nonzero[starts].tolist()):
        count = e - s
        if not nz:
            out.add(_RUN.pack(first, count, PageEncoding.ZERO, 0))
            continue
        run_words = flat[s * wpp:e * wpp]
        where = np.flatnonzero(mask[s * wpp:e * wpp])
        if len(where) <= len(run_words) * _SPARSE_MAX_FRACTION:
            payload = (struct.pack("!I", len(where)) + where.astype(">u4").tobytes()
                       + run_words[where].astype(">u8").tobytes())
            out.add(_RUN.pack(first, count, PageEncoding.SPARSE64, len(payload)))
            out.add(payload)
            continue
        chunk = data[s * ps:e * ps]
        if compress_level and _worth_deflating(chunk, compress_level):
            packed = zlib.compress(chunk, compress_level)
            if len(packed) <= len(chunk) - len(chunk) // 8:
                out.add(_RUN.pack(first, count, PageEncoding.ZLIB, len(packed)))
                out.add(packed)
                continue
        out.add(_RUN.pack(first, count, PageEncoding.RAW, len(chunk)))
        out.add(chunk)
    return out.finish()


def _encode_sparse(event: ev.Pages, where: np.ndarray, vals: np.ndarray) -> list[Buffer]:
    """The SPARSE body: ``where`` (increasing word offsets into the event's data) and their
    ``vals`` are every non-zero word."""
    idx = event.indices
    n = len(idx)
    first = int(idx[0])
    if int(idx[-1]) - first == n - 1:  # one run (a hot set usually is): no table to build
        n_runs, table = 1, _SPARSE_RUN1.pack(first, n)
    else:
        brk = np.ones(n, dtype=bool)
        brk[1:] = np.diff(idx) != 1
        starts = np.flatnonzero(brk)
        runs = np.empty(len(starts), _SPARSE_RUN)
        runs["first"] = idx[starts]
        runs["count"] = np.diff(np.append(starts, n))
        n_runs, table = len(starts), runs.tobytes()
    return [_PAGES_HEAD.pack(event.epoch, event.slot, event.page_size, n, n_runs,
                             _FLAG_SPARSE | (_FLAG_DELTA if event.delta else 0))
            + table + _U32.pack(len(where)) + where.astype(">u4").tobytes()
            + vals.astype(">u8").tobytes()]


def _decode_sparse(body: memoryview, epoch: int, slot: int, ps: int, n: int, n_runs: int,
                   delta: bool) -> ev.Pages:
    off = _PAGES_HEAD.size
    table_end = off + n_runs * _SPARSE_RUN.itemsize
    if len(body) < table_end + 4:
        raise LocalProtocolError("sparse Pages body is cut short in its run table")
    if n_runs == 1:  # the common case, checked with plain ints
        first, count = _SPARSE_RUN1.unpack_from(body, off)
        if count != n:
            raise LocalProtocolError(f"runs carry {count} pages, head says {n}")
        if first + count > 1 << 63:
            raise LocalProtocolError("a run starts beyond page 2**63")
        indices = np.arange(first, first + n, dtype=np.int64)
    else:
        indices = _sparse_indices(np.frombuffer(body, _SPARSE_RUN, n_runs, off), n)
    (k,) = _U32.unpack_from(body, table_end)
    n_words = n * ps // 8
    if k > n_words or len(body) != table_end + 4 + 12 * k:
        raise LocalProtocolError(f"sparse Pages body does not hold {k} words")
    where = np.frombuffer(body, ">u4", k, table_end + 4).astype(np.int64)
    vals = np.frombuffer(body, ">u8", k, table_end + 4 + 4 * k).astype(np.uint64)
    if k and (int(where[-1]) >= n_words or (k > 1 and not (where[1:] > where[:-1]).all())):
        raise LocalProtocolError("sparse word offsets are out of order or range")
    # The data is built only if someone reads it: the standby applies the words directly.
    return ev.Pages.decoded(epoch=epoch, slot=slot, page_size=ps, pages=indices,
                            data=None, delta=delta, words=(where, vals))


def _sparse_indices(runs: np.ndarray, n: int) -> np.ndarray:
    """Page indices of a SPARSE run table, checked: no empty, overlapping or huge runs."""
    firsts = runs["first"].astype(np.uint64)
    if int(firsts.max()) >= 1 << 63:
        raise LocalProtocolError("a run starts beyond page 2**63")
    counts = runs["count"].astype(np.int64)
    if int(counts.min()) <= 0:
        raise LocalProtocolError("a run has 0 pages")
    if int(counts.sum()) != n:
        raise LocalProtocolError(f"runs carry {int(counts.sum())} pages, head says {n}")
    ends = firsts + counts.astype(np.uint64)  # unsigned: an end past 2**63 must not wrap
    if int(ends.max()) > 1 << 63 or bool((firsts[1:] < ends[:-1]).any()):
        raise LocalProtocolError("runs overlap, are out of order or end beyond page 2**63")
    firsts = firsts.astype(np.int64)
    run_start = np.cumsum(counts) - counts
    return np.arange(n, dtype=np.int64) + np.repeat(firsts - run_start, counts)


def decode_pages(body: memoryview, max_pages_bytes: int) -> ev.Pages:
    """Decode a Pages body, inflating at most ``max_pages_bytes``.

    Raises LocalProtocolError or struct.error; the codec reports either as RemoteProtocolError.
    """
    epoch, slot, ps, n, n_runs, flags = _PAGES_HEAD.unpack_from(body)  # struct.error if short
    if flags & ~(_FLAG_DELTA | _FLAG_SPARSE):
        raise LocalProtocolError(f"unknown Pages flags {flags:#x}")
    if ps < ev.MIN_PAGE_SIZE or ps > ev.MAX_PAGE_SIZE or ps & (ps - 1):
        raise LocalProtocolError(f"bad page_size {ps}")
    if n == 0 or not 0 < n_runs <= n:
        raise LocalProtocolError(f"{n} pages in {n_runs} runs is impossible")
    if n * ps > max_pages_bytes:  # checked before inflating anything
        raise LocalProtocolError(
            f"{n} pages of {ps} bytes would expand beyond the {max_pages_bytes}-byte cap")
    if flags & _FLAG_SPARSE:
        return _decode_sparse(body, epoch, slot, ps, n, n_runs, bool(flags & _FLAG_DELTA))
    firsts = np.empty(n_runs, dtype=np.int64)
    counts = np.empty(n_runs, dtype=np.int64)
    pieces: list[Buffer] = []
    off, seen, next_free = _PAGES_HEAD.size, 0, 0
    for r in range(n_runs):
        first, count, enc, plen = _RUN.unpack_from(body, off)
        off += _RUN.size
        if count == 0 or count > n - seen:
            raise LocalProtocolError(f"run {r} has {count} pages, {n - seen} remain")
        if first < next_free or first + count > 1 << 63:
            raise LocalProtocolError(f"run {r} at page {first} overlaps or is out of order")
        payload = body[off:off + plen]
        if len(payload) != plen:
            raise LocalProtocolError(f"run {r} payload is cut short")
        off += plen
        size = count * ps
        if enc == PageEncoding.RAW and plen == size:
            pieces.append(payload)
        elif enc == PageEncoding.ZERO and plen == 0:
            pieces.append(bytes(size))
        elif enc == PageEncoding.ZLIB:
            inflater = zlib.decompressobj()
            try:
                plain = inflater.decompress(payload, size)  # never inflate beyond the run
            except zlib.error as exc:
                raise LocalProtocolError(f"run {r} does not inflate: {exc}") from None
            if len(plain) != size or inflater.unconsumed_tail or inflater.unused_data \
                    or not inflater.eof:
                raise LocalProtocolError(f"run {r} does not inflate to exactly {size} bytes")
            pieces.append(plain)
        elif enc == PageEncoding.SPARSE64:
            pieces.append(_inflate_sparse(payload, size, r))
        elif enc == PageEncoding.XOR_DELTA:
            raise LocalProtocolError(f"page encoding XOR_DELTA (run {r}) is not supported yet")
        elif enc in (PageEncoding.RAW, PageEncoding.ZERO):
            raise LocalProtocolError(f"run {r} {PageEncoding(enc).name} payload is {plen} bytes, "
                                     f"expected {size if enc == PageEncoding.RAW else 0}")
        else:
            raise LocalProtocolError(f"run {r} has unknown page encoding {enc}")
        firsts[r], counts[r] = first, count
        seen += count
        next_free = first + count
    if off != len(body):
        raise LocalProtocolError(f"{len(body) - off} trailing bytes after the last run")
    if seen != n:
        raise LocalProtocolError(f"runs carry {seen} pages, head says {n}")
    run_start = np.cumsum(counts) - counts  # position of each run's first page in the output
    indices = np.arange(n, dtype=np.int64) + np.repeat(firsts - run_start, counts)
    return ev.Pages.decoded(epoch=epoch, slot=slot, page_size=ps, pages=indices,
                            data=b"".join(pieces), delta=bool(flags & _FLAG_DELTA))


def _inflate_sparse(payload: memoryview, size: int, r: int) -> bytes:
    """SPARSE64 payload -> the run's bytes; offsets must be increasing and inside the run."""
    if len(payload) < 4:
        raise LocalProtocolError(f"run {r} SPARSE64 payload is cut short")
    (k,) = struct.unpack_from("!I", payload)
    if len(payload) != 4 + 12 * k or k > size // 8:
        raise LocalProtocolError(f"run {r} SPARSE64 payload does not hold {k} words")
    where = np.frombuffer(payload, ">u4", k, 4).astype(np.int64)
    vals = np.frombuffer(payload, ">u8", k, 4 + 4 * k)
    if k and (int(where[-1]) >= size // 8 or (k > 1 and not (np.diff(where) > 0).all())):
        raise LocalProtocolError(f"run {r} SPARSE64 word offsets are out of order or range")
    out = np.zeros(size // 8, np.uint64)
    out[where] = vals
    return out.tobytes()


# ------------------------------------------------------------------------ Checkpoint bodies
# A whole epoch: its head, digest and machine state, then each Pages body as above.


def encode_checkpoint_parts(event: ev.Checkpoint, *, compress_level: int = 1) -> list[Buffer]:
    out: list[Buffer] = [_CHECKPOINT.pack(event.epoch, EPOCH_KIND_CODES[event.kind],
                                          event.output_seq, len(event.pages), len(event.blob),
                                          len(event.digest)), event.digest, event.blob]
    for p in event.pages:
        body = encode_pages_parts(p, compress_level=compress_level)
        out.append(_U32.pack(sum(nbytes(b) for b in body)))
        out.extend(body)
    return out


def decode_checkpoint(body: memoryview, max_pages_bytes: int) -> ev.Checkpoint:
    """Decode a Checkpoint body; ``max_pages_bytes`` caps all its pages together."""
    epoch, kind, output_seq, n_parts, blob_len, digest_len = _CHECKPOINT.unpack_from(body)
    rest = body[_CHECKPOINT.size:]
    if digest_len > ev.MAX_DIGEST_LEN:
        raise LocalProtocolError(f"digest of {digest_len} bytes, limit {ev.MAX_DIGEST_LEN}")
    if len(rest) < digest_len + blob_len:
        raise LocalProtocolError("body ends inside the digest or the machine state")
    digest = bytes(rest[:digest_len])
    blob = bytes(rest[digest_len:digest_len + blob_len])
    off, pages, budget = digest_len + blob_len, [], max_pages_bytes
    for i in range(n_parts):
        (n,) = _U32.unpack_from(rest, off)  # struct.error if cut short
        off += _U32.size
        if n > len(rest) - off:
            raise LocalProtocolError(f"Pages {i} of the checkpoint runs past the end of the frame")
        p = decode_pages(rest[off:off + n], budget)
        if p.epoch != epoch:
            raise LocalProtocolError(
                f"Pages for epoch {p.epoch} inside the checkpoint of epoch {epoch}")
        budget -= p.nbytes
        pages.append(p)
        off += n
    if off != len(rest):
        raise LocalProtocolError(f"{len(rest) - off} trailing bytes after the last Pages")
    return ev.Checkpoint.decoded(epoch=epoch, kind=epoch_kind(kind), pages=tuple(pages),
                                 blob=blob, digest=digest, output_seq=output_seq)


def epoch_kind(code: int) -> str:
    for name, c in EPOCH_KIND_CODES.items():
        if c == code:
            return name
    raise LocalProtocolError(f"unknown epoch kind code {code}")


def page_bytes(event: ev.Event, body_length: int) -> tuple[int, int] | None:
    """(page bytes as in guest memory, bytes of the Pages bodies that carried them) of a sent
    or received event with a ``body_length``-byte body; None for an event without pages."""
    if type(event) is ev.Pages:
        return event.nbytes, body_length
    if type(event) is ev.Checkpoint:
        return event.nbytes, (body_length - _CHECKPOINT.size - len(event.digest)
                              - len(event.blob) - _U32.size * len(event.pages))
    return None
