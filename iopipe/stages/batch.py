"""Batcher: gather items into batches and collate them (torch's default_collate)."""

from __future__ import annotations

import concurrent.futures
from collections.abc import AsyncIterator, Callable
from typing import Any

from torch.utils.data import default_collate

from ..runtime.channels import BatchKey, Group
from ..runtime.errors import StageError
from ..runtime.threads import WorkerPool
from .base import OutQueue, Stage, shutdown_executor, skippable, timed
from .pump import drain, pump
from .steps import FusedStep, StepRun

__all__ = ["Batcher"]


def _collate_job(collate: Callable[[list[Any]], Any], items: list[Any]) -> Any:
    return collate(items)


class _CollateStep(FusedStep):
    """A batcher's step of a fused job: the group's items become one batch."""

    __slots__ = ("collate",)

    def __init__(self, collate: Callable[[list[Any]], Any]) -> None:
        self.collate = collate

    def run(self, items: list[Any], out: StepRun) -> tuple[list[Any], bool]:
        return [self.collate(items)], False


class Batcher(Stage):
    """Cut the item stream into batches of ``batch_size`` and collate each.

    Collation runs in one worker thread (torch's stacking releases the GIL), so
    the loop never blocks on it.  The last, short batch is kept unless
    ``drop_last``.  Invariant: the stage holds at most ``batch_size - 1`` items
    waiting for a batch plus ``window()`` batches being collated.
    """

    kind = "batch"
    one_to_one = False
    batch_size: int

    def __init__(
        self,
        batch_size: int,
        *,
        drop_last: bool = False,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name, concurrency=1)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if collate_fn is not None and not callable(collate_fn):
            raise TypeError(f"collate_fn must be callable, got {collate_fn!r:.80}")
        self.batch_size = batch_size
        if not isinstance(drop_last, bool):
            raise TypeError(f"drop_last must be True or False, got {drop_last!r}")
        self.drop_last = bool(drop_last)
        self.collate_fn = collate_fn
        self._pool: WorkerPool | None = None
        self._count = 0

    def config(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "drop_last": self.drop_last,
            "collate_fn": self.collate_fn,
        }

    def elements(self, n: int) -> int:
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def reset_runtime(self) -> None:
        super().reset_runtime()
        self._pool = None

    def open(self, unit: int) -> None:
        super().open(unit)
        self._pool = WorkerPool(1, f"iopipe-{self.name}")

    def close(self, timeout: float) -> None:
        shutdown_executor(self._pool, timeout)
        self._pool = None

    async def cut(self, groups: AsyncIterator[Group]) -> AsyncIterator[Group]:
        """Re-chunk the incoming groups into groups of exactly one batch's items."""
        items: list[Any] = []
        keys: list[Any] = []
        # Source items per item, once a group came with counts (items lost to
        # on_error="skip" upstream, or batches being batched again); else None.
        counts: list[int] | None = None
        carry = 0  # source items dropped upstream, to count with the next item
        bs = self.batch_size
        async for g in groups:
            if g.hits:  # pragma: no cover - the cache stage merges hits before us
                raise RuntimeError("iopipe: unmerged cache hits reached the batcher")
            if counts is None and (g.counts is not None or g.dropped):
                counts = [1] * len(items)
            if counts is not None:
                more = list(g.counts) if g.counts is not None else [1] * len(g.items)
                if carry and more:
                    more[0] += carry
                    carry = 0
                counts.extend(more)
                carry += g.dropped
            items.extend(g.items)
            keys.extend(g.keys)
            while len(items) >= bs:
                if counts is None:
                    yield Group(items[:bs], keys[:bs])
                else:
                    yield Group(items[:bs], keys[:bs], counts=counts[:bs])
                    del counts[:bs]
                del items[:bs], keys[:bs]
        if items and not self.drop_last:
            yield Group(items, keys, counts=counts, dropped=carry)
        elif carry:  # failed items after the last batch: the consumer still counts them
            yield Group([], [], counts=[], dropped=carry)

    async def _collate(self, group: Group) -> Group:
        if not group.items:  # only items that failed upstream (on_error="skip")
            return Group([], [], batched=True, counts=[], dropped=group.dropped)
        index = self._count
        self._count += 1
        collate = self.collate_fn or default_collate
        key = BatchKey(index, group.keys[0], group.keys[-1])
        try:
            batch, dt = await self.submit(self._pool, timed, _collate_job, collate, group.items)
        except Exception as exc:
            if self.policy is None or not skippable(exc):
                raise StageError(self.name, key, exc)
            self.policy.record(self.name, self.counters, key, exc, len(group.items), what="")
            return Group([], [], batched=True, counts=[], dropped=group.weight + group.dropped)
        self.counters.busy_s += dt
        self.counters.items += 1
        self.counters.jobs += 1
        if group.counts is None:
            return Group([batch], [key], batched=True, counts=[len(group.items)])
        return Group(
            [batch], [key], batched=True, counts=[sum(group.counts)], dropped=group.dropped
        )

    # -- in a fused run (stages/fused.py): the last member; batches are cut first --
    def fusable(self) -> bool:
        return True

    def fused_step(self, group: Group) -> _CollateStep:
        return _CollateStep(self.collate_fn or default_collate)

    def account_fused(self, run: StepRun, items: int) -> None:
        self.counters.items += 1

    @property
    def worker_pool(self) -> concurrent.futures.Executor | None:
        return self._pool

    async def staged(self, group: Group, index: int) -> Group:
        """Collate one batch with this stage's pool, as batch number ``index``."""
        collate = self.collate_fn or default_collate
        try:
            batch, dt = await self.submit(self._pool, timed, collate, group.items)
        except Exception as exc:
            raise self.fused_failure(group, exc, index)
        self.counters.busy_s += dt
        self.counters.items += 1
        self.counters.jobs += 1
        return self.fused_output(group, [batch], index)

    def fused_output(self, group: Group, items: list[Any], index: int) -> Group:
        key = BatchKey(index, group.keys[0], group.keys[-1])
        return Group(items, [key], batched=True, counts=[len(group.keys)])

    def fused_failure(self, group: Group, exc: BaseException, index: int) -> StageError:
        return StageError(self.name, BatchKey(index, group.keys[0], group.keys[-1]), exc)

    async def run(self, inq: Any, outq: OutQueue) -> None:
        self._count = 0
        await pump(
            self.cut(drain(inq, self.counters)),
            outq,
            self._collate,
            window=self.window(),
            ordered=True,
            counters=self.counters,
        )
