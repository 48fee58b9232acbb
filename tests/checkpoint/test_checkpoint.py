"""Tests of iopipe's safetensors checkpoint loading (iopipe/checkpoint/)."""

from __future__ import annotations

import contextlib
import json
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import iopipe
import iopipe.checkpoint.io as ckpt_io
import iopipe.checkpoint.load as checkpoint_mod
from iopipe import CheckpointError, iter_checkpoint, load_checkpoint, load_into
from iopipe.checkpoint.header import DTYPES, read_header
from iopipe.checkpoint.load import _make_loader

HAS_CUDA = torch.cuda.is_available()
ALL_DTYPES = sorted(DTYPES, key=str)
SHAPES = [(), (0,), (3, 0, 2), (1,), (7,), (5, 3), (2, 3, 4)]


def _fds_under(folder: Path) -> list[str]:
    """Files under ``folder`` this process holds open (other fds come and go with libraries)."""
    out = []
    root = str(folder.resolve())  # readlink shows resolved paths (/tmp may be a link)
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith(root):
            out.append(target)
    return out


def _random(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    count = 1
    for d in shape:
        count *= d
    raw = torch.randint(0, 256, (count * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    if dtype == torch.bool:
        raw %= 2
    return raw.view(dtype).reshape(shape)


def _raw(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, ref in want.items():
        assert got[name].dtype == ref.dtype, name
        assert got[name].shape == ref.shape, name
        assert torch.equal(_raw(got[name]), _raw(ref)), name


def _mixed(seed: int = 0, count: int = 40) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(count):
        dtype = DTYPES[ALL_DTYPES[i % len(ALL_DTYPES)]]
        shape = SHAPES[i % len(SHAPES)] if i % 5 else (int(torch.randint(1, 40_000, (1,))),)
        out[f"layer.{i}.w"] = _random(shape, dtype, gen)
    return out


def _write_sharded(folder: Path, tensors: dict[str, torch.Tensor], shards: int = 3) -> Path:
    names = list(tensors)
    weight_map = {}
    for s in range(shards):
        part = {n: tensors[n] for n in names[s::shards]}
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


def _write_raw(path: Path, header: Any, data: bytes = b"", header_len: int | None = None) -> Path:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(body) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", length) + body + data)
    return path


# -- bit-exactness -------------------------------------------------------------------


@pytest.mark.parametrize("dtype_name", ALL_DTYPES)
def test_every_dtype_and_shape_matches_safetensors(tmp_path: Path, dtype_name: str) -> None:
    gen = torch.Generator().manual_seed(len(dtype_name))
    tensors = {f"t{i}": _random(s, DTYPES[dtype_name], gen) for i, s in enumerate(SHAPES)}
    save_file(tensors, tmp_path / "x.safetensors")
    got = load_checkpoint(tmp_path / "x.safetensors")
    _assert_same(got, load_file(tmp_path / "x.safetensors"))


def test_dtype_table_covers_float8_and_unsigned() -> None:
    for name in ("F8_E4M3", "F8_E5M2", "U16", "U32", "U64", "BF16", "BOOL"):
        assert name in DTYPES


@pytest.mark.parametrize(("chunk_bytes", "concurrency"), [(8 << 20, 4), (4096, 3), (1000, 1)])
def test_chunking_and_merging_stay_exact(
    tmp_path: Path, chunk_bytes: int, concurrency: int
) -> None:
    tensors = _mixed()
    save_file(tensors, tmp_path / "m.safetensors")
    got = load_checkpoint(
        tmp_path / "m.safetensors", chunk_bytes=chunk_bytes, concurrency=concurrency
    )
    _assert_same(got, tensors)


def test_sharded_index_file_and_folder(tmp_path: Path) -> None:
    tensors = _mixed(seed=1)
    index = _write_sharded(tmp_path, tensors)
    _assert_same(load_checkpoint(index, chunk_bytes=5000), tensors)
    _assert_same(load_checkpoint(tmp_path), tensors)  # folder: uses its index
    index.unlink()
    _assert_same(load_checkpoint(str(tmp_path)), tensors)  # folder: every shard


def test_result_is_in_file_order(tmp_path: Path) -> None:
    tensors = {"b": torch.ones(3), "a": torch.zeros(2), "c": torch.ones(1)}
    save_file(tensors, tmp_path / "o.safetensors")
    by_offset = sorted(load_file(tmp_path / "o.safetensors"))  # save_file sorts by name
    assert list(load_checkpoint(tmp_path / "o.safetensors")) == by_offset


def test_index_weight_map_is_authoritative(tmp_path: Path) -> None:
    save_file({"keep": torch.ones(2), "extra": torch.zeros(3)}, tmp_path / "s.safetensors")
    (tmp_path / "i.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"keep": "s.safetensors"}})
    )
    assert list(load_checkpoint(tmp_path / "i.safetensors.index.json")) == ["keep"]


def test_dtype_casts_floats_only(tmp_path: Path) -> None:
    tensors = {
        "f": torch.randn(4, 3),
        "h": torch.randn(5).half(),
        "f8": torch.randn(3).to(torch.float8_e4m3fn),
        "i": torch.arange(6, dtype=torch.int32),
        "b": torch.tensor([True, False]),
    }
    save_file(tensors, tmp_path / "c.safetensors")
    got = load_checkpoint(tmp_path / "c.safetensors", dtype=torch.bfloat16)
    assert {k: v.dtype for k, v in got.items()} == {
        "f": torch.bfloat16,
        "h": torch.bfloat16,
        "f8": torch.bfloat16,
        "i": torch.int32,
        "b": torch.bool,
    }
    assert torch.equal(got["f"], tensors["f"].to(torch.bfloat16))
    assert torch.equal(got["i"], tensors["i"])


def test_result_owns_its_memory(tmp_path: Path) -> None:
    tensors = _mixed(seed=2, count=10)
    path = tmp_path / "own.safetensors"
    save_file(tensors, path)
    got = load_checkpoint(path, copy=True)  # cached, but copy=True: owned memory
    assert _fds_under(tmp_path) == []
    assert str(path) not in Path("/proc/self/maps").read_text()
    path.write_bytes(b"\0" * path.stat().st_size)  # clobber the file: the result must not see it
    _assert_same(got, tensors)


# -- direct (O_DIRECT) reads of files not in the page cache ------------------------------


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _unaligned_big(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {"a.norm": _random((3,), torch.float32, gen)}  # shifts what follows off 4 KiB
    for i, dtype in enumerate((torch.bfloat16, torch.float32, torch.uint8, torch.float16)):
        out[f"b{i}.w"] = _random((700_001 + 13 * i,), dtype, gen)  # 0.7-2.8 MB, odd sizes
        out[f"b{i}.bias"] = _random((5,), dtype, gen)
    return out


def test_uncached_file_is_read_directly_and_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ckpt_io, "DIRECT_MIN_FILE_BYTES", 0)
    opened: list[int] = []

    def spy(path: str) -> int:
        opened.append(ckpt_io.open_direct(path))
        return opened[-1]

    monkeypatch.setattr(checkpoint_mod, "open_direct", spy)
    tensors = _unaligned_big(seed=9)
    path = tmp_path / "d.safetensors"
    save_file(tensors, path)
    _evict(path)
    got = load_checkpoint(path, chunk_bytes=1 << 20)
    _assert_same(got, load_file(path))
    assert len(opened) == 1  # the file looked uncached; -1 if the filesystem refuses O_DIRECT
    assert _fds_under(tmp_path) == []
    got["b1.w"].add_(1)  # writable, and the neighbours are untouched
    assert torch.equal(got["b2.w"], tensors["b2.w"])
    assert got["b0.w"].untyped_storage().nbytes() == got["b0.w"].nbytes  # exactly the tensor


def test_cached_file_is_read_buffered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ckpt_io, "DIRECT_MIN_FILE_BYTES", 0)
    path = tmp_path / "c.safetensors"
    save_file(_unaligned_big(seed=10), path)
    header = read_header(str(path))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert not ckpt_io.mostly_uncached(fd, header)  # just written: in the page cache
        _evict(path)
        assert ckpt_io.mostly_uncached(fd, header)
    finally:
        os.close(fd)


def test_the_cache_probe_reads_nothing_and_has_a_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mincore says what is cached without starting readahead; RWF_NOWAIT where refused."""
    monkeypatch.setattr(ckpt_io, "DIRECT_MIN_FILE_BYTES", 0)
    path = tmp_path / "m.safetensors"
    save_file(_unaligned_big(seed=13), path)
    header = read_header(str(path))
    data = header.file_bytes - header.data_start
    fd = os.open(path, os.O_RDONLY)
    try:
        assert ckpt_io.resident_share(fd, header.data_start, data) == 1.0  # just written
        with monkeypatch.context() as mp:
            mp.setattr(ckpt_io, "resident_share", lambda *a: None)
            assert not ckpt_io.mostly_uncached(fd, header)  # the RWF_NOWAIT probe agrees
        _evict(path)
        for _ in range(3):  # asking again does not bring the pages back
            share = ckpt_io.resident_share(fd, header.data_start, data)
            assert share is not None
            assert share < 0.5
    finally:
        os.close(fd)


def test_direct_read_refused_falls_back_to_buffered(tmp_path: Path) -> None:
    path = tmp_path / "raw.bin"
    data = bytes(range(256)) * 64
    path.write_bytes(data)
    direct = ckpt_io.open_direct(str(path))
    if direct < 0:
        pytest.skip("this filesystem refuses O_DIRECT")
    buffered = os.open(path, os.O_RDONLY)
    try:
        out = bytearray(5000)
        # an odd offset and length: O_DIRECT says EINVAL, the buffered fd reads it
        ckpt_io.read_into(direct, [memoryview(out)], 3, 5003, fallback_fd=buffered)
        assert bytes(out) == data[3:5003]
        with pytest.raises(OSError, match="Invalid argument"):
            ckpt_io.read_into(direct, [memoryview(out)], 3, 5003)
    finally:
        os.close(direct)
        os.close(buffered)


# -- streaming -------------------------------------------------------------------------


def test_iter_yields_every_tensor_once(tmp_path: Path) -> None:
    tensors = _mixed(seed=3)
    index = _write_sharded(tmp_path, tensors, shards=2)
    got = dict(iter_checkpoint(index, max_inflight_bytes=50_000, chunk_bytes=7000))
    _assert_same(got, tensors)


def test_iter_keeps_unyielded_bytes_under_budget(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(4)
    tensors = {f"w{i}": _random((1000 + 997 * i,), torch.float32, gen) for i in range(30)}
    tensors["huge"] = _random((100_000,), torch.float32, gen)  # 400 kB, over the budget
    save_file(tensors, tmp_path / "b.safetensors")
    budget = 120_000
    loader = _make_loader(
        tmp_path / "b.safetensors",
        device="cpu",
        dtype=None,
        budget=True,
        max_inflight_bytes=budget,
        concurrency=3,
        chunk_bytes=16_384,
    )
    seen = {}
    for index, tensor in loader.run():
        spec = loader.specs[index]
        # the budget counts the tensor just yielded: one over-size tensor goes alone
        assert loader.pending_bytes + spec.nbytes <= max(budget, spec.nbytes)
        seen[spec.name] = tensor
    _assert_same(seen, tensors)


def test_iter_threads_are_named_and_early_close_cleans_up(tmp_path: Path) -> None:
    save_file(_mixed(seed=5), tmp_path / "e.safetensors")
    stream = iter_checkpoint(tmp_path / "e.safetensors", chunk_bytes=4096, concurrency=2, copy=True)
    next(stream)
    names = {t.name for t in threading.enumerate() if t.name.startswith("iopipe-ckpt")}
    assert names <= {"iopipe-ckpt_0", "iopipe-ckpt_1"}, names
    assert names
    assert _fds_under(tmp_path), os.listdir("/proc/self/fd")  # open while streaming
    stream.close()
    assert _fds_under(tmp_path) == []
    assert not any(t.name.startswith("iopipe-ckpt") for t in threading.enumerate())


def test_consumer_error_midway_releases_everything(tmp_path: Path) -> None:
    save_file(_mixed(seed=8), tmp_path / "f.safetensors")

    def failing() -> None:
        with contextlib.closing(
            iter_checkpoint(tmp_path / "f.safetensors", chunk_bytes=4096, copy=True)
        ) as pairs:
            for _ in pairs:
                raise KeyError("consumer failed")

    with pytest.raises(KeyError, match="consumer failed") as info:
        failing()
    assert _fds_under(tmp_path) == []  # while the traceback still holds the frames
    assert not any(t.name.startswith("iopipe-ckpt") for t in threading.enumerate())
    del info


def test_iter_validates_before_returning(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot open"):
        iter_checkpoint(tmp_path / "nope.safetensors")


# -- corrupt input ------------------------------------------------------------------

GOOD = {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}


@pytest.mark.parametrize(
    ("header", "data", "header_len", "message"),
    [
        (b"", b"", -5, r"truncated file: 3 bytes, too short for the 8-byte header length"),
        (GOOD, b"\0" * 24, 10_000, r"header length 10000 runs past the end of the file"),
        (b"{not json", b"", None, r"x\.safetensors: invalid JSON header"),
        (b"\xff\xfe{}", b"", None, r"invalid JSON header"),
        (b"[1, 2]", b"", None, r"header is not a JSON object \(got list\)"),
        (
            GOOD,
            b"\0" * 20,
            None,
            r"tensor 'w': data_offsets \[0, 24\) run past the end of the data section \(20 bytes\); file truncated\?",
        ),
        (
            {"w": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}},
            b"\0",
            None,
            r"tensor 'w': unknown dtype 'Q7'",
        ),
        (
            {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 24]}},
            b"\0" * 24,
            None,
            r"tensor 'w': shape \[2, 2\] of F32 needs 16 bytes but data_offsets \[0, 24\) hold 24",
        ),
        (
            {
                "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
            },
            b"\0" * 16,
            None,
            r"tensor 'b' overlaps tensor 'a'",
        ),
        (
            {"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}},
            b"\0" * 8,
            None,
            r"data_offsets \[8, 0\) are not an increasing range",
        ),
        (
            {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},
            b"\0" * 4,
            None,
            r"shape must be a list of non-negative integers \(below 2\*\*63, at most 64 of them\), got \[-1\]",
        ),
        (
            {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}},
            b"\0" * 4,
            None,
            r"data_offsets must be \[begin, end\] integers, got \[0\]",
        ),
        ({"w": 3}, b"", None, r"tensor 'w': entry is not a JSON object"),
        ({"__metadata__": {"a": 1}}, b"", None, r"__metadata__ must be an object of strings"),
        (
            b'{"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},'
            b' "w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}',
            b"\0",
            None,
            r"invalid JSON header: duplicate key 'w'",
        ),
    ],
    ids=[
        "truncated",
        "header-past-end",
        "invalid-json",
        "not-utf8",
        "not-object",
        "offsets-out-of-bounds",
        "unknown-dtype",
        "shape-bytes-disagree",
        "overlap",
        "decreasing-offsets",
        "negative-dim",
        "bad-offsets",
        "entry-not-object",
        "bad-metadata",
        "duplicate-name",
    ],
)
def test_corrupt_file_raises_clear_error(
    tmp_path: Path, header: Any, data: bytes, header_len: int | None, message: str
) -> None:
    path = tmp_path / "x.safetensors"
    if header_len == -5:
        path.write_bytes(b"\1\2\3")
    else:
        _write_raw(path, header, data, header_len)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert info.value.path == str(path)
    assert _fds_under(tmp_path) == []


def test_error_names_the_tensor(tmp_path: Path) -> None:
    path = _write_raw(
        tmp_path / "t.safetensors",
        {"enc.w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 4]}},
        b"\0" * 4,
    )
    with pytest.raises(CheckpointError, match=r"enc\.w") as info:
        load_checkpoint(path)
    assert info.value.tensor == "enc.w"


def test_file_truncated_after_headers_were_read(tmp_path: Path) -> None:
    path = tmp_path / "shrink.safetensors"
    save_file({"a": torch.ones(1000), "b": torch.ones(5000)}, path)
    loader = _make_loader(
        path,
        device="cpu",
        dtype=None,
        budget=False,
        max_inflight_bytes=1 << 20,
        concurrency=2,
        chunk_bytes=1 << 20,
    )
    os.truncate(path, path.stat().st_size - 100)
    with pytest.raises(
        CheckpointError,
        match=r"shrink\.safetensors: reading 24000 bytes at offset \d+ \(tensors 'a', 'b'\) "
        r"failed: file ended at byte \d+; truncated while loading\?",
    ):
        list(loader.run())
    assert _fds_under(tmp_path) == []


def test_index_naming_a_missing_shard(tmp_path: Path) -> None:
    index = _write_sharded(tmp_path, {"a": torch.ones(2), "b": torch.ones(3)}, shards=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        CheckpointError,
        match=r"index names shard 'model-00002-of-00002\.safetensors', which does not exist",
    ):
        load_checkpoint(index)


def test_index_naming_a_tensor_missing_from_its_shard(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, tmp_path / "s.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "s.safetensors", "z": "s.safetensors"}}))
    with pytest.raises(
        CheckpointError,
        match=r"tensor 'z' is mapped to shard 's\.safetensors', which has no such tensor",
    ):
        load_checkpoint(index)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{oops", r"invalid JSON in index"),
        ('{"weight_map": [1]}', r"index has no weight_map object"),
        ('{"weight_map": {"a": 3}}', r"index has no weight_map object"),
    ],
)
def test_bad_index(tmp_path: Path, content: str, message: str) -> None:
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(content)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(index)


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no \.safetensors files in folder"):
        load_checkpoint(tmp_path)
    save_file({"a": torch.ones(1)}, tmp_path / "1.safetensors")
    save_file({"a": torch.ones(1)}, tmp_path / "2.safetensors")
    with pytest.raises(CheckpointError, match=r"tensor 'a' is in both .*1\.safetensors and"):
        load_checkpoint(tmp_path)
    for name in ("a", "b"):
        (tmp_path / f"{name}.safetensors.index.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"several index files"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"cannot open .*missing\.safetensors"):
        load_checkpoint(tmp_path / "missing.safetensors")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"concurrency": 0}, ValueError, r"concurrency must be >= 1, got 0"),
        ({"chunk_bytes": 1.5}, TypeError, r"chunk_bytes must be an int, got 1\.5"),
        ({"max_inflight_bytes": -1}, ValueError, r"max_inflight_bytes must be >= 1, got -1"),
        ({"device": "meta"}, ValueError, r"device must hold data, got device='meta'"),
        ({"device": "warp9"}, ValueError, r"device must name a torch device, got 'warp9'"),
        ({"dtype": "float16"}, TypeError, r"dtype must be a torch\.dtype or None"),
    ],
)
def test_argument_validation(
    tmp_path: Path, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    save_file({"a": torch.ones(1)}, tmp_path / "a.safetensors")
    with pytest.raises(error, match=message):
        load_checkpoint(tmp_path / "a.safetensors", **kwargs)


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-CUDA message")
def test_cuda_without_cuda_is_a_clear_error(tmp_path: Path) -> None:
    save_file({"a": torch.ones(1)}, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match=r"device='cuda' but CUDA is not available"):
        load_checkpoint(tmp_path / "a.safetensors", device="cuda")


# -- load_into ----------------------------------------------------------------------


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.block = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU())
        self.norm = nn.BatchNorm1d(32)
        self.head = nn.Linear(32, 50, bias=False)
        self.frozen = nn.Parameter(torch.zeros(3), requires_grad=False)
        self.register_buffer("scratch", torch.zeros(4), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.block(self.embed(x))))


def _trained(tmp_path: Path) -> tuple[TinyNet, Path]:
    torch.manual_seed(0)
    net = TinyNet()
    net.norm.running_mean.uniform_()
    path = tmp_path / "net.safetensors"
    save_file(net.state_dict(), path)
    return net.eval(), path


def test_load_into_meta_module(tmp_path: Path) -> None:
    ref, path = _trained(tmp_path)
    with torch.device("meta"):
        net = TinyNet()
    result = load_into(net, path, max_inflight_bytes=4096)
    assert result == iopipe.LoadResult([], [])
    assert all(p.device.type == "cpu" for p in net.parameters())
    assert not net.frozen.requires_grad
    assert net.head.weight.requires_grad
    assert isinstance(net.head.weight, nn.Parameter)
    assert net.scratch.device.type == "meta"  # non-persistent buffers are not in checkpoints
    net.scratch = torch.zeros(4)
    x = torch.randint(0, 50, (6,))
    assert torch.equal(net.eval()(x), ref(x))


def test_load_into_casts_and_keeps_ties(tmp_path: Path) -> None:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
    net[1].weight = net[0].weight  # tied, saved once as Hugging Face does
    save_file(
        {"0.weight": net[0].weight.detach(), "1.bias": net[1].bias.detach()},
        tmp_path / "tied.safetensors",
    )
    with torch.device("meta"):
        fresh = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
    fresh[1].weight = fresh[0].weight
    assert load_into(fresh, tmp_path / "tied.safetensors", dtype=torch.float64).missing_keys == []
    assert fresh[1].weight is fresh[0].weight
    assert fresh[0].weight.dtype == torch.float64
    assert torch.equal(fresh[0].weight, net[0].weight.double())


def test_load_into_strict_reports_keys_before_loading(tmp_path: Path) -> None:
    _, path = _trained(tmp_path)
    other = nn.Sequential(nn.Linear(16, 32))
    with pytest.raises(
        CheckpointError, match=r"Error\(s\) in loading state_dict for Sequential"
    ) as info:
        load_into(other, path)
    text = str(info.value)
    assert '\n\tMissing key(s) in state_dict: "0.weight", "0.bias"\n\tUnexpected key(s)' in text
    assert '"embed.weight"' in text
    assert other[0].weight.device.type == "cpu"


def test_load_into_not_strict_loads_the_overlap(tmp_path: Path) -> None:
    ref, path = _trained(tmp_path)
    with torch.device("meta"):
        part = nn.ModuleDict({"embed": nn.Embedding(50, 16), "extra": nn.Linear(2, 2)})
    result = load_into(part, path, strict=False)
    assert result.missing_keys == ["extra.weight", "extra.bias"]
    assert "head.weight" in result.unexpected_keys
    assert torch.equal(part["embed"].weight, ref.embed.weight)
    assert part["extra"].weight.device.type == "meta"


def test_load_into_size_mismatch(tmp_path: Path) -> None:
    _, path = _trained(tmp_path)
    with torch.device("meta"):
        net = TinyNet()
    net.head = nn.Linear(32, 51, bias=False, device="meta")
    with pytest.raises(
        CheckpointError,
        match=r"size mismatch for head\.weight: copying a param with shape "
        r"torch\.Size\(\[50, 32\]\) from checkpoint, the shape in current model is "
        r"torch\.Size\(\[51, 32\]\)",
    ):
        load_into(net, path)
    assert net.embed.weight.device.type == "meta"  # nothing assigned


# -- memory bound -------------------------------------------------------------------

# ru_maxrss is inherited from the parent across fork+exec (a big pytest process would
# mask the child's own peak), so the child reads its own high-water mark, VmHWM.
_RSS_CHILD = r"""
import json, sys
import torch
import iopipe

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

mode, path, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(1)
before = status("VmRSS")
if mode == "load":
    out = iopipe.load_checkpoint(path, max_inflight_bytes=budget, copy=True)
    total = sum(t.nbytes for t in out.values())
else:
    pairs = iopipe.iter_checkpoint(path, max_inflight_bytes=budget, copy=True)
    total = sum(t.nbytes for _, t in pairs)
print(json.dumps({"before": before, "peak": status("VmHWM"), "total": total}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["load", "iter"])
def test_peak_rss_is_bounded(tmp_path: Path, mode: str) -> None:
    gen = torch.Generator().manual_seed(6)
    tensors = {f"w{i}": _random((2_500_000 + 1000 * i,), torch.float32, gen) for i in range(20)}
    path = tmp_path / "big.safetensors"
    save_file(tensors, path)
    del tensors
    size = path.stat().st_size  # ~200 MB
    budget = 32 << 20
    out = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, mode, str(path), str(budget)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    report = json.loads(out.stdout)
    assert report["total"] > 190_000_000
    growth = report["peak"] - report["before"]
    slack = 32 << 20  # allocator and interpreter noise
    kept = size if mode == "load" else 0  # iter: the caller drops each tensor
    assert growth <= kept + budget + slack, report


# -- CUDA ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_load_is_bit_exact(tmp_path: Path) -> None:
    tensors = _mixed(seed=7, count=60)
    index = _write_sharded(tmp_path, tensors, shards=2)
    cpu = load_checkpoint(index)
    gpu = load_checkpoint(index, device="cuda", max_inflight_bytes=64 << 10, chunk_bytes=16 << 10)
    assert all(t.device.type == "cuda" for t in gpu.values())
    _assert_same(gpu, cpu)
    streamed = dict(iter_checkpoint(index, device="cuda:0", max_inflight_bytes=40_000))
    _assert_same(streamed, tensors)
    cast = load_checkpoint(index, device="cuda", dtype=torch.float16)
    for name, tensor in cast.items():
        want = gpu[name].to(torch.float16) if gpu[name].is_floating_point() else gpu[name]
        assert torch.equal(_raw(tensor), _raw(want)), name  # casts differ by device: cast alike


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_load_into_meta_module(tmp_path: Path) -> None:
    ref, path = _trained(tmp_path)
    with torch.device("meta"):
        net = TinyNet()
    load_into(net, path, device="cuda")
    net.scratch = torch.zeros(4, device="cuda")
    x = torch.randint(0, 50, (6,))
    assert torch.allclose(net.eval()(x.cuda()).cpu(), ref(x), atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_direct_reads_are_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ckpt_io, "DIRECT_MIN_FILE_BYTES", 0)
    tensors = {**_unaligned_big(seed=11), **_mixed(seed=12, count=30)}
    index = _write_sharded(tmp_path, tensors, shards=2)
    for shard in tmp_path.glob("*.safetensors"):
        _evict(shard)
    # odd chunks in a small ring: every staged read is widened to 4 KiB boundaries
    gpu = load_checkpoint(index, device="cuda", max_inflight_bytes=80_000, chunk_bytes=10_001)
    _assert_same(gpu, tensors)
    assert _fds_under(tmp_path) == []
