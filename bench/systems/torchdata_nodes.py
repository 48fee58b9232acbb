"""torchdata.nodes: IterableWrapper -> ParallelMapper(thread) -> Batcher -> collate -> Prefetcher.

``ParallelMapper`` runs ``load`` on ``wl.threads`` threads, in order; the batch is collated by
a ``Mapper`` and two batches are prefetched, read through a ``Loader``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import default_collate

from bench._workloads import Workload


def available() -> str | None:
    """torchdata.nodes needs ``torchdata`` >= 0.10 (the ``bench`` extra)."""
    try:
        import torchdata.nodes  # noqa: F401
    except ImportError as exc:
        return f"torchdata.nodes is not installed: {exc}"
    return None


def batches(wl: Workload) -> Iterator[Any]:
    """Yield the batches of ``wl`` from a torchdata.nodes graph."""
    from torchdata.nodes import (
        Batcher,
        IterableWrapper,
        Loader,
        Mapper,
        ParallelMapper,
        Prefetcher,
    )

    node: Any = IterableWrapper(wl.items)
    node = ParallelMapper(node, map_fn=wl.load, num_workers=wl.threads, method="thread")
    node = Batcher(node, batch_size=wl.batch_size, drop_last=False)
    node = Mapper(node, default_collate)
    node = Prefetcher(node, prefetch_factor=2)
    yield from Loader(node)
