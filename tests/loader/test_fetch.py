"""The DataLoader's jobs (iopipe/loader/fetch.py): one job per mode, the policy a hook."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from iopipe.loader.fetch import AsyncMapFetcher, Collate, Fetched, MapFetcher
from iopipe.loader.workers import NOTHING, Failed


class Flaky:
    """Index ``i`` is ``10 * i``; the indices in ``bad`` raise KeyError."""

    def __init__(self, bad: set[int], getitems: bool = False) -> None:
        self.bad = bad
        self.getitems_calls = 0
        if getitems:
            self.__getitems__ = self._getitems

    def __getitem__(self, i: int) -> int:
        if i in self.bad:
            raise KeyError(i)
        return 10 * i

    def _getitems(self, index: list[int]) -> list[int]:
        self.getitems_calls += 1
        return [self[i] for i in index]


class AsyncFlaky(Flaky):
    async def __getitem__(self, i: int) -> int:  # type: ignore[override]
        await asyncio.sleep(0.001 * (5 - i % 5))  # complete out of index order
        return Flaky.__getitem__(self, i)


def _notes(exc: BaseException) -> str:
    return " | ".join(getattr(exc, "__notes__", []))


def test_raise_mode_fails_the_batch_naming_sample_and_batch() -> None:
    out = MapFetcher(Flaky({3}), list, True)((7, [2, 3, 4]))
    assert isinstance(out, Failed)
    assert isinstance(out.exc, KeyError)
    assert "dataset[3] failed (batch 7, indices [2, 3, 4])" in _notes(out.exc)


def test_raise_mode_returns_the_collated_batch() -> None:
    assert MapFetcher(Flaky(set()), list, True)((0, [1, 2])) == [10, 20]


def test_skip_mode_drops_failed_samples_and_reports_them() -> None:
    out = MapFetcher(Flaky({3, 5}), list, True, skip=True)((1, [2, 3, 4, 5]))
    assert isinstance(out, Fetched)
    assert out.batch == [20, 40]
    assert out.n == 4
    assert [(what, type(exc), lost) for what, exc, lost in out.failures] == [
        (3, KeyError, 1),
        (5, KeyError, 1),
    ]
    assert "dataset[3] failed (batch 1" in _notes(out.failures[0][1])


def test_skip_mode_batch_with_no_sample_left_is_nothing() -> None:
    out = MapFetcher(Flaky({1, 2}), list, True, skip=True)((0, [1, 2]))
    assert isinstance(out, Fetched)
    assert out.batch is NOTHING
    assert len(out.failures) == 2


def test_skip_mode_never_skips_memory_error() -> None:
    class Oom:
        def __getitem__(self, i: int) -> int:
            raise MemoryError

    out = MapFetcher(Oom(), list, True, skip=True)((0, [0]))
    assert isinstance(out, Failed)
    assert isinstance(out.exc, MemoryError)


def test_getitems_failure_is_retried_one_index_at_a_time_under_skip_only() -> None:
    ds = Flaky({1}, getitems=True)
    out = MapFetcher(ds, list, True, skip=True)((0, [0, 1, 2]))
    assert isinstance(out, Fetched)
    assert out.batch == [0, 20]
    assert ds.getitems_calls == 1
    raised = MapFetcher(ds, list, True)((4, [0, 1]))
    assert isinstance(raised, Failed)
    assert "__getitems__([0, 1]) failed (batch 4)" in _notes(raised.exc)


def test_collate_failure_drops_the_batch_under_skip_and_fails_it_under_raise() -> None:
    def bad(samples: list[Any]) -> Any:
        raise ValueError("no")

    skipped = MapFetcher(Flaky(set()), bad, True, skip=True)((3, [0, 1]))
    assert isinstance(skipped, Fetched)
    assert skipped.batch is NOTHING
    assert [(w, lost) for w, _, lost in skipped.failures] == [("batch 3", 2)]
    raised = MapFetcher(Flaky(set()), bad, True)((3, [0, 1]))
    assert isinstance(raised, Failed)
    assert "collate_fn failed on batch 3" in _notes(raised.exc)


def test_without_auto_collation_one_sample_is_the_batch() -> None:
    assert MapFetcher(Flaky(set()), lambda x: x, False)((0, 4)) == 40
    out = MapFetcher(Flaky({4}), lambda x: x, False, skip=True)((0, 4))
    assert isinstance(out, Fetched)
    assert out.batch is NOTHING
    assert out.failures[0][0] == 4


@pytest.mark.parametrize("skip", [False, True])
def test_async_fetcher_then_collate_matches_the_thread_fetcher(skip: bool) -> None:
    bad = {2, 4} if skip else set()
    index = [0, 1, 2, 3, 4, 5]
    n, data = asyncio.run(AsyncMapFetcher(AsyncFlaky(bad), list, True, skip=skip)((2, index)))
    got = Collate(list, skip=skip)((n, data))
    want = MapFetcher(Flaky(bad), list, True, skip=skip)((2, index))
    if skip:
        assert isinstance(got, Fetched)
        assert isinstance(want, Fetched)
        assert got.batch == want.batch == [0, 10, 30, 50]
        assert [f[0] for f in got.failures] == [f[0] for f in want.failures] == [2, 4]
    else:
        assert got == want == [0, 10, 20, 30, 40, 50]


def test_async_failure_under_raise_travels_as_failed_through_collate() -> None:
    n, data = asyncio.run(AsyncMapFetcher(AsyncFlaky({1}), list, True)((0, [0, 1])))
    assert isinstance(data, Failed)
    assert Collate(list)((n, data)) is data


def test_collate_of_an_iterable_datasets_samples() -> None:
    assert Collate(sum)((0, [1, 2, 3])) == 6
    out = Collate(sum, skip=True, batched=True)((0, [1, 2, 3]))
    assert isinstance(out, Fetched)
    assert out.batch == 6
    assert out.n == 3
    assert not out.failures


def test_a_system_exit_in_an_async_sample_travels_as_interrupted() -> None:
    from iopipe.runtime.errors import Interrupted

    class Exits:
        async def __getitem__(self, i: int) -> int:
            raise SystemExit(3)

    for skip in (False, True):
        _, data = asyncio.run(AsyncMapFetcher(Exits(), list, True, skip=skip)((1, [0, 1])))
        assert isinstance(data, Failed)
        assert isinstance(data.exc, Interrupted)
        assert isinstance(data.exc.exc, SystemExit)


def test_skip_mode_an_empty_index_is_nothing_not_collated() -> None:
    out = MapFetcher(Flaky(set()), list, True, skip=True)((0, []))
    assert isinstance(out, Fetched)
    assert out.batch is NOTHING
    assert MapFetcher(Flaky(set()), list, True)((0, [])) == []
