"""The failure policy: ``on_error`` / ``max_failures`` for Pipeline and DataLoader (iopipe/runtime/policy.py)."""

from __future__ import annotations

import gc
import logging
import os
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from iopipe import ConfigError, DataLoader, Pipeline, StageError, TooManyFailures

BAD = {3, 7, 12}  # with group_size=4: last of a group (3, 7) and first of one (12)
N = 20
GOOD = [x for x in range(N) if x not in BAD]


def fail_on_bad(x: int) -> int:
    if x in BAD:
        raise ValueError(f"bad item {x}")
    return x * 10


async def afail_on_bad(x: int) -> int:
    return fail_on_bad(x)


def fail_4_to_7(x: int) -> int:
    if 4 <= x <= 7:  # a whole group of 4
        raise ValueError(f"bad item {x}")
    return x


def out_of_memory(x: int) -> int:
    if x == 5:
        raise MemoryError("no room")
    return x


def collate_fails_on_8(batch: list[Any]) -> Any:
    if 80 in batch:
        raise RuntimeError("cannot collate this batch")
    return list(batch)


def skipped_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "iopipe" and "skipped" in r.msg]


@pytest.fixture
def warnings_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger="iopipe")
    return caplog


# -- Pipeline: both policies, every executor -------------------------------------------


def test_raise_is_the_default_and_stops_at_the_first_failure() -> None:
    with Pipeline.from_iterable(range(N), group_size=4).map(fail_on_bad) as pipe:
        out = []
        with pytest.raises(
            StageError, match=r"stage 'map' failed on item 3: ValueError: bad item 3"
        ):
            out.extend(pipe)
        assert 30 not in out


def test_raise_reports_the_earliest_failing_item_not_the_fastest() -> None:
    # Item 0 fails late, item 1 at once: the two run concurrently, and the error
    # the consumer sees is still item 0's (the order the output would have had).
    def fails(x: int) -> int:
        if x == 0:
            time.sleep(0.2)
        raise ValueError(f"bad item {x}")

    pipe = Pipeline.from_iterable(range(4)).map(fails, concurrency=2)
    with pipe, pytest.raises(StageError, match=r"failed on item 0: ValueError: bad item 0"):
        list(pipe)


@pytest.mark.parametrize("executor", ["thread", "process", "async", "inline"])
def test_skip_drops_exactly_the_failing_items(
    executor: str, warnings_log: pytest.LogCaptureFixture
) -> None:
    fn = afail_on_bad if executor == "async" else fail_on_bad
    pipe = Pipeline.from_iterable(range(N), group_size=4, on_error="skip")
    with pipe.map(fn, executor=executor, concurrency=2) as pipe:
        assert list(pipe) == [x * 10 for x in GOOD]
        stats = pipe.stats()
    assert stats.failures == 3
    assert stats.stage("map").failures == 3
    assert stats.stage("map").items == len(GOOD)
    assert "skipped (on_error='skip'): 3 items failed: map 3" in str(stats)
    lines = skipped_lines(warnings_log)
    assert len(lines) == 3  # once per item, one line each
    for x in BAD:
        (line,) = [s for s in lines if f"skipped item {x}:" in s]
        assert f"stage 'map' skipped item {x}: ValueError: bad item {x}" in line
        assert "\n" not in line


def test_skip_keeps_batches_in_order_and_drops_a_batch_whose_collate_fails(
    warnings_log: pytest.LogCaptureFixture,
) -> None:
    pipe = Pipeline.from_iterable(range(N), on_error="skip").map(fail_on_bad, executor="inline")
    with pipe.batch(4, collate_fn=collate_fails_on_8) as pipe:
        batches = list(pipe)
        stats = pipe.stats()
    items = [x * 10 for x in GOOD]
    expected = [items[i : i + 4] for i in range(0, len(items), 4)]
    assert [b for b in expected if 80 in b] == [[50, 60, 80, 90]]
    assert batches == [b for b in expected if 80 not in b]
    assert stats.stage("map").failures == 3
    assert stats.stage("batch").failures == 4  # the items of the dropped batch
    assert stats.failures == 7
    assert (
        sum(
            "stage 'batch' skipped batch 1 (5 .. 9) (4 items)" in s
            for s in skipped_lines(warnings_log)
        )
        == 1
    )


