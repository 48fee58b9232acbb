"""``shuffle(buffer)``: a bounded shuffle for streams, deterministic, resumed by replay."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from iopipe import Pipeline, StageError
from tests._helpers import check_state_midway

N = 200


class Stream:
    """An iterable with no length: what a shuffle buffer is for."""

    def __iter__(self) -> Iterator[int]:
        return iter(range(N))


def _make(buffer: int = 16, seed: int = 1) -> Pipeline[int]:
    return Pipeline.from_iterable(Stream(), group_size=8).shuffle(buffer, seed=seed)


def _drain(p: Pipeline[Any]) -> list[Any]:
    try:
        return list(p)
    finally:
        p.close()


def test_each_element_once_and_mixed() -> None:
    got = _drain(_make())
    assert sorted(got) == list(range(N))
    assert got != list(range(N))


def test_an_element_moves_at_most_about_a_buffer_ahead() -> None:
    got = _drain(_make(buffer=16))
    # An element can come out only after it entered: position >= value - buffer.
    assert all(pos >= x - 16 for pos, x in enumerate(got))


def test_deterministic_in_seed_and_epoch() -> None:
    p = _make()
    try:
        e0, e1 = list(p), list(p)
    finally:
        p.close()
    assert e0 != e1
    assert _drain(_make()) == e0
    assert _drain(_make(seed=2)) != e0


@pytest.mark.parametrize("stop", [0, 1, 15, 16, 99, 190, 199])
def test_resume_replays_to_the_exact_position(stop: int) -> None:
    check_state_midway(_make, _drain(_make()), take=stop)


def test_after_a_filter_and_before_a_batch() -> None:
    p = Pipeline.from_iterable(Stream()).filter(lambda x: x % 2 == 0).shuffle(8).batch(10)
    got = [x for b in _drain(p) for x in b.tolist()]
    assert sorted(got) == list(range(0, N, 2))


def test_after_a_batch_is_refused() -> None:
    p = Pipeline.from_iterable(Stream()).batch(4).shuffle(8)
    with pytest.raises(StageError, match="before batch"):
        _drain(p)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, 10**9])
def test_bad_sizes(bad: Any) -> None:
    with pytest.raises(ValueError):
        Pipeline.from_iterable(Stream()).shuffle(bad)
