"""Source: where items come from, in which order, and which share this rank sees.

Sized sources (lists, tuples, ranges, file listings) are shuffled by a
permutation drawn from ``(seed, epoch)``, so the order is a pure function of
those two numbers: no shuffle buffer, and resuming mid-epoch needs only a count.
Other iterables are consumed as they come, ``next()`` being called in a worker
thread a group at a time so a slow generator never blocks the loop.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from pathlib import PurePath
from typing import Any

import numpy as np

from ..runtime.channels import END, Group
from ..runtime.errors import StageError, shielded
from ..runtime.stats import StageCounters
from ..runtime.threads import Job, WorkerPool
from .base import OutQueue, shutdown_executor

__all__ = ["SHARD_MODES", "Source", "resolve_rank"]

#: How to allow an empty listing, in Python's words (configs say it in theirs).
EMPTY_HINT = "pass allow_empty=True to Pipeline.from_files for empty epochs"

SHARD_MODES = ("pad", "drop")


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Fill in ``rank``/``world_size`` from an initialised ``torch.distributed`` group.

    Raises:
        ValueError: only one of the two given, or ``rank`` outside ``[0, world_size)``.
    """
    if rank is None and world_size is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    if rank is None or world_size is None:
        raise ValueError(
            f"give both rank and world_size or neither, got rank={rank!r}, world_size={world_size!r}"
        )
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    return rank, world_size


def _key(item: Any, index: int) -> Any:
    """The cache / error-message key of an item: itself when small and hashable."""
    if isinstance(item, str | int | bytes | PurePath):
        return item
    if isinstance(item, tuple):
        try:
            hash(item)
        except TypeError:
            return index
        return item
    return index


class _Dealer:
    """Deals items round-robin to ``world`` ranks; every rank gets the same count.

    A last incomplete round is padded with the first items of the stream, as
    :meth:`Source.order` pads a sized source (``pad``), or dropped (``drop``), so
    an iterable gives every rank the same share as the equivalent list would.
    """

    __slots__ = ("first", "mode", "rank", "rnd", "world")

    def __init__(self, rank: int, world: int, mode: str) -> None:
        self.rank, self.world, self.mode = rank, world, mode
        self.first: list[Any] = []
        self.rnd: list[Any] = []

    def push(self, x: Any) -> list[Any]:
        """Take the next item; return this rank's item when a round completes."""
        self.rnd.append(x)
        if len(self.first) < self.world:
            self.first.append(x)
        if len(self.rnd) < self.world:
            return []
        mine, self.rnd = self.rnd[self.rank], []
        return [mine]

    def finish(self) -> list[Any]:
        """Return this rank's item of the last, incomplete round (``pad`` only)."""
        if not self.rnd or self.mode != "pad":
            return []
        need = self.world - len(self.rnd)
        rnd = self.rnd + [self.first[i % len(self.first)] for i in range(need)]
        return [rnd[self.rank]]


def shard_iter(it: Iterator[Any], rank: int, world: int, mode: str) -> Iterator[Any]:
    """Deal ``it`` round-robin over ``world`` ranks; yield ``rank``'s share (``mode``: SHARD_MODES)."""
    deal = _Dealer(rank, world, mode)
    for x in it:
        yield from deal.push(x)
    yield from deal.finish()


async def _ashard_iter(
    ait: AsyncIterable[Any], rank: int, world: int, mode: str
) -> AsyncIterator[Any]:
    deal = _Dealer(rank, world, mode)
    async for x in ait:
        for y in deal.push(x):
            yield y
    for y in deal.finish():
        yield y


def _pull(it: Iterator[Any], n: int) -> list[Any]:
    out = []
    for x in it:
        out.append(x)
        if len(out) == n:
            break
    return out


