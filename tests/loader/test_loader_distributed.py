"""iopipe.DataLoader and Pipeline under torch.distributed: two ranks on gloo over localhost.

Each rank is a fresh Python process that joins a gloo group on 127.0.0.1 (a free
port), loads with the rank and world size taken from the group, and prints what
it got as JSON.  The test checks the shards are equal in length, cover the data
and are disjoint (or overlap only by the padding ``shard="pad"`` adds).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
RANK_TIMEOUT_S = 90.0

RANK_SCRIPT = r"""
import datetime, json, sys
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler, IterableDataset
import iopipe

rank, port = int(sys.argv[1]), int(sys.argv[2])
dist.init_process_group(
    "gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}",
    timeout=datetime.timedelta(seconds=60),
)

class Items(Dataset):
    def __init__(self, n): self.n = n
    def __len__(self): return self.n
    def __getitem__(self, i): return i

class Stream(IterableDataset):
    def __init__(self, n): self.n = n
    def __len__(self): return self.n
    def __iter__(self): return iter(range(self.n))

def ints(loader):
    with loader:
        out = [int(x) for batch in loader for x in batch]
        return {"items": out, "len": len(loader)}

out = {}
for n in (44, 45):
    sampler = DistributedSampler(Items(n), shuffle=True, seed=3)
    sampler.set_epoch(1)
    out[f"sampler-{n}"] = ints(iopipe.DataLoader(Items(n), batch_size=4, sampler=sampler, num_workers=2))
    for shard in ("pad", "drop"):
        out[f"iterable-{shard}-{n}"] = ints(
            iopipe.DataLoader(Stream(n), batch_size=4, num_workers=2, shard=shard)
        )
        with iopipe.Pipeline.from_iterable(list(range(n)), shard=shard, shuffle=True, seed=5) as p:
            out[f"pipeline-{shard}-{n}"] = {"items": list(p), "len": len(p)}
dist.barrier()
dist.destroy_process_group()
print(json.dumps(out))
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    """Run the two ranks; return each rank's JSON output."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, str(rank), str(port)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
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


def _check(ranks: list[dict[str, Any]], key: str, n: int, disjoint: bool) -> None:
    a, b = (r[key]["items"] for r in ranks)
    assert len(a) == len(b) > 0, key
    assert ranks[0][key]["len"] == ranks[1][key]["len"], key
    both = Counter(a) + Counter(b)
    if disjoint:
        assert max(both.values()) == 1, f"{key}: ranks overlap"
    if "drop" not in key:
        assert set(both) == set(range(n)), f"{key}: not covering"
        assert len(a) + len(b) - n == (-n) % 2, f"{key}: more padding than needed"


@pytest.mark.parametrize(
    "kind", ["sampler", "iterable-pad", "iterable-drop", "pipeline-pad", "pipeline-drop"]
)
def test_two_ranks_disjoint_covering_equal(ranks: list[dict[str, Any]], kind: str) -> None:
    _check(ranks, f"{kind}-44", 44, disjoint=True)
    # 45 items: "drop" stays disjoint (and drops one); padding repeats exactly one item.
    _check(ranks, f"{kind}-45", 45, disjoint="drop" in kind)
    if "drop" in kind:
        assert len(ranks[0][f"{kind}-45"]["items"]) == 22


def test_iterable_shard_lengths_match_len(ranks: list[dict[str, Any]]) -> None:
    for r in ranks:
        for shard, per_rank in (("pad", 23), ("drop", 22)):
            got = r[f"iterable-{shard}-45"]
            assert len(got["items"]) == per_rank
            assert got["len"] == -(-per_rank // 4)
