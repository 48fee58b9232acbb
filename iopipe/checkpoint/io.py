"""Checkpoint I/O pieces: read plans, destination memory, the pool threads' read call.

Two ways to read a tensor:

* **buffered**: through the page cache with ``preadv``, several small tensors per call
  (one buffer each); the only way for CUDA staging and for files already cached.
* **direct** (``O_DIRECT``): for large tensors of a file that is mostly *not* in the
  page cache, on CPU. The disk writes straight into the tensor's memory, skipping the
  page-cache copy, which is about half the CPU time of a cold buffered load
  (bench/bench_checkpoint.py). ``O_DIRECT`` needs offsets, lengths and buffers aligned
  to :data:`ALIGN`, so such a tensor gets a mapping spanning the aligned file range
  around it, the tensor being a view at ``offset % ALIGN`` into it; the few bytes
  before and after it (neighbours' data) are read along and never exposed.
  A file a filesystem won't open ``O_DIRECT``, or a read it refuses with ``EINVAL``,
  falls back to buffered reads into the same memory.
"""

from __future__ import annotations

import errno
import functools
import mmap
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from iopipe.checkpoint.header import ShardHeader
from iopipe.io.files import O_READ, open_regular
from iopipe.io.reads import RWF_NOWAIT, read_cached

MiB = 1 << 20
#: Alignment of direct reads (the logical block size of nearly every device).
ALIGN = 4096
#: Tensors at least this large get their own huge-page mapping (see :func:`empty_cpu`).
OWN_MAPPING_MIN_BYTES = 1 * MiB
#: Files with less tensor data than this are always read buffered.
DIRECT_MIN_FILE_BYTES = 32 * MiB
#: Pages sampled per file to guess whether it sits in the page cache.
CACHE_SAMPLES = 16
_ANON_FLAGS: int | None = (
    mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS if hasattr(mmap, "MAP_ANONYMOUS") else None
)
_HUGEPAGE: int | None = getattr(mmap, "MADV_HUGEPAGE", None)
_MAX_IOV = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)


@dataclass(slots=True)
class Request:
    """``nbytes`` contiguous bytes of file ``file`` at ``offset``, split into pieces.

    Each piece is ``(tensor index, byte offset in that tensor's read buffer, length)``,
    in file order. A tensor's read buffer is its own bytes, or for a direct tensor the
    aligned span around them. ``direct`` requests have one piece.
    """

    file: int
    offset: int
    nbytes: int = 0
    pieces: list[tuple[int, int, int]] = field(default_factory=list)
    direct: bool = False


@dataclass(slots=True)
class Plan:
    """Requests for a whole checkpoint, plus each tensor's read-buffer layout."""

    requests: list[Request]
    span: list[int]  # bytes each tensor's read buffer gets (== nbytes unless direct)
    head: list[int]  # where the tensor starts in its read buffer (0 unless direct)


