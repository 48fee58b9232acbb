"""torch.utils.data.DataLoader over a map-style Dataset whose ``__getitem__`` loads one item.

Defaults otherwise (fork workers, ``prefetch_factor=2`` with workers, no pinning, workers not
persistent): what a training script that only sets ``num_workers`` gets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch.utils.data import DataLoader, Dataset

from bench._workloads import Workload


class ItemDataset(Dataset[Any]):
    """Map-style dataset: ``ds[i]`` is ``load(items[i])``."""

    def __init__(self, items: Sequence[Any], load: Callable[[Any], Any]) -> None:
        self.items = items
        self.load = load

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.load(self.items[index])


def available() -> str | None:
    """torch is a dependency of iopipe itself: always there."""
    return None


def batches(wl: Workload, *, num_workers: int) -> Iterator[Any]:
    """Yield the batches of ``wl`` from a DataLoader with ``num_workers`` workers."""
    loader = DataLoader(
        ItemDataset(wl.items, wl.load),
        batch_size=wl.batch_size,
        shuffle=False,
        num_workers=num_workers,
    )
    yield from loader
