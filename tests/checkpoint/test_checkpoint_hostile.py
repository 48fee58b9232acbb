"""Hostile checkpoint folders: every one is a CheckpointError naming the file or entry.

Indexes are often downloaded alone: one that points outside its folder, is a
FIFO or /dev/zero, nests without end or repeats a name must never be read
without bound, hang, open a file elsewhere or load the wrong tensor.

Tests that would hang on a regression carry a short ``timeout`` mark (a FIFO
blocks ``open()``, which the alarm interrupts); one that would read
``/dev/zero`` for ever runs in a child process with a memory limit.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from iopipe import CheckpointError, iter_checkpoint, load_checkpoint, load_into

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


def _load_in_child(path: Path) -> str:
    """``load_checkpoint(path)`` in a child limited to 4 GiB: what it raised, or 'loaded'."""
    code = textwrap.dedent(
        f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
        from iopipe import load_checkpoint
        try:
            load_checkpoint({str(path)!r})
            print("loaded")
        except BaseException as exc:
            print(type(exc).__name__, exc)
        """
    )
    child = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    return child.stdout.strip() or child.stderr.strip()[-500:]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("given", ["folder", "index"])
def test_an_index_linked_to_dev_zero(tmp_path: Path, given: str) -> None:
    root = _folder(tmp_path)
    os.symlink("/dev/zero", root / INDEX)  # reading it would never end
    said = _load_in_child(root if given == "folder" else root / INDEX)
    assert said.startswith("CheckpointError"), said
    assert INDEX in said
    assert "character device, not a regular file" in said


@pytest.mark.timeout(10)
@pytest.mark.parametrize("given", ["folder", "index"])
def test_an_index_that_is_a_fifo(tmp_path: Path, given: str) -> None:
    root = _folder(tmp_path)
    os.mkfifo(root / INDEX)  # reading it would wait for a writer for ever
    with pytest.raises(CheckpointError, match=r"index\.json: a FIFO, not a regular file") as info:
        load_checkpoint(root if given == "folder" else root / INDEX)
    assert info.value.path == str(root / INDEX)


def test_an_index_larger_than_the_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import iopipe.checkpoint.header as header_mod

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
    with pytest.raises(
        CheckpointError, match=r"plain relative file name|expected a file name"
    ) as info:
        load_checkpoint(root)
    assert INDEX in str(info.value)
    assert "weight_map['a']" in str(info.value)
    assert info.value.tensor == "a"


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


@pytest.mark.timeout(10)
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
    with pytest.raises(CheckpointError, match="nested too deeply") as info:
        load_checkpoint(path)
    assert ("deep.safetensors" if where == "header" else INDEX) in str(info.value)


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}, "unknown dtype"),
        ({"dtype": {"a": 1}, "shape": [1], "data_offsets": [0, 4]}, "unknown dtype"),
        ({"dtype": "F32", "shape": [0, 2**63], "data_offsets": [0, 0]}, "shape must be"),
        ({"dtype": "F32", "shape": [1] * 65, "data_offsets": [0, 4]}, "shape must be"),
        ({"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}, "shape must be"),
        # No elements, so no bytes, but torch's size arithmetic overflows int64.
        ({"dtype": "F32", "shape": [0, 2**63 - 1], "data_offsets": [0, 0]}, "too large"),
        ({"dtype": "F32", "shape": [2**62, 2**62, 0], "data_offsets": [0, 0]}, "too large"),
        ({"dtype": "F32", "shape": [0, 2**40, 2**40], "data_offsets": [0, 0]}, "too large"),
        ({"dtype": "F64", "shape": [2**61, 0], "data_offsets": [0, 0]}, "too large"),
    ],
)
def test_bad_header_entries(tmp_path: Path, entry: dict[str, Any], match: str) -> None:
    path = _raw(tmp_path / "bad.safetensors", json.dumps({"t": entry}).encode(), b"\0" * 4)
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(path)
    assert "'t'" in str(info.value)


