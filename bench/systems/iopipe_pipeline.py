"""iopipe's Pipeline (issue 2): from_files -> read -> map -> batch, one epoch per ``iter()``.

Written against the builder API of issue 2; the case reports "unavailable" until
``iopipe.Pipeline`` exists. Token windows use iopipe's own ``TokenShards`` (issue 5) when it
exists, else the byte-range source (``(path, offset, length)`` items): see
:func:`_token_batches`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from bench._workloads import TOKEN_WINDOW, WINDOW_SEED, Workload

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


def _token_shards(wl: Workload) -> Any:
    """Build iopipe's TokenShards (issue 5) for the token workload.

    It draws its own random windows (same count, same length, uniform over the file, seeded),
    so its checksum is checked against those windows (:func:`expected_checksum`) rather than
    against the memmap loop's.
    """
    from iopipe import TokenShards

    return TokenShards(
        wl.ranges[0][0],
        seq_len=TOKEN_WINDOW - 1,
        batch_size=wl.batch_size,
        mode="windows",
        dtype="uint16",
        seed=WINDOW_SEED,
        windows_per_epoch=len(wl.items),
        drop_last=False,
    )


def _token_batches(wl: Workload) -> Iterator[Any]:
    """Token windows: iopipe's TokenShards when it exists, else byte ranges of the file.

    TokenShards yields ``(x, y)`` int64 pairs (``y`` is ``x`` shifted by one token); the
    byte-range pipeline yields the memmap loop's exact ``(batch, 1025)`` windows.
    """
    import iopipe

    if hasattr(iopipe, "TokenShards"):
        yield from _run(_token_shards(wl))
        return
    pipe = (
        iopipe.Pipeline.from_files(list(wl.ranges), shuffle=False)
        .read(chunk_bytes=CHUNK_BYTES, concurrency=wl.read_concurrency)
        .map(wl.transform, concurrency=wl.map_concurrency)
        .batch(wl.batch_size)
    )
    yield from _run(pipe)


def expected_checksum(wl: Workload) -> int | None:
    """Return the checksum TokenShards' own windows must give; None when it is not used.

    Computed from the file directly (memmap), after the timed run.
    """
    import iopipe

    if wl.name != "tokens" or not hasattr(iopipe, "TokenShards"):
        return None
    windows = _token_shards(wl).windows(0)
    tokens = np.memmap(wl.ranges[0][0], dtype=np.uint16, mode="r")
    total = 0
    for first in windows[:, 1].tolist():
        w = tokens[first : first + TOKEN_WINDOW].astype(np.int64)
        total += int(w[:-1].sum()) + int(w[1:].sum())
    return total & ((1 << 64) - 1)


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
