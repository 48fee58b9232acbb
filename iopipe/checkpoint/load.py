"""Load safetensors checkpoints with concurrent ``preadv`` straight into owned tensors.

The plan (``_st_header``) validates every header before a tensor byte is read. The
reader then walks each shard in offset order, cutting it into requests of at most
``chunk_bytes`` contiguous file bytes; one request may cover many small tensors (one
``preadv`` with one buffer per tensor piece) and a large tensor spans many requests.
Requests run on a small :class:`~iopipe.runtime.threads.WorkerPool` (daemon threads
``iopipe-ckpt_N``):

* CPU: each request reads straight into its destination tensors' bytes; large
  tensors of a file that is mostly not in the page cache are read with ``O_DIRECT``
  (see ``_ckpt_io``), so the disk writes into them without a page-cache copy.
* CUDA: each request reads into one slot of a ring of pinned staging buffers; the
  consumer thread then queues non-blocking host-to-device copies on a side stream and
  records the slot's event, which is synchronised before the slot takes another read.
  Reads of the next slots overlap the copies of the previous ones.

Invariants: at most ``concurrency`` reads are in flight; the staging ring (CUDA) holds
at most ``max_inflight_bytes``; with a budget (``iter_checkpoint``), tensors allocated
but not yet handed to the caller total at most ``max_inflight_bytes`` (a single larger
tensor is admitted alone). Only the consumer thread allocates, completes or yields
tensors; workers only fill buffers they were given.
"""

from __future__ import annotations

import collections
import contextlib
import os
from collections.abc import Generator, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Any

import torch

from iopipe.checkpoint.header import CheckpointError, ShardHeader, plan_checkpoint
from iopipe.checkpoint.io import (
    ALIGN,
    MiB,
    Request,
    bytes_of,
    empty_cpu,
    mostly_uncached,
    open_direct,
    plan_reads,
    read_into,
)
from iopipe.io.files import open_regular
from iopipe.runtime.threads import WorkerPool

__all__ = ["cast"]

#: Default bound on staging memory and on not-yet-yielded tensors.
DEFAULT_MAX_INFLIGHT_BYTES = 256 * MiB
#: Default bytes per read request (bench/bench_checkpoint.py picked it).
DEFAULT_CHUNK_BYTES = 8 * MiB
#: Default reads in flight: None means one per CPU core, at least 4 and at most 16.
#: Cold loads gain nothing past 4 on a 2-core VM (bench/bench_checkpoint.py --sweep);
#: warm loads scale with cores (on 16 cores: 4 threads 10 GB/s, 16 threads 15 GB/s to
#: CPU, 17 -> 30 GB/s to CUDA; bench/gpu_check_checkpoint.py --sweep 4 16).
DEFAULT_CONCURRENCY: int | None = None


