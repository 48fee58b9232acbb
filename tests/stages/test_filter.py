"""``filter`` and ``flat_map``: what they keep and spread, exact resume, errors, length."""

from __future__ import annotations

from typing import Any

import pytest

from iopipe import Pipeline, StageError
from tests._helpers import check_state_midway


def _drain(p: Pipeline[Any]) -> list[Any]:
    try:
        return list(p)
    finally:
        p.close()


def _evens(seed: int = 3) -> Pipeline[int]:
    return Pipeline.from_iterable(list(range(60)), shuffle=True, seed=seed, group_size=7).filter(
        lambda x: x % 2 == 0
    )


def test_filter_keeps_what_the_predicate_accepts_in_order() -> None:
    got = _drain(Pipeline.from_iterable(list(range(30)), group_size=4).filter(lambda x: x % 3 == 0))
    assert got == list(range(0, 30, 3))


def test_filter_that_drops_everything_gives_an_empty_epoch() -> None:
    assert _drain(Pipeline.from_iterable(list(range(10))).filter(lambda x: False)) == []


@pytest.mark.parametrize("stop", [0, 1, 5, 17, 29, 30])
def test_filter_resumes_exactly_from_any_position(stop: int) -> None:
    check_state_midway(_evens, _drain(_evens()), take=stop)


async def _is_big(x: int) -> bool:
    return x >= 5


def test_an_async_predicate() -> None:
    assert _drain(Pipeline.from_iterable(list(range(8))).filter(_is_big)) == [5, 6, 7]


def test_filter_then_batch() -> None:
    p = Pipeline.from_iterable(list(range(20))).filter(lambda x: x % 2).batch(3)
    assert [b.tolist() for b in _drain(p)] == [[1, 3, 5], [7, 9, 11], [13, 15, 17], [19]]


def test_flat_map_spreads_none_one_or_many() -> None:
    p = Pipeline.from_iterable(list(range(7)), group_size=3).flat_map(lambda x: [x] * (x % 3))
    assert _drain(p) == [1, 2, 2, 4, 5, 5]


def test_flat_map_unbatches() -> None:
    p = Pipeline.from_iterable(list(range(10))).batch(4).flat_map(lambda b: b.tolist())
    assert _drain(p) == list(range(10))


def test_flat_map_resume_repeats_only_the_element_it_stopped_inside() -> None:
    def make() -> Pipeline[int]:
        return Pipeline.from_iterable(list(range(10)), group_size=4).flat_map(
            lambda x: [x * 10 + k for k in range(3)]
        )

    whole = _drain(make())
    for stop in range(len(whole) + 1):
        p = make()
        try:
            it = iter(p)
            head = [next(it) for _ in range(stop)]
            state = p.state_dict()
        finally:
            p.close()
        q = make()
        q.load_state_dict(state)
        rest = _drain(q)
        # At least once: the element whose outputs were partly taken comes again, whole.
        done = stop // 3
        assert rest == whole[done * 3 :], stop
        assert head == whole[:stop]


def test_a_failing_predicate_names_the_stage_and_item() -> None:
    def boom(x: int) -> bool:
        if x == 4:
            raise ValueError("no four")
        return True

    with pytest.raises(StageError) as info:
        _drain(Pipeline.from_iterable(list(range(8))).filter(boom, name="keep"))
    assert info.value.stage == "keep"
    assert "4" in str(info.value)


def test_a_flat_map_that_returns_no_iterable_names_the_item() -> None:
    with pytest.raises(StageError) as info:
        _drain(Pipeline.from_iterable(list(range(3))).flat_map(lambda x: x))
    assert isinstance(info.value.__cause__, TypeError)


def test_skip_drops_failures_and_filters_the_rest() -> None:
    def odd_or_fail(x: int) -> bool:
        if x == 6:
            raise ValueError("six")
        return bool(x % 2)

    p = Pipeline.from_iterable(list(range(10)), on_error="skip").filter(odd_or_fail)
    assert _drain(p) == [1, 3, 5, 7, 9]


def test_the_length_is_unknown() -> None:
    p = Pipeline.from_iterable(list(range(5))).filter(bool)
    with pytest.raises(TypeError, match="not known"):
        len(p)
    p.close()


def test_bad_arguments() -> None:
    p = Pipeline.from_iterable([1])
    with pytest.raises(TypeError):
        p.filter(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not async"):
        p.flat_map(_is_big)  # type: ignore[arg-type]