def test_memory_errors_and_source_errors_are_never_skipped() -> None:
    pipe = Pipeline.from_iterable(range(N), on_error="skip").map(out_of_memory)
    with pipe, pytest.raises(StageError, match="MemoryError: no room"):
        list(pipe)

    def broken() -> Iterator[int]:
        yield 1
        raise OSError("the source broke")

    with (
        Pipeline.from_iterable(broken(), on_error="skip") as pipe,
        pytest.raises(StageError, match="stage 'source' failed: OSError: the source broke"),
    ):
        list(pipe)


# -- Pipeline: the reader ----------------------------------------------------------------


@pytest.fixture
def files(tmp_path: Path) -> list[str]:
    paths = []
    for i in range(8):
        p = tmp_path / f"{i:02d}.bin"
        p.write_bytes(bytes([i]) * 10)
        paths.append(str(p))
    return paths


def test_reader_skips_removed_truncated_and_invalid_items(
    files: list[str], warnings_log: pytest.LogCaptureFixture
) -> None:
    items: list[Any] = [*files, (files[5], 0, 100), (files[6], 0, 40), 42, (files[1], 2, 3)]
    pipe = Pipeline.from_files(items, on_error="skip", group_size=4)
    pipe = pipe.read(chunk_bytes=16).map(bytes, executor="inline")
    os.remove(files[2])  # removed after listing
    with pipe:
        out = list(pipe)
        stats = pipe.stats()
    # (files[5], 0, 100) is a short read; (files[6], 0, 40) is read in chunks (> 16
    # bytes) and is short too; 42 is not a path.
    expected = [bytes([i]) * 10 for i in range(8) if i != 2] + [bytes([1]) * 3]
    assert out == expected
    assert stats.stage("read").failures == 4
    assert stats.stage("read").items == len(expected)
    assert stats.stage("read").bytes == sum(len(b) for b in expected)
    lines = skipped_lines(warnings_log)
    assert len(lines) == 4
    assert any("FileNotFoundError" in s and "02.bin" in s for s in lines)
    assert sum("EOFError" in s for s in lines) == 2
    assert any("skipped item 42: TypeError" in s for s in lines)


def test_two_stages_over_the_budget_raise_an_exception_group(files: list[str]) -> None:
    os.remove(files[2])
    pipe = Pipeline.from_files(files, on_error="skip", max_failures=1, group_size=4)
    pipe = pipe.read().map(fail_on_bad_bytes)  # the read and the map fail once each
    with pipe, pytest.raises(ExceptionGroup) as info:
        list(pipe)
    errors = info.value.exceptions
    assert all(isinstance(e, TooManyFailures) for e in errors)
    by_stage = {e.stage: e for e in errors if isinstance(e, TooManyFailures)}
    assert set(by_stage) == {"read", "map"}
    assert by_stage["read"].failures == 1
    assert by_stage["map"].failures == 1
    (cause,) = by_stage["map"].errors
    assert cause.item == files[5]
    assert isinstance(cause.__cause__, ValueError)
    assert "more than max_failures=1 allows" in str(by_stage["read"])


def fail_on_bad_bytes(buf: Any) -> int:
    if buf[0] == 5:
        raise ValueError("bad bytes")
    return int(buf[0])


# -- Pipeline: the budget ----------------------------------------------------------------


def test_a_count_budget_raises_too_many_failures_with_every_cause() -> None:
    pipe = Pipeline.from_iterable(range(N), on_error="skip", max_failures=2, group_size=4)
    with pipe.map(fail_on_bad) as pipe, pytest.raises(TooManyFailures) as info:
        list(pipe)
    err = info.value
    assert isinstance(err, StageError)  # `except iopipe.StageError` still works
    assert err.stage == "map"
    assert err.item is None
    assert err.failures == 3
    assert str(err) == (
        "stage 'map': 3 item(s) failed, more than max_failures=2 allows (on_error='skip'); "
        "the causes are in __cause__"
    )
    assert isinstance(err.__cause__, ExceptionGroup)
    assert {e.item for e in err.errors} == BAD
    assert all(isinstance(e.__cause__, ValueError) for e in err.errors)


def test_a_budget_not_exceeded_lets_the_epoch_finish() -> None:
    for budget in (3, 0.2):  # 3 of 20 items: within 3 and within 20%
        pipe = Pipeline.from_iterable(range(N), on_error="skip", max_failures=budget)
        with pipe.map(fail_on_bad) as p:
            assert list(p) == [x * 10 for x in GOOD]


