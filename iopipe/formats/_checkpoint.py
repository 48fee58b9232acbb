"""Load safetensors checkpoints with concurrent ``preadv`` straight into owned tensors.

The plan (``_st_header``) validates every header before a tensor byte is read. The
reader then walks each shard in offset order, cutting it into requests of at most
``chunk_bytes`` contiguous file bytes; one request may cover many small tensors (one
``preadv`` with one buffer per tensor piece) and a large tensor spans many requests.
Requests run on a small thread pool (threads ``iopipe-ckpt-N``):

* CPU: each request reads straight into its destination tensors' bytes.
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
import itertools
import mmap
import os
import threading
from collections.abc import Generator, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import torch

from iopipe.formats._st_header import CheckpointError, ShardHeader, TensorSpec, plan_checkpoint

__all__ = ["iter_checkpoint", "load_checkpoint"]

MiB = 1 << 20
#: Default bound on staging memory and on not-yet-yielded tensors.
DEFAULT_MAX_INFLIGHT_BYTES = 256 * MiB
#: Default bytes per read request (bench/bench_checkpoint.py picked it).
DEFAULT_CHUNK_BYTES = 8 * MiB
#: Default reads in flight: None means one per CPU core, at least 4 and at most 16.
#: Cold loads gain nothing past 4 on a 2-core VM (bench/bench_checkpoint.py --sweep);
#: warm loads scale with cores (on 16 cores: 4 threads 10 GB/s, 16 threads 15 GB/s to
#: CPU, 17 -> 30 GB/s to CUDA; bench/gpu_check_checkpoint.py --sweep 4 16).
DEFAULT_CONCURRENCY: int | None = None
#: Tensors at least this large get their own huge-page mapping (see _empty_cpu).
_OWN_MAPPING_MIN_BYTES = 1 * MiB
_ANON_FLAGS: int | None = (
    mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS if hasattr(mmap, "MAP_ANONYMOUS") else None
)
_HUGEPAGE: int | None = getattr(mmap, "MADV_HUGEPAGE", None)
_MAX_IOV = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)


@dataclass(slots=True)
class _Request:
    """``nbytes`` contiguous bytes of file ``file`` at ``offset``, split into pieces.

    Each piece is ``(tensor index, byte offset in that tensor, length)``, in file order.
    """

    file: int
    offset: int
    nbytes: int = 0
    pieces: list[tuple[int, int, int]] = field(default_factory=list)


def _plan_requests(
    headers: list[ShardHeader], specs: list[TensorSpec], chunk_bytes: int
) -> list[_Request]:
    """Cut every shard into contiguous requests (``specs`` lists tensors in file order)."""
    requests: list[_Request] = []
    index = 0
    for file, header in enumerate(headers):
        current: _Request | None = None
        for spec in header.tensors:
            pos = 0
            while pos < spec.nbytes:
                at = spec.offset + pos
                if (
                    current is None
                    or current.offset + current.nbytes != at
                    or current.nbytes >= chunk_bytes
                    or len(current.pieces) >= _MAX_IOV
                ):
                    current = _Request(file, at)
                    requests.append(current)
                take = min(spec.nbytes - pos, chunk_bytes - current.nbytes)
                current.pieces.append((index, pos, take))
                current.nbytes += take
                pos += take
            index += 1
    assert index == len(specs)
    return requests


def _read_exact(fd: int, buffers: list[memoryview], offset: int) -> None:
    """Fill ``buffers`` from ``fd`` at ``offset`` (runs on a pool thread; loops on short reads)."""
    start = 0
    while start < len(buffers):
        got = os.preadv(fd, buffers[start:] if start else buffers, offset)
        if got == 0:
            raise EOFError(f"file ended at byte {offset}; truncated while loading?")
        offset += got
        while got:
            head = buffers[start]
            if len(head) <= got:
                got -= len(head)
                start += 1
            else:
                buffers[start] = head[got:]
                got = 0


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """Return a writable byte view of a contiguous CPU tensor's memory."""
    array: Any = tensor.view(-1).view(torch.uint8).numpy()
    return memoryview(array)


