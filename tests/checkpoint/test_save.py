"""save_checkpoint: safetensors (and the Hugging Face index) that other loaders read."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import iopipe.checkpoint.save as save_mod
from iopipe import CheckpointError, load_checkpoint, save_checkpoint
from tests.checkpoint.test_checkpoint import _assert_same, _mixed, _random


def _hf_load(folder: Path) -> dict[str, torch.Tensor]:
    """What a Hugging Face style loader does: the index's weight_map, then each shard."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(load_file(folder / shard))
    assert set(out) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in out.values())
    return out


def test_one_file_round_trips_through_safetensors(tmp_path: Path) -> None:
    tensors = _mixed(seed=21)
    path = tmp_path / "one.safetensors"
    assert save_checkpoint(tensors, path, metadata={"step": "7"}) == [str(path)]
    _assert_same(load_file(path), tensors)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "step": "7"}
    _assert_same(load_checkpoint(path), tensors)


def test_shards_and_index_round_trip(tmp_path: Path) -> None:
    tensors = _mixed(seed=22, count=60)
    folder = tmp_path / "ckpt"
    files = save_checkpoint(tensors, folder, max_shard_bytes=40_000)
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2
    assert files[-1].endswith("model.safetensors.index.json")
    count = len(shards)
    assert [Path(f).name for f in shards] == [
        f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)
    ]
    _assert_same(_hf_load(folder), tensors)
    _assert_same(load_checkpoint(folder), tensors)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary left behind


def test_a_small_folder_checkpoint_is_one_model_file(tmp_path: Path) -> None:
    tensors = {"a": torch.arange(10.0)}
    assert save_checkpoint(tensors, tmp_path / "m") == [str(tmp_path / "m" / "model.safetensors")]
    _assert_same(load_file(tmp_path / "m" / "model.safetensors"), tensors)


def test_layouts_and_views_are_saved_as_their_values(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(23)
    base = _random((64, 32), torch.float32, gen)
    flat = torch.arange(100, dtype=torch.int16)
    tensors = {
        "t": base.t(),  # not contiguous
        "every_other": _random((8, 10), torch.float64, gen)[:, ::2],
        "first": flat[:40],  # two views of one buffer that do not overlap
        "rest": flat[40:],
        "empty": torch.empty(0, 5),
        "scalar": torch.tensor(3.5, dtype=torch.bfloat16),
    }
    path = tmp_path / "views.safetensors"
    save_checkpoint(tensors, path)
    _assert_same(load_file(path), {k: v.contiguous() for k, v in tensors.items()})


def test_what_cannot_be_saved_is_refused_with_its_name(tmp_path: Path) -> None:
    weight = torch.randn(4, 4)
    with pytest.raises(CheckpointError, match="'emb' and 'head' share memory") as info:
        save_checkpoint({"emb": weight, "head": weight}, tmp_path / "tied.safetensors")
    assert info.value.tensor == "head"
    with pytest.raises(CheckpointError, match="share memory"):
        save_checkpoint({"a": weight, "row": weight[1]}, tmp_path / "tied.safetensors")
    with pytest.raises(CheckpointError, match=r"'m'.*meta"):
        save_checkpoint({"m": torch.empty(3, device="meta")}, tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="sparse"):
        save_checkpoint({"s": torch.eye(3).to_sparse()}, tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="__metadata__"):
        save_checkpoint({"__metadata__": weight}, tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="not a Tensor"):
        save_checkpoint({"n": [1, 2]}, tmp_path / "x.safetensors")  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="max_shard_bytes"):
        save_checkpoint({"a": weight}, tmp_path / "f", max_shard_bytes=0)
    assert os.listdir(tmp_path) == []


def test_an_existing_checkpoint_is_kept_unless_overwrite(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    save_checkpoint({"a": torch.zeros(3)}, folder)
    with pytest.raises(CheckpointError, match="exists; pass overwrite=True"):
        save_checkpoint({"a": torch.ones(3)}, folder)
    save_checkpoint({"a": torch.ones(3), "b": torch.ones(2)}, folder, overwrite=True)
    _assert_same(load_checkpoint(folder), {"a": torch.ones(3), "b": torch.ones(2)})
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_a_failed_save_leaves_nothing_under_the_final_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    syncs = []
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        syncs.append(fd)
        if len(syncs) == 2:
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(save_mod.os, "fsync", failing_fsync)
    tensors = _mixed(seed=24, count=30)
    with pytest.raises(OSError, match="Input/output error"):
        save_checkpoint(tensors, tmp_path / "ckpt", max_shard_bytes=20_000, concurrency=1)
    assert os.listdir(tmp_path) == []
    save_checkpoint({"old": torch.zeros(1)}, tmp_path / "keep")
    syncs.clear()
    with pytest.raises(OSError, match="Input/output error"):
        save_checkpoint(tensors, tmp_path / "keep", overwrite=True, max_shard_bytes=20_000)
    assert os.listdir(tmp_path) == ["keep"]
    monkeypatch.undo()
    _assert_same(load_checkpoint(tmp_path / "keep"), {"old": torch.zeros(1)})


_KILLED_CHILD = r"""
import os, signal, sys, torch
import iopipe.checkpoint.save as save_mod
real = save_mod._write_shard
count = [0]
def dying(*args):
    count[0] += 1
    if count[0] == 3:  # two shards written and fsynced, the process dies in the third
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args)
save_mod._write_shard = dying
tensors = {f"w{i}": torch.full((10_000,), float(i)) for i in range(8)}
save_mod.save_checkpoint(tensors, sys.argv[1], max_shard_bytes=80_000, concurrency=1)
"""


def test_a_process_killed_mid_save_leaves_no_checkpoint(tmp_path: Path) -> None:
    final = tmp_path / "ckpt"
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_CHILD, str(final)], capture_output=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not final.exists()
    left = os.listdir(tmp_path)
    assert all(name.startswith(".ckpt.iopipe-") for name in left), left  # hidden, deletable
