"""TokenBatcher: read a group of batches' token windows straight into their buffers.

Its input items are ``(path, byte offset, byte length)`` ranges of one window of
``seq_len + 1`` tokens each (what :class:`~iopipe.tokens.shards.TokenSource`
emits).  Per group of a few batches it:

1. sorts the ranges by file and offset and merges those at most
   ``merge_gap_bytes`` apart into one read (packed windows in file order, or
   windows that happen to be close, cost one ``preadv`` instead of many);
2. reads them in one job on a pool thread (:func:`read_group`): what the page
   cache holds is copied at once; the rest is announced to the kernel with
   ``posix_fadvise(WILLNEED)`` all together and then read, so a cold group waits
   about one storage round trip instead of one per window;
3. widens the raw rows into the int64 ``x`` and ``y`` arrays.

Several groups are in process at once, so the cold reads of upcoming batches
overlap instead of faulting page by page as ``np.memmap`` slicing does
(bench/bench_tokens.py).  An earlier version fanned each group out over up to 32
threads, a job per few reads: cold, it spent more than twice the CPU (GIL hand-offs,
per-job overhead) and read no faster (docs/llm.md).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any, overload

import numpy as np
import torch

from ..io.files import open_sized
from ..io.reads import RWF_NOWAIT, read_cached, read_exact
from ..runtime.channels import BatchKey, Group
from ..runtime.threads import WorkerPool
from ..stages.base import ItemFailure, OutQueue, timed
from ..stages.batch import Batcher
from ..stages.pump import drain, pump

__all__ = ["Recycler", "TokenBatcher", "WindowRanges", "plan_reads", "read_group"]

#: A merged read never spans more than this many bytes.
MAX_MERGED_BYTES = 4 << 20

I64 = np.ndarray[Any, np.dtype[np.int64]]


class WindowRanges(Sequence[tuple[str, int, int]]):
    """The byte ranges of consecutive windows, as arrays: what the source emits.

    Item ``i`` is ``(path, byte offset, byte length)`` (built on demand, for error
    messages and keys); the reader uses the arrays directly, which keeps the
    per-window cost of planning a group's reads in numpy instead of Python.
    """

    __slots__ = ("nbytes", "offset", "paths", "shard")

    def __init__(self, paths: list[str], shard: I64, offset: I64, nbytes: int) -> None:
        self.paths = paths
        self.shard = shard
        self.offset = offset
        self.nbytes = nbytes

    def __len__(self) -> int:
        return len(self.shard)

    @overload
    def __getitem__(self, i: int) -> tuple[str, int, int]: ...
    @overload
    def __getitem__(self, i: slice) -> WindowRanges: ...
    def __getitem__(self, i: int | slice) -> tuple[str, int, int] | WindowRanges:
        if isinstance(i, slice):
            return WindowRanges(self.paths, self.shard[i], self.offset[i], self.nbytes)
        return (self.paths[int(self.shard[i])], int(self.offset[i]), self.nbytes)

    @staticmethod
    def concat(parts: list[WindowRanges]) -> WindowRanges:
        """Join ``parts`` (all of one source) into one."""
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        return WindowRanges(
            first.paths,
            np.concatenate([p.shard for p in parts]),
            np.concatenate([p.offset for p in parts]),
            first.nbytes,
        )


#: One ``preadv``: ``(shard, start byte, end byte, rows, offsets of the rows' windows in
#: the read)``; a single window (``rels`` None) is read straight into its row.
Read = tuple[int, int, int, list[int], list[int] | None]


def plan_reads(ranges: WindowRanges, merge_gap_bytes: int | None) -> list[Read]:
    """Group the windows of ``ranges`` (row ``i`` = window ``i``) into reads, in file order.

    Windows of one shard that overlap or lie at most ``merge_gap_bytes`` apart are
    merged, up to MAX_MERGED_BYTES per read; ``None`` merges nothing.
    """
    n, nb = len(ranges), ranges.nbytes
    shard, offset = ranges.shard, ranges.offset
    if merge_gap_bytes is None or n < 2:
        return [
            (s, o, o + nb, [i], None)
            for i, (s, o) in enumerate(zip(shard.tolist(), offset.tolist(), strict=True))
        ]
    order = np.lexsort((offset, shard))
    so, ss = offset[order], shard[order]
    new = np.ones(n, dtype=bool)
    new[1:] = (ss[1:] != ss[:-1]) | (so[1:] - so[:-1] - nb > merge_gap_bytes)
    rows, offs, shards = order.tolist(), so.tolist(), ss.tolist()
    if new.all():  # the usual case for random windows: nothing to merge
        return [(s, o, o + nb, [r], None) for r, o, s in zip(rows, offs, shards, strict=True)]
    reads: list[Read] = []
    bounds = [*np.flatnonzero(new).tolist(), n]
    for a, b in itertools.pairwise(bounds):
        start = offs[a]
        run_rows, rels = [rows[a]], [0]
        for k in range(a + 1, b):
            if offs[k] + nb - start > MAX_MERGED_BYTES:  # too long: cut here
                reads.append(_read(shards[a], start, offs[k - 1] + nb, run_rows, rels))
                start, run_rows, rels = offs[k], [], []
            run_rows.append(rows[k])
            rels.append(offs[k] - start)
        reads.append(_read(shards[a], start, offs[b - 1] + nb, run_rows, rels))
    return reads


def _read(shard: int, start: int, end: int, rows: list[int], rels: list[int]) -> Read:
    return (shard, start, end, rows, rels if len(rows) > 1 else None)


_WILLNEED: int = getattr(os, "POSIX_FADV_WILLNEED", 0)

#: A read of the first pass not served whole by the page cache:
#: ``(read, descriptor, destination, bytes the cache gave)``.
_Pending = tuple[Read, int, np.ndarray[Any, np.dtype[np.uint8]], int]


def read_group(
    ranges: WindowRanges,
    merge_gap_bytes: int | None,
    raw: np.ndarray[Any, Any],
    x: np.ndarray[Any, Any],
    y: np.ndarray[Any, Any],
    nowait: bool,
) -> tuple[int, int, bool]:
    """Read the windows of ``ranges`` into the rows of ``raw``; widen them into ``x``, ``y``.

    After :func:`plan_reads`, three passes, so that a cold group costs about one
    storage round trip rather than one per window, without a thread per read:

    1. ``preadv(..., RWF_NOWAIT)`` every read: what the page cache holds is
       copied at once (a warm group ends here);
    2. ``posix_fadvise(WILLNEED)`` every read that was missing: the kernel starts
       all of them concurrently and returns;
    3. plain ``preadv`` of the missing reads, which now wait on reads in flight.

    Runs on a pool thread.  Every descriptor it opens is closed before it returns.

    Returns:
        ``(bytes read, reads that missed the page cache, nowait still usable)``.

    Raises:
        ItemFailure: a read failed; ``index`` is the first row it feeds.
    """
    rawb = raw.view(np.uint8)  # (rows, row bytes)
    fds: dict[int, int] = {}
    try:
        try:
            reads = plan_reads(ranges, merge_gap_bytes)
        except Exception as exc:
            raise _failure(None, exc) from None
        pending, done, nowait = _read_cached(reads, ranges.paths, rawb, fds, nowait)
        _read_missing(pending, ranges.paths, rawb)
    finally:
        for fd in fds.values():
            os.close(fd)
    np.copyto(x, raw[:, :-1], casting="safe")
    np.copyto(y, raw[:, 1:], casting="safe")
    return done, len(pending), nowait


def _failure(read: Read | None, exc: Exception) -> ItemFailure:
    """The failure of ``read``, at the first row it feeds (row 0 before any read)."""
    return ItemFailure(read[3][0] if read is not None else 0, exc)


def _read_cached(
    reads: list[Read],
    paths: list[str],
    rawb: np.ndarray[Any, Any],
    fds: dict[int, int],
    nowait: bool,
) -> tuple[list[_Pending], int, bool]:
    """Pass 1 of :func:`read_group`: open each shard once (into ``fds``), copy what is cached.

    Returns the reads the page cache did not serve whole, the bytes of all reads
    and whether ``RWF_NOWAIT`` is still usable.
    """
    pending: list[_Pending] = []
    done = 0
    read: Read | None = None
    try:
        for read in reads:
            shard, start, end, rows, rels = read
            fd = fds.get(shard)
            if fd is None:
                fd = fds[shard] = open_sized(paths[shard])[0]
            dest: np.ndarray[Any, np.dtype[np.uint8]] = (
                rawb[rows[0]] if rels is None else np.empty(end - start, np.uint8)
            )
            got = 0
            if nowait:
                cached = read_cached(fd, dest, start)
                if cached is None:
                    nowait = False  # this file system does not do RWF_NOWAIT
                else:
                    got = cached
            if got < end - start:
                pending.append((read, fd, dest, got))
            elif rels is not None:
                _scatter(rows, rels, dest, rawb)
            done += end - start
    except Exception as exc:
        raise _failure(read, exc) from None
    return pending, done, nowait


def _read_missing(pending: list[_Pending], paths: list[str], rawb: np.ndarray[Any, Any]) -> None:
    """Passes 2 and 3 of :func:`read_group`: announce every missing read, then read them."""
    read: Read | None = None
    try:
        if _WILLNEED:  # not on macOS: there the missing reads just run one by one
            for read, fd, _, got in pending:
                os.posix_fadvise(fd, read[1] + got, read[2] - read[1] - got, _WILLNEED)
        for read, fd, dest, _ in pending:
            shard, start, _, rows, rels = read
            # The whole range again (what was cached costs a copy): errors then
            # describe the window, not its missing tail.
            read_exact(fd, dest, start, paths[shard])
            if rels is not None:
                _scatter(rows, rels, dest, rawb)
    except Exception as exc:
        raise _failure(read, exc) from None


def _scatter(
    rows: list[int], rels: list[int], span: np.ndarray[Any, Any], rawb: np.ndarray[Any, Any]
) -> None:
    """Copy each window of a merged read from ``span`` into its row."""
    width = rawb.shape[1]
    for row, rel in zip(rows, rels, strict=True):
        rawb[row] = span[rel : rel + width]


def _refs(arrays: list[np.ndarray[Any, Any]], i: int) -> int:
    return sys.getrefcount(arrays[i])


#: What ``_refs`` reports for an array that only its pool refers to.
_POOL_ONLY = _refs([np.empty(0)], 0)


class Recycler:
    """Hands out ``(2, n, seq_len)`` int64 arrays, reusing those nobody uses any more.

    The batches handed to the consumer are tensors made by ``torch.from_numpy``
    on views of one such array; each keeps a reference to it until torch frees
    its storage, so an array whose reference count is back to the pool's own
    has no live tensor left (a slice or view of a batch keeps its storage, and so
    the array, alive).  Reusing them matters on this machine: first-touching
    fresh pages cost ~4 us per window of seq_len 1024, more than reading it warm
    (bench/bench_tokens.py).  Loop thread only.  Holds at most ``keep`` arrays;
    beyond that, arrays are allocated and left to the garbage collector.
    """

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._arrays: list[np.ndarray[Any, Any]] = []

    def take(self, shape: tuple[int, int, int]) -> np.ndarray[Any, Any]:
        arrays = self._arrays
        for i in range(len(arrays)):
            if arrays[i].shape == shape and _refs(arrays, i) == _POOL_ONLY:
                return arrays[i]
        out = np.empty(shape, np.int64)
        if len(arrays) < self.keep:
            arrays.append(out)
        return out


class TokenBatcher(Batcher):
    """Cut window ranges into batches and read each into ``(x, y)`` int64 tensors.

    A :class:`~iopipe.stages.batch.Batcher` to the pipeline (``len()`` and the
    bounds count batches of ``batch_size`` windows), whose "collate" reads.  It
    works on groups of ``batches_per_group`` batches: one executor job, one queue
    hop and one hand-off to the consumer carry several batches, which keeps the
    engine's per-group cost (a few hundred us of CPU here) small next to warm
    reads of ~3 us per window (bench/bench_tokens.py).  The batches of a group
    are row slices of one ``(2, n, seq_len)`` array from a :class:`Recycler`.

    Invariant: at most ``window()`` groups are in process, each in one job on
    its own pool thread (:func:`read_group`), holding one raw buffer and one
    output array.
    """

    kind = "tokens"
    #: Not tuned by the pipeline's autotuner: reads in flight follow from the
    #: misses of each group (see read_group), not from a thread count.
    autotune = False

    def __init__(
        self,
        *,
        seq_len: int,
        batch_size: int,
        batches_per_group: int,
        dtype: np.dtype[Any],
        drop_last: bool,
        prefetch: int,
        merge_gap_bytes: int | None,
        name: str | None = None,
    ) -> None:
        super().__init__(batch_size, drop_last=drop_last, name=name)
        for label, value in (("prefetch", prefetch), ("batches_per_group", batches_per_group)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{label} must be an int >= 1, got {value!r}")
        if merge_gap_bytes is not None and (
            not isinstance(merge_gap_bytes, int)
            or isinstance(merge_gap_bytes, bool)
            or merge_gap_bytes < 0
        ):
            raise ValueError(
                f"merge_gap_bytes must be an int >= 0 or None, got {merge_gap_bytes!r}"
            )
        self.seq_len = seq_len
        self.batches_per_group = batches_per_group
        self.dtype = dtype
        self.prefetch = prefetch
        self.merge_gap_bytes = merge_gap_bytes
        self.concurrency = self.window()
        self.counters.concurrency = self.concurrency
        self._recycler: Recycler | None = None
        self._raw: list[np.ndarray[Any, Any]] = []  # free raw buffers
        self._nowait = RWF_NOWAIT != 0

    def fusable(self) -> bool:
        return False  # its "collate" is the read: it runs alone

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "seq_len": self.seq_len,
            "batches_per_group": self.batches_per_group,
            "dtype": self.dtype.name,
            "prefetch": self.prefetch,
            "merge_gap_bytes": self.merge_gap_bytes,
        }

    def fresh(self) -> TokenBatcher:
        clone = super().fresh()
        assert isinstance(clone, TokenBatcher)
        clone.drop_buffers()
        return clone

    def drop_buffers(self) -> None:
        """Forget the output arrays and the free raw buffers (a clone shares none)."""
        self._recycler, self._raw = None, []

    def open(self, unit: int) -> None:
        self.unit = unit
        self._pool = WorkerPool(self.window(), f"iopipe-{self.name}")
        # In process, waiting in the hand-off (2 by default), held by the consumer.
        self._recycler = Recycler(self.window() + 4)

    def close(self, timeout: float) -> None:
        super().close(timeout)
        self.drop_buffers()

    def window(self) -> int:
        """Groups in process: enough to hold ``prefetch`` batches (at least two groups)."""
        return max(2, -(-self.prefetch // self.batches_per_group))

    def _raw_buffer(self, n: int) -> np.ndarray[Any, Any]:
        for i, buf in enumerate(self._raw):
            if len(buf) == n:
                return self._raw.pop(i)
        return np.empty((n, self.seq_len + 1), self.dtype)

    async def _cut_groups(self, groups: AsyncIterator[Group]) -> AsyncIterator[Group]:
        """Re-chunk the incoming windows into groups of whole batches.

        Each group holds ``batches_per_group * batch_size`` windows, except the
        last, whose short final batch is dropped under ``drop_last``.  The source
        emits groups of that size, and a first group of one batch (time to first
        batch); a group of whole batches passes through untouched.
        """
        size = self.batch_size * self.batches_per_group
        parts: list[WindowRanges] = []
        held = 0
        async for g in groups:
            items = g.items
            if not isinstance(items, WindowRanges):
                raise TypeError(f"{self.name} reads WindowRanges, got {type(items).__name__}")
            if not held and len(items) <= size and len(items) % self.batch_size == 0:
                yield Group(items, items)
                continue
            parts.append(items)
            held += len(items)
            while held >= size:
                joined = WindowRanges.concat(parts)
                yield Group(joined[:size], joined[:size])
                rest = joined[size:]
                parts, held = ([rest] if len(rest) else []), len(rest)
        if held:
            joined = WindowRanges.concat(parts)
            if self.drop_last:
                joined = joined[: held - held % self.batch_size]
            if len(joined):
                yield Group(joined, joined)  # type: ignore[arg-type]

    async def _collate(self, group: Group) -> Group:
        """Read a group's windows into ``(x, y)`` arrays; emit them as batches."""
        assert self._recycler is not None
        n = len(group.items)
        raw = self._raw_buffer(n)
        xy = self._recycler.take((2, n, self.seq_len))
        loop = asyncio.get_running_loop()
        try:
            (done, missed, self._nowait), wall = await loop.run_in_executor(
                self._pool,
                timed,
                read_group,
                group.items,
                self.merge_gap_bytes,
                raw,
                xy[0],
                xy[1],
                self._nowait,
            )
        except ItemFailure as exc:
            raise self.fail(group, exc)
        self._raw.append(raw)  # only now: a cancelled job may still write into it
        c = self.counters
        c.busy_s += wall
        c.jobs += 1
        c.bytes += done
        c.extra["cache_misses"] = c.extra.get("cache_misses", 0) + missed
        tx, ty = torch.from_numpy(xy[0]), torch.from_numpy(xy[1])
        del xy
        batches: list[Any] = []
        keys: list[Any] = []
        counts: list[int] = []
        bs = self.batch_size
        for a in range(0, n, bs):
            b = min(n, a + bs)
            batches.append((tx[a:b], ty[a:b]))
            keys.append(BatchKey(self._count, group.keys[a], group.keys[b - 1]))
            counts.append(b - a)
            self._count += 1
        c.items += len(batches)
        return Group(batches, keys, batched=True, counts=counts)

    async def run(self, inq: Any, outq: OutQueue) -> None:
        self._count = 0
        await pump(
            self._cut_groups(drain(inq, self.counters)),
            outq,
            self._collate,
            window=self.window(),
            ordered=True,
            counters=self.counters,
        )
