"""Tests of the batcher alone (iopipe/stages/batch.py), and its collation against torch's."""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from iopipe import Pipeline, StageError
from iopipe.runtime.channels import BatchKey, Group
from iopipe.stages.batch import Batcher
from tests._helpers import (
    assert_same,
    check_close_midway,
    check_error_propagation,
    check_order_and_count,
    check_state_midway,
    groups_of,
    run_stage,
)

Point = namedtuple("Point", ["x", "y"])


def listed(items: list[Any]) -> list[Any]:
    return list(items)


async def batch(items: list[Any], size: int, *, group: int = 3, **kw: Any) -> list[Group]:
    return await run_stage(Batcher(size, **kw), groups_of(items, group, keys=items), unit=group)


# -- cutting -----------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 25])
@pytest.mark.parametrize("drop_last", [False, True])
async def test_batches_cut_across_input_groups(n: int, drop_last: bool) -> None:
    items = list(range(n))
    out = await batch(items, 4, group=3, drop_last=drop_last, collate_fn=listed)
    want = [items[i : i + 4] for i in range(0, n, 4)]
    if drop_last and want and len(want[-1]) < 4:
        want.pop()
    assert [g.items[0] for g in out] == want
    for i, g in enumerate(out):
        assert g.batched
        assert g.counts == [len(want[i])]
        assert g.weight == len(want[i])
        assert g.keys == [BatchKey(i, want[i][0], want[i][-1])]


async def test_batch_size_one_and_batches_larger_than_the_input() -> None:
    out = await batch(list(range(3)), 1, collate_fn=listed)
    assert [g.items[0] for g in out] == [[0], [1], [2]]
    out = await batch(list(range(3)), 100, collate_fn=listed)
    assert [g.items[0] for g in out] == [[0, 1, 2]]
    assert await batch(list(range(3)), 100, collate_fn=listed, drop_last=True) == []


async def test_collate_fn_gets_each_batch_as_a_list() -> None:
    seen: list[list[int]] = []

    def collate(items: list[int]) -> int:
        seen.append(items)
        return sum(items)

    out = await batch(list(range(10)), 4, collate_fn=collate)
    assert [g.items[0] for g in out] == [6, 22, 17]
    assert seen == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


async def test_default_collate_stacks_tensors() -> None:
    items = [torch.full((2,), i) for i in range(6)]
    out = await batch(items, 4)
    assert_same(out[0].items[0], torch.stack(items[:4]))
    assert_same(out[1].items[0], torch.stack(items[4:]))


async def test_a_failing_collate_names_the_batch() -> None:
    def collate(items: list[int]) -> int:
        if 5 in items:
            raise ValueError("cannot collate")
        return 0

    with pytest.raises(StageError) as info:
        await batch(list(range(12)), 4, collate_fn=collate)
    err = info.value
    assert err.stage == "batch"
    assert err.item == BatchKey(1, 4, 7)
    assert isinstance(err.__cause__, ValueError)
    assert "batch 1 (4 .. 7)" in str(err)


async def test_unequal_shapes_fail_with_torchs_reason() -> None:
    with pytest.raises(StageError, match="stack expects each tensor to be equal size"):
        await batch([torch.zeros(2), torch.zeros(3)], 2)


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        ({"batch_size": 0}, ValueError, "batch_size must be an int >= 1, got 0"),
        ({"batch_size": True}, ValueError, "batch_size must be an int >= 1, got True"),
        ({"batch_size": 2.0}, ValueError, "batch_size must be an int >= 1, got 2.0"),
        ({"batch_size": 2, "collate_fn": 3}, TypeError, "collate_fn must be callable, got 3"),
    ],
)
def test_batcher_arguments_are_validated(
    kw: dict[str, Any], exc: type[Exception], match: str
) -> None:
    with pytest.raises(exc, match=match):
        Batcher(**kw)


# -- default_collate is torch's: differential tests against DataLoader -----------------


