"""Distributed loading: each rank reads a disjoint share of the bytes, then all exchange.

The selected tensors are laid out, in file order, in one flat byte buffer (each
tensor at a multiple of :data:`_ALIGN`, so every dtype views it in place). Their
data bytes, ``D`` in all, are cut into ``world_size`` contiguous ranges of
``D / world_size`` bytes; rank ``r`` reads range ``r`` (tensor boundaries do not
matter: a large tensor is split between ranks) into its place in the buffer, then
every rank broadcasts its range to the others. Each rank thus reads
``ceil(D / world_size)`` tensor bytes plus the headers, and ends with the same bytes.

No wait can hang on another rank's failure: the ranks first agree on the plan
(every rank's fingerprint of it, or its error, is gathered by all), and after the
reads on whether every rank succeeded; a failure on any rank is raised on all of
them, naming that rank, before any broadcast starts.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import threading
from collections.abc import Callable
from typing import Any

import torch

from iopipe.checkpoint.header import CheckpointError, ShardHeader, TensorSpec
from iopipe.checkpoint.io import Request, bytes_of, read_into
from iopipe.checkpoint.load import cast
from iopipe.checkpoint.remote import fetch_into
from iopipe.io.files import open_regular
from iopipe.runtime.threads import WorkerPool

__all__ = ["load_shared"]

#: Alignment of each tensor in the shared buffer (any dtype's item size divides it).
_ALIGN = 64
#: Most buffers one ``preadv`` gets.
_MAX_PARTS = 512


class _Layout:
    """Where each selected tensor sits in the flat buffer and in the data stream."""

    def __init__(self, headers: list[ShardHeader]) -> None:
        self.headers = headers
        self.specs: list[TensorSpec] = [s for h in headers for s in h.tensors]
        self.file_of = [f for f, h in enumerate(headers) for _ in h.tensors]
        self.at: list[int] = []  # offset of each tensor in the flat buffer
        self.cum: list[int] = []  # data bytes of the tensors before each one
        flat = data = 0
        for spec in self.specs:
            flat = -(-flat // _ALIGN) * _ALIGN
            self.at.append(flat)
            self.cum.append(data)
            flat += spec.nbytes
            data += spec.nbytes
        self.total, self.data = flat, data
        self.ends = [c + s.nbytes for c, s in zip(self.cum, self.specs, strict=True)]

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for spec in self.specs:
            digest.update(f"{spec.name}\0{spec.dtype}\0{spec.shape}\0{spec.nbytes}\n".encode())
        return f"{len(self.specs)} tensors, {self.data} bytes, {digest.hexdigest()[:16]}"

    def flat_position(self, pos: int) -> int:
        """Where data byte ``pos`` sits in the flat buffer (``total`` for the end)."""
        i = bisect.bisect_right(self.ends, pos)
        return self.total if i == len(self.specs) else self.at[i] + pos - self.cum[i]

    def requests(self, lo: int, hi: int, chunk_bytes: int) -> list[Request]:
        """Reads covering data bytes ``[lo, hi)``; pieces are ``(tensor, start, n)``."""
        out: list[Request] = []
        i = bisect.bisect_right(self.ends, lo)
        while i < len(self.specs) and self.cum[i] < hi:
            spec = self.specs[i]
            start = max(lo, self.cum[i]) - self.cum[i]
            stop = min(hi, self.ends[i]) - self.cum[i]
            while start < stop:
                file, offset = self.file_of[i], spec.offset + start
                last = out[-1] if out else None
                if (
                    last is None
                    or last.file != file
                    or last.offset + last.nbytes != offset
                    or last.nbytes >= chunk_bytes
                    or len(last.pieces) >= _MAX_PARTS
                ):
                    last = Request(file, offset)
                    out.append(last)
                take = min(stop - start, chunk_bytes - last.nbytes)
                last.pieces.append((i, start, take))
                last.nbytes += take
                start += take
            i += 1
        return out


def _dist() -> Any:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "distributed=True needs an initialised torch.distributed process group "
            "(call torch.distributed.init_process_group first)"
        )
    return dist


def _agree(dist: Any, group: Any, failure: BaseException | None, what: str) -> None:
    """Gather every rank's ``failure`` on every rank; raise if any rank failed.

    A rank that failed raises its own exception; the others raise a
    :class:`CheckpointError` naming the first rank that failed and why.
    """
    mine = None if failure is None else f"{type(failure).__name__}: {failure}"
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    if failure is not None:
        raise failure
    failed = [(r, m) for r, m in enumerate(gathered) if m is not None]
    if failed:
        rank, message = failed[0]
        raise CheckpointError(f"distributed load: rank {rank} failed to {what}: {message}")


def _same_plan(dist: Any, group: Any, layout: _Layout) -> None:
    """Refuse (on every rank) ranks that planned different checkpoints."""
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, layout.fingerprint(), group=group)
    if len(set(gathered)) > 1:
        shown = "; ".join(f"rank {r}: {p}" for r, p in enumerate(gathered))
        raise CheckpointError(
            f"distributed load: the ranks planned different checkpoints ({shown})"
        )


def _read_share(
    layout: _Layout,
    client: Any,
    requests: list[Request],
    view: memoryview,
    base: int,
    concurrency: int,
) -> None:
    """Run ``requests`` into ``view`` (flat buffer bytes from position ``base``)."""
    pool = WorkerPool(concurrency, "iopipe-ckpt")
    files = _Files(layout.headers, client)
    try:
        futures: list[tuple[Any, Request]] = []
        for request in requests:
            buffers = [
                view[layout.at[i] + s - base : layout.at[i] + s - base + n]
                for i, s, n in request.pieces
            ]
            futures.append((pool.submit(files.read, request, buffers), request))
        for job, request in futures:
            try:
                job.result()
            except (OSError, EOFError, ValueError) as exc:
                path = layout.headers[request.file].path
                name = layout.specs[request.pieces[0][0]].name
                raise CheckpointError(
                    f"{path}: reading {request.nbytes} bytes at offset {request.offset} "
                    f"(tensor {name!r}) failed: {exc}",
                    path=path,
                    tensor=name,
                ) from exc
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        files.close()


class _Files:
    """Reads of the shards' bytes, local (one descriptor per file, opened on first use)
    or remote (ranged GETs); :meth:`read` runs on pool threads."""

    def __init__(self, headers: list[ShardHeader], client: Any) -> None:
        self.headers = headers
        self.client = client
        self.fds: dict[int, int] = {}
        self.lock = threading.Lock()

    def read(self, request: Request, buffers: list[memoryview]) -> None:
        path = self.headers[request.file].path
        if self.client is not None:
            fetch_into(self.client, path, request.offset, request.nbytes, buffers)
            return
        with self.lock:
            fd = self.fds.get(request.file)
            if fd is None:
                fd = self.fds[request.file] = open_regular(path)
        read_into(fd, buffers, request.offset, request.offset + request.nbytes)

    def close(self) -> None:
        with self.lock:
            for fd in self.fds.values():
                os.close(fd)
            self.fds.clear()


def load_shared(
    plan: Callable[[], tuple[list[ShardHeader], Any]],
    *,
    device: torch.device,
    dtype: torch.dtype | None,
    group: Any,
    concurrency: int,
    chunk_bytes: int,
) -> dict[str, torch.Tensor]:
    """Load the checkpoint ``plan()`` describes, each rank reading its share (see above)."""
    dist = _dist()
    layout: _Layout | None = None
    failure: BaseException | None = None
    client = None
    try:
        headers, client = plan()
        layout = _Layout(headers)
    except Exception as exc:  # every rank must hear of it, or the others would wait
        failure = exc
    _agree(dist, group, failure, "plan the checkpoint")
    assert layout is not None
    _same_plan(dist, group, layout)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    bounds = [layout.data * r // world for r in range(world + 1)]
    edges = [0, *(layout.flat_position(b) for b in bounds[1:-1]), layout.total]
    home = device if device.type == "cuda" else torch.device("cpu")
    flat = torch.empty(layout.total, dtype=torch.uint8, device=home)
    try:
        _fill_share(layout, client, flat, edges[rank : rank + 2], bounds[rank : rank + 2],
                    concurrency, chunk_bytes)  # fmt: skip
    except Exception as exc:
        failure = exc
    _agree(dist, group, failure, "read its share")
    for r in range(world):
        if edges[r + 1] > edges[r]:
            src = r if group is None else dist.get_global_rank(group, r)
            dist.broadcast(flat[edges[r] : edges[r + 1]], src=src, group=group)
    out: dict[str, torch.Tensor] = {}
    for spec, at in zip(layout.specs, layout.at, strict=True):
        tensor = flat[at : at + spec.nbytes].view(spec.dtype).reshape(spec.shape)
        tensor = cast(tensor, dtype)
        out[spec.name] = tensor if tensor.device == device else tensor.to(device)
    return out


def _fill_share(
    layout: _Layout,
    client: Any,
    flat: torch.Tensor,
    edges: list[int],
    bounds: list[int],
    concurrency: int,
    chunk_bytes: int,
) -> None:
    """Read this rank's data bytes ``bounds`` into ``flat[edges[0]:edges[1]]``."""
    requests = layout.requests(bounds[0], bounds[1], chunk_bytes)
    if flat.device.type == "cpu":
        _read_share(layout, client, requests, bytes_of(flat), 0, concurrency)
        return
    lo, hi = edges
    stage = torch.empty(hi - lo, dtype=torch.uint8, pin_memory=True)
    _read_share(layout, client, requests, bytes_of(stage), lo, concurrency)
    flat[lo:hi].copy_(stage)