def test_a_fraction_is_checked_at_the_end_of_a_short_epoch() -> None:
    # 3 of 20 is over 10%; under 100 items seen the rate is judged at the end, so
    # every good item is delivered first.
    pipe = Pipeline.from_iterable(range(N), on_error="skip", max_failures=0.1, group_size=4)
    out: list[int] = []
    with pipe.map(fail_on_bad) as p, pytest.raises(TooManyFailures) as info:
        out.extend(p)
    assert out == [x * 10 for x in GOOD]
    assert "max_failures=0.1 of 20 items seen" in str(info.value)


def fail_on_odd(x: int) -> int:
    if x % 2:
        raise ValueError("odd")
    return x


def test_a_fraction_stops_a_long_epoch() -> None:
    pipe = Pipeline.from_iterable(range(1000), on_error="skip", max_failures=0.25)
    with pipe.map(fail_on_odd) as p, pytest.raises(TooManyFailures, match=r"of \d+ items seen"):
        list(p)


def test_max_failures_zero_raises_at_the_first_failure() -> None:
    pipe = Pipeline.from_iterable(range(N), on_error="skip", max_failures=0, group_size=4)
    with pipe.map(fail_on_bad, executor="inline") as p, pytest.raises(TooManyFailures) as info:
        list(p)
    assert info.value.failures == 1


# -- Pipeline: exact resume across skipped items ------------------------------------------


def run_from(build: Any, state: dict[str, int] | None, take: int | None) -> tuple[list[Any], Any]:
    """Take ``take`` elements (all when None) of a fresh pipeline resumed from ``state``."""
    with build() as pipe:
        if state is not None:
            pipe.load_state_dict(state)
        it = iter(pipe)
        out = [x for _, x in zip(range(take), it, strict=False)] if take is not None else list(it)
        return out, pipe.state_dict()


@pytest.mark.parametrize(
    ("fn", "batch"), [(fail_on_bad, None), (fail_4_to_7, None), (fail_on_bad, 3), (fail_4_to_7, 3)]
)
def test_resume_across_skipped_items_is_exact(fn: Any, batch: int | None) -> None:
    def build() -> Pipeline[Any]:
        pipe = Pipeline.from_iterable(range(N), group_size=4, on_error="skip")
        pipe = pipe.map(fn, executor="inline")
        return pipe.batch(batch, collate_fn=list) if batch else pipe

    full, _ = run_from(build, None, None)
    for k in range(len(full) + 1):
        head, state = run_from(build, None, k)
        rest, _ = run_from(build, state, None)
        assert head + rest == full, (k, state)


def test_skips_with_a_cache_and_resume_in_a_cached_epoch() -> None:
    pipe = Pipeline.from_iterable(range(N), group_size=4, on_error="skip")
    with pipe.map(fail_on_bad, executor="inline").cache(max_bytes=1 << 20) as p:
        first = list(p)
        second = list(p)  # good items come from the cache; bad ones fail again
        assert first == second == [x * 10 for x in GOOD]
        assert p.stats().stage("map").failures == 3
        for k in range(len(first) + 1):
            it = iter(p)
            head = [x for _, x in zip(range(k), it, strict=False)]
            state = p.state_dict()
            p.load_state_dict(state)
            assert head + list(p) == first, k


# -- option validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"on_error": "ignore"}, "on_error must be one of ('raise', 'skip'), got 'ignore'"),
        (
            {"on_error": "skip", "max_failures": -1},
            "max_failures must be an int >= 0 (a count), a float in (0, 1) (a fraction of "
            "the items seen) or None (no limit), got -1",
        ),
        ({"on_error": "skip", "max_failures": 1.5}, r"max_failures must be .* got 1.5"),
        ({"on_error": "skip", "max_failures": 0.0}, r"max_failures must be .* got 0.0"),
        ({"on_error": "skip", "max_failures": True}, r"max_failures must be .* got True"),
        ({"on_error": "skip", "max_failures": "3"}, r"max_failures must be .* got '3'"),
        (
            {"max_failures": 3},
            "max_failures=3 applies only with on_error='skip', got on_error='raise'",
        ),
    ],
)
def test_invalid_options_are_refused(kwargs: dict[str, Any], message: str) -> None:
    match = message if "*" in message else message.replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(ValueError, match=match):
        Pipeline.from_iterable(range(3), **kwargs)
    with pytest.raises(ValueError, match=match):
        DataLoader(list(range(3)), **kwargs)


