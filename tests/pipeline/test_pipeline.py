"""Tests of the composed pipeline (iopipe/pipeline/builder.py): order, bounds, errors, state, stats."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from iopipe import Pipeline, PipelineStats, StageError, StageStats
from iopipe.runtime.channels import BatchKey
from tests._helpers import (
    CountingSequence,
    assert_same,
    check_error_propagation,
    check_order_and_count,
    check_state_midway,
    consume,
    make_files,
    wait_until,
)

# -- an end-to-end pipeline over files ---------------------------------------------------


def decode(buf: np.ndarray) -> dict[str, Any]:
    head = torch.from_numpy(buf[:16].astype(np.int64))
    return {"head": head, "size": len(buf)}


@pytest.fixture
def files(tmp_path: Path) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(21)
    sizes = rng.integers(16, 6000, 90).tolist()
    sub = tmp_path / "data"
    return make_files(sub / "a", sizes[:45], seed=1) + make_files(sub / "b", sizes[45:], seed=2)


def plain_loop(paths: list[str], batch_size: int) -> list[dict[str, Any]]:
    """What iopipe must produce, computed the obvious way."""
    samples = []
    for p in paths:
        with open(p, "rb") as f:
            samples.append(decode(np.frombuffer(f.read(), np.uint8)))
    return [
        torch.utils.data.default_collate(samples[i : i + batch_size])
        for i in range(0, len(samples), batch_size)
    ]


def full_pipeline(root: Path, **options: Any) -> Pipeline[Any]:
    return (
        Pipeline.from_files(str(root / "**" / "*.bin"), **options)
        .read(chunk_bytes=4096, concurrency=4)
        .prefetch(32)
        .map(decode, concurrency=2)
        .batch(8, drop_last=False)
        .to_device("cpu")
    )


def test_order_is_kept_end_to_end(
    files: list[tuple[str, bytes]], tmp_path: Path, use_uvloop: bool
) -> None:
    paths = sorted(p for p, _ in files)
    want = plain_loop(paths, 8)
    check_order_and_count(lambda: full_pipeline(tmp_path, use_uvloop=use_uvloop), want)


def test_shuffled_end_to_end_matches_the_shuffled_plain_loop(
    files: list[tuple[str, bytes]], tmp_path: Path
) -> None:
    paths = sorted(p for p, _ in files)
    from iopipe.stages.source import Source

    src = Source(paths, shuffle=True, seed=5)

    def want(epoch: int) -> list[Any]:
        return plain_loop([paths[i] for i in src.order(epoch)], 8)

    check_order_and_count(lambda: full_pipeline(tmp_path, shuffle=True, seed=5), want)


def test_the_builder_starts_nothing_and_can_be_run_twice_at_once() -> None:
    base = Pipeline.from_iterable(range(30)).map(lambda x: x + 1)
    a = base.batch(4)
    b = base.batch(4)
    assert a is not b
    assert repr(a) == "<iopipe.Pipeline source -> map -> batch>"
    with a, b:
        ia, ib = iter(a), iter(b)
        out_a, out_b = [], []
        for x, y in zip(ia, ib, strict=True):  # interleaved: independent runtimes
            out_a.append(x)
            out_b.append(y)
    assert_same(out_a, out_b)
    assert_same(out_a, [torch.arange(i + 1, min(31, i + 5)) for i in range(0, 30, 4)])


def test_stage_names_are_unique() -> None:
    pipe = Pipeline.from_iterable(range(3)).map(str).map(len).map(str, name="fmt").prefetch(2)
    assert repr(pipe) == "<iopipe.Pipeline source -> map -> map_1 -> fmt -> prefetch>"
    with pipe:
        assert list(pipe) == ["1", "1", "1"]
        assert [s.name for s in pipe.stats().stages] == [
            "source",
            "map",
            "map_1",
            "fmt",
            "prefetch",
        ]


async def agen(n: int) -> AsyncIterator[int]:
    for i in range(n):
        yield i


@pytest.mark.parametrize("kind", ["list", "range", "generator", "async"])
def test_every_source_kind_runs_through_stages(kind: str) -> None:
    def make() -> Pipeline[Any]:
        src: Any
        if kind == "list":
            src = list(range(25))
        elif kind == "range":
            src = range(25)
        elif kind == "generator":
            src = (i for i in range(25))
        else:
            src = agen(25)
        return Pipeline.from_iterable(src, group_size=4).map(lambda x: 2 * x).batch(5)

    want = [torch.arange(i, i + 5) * 2 for i in range(0, 25, 5)]
    check_order_and_count(make, want, epochs=1)


@pytest.mark.parametrize("group_size", [1, 3, 64, 1000])
def test_group_size_changes_nothing_but_speed(group_size: int) -> None:
    check_order_and_count(
        lambda: Pipeline.from_iterable(range(100), group_size=group_size).map(str).batch(7),
        [[str(x) for x in range(i, min(100, i + 7))] for i in range(0, 100, 7)],
        epochs=1,
    )


# -- empty sources ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["list", "generator", "async"])
@pytest.mark.parametrize("chain", ["none", "map", "read-batch"])
def test_an_empty_source_ends_cleanly(kind: str, chain: str) -> None:
    src: Any = {"list": [], "generator": iter(()), "async": agen(0)}[kind]
    pipe = Pipeline.from_iterable(src)
    if chain == "map":
        pipe = pipe.map(str)
    elif chain == "read-batch":
        pipe = pipe.read().prefetch(4).batch(4)
    with pipe:
        assert list(pipe) == []
        assert list(pipe) == []
        stats = pipe.stats()
        assert stats.delivered == 0
        assert all(s.items == 0 for s in stats.stages)
        if kind == "list":
            assert len(pipe) == 0


# -- the in-flight bound -----------------------------------------------------------------


def saturated(pipe: Pipeline[Any]) -> bool:
    """Every queue is full, so the source is blocked: the most items the pipeline will hold."""
    return all(s.queue_now >= s.queue_capacity for s in pipe.stats().stages)


SHAPES = {
    "map": lambda p: p.map(lambda x: x, concurrency=3),
    "map-batch-prefetch": lambda p: (
        p.map(lambda x: x, concurrency=2).batch(4).prefetch(3).map(lambda b: b, executor="inline")
    ),
    "inline-prefetch-batch": lambda p: (
        p.map(lambda x: x, executor="inline").prefetch(24).batch(8).map(lambda b: b)
    ),
    "async-unordered": lambda p: p.map(_async_identity, concurrency=5, ordered=False).prefetch(8),
}


async def _async_identity(x: Any) -> Any:
    return x


@pytest.mark.parametrize("shape", list(SHAPES))
def test_items_in_flight_never_exceed_the_bound_under_a_slow_consumer(shape: str) -> None:
    seq = CountingSequence(2000)
    pipe = SHAPES[shape](Pipeline.from_iterable(seq, group_size=8))
    bound = pipe.max_items_in_flight
    with pipe:
        it = iter(pipe)
        for step in range(6):
            next(it)
            seq.consumed = pipe.state_dict()["consumed"]
            # The consumer holds back until the pipeline is as full as it will get.
            assert wait_until(lambda: saturated(pipe)), pipe.stats()
            held = seq.produced - seq.consumed
            assert 0 < held <= bound, f"step {step}: {held} items in flight, bound {bound}"
        # Then it drains everything, still checking at every production.
        for _ in it:
            seq.consumed = pipe.state_dict()["consumed"]
    assert seq.produced == 2000
    assert seq.peak <= bound


def test_the_bound_grows_with_every_queue_and_window() -> None:
    base = Pipeline.from_iterable(range(10), group_size=8)
    assert base.prefetch(100).max_items_in_flight > base.prefetch(10).max_items_in_flight
    assert base.map(str, concurrency=32).max_items_in_flight > base.max_items_in_flight
    assert base.batch(4).max_items_in_flight > base.max_items_in_flight


# -- errors ------------------------------------------------------------------------------


class FailingListing:
    """A re-iterable source whose every pass fails after two items."""

    def __iter__(self) -> Iterator[str]:
        yield "a"
        yield "b"
        raise OSError("listing failed")


def test_an_error_in_the_source_names_the_source() -> None:
    err = check_error_propagation(
        lambda: Pipeline.from_iterable(FailingListing(), group_size=1).map(str.upper),
        stage="source",
        item=None,
        cause=OSError,
        match="listing failed",
        prefix_of=["A", "B"],
    )
    assert "stage 'source' failed" in str(err)


def test_an_error_in_a_lazy_sequence_names_the_source() -> None:
    class Broken(CountingSequence):
        def __getitem__(self, i: Any) -> Any:
            if i == 5:
                raise KeyError("row 5 is corrupt")
            return super().__getitem__(i)

    check_error_propagation(
        lambda: Pipeline.from_iterable(Broken(10), group_size=2),
        stage="source",
        item=None,
        cause=KeyError,
        prefix_of=list(range(10)),
    )


def test_errors_carry_stage_item_cause_and_note(
    files: list[tuple[str, bytes]], tmp_path: Path
) -> None:
    paths = sorted(p for p, _ in files)
    bad = paths[30]

    def picky(buf: np.ndarray) -> np.ndarray:
        if len(buf) == len(dict(files)[bad]):
            raise ValueError("undecodable")
        return buf

    err = check_error_propagation(
        lambda: Pipeline.from_files(paths).read(chunk_bytes=4096).map(picky, name="decode"),
        stage="decode",
        item=bad,
        cause=ValueError,
        match="undecodable",
    )
    assert err.__cause__ is not None
    assert str(err.__cause__) == "undecodable"
    assert bad in str(err)


def test_a_failing_batch_is_named_by_its_first_and_last_item() -> None:
    items = [np.zeros(2), np.zeros(2), np.zeros(3), np.zeros(2)]
    with Pipeline.from_iterable(items).batch(2) as pipe:
        got, err = consume(pipe)
    assert len(got) == 1
    assert isinstance(err, StageError)
    assert err.item == BatchKey(1, 2, 3)  # positions: numpy arrays are not their own keys


def test_the_pipeline_is_usable_after_an_error() -> None:
    failed = threading.Event()

    def once(x: int) -> int:
        if x == 3 and not failed.is_set():
            failed.set()
            raise RuntimeError("transient")
        return x

    with Pipeline.from_iterable(range(10), group_size=2).map(once) as pipe:
        _, err = consume(pipe)
        assert isinstance(err, StageError)
        assert list(pipe) == list(range(10))  # the next epoch runs normally


def test_a_stuck_stage_times_out_naming_it() -> None:
    release = threading.Event()

    def stuck(x: int) -> int:
        if x == 5:
            release.wait(30)
        return x

    pipe = Pipeline.from_iterable(range(10), group_size=1, timeout=1.0).map(stuck).batch(2)
    with pipe:
        it = iter(pipe)
        assert_same(next(it), torch.tensor([0, 1]))
        assert_same(next(it), torch.tensor([2, 3]))
        with pytest.raises(TimeoutError, match="items are stuck in stage 'map'"):
            next(it)
        release.set()


def test_a_stuck_source_times_out_naming_it() -> None:
    release = threading.Event()

    def slow() -> Iterator[int]:
        yield 1
        release.wait(30)
        yield 2

    with Pipeline.from_iterable(slow(), group_size=1, timeout=1.0).map(str) as pipe:
        it = iter(pipe)
        assert next(it) == "1"
        with pytest.raises(
            TimeoutError, match=r"timeout=1\.0 s; items are stuck in stage 'source'"
        ):
            next(it)
        release.set()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"group_size": 0}, "group_size must be an int >= 1 or None, got 0"),
        ({"timeout": 0}, "timeout must be a number of seconds > 0 or None, got 0"),
        ({"timeout": "1"}, "timeout must be a number of seconds > 0 or None, got '1'"),
        ({"timeout": float("nan")}, "timeout must be a number of seconds > 0 or None, got nan"),
        ({"timeout": True}, "timeout must be a number of seconds > 0 or None, got True"),
        ({"timeout": float("inf")}, "timeout must be a number of seconds > 0 or None, got inf"),
        ({"handoff": 0}, "handoff must be an int >= 1, got 0"),
    ],
)
def test_pipeline_options_are_validated(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Pipeline.from_iterable(range(3), **options)


# -- shuffle and epochs ---------------------------------------------------------------------


def test_same_seed_same_order_new_epoch_new_order() -> None:
    def make(seed: int) -> Pipeline[Any]:
        return Pipeline.from_iterable(list(range(200)), shuffle=True, seed=seed).map(str)

    with make(7) as a, make(7) as b, make(8) as c:
        a0, a1 = list(a), list(a)
        b0, b1 = list(b), list(b)
        c0 = list(c)
    assert a0 == b0
    assert a1 == b1
    assert a0 != a1
    assert a0 != c0
    assert sorted(a0) == sorted(a1) == sorted(str(i) for i in range(200))


def test_set_epoch_replays_an_epochs_order() -> None:
    with Pipeline.from_iterable(list(range(50)), shuffle=True, seed=1) as pipe:
        orders = [list(pipe) for _ in range(3)]
        pipe.set_epoch(1)
        assert list(pipe) == orders[1]
        assert pipe.stats().epoch == 1
        assert list(pipe) == orders[2]
        with pytest.raises(ValueError, match="epoch must be an int >= 0, got -1"):
            pipe.set_epoch(-1)


def test_len_of_a_pipeline() -> None:
    assert len(Pipeline.from_iterable(range(10)).map(str)) == 10
    assert len(Pipeline.from_iterable(range(10)).batch(3)) == 4
    with pytest.raises(TypeError, match="no known length"):
        len(Pipeline.from_iterable(iter(range(10))))


# -- stats ---------------------------------------------------------------------------


def test_stats_before_during_and_after_an_epoch() -> None:
    release = threading.Event()
    seen_wait = threading.Event()

    def gate(x: int) -> int:
        if x == 40:
            seen_wait.set()
            release.wait(30)
        return x

    pipe = Pipeline.from_iterable(range(80), group_size=8).map(gate).batch(8)
    empty = pipe.stats()
    assert empty.stages == ()
    assert empty.delivered == 0
    assert isinstance(str(empty), str)
    with pipe:
        it = iter(pipe)
        first = [next(it) for _ in range(3)]
        assert len(first) == 3
        assert seen_wait.wait(30)
        during = pipe.stats()
        assert during.delivered == 3
        assert during.epoch == 0
        assert during.stage("source").items >= 24
        assert during.stage("batch").items >= 3
        release.set()
        rest = list(it)
        after = pipe.stats()
    assert len(rest) == 7
    assert isinstance(after, PipelineStats)
    assert after.delivered == 10
    assert [s.name for s in after.stages] == ["source", "map", "batch"]
    assert after.stage("source").items == 80
    assert after.stage("map").items == 80
    assert after.stage("batch").items == 10
    assert all(isinstance(s, StageStats) for s in after.stages)
    assert 0.0 <= after.consumer_wait_share <= 1.0
    assert after.elapsed_s > 0
    for s in after.stages:
        assert 0.0 <= s.utilization <= 1.0
        assert min(s.busy_s, s.wait_input_s, s.wait_output_s) >= 0
    with pytest.raises(KeyError, match="no stage named 'decode'"):
        after.stage("decode")


def test_stats_are_frozen_and_printable() -> None:
    with Pipeline.from_iterable(range(20)).map(str).batch(5) as pipe:
        list(pipe)
        stats = pipe.stats()
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.delivered = 0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.stages[0].items = 0  # type: ignore[misc]
    text = str(stats)
    assert text.startswith("epoch 0: 4 delivered")
    for name in ("source", "map", "batch", "busy", "wait in", "wait out", "queue"):
        assert name in text
    print(stats)  # readable with print (no exception)


def test_reader_stats_count_bytes(files: list[tuple[str, bytes]]) -> None:
    paths = [p for p, _ in files]
    with Pipeline.from_files(paths).read(chunk_bytes=4096) as pipe:
        list(pipe)
        stats = pipe.stats()
    assert stats.stage("read").bytes == sum(len(d) for _, d in files)
    assert stats.stage("read").items == len(files)
    assert "KiB" in str(stats)


# -- state_dict / load_state_dict ---------------------------------------------------------


@pytest.mark.parametrize("take", [0, 1, 17, 63, 64, 65, 99])
def test_resume_unbatched_gives_exactly_the_remaining_items(take: int) -> None:
    check_state_midway(
        lambda: Pipeline.from_iterable(range(100), group_size=16).map(str),
        [str(i) for i in range(100)],
        take=take,
    )


@pytest.mark.parametrize("take", [1, 5, 12])
def test_resume_batched_gives_exactly_the_remaining_batches(take: int) -> None:
    check_state_midway(
        lambda: Pipeline.from_iterable(range(100)).map(lambda x: x * 10).batch(8),
        [torch.arange(i, min(100, i + 8)) * 10 for i in range(0, 100, 8)],
        take=take,
    )


def test_resume_a_shuffled_epoch_in_its_own_order() -> None:
    items = list(range(60))
    from iopipe.stages.source import Source

    order = [items[i] for i in Source(items, shuffle=True, seed=4).order(2)]
    check_state_midway(
        lambda: Pipeline.from_iterable(items, shuffle=True, seed=4, group_size=8),
        order,
        take=23,
        epochs_before=2,
    )


def test_resume_a_generator_source() -> None:
    check_state_midway(
        lambda: Pipeline.from_iterable((i for i in range(40)), group_size=8),
        list(range(40)),
        take=9,
    )


def test_state_after_an_epoch_points_at_the_next() -> None:
    with Pipeline.from_iterable(range(10)) as pipe:
        assert pipe.state_dict() == {"epoch": 0, "consumed": 0}
        list(pipe)
        assert pipe.state_dict() == {"epoch": 1, "consumed": 0}


def test_a_loaded_state_is_reported_until_iterated() -> None:
    with Pipeline.from_iterable(range(10)) as pipe:
        it = iter(pipe)
        next(it)
        pipe.load_state_dict({"epoch": 3, "consumed": 4})
        assert pipe.state_dict() == {"epoch": 3, "consumed": 4}
        assert list(pipe) == list(range(4, 10))
        del it


@pytest.mark.parametrize(
    "state",
    [{}, {"epoch": 1}, {"epoch": -1, "consumed": 0}, {"epoch": 0, "consumed": "x"}, None],
)
def test_malformed_states_are_refused(state: Any) -> None:
    with pytest.raises(ValueError, match="not a Pipeline state"):
        Pipeline.from_iterable(range(3)).load_state_dict(state)


def test_an_iterator_replaced_by_a_newer_one_says_so() -> None:
    with Pipeline.from_iterable(range(100), group_size=2).map(str) as pipe:
        old = iter(pipe)
        next(old)
        new = iter(pipe)  # one epoch at a time: the old one's epoch ends
        with pytest.raises(RuntimeError, match="ended by a newer iter"):  # noqa: PT012
            for _ in range(3):  # what it had already received may come first
                next(old)
        assert len(list(new)) == 100
