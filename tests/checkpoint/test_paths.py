"""Checkpoints v2 on one process: the path picked per shard, subsets, renames, dtypes."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from iopipe import CheckpointError, iter_checkpoint, load_checkpoint, load_into
from iopipe.checkpoint.header import read_header
from iopipe.checkpoint.mapped import is_cached
from tests.checkpoint.test_checkpoint import (
    _assert_same,
    _evict,
    _fds_under,
    _mixed,
    _random,
    _raw,
)


def _mapped(path: Path) -> bool:
    return str(path.resolve()) in Path("/proc/self/maps").read_text()


class _Reads:
    """Bytes this process reads with ``preadv`` (tensor data) and ``pread`` (headers)."""

    def __init__(self) -> None:
        self.data = 0
        self.header = 0
        self.lock = threading.Lock()


@contextlib.contextmanager
def _counting(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Reads]:
    reads = _Reads()
    preadv, pread = os.preadv, os.pread

    def counted_preadv(fd: int, buffers: object, offset: int, *rest: int) -> int:
        got = preadv(fd, buffers, offset, *rest)  # type: ignore[arg-type]
        with reads.lock:
            reads.data += got
        return got

    def counted_pread(fd: int, size: int, offset: int) -> bytes:
        got = pread(fd, size, offset)
        with reads.lock:
            reads.header += len(got)
        return got

    with monkeypatch.context() as patch:
        patch.setattr(os, "preadv", counted_preadv)
        patch.setattr(os, "pread", counted_pread)
        yield reads


# -- the mapped path ---------------------------------------------------------------------


def test_a_cached_shard_is_mapped_copy_on_write(tmp_path: Path) -> None:
    tensors = _mixed(seed=11)
    path = tmp_path / "m.safetensors"
    save_file(tensors, path)
    assert is_cached(read_header(str(path)))
    got = load_checkpoint(path)
    _assert_same(got, tensors)
    assert _mapped(path)
    assert _fds_under(tmp_path) == []  # the mapping holds no file descriptor
    # Writing a loaded tensor writes a private copy of its pages, never the file.
    biggest = max((t for t in got.values() if t.dtype != torch.bool), key=lambda t: t.nbytes)
    assert biggest.nbytes > 10_000
    biggest.view(-1).view(torch.uint8).fill_(7)
    assert int(biggest.view(-1).view(torch.uint8)[-1]) == 7
    _assert_same(load_file(path), tensors)
    del got, biggest
    assert not _mapped(path)  # the mapping goes with its last tensor


def test_copy_true_reads_owned_memory(tmp_path: Path) -> None:
    tensors = _mixed(seed=12)
    path = tmp_path / "c.safetensors"
    save_file(tensors, path)
    got = load_checkpoint(path, copy=True)
    assert not _mapped(path)
    path.write_bytes(b"\0" * path.stat().st_size)
    _assert_same(got, tensors)


def test_an_uncached_shard_is_read_not_mapped(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(13)
    tensors = {f"w{i}": _random((600_000,), torch.float32, gen) for i in range(4)}
    path = tmp_path / "cold.safetensors"
    save_file(tensors, path)
    _evict(path)
    if is_cached(read_header(str(path))):
        pytest.skip("the page cache kept the file (eviction refused here)")
    got = load_checkpoint(path)
    assert not _mapped(path)
    _assert_same(got, tensors)


def test_mapped_tensors_cast_to_dtype(tmp_path: Path) -> None:
    tensors = {"f": torch.randn(50, 3), "i": torch.arange(9, dtype=torch.int16)}
    path = tmp_path / "d.safetensors"
    save_file(tensors, path)
    got = load_checkpoint(path, dtype=torch.float16)
    assert got["f"].dtype == torch.float16
    assert got["i"].dtype == torch.int16
    assert torch.equal(got["f"], tensors["f"].half())
    assert torch.equal(got["i"], tensors["i"])


def test_iter_yields_mapped_and_read_shards(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(14)
    warm = {f"a{i}": _random((1000,), torch.float32, gen) for i in range(3)}
    cold = {f"b{i}": _random((500_000,), torch.bfloat16, gen) for i in range(70)}
    save_file(warm, tmp_path / "1.safetensors")
    save_file(cold, tmp_path / "2.safetensors")
    _evict(tmp_path / "2.safetensors")
    got = dict(iter_checkpoint(tmp_path, max_inflight_bytes=4 << 20))
    _assert_same(got, {**warm, **cold})


_ANON_CHILD = r"""
import sys, torch, iopipe
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
torch.set_num_threads(1)
before = anon()
out = iopipe.load_checkpoint(sys.argv[1])
total = 0
for t in out.values():
    total += int(t.view(-1)[:: max(1, 4096 // t.itemsize)].float().sum().item() != 0.5)
print(anon() - before)
"""


@pytest.mark.slow
def test_a_mapped_load_costs_no_anonymous_memory(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(15)
    path = tmp_path / "big.safetensors"
    save_file({f"w{i}": _random((2_500_000,), torch.float32, gen) for i in range(10)}, path)
    out = subprocess.run(
        [sys.executable, "-c", _ANON_CHILD, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    growth = int(out.stdout.split()[-1])
    assert growth < 24 << 20, growth  # 100 MB loaded and every page touched


def test_a_file_that_changed_size_is_refused(tmp_path: Path) -> None:
    from iopipe.checkpoint.mapped import map_shard

    path = tmp_path / "s.safetensors"
    save_file({"a": torch.ones(100)}, path)
    header = read_header(str(path))
    with path.open("ab") as f:
        f.write(b"x" * 10)
    with pytest.raises(CheckpointError, match="changed while loading"):
        map_shard(header)


# -- subsets -------------------------------------------------------------------------------


def _layers(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(16)
    tensors = {}
    for layer in range(6):
        tensors[f"model.layers.{layer}.w"] = _random((20_000 + layer,), torch.float32, gen)
        tensors[f"model.layers.{layer}.b"] = _random((31,), torch.bfloat16, gen)
    tensors["lm_head.w"] = _random((5000,), torch.float16, gen)
    path = tmp_path / "layers.safetensors"
    save_file(tensors, path)
    return path, tensors


@pytest.mark.parametrize(
    "names",
    [
        ["model.layers.2.w", "lm_head.w"],
        "model.layers.[13].*",
        lambda n: n.endswith(".b"),
    ],
    ids=["list", "glob", "callable"],
)
def test_a_subset_reads_only_its_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, names: object
) -> None:
    path, tensors = _layers(tmp_path)
    import fnmatch

    if isinstance(names, list):
        want = {n: tensors[n] for n in names}
    elif isinstance(names, str):
        want = {n: t for n, t in tensors.items() if fnmatch.fnmatchcase(n, names)}
    else:
        want = {n: t for n, t in tensors.items() if names(n)}  # type: ignore[operator]
    with _counting(monkeypatch) as reads:
        got = load_checkpoint(path, names=names, copy=True)  # type: ignore[arg-type]
    _assert_same(got, want)
    assert reads.data == sum(t.nbytes for t in want.values())
    assert reads.data < sum(t.nbytes for t in tensors.values()) / 2


def test_a_mapped_subset_touches_only_its_pages(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(17)
    tensors = {f"w{i}": _random((1 << 20,), torch.uint8, gen) for i in range(8)}
    path = tmp_path / "pages.safetensors"
    save_file(tensors, path)
    before = _rss_file_kb()
    got = load_checkpoint(path, names=["w3"])
    _assert_same(got, {"w3": tensors["w3"]})
    assert _mapped(path)
    assert _rss_file_kb() - before < 3 * 1024  # ~1 MiB mapped of the 8 MiB file


def _rss_file_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


def test_subset_errors_name_what_is_missing(tmp_path: Path) -> None:
    path, _ = _layers(tmp_path)
    with pytest.raises(CheckpointError, match=r"not in the checkpoint: 'nope'") as info:
        load_checkpoint(path, names=["model.layers.0.w", "nope"])
    assert info.value.tensor == "nope"
    with pytest.raises(CheckpointError, match="selects no tensor"):
        load_checkpoint(path, names="encoder.*")
    with pytest.raises(TypeError, match="names"):
        load_checkpoint(path, names=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="every entry must be a str"):
        load_checkpoint(path, names=["model.layers.0.w", 4])  # type: ignore[list-item]


# -- renames -------------------------------------------------------------------------------


def test_rename_by_prefix_map_and_callable(tmp_path: Path) -> None:
    path, tensors = _layers(tmp_path)
    got = load_checkpoint(path, rename={"model.": "", "model.layers.0.": "first."})
    assert {"first.w", "layers.1.w", "lm_head.w"} <= set(got)
    assert torch.equal(_raw(got["first.w"]), _raw(tensors["model.layers.0.w"]))
    upper = load_checkpoint(path, rename=str.upper, names="lm_head.*")
    assert list(upper) == ["LM_HEAD.W"]


def test_rename_collisions_and_bad_names_are_refused_before_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = _layers(tmp_path)
    with (
        _counting(monkeypatch) as reads,
        pytest.raises(CheckpointError, match=r"rename maps both 'model\.layers\.0\.w' and"),
    ):
        load_checkpoint(path, rename=lambda n: n.rsplit(".", 1)[0])
    assert reads.data == 0
    with pytest.raises(CheckpointError, match="returned 3, not a str"):
        load_checkpoint(path, rename=lambda n: 3)  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match="rename"):
        load_checkpoint(path, rename=[("a", "b")])  # type: ignore[arg-type]


# -- load_into: per-parameter dtypes, renames ---------------------------------------------


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 4)
        self.norm = nn.LayerNorm(4)
        self.register_buffer("steps", torch.zeros(3, dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


def test_load_into_keeps_each_parameters_dtype(tmp_path: Path) -> None:
    source = _Net()
    source.steps += 5
    state = {f"model.{k}": v.to(torch.bfloat16) if v.is_floating_point() else v
             for k, v in source.state_dict().items()}  # fmt: skip
    path = tmp_path / "bf16.safetensors"
    save_file(state, path)
    target = _Net()
    target.proj.half()  # the projection in float16, the norm stays float32
    load_into(target, path, dtype="module", rename={"model.": ""})
    assert target.proj.weight.dtype == torch.float16
    assert target.norm.weight.dtype == torch.float32
    assert target.steps.dtype == torch.int64
    assert target.steps.tolist() == [5, 5, 5]
    want = state["model.norm.weight"].float()
    assert torch.equal(target.norm.weight.detach(), want)
    assert isinstance(target.proj.weight, nn.Parameter)
    assert target.proj.weight.requires_grad


def test_load_into_rejects_an_unknown_dtype_word(tmp_path: Path) -> None:
    path = tmp_path / "n.safetensors"
    save_file(_Net().state_dict(), path)
    with pytest.raises(ValueError, match="'module'"):
        load_into(_Net(), path, dtype="modul")  # type: ignore[arg-type]


def test_training_a_mapped_module_never_writes_the_file(tmp_path: Path) -> None:
    net = _Net()
    path = tmp_path / "train.safetensors"
    save_file(net.state_dict(), path)
    before = path.read_bytes()
    target = _Net()
    load_into(target, path)
    assert _mapped(path)
    opt = torch.optim.SGD(target.parameters(), lr=0.5)
    (target(torch.randn(2, 8)) * torch.arange(4.0)).sum().backward()
    opt.step()
    assert not torch.equal(target.proj.weight.detach(), net.proj.weight.detach())
    assert path.read_bytes() == before