def plan_reads(headers: list[ShardHeader], chunk_bytes: int, direct_files: set[int]) -> Plan:
    """Cut every shard into requests, in file order.

    Buffered tensors are packed into requests of at most ``chunk_bytes`` contiguous
    bytes (neighbours share one, big ones span several); in ``direct_files``, tensors of
    at least :data:`OWN_MAPPING_MIN_BYTES` get aligned direct requests of their own.
    """
    plan = Plan([], [], [])
    direct_chunk = max(ALIGN, chunk_bytes - chunk_bytes % ALIGN)
    index = 0
    for file, header in enumerate(headers):
        current: Request | None = None
        for spec in header.tensors:
            if file in direct_files and spec.nbytes >= OWN_MAPPING_MIN_BYTES:
                start = spec.offset - spec.offset % ALIGN
                stop = -(-(spec.offset + spec.nbytes) // ALIGN) * ALIGN
                plan.head.append(spec.offset - start)
                plan.span.append(stop - start)
                for at in range(start, stop, direct_chunk):
                    n = min(direct_chunk, stop - at)
                    plan.requests.append(Request(file, at, n, [(index, at - start, n)], True))
                current = None
            else:
                plan.head.append(0)
                plan.span.append(spec.nbytes)
                current = _pack(
                    plan.requests, current, file, spec.offset, spec.nbytes, index, chunk_bytes
                )
            index += 1
    return plan


def _pack(
    requests: list[Request],
    current: Request | None,
    file: int,
    offset: int,
    nbytes: int,
    index: int,
    chunk_bytes: int,
) -> Request | None:
    """Add one buffered tensor to the requests; return the request now being filled."""
    pos = 0
    while pos < nbytes:
        at = offset + pos
        if (
            current is None
            or current.offset + current.nbytes != at
            or current.nbytes >= chunk_bytes
            or len(current.pieces) >= _MAX_IOV
        ):
            current = Request(file, at)
            requests.append(current)
        take = min(nbytes - pos, chunk_bytes - current.nbytes)
        current.pieces.append((index, pos, take))
        current.nbytes += take
        pos += take
    return current


def read_into(
    fd: int, buffers: list[memoryview], offset: int, end: int, fallback_fd: int = -1
) -> None:
    """Fill ``buffers`` from ``fd`` at ``offset`` until byte ``end`` (on a pool thread).

    Loops on short reads. ``end`` may stop short of the buffers' total (a direct read's
    aligned span can reach past the end of the file). If ``fd`` refuses a read with
    ``EINVAL`` (``O_DIRECT`` constraints), the rest is read through ``fallback_fd``.

    Raises:
        EOFError: The file ended before ``end``.
        OSError: A read failed.
    """
    start = 0
    while offset < end:
        try:
            got = os.preadv(fd, buffers[start:] if start else buffers, offset)
        except OSError as exc:
            if fallback_fd < 0 or exc.errno != errno.EINVAL:
                raise
            fd, fallback_fd = fallback_fd, -1
            continue
        if got == 0:
            raise EOFError(f"file ended at byte {offset}; truncated while loading?")
        offset += got
        while got:
            first = buffers[start]
            if len(first) <= got:
                got -= len(first)
                start += 1
            else:
                buffers[start] = first[got:]
                got = 0


def bytes_of(tensor: torch.Tensor) -> memoryview:
    """Return a writable byte view of a contiguous CPU tensor's memory."""
    array: Any = tensor.view(-1).view(torch.uint8).numpy()
    return memoryview(array)


def empty_cpu(
    shape: tuple[int, ...], dtype: torch.dtype, nbytes: int, span: int, head: int
) -> tuple[torch.Tensor, memoryview]:
    """Allocate an uninitialised CPU tensor that owns its memory, and its read buffer.

    Large tensors get their own anonymous mapping (``span`` bytes, the tensor at
    ``head``), advised to use transparent huge pages: first-touching fresh memory is
    the main cost of a warm load, and 2 MiB pages fault in several times faster than
    4 KiB ones (bench/bench_checkpoint.py). Their own mapping also returns memory to
    the OS as soon as the tensor dies, where malloc's heap can keep freed blocks
    resident when tensor sizes vary (``iter_checkpoint`` would then exceed its memory
    bound in RSS terms).
    """
    if nbytes < OWN_MAPPING_MIN_BYTES or _ANON_FLAGS is None:
        tensor = torch.empty(shape, dtype=dtype)
        return tensor, bytes_of(tensor)
    region = mmap.mmap(-1, span, flags=_ANON_FLAGS)
    if _HUGEPAGE is not None:
        try:
            region.madvise(_HUGEPAGE)
        except OSError:
            pass  # THP disabled or unsupported: plain pages still work
    # frombuffer keeps ``region`` alive for the tensor's lifetime; unmapped when freed.
    flat = torch.frombuffer(region, dtype=torch.uint8, count=nbytes, offset=head)
    return flat.view(dtype).reshape(shape), memoryview(region)


@functools.cache
def _libc_mincore() -> tuple[Any, Any, Any] | None:
    """libc's ``mmap``, ``mincore`` and ``munmap`` with their signatures; None if missing."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        mmap_fn, mincore, munmap = libc.mmap, libc.mincore, libc.munmap
    except (OSError, AttributeError):
        return None
    mmap_fn.restype = ctypes.c_void_p
    mmap_fn.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return mmap_fn, mincore, munmap


def resident_share(fd: int, start: int, length: int) -> float | None:
    """Share of the pages of ``[start, start + length)`` of ``fd`` in the page cache.

    ``mincore`` on a read-only mapping of the range: it reads nothing and starts no
    readahead.  None where the C library or the file refuses (then probe instead).
    """
    import ctypes

    fns = _libc_mincore()
    page = mmap.PAGESIZE
    first = start // page * page
    span = start + length - first
    if fns is None or span <= 0:
        return None
    mmap_fn, mincore, munmap = fns
    addr = mmap_fn(None, span, mmap.PROT_READ, mmap.MAP_SHARED, fd, first)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        return None
    try:
        pages = (span + page - 1) // page
        vec = ctypes.create_string_buffer(pages)
        if mincore(addr, span, vec) != 0:
            return None
        return (pages - vec.raw[:pages].count(0)) / pages
    finally:
        munmap(addr, span)


def mostly_uncached(fd: int, header: ShardHeader) -> bool:
    """Guess whether most of a file's tensor data is *not* in the page cache.

    Asks ``mincore`` (:func:`resident_share`), which starts no I/O.  Where that is
    refused, reads one byte at :data:`CACHE_SAMPLES` spread offsets with
    ``RWF_NOWAIT``, which fails with ``EAGAIN`` instead of waiting for the disk (a
    refused read may still start readahead, which can fill pages a later probe
    looks at: an evicted 7 MB file looked cached about once in 15 tries). Where
    neither works, answers False (the safe, buffered choice).
    """
    data = header.file_bytes - header.data_start
    if data < DIRECT_MIN_FILE_BYTES:
        return False
    share = resident_share(fd, header.data_start, data)
    if share is not None:
        return share < 0.5
    if not RWF_NOWAIT:
        return False
    probe = memoryview(bytearray(1))
    misses = 0
    for k in range(CACHE_SAMPLES):
        try:
            got = read_cached(fd, probe, header.data_start + data * k // CACHE_SAMPLES)
        except OSError:
            return False
        if got is None:
            return False
        misses += got == 0
    return 2 * misses > CACHE_SAMPLES


def open_direct(path: str) -> int:
    """Open ``path`` for ``O_DIRECT`` reads; -1 where the OS or filesystem refuses."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return -1
    try:
        return open_regular(path, O_READ | flag)
    except OSError:
        return -1
