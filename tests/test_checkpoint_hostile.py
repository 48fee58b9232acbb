"""Hostile checkpoint folders: every one is a CheckpointError naming the file or entry.

Indexes are often downloaded alone: one that points outside its folder, is a
FIFO or /dev/zero, nests without end or repeats a name must never be read
without bound, hang, open a file elsewhere or load the wrong tensor.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from iopipe import CheckpointError, load_checkpoint

INDEX = "model.safetensors.index.json"


def _folder(tmp_path: Path) -> Path:
    root = tmp_path / "ckpt"
    root.mkdir()
    save_file({"a": torch.ones(4), "b": torch.zeros(2)}, str(root / "shard.safetensors"))
    return root


def _index(root: Path, weight_map: Any) -> None:
    (root / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _raw(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def test_a_plain_index_loads(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    _index(root, {"a": "shard.safetensors", "b": "shard.safetensors"})
    assert sorted(load_checkpoint(root)) == ["a", "b"]


@pytest.mark.parametrize("target", ["/dev/zero", "fifo"])
def test_an_index_that_is_not_a_regular_file(tmp_path: Path, target: str) -> None:
    root = _folder(tmp_path)
    if target == "fifo":
        os.mkfifo(root / INDEX)  # reading it would wait for a writer for ever
    else:
        os.symlink(target, root / INDEX)  # reading it would never end
    with pytest.raises(CheckpointError, match="regular file"):
        load_checkpoint(root)


def test_an_index_larger_than_the_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import iopipe.formats._st_header as header_mod

    monkeypatch.setattr(header_mod, "MAX_INDEX_BYTES", 64)
    root = _folder(tmp_path)
    _index(root, {"a": "shard.safetensors", "b": "shard.safetensors"})
    with pytest.raises(CheckpointError, match="more than the 64"):
        load_checkpoint(root)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "a/../../x", ""])
def test_an_index_may_not_name_files_outside_its_folder(tmp_path: Path, shard: str) -> None:
    root = _folder(tmp_path)
    save_file({"a": torch.ones(1)}, str(tmp_path / "outside.safetensors"))
    _index(root, {"a": shard})
    with pytest.raises(CheckpointError, match=r"plain relative file name|expected a file name"):
        load_checkpoint(root)


def test_a_symlink_inside_the_folder_is_followed(tmp_path: Path) -> None:
    """A Hugging Face cache links its snapshot files to blobs outside the folder."""
    root = _folder(tmp_path)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    save_file({"c": torch.ones(3)}, str(blobs / "abc"))
    os.symlink(blobs / "abc", root / "linked.safetensors")
    _index(root, {"c": "linked.safetensors"})
    assert torch.equal(load_checkpoint(root)["c"], torch.ones(3))


def test_a_duplicate_name_in_the_weight_map(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    save_file({"a": torch.full((4,), 7.0)}, str(root / "other.safetensors"))
    (root / INDEX).write_text(
        '{"weight_map": {"a": "shard.safetensors", "a": "other.safetensors"}}'
    )
    with pytest.raises(CheckpointError, match="duplicate key 'a'"):
        load_checkpoint(root)


def test_a_fifo_shard(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    root.mkdir()
    os.mkfifo(root / "model.safetensors")
    with pytest.raises(CheckpointError, match="FIFO"):
        load_checkpoint(root / "model.safetensors")


@pytest.mark.parametrize("where", ["header", "index"])
def test_deeply_nested_json(tmp_path: Path, where: str) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    root = _folder(tmp_path)
    if where == "header":
        path = _raw(root / "deep.safetensors", b'{"x": ' + deep + b"}")
    else:
        (root / INDEX).write_bytes(b'{"weight_map": {"a": ' + deep + b"}}")
        path = root
    with pytest.raises(CheckpointError, match="nested too deeply"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}, "unknown dtype"),
        ({"dtype": {"a": 1}, "shape": [1], "data_offsets": [0, 4]}, "unknown dtype"),
        ({"dtype": "F32", "shape": [0, 2**63], "data_offsets": [0, 0]}, "shape must be"),
        ({"dtype": "F32", "shape": [1] * 65, "data_offsets": [0, 4]}, "shape must be"),
    ],
)
def test_bad_header_entries(tmp_path: Path, entry: dict[str, Any], match: str) -> None:
    path = _raw(tmp_path / "bad.safetensors", json.dumps({"t": entry}).encode(), b"\0" * 4)
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(path)
    assert "'t'" in str(info.value)
