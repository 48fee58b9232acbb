"""Checkpoints over http(s):// (nginx, a flaky server) and s3:// (moto), all on 127.0.0.1."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from iopipe import CheckpointError, iter_checkpoint, load_checkpoint, load_into, save_checkpoint
from tests.checkpoint.test_checkpoint import _assert_same, _mixed

pytest.importorskip("obstore")


def _saved(folder: Path, seed: int = 41) -> dict[str, torch.Tensor]:
    tensors = _mixed(seed=seed, count=30)
    save_checkpoint(tensors, folder, max_shard_bytes=50_000)
    return tensors


def test_a_sharded_checkpoint_over_nginx(nginx: tuple[str, Path]) -> None:
    base, www = nginx
    tensors = _saved(www / "ckpt")
    index = f"{base}/ckpt/model.safetensors.index.json"
    _assert_same(load_checkpoint(index, chunk_bytes=16_384, concurrency=3), tensors)
    _assert_same(load_checkpoint(f"{base}/ckpt/"), tensors)  # the folder: its index
    _assert_same(dict(iter_checkpoint(index, chunk_bytes=4096)), tensors)
    names = [n for n in tensors if n.endswith(("1.w", "7.w"))]
    got = load_checkpoint(index, names=names, rename={"layer.": "L."})
    _assert_same(got, {n.replace("layer.", "L.", 1): tensors[n] for n in names})


def test_one_file_and_a_folder_without_index_over_nginx(nginx: tuple[str, Path]) -> None:
    base, www = nginx
    tensors = {"a": torch.arange(1000.0), "b": torch.ones(3, 4, dtype=torch.bfloat16)}
    save_checkpoint(tensors, www / "one")  # small: one model.safetensors, no index
    _assert_same(load_checkpoint(f"{base}/one/model.safetensors"), tensors)
    _assert_same(load_checkpoint(f"{base}/one/"), tensors)
    got = load_checkpoint(f"{base}/one/model.safetensors", dtype=torch.float16)
    assert got["a"].dtype == torch.float16


def test_a_checkpoint_on_s3(s3: Any, tmp_path: Path) -> None:
    tensors = _saved(tmp_path / "ckpt", seed=42)
    s3.create_bucket(Bucket="weights")
    for name in os.listdir(tmp_path / "ckpt"):
        s3.upload_file(str(tmp_path / "ckpt" / name), "weights", f"runs/7/{name}")
    _assert_same(load_checkpoint("s3://weights/runs/7/model.safetensors.index.json"), tensors)
    _assert_same(load_checkpoint("s3://weights/runs/7/"), tensors)
    with pytest.raises(CheckpointError, match="no such object"):
        load_checkpoint("s3://weights/runs/8/model.safetensors")


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 8)
        self.b = nn.Linear(8, 2)


def test_load_into_from_a_url(nginx: tuple[str, Path]) -> None:
    base, www = nginx
    source = _Net()
    save_checkpoint(source.state_dict(), www / "net.safetensors")
    with torch.device("meta"):
        target = _Net()
    load_into(target, f"{base}/net.safetensors", device="cpu")
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def _serve(flaky: Any, folder: Path) -> None:
    for name in os.listdir(folder):
        flaky.files[f"ckpt/{name}"] = (folder / name).read_bytes()


def test_transient_failures_are_retried(flaky: Any, tmp_path: Path) -> None:
    tensors = _saved(tmp_path / "ckpt", seed=43)
    _serve(flaky, tmp_path / "ckpt")
    flaky.faults[:] = ["500", "reset", "503"]
    _assert_same(load_checkpoint(f"{flaky.url}/ckpt/model.safetensors.index.json"), tensors)
    assert not flaky.faults  # every fault was met and retried past


def test_a_4xx_is_not_retried_and_names_the_object(flaky: Any, tmp_path: Path) -> None:
    _saved(tmp_path / "ckpt", seed=44)
    _serve(flaky, tmp_path / "ckpt")
    flaky.faults[:] = ["403"]
    before = len(flaky.requests)
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json"):
        load_checkpoint(f"{flaky.url}/ckpt/model.safetensors.index.json")
    assert len(flaky.requests) - before == 1


def test_corrupt_and_missing_remote_objects_are_clear_errors(flaky: Any, tmp_path: Path) -> None:
    url = flaky.url
    with pytest.raises(CheckpointError, match="no such object"):
        load_checkpoint(f"{url}/nothing.safetensors")
    with pytest.raises(CheckpointError, match="no such object"):
        load_checkpoint(f"{url}/nothing/model.safetensors.index.json")
    flaky.files["huge.safetensors"] = struct.pack("<Q", 1 << 40) + b"{}"
    with pytest.raises(CheckpointError, match="runs past the end of the file"):
        load_checkpoint(f"{url}/huge.safetensors")
    flaky.files["bad.safetensors"] = struct.pack("<Q", 4) + b"{no}"
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: invalid JSON header"):
        load_checkpoint(f"{url}/bad.safetensors")
    escape = {"weight_map": {"a": "../secret.safetensors"}}
    flaky.files["evil/model.safetensors.index.json"] = json.dumps(escape).encode()
    with pytest.raises(CheckpointError, match="weight_map"):
        load_checkpoint(f"{url}/evil/model.safetensors.index.json")
    with pytest.raises(CheckpointError, match="a remote checkpoint is"):
        load_checkpoint(f"{url}/weights.bin")


def test_a_shard_shorter_than_its_header_says(flaky: Any, tmp_path: Path) -> None:
    save_checkpoint({"a": torch.ones(50_000)}, tmp_path / "t.safetensors")
    raw = (tmp_path / "t.safetensors").read_bytes()
    flaky.files["t.safetensors"] = raw[:-1000]
    with pytest.raises(CheckpointError, match=r"t\.safetensors"):
        load_checkpoint(f"{flaky.url}/t.safetensors")
