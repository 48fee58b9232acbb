"""The reference: a single-threaded Python loop doing the same work, no framework."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import default_collate

from bench._workloads import Workload


def available() -> str | None:
    """The plain loop always runs."""
    return None


def batches(wl: Workload) -> Iterator[Any]:
    """Yield the batches of ``wl``: load each item in turn, collate every ``batch_size``."""
    items, load, size = wl.items, wl.load, wl.batch_size
    for start in range(0, len(items), size):
        yield default_collate([load(item) for item in items[start : start + size]])