def _empty_cpu(shape: tuple[int, ...], dtype: torch.dtype, nbytes: int) -> torch.Tensor:
    """Allocate an uninitialised CPU tensor that owns its memory.

    Large tensors get their own anonymous mapping, advised to use transparent huge
    pages: first-touching fresh memory is the main cost of a warm load, and 2 MiB
    pages fault in several times faster than 4 KiB ones (bench/bench_checkpoint.py).
    Their own mapping also returns memory to the OS as soon as the tensor dies, where
    malloc's heap can keep freed blocks resident when tensor sizes vary
    (``iter_checkpoint`` would then exceed its memory bound in RSS terms).
    """
    if nbytes < _OWN_MAPPING_MIN_BYTES or _ANON_FLAGS is None:
        return torch.empty(shape, dtype=dtype)
    region = mmap.mmap(-1, nbytes, flags=_ANON_FLAGS)
    if _HUGEPAGE is not None:
        try:
            region.madvise(_HUGEPAGE)
        except OSError:
            pass  # THP disabled or unsupported: plain pages still work
    # frombuffer keeps ``region`` alive for the tensor's lifetime; unmapped when freed.
    return torch.frombuffer(region, dtype=torch.uint8, count=nbytes).view(dtype).reshape(shape)


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
        dtype: torch.dtype | None,
        budget: int | None,
        max_inflight_bytes: int,
        concurrency: int,
        chunk_bytes: int,
    ) -> None:
        self.headers = headers
        self.specs = [spec for header in headers for spec in header.tensors]
        self.device = device
        self.cuda = device.type == "cuda"
        self.dtype = dtype
        self.budget = budget
        self.concurrency = concurrency
        if self.cuda:
            # The staging ring must fit the bound: never more than max_inflight_bytes.
            chunk_bytes = min(chunk_bytes, max_inflight_bytes)
            self.slot_count = max(1, min(max_inflight_bytes // chunk_bytes, 2 * concurrency + 2))
            self.concurrency = min(concurrency, self.slot_count)
        self.requests = _plan_requests(headers, self.specs, chunk_bytes)
        self.chunk_bytes = chunk_bytes
        self.remaining = [spec.nbytes for spec in self.specs]
        self.tensors: list[torch.Tensor | None] = [None] * len(self.specs)
        self.started = bytearray(len(self.specs))  # 1 once allocated (stays 1 after yield)
        # Each allocated tensor's bytes: a memoryview (CPU) or a uint8 tensor (CUDA).
        self.cpu_bytes: list[memoryview | None] = [None] * len(self.specs)
        self.gpu_bytes: list[torch.Tensor | None] = [None] * len(self.specs)
        self.pending_bytes = 0  # allocated, not yet yielded
        self.ready: collections.deque[int] = collections.deque()
        self.fds: list[int] = []

    # -- allocation ---------------------------------------------------------------
    def _allocate(self, index: int) -> None:
        spec = self.specs[index]
        if self.cuda:
            tensor = torch.empty(spec.shape, dtype=spec.dtype, device=self.device)
        else:
            tensor = _empty_cpu(spec.shape, spec.dtype, spec.nbytes)
        self.tensors[index] = tensor
        self.started[index] = 1
        self.pending_bytes += spec.nbytes
        if spec.nbytes == 0:
            self.ready.append(index)
        elif self.cuda:
            self.gpu_bytes[index] = tensor.view(-1).view(torch.uint8)
        else:
            self.cpu_bytes[index] = _bytes_of(tensor)

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
        head = _Request(request.file, request.offset, 0, request.pieces[:keep])
        head.nbytes = sum(n for _, _, n in head.pieces)
        tail = _Request(
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
        counter = itertools.count()
        pool = ThreadPoolExecutor(
            max_workers=self.concurrency,
            initializer=_name_thread,
            initargs=(counter,),
        )
        stream: Any = None
        try:
            for header in self.headers:
                self.fds.append(_open(header.path))
            if self.cuda:
                stream = self._start_cuda()
            yield from self._loop(pool, stream)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            if stream is not None:
                stream.synchronize()  # queued copies must land before memory is freed
            for fd in self.fds:
                os.close(fd)

    def _start_cuda(self) -> Any:
        stream = torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]
        self.slots = [
            torch.empty(self.chunk_bytes, dtype=torch.uint8, pin_memory=True)
            for _ in range(self.slot_count)
        ]
        self.slot_views = [_bytes_of(slot) for slot in self.slots]
        self.slot_events: list[Any] = [None] * self.slot_count
        self.free_slots = collections.deque(range(self.slot_count))
        return stream

    def _loop(self, pool: ThreadPoolExecutor, stream: Any) -> Iterator[tuple[int, torch.Tensor]]:
        inflight: dict[Future[None], tuple[_Request, int]] = {}
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

    def _submit(self, pool: ThreadPoolExecutor, request: _Request, slot: int) -> Future[None]:
        if slot >= 0:
            buffers = [self.slot_views[slot][: request.nbytes]]
        else:
            views = self.cpu_bytes
            buffers = [views[i][start : start + n] for i, start, n in request.pieces]  # type: ignore[index]
        return pool.submit(_read_exact, self.fds[request.file], buffers, request.offset)

    def _complete(self, request: _Request, slot: int, stream: Any) -> None:
        if self.cuda:
            staged = self.slots[slot]
            at = 0
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
        if self.dtype is not None and tensor.is_floating_point() and tensor.dtype != self.dtype:
            tensor = tensor.to(self.dtype)
        if tensor.device != self.device and self.device.type not in ("cpu", "cuda"):
            tensor = tensor.to(self.device)
        return index, tensor

    def _read_error(self, request: _Request, exc: BaseException) -> CheckpointError:
        path = self.headers[request.file].path
        names = [self.specs[i].name for i, _, _ in request.pieces]
        shown = ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
        return CheckpointError(
            f"{path}: reading {request.nbytes} bytes at offset {request.offset} "
            f"(tensors {shown}) failed: {exc}",
            path=path,
            tensor=names[0],
        )


def _open(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise CheckpointError(f"cannot open {path}: {exc.strerror}", path=path) from exc


def _name_thread(counter: itertools.count[int]) -> None:
    threading.current_thread().name = f"iopipe-ckpt-{next(counter)}"


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


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
    concurrency: int | None = DEFAULT_CONCURRENCY,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> dict[str, torch.Tensor]:
    """Load a safetensors checkpoint into freshly allocated tensors.

    Every header is parsed and validated first; then each tensor is allocated once on
    ``device`` and filled by concurrent ``preadv`` calls (CPU), or through a bounded
    ring of pinned staging buffers whose host-to-device copies overlap the next reads
    (CUDA). Blocks until everything is loaded. The result owns its memory: no file
    stays open or mapped.

    Args:
        path: A ``.safetensors`` file, a ``*.safetensors.index.json`` (Hugging Face
            sharded layout), or a folder (its index if it has one, else all its
            ``*.safetensors`` files).
        device: Where the tensors go. ``"cpu"`` and ``"cuda[:N]"`` are read directly;
            any other device is read to CPU and moved tensor by tensor.
        dtype: If given, floating-point tensors (float8 included) are cast to it after
            reading; integer, bool and complex tensors keep their dtype.
        max_inflight_bytes: Bound on the pinned staging ring (CUDA).
        concurrency: Reads in flight at once; default: one per CPU core, 4 to 16.
        chunk_bytes: Largest single read; adjacent small tensors share one read.

    Returns:
        Tensor name -> tensor, in file order (shards in order, tensors by offset).

    Raises:
        CheckpointError: The checkpoint is missing, corrupt, or a read failed; the
            message names the file and, where it applies, the tensor.
        ValueError, TypeError: An argument is invalid.
    """
    loader = _make_loader(
        path,
        device=device,
        dtype=dtype,
        budget=False,
        max_inflight_bytes=max_inflight_bytes,
        concurrency=concurrency,
        chunk_bytes=chunk_bytes,
    )
    # Keys in file order, whatever order the reads complete in.
    out: dict[str, Any] = dict.fromkeys(spec.name for spec in loader.specs)
    with contextlib.closing(_named(loader)) as pairs:
        out.update(pairs)
    return out


def iter_checkpoint(
    path: str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
    concurrency: int | None = DEFAULT_CONCURRENCY,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Generator[tuple[str, torch.Tensor], None, None]:
    """Yield ``(name, tensor)`` pairs as tensors finish loading, with bounded memory.

    Same arguments, reading and guarantees as :func:`load_checkpoint`. Headers and
    arguments are validated by this call, before it returns the iterator. Pairs come in completion
    order (roughly file order). Tensors allocated but not yet yielded never exceed
    ``max_inflight_bytes`` (one larger tensor is admitted alone), so memory beyond what
    the caller keeps stays bounded. Reads continue in the background while the caller
    works on a yielded tensor.

    The pool threads and open files live until the iterator is exhausted, fails, or is
    closed; ``close()`` waits for the reads in flight, then closes every file. To stop
    early without waiting for garbage collection, close it (``with
    contextlib.closing(iter_checkpoint(path)) as pairs: ...``).
    """
    loader = _make_loader(
        path,
        device=device,
        dtype=dtype,
        budget=True,
        max_inflight_bytes=max_inflight_bytes,
        concurrency=concurrency,
        chunk_bytes=chunk_bytes,
    )
    return _named(loader)
