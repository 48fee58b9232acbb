"""Stream transforms that change how many elements there are: ``filter`` and ``flat_map``.

Both run their function as a map does (threads, processes, async, inline;
concurrency, order, errors and the failure policy are the map's), then
reshape the group:

* :class:`Filter` keeps the elements its predicate is true for.  A dropped
  element's source items are carried by the next element kept
  (:meth:`~iopipe.runtime.channels.Group.drop`), so ``state_dict()`` stays
  exact: a resume continues after the last element handed out.
* :class:`FlatMap` replaces each element with the elements of the iterable its
  function returns (none, one or many: an unbatch).  An element's source items
  are counted when its last output is handed out, so a resume in the middle of
  one element's outputs starts that element again: its outputs before the
  resume point come a second time (at least once, documented).

Neither knows its output count in advance: ``len()`` of a pipeline with one
raises ``TypeError``.  Neither fuses (docs/design.md).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

from ..runtime.channels import Group
from .decode import Decoder

__all__ = ["Filter", "FlatMap", "MAX_FLAT_OUTPUTS"]

#: Outputs one element of ``flat_map`` may have, at most (a runaway generator is an error).
MAX_FLAT_OUTPUTS = 1 << 20


class _Keep:
    """``pred(x)`` and ``x`` together (picklable when ``pred`` is)."""

    def __init__(self, pred: Callable[[Any], Any]) -> None:
        self.pred = pred

    def __call__(self, x: Any) -> tuple[bool, Any]:
        return bool(self.pred(x)), x


class _Spread:
    """``list(fn(x))``, bounded."""

    def __init__(self, fn: Callable[[Any], Iterable[Any]]) -> None:
        self.fn = fn

    def __call__(self, x: Any) -> list[Any]:
        out: list[Any] = []
        for y in self.fn(x):
            out.append(y)
            if len(out) > MAX_FLAT_OUTPUTS:
                raise ValueError(f"flat_map: more than {MAX_FLAT_OUTPUTS} outputs for one element")
        return out


class _AsyncKeep:
    """``await pred(x)`` and ``x`` together."""

    def __init__(self, pred: Callable[[Any], Any]) -> None:
        self.pred = pred

    async def __call__(self, x: Any) -> tuple[bool, Any]:
        return bool(await self.pred(x)), x


class _Unknown:
    """The output count of these stages is unknown before the epoch runs."""

    name: str

    def elements(self, n: int) -> int:
        raise TypeError(f"the number of elements after {self.name!r} is not known in advance")

    def fusable(self) -> bool:
        return False


class Filter(_Unknown, Decoder):
    """Keep the elements for which ``pred`` is true."""

    kind = "filter"

    def __init__(self, pred: Callable[[Any], Any], **kw: Any) -> None:
        if not callable(pred):
            raise TypeError(f"filter() needs a callable, got {type(pred).__name__}")
        super().__init__(_wrap_keep(pred), **kw)
        self.pred = pred

    def config(self) -> dict[str, Any]:
        return super().config() | {"fn": self.pred}

    async def process(self, group: Group) -> Group:
        judged = await super().process(group)
        pairs = judged.items
        out = judged.replace_items([x for _, x in pairs])
        dropped = {i for i, (keep, _) in enumerate(pairs) if not keep}
        return out.drop(out.items, dropped) if dropped else out


class FlatMap(_Unknown, Decoder):
    """Replace each element with the elements of the iterable ``fn`` returns for it."""

    kind = "flat_map"
    one_to_one = False  # a cache after it could not key its outputs by source item

    def __init__(self, fn: Callable[[Any], Iterable[Any]], **kw: Any) -> None:
        if not callable(fn):
            raise TypeError(f"flat_map() needs a callable, got {type(fn).__name__}")
        if _is_async(fn):
            raise TypeError("flat_map() takes a plain function returning an iterable, not async")
        super().__init__(_Spread(fn), **kw)
        self.spread = fn

    def config(self) -> dict[str, Any]:
        return super().config() | {"fn": self.spread}

    async def process(self, group: Group) -> Group:
        spread = await super().process(group)
        return _flatten(spread)


def _is_async(fn: Any) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - an object with an async __call__
    )


def _wrap_keep(pred: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return _AsyncKeep(pred) if _is_async(pred) else _Keep(pred)


def _flatten(group: Group) -> Group:
    """Each entry's outputs as entries; its source count on its last output (or the next)."""
    counts = group.counts if group.counts is not None else [1] * len(group.items)
    items: list[Any] = []
    keys: list[Any] = []
    out_counts: list[int] = []
    carry = 0
    for outs, key, n in zip(group.items, group.keys, counts, strict=True):
        carry += n
        if not outs:
            continue  # its count goes to the next output
        items.extend(outs)
        keys.extend([key] * len(outs))
        out_counts.extend([0] * (len(outs) - 1))
        out_counts.append(carry)
        carry = 0
    if group.hits:
        raise TypeError("flat_map after a cache is not supported")
    # Unbatched: each output is one element (a batch spread into its samples).
    return Group(items, keys, None, False, out_counts, group.dropped + carry)
