"""The reader's worker-thread side: whole reads of small items, pieces of large ones.

Every function here runs in a worker thread and opens and closes its own
descriptors; :class:`~iopipe.stages.reader.ChunkedReader` runs them as jobs.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..io.files import open_regular, open_sized
from ..io.reads import read_exact, read_probing
from .base import ItemFailure, skippable
from .steps import FusedStep, StepRun

__all__ = [
    "Large",
    "NeedRoom",
    "ReadStep",
    "normalize_item",
    "piece_bytes",
    "read_job",
    "read_job_skipping",
    "read_piece",
]


@dataclass(slots=True)
class Large:
    """An item too big for one job: its pieces are read concurrently into ``buf``.

    It carries no open file: each piece's job opens and closes the file itself, so
    a job abandoned by a cancelled epoch can never leak a descriptor.
    """

    path: str
    buf: np.ndarray[Any, np.dtype[np.uint8]]
    offset: int


@dataclass(slots=True, frozen=True)
class NeedRoom:
    """The last entry of a job's output: the next item's ``bytes`` did not fit the budget."""

    bytes: int


def normalize_item(item: Any) -> tuple[str, int, int | None]:
    """Return ``(path, offset, length)`` for a path or a ``(path, offset, length)`` tuple.

    Raises:
        TypeError: the item is neither.
        ValueError: a negative offset or length.
    """
    if isinstance(item, str | os.PathLike):
        return os.fspath(item), 0, None
    if isinstance(item, tuple) and len(item) == 3 and isinstance(item[0], str | os.PathLike):
        path, offset, length = item
        if not isinstance(offset, int) or offset < 0:
            raise ValueError(f"byte range offset must be an int >= 0, got {offset!r}")
        if not isinstance(length, int) or length < 0:
            raise ValueError(f"byte range length must be an int >= 0, got {length!r}")
        return os.fspath(path), offset, length
    raise TypeError(
        "read() expects paths or (path, offset, length) tuples, got "
        f"{type(item).__name__}: {item!r:.80}"
    )


#: A job probes every this many reads (the first always): a refused probe costs
#: 3-7 us of CPU per cold file on the benchmark machine, a sample of 1 in 8
#: tells the miss rate as well for a group of any size worth governing.
_PROBE_EVERY = 8


def _item_size(
    fd: int, fd_size: int, path: str, offset: int, length: int | None
) -> tuple[int, int]:
    """``(bytes to read, file size)`` of an item; a range past the end is refused first.

    A bogus length is refused before its buffer is allocated (:func:`_past_end`
    looks again, in case the file grew since it was opened).
    """
    if length is None:
        return max(0, fd_size - offset), fd_size
    if offset + length > fd_size:
        fd_size = _past_end(fd, path, offset, length)
    return length, fd_size


def read_job(
    entries: list[tuple[str, int, int | None]],
    chunk_bytes: int,
    flags: int,
    skip: bool = False,
    reserve: Callable[[int], bool] | None = None,
) -> tuple[list[Any], int]:
    """Read whole small items; size large ones for chunked reading (worker thread).

    Returns the buffers and the number of cache misses (-1: the probe is not
    supported here, or nothing probed), estimated from every ``_PROBE_EVERY``-th
    read.  Consecutive byte ranges of one file share one descriptor (token
    windows, say, would otherwise pay an open and a close per range).
    Every descriptor it opens is closed before it returns.  With ``skip``
    (``on_error="skip"``) an item that fails gets an :class:`ItemFailure` in
    place of its buffer and the job goes on.  With ``reserve`` (``max_inflight_bytes``)
    each item's size is reserved before its buffer is allocated; an item that does
    not fit ends the job, with a :class:`NeedRoom` after the items read.
    """
    out: list[Any] = []
    misses = probed = 0
    fd, fd_path = -1, ""
    try:
        for i, (path, offset, length) in enumerate(entries):
            if path != fd_path:
                if fd >= 0:
                    os.close(fd)
                    fd, fd_path = -1, ""
                try:
                    fd, fd_size = open_sized(path)
                except OSError as exc:
                    out.append(_failed(i, exc, skip))
                    continue
                fd_path = path
            try:
                size, fd_size = _item_size(fd, fd_size, path, offset, length)
                if reserve is not None and not reserve(size):
                    out.append(NeedRoom(size))  # the reader waits for room on the loop
                    break
                buf: Any = np.empty(size, np.uint8)
                if size > chunk_bytes:
                    out.append(Large(path, buf, offset))
                    continue
                if flags and i % _PROBE_EVERY == 0:
                    miss = read_probing(fd, buf, offset, path, flags)
                    flags, misses, probed = (
                        (0, -1, probed) if miss < 0 else (flags, misses + miss, probed + 1)
                    )
                elif os.preadv(fd, [buf], offset) != size:  # short: read the rest
                    read_exact(fd, buf, offset, path)
                out.append(buf)
            except Exception as err:
                out.append(_failed(i, _explained(err, fd, path, offset, length), skip))
    finally:
        if fd >= 0:
            os.close(fd)
    return out, _scaled_misses(out, misses, probed)


def _failed(index: int, exc: Exception, skip: bool) -> ItemFailure:
    """The entry of item ``index`` that failed with ``exc``; raised unless skipping it."""
    if not skip or not skippable(exc):
        raise ItemFailure(index, exc) from None
    return ItemFailure(index, exc)


def _scaled_misses(out: list[Any], misses: int, probed: int) -> int:
    """The cache misses of a job's reads, from those of its ``probed`` reads (-1: unknown)."""
    read = len(out) - (1 if out and isinstance(out[-1], NeedRoom) else 0)
    if probed == 0:
        return -1  # nothing probed: no observation (a job cut short by the budget, say)
    if misses > 0:
        return min(read, round(misses * read / probed))
    return misses