class Source:
    """The first stage: turns ``items`` into groups, in epoch order, for one rank.

    Args:
        items: A sequence, any iterable, or an async iterable.
        shuffle: Visit a sized source in a random order drawn from ``(seed, epoch)``.
        seed: Seed of the shuffle.
        rank, world_size: This process's share; default from ``torch.distributed``
            when it is initialised, else the whole source.
        shard: ``"pad"`` repeats items so every rank gets ``ceil(n / world_size)``;
            ``"drop"`` gives every rank ``floor(n / world_size)``.
    """

    name = "source"
    #: How a config names these items (``{"files": "data/*.jpg"}``), for ``Pipeline.to_config``.
    origin: dict[str, Any] | None = None

    def __init__(
        self,
        items: Iterable[Any] | AsyncIterable[Any],
        *,
        shuffle: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        shard: str = "pad",
    ) -> None:
        is_async = isinstance(items, AsyncIterable)
        if not is_async and not isinstance(items, Iterable):
            raise TypeError(
                f"a source needs an iterable or async iterable, got {type(items).__name__}"
            )
        if isinstance(items, str | bytes):
            raise TypeError("a source needs a collection of items, got a single str/bytes")
        if shard not in SHARD_MODES:
            raise ValueError(f"shard must be one of {SHARD_MODES}, got {shard!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        self.items = items
        self.sized = isinstance(items, (Sequence, range | np.ndarray))
        self.is_async = is_async
        if shuffle and not self.sized:
            raise ValueError(
                f"shuffle=True needs a sized source (a list, tuple or file glob), got {type(items).__name__}"
            )
        if rank is not None or world_size is not None:
            resolve_rank(rank, world_size)  # validate now
        if not isinstance(shuffle, bool):
            raise TypeError(f"shuffle must be True or False, got {shuffle!r}")
        self.shuffle = bool(shuffle)
        self.seed = seed
        self._rank = rank
        self._world = world_size
        self.shard = shard
        self.counters = StageCounters("source", 1)
        self._pool: WorkerPool | None = None
        self.job: Job | None = None  # the pull running in the worker, if any
        # Whether every item is its own key (a list of paths, say): then a group's
        # keys are a copy of its items, not a call per item.  None: not checked yet.
        self._self_keyed: bool | None = None

    @property
    def rank(self) -> tuple[int, int]:
        """``(rank, world_size)``, resolved from ``torch.distributed`` when not given."""
        return resolve_rank(self._rank, self._world)

    def config(self) -> dict[str, Any]:
        return {
            "shuffle": self.shuffle,
            "seed": self.seed,
            "rank": self._rank,
            "world_size": self._world,
            "shard": self.shard,
        }

    def __len__(self) -> int:
        if not self.sized:
            raise TypeError(f"this source ({type(self.items).__name__}) has no known length")
        n = len(self.items)  # type: ignore[arg-type]
        _, world = self.rank
        return -(-n // world) if self.shard == "pad" else n // world

    def order(self, epoch: int) -> np.ndarray[Any, np.dtype[np.int64]]:
        """Indices into ``items`` that this rank visits in ``epoch``, in order."""
        n = len(self.items)  # type: ignore[arg-type]
        if self.shuffle:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            idx = rng.permutation(n).astype(np.int64)
        else:
            idx = np.arange(n, dtype=np.int64)
        rank, world = self.rank
        if world > 1:
            if self.shard == "pad" and n % world and n:
                reps = -(-(world - n % world) // n)
                idx = np.concatenate([idx, np.tile(idx, reps)[: world - n % world]])
            elif self.shard == "drop":
                idx = idx[: n - n % world]
            idx = idx[rank::world]
        return idx

    def unopened_copy(self) -> Source:
        """A copy of this source with counters of its own and no worker thread yet."""
        clone = copy.copy(self)
        clone.counters = StageCounters("source", 1)
        clone._pool = None
        return clone

    def open(self) -> None:
        if not self.sized and not self.is_async:
            self._pool = WorkerPool(1, "iopipe-source")

    def close(self, timeout: float) -> None:
        shutdown_executor(self._pool, timeout)
        self._pool = None

    def _make_group(self, items: list[Any], keys: list[Any], cache: Any) -> Group:
        if cache is None:
            return Group(items, keys)
        from .cache import MISSING

        hits: list[tuple[int, Any, Any]] = []
        miss_items: list[Any] = []
        miss_keys: list[Any] = []
        for pos, (item, key) in enumerate(zip(items, keys, strict=True)):
            value = cache.lookup(key)
            if value is MISSING:
                miss_items.append(item)
                miss_keys.append(key)
            else:
                hits.append((pos, key, value))
        return Group(miss_items, miss_keys, hits or None)

    async def _put(self, outq: OutQueue, group: Group) -> None:
        t0 = time.perf_counter()
        await outq.put(group)
        self.counters.wait_output_s += time.perf_counter() - t0
        self.counters.items += group.weight

    async def produce(
        self, outq: OutQueue, *, epoch: int, skip: int, group_size: int, cache: Any = None
    ) -> None:
        """Put this epoch's groups on ``outq`` (skipping the first ``skip`` items), then END.

        Raises:
            StageError: the items (a generator, a lazy sequence) raised; stage ``source``.
        """
        try:
            if self.sized:
                await self._produce_sized(outq, epoch, skip, group_size, cache)
            else:
                await self._produce_iter(outq, epoch, skip, group_size, cache)
        except Exception as exc:
            raise StageError(self.name, None, exc)
        await outq.put(END)

    async def _produce_sized(
        self, outq: OutQueue, epoch: int, skip: int, g: int, cache: Any
    ) -> None:
        seq: Any = self.items
        order = self.order(epoch)
        if self._self_keyed is None:  # one pass, for in-memory lists only (not lazy sequences)
            self._self_keyed = isinstance(seq, list | tuple) and all(
                issubclass(t, str | int | bytes | PurePath) for t in set(map(type, seq))
            )
        for start in range(skip, len(order), g):
            t0 = time.perf_counter()
            idx = order[start : start + g].tolist()
            items = [seq[i] for i in idx]
            if self._self_keyed:
                keys = list(items)
            else:
                keys = [_key(x, i) for x, i in zip(items, idx, strict=True)]
            group = self._make_group(items, keys, cache)
            self.counters.busy_s += time.perf_counter() - t0
            await self._put(outq, group)

    async def _iter_groups(self, g: int, epoch: int) -> AsyncIterator[list[Any]]:
        rank, world = self.rank
        if self.is_async:
            src: AsyncIterable[Any] = self.items  # type: ignore[assignment]
            if world > 1:
                src = _ashard_iter(src, rank, world, self.shard)
            batch: list[Any] = []
            async for x in src:
                batch.append(x)
                if len(batch) == g:
                    yield batch
                    batch = []
            if batch:
                yield batch
            return
        # Items that vary by epoch (a mix) say how: ``for_epoch(epoch)`` gives that
        # epoch's iterator, the same every time (a resume replays it).
        for_epoch = getattr(self.items, "for_epoch", None)
        it: Iterator[Any] = for_epoch(epoch) if for_epoch else iter(self.items)  # type: ignore[arg-type]
        if world > 1:
            it = shard_iter(it, rank, world, self.shard)
        pool = self._pool
        assert pool is not None
        while True:
            t0 = time.perf_counter()
            self.job = pool.submit(shielded, _pull, it, g)  # the stall watchdog reads it
            batch = await asyncio.wrap_future(self.job)
            self.counters.busy_s += time.perf_counter() - t0
            if not batch:
                return
            yield batch
            if len(batch) < g:
                return

    async def _produce_iter(
        self, outq: OutQueue, epoch: int, skip: int, g: int, cache: Any
    ) -> None:
        pos = 0
        async for batch in self._iter_groups(g, epoch):
            if skip:
                drop = min(skip, len(batch))
                batch = batch[drop:]
                skip -= drop
                pos += drop
                if not batch:
                    continue
            keys = [_key(x, pos + i) for i, x in enumerate(batch)]
            pos += len(batch)
            await self._put(outq, self._make_group(batch, keys, cache))
