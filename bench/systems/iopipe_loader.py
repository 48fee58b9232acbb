"""iopipe.DataLoader (issue 3): a drop-in for torch's, called exactly as torch-w0 and torch-w2 are.

The same map-style dataset and the same arguments as ``bench/systems/torch_loader.py``; the
case reports "unavailable" until ``iopipe.DataLoader`` exists.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from bench._workloads import Workload
from bench.systems.torch_loader import ItemDataset


def available() -> str | None:
    """Return why iopipe.DataLoader cannot run (not written yet), or None."""
    try:
        import iopipe
    except ImportError as exc:
        return f"cannot import iopipe: {exc}"
    if not hasattr(iopipe, "DataLoader"):
        return "iopipe.DataLoader not available yet"
    return None


def batches(wl: Workload, *, num_workers: int, worker_type: str = "auto") -> Iterator[Any]:
    """Yield the batches of ``wl`` from an iopipe.DataLoader with ``num_workers`` workers."""
    import iopipe

    loader = iopipe.DataLoader(
        ItemDataset(wl.items, wl.load),
        batch_size=wl.batch_size,
        shuffle=False,
        num_workers=num_workers,
        worker_type=worker_type,
    )
    try:
        yield from loader
    finally:
        close = getattr(loader, "close", None)
        if close is not None:
            close()
