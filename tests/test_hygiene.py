"""Resource hygiene (issue 7): many starts and breaks, and long runs, leave nothing behind.

* 1,000 epochs started and broken off after one batch, on one Pipeline / DataLoader,
  and 1,000 whole lifecycles (build, start, break, close): threads, open descriptors
  and RSS come back to their baseline.
* A 50-epoch soak: RSS after epoch 50 is what it was after epoch 10.

How RSS is compared, honestly: the baseline is taken after a warm-up (50 cycles,
10 epochs) so that one-time costs (imports, torch's first collate, pools growing to
their size, the allocator's arenas for new threads) are in it; before each
reading, ``gc.collect()`` and glibc's ``malloc_trim(0)`` hand freed memory back, so
what stays is memory something still holds.  The tolerance, ``RSS_TOLERANCE``
(8 MiB), covers what remains of allocator noise: measured on this 2-core machine,
the six cases drifted between -0.5 and +1.4 MiB.  Every item here is a 64 KiB array,
so a leak of one batch (512 KiB to 1 MiB) per cycle or per epoch would add 40 MiB
to 500 MiB and fail.
"""

from __future__ import annotations

import ctypes
import gc
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from torch.utils.data import Dataset

from iopipe import DataLoader, Pipeline
from tests._helpers import fd_table, make_files

MiB = 1 << 20
RSS_TOLERANCE = 8 * MiB
CYCLES = 1000
WARMUP = 50
ITEM = 8192  # float64 values per item: 64 KiB


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the tolerance has to absorb it
        pass


def settled_rss() -> int:
    """Resident bytes once garbage is collected and freed memory is given back."""
    gc.collect()
    _malloc_trim()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def block(x: int) -> np.ndarray[Any, Any]:
    return np.full(ITEM, x, dtype=np.float64)


class Blocks(Dataset[Any]):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray[Any, Any]:
        return block(i)


def pipeline() -> Pipeline[Any]:
    return Pipeline.from_iterable(range(256), group_size=8).map(block, concurrency=2).batch(8)


def loader() -> DataLoader:
    return DataLoader(Blocks(256), batch_size=8, num_workers=2)


MAKERS: dict[str, Callable[[], Any]] = {"pipeline": pipeline, "loader": loader}


class Baseline:
    """Threads, descriptors and RSS now, to compare with later."""

    def __init__(self) -> None:
        self.threads = set(threading.enumerate())
        self.fds = fd_table()
        self.rss = settled_rss()

    def check(self) -> None:
        rss = settled_rss()
        assert set(threading.enumerate()) == self.threads
        assert fd_table() == self.fds
        assert rss - self.rss < RSS_TOLERANCE, f"RSS grew by {(rss - self.rss) / MiB:.1f} MiB"


def start_and_break(src: Any) -> None:
    for batch in src:
        assert batch.shape == (8, ITEM)
        break


@pytest.mark.slow
@pytest.mark.parametrize("api", list(MAKERS))
def test_1000_epochs_started_and_broken_off(api: str) -> None:
    with MAKERS[api]() as src:
        for _ in range(WARMUP):
            start_and_break(src)
        base = Baseline()
        for _ in range(CYCLES):
            start_and_break(src)
        base.check()
        assert sum(len(b) for b in src) == 256  # and still whole


@pytest.mark.slow
@pytest.mark.parametrize("api", list(MAKERS))
def test_1000_lifecycles_built_started_broken_and_closed(api: str) -> None:
    def cycle() -> None:
        with MAKERS[api]() as src:
            start_and_break(src)

    for _ in range(WARMUP):
        cycle()
    base = Baseline()
    for _ in range(CYCLES):
        cycle()
    base.check()


def soak(src: Any, epochs: int = 50, warm: int = 10) -> tuple[int, int]:
    """Run ``epochs`` whole epochs; return RSS after epoch ``warm`` and after the last."""
    total = 0
    at_warm = 0
    for epoch in range(1, epochs + 1):
        total += sum(len(b) for b in src)
        if epoch == warm:
            at_warm = settled_rss()
            threads, fds = set(threading.enumerate()), fd_table()
    assert total == epochs * len(src.dataset if isinstance(src, DataLoader) else src._source)
    assert set(threading.enumerate()) == threads
    assert fd_table() == fds
    return at_warm, settled_rss()


@pytest.mark.slow
def test_a_50_epoch_soak_of_a_file_pipeline_keeps_rss_flat(tmp_path: Path) -> None:
    make_files(tmp_path, [128 << 10] * 64)  # 8 MiB an epoch, 1 MiB a batch
    pipe = (
        Pipeline.from_files(str(tmp_path), shuffle=True)
        .read(concurrency=4)
        .map(lambda buf: buf[:ITEM].astype(np.float64), concurrency=2)
        .batch(8)
    )
    with pipe:
        warm, end = soak(pipe)
    assert end - warm < RSS_TOLERANCE, f"RSS grew by {(end - warm) / MiB:.1f} MiB"


@pytest.mark.slow
def test_a_50_epoch_soak_of_a_loader_keeps_rss_flat() -> None:
    with DataLoader(Blocks(128), batch_size=8, shuffle=True, num_workers=2) as dl:
        warm, end = soak(dl)
    assert end - warm < RSS_TOLERANCE, f"RSS grew by {(end - warm) / MiB:.1f} MiB"
