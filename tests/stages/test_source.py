"""Tests of the source stage alone (iopipe/stages/source.py), on both loop implementations."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from iopipe import Pipeline, StageError
from iopipe.io.listing import list_files
from iopipe.stages.source import Source, resolve_rank
from tests._helpers import CountingSequence, items_of, keys_of, run_source

SIZES = [0, 1, 2, 3, 5, 7, 8, 13]
WORLDS = [1, 2, 3, 4, 8]


async def produce(items: Any, **kw: Any) -> list[Any]:
    run_kw = {k: kw.pop(k) for k in ("epoch", "skip", "group_size") if k in kw}
    return items_of(await run_source(Source(items, **kw), **run_kw))


def gen(n: int) -> Iterator[int]:
    yield from range(n)


async def agen(n: int) -> AsyncIterator[int]:
    for i in range(n):
        if i % 3 == 0:
            await asyncio.sleep(0)
        yield i


# -- kinds of source -------------------------------------------------------------------


async def test_list_source_keeps_order_in_groups_of_group_size() -> None:
    items = [f"f{i}" for i in range(10)]
    groups = await run_source(Source(items), group_size=4)
    assert [len(g.items) for g in groups] == [4, 4, 2]
    assert items_of(groups) == items
    assert keys_of(groups) == items  # small hashable items are their own keys


def as_list(n: int) -> list[int]:
    return list(range(n))


def as_tuple(n: int) -> tuple[int, ...]:
    return tuple(range(n))


KINDS = [as_list, as_tuple, range, np.arange, gen, agen]


@pytest.mark.parametrize("make", KINDS, ids=lambda f: f.__name__)
async def test_every_kind_of_source_yields_every_item_in_order(make: Any) -> None:
    out = await produce(make(23), group_size=5)
    assert [int(x) for x in out] == list(range(23))


@pytest.mark.parametrize("make", [as_list, gen, agen], ids=lambda f: f.__name__)
async def test_an_empty_source_ends_cleanly(make: Any) -> None:
    assert await run_source(Source(make(0))) == []


async def test_byte_ranges_pass_through_as_items_and_keys() -> None:
    ranges = [("a.bin", 0, 10), ("a.bin", 10, 10), ("b.bin", 4, 0)]
    groups = await run_source(Source(ranges), group_size=2)
    assert items_of(groups) == ranges
    assert keys_of(groups) == ranges


async def test_unhashable_items_are_keyed_by_position() -> None:
    items = [{"x": i} for i in range(5)]
    groups = await run_source(Source(items), group_size=2)
    assert items_of(groups) == items
    assert keys_of(groups) == [0, 1, 2, 3, 4]
    groups = await run_source(Source(iter(items)), group_size=2)
    assert keys_of(groups) == [0, 1, 2, 3, 4]


async def test_a_lazy_sequence_is_indexed_only_for_the_items_visited() -> None:
    seq = CountingSequence(1000)
    out = await produce(seq, skip=990, group_size=8)
    assert out == list(range(990, 1000))
    assert seq.produced == 10


async def test_a_generator_is_pulled_in_a_worker_thread_not_on_the_loop() -> None:
    release = threading.Event()
    threads: list[str] = []

    def blocking() -> Iterator[int]:
        threads.append(threading.current_thread().name)
        yield 0
        # The loop sets `release` below; were the generator run on the loop thread,
        # this wait could never succeed.
        assert release.wait(10)
        yield 1

    async def set_soon() -> None:
        await asyncio.sleep(0)
        release.set()

    setter = asyncio.create_task(set_soon())
    out = await produce(blocking(), group_size=1)
    await setter
    assert out == [0, 1]
    assert len(threads) == 1
    assert threads[0].startswith("iopipe-source")


async def test_a_failing_generator_fails_the_source_stage() -> None:
    def broken() -> Iterator[int]:
        yield 1
        raise OSError("disk on fire")

    with pytest.raises(StageError, match="disk on fire") as info:
        await produce(broken())
    assert (info.value.stage, info.value.item) == ("source", None)
    assert isinstance(info.value.__cause__, OSError)


async def test_skip_resumes_after_the_first_items_for_every_kind() -> None:
    for make in (as_list, gen, agen):
        out = await produce(make(20), skip=7, group_size=3)
        assert out == list(range(7, 20)), make.__name__
        assert await produce(make(20), skip=25) == [], make.__name__


# -- shuffle ---------------------------------------------------------------------------


def test_shuffle_order_is_a_pure_function_of_seed_and_epoch() -> None:
    a = Source(list(range(100)), shuffle=True, seed=3)
    b = Source(list(range(100)), shuffle=True, seed=3)
    c = Source(list(range(100)), shuffle=True, seed=4)
    e0, e1 = a.order(0).tolist(), a.order(1).tolist()
    assert e0 == b.order(0).tolist()  # same seed, same epoch: same order
    assert e1 == b.order(1).tolist()
    assert e0 != e1  # a new epoch: a new order
    assert e0 != c.order(0).tolist()  # a new seed: a new order
    assert sorted(e0) == sorted(e1) == list(range(100))  # permutations
    assert e0 != list(range(100))
    assert Source(list(range(100))).order(5).tolist() == list(range(100))


async def test_shuffled_source_yields_the_order_it_promises() -> None:
    items = [f"p{i}" for i in range(50)]
    src = Source(items, shuffle=True, seed=11)
    for epoch in (0, 1):
        out = items_of(await run_source(src, epoch=epoch, group_size=7))
        assert out == [items[i] for i in src.order(epoch)]
    again = items_of(await run_source(Source(items, shuffle=True, seed=11), epoch=1))
    assert again == [items[i] for i in src.order(1)]


def test_shuffle_needs_a_sized_source() -> None:
    with pytest.raises(ValueError, match="shuffle=True needs a sized source"):
        Source(gen(3), shuffle=True)


# -- len and rank shards ------------------------------------------------------------


def test_len_of_sized_sources_and_its_absence_for_iterators() -> None:
    assert len(Source(list(range(10)))) == 10
    assert len(Source(range(7))) == 7
    assert len(Source(list(range(10)), rank=0, world_size=3)) == 4
    assert len(Source(list(range(10)), rank=0, world_size=3, shard="drop")) == 3
    with pytest.raises(TypeError, match="has no known length"):
        len(Source(gen(3)))
    assert len(Pipeline.from_iterable(list(range(10)), rank=1, world_size=4)) == 3


def shards(items: Any, n_world: int, shard: str, **kw: Any) -> list[list[int]]:
    return [
        Source(items, rank=r, world_size=n_world, shard=shard, **kw).order(0).tolist()
        for r in range(n_world)
    ]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("shuffle", [False, True])
def test_pad_shards_are_equal_and_cover_every_item(n: int, world: int, shuffle: bool) -> None:
    parts = shards(list(range(n)), world, "pad", shuffle=shuffle, seed=1)
    want = -(-n // world)
    assert [len(p) for p in parts] == [want] * world
    assert set().union(*parts) == set(range(n))
    # Padding repeats as few items as it must: every item at least once, and the
    # multiset exceeds the items by exactly the padding.
    flat = [x for p in parts for x in p]
    assert len(flat) - n == (world * want - n)
    for p, r in zip(parts, range(world), strict=True):
        assert len(Source(list(range(n)), rank=r, world_size=world)) == len(p)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("shuffle", [False, True])
def test_drop_shards_are_equal_and_disjoint(n: int, world: int, shuffle: bool) -> None:
    parts = shards(list(range(n)), world, "drop", shuffle=shuffle, seed=1)
    assert [len(p) for p in parts] == [n // world] * world
    flat = [x for p in parts for x in p]
    assert len(flat) == len(set(flat))  # disjoint
    assert len(flat) == n - n % world  # only the remainder is dropped


def test_shuffled_shards_follow_the_shared_permutation() -> None:
    # Every rank must draw the same permutation, or shards would overlap.
    n, world = 40, 4
    perm = Source(list(range(n)), shuffle=True, seed=9).order(2).tolist()
    for r in range(world):
        mine = Source(list(range(n)), shuffle=True, seed=9, rank=r, world_size=world)
        assert mine.order(2).tolist() == perm[r::world]


@pytest.mark.parametrize("shard", ["pad", "drop"])
@pytest.mark.parametrize("kind", ["iterator", "async"])
async def test_unsized_sources_shard_exactly_like_sized_ones(shard: str, kind: str) -> None:
    # A generator of the same items must give every rank the same share as the list
    # would: equal counts are what keep distributed ranks in step.
    for n in SIZES:
        for world in [2, 3, 4, 8]:
            want = shards(list(range(n)), world, shard)
            got = []
            for r in range(world):
                src = gen(n) if kind == "iterator" else agen(n)
                kw = {"rank": r, "world_size": world, "shard": shard}
                got.append(await produce(src, group_size=3, **kw))
            assert got == want, f"n={n} world={world}"


def test_rank_and_world_size_are_validated() -> None:
    with pytest.raises(ValueError, match="give both rank and world_size or neither"):
        Source([1], rank=0)
    with pytest.raises(ValueError, match="world_size must be an int >= 1, got 0"):
        Source([1], rank=0, world_size=0)
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 2\), got 2"):
        Source([1], rank=2, world_size=2)
    assert resolve_rank(None, None) == (0, 1)  # torch.distributed not initialised


def test_source_arguments_are_validated() -> None:
    with pytest.raises(TypeError, match="got a single str/bytes"):
        Source("data/*.bin")
    with pytest.raises(TypeError, match="needs an iterable or async iterable, got int"):
        Source(5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shard must be one of"):
        Source([1], shard="wrap")
    with pytest.raises(ValueError, match="seed must be an int >= 0, got -1"):
        Source([1], seed=-1)


# -- file listing -------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for rel in ["a.bin", "b.txt", "sub/c.bin", "sub/deeper/d.bin", "sub/deeper/e.txt"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rel.encode())
    (tmp_path / "empty_dir.bin").mkdir()  # a directory matching the glob is not a file
    return tmp_path


def test_glob_with_double_star_is_recursive_and_sorted(tree: Path) -> None:
    got = list_files(str(tree / "**" / "*.bin"))
    want = [str(tree / r) for r in ["a.bin", "sub/c.bin", "sub/deeper/d.bin"]]
    assert got == sorted(want)


def test_a_directory_lists_every_file_below_it(tree: Path) -> None:
    got = list_files(tree / "sub")
    assert got == sorted(
        str(tree / r) for r in ["sub/c.bin", "sub/deeper/d.bin", "sub/deeper/e.txt"]
    )


def test_a_single_file_lists_itself(tree: Path) -> None:
    assert list_files(str(tree / "a.bin")) == [str(tree / "a.bin")]


def test_listing_nothing_raises(tree: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no files match"):
        list_files(str(tree / "**" / "*.nope"))
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        list_files(str(tree / "missing"))
    with pytest.raises(FileNotFoundError, match="no files match"):
        Pipeline.from_files(str(tree / "*.nope"))


async def test_from_files_glob_feeds_the_source(tree: Path) -> None:
    pipe = Pipeline.from_files(str(tree / "**" / "*.txt"))
    assert len(pipe) == 2
    with pipe:
        assert list(pipe) == [str(tree / "b.txt"), str(tree / "sub/deeper/e.txt")]
