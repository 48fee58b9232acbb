"""SPDL 0.8's PipelineBuilder: source -> pipe(load) -> aggregate(batch) -> pipe(collate) -> sink.

One pipe stage runs ``load`` (read and transform) with ``concurrency=wl.threads`` on the
pipeline's thread pool; batches are collated by a second stage. Output order: SPDL's default
(completion order), which can only help it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import default_collate

from bench._workloads import Workload


def available() -> str | None:
    """SPDL needs the ``spdl`` package (the ``bench`` extra)."""
    try:
        from spdl.pipeline import PipelineBuilder  # noqa: F401
    except ImportError as exc:
        return f"spdl is not installed: {exc}"
    return None


def batches(wl: Workload) -> Iterator[Any]:
    """Yield the batches of ``wl`` from an SPDL pipeline."""
    from spdl.pipeline import PipelineBuilder

    pipeline: Any = (
        PipelineBuilder()
        .add_source(wl.items)
        .pipe(wl.load, concurrency=wl.threads)
        .aggregate(wl.batch_size)
        .pipe(default_collate)
        .add_sink(3)
        .build(num_threads=wl.threads)
    )
    with pipeline.auto_stop(timeout=60):
        yield from pipeline.get_iterator(timeout=300)
