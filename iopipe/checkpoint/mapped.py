"""The warm path: tensors of a page-cached shard as views of a private mapping.

A shard whose data is mostly in the page cache (``mincore``: at least
:data:`MAPPED_MIN_SHARE` of its pages) is loaded to CPU by mapping the file
``MAP_PRIVATE`` and reading and writable: each tensor is a view of the mapping, no
byte is copied at load time, and pages are shared with the page cache until a
tensor is written, when the kernel copies the written page (copy-on-write: the file
never changes).  This is what ``safetensors.torch.load_file`` does.

The hazard of any mapping: a file changed on disk while its tensors live shows
through in pages not yet written (Linux maps the cache's pages), and a file
truncated under the mapping raises ``SIGBUS`` when a page past the new end is
touched.  A file whose size changed since its header was read is refused here;
``copy=True`` (or a checkpoint the caller will overwrite) reads into owned memory
instead.
"""

from __future__ import annotations

import mmap
import os
from typing import Any

import torch

from iopipe.checkpoint.header import CheckpointError, ShardHeader
from iopipe.checkpoint.io import resident_share
from iopipe.io.files import open_regular
from iopipe.runtime.threads import WorkerPool

__all__ = ["MAPPED_MIN_SHARE", "is_cached", "map_shard", "map_shards"]

#: Share of a shard's data pages that must be cached for it to be mapped.
MAPPED_MIN_SHARE = 0.5
#: Windows :func:`is_cached` samples in a large shard, and the bytes of each.
_SAMPLES, _WINDOW = 32, 256 << 10
#: Largest piece of one ``madvise`` call (pieces are spread over threads).
_POPULATE_PIECE = 32 << 20
#: ``madvise(MADV_POPULATE_READ)`` (Linux 5.14): fill the page tables from the cache
#: in one call, without breaking copy-on-write; older kernels refuse it (then pages
#: fault in on first touch, 16 at a time by fault-around).
_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)


def _span(header: ShardHeader) -> tuple[int, int]:
    """The bytes from the first to the end of the last of ``header``'s tensors."""
    if not header.tensors:
        return header.data_start, 0
    first = header.tensors[0].offset
    return first, max(s.offset + s.nbytes for s in header.tensors) - first


def is_cached(header: ShardHeader) -> bool:
    """Whether ``header``'s tensors are mostly in the page cache (False when unknown)."""
    start, data = _span(header)
    if data <= 0:
        return True
    try:
        fd = open_regular(header.path)
    except OSError:
        return False  # the reader reports it, with its own message
    try:
        share = _sampled_share(fd, start, data)
    finally:
        os.close(fd)
    return share is not None and share >= MAPPED_MIN_SHARE


def _sampled_share(fd: int, start: int, length: int) -> float | None:
    """:func:`resident_share` of ``_SAMPLES`` windows spread over a large range.

    ``mincore`` of a whole multi-GB shard walks every page (~5 ms per 400 MB here,
    as long as safetensors takes to map the file); evenly spread windows answer
    "mostly cached?" as well at a fraction of the cost.
    """
    if length <= _SAMPLES * _WINDOW * 4:
        return resident_share(fd, start, length)
    shares = []
    for k in range(_SAMPLES):
        share = resident_share(fd, start + (length - _WINDOW) * k // (_SAMPLES - 1), _WINDOW)
        if share is None:
            return None
        shares.append(share)
    return sum(shares) / len(shares)


def _madvise() -> Any:
    """libc's ``madvise`` with its signature, or None."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _madvise()


def _runs(address: int, header: ShardHeader) -> list[tuple[int, int]]:
    """The page runs of ``header``'s tensors (only those: a subset stays a subset),
    cut into pieces of at most :data:`_POPULATE_PIECE` bytes, as (address, length)."""
    page = mmap.PAGESIZE
    runs: list[list[int]] = []
    for spec in header.tensors:
        start, end = spec.offset // page * page, spec.offset + spec.nbytes
        if runs and start <= runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], end)
        elif spec.nbytes:
            runs.append([start, end])
    return [
        (address + at, min(_POPULATE_PIECE, end - at))
        for start, end in runs
        for at in range(start, end, _POPULATE_PIECE)
    ]


def _populate(pieces: list[tuple[int, int]]) -> bool:
    """Map the cached pages of ``pieces``; False once the kernel refuses (then stop)."""
    if _MADVISE is None:
        return False
    return all(_MADVISE(address, length, _POPULATE_READ) == 0 for address, length in pieces)


def map_shards(headers: list[ShardHeader], threads: int) -> list[list[torch.Tensor]]:
    """:func:`map_shard` of each header, their page tables filled by ``threads`` threads.

    Filling page tables from the page cache is CPU work in the kernel that scales
    with threads (0.8 GB here: 22 ms on one thread, 13 ms on two).
    """
    flats = [_map(h) for h in headers]
    pieces = [p for h, flat in zip(headers, flats, strict=True) for p in _runs(flat.data_ptr(), h)]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    workers = max(1, min(threads, cores, len(pieces)))
    if workers == 1:
        _populate(pieces)
    else:
        pool = WorkerPool(workers, "iopipe-ckpt")
        try:
            jobs = [pool.submit(_populate, pieces[k::workers]) for k in range(workers)]
            for job in jobs:
                job.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return [_views(h, flat) for h, flat in zip(headers, flats, strict=True)]


def map_shard(header: ShardHeader) -> list[torch.Tensor]:
    """The tensors of ``header`` (in its order) as copy-on-write views of the file.

    The mapping holds no file descriptor; it lives while any of its tensors does. A
    tensor whose offset is not a multiple of its item size (no writer in use
    produces one) is copied out of the mapping instead.

    Raises:
        CheckpointError: The file cannot be mapped, or its size changed since the
            header was read.
    """
    return map_shards([header], 1)[0]


def _map(header: ShardHeader) -> torch.Tensor:
    """The whole file of ``header``, mapped privately, as a flat uint8 tensor."""
    path = header.path
    try:
        size = os.stat(path).st_size
        if size != header.file_bytes:
            raise CheckpointError(
                f"{path}: file changed while loading ({header.file_bytes} bytes when its "
                f"header was read, {size} now)",
                path=path,
            )
        # shared=False: MAP_PRIVATE, readable and writable (what safetensors maps).
        storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=size)
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"cannot map {path}: {exc}", path=path) from exc
    return torch.empty(0, dtype=torch.uint8).set_(storage)  # type: ignore[arg-type]


def _views(header: ShardHeader, flat: torch.Tensor) -> list[torch.Tensor]:
    out = []
    for spec in header.tensors:
        piece = flat[spec.offset : spec.offset + spec.nbytes]
        if spec.offset % spec.dtype.itemsize:
            piece = piece.clone()  # a misaligned view cannot be reinterpreted in place
        out.append(piece.view(spec.dtype).reshape(spec.shape))
    return out