read_job_skipping = functools.partial(read_job, skip=True)


def _explained(exc: Exception, fd: int, path: str, offset: int, length: int | None) -> Exception:
    """Make a failed read say which file, and how short it was, in its own message.

    ``preadv`` on a folder raises IsADirectoryError without a filename (the
    path was replaced by a folder after listing); a short read reports only
    the last call's offsets, not the range the user asked for.
    """
    if isinstance(exc, OSError) and exc.filename is None:
        exc.filename = path
        return exc
    if not isinstance(exc, EOFError):
        return exc
    try:
        now = os.fstat(fd).st_size
    except OSError:
        return exc
    if length is not None:
        text = (
            f"{path}: byte range (offset {offset}, length {length}) runs past the end of "
            f"the file ({now} bytes): a wrong range, or the file was truncated after listing"
        )
    else:
        text = f"{path}: the file was truncated to {now} bytes while being read"
    new = EOFError(text)
    new.__cause__ = exc
    return new


def _past_end(fd: int, path: str, offset: int, length: int) -> int:
    """The file's size now if the range fits it after all (it grew); else raise EOFError."""
    now = os.fstat(fd).st_size
    if offset + length <= now:
        return now
    raise EOFError(
        f"{path}: byte range (offset {offset}, length {length}) runs past the end of "
        f"the file ({now} bytes): a wrong range, or the file was truncated after listing"
    )


#: A job of a large item reads at least this much (several chunks, one ``preadv``
#: each) once the item has more chunks than workers to read them: a job costs a
#: thread crossing (hundreds of microseconds of CPU here), a 1 MiB read about as much.
_MIN_JOB_BYTES = 1 << 20


def piece_bytes(size: int, chunk_bytes: int, workers: int) -> int:
    """Bytes per job for a ``size``-byte item: whole chunks, enough jobs for ``workers``."""
    chunks = -(-size // chunk_bytes)
    per_job = min(-(-_MIN_JOB_BYTES // chunk_bytes), chunks // max(1, workers))
    return chunk_bytes * max(1, per_job)


def read_piece(large: Large, start: int, stop: int, chunk: int, flags: int) -> tuple[int, int]:
    """Read ``buf[start:stop]`` of a large item, ``chunk`` bytes a ``preadv`` (worker thread)."""
    fd = open_regular(large.path)
    miss = 0
    try:
        for a in range(start, stop, chunk):
            b = min(stop, a + chunk)
            if a == start:  # the first chunk's read probes the page cache for the piece
                miss = read_probing(fd, large.buf[a:b], large.offset + a, large.path, flags)
            else:
                read_exact(fd, large.buf[a:b], large.offset + a, large.path)
    finally:
        os.close(fd)
    return stop - start, miss


class ReadStep(FusedStep):
    """A reader's step of a fused job: :func:`read_job` over the group's items.

    Stops the job when an item is larger than one chunk (a :class:`Large`): the
    reader reads those in concurrent pieces on the loop, then the job goes on.
    """

    __slots__ = ("chunk_bytes", "flags", "with_source")

    def __init__(self, chunk_bytes: int, flags: int, with_source: bool) -> None:
        self.chunk_bytes = chunk_bytes
        self.flags = flags  # the page-cache probe of the reader's governor
        self.with_source = with_source  # pair each buffer with the item it was read for

    def run(self, items: list[Any], out: StepRun) -> tuple[list[Any], bool]:
        c0 = time.thread_time()
        bufs, out.misses = read_job(_entries(items), self.chunk_bytes, self.flags)
        out.cpu = time.thread_time() - c0
        out.bytes = sum(len(x) for x in bufs if not isinstance(x, Large))
        if any(isinstance(x, Large) for x in bufs):
            return bufs, True
        if self.with_source:  # this step's input: after a map, the mapped items
            bufs = list(zip(items, bufs, strict=True))
        return bufs, False


def _entries(items: list[Any]) -> list[tuple[str, int, int | None]]:
    """``normalize_item`` of each item (paths take a fast path); a bad one is an ItemFailure."""
    try:
        return [(x, 0, None) if type(x) is str else normalize_item(x) for x in items]
    except (TypeError, ValueError):
        for i, x in enumerate(items):
            try:
                normalize_item(x)
            except (TypeError, ValueError) as exc:
                raise ItemFailure(i, exc) from None
        raise