def test_options_in_configs() -> None:
    cfg = {
        "source": {"items": list(range(N))},
        "options": {"on_error": "skip", "max_failures": 0.5},
    }
    pipe = Pipeline.from_config(
        {**cfg, "stages": [{"stage": "map", "fn": f"{__name__}:fail_on_bad"}]}, allow=[__name__]
    )
    assert pipe.to_config()["options"] == {"on_error": "skip", "max_failures": 0.5}
    with pipe:
        assert list(pipe) == [x * 10 for x in GOOD]
    with pytest.raises(
        ConfigError, match=r"options\.on_error: expected one of 'raise', 'skip', got 'x'"
    ):
        Pipeline.from_config({**cfg, "options": {"on_error": "x"}})
    with pytest.raises(
        ConfigError,
        match=r"options.max_failures: expected an int >= 0 or a number in \(0, 1\), got 2.5",
    ):
        Pipeline.from_config({**cfg, "options": {"max_failures": 2.5}})


def test_dataloader_refuses_skip_with_worker_processes() -> None:
    with pytest.raises(
        ValueError,
        match=r"on_error='skip' needs worker_type='thread' or 'main' \(worker processes run "
        r"torch's own fetcher\), got worker_type='process', num_workers=2",
    ):
        DataLoader(list(range(4)), num_workers=2, worker_type="process", on_error="skip")


# -- DataLoader ------------------------------------------------------------------------------


class Flaky(torch.utils.data.Dataset[int]):
    """A map-style dataset whose ``__getitem__`` raises KeyError on ``bad``."""

    def __init__(self, n: int = N, bad: set[int] = BAD) -> None:
        self.n, self.bad = n, bad

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        if i in self.bad:
            raise KeyError(f"no sample {i}")
        return i


class FlakyBatched(Flaky):
    """Also has ``__getitems__``, which fails as a whole when any index is bad."""

    def __getitems__(self, indices: list[int]) -> list[int]:
        if self.bad & set(indices):
            raise KeyError("a bad index somewhere in the batch")
        return list(indices)


class AsyncFlaky(Flaky):
    async def __getitem__(self, i: int) -> int:  # type: ignore[override]
        return super().__getitem__(i)


def expected_batches(bs: int, good: list[int]) -> list[list[int]]:
    # Batches keep the sampler's cut: a batch loses its failed samples and comes out short.
    cuts = [list(range(i, min(N, i + bs))) for i in range(0, N, bs)]
    out = [[x for x in cut if x in good] for cut in cuts]
    return [b for b in out if b]


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("dataset", [Flaky, FlakyBatched, AsyncFlaky])
def test_dataloader_skip_drops_failing_indices(
    num_workers: int, dataset: type[Flaky], warnings_log: pytest.LogCaptureFixture
) -> None:
    with DataLoader(dataset(), batch_size=4, num_workers=num_workers, on_error="skip") as dl:
        batches = [b.tolist() for b in dl]
        stats = dl.stats()
    assert batches == expected_batches(4, GOOD)
    assert stats.stage("fetch").failures == 3
    assert stats.failures == 3
    lines = skipped_lines(warnings_log)
    assert len(lines) == 3
    for i in BAD:
        assert sum(f"stage 'fetch' skipped index {i}: KeyError" in s for s in lines) == 1


def test_dataloader_raise_is_torch_behaviour() -> None:
    # The default raises the dataset's own error, as torch does.
    with DataLoader(Flaky(), batch_size=4) as dl, pytest.raises(KeyError, match="no sample 3"):
        list(dl)


def test_dataloader_drops_a_batch_whose_every_index_failed_and_main_workers() -> None:
    bad = {4, 5, 6, 7}
    good = [x for x in range(N) if x not in bad]
    for worker_type in ("thread", "main"):
        with DataLoader(
            Flaky(bad=bad), batch_size=4, worker_type=worker_type, on_error="skip"
        ) as dl:
            assert [b.tolist() for b in dl] == expected_batches(4, good)
            assert dl.stats().stage("fetch").failures == 4


