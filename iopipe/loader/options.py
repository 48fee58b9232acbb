"""The arguments iopipe's DataLoader adds to torch's, checked in one place.

:class:`LoaderOptions` checks them on their own, before torch's ``__init__``
runs; :meth:`LoaderOptions.decide` checks what needs torch's validated dataset
and arguments too, and says which workers the loader starts on.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch.utils.data import IterableDataset

from ..runtime.policy import check_policy
from ..stages.source import SHARD_MODES, resolve_rank
from .modes import static_mode

__all__ = ["WORKER_TYPES", "LoaderOptions", "StartMode"]

WORKER_TYPES = ("auto", "thread", "process", "main")


def _is_async(dataset: Any) -> bool:
    cls = type(dataset)
    return inspect.iscoroutinefunction(
        getattr(cls, "__getitem__", None)
    ) or inspect.iscoroutinefunction(getattr(cls, "__getitems__", None))


@dataclass(frozen=True, slots=True)
class StartMode:
    """What a loader's arguments decide before its first epoch."""

    mode: str  # "thread", "process", "main", or "probe": decided by the first batch
    reason: str
    iterable: bool  # an IterableDataset
    is_async: bool  # a map-style dataset with an ``async def __getitem__``


@dataclass(frozen=True, slots=True)
class LoaderOptions:
    """iopipe's own DataLoader arguments (see :class:`~iopipe.DataLoader`), checked when made.

    Raises:
        ValueError: an argument is out of range (as ``check_policy`` and
            ``resolve_rank`` say, for ``on_error``/``max_failures`` and
            ``rank``/``world_size``).
    """

    worker_type: str = "auto"
    rank: int | None = None
    world_size: int | None = None
    shard: str | None = None
    on_error: str = "raise"
    max_failures: int | float | None = None

    def __post_init__(self) -> None:
        check_policy(self.on_error, self.max_failures)
        if self.worker_type not in WORKER_TYPES:
            raise ValueError(f"worker_type must be one of {WORKER_TYPES}, got {self.worker_type!r}")
        if self.shard is not None and self.shard not in SHARD_MODES:
            raise ValueError(f"shard must be one of {SHARD_MODES} or None, got {self.shard!r}")
        if self.rank is not None or self.world_size is not None:
            resolve_rank(self.rank, self.world_size)  # validate now; resolved again per epoch

    @property
    def sharded(self) -> bool:
        """Whether iopipe deals an iterable dataset's samples over ranks."""
        return self.shard is not None or self.rank is not None or self.world_size is not None

    def decide(
        self,
        dataset: Any,
        *,
        num_workers: int,
        timeout: float,
        worker_init_fn: Callable[[int], None] | None,
    ) -> StartMode:
        """Check these options against torch's (validated) arguments; choose the workers.

        Called from ``DataLoader.__init__`` (its warning names the caller's line).

        Raises:
            ValueError: the options do not fit the dataset or torch's arguments.
        """
        worker_type = self.worker_type
        iterable = isinstance(dataset, IterableDataset)
        if self.sharded and not iterable:
            raise ValueError(
                "rank, world_size and shard apply to iterable-style datasets; for a map-style "
                "dataset pass sampler=torch.utils.data.DistributedSampler(dataset)"
            )
        is_async = not iterable and _is_async(dataset)
        mode, reason = static_mode(
            worker_type,
            num_workers=num_workers,
            iterable=iterable,
            init_fn=worker_init_fn is not None,
            is_async=is_async,
            sharded=self.sharded,
        )
        if worker_type == "auto" and self.on_error == "skip" and mode == "process":
            mode, reason = "thread", "on_error='skip' runs on threads"
        if mode == "main" and timeout > 0 and worker_type != "auto":
            raise ValueError(
                f"timeout needs a background worker; got timeout={timeout!r} with "
                f"worker_type={worker_type!r}, num_workers={num_workers!r}"
            )
        if worker_init_fn is not None and worker_type == "thread":
            warnings.warn(
                "iopipe.DataLoader: worker_init_fn is called in worker processes only "
                "(worker_type='process'); thread workers share this process and never call it",
                UserWarning,
                stacklevel=3,
            )
        if self.on_error == "skip" and worker_type == "process" and num_workers > 0:
            raise ValueError(
                "on_error='skip' needs worker_type='thread' or 'main' (worker processes run "
                f"torch's own fetcher), got worker_type={worker_type!r}, "
                f"num_workers={num_workers!r}"
            )
        if is_async and mode != "thread":
            raise ValueError(
                f"an async def __getitem__ needs worker_type='thread', got worker_type={worker_type!r}"
            )
        return StartMode(mode, reason, iterable, is_async)
