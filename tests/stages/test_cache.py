"""Tests of the in-memory cache (iopipe/stages/cache.py), alone and in pipelines."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from iopipe import Pipeline
from iopipe.runtime.channels import Group
from iopipe.stages.cache import MISSING, Cache, nbytes
from tests._helpers import (
    as_bytes,
    assert_same,
    check_close_midway,
    check_order_and_count,
    check_state_midway,
    make_files,
    run_stage,
)

ITEM_BYTES = 1000


class Counted:
    """A map function that counts its calls (thread-safe) and returns 1000-byte arrays."""

    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, x: int) -> np.ndarray:
        with self._lock:
            self.calls += 1
        return np.full(ITEM_BYTES, x % 256, np.uint8)


def value(x: int) -> np.ndarray:
    return np.full(ITEM_BYTES, x % 256, np.uint8)


def cache_extra(pipe: Pipeline[Any]) -> dict[str, float]:
    return dict(pipe.stats().stage("cache").extra)


# -- later epochs skip upstream work ---------------------------------------------------


def test_later_epochs_skip_the_stages_before_the_cache() -> None:
    fn = Counted()
    n = 50
    with Pipeline.from_iterable(range(n), group_size=8).map(fn).cache(max_bytes=1 << 20) as pipe:
        for epoch in range(3):
            out = list(pipe)
            assert_same(out, [value(x) for x in range(n)])
            extra = cache_extra(pipe)
            if epoch == 0:
                assert fn.calls == n
                assert (extra["hits"], extra["misses"]) == (0, n)
            else:
                assert fn.calls == n  # no new calls: every item came from the cache
                assert (extra["hits"], extra["misses"]) == (n, 0)
            assert extra["bytes_held"] == n * ITEM_BYTES
            assert extra["entries"] == n


def test_later_epochs_skip_reading_files(tmp_path: Path) -> None:
    files = make_files(tmp_path, [100, 5000, 0, 20_000])
    pipe = (
        Pipeline.from_files(str(tmp_path / "*.bin")).read(chunk_bytes=4096).cache(max_bytes=1 << 20)
    )
    with pipe:
        first = [as_bytes(b) for b in pipe]
        for path, _ in files:
            os.remove(path)  # a later epoch that read a file would fail now
        second = [as_bytes(b) for b in pipe]
        assert cache_extra(pipe)["hits"] == 4
    assert first == second == [d for _, d in files]


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("ordered", [True, False])
def test_partial_caching_keeps_each_value_with_its_item(shuffle: bool, ordered: bool) -> None:
    # Room for a third of the items: every epoch mixes hits and misses in each group.
    fn = Counted()
    n = 60
    items = [f"k{i}" for i in range(n)]

    def pair(k: str) -> tuple[str, np.ndarray]:
        return k, fn(int(k[1:]))

    plain = Pipeline.from_iterable(items, shuffle=shuffle, seed=3, group_size=8)
    cached = plain.map(pair, ordered=ordered).cache(max_bytes=n // 3 * (ITEM_BYTES + 200))
    with plain, cached:
        for _ in range(3):
            order = list(plain)
            calls_before = fn.calls
            out = list(cached)
            assert sorted(k for k, _ in out) == sorted(items)
            if ordered:
                assert [k for k, _ in out] == order
            for k, v in out:
                assert_same(v, value(int(k[1:])))
            extra = cache_extra(cached)
            assert extra["hits"] + extra["misses"] == n
            assert extra["bytes_held"] <= n // 3 * (ITEM_BYTES + 200)
            assert fn.calls - calls_before == extra["misses"]  # upstream ran for misses only


def test_an_item_larger_than_the_budget_is_never_cached() -> None:
    fn = Counted()
    with Pipeline.from_iterable(range(10)).map(fn).cache(max_bytes=ITEM_BYTES - 1) as pipe:
        list(pipe)
        list(pipe)
        assert fn.calls == 20
        extra = cache_extra(pipe)
        assert (extra["hits"], extra["bytes_held"], extra["entries"]) == (0, 0, 0)


def test_a_zero_budget_caches_nothing() -> None:
    fn = Counted()
    with Pipeline.from_iterable(range(5)).map(fn).cache(max_bytes=0) as pipe:
        list(pipe)
        list(pipe)
    assert fn.calls == 10


# -- LRU within max_bytes (the stage alone) ---------------------------------------------


def entry(key: str) -> np.ndarray:
    return np.zeros(ITEM_BYTES, np.uint8) + ord(key[0])


async def store(cache: Cache, keys: list[str]) -> list[Group]:
    return await run_stage(cache, [Group([entry(k) for k in keys], keys)], unit=len(keys))


async def test_least_recently_used_entries_go_first() -> None:
    cache = Cache(max_bytes=3 * ITEM_BYTES).fresh()
    assert isinstance(cache, Cache)
    # run_stage opens a fresh copy; drive this one directly to keep its entries.
    from iopipe.runtime.channels import END, GroupQueue

    async def put(keys: list[str]) -> None:
        inq, outq = GroupQueue(10), GroupQueue(10)
        await inq.put(Group([entry(k) for k in keys], keys))
        await inq.put(END)
        await cache.run(inq, outq)

    await put(["a", "b", "c"])
    assert cache.counters.extra["bytes_held"] == 3 * ITEM_BYTES
    assert cache.lookup("a") is not MISSING  # a becomes the most recently used
    await put(["d"])  # evicts b, the least recently used
    assert cache.lookup("b") is MISSING
    assert all(cache.lookup(k) is not MISSING for k in ["a", "c", "d"])
    await put(["e", "f"])  # a, c go; d, e, f stay
    assert [k for k in "abcdef" if cache.lookup(k) is not MISSING] == ["d", "e", "f"]
    assert cache.counters.extra["bytes_held"] == 3 * ITEM_BYTES
    assert cache.counters.extra["entries"] == 3


async def test_hits_are_merged_back_in_position() -> None:
    cache = Cache(max_bytes=1 << 20)
    hits = [(0, "h0", "cached-0"), (3, "h3", "cached-3")]
    group = Group(["fresh-1", "fresh-2"], ["m1", "m2"], hits=hits)
    (out,) = await run_stage(cache, [group], unit=4)
    assert out.items == ["cached-0", "fresh-1", "fresh-2", "cached-3"]
    assert out.keys == ["h0", "m1", "m2", "h3"]
    assert out.hits is None


def test_nbytes_measures_buffers_exactly() -> None:
    assert nbytes(np.zeros(100, np.uint8)) == 100
    assert nbytes(torch.zeros(10, dtype=torch.float64)) == 80
    assert nbytes(b"abc") == 3
    assert nbytes(bytearray(7)) == 7
    assert nbytes([np.zeros(10, np.uint8), b"xy"]) > 12
    assert nbytes({"a": np.zeros(50, np.uint8)}) > 50


# -- validation and the shared properties ----------------------------------------------


def test_cache_arguments_and_placement_are_validated() -> None:
    with pytest.raises(ValueError, match="max_bytes must be an int >= 0, got -1"):
        Pipeline.from_iterable(range(3)).cache(max_bytes=-1)
    with pytest.raises(ValueError, match="cache\\(\\) must come before batch\\(\\)"):
        Pipeline.from_iterable(range(3)).batch(2).cache(max_bytes=10)
    with pytest.raises(ValueError, match="only one cache\\(\\)"):
        Pipeline.from_iterable(range(3)).cache(max_bytes=10).cache(max_bytes=10)


def test_stats_show_hits_misses_and_bytes_held() -> None:
    with Pipeline.from_iterable(range(4)).map(value).cache(max_bytes=1 << 20) as pipe:
        list(pipe)
        text = str(pipe.stats())
    assert "cache: " in text
    assert "hits=0" in text
    assert "misses=4" in text
    assert f"bytes_held={4 * ITEM_BYTES}" in text


def test_cached_pipeline_keeps_order_and_count() -> None:
    check_order_and_count(
        lambda: (
            Pipeline.from_iterable(range(40), group_size=6)
            .map(value)
            .cache(max_bytes=20 * ITEM_BYTES)
            .batch(4)
        ),
        [torch.from_numpy(np.stack([value(x) for x in range(i, i + 4)])) for i in range(0, 40, 4)],
        epochs=3,
    )


def test_cached_pipeline_closes_midway() -> None:
    check_close_midway(
        lambda: Pipeline.from_iterable(range(100)).map(value).cache(max_bytes=1 << 20), take=5
    )


def test_cached_pipeline_resumes_midway() -> None:
    check_state_midway(
        lambda: Pipeline.from_iterable(range(30), group_size=4).map(value).cache(max_bytes=1 << 20),
        [value(x) for x in range(30)],
        take=11,
        epochs_before=1,
    )
