"""load_checkpoint(distributed=True): 2 and 4 gloo ranks, each a fresh process.

Every rank loads the same sharded checkpoint, compares what it got with
``safetensors.torch.load_file`` byte for byte, and reports the bytes it read from
the checkpoint's files (``preadv`` for tensor data, ``pread`` for headers), counted
by wrapping those calls in the rank itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from iopipe import load_checkpoint, save_checkpoint
from tests.checkpoint.test_checkpoint import _random

REPO = Path(__file__).resolve().parents[2]
RANK_TIMEOUT_S = 120.0

RANK_SCRIPT = r"""
import datetime, json, os, sys, threading
import torch
import torch.distributed as dist
from safetensors.torch import load_file
import iopipe
from iopipe import CheckpointError

rank, world, store, ckpt, scenario = sys.argv[1:6]
source = sys.argv[6] if len(sys.argv) > 6 else ckpt  # a URL: the ranks read over HTTP
rank, world = int(rank), int(world)
torch.set_num_threads(1)
dist.init_process_group(
    "gloo", rank=rank, world_size=world, init_method=f"file://{store}",
    timeout=datetime.timedelta(seconds=60),
)
counts = {"data": 0, "header": 0}
lock = threading.Lock()
real_preadv, real_pread = os.preadv, os.pread
def preadv(fd, buffers, offset, *rest):
    got = real_preadv(fd, buffers, offset, *rest)
    with lock:
        counts["data"] += got
    return got
import iopipe.checkpoint.dist as dist_mod
real_fetch = dist_mod.fetch_into
def fetch_into(client, url, offset, nbytes, buffers):
    real_fetch(client, url, offset, nbytes, buffers)
    with lock:
        counts["data"] += nbytes
dist_mod.fetch_into = fetch_into
def pread(fd, size, offset):
    got = real_pread(fd, size, offset)
    with lock:
        counts["header"] += len(got)
    return got

def raw(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8)

out = {}
if scenario == "full":
    os.preadv, os.pread = preadv, pread
    got = iopipe.load_checkpoint(source, distributed=True)
    os.preadv, os.pread = real_preadv, real_pread
    want = {}
    for name in sorted(os.listdir(ckpt)):
        if name.endswith(".safetensors"):
            want.update(load_file(os.path.join(ckpt, name)))
    out["same"] = sorted(got) == sorted(want) and all(
        got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
        and torch.equal(raw(got[k]), raw(want[k])) for k in want
    )
    out["total"] = sum(t.nbytes for t in want.values())
    out.update(counts)
    # What a distributed load returns saves again (views of one buffer, none overlapping).
    if rank == 0:
        again = os.path.join(os.path.dirname(store), "again")
        iopipe.save_checkpoint(got, again, max_shard_bytes=200_000)
        back = iopipe.load_checkpoint(again, copy=True)
        out["resaved"] = all(torch.equal(raw(back[k]), raw(want[k])) for k in want)
    counts["data"] = 0
    os.preadv = preadv
    sub = iopipe.load_checkpoint(source, distributed=True, names="*.bias", rename={"layer": "L"})
    os.preadv = real_preadv
    out["subset_names"] = sorted(sub)
    out["subset_data"] = counts["data"]
    out["subset_same"] = all(torch.equal(raw(sub[k.replace("layer", "L", 1)]), raw(want[k]))
                             for k in want if k.endswith(".bias"))
else:
    # A rank whose plan fails, then ranks that plan different checkpoints: every rank
    # raises, none waits for the others.
    for case, names in (("plan", ["nope"] if rank == 1 else None),
                        ("differ", "*.bias" if rank == 1 else None)):
        try:
            iopipe.load_checkpoint(ckpt, distributed=True, names=names)
            out[case] = "loaded"
        except CheckpointError as exc:
            out[case] = str(exc)
dist.barrier()
dist.destroy_process_group()
print(json.dumps(out))
"""


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(31)
    tensors: dict[str, torch.Tensor] = {}
    for i in range(12):
        dtype = (torch.float32, torch.bfloat16, torch.int64, torch.float16)[i % 4]
        tensors[f"layer{i}.weight"] = _random((3000 + 101 * i, 7), dtype, gen)
        tensors[f"layer{i}.bias"] = _random((13 + i,), dtype, gen)
    tensors["big"] = _random((400_000,), torch.float32, gen)  # larger than a rank's share
    tensors["none"] = torch.empty(0, 4)
    return tensors


def _run(
    tmp_path: Path, world: int, scenario: str, serve: tuple[str, Path] | None = None
) -> list[dict[str, Any]]:
    ckpt = tmp_path / "ckpt"
    save_checkpoint(_tensors(), ckpt, max_shard_bytes=300_000)
    source: list[str] = []
    if serve is not None:  # the same files, served by nginx
        base, www = serve
        shutil.copytree(ckpt, www / tmp_path.name)
        source = [f"{base}/{tmp_path.name}/model.safetensors.index.json"]
    store = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = [str(world), str(store), str(ckpt), scenario, *source]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, str(rank), *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(world)
    ]
    outputs = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=RANK_TIMEOUT_S)
            assert p.returncode == 0, f"rank failed (exit {p.returncode}):\n{stderr[-3000:]}"
            outputs.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return outputs


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_reads_its_share_and_all_get_every_byte(tmp_path: Path, world: int) -> None:
    ranks = _run(tmp_path, world, "full")
    total = ranks[0]["total"]
    for rank, out in enumerate(ranks):
        assert out["same"], f"rank {rank} differs from safetensors"
        assert out["data"] <= total / world * 1.1, (rank, out["data"], total)
        assert out["header"] < 64 * 1024  # headers and index only
        assert out["subset_names"] == sorted(f"L{i}.bias" for i in range(12))
        assert out["subset_same"]
    assert sum(out["data"] for out in ranks) == total  # disjoint shares, nothing missed
    assert ranks[0]["resaved"]
    biases = sum(t.nbytes for name, t in _tensors().items() if name.endswith(".bias"))
    assert sum(out["subset_data"] for out in ranks) == biases  # only the subset's bytes


@pytest.mark.slow
def test_ranks_read_their_shares_over_http(tmp_path: Path, nginx: tuple[str, Path]) -> None:
    pytest.importorskip("obstore")
    ranks = _run(tmp_path, 2, "full", serve=nginx)
    total = ranks[0]["total"]
    for out in ranks:
        assert out["same"]
        assert out["data"] <= total / 2 * 1.1
        assert out["subset_same"]
    assert sum(out["data"] for out in ranks) == total


@pytest.mark.slow
def test_a_failure_on_one_rank_is_raised_on_every_rank(tmp_path: Path) -> None:
    ranks = _run(tmp_path, 2, "fail")
    assert "not in the checkpoint: 'nope'" in ranks[1]["plan"]
    assert "rank 1 failed to plan the checkpoint" in ranks[0]["plan"]
    assert "'nope'" in ranks[0]["plan"]
    for out in ranks:
        assert "the ranks planned different checkpoints" in out["differ"]


def test_distributed_needs_an_initialised_group(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    save_checkpoint({"a": torch.ones(2)}, path)
    with pytest.raises(ValueError, match="init_process_group"):
        load_checkpoint(path, distributed=True)