def _validate(
    device: torch.device | str,
    dtype: torch.dtype | None,
    max_inflight_bytes: int,
    concurrency: int | None,
    chunk_bytes: int,
) -> tuple[torch.device, int]:
    """Check the common arguments; return the device and the concurrency to use."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must name a torch device, got {device!r}") from exc
    if dev.type == "meta":
        raise ValueError(f"device must hold data, got device={device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or None, got {dtype!r}")
    if concurrency is None:
        concurrency = _default_concurrency()
    for name, value in (
        ("max_inflight_bytes", max_inflight_bytes),
        ("concurrency", concurrency),
        ("chunk_bytes", chunk_bytes),
    ):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {value!r}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    return dev, concurrency


def _default_concurrency() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(4, min(16, cores or 4))


class _Loader:
    """One pass over a planned checkpoint; :meth:`run` yields ``(index, tensor)``.

    All state is touched by the consumer thread only, except the buffers handed to
    pool threads, which nobody else touches until their future completes.
    """

    def __init__(
        self,
        headers: list[ShardHeader],
        *,
        device: torch.device,
        dtype: torch.dtype | list[torch.dtype | None] | None,
        budget: int | None,
        max_inflight_bytes: int,
        concurrency: int,
        chunk_bytes: int,
    ) -> None:
        self.headers = headers
        self.specs = [spec for header in headers for spec in header.tensors]
        self.device = device
        self.cuda = device.type == "cuda"
        # The dtype each tensor is cast to (floating point only), or None: keep it.
        self.casts = dtype if isinstance(dtype, list) else [dtype] * len(self.specs)
        self.budget = budget
        self.concurrency = concurrency
        if self.cuda:
            # The staging ring must fit the bound: never more than max_inflight_bytes.
            # Each slot has room to widen its read to ALIGN boundaries (O_DIRECT).
            self.slot_pad = 2 * ALIGN if max_inflight_bytes >= 4 * ALIGN else 0
            chunk_bytes = max(1, min(chunk_bytes, max_inflight_bytes - self.slot_pad))
            self.slot_bytes = chunk_bytes + self.slot_pad
            self.slot_count = max(
                1, min(max_inflight_bytes // self.slot_bytes, 2 * concurrency + 2)
            )
            self.concurrency = min(concurrency, self.slot_count)
        self.chunk_bytes = chunk_bytes
        # Planned by run(), once it knows which files to read directly.
        self.requests: list[Request] = []
        self.remaining: list[int] = []  # bytes still to read, per tensor
        self.span: list[int] = []
        self.head: list[int] = []
        self.tensors: list[torch.Tensor | None] = [None] * len(self.specs)
        self.started = bytearray(len(self.specs))  # 1 once allocated (stays 1 after yield)
        # Each allocated tensor's bytes: a memoryview (CPU) or a uint8 tensor (CUDA).
        self.cpu_bytes: list[memoryview | None] = [None] * len(self.specs)
        self.gpu_bytes: list[torch.Tensor | None] = [None] * len(self.specs)
        self.pending_bytes = 0  # allocated, not yet yielded
        self.ready: collections.deque[int] = collections.deque()
        self.fds: list[int] = []
        self.direct_fds: list[int] = []  # O_DIRECT twin of each fd, or -1

    # -- allocation ---------------------------------------------------------------
    def _allocate(self, index: int) -> None:
        spec = self.specs[index]
        if self.cuda:
            tensor = torch.empty(spec.shape, dtype=spec.dtype, device=self.device)
            self.gpu_bytes[index] = tensor.view(-1).view(torch.uint8)
        else:
            tensor, self.cpu_bytes[index] = empty_cpu(
                spec.shape, spec.dtype, spec.nbytes, self.span[index], self.head[index]
            )
        self.tensors[index] = tensor
        self.started[index] = 1
        self.pending_bytes += spec.nbytes
        if spec.nbytes == 0:
            self.ready.append(index)

    def _admit(self, position: int) -> bool:
        """Allocate the tensors request ``position`` starts; False when the budget says wait.

        Over budget, a request that continues an allocated tensor is cut after that
        tensor's pieces and the head goes ahead: otherwise that tensor could never
        finish, and nothing would ever free budget.
        """
        request = self.requests[position]
        fresh = [i for i, _, _ in request.pieces if not self.started[i]]
        if fresh and self.budget is not None and self.pending_bytes:
            need = sum(self.specs[i].nbytes for i in fresh)
            if self.pending_bytes + need > self.budget:
                keep = len(request.pieces) - len(fresh)
                if keep == 0:
                    return False
                self._split(position, keep)
                return True
        for i in fresh:
            self._allocate(i)
        return True

    def _split(self, position: int, keep: int) -> None:
        request = self.requests[position]
        head = Request(request.file, request.offset, 0, request.pieces[:keep])
        head.nbytes = sum(n for _, _, n in head.pieces)
        tail = Request(
            request.file,
            request.offset + head.nbytes,
            request.nbytes - head.nbytes,
            request.pieces[keep:],
        )
        self.requests[position : position + 1] = [head, tail]

    def _allocate_empties(self, upto: int) -> None:
        while self._empty_cursor < len(self.specs) and self._empty_cursor <= upto:
            i = self._empty_cursor
            if self.specs[i].nbytes == 0 and not self.started[i]:
                self._allocate(i)
            self._empty_cursor += 1

    # -- the loop -----------------------------------------------------------------
    def run(self) -> Generator[tuple[int, torch.Tensor], None, None]:
        """Yield ``(index into specs, finished tensor)`` in completion order."""
        self._empty_cursor = 0
        pool = WorkerPool(self.concurrency, "iopipe-ckpt")
        stream: Any = None
        try:
            self._open_files()
            if self.cuda:
                stream = self._start_cuda()
            yield from self._loop(pool, stream)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            if stream is not None:
                stream.synchronize()  # queued copies must land before memory is freed
            for fd in (*self.fds, *self.direct_fds):
                if fd >= 0:
                    os.close(fd)

    def _open_files(self) -> None:
        """Open every shard, pick the ones to read directly, and plan the reads."""
        direct = set()
        for file, header in enumerate(self.headers):
            self.fds.append(_open(header.path))
            self.direct_fds.append(-1)
            if (not self.cuda or self.slot_pad) and mostly_uncached(self.fds[file], header):
                self.direct_fds[file] = open_direct(header.path)
            if self.direct_fds[file] >= 0:
                direct.add(file)
                # The buffered twin now reads only what O_DIRECT refuses and (CPU)
                # small tensors: no readahead into the big ones, which arrive directly.
                os.posix_fadvise(self.fds[file], 0, 0, os.POSIX_FADV_RANDOM)
        # CUDA widens each staged read to ALIGN instead (see _submit): no direct layout.
        plan = plan_reads(self.headers, self.chunk_bytes, set() if self.cuda else direct)
        self.requests, self.span, self.head = plan.requests, plan.span, plan.head
        self.remaining = list(plan.span)

    def _start_cuda(self) -> Any:
        stream = torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]
        self.slots = [
            torch.empty(self.slot_bytes, dtype=torch.uint8, pin_memory=True)
            for _ in range(self.slot_count)
        ]
        self.slot_views = [bytes_of(slot) for slot in self.slots]
        self.slot_events: list[Any] = [None] * self.slot_count
        self.slot_head = [0] * self.slot_count  # where the request's bytes start in it
        self.free_slots = collections.deque(range(self.slot_count))
        return stream

    def _loop(self, pool: WorkerPool, stream: Any) -> Iterator[tuple[int, torch.Tensor]]:
        inflight: dict[Future[None], tuple[Request, int]] = {}
        next_request = 0
        while True:
            while (
                next_request < len(self.requests)
                and len(inflight) < self.concurrency
                and (not self.cuda or self.free_slots)
                and self._admit(next_request)
            ):
                request = self.requests[next_request]
                self._allocate_empties(request.pieces[-1][0])
                slot = self._take_slot() if self.cuda else -1
                inflight[self._submit(pool, request, slot)] = (request, slot)
                next_request += 1
            if next_request == len(self.requests):
                self._allocate_empties(len(self.specs))
            if self.ready:
                yield self._finish(self.ready.popleft(), stream)
                continue
            if not inflight:
                if next_request < len(self.requests):  # _admit's split rule prevents this
                    raise RuntimeError("iopipe checkpoint loader stalled; this is a bug")
                return  # every request done, nothing ready: the pass is complete
            # No timeout: every future completes, because a pool thread only runs
            # preadv, which returns or raises (an error surfaces via result()).
            done, _ = wait(inflight, return_when=FIRST_COMPLETED)
            for future in done:
                request, slot = inflight.pop(future)
                try:
                    future.result()
                except (OSError, EOFError) as exc:
                    raise self._read_error(request, exc) from exc
                self._complete(request, slot, stream)

    def _take_slot(self) -> int:
        slot = self.free_slots.popleft()
        event = self.slot_events[slot]
        if event is not None:
            event.synchronize()  # the slot's last copies have left it
        return slot

    def _submit(self, pool: WorkerPool, request: Request, slot: int) -> Future[None]:
        fd, direct_fd = self.fds[request.file], self.direct_fds[request.file]
        offset, end = request.offset, request.offset + request.nbytes
        if slot >= 0 and direct_fd >= 0:
            # Widen the read to ALIGN boundaries; the bytes wanted start at slot_head.
            start = offset - offset % ALIGN
            stop = -(-end // ALIGN) * ALIGN
            self.slot_head[slot] = offset - start
            buffers = [self.slot_views[slot][: stop - start]]
            return pool.submit(read_into, direct_fd, buffers, start, end, fd)
        if slot >= 0:
            self.slot_head[slot] = 0
            buffers = [self.slot_views[slot][: request.nbytes]]
            return pool.submit(read_into, fd, buffers, offset, end)
        views = self.cpu_bytes
        buffers = [views[i][start : start + n] for i, start, n in request.pieces]  # type: ignore[index]
        if request.direct and direct_fd >= 0:
            # The aligned span may run past the end of the file: stop there.
            end = min(end, self.headers[request.file].file_bytes)
            return pool.submit(read_into, direct_fd, buffers, offset, end, fd)
        return pool.submit(read_into, fd, buffers, offset, end)

    def _complete(self, request: Request, slot: int, stream: Any) -> None:
        if self.cuda:
            staged = self.slots[slot]
            at = self.slot_head[slot]
            with torch.cuda.stream(stream):
                for i, start, n in request.pieces:
                    dest = self.gpu_bytes[i]
                    assert dest is not None
                    dest[start : start + n].copy_(staged[at : at + n], non_blocking=True)
                    at += n
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                event.record(stream)
            self.slot_events[slot] = event
            self.free_slots.append(slot)
        for i, _, n in request.pieces:
            self.remaining[i] -= n
            if self.remaining[i] == 0:
                self.ready.append(i)

    def _finish(self, index: int, stream: Any) -> tuple[int, torch.Tensor]:
        tensor = self.tensors[index]
        assert tensor is not None
        self.tensors[index] = None
        self.cpu_bytes[index] = None
        self.gpu_bytes[index] = None
        self.pending_bytes -= self.specs[index].nbytes
        if stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(stream)
        tensor = cast(tensor, self.casts[index])
        if tensor.device != self.device and self.device.type not in ("cpu", "cuda"):
            tensor = tensor.to(self.device)
        return index, tensor

    def _read_error(self, request: Request, exc: BaseException) -> CheckpointError:
        path = self.headers[request.file].path
        names = [self.specs[i].name for i, _, _ in request.pieces]
        shown = ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
        return CheckpointError(
            f"{path}: reading {request.nbytes} bytes at offset {request.offset} "
            f"(tensors {shown}) failed: {exc}",
            path=path,
            tensor=names[0],
        )


def cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``tensor`` cast to ``dtype`` if it is floating point (float8 included), else as is."""
    if dtype is None or tensor.dtype == dtype or not tensor.is_floating_point():
        return tensor
    return tensor.to(dtype)


def _open(path: str) -> int:
    try:
        return open_regular(path)
    except OSError as exc:
        raise CheckpointError(f"cannot open {path}: {exc.strerror}", path=path) from exc


def _make_loader(
    path: str | os.PathLike[str],
    *,
    device: torch.device | str,
    dtype: torch.dtype | None,
    budget: bool,
    max_inflight_bytes: int,
    concurrency: int | None,
    chunk_bytes: int,
) -> _Loader:
    dev, threads = _validate(device, dtype, max_inflight_bytes, concurrency, chunk_bytes)
    return _Loader(
        plan_checkpoint(path),
        device=dev,
        dtype=dtype,
        budget=max_inflight_bytes if budget else None,
        max_inflight_bytes=max_inflight_bytes,
        concurrency=threads,
        chunk_bytes=chunk_bytes,
    )


def _named(loader: _Loader) -> Generator[tuple[str, torch.Tensor], None, None]:
    # Close the inner generator explicitly: left to the garbage collector, its pool and
    # files would outlive an early close() for as long as a traceback holds this frame.
    with contextlib.closing(loader.run()) as pairs:
        for index, tensor in pairs:
            yield loader.specs[index].name, tensor