def samples(kind: str, n: int) -> list[Any]:
    rng = np.random.default_rng(0)
    if kind == "int":
        return list(range(n))
    if kind == "float":
        return [i / 3 for i in range(n)]
    if kind == "bool":
        return [bool(i % 2) for i in range(n)]
    if kind == "str":
        return [f"s{i}" for i in range(n)]
    if kind == "tensor":
        return [torch.randn(3, 2, generator=torch.Generator().manual_seed(i)) for i in range(n)]
    if kind == "numpy":
        return [rng.integers(0, 255, (4,), dtype=np.uint8) for _ in range(n)]
    if kind == "numpy_scalar":
        return [np.float32(i) for i in range(n)]
    if kind == "dict":
        return [{"x": torch.tensor([i, i]), "y": i, "name": f"n{i}"} for i in range(n)]
    if kind == "tuple":
        return [(torch.tensor(i), np.int64(i), i * 1.5) for i in range(n)]
    if kind == "namedtuple":
        return [Point(torch.tensor([i]), i) for i in range(n)]
    if kind == "nested":
        return [{"a": (torch.tensor(i), [i, i + 1]), "b": {"c": np.ones(2) * i}} for i in range(n)]
    raise AssertionError(kind)


KINDS = [
    "int",
    "float",
    "bool",
    "str",
    "tensor",
    "numpy",
    "numpy_scalar",
    "dict",
    "tuple",
    "namedtuple",
    "nested",
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("drop_last", [False, True])
def test_default_collate_matches_torch_dataloader(kind: str, drop_last: bool) -> None:
    data = samples(kind, 10)
    want = list(DataLoader(data, batch_size=4, drop_last=drop_last))  # type: ignore[arg-type]
    with Pipeline.from_iterable(data).batch(4, drop_last=drop_last) as pipe:
        got = list(pipe)
        assert len(pipe) == len(want)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        # A namedtuple collates to the same namedtuple type in both.
        assert_same(g, w)


def test_custom_collate_matches_torch_dataloader() -> None:
    def collate(items: list[int]) -> dict[str, Any]:
        return {"sum": sum(items), "n": len(items)}

    data = list(range(11))
    want = list(DataLoader(data, batch_size=3, collate_fn=collate))  # type: ignore[arg-type]
    with Pipeline.from_iterable(data).batch(3, collate_fn=collate) as pipe:
        assert list(pipe) == want


# -- the shared properties -----------------------------------------------------------


def expected_batches(n: int, size: int, drop_last: bool = False) -> list[torch.Tensor]:
    out = [torch.arange(i, min(n, i + size)) for i in range(0, n, size)]
    if drop_last and n % size:
        out.pop()
    return out


@pytest.mark.parametrize("drop_last", [False, True])
def test_batch_pipeline_keeps_order_and_count(drop_last: bool) -> None:
    check_order_and_count(
        lambda: Pipeline.from_iterable(range(50)).batch(8, drop_last=drop_last),
        expected_batches(50, 8, drop_last),
    )


def test_batch_pipeline_len_follows_drop_last() -> None:
    assert len(Pipeline.from_iterable(range(50)).batch(8)) == 7
    assert len(Pipeline.from_iterable(range(50)).batch(8, drop_last=True)) == 6
    assert len(Pipeline.from_iterable(range(48)).batch(8, drop_last=True)) == 6
    assert len(Pipeline.from_iterable(range(50)).batch(5).batch(2)) == 5


def test_batch_pipeline_propagates_collate_errors() -> None:
    def collate(items: list[int]) -> list[int]:
        if 13 in items:
            raise RuntimeError("bad batch")
        return items

    check_error_propagation(
        lambda: (
            Pipeline.from_iterable([f"k{i}" for i in range(30)])
            .map(lambda k: int(k[1:]))
            .batch(4, collate_fn=collate)
        ),
        stage="batch",
        item=BatchKey(3, "k12", "k15"),
        cause=RuntimeError,
        prefix_of=[list(range(i, i + 4)) for i in range(0, 28, 4)],
    )


def test_batch_pipeline_closes_midway() -> None:
    check_close_midway(lambda: Pipeline.from_iterable(range(100)).batch(4), take=3)


@pytest.mark.parametrize("take", [1, 4, 6])
def test_batch_pipeline_resumes_midway(take: int) -> None:
    check_state_midway(
        lambda: Pipeline.from_iterable(range(50)).map(lambda x: x).batch(8),
        expected_batches(50, 8),
        take=take,
    )


def test_batched_state_counts_source_items() -> None:
    with Pipeline.from_iterable(range(50)).batch(8) as pipe:
        it = iter(pipe)
        next(it)
        next(it)
        assert pipe.state_dict() == {"epoch": 0, "consumed": 16}
        del it
