"""Tests of the device stage (iopipe/stages/device.py): a no-op on CPU, a copy on CUDA."""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import numpy as np
import pytest
import torch

from iopipe import Pipeline, StageError
from iopipe.stages import device as device_mod
from iopipe.stages.device import DeviceTransfer, apply_to_tensors
from tests._helpers import (
    assert_same,
    check_close_midway,
    check_order_and_count,
    groups_of,
    items_of,
    run_stage,
)

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
Pair = namedtuple("Pair", ["a", "b"])


def batches(n: int = 40, size: int = 8) -> Pipeline[Any]:
    return (
        Pipeline.from_iterable(range(n))
        .map(lambda i: {"x": torch.full((3,), float(i)), "i": i, "name": f"s{i}"})
        .batch(size)
    )


def expected(n: int = 40, size: int = 8) -> list[Any]:
    with batches(n, size) as pipe:
        return list(pipe)


# -- apply_to_tensors -------------------------------------------------------------------


def test_apply_to_tensors_reaches_every_tensor_and_keeps_containers() -> None:
    t = torch.ones(2)
    obj = {
        "a": t,
        "b": [t, (t, "s")],
        "c": Pair(t, 3),
        "d": "text",
        "e": np.ones(2),
        "f": 5,
    }
    out = apply_to_tensors(obj, lambda x: x * 2)
    assert_same(out["a"], t * 2)
    assert isinstance(out["b"], list)
    assert isinstance(out["b"][1], tuple)
    assert_same(out["b"][1][0], t * 2)
    assert out["b"][1][1] == "s"
    assert isinstance(out["c"], Pair)
    assert_same(out["c"].a, t * 2)
    assert out["c"].b == 3
    assert out["d"] == "text"
    assert out["e"] is obj["e"]  # numpy arrays are not tensors: left alone
    assert out["f"] == 5


# -- without CUDA the stage does nothing -----------------------------------------------


def test_to_cpu_is_a_no_op_and_skipped() -> None:
    want = expected()
    with batches().to_device("cpu") as pipe:
        got = list(pipe)
        names = [s.name for s in pipe.stats().stages]
    assert_same(got, want)
    assert "to_device" not in names  # an inactive stage is not even run


@pytest.mark.skipif(HAS_CUDA, reason="pin_memory is honoured with CUDA")
def test_pin_memory_without_cuda_is_ignored() -> None:
    stage = DeviceTransfer("cpu", pin_memory=True)
    assert not stage.pin_memory
    assert not stage.active
    assert stage.config() == {"device": "cpu", "pin_memory": True}
    with batches().to_device("cpu", pin_memory=True) as pipe:
        assert_same(list(pipe), expected())


@pytest.mark.skipif(HAS_CUDA, reason="CUDA is available here")
def test_asking_for_cuda_without_it_fails_at_build_time() -> None:
    with pytest.raises(ValueError, match="device 'cuda' requested but CUDA is not available"):
        batches().to_device("cuda")
    with pytest.raises(ValueError, match="device 'cuda:1' requested"):
        DeviceTransfer(torch.device("cuda", 1))


async def test_stage_alone_passes_batches_through_on_cpu() -> None:
    items = [{"x": torch.arange(i, i + 3)} for i in range(10)]
    out = await run_stage(DeviceTransfer("cpu"), groups_of(items, 3))
    assert_same(items_of(out), items)


async def test_a_failed_transfer_names_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(batch: Any, device: Any, pin: bool, stream: Any) -> Any:
        if batch == 4:
            raise RuntimeError("copy failed")
        return batch

    monkeypatch.setattr(device_mod, "_transfer", broken)
    with pytest.raises(StageError) as info:
        await run_stage(DeviceTransfer("cpu"), groups_of(list(range(8)), 3, keys=list("abcdefgh")))
    err = info.value
    assert (err.stage, err.item) == ("to_device", "e")
    assert isinstance(err.__cause__, RuntimeError)


# -- with CUDA ----------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("pin_memory", [True, False])
def test_cuda_batches_equal_the_cpu_batches(pin_memory: bool) -> None:
    want = expected()
    with batches().to_device("cuda", pin_memory=pin_memory) as pipe:
        got = list(pipe)
        assert pipe.stats().stage("to_device").items == len(want)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g["x"].device.type == "cuda"
        # The copy has completed when the batch is handed out: usable on any stream.
        assert_same(g["x"].cpu(), w["x"])
        assert_same(g["i"].cpu(), w["i"])
        assert g["name"] == w["name"]


@pytest.mark.gpu
@needs_cuda
def test_pin_memory_on_cpu_pins_with_cuda() -> None:
    with batches().to_device("cpu", pin_memory=True) as pipe:
        got = list(pipe)
    assert all(b["x"].is_pinned() for b in got)
    assert_same(got, expected())


@pytest.mark.gpu
@needs_cuda
def test_cuda_pipeline_keeps_order_and_closes_midway() -> None:
    check_order_and_count(
        lambda: (
            Pipeline.from_iterable(range(64))
            .batch(8)
            .to_device("cuda", pin_memory=True)
            .map(lambda t: t.cpu(), executor="inline")
        ),
        [torch.arange(i, i + 8) for i in range(0, 64, 8)],
    )
    check_close_midway(
        lambda: Pipeline.from_iterable(range(640)).batch(8).to_device("cuda"), take=2
    )
