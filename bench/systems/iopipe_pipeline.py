"""iopipe's Pipeline (issue 2): from_files -> read -> map -> batch, one epoch per ``iter()``.

Written against the builder API of issue 2; the case reports "unavailable" until
``iopipe.Pipeline`` exists. Token windows go through the byte-range source
(``(path, offset, length)`` items) until iopipe has a token-window API of its own (issue 5):
plug it in at :func:`_token_batches`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from bench._workloads import Workload

CHUNK_BYTES = 4 << 20


def available() -> str | None:
    """Return why iopipe's Pipeline cannot run (not written yet), or None."""
    try:
        import iopipe
    except ImportError as exc:
        return f"cannot import iopipe: {exc}"
    if not hasattr(iopipe, "Pipeline"):
        return "iopipe.Pipeline not available yet"
    return None


def _run(pipe: Any) -> Iterator[Any]:
    try:
        yield from pipe
    finally:
        pipe.close()


def _token_batches(wl: Workload) -> Iterator[Any]:
    """Token windows: byte ranges of the token file, read and widened to int64.

    The hook for iopipe's own token-window dataset (issue 5): when it lands, build it here
    from ``wl.ranges[0][0]`` (the file), the window offsets ``wl.items`` (in tokens) and
    ``bench._workloads.TOKEN_WINDOW``, keeping batch size ``wl.batch_size``.
    """
    from iopipe import Pipeline

    pipe = (
        Pipeline.from_files(list(wl.ranges), shuffle=False)
        .read(chunk_bytes=CHUNK_BYTES, concurrency=wl.read_concurrency)
        .map(wl.transform, concurrency=wl.map_concurrency)
        .batch(wl.batch_size)
    )
    yield from _run(pipe)


def batches(wl: Workload) -> Iterator[Any]:
    """Yield the batches of ``wl`` from an iopipe Pipeline."""
    from iopipe import Pipeline

    if wl.name == "tokens":
        yield from _token_batches(wl)
        return
    pipe = (
        Pipeline.from_files(list(wl.items), shuffle=False)
        .read(chunk_bytes=CHUNK_BYTES, concurrency=wl.read_concurrency)
        .map(wl.transform, concurrency=wl.map_concurrency)
        .batch(wl.batch_size)
    )
    yield from _run(pipe)