def test_a_large_empty_tensor_still_loads(tmp_path: Path) -> None:
    entry = {"dtype": "F32", "shape": [0, 2**40], "data_offsets": [0, 0]}
    path = _raw(tmp_path / "empty.safetensors", json.dumps({"t": entry}).encode())
    assert load_checkpoint(path)["t"].shape == (0, 2**40)


@pytest.mark.parametrize("field", ["dtype", "shape", "data_offsets"])
def test_messages_about_huge_values_stay_short(tmp_path: Path, field: str) -> None:
    """A 100 MB header may hold a list of millions: the message shows a few of them."""
    entry: dict[str, Any] = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    entry[field] = list(range(1_000_000))
    path = _raw(tmp_path / "huge.safetensors", json.dumps({"t": entry}).encode(), b"\0" * 4)
    with pytest.raises(CheckpointError, match=field) as info:
        load_checkpoint(path)
    assert len(str(info.value)) < 1000
    assert "huge.safetensors" in str(info.value)
    assert "'t'" in str(info.value)


def test_a_duplicate_name_in_a_header(tmp_path: Path) -> None:
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    header = f'{{"t": {entry}, "t": {entry}}}'.encode()
    path = _raw(tmp_path / "dup.safetensors", header, b"\0" * 4)
    with pytest.raises(CheckpointError, match=r"dup\.safetensors: .*duplicate key 't'"):
        load_checkpoint(path)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "folder"])
def test_a_shard_the_index_names_must_be_a_regular_file(tmp_path: Path, kind: str) -> None:
    root = _folder(tmp_path)
    shard = root / "odd.safetensors"
    if kind == "fifo":
        os.mkfifo(shard)
    elif kind == "folder":
        shard.mkdir()
    else:
        os.symlink(kind, shard)
    _index(root, {"a": "shard.safetensors", "b": "odd.safetensors"})
    why = "Is a directory" if kind == "folder" else "not a regular file"
    with pytest.raises(CheckpointError, match=f"odd\\.safetensors: .*{why}") as info:
        load_checkpoint(root)
    assert info.value.path == str(shard)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("kind", ["fifo", "/dev/zero"])
def test_an_odd_file_beside_the_shards_of_a_folder_is_refused(tmp_path: Path, kind: str) -> None:
    """Without an index every ``*.safetensors`` is a shard: skipping one loads a part."""
    root = _folder(tmp_path)
    odd = root / "more.safetensors"
    if kind == "fifo":
        os.mkfifo(odd)
    else:
        os.symlink(kind, odd)
    with pytest.raises(CheckpointError, match=r"more\.safetensors: .*not a regular file"):
        load_checkpoint(root)


def test_an_index_naming_a_shard_with_an_overlong_name(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    _index(root, {"a": "x" * 5000})
    with pytest.raises(CheckpointError, match="cannot open shard 'xxx") as info:
        load_checkpoint(root)
    assert INDEX in str(info.value)
    assert len(str(info.value)) < 1000


def test_a_duplicate_key_anywhere_in_the_index(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    (root / INDEX).write_text(
        '{"weight_map": {"a": "shard.safetensors"}, "weight_map": {"a": "other.safetensors"}}'
    )
    with pytest.raises(CheckpointError, match="duplicate key 'weight_map'"):
        load_checkpoint(root)


@pytest.mark.timeout(10)
def test_load_into_and_iter_checkpoint_refuse_hostile_folders(tmp_path: Path) -> None:
    """Both check every header when called, before any tensor is read or assigned."""
    root = _folder(tmp_path)
    os.mkfifo(root / "more.safetensors")
    module = torch.nn.Linear(2, 2)
    weight = module.weight
    with pytest.raises(CheckpointError, match="FIFO"):
        load_into(module, root)
    assert module.weight is weight
    with pytest.raises(CheckpointError, match="FIFO"):
        iter_checkpoint(root)
    _index(root, {"a": "../shard.safetensors"})
    with pytest.raises(CheckpointError, match="plain relative file name"):
        load_into(module, root, strict=False)