def test_dataloader_budget_raises_and_ends_the_epoch() -> None:
    dl = DataLoader(Flaky(), batch_size=4, num_workers=2, on_error="skip", max_failures=2)
    with dl:
        it = iter(dl)
        out = []
        with pytest.raises(TooManyFailures, match=r"stage 'fetch': 3 item\(s\) failed") as info:
            out.extend(b.tolist() for b in it)
        assert out == expected_batches(4, GOOD)[:3]  # batches before the one that crossed it
        assert {e.item for e in info.value.errors} == BAD
        assert isinstance(info.value.errors[0].__cause__, KeyError)
        with pytest.raises(StopIteration):
            next(it)


def test_dataloader_fraction_is_checked_at_the_end() -> None:
    with DataLoader(Flaky(), batch_size=4, on_error="skip", max_failures=0.1) as dl:
        out = []
        with pytest.raises(TooManyFailures, match=r"max_failures=0.1 of 20 items seen"):
            out.extend(b.tolist() for b in dl)
        assert out == expected_batches(4, GOOD)
    with DataLoader(Flaky(), batch_size=4, on_error="skip", max_failures=0.2) as dl:
        assert [b.tolist() for b in dl] == expected_batches(4, GOOD)


def test_dataloader_resume_across_skipped_batches() -> None:
    bad = BAD | {8, 9, 10, 11}  # batch 2 fails whole

    def build() -> DataLoader:
        return DataLoader(Flaky(bad=bad), batch_size=4, num_workers=2, on_error="skip")

    with build() as dl:
        full = [b.tolist() for b in dl]
    for k in range(len(full) + 1):
        with build() as dl:
            it = iter(dl)
            head = [next(it).tolist() for _ in range(k)]
            state = dl.state_dict()
        with build() as dl:
            dl.load_state_dict(state)
            rest = [b.tolist() for b in dl]
        if k < len(full):
            assert head + rest == full, k
        else:  # every batch taken (the skipped one too): the state is between epochs
            assert (state["in_epoch"], rest) == (False, full)


class Stream(torch.utils.data.IterableDataset[int]):
    def __iter__(self) -> Iterator[int]:
        return iter(range(N))


def collate_refuses_8(batch: list[int]) -> Any:
    if 8 in batch:
        raise RuntimeError("cannot collate")
    return torch.tensor(batch)


def test_dataloader_iterable_dataset_collate_failure_drops_the_batch(
    warnings_log: pytest.LogCaptureFixture,
) -> None:
    with DataLoader(Stream(), batch_size=4, collate_fn=collate_refuses_8, on_error="skip") as dl:
        batches = [b.tolist() for b in dl]
        assert dl.stats().stage("collate").failures == 4
    assert batches == [list(range(i, i + 4)) for i in range(0, N, 4) if i != 8]
    assert any("skipped batch 2 (4 items): RuntimeError" in s for s in skipped_lines(warnings_log))


def test_skip_on_a_chain_that_would_be_fused(files: list[str]) -> None:
    # read -> thread map -> batch runs fused under "raise"; under "skip" each stage
    # runs on its own, so every failure is a per-item skip.
    pipe = Pipeline.from_files(files, on_error="skip").read().map(fail_on_bad_bytes)
    with pipe.batch(3, collate_fn=list) as p:
        assert list(p) == [[0, 1, 2], [3, 4, 6], [7]]
        assert p.stats().stage("map").failures == 1


def test_dataloader_without_batching_skips_single_samples() -> None:
    with DataLoader(Flaky(), batch_size=None, num_workers=2, on_error="skip") as dl:
        assert [int(x) for x in dl] == GOOD
        assert dl.stats().stage("fetch").failures == 3


def test_a_skipping_loader_is_freed_when_dropped() -> None:
    # No reference cycle through the policy: dropping the loader stops its threads at once.
    gc.disable()
    try:
        dl = DataLoader(Flaky(), batch_size=4, num_workers=2, on_error="skip")
        assert len(list(dl)) == 5
        ref = weakref.ref(dl)
        del dl
        assert ref() is None
    finally:
        gc.enable()


def test_reader_with_source_skips_too(files: list[str]) -> None:
    os.remove(files[3])
    pipe = Pipeline.from_files(files, on_error="skip").read(with_source=True)
    with pipe as p:
        out = [(src, bytes(buf)) for src, buf in p]
    assert out == [(f, bytes([i]) * 10) for i, f in enumerate(files) if i != 3]
