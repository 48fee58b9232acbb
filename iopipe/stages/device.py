"""DeviceTransfer: pin batches and copy them to an accelerator off the training thread."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..runtime.channels import Group
from ..runtime.errors import StageError
from ..runtime.threads import WorkerPool
from .base import OutQueue, Stage, shutdown_executor, timed
from .pump import drain, pump

__all__ = ["DeviceTransfer", "apply_to_tensors"]


def apply_to_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Return ``obj`` with ``fn`` applied to every tensor inside dicts, lists, tuples."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return type(obj)({k: apply_to_tensors(v, fn) for k, v in obj.items()})  # type: ignore[call-arg]
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(apply_to_tensors(v, fn) for v in obj))
    if isinstance(obj, Sequence) and not isinstance(obj, str | bytes):
        return type(obj)(apply_to_tensors(v, fn) for v in obj)  # type: ignore[call-arg]
    return obj


def _record(t: torch.Tensor, stream: Any) -> torch.Tensor:
    t.record_stream(stream)
    return t


def _pin(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_pinned() else t.pin_memory()


def _transfer(batch: Any, device: torch.device, pin: bool, stream: Any) -> Any:
    """Pin ``batch`` and copy it on ``stream``; return once the copy has finished.

    Runs in the stage's worker thread.  The copy is issued non-blocking on a side
    stream and waited for here, so the consumer gets a batch it can use on any
    stream.  ``record_stream`` tells the caching allocator the memory is used by
    the default stream too, so it is not handed out again too early.
    """
    if pin:
        batch = apply_to_tensors(batch, _pin)
    if device.type == "cpu" or stream is None:
        return batch
    with torch.cuda.stream(stream):
        out = apply_to_tensors(batch, lambda t: t.to(device, non_blocking=True))
    event = torch.cuda.Event()  # type: ignore[no-untyped-call]
    event.record(stream)
    event.synchronize()
    default = torch.cuda.default_stream(device)
    apply_to_tensors(out, functools.partial(_record, stream=default))
    return out


class DeviceTransfer(Stage):
    """Move each batch to ``device`` (pinning it first when ``pin_memory``).

    Without CUDA, ``pin_memory`` is ignored and a CUDA device raises at build
    time; for ``device="cpu"`` the stage only pins (when CUDA exists) or passes
    batches through.
    """

    kind = "to_device"

    def __init__(
        self, device: str | torch.device, *, pin_memory: bool = False, name: str | None = None
    ) -> None:
        super().__init__(name=name, concurrency=1)
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(
                f"device must be a torch.device or a name such as 'cuda:0', got {device!r}: {exc}"
            ) from exc
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {str(self.device)!r} requested but CUDA is not available")
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()
        self._asked_pin = bool(pin_memory)
        self._pool: WorkerPool | None = None
        self._stream: Any = None

    def config(self) -> dict[str, Any]:
        return {"device": str(self.device), "pin_memory": self._asked_pin}

    def reset_runtime(self) -> None:
        super().reset_runtime()
        self._pool, self._stream = None, None

    def open(self, unit: int) -> None:
        super().open(unit)
        self._pool = WorkerPool(1, f"iopipe-{self.name}")
        if self.device.type == "cuda":
            self._stream = torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]

    def close(self, timeout: float) -> None:
        shutdown_executor(self._pool, timeout)
        self._pool = None

    @property
    def active(self) -> bool:
        """Whether the stage does anything: not for a CPU target without pinning."""
        return self.pin_memory or self.device.type != "cpu"

    async def _process(self, group: Group) -> Group:
        job = functools.partial(
            _transfer, device=self.device, pin=self.pin_memory, stream=self._stream
        )
        out = []
        for key, item in zip(group.keys, group.items, strict=True):
            try:
                moved, dt = await self.submit(self._pool, timed, job, item)
            except Exception as exc:
                raise StageError(self.name, key, exc)
            self.counters.busy_s += dt
            out.append(moved)
        self.counters.items += len(out)
        return group.replace_items(out)

    async def run(self, inq: Any, outq: OutQueue) -> None:
        await pump(
            drain(inq, self.counters),
            outq,
            self._process,
            window=2,
            ordered=True,
            counters=self.counters,
        )
