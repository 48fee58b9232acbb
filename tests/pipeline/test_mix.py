"""``Pipeline.mix``: weighted, deterministic in (seed, epoch), resumable, weights per epoch."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from iopipe import Pipeline

A = list(range(0, 300))
B = list(range(1000, 1100))


@contextmanager
def _mixed(**kw: Any) -> Iterator[Pipeline[Any]]:
    a, b = Pipeline.from_iterable(A), Pipeline.from_iterable(B)
    m = Pipeline.mix([a, b], kw.pop("weights", [3, 1]), **kw)
    try:
        yield m
    finally:
        for p in (m, a, b):
            p.close()


def test_every_element_once_in_each_members_order() -> None:
    with _mixed(seed=1) as m:
        got = list(m)
    assert sorted(got) == A + B
    assert [x for x in got if x < 1000] == A
    assert [x for x in got if x >= 1000] == B


def test_the_draws_follow_the_weights() -> None:
    with _mixed(seed=2, stop="first") as m:
        got = list(m)
    head = got[:200]
    share = sum(x < 1000 for x in head) / len(head)
    assert 0.65 < share < 0.85  # weights 3:1, one fixed draw sequence


def test_deterministic_in_seed_and_epoch() -> None:
    with _mixed(seed=3) as m, _mixed(seed=3) as n:
        e0, e1 = list(m), list(m)
        assert list(n) == e0
        assert list(n) == e1
    assert e0 != e1
    with _mixed(seed=4) as other:
        assert list(other) != e0


@pytest.mark.parametrize("stop_at", [0, 1, 57, 250, 399])
def test_resume_mid_epoch_is_exact(stop_at: int) -> None:
    with _mixed(seed=5) as m:
        whole = list(m)
        m.set_epoch(0)
        it = iter(m)
        head = [next(it) for _ in range(stop_at)]
        state = m.state_dict()
    with _mixed(seed=5) as again:
        again.load_state_dict(state)
        assert head + list(again) == whole


def test_weights_as_a_function_of_the_epoch() -> None:
    with _mixed(seed=6, weights=lambda e: [1, 0] if e == 0 else [0, 1]) as m:
        assert list(m) == A  # B weighs 0: never drawn
        assert list(m) == B


def test_stop_first_ends_with_the_first_exhausted_member() -> None:
    with _mixed(seed=7, weights=[1, 1], stop="first") as m:
        got = list(m)
    assert len(got) < len(A) + len(B)
    assert [x for x in got if x >= 1000] == B or [x for x in got if x < 1000] == A


def test_a_mix_batches_and_maps_like_any_source() -> None:
    with _mixed(seed=8) as m:
        out = [b.tolist() for b in m.map(lambda x: x * 2).batch(50)]
    assert sorted(x for b in out for x in b) == sorted(2 * x for x in A + B)


@pytest.mark.parametrize(
    ("weights", "kw"),
    [([1], {}), ([1, -1], {}), ([0, 0], {}), ([1, float("nan")], {}), ([1, 1], {"stop": "x"})],
)
def test_bad_arguments(weights: Any, kw: Any) -> None:
    a, b = Pipeline.from_iterable(A), Pipeline.from_iterable(B)
    try:
        with pytest.raises(ValueError):
            Pipeline.mix([a, b], weights, **kw)
        with pytest.raises(ValueError, match="twice"):
            Pipeline.mix([a, a], [1, 1])
    finally:
        a.close()
        b.close()
