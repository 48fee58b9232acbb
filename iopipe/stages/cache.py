"""Cache: keep the output of the stages before it in memory, LRU within a byte budget."""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..runtime.channels import GAP, Group
from .base import OutQueue, Stage
from .pump import drain

__all__ = ["Cache", "nbytes"]

_MISSING: Any = object()


def nbytes(obj: Any) -> int:
    """Estimate the memory an item holds (buffers exactly, Python objects roughly)."""
    if isinstance(obj, torch.Tensor):
        return int(obj.untyped_storage().nbytes())
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, bytes | bytearray | memoryview):
        return len(obj)
    if isinstance(obj, Mapping):
        return sys.getsizeof(obj) + sum(nbytes(k) + nbytes(v) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return sys.getsizeof(obj) + sum(nbytes(x) for x in obj)
    return sys.getsizeof(obj)


class Cache(Stage):
    """Remember each source item's output; later epochs skip the stages before it.

    The source consults :meth:`lookup` as it forms groups: hits travel beside the
    group, untouched by the stages before the cache, and are merged back here in
    order.  Entries are evicted least-recently-used first so that the bytes held
    never exceed ``max_bytes``; an item larger than ``max_bytes`` is not cached.
    Cached values are handed out as they are: do not modify them in place.
    """

    kind = "cache"
    serves_source = True

    def __init__(self, *, max_bytes: int, name: str | None = None) -> None:
        super().__init__(name=name, concurrency=1)
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise ValueError(f"max_bytes must be an int >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._held = 0
        self.counters.extra.update(hits=0, misses=0, bytes_held=0, entries=0)

    def config(self) -> dict[str, Any]:
        return {"max_bytes": self.max_bytes}

    def reset_runtime(self) -> None:
        super().reset_runtime()
        self._entries = OrderedDict()
        self._held = 0
        self.counters.extra.update(hits=0, misses=0, bytes_held=0, entries=0)

    def reset_counters(self) -> None:
        super().reset_counters()
        self.counters.extra.update(
            hits=0, misses=0, bytes_held=self._held, entries=len(self._entries)
        )

    def window(self) -> int:
        return 1

    def lookup(self, key: Any) -> Any:
        """Return the cached output for ``key`` or the module's missing marker (loop thread)."""
        entry = self._entries.get(key)
        if entry is None:
            self.counters.extra["misses"] += 1
            return _MISSING
        self._entries.move_to_end(key)
        self.counters.extra["hits"] += 1
        return entry[0]

    def _store(self, key: Any, value: Any) -> None:
        if key in self._entries:
            return
        size = nbytes(value)
        if size > self.max_bytes:
            return
        while self._held + size > self.max_bytes and self._entries:
            _, (_, old) = self._entries.popitem(last=False)
            self._held -= old
        self._entries[key] = (value, size)
        self._held += size
        self.counters.extra["bytes_held"] = self._held
        self.counters.extra["entries"] = len(self._entries)

    async def run(self, inq: Any, outq: OutQueue) -> None:
        async for group in drain(inq, self.counters):
            for key, value in zip(group.keys, group.items, strict=True):
                self._store(key, value)
            if group.hits:
                n = len(group.items) + len(group.hits)
                merged: list[Any] = [_MISSING] * n
                mkeys: list[Any] = [None] * n
                for pos, key, value in group.hits:
                    merged[pos] = value
                    mkeys[pos] = key
                fresh = iter(zip(group.keys, group.items, strict=True))
                for i in range(n):
                    if merged[i] is _MISSING:
                        mkeys[i], merged[i] = next(fresh)
                group = _merged(group, merged, mkeys)
            self.counters.items += group.weight
            await outq.put(group)
        from ..runtime.channels import END

        await outq.put(END)


def _merged(group: Group, merged: list[Any], mkeys: list[Any]) -> Group:
    """The group of hits and fresh outputs in order, keeping what failed items count."""
    if group.counts is None:
        return Group(merged, mkeys, dropped=group.dropped)
    # Items were dropped by on_error="skip": they sit among the hits as GAPs, and
    # each is counted with the entry that follows it (see Group.drop).
    fresh = iter(group.counts)
    hit = {pos for pos, _, _ in group.hits or ()}
    items: list[Any] = []
    keys: list[Any] = []
    counts: list[int] = []
    carry = 0
    for i, (x, key) in enumerate(zip(merged, mkeys, strict=True)):
        if x is GAP:
            carry += 1
            continue
        items.append(x)
        keys.append(key)
        counts.append((1 if i in hit else next(fresh)) + carry)
        carry = 0
    return Group(items, keys, counts=counts, dropped=group.dropped + carry)


MISSING = _MISSING
