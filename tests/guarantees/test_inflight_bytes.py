"""``max_inflight_bytes``: a hard bound on the bytes read and not yet taken by the consumer.

Issue 7 item 5.  Checked with the pipeline's own accounting (``stats()``'s
``inflight_bytes`` and ``peak_inflight_bytes``), never with timing: the
consumers here are slow on purpose (a timed ``Event.wait`` per element, about
100 times a page-cached read of one file), so that the reader runs ahead until
the bound stops it.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import pytest

from iopipe import ConfigError, Pipeline
from tests._helpers import make_files

ITEM = 64 * 1024
#: Bound of most tests: 8 items; the queues' item capacities allow several times more.
BOUND = 8 * ITEM


@pytest.fixture
def files(tmp_path: Path) -> str:
    make_files(tmp_path, [ITEM] * 64)
    return str(tmp_path / "*.bin")


def slow_consume(pipe: Pipeline[Any], per_element_s: float = 0.005) -> tuple[int, int]:
    """Iterate ``pipe`` slowly; return (elements, most bytes seen in flight between them)."""
    tick = threading.Event()
    n = worst = 0
    for _ in pipe:
        n += 1
        worst = max(worst, pipe.stats().inflight_bytes)
        tick.wait(per_element_s)  # a slow training step (never set)
    return n, worst


def test_a_slow_consumer_never_lets_the_reader_exceed_the_bound(files: str) -> None:
    pipe = (
        Pipeline.from_files(files, max_inflight_bytes=BOUND, timeout=30)
        .read(concurrency=4)
        .batch(4, collate_fn=list)
    )
    with pipe:
        n, worst = slow_consume(pipe)
        stats = pipe.stats()
    assert n == 16
    assert worst <= BOUND + ITEM
    assert stats.peak_inflight_bytes <= BOUND + ITEM
    assert stats.peak_inflight_bytes >= BOUND // 2  # the bound, not the queues, held it back
    assert stats.inflight_bytes == 0  # everything was handed over
    assert "bytes in flight (max_inflight_bytes): 0 B now, peak " in str(stats)


def test_the_bound_holds_with_a_map_a_cache_and_a_prefetch(files: str) -> None:
    pipe = (
        Pipeline.from_files(files, max_inflight_bytes=BOUND, group_size=4, timeout=30)
        .read(concurrency=4)
        .map(bytes)
        .cache(max_bytes=16 << 20)
        .prefetch(32)
    )
    with pipe:
        for epoch in range(2):
            n, worst = slow_consume(pipe, 0.001)
            stats = pipe.stats()
            assert n == 64
            assert worst <= BOUND + ITEM
            assert stats.peak_inflight_bytes <= BOUND + ITEM
            if epoch == 1:  # served by the cache: nothing read, nothing counted
                assert stats.peak_inflight_bytes == 0


@pytest.mark.parametrize("chunk_bytes", [ITEM, 16 * ITEM], ids=["in-chunks", "whole"])
def test_an_item_larger_than_the_bound_passes(tmp_path: Path, chunk_bytes: int) -> None:
    make_files(tmp_path, [ITEM, 10 * ITEM, ITEM, ITEM])
    pipe = Pipeline.from_files(
        str(tmp_path / "*.bin"), max_inflight_bytes=2 * ITEM, group_size=1, timeout=30
    ).read(chunk_bytes=chunk_bytes, concurrency=2)
    with pipe:
        n, _ = slow_consume(pipe)
        stats = pipe.stats()
    assert n == 4
    # It passes alone, read whole or in chunks: the reads of later items wait for
    # room on the loop, holding no read slot its chunks need, and leave room for it.
    assert stats.peak_inflight_bytes == 10 * ITEM


@pytest.mark.parametrize("group_size", [1, 4])
def test_items_read_in_chunks_keep_the_bound(tmp_path: Path, group_size: int) -> None:
    # 1 MiB items in 256 KiB chunks under a 16 MiB bound peaked at 32 MiB with
    # group_size=4: reads waiting for room held the slots the chunks needed.
    mib = 1 << 20
    make_files(tmp_path, [mib] * 48)
    pipe = Pipeline.from_files(
        str(tmp_path / "*.bin"), max_inflight_bytes=16 * mib, group_size=group_size, timeout=30
    ).read(chunk_bytes=mib // 4)
    with pipe:
        n, worst = slow_consume(pipe, per_element_s=0.002)
        stats = pipe.stats()
    assert n == 48
    assert worst <= stats.peak_inflight_bytes <= 16 * mib


def test_a_group_larger_than_the_bound_passes_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_files(tmp_path, [ITEM] * 24)
    pipe = Pipeline.from_files(
        str(tmp_path / "*.bin"), max_inflight_bytes=4 * ITEM, group_size=8, timeout=30
    ).read(concurrency=2)
    with caplog.at_level(logging.WARNING, logger="iopipe"), pipe:
        n, _ = slow_consume(pipe, per_element_s=0.001)
        stats = pipe.stats()
    assert n == 24
    # One group (8 items) is what the consumer needs next: it passes, and only it.
    assert 4 * ITEM < stats.peak_inflight_bytes <= 8 * ITEM + 4 * ITEM
    warned = [r.getMessage() for r in caplog.records if "max_inflight_bytes" in r.getMessage()]
    assert len(warned) == 1
    assert "smaller than one reader group needs" in warned[0]
    assert "group_size" in warned[0]


def test_a_bound_below_one_batch_still_delivers_every_batch(files: str) -> None:
    # The batcher needs 8 items (512 KiB) before anything can reach the consumer:
    # the budget lets a batch's worth through rather than deadlock.
    pipe = (
        Pipeline.from_files(files, max_inflight_bytes=2 * ITEM, timeout=30)
        .read(concurrency=2)
        .batch(8, collate_fn=list)
    )
    with pipe:
        batches = list(pipe)
        stats = pipe.stats()
    assert [len(b) for b in batches] == [8] * 8
    assert stats.peak_inflight_bytes <= 8 * ITEM + ITEM


def test_breaking_off_while_the_reader_waits_for_room(files: str) -> None:
    pipe = Pipeline.from_files(files, max_inflight_bytes=2 * ITEM, group_size=4).read(concurrency=4)
    with pipe:
        for _ in pipe:
            break  # the reader waits in the budget: stopping the epoch wakes it
        assert sum(1 for _ in pipe) == 64  # and the next epoch runs whole


def test_without_the_option_nothing_is_counted(files: str) -> None:
    with Pipeline.from_files(files).read() as pipe:
        assert sum(1 for _ in pipe) == 64
        stats = pipe.stats()
    assert stats.inflight_bytes == 0
    assert stats.peak_inflight_bytes == 0


def test_the_reader_is_not_fused_under_a_byte_bound(files: str) -> None:
    pipe = Pipeline.from_files(files, max_inflight_bytes=BOUND, timeout=30).read().map(len).batch(4)
    with pipe:
        assert sum(int(b.sum()) for b in pipe) == 64 * ITEM
        assert pipe.stats().peak_inflight_bytes > 0
        assert pipe._rt is not None
        assert pipe._rt.plan[0].name == "read"


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "1MiB"])
def test_invalid_max_inflight_bytes_is_refused(bad: Any) -> None:
    with pytest.raises(
        ValueError, match=rf"max_inflight_bytes must be an int >= 1 or None, got {bad!r}"
    ):
        Pipeline.from_iterable(range(3), max_inflight_bytes=bad)


def test_max_inflight_bytes_in_a_config(files: str) -> None:
    cfg = {
        "source": {"files": files},
        "options": {"max_inflight_bytes": "4MiB"},
        "stages": [{"stage": "read"}],
    }
    pipe = Pipeline.from_config(cfg)
    assert pipe._spec.options.max_inflight_bytes == 4 << 20
    assert pipe.to_config()["options"] == {"max_inflight_bytes": 4 << 20}
    with pytest.raises(ConfigError, match=r"options\.max_inflight_bytes: expected a size in bytes"):
        Pipeline.from_config({"source": {"items": [1]}, "options": {"max_inflight_bytes": 0}})
