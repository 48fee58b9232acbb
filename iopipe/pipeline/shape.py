"""What a chain's stages imply before it runs: group size, length, items in flight.

Pure functions of the builder's configuration (no runtime): the pipeline's
``group_size``, ``len()`` and ``max_items_in_flight``, and the hand-off's size.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..stages.base import Stage

__all__ = [
    "DEFAULT_GROUP",
    "elements_per_epoch",
    "group_size_of",
    "handoff_groups",
    "items_in_flight_bound",
    "weight_of",
]

#: Items per group when no batcher fixes the group size.
DEFAULT_GROUP = 64


def group_size_of(group_size: int | None, stages: Sequence[Stage]) -> int:
    """Items per group: ``group_size`` as given, else the first batch size, else 64."""
    if group_size is not None:
        return group_size
    for s in stages:
        if s.batch_size is not None:
            return s.batch_size
    return DEFAULT_GROUP


def elements_per_epoch(n: int, stages: Sequence[Stage]) -> int:
    """Elements an epoch of ``n`` source items yields: items, or batches after ``batch()``."""
    for s in stages:
        n = s.elements(n)
    return n


def handoff_groups(stages: Sequence[Stage], group_size: int, handoff: int) -> int:
    """Groups the hand-off holds: ``handoff``, or enough for a ``prefetch(n)`` ending the chain.

    The last stage puts straight into the hand-off, so a final prefetcher's own
    queue capacity would otherwise never apply.  (``max_items_in_flight`` already
    counts that capacity.)
    """
    if not stages:
        return handoff
    w = weight_of(stages)
    depth = stages[-1].ready_depth(w)
    if depth is None:
        return handoff
    unit = group_size if w == 1 else w
    return max(handoff, -(-depth // unit))


def weight_of(stages: Sequence[Stage]) -> int:
    """Source items per element at the end of ``stages`` (the product of batch sizes)."""
    w = 1
    for s in stages:
        if s.batch_size is not None:
            w *= s.batch_size
    return w


def items_in_flight_bound(stages: Sequence[Stage], group_size: int, handoff: int) -> int:
    """Upper bound on source items alive between the source and the consumer.

    The sum of every stage's window and every queue's capacity (each queue
    may take one group beyond it when empty), plus the consumer's group.
    """
    g = group_size
    total = 2 * g + g  # first queue + one group held by the source
    w = 1
    for s in stages:
        unit = g if w == 1 else w
        total += s.window() * unit
        depth = s.ready_depth(w)
        cap = depth if depth is not None else s.capacity if s.capacity is not None else 2 * g
        total += cap + unit
        if s.batch_size is not None:
            total += s.batch_size  # items waiting to complete a batch
            w *= s.batch_size
    unit = g if w == 1 else w
    return total + (handoff + 1) * unit
