"""GPU check: load a generated ~1 GB checkpoint to CPU and to CUDA, compare, print GB/s.

Exits non-zero if the CUDA result differs from the CPU result (bit for bit), if either
differs from ``safetensors.torch.load_file``, or if CUDA is missing.

Usage: ``python bench/gpu_check_checkpoint.py [--data DIR] [--gb 1.0] [--sweep 4 16]``.
Warm loads (the files were just written) and cold ones (``os.sync()`` and
``POSIX_FADV_DONTNEED`` before each) run ``--repeats`` times; the best time is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

import iopipe


def generate(folder: Path, gb: float) -> Path:
    gen = torch.Generator().manual_seed(0)
    per_shard = int(gb * 1e9 / 2)
    weight_map = {}
    for s in (1, 2):
        tensors: dict[str, torch.Tensor] = {}
        size, i = 0, 0
        while size < per_shard:
            rows = (4096, 11008, 128, 1)[i % 4]
            dtype = torch.bfloat16 if i % 3 else torch.float32
            t = torch.randn(rows, 4096, generator=gen).to(dtype)
            tensors[f"s{s}.t{i}"] = t
            size += t.nbytes
            i += 1
        tensors[f"s{s}.scalar"] = torch.tensor(1.5)
        tensors[f"s{s}.empty"] = torch.empty(0, 3, dtype=torch.int64)
        tensors[f"s{s}.f8"] = torch.randn(1000, generator=gen).to(torch.float8_e4m3fn)
        name = f"model-0000{s}-of-00002.safetensors"
        save_file(tensors, folder / name)
        weight_map.update(dict.fromkeys(tensors, name))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    return index


def evict(folder: Path) -> None:
    """Drop the shards from the page cache (cold reads)."""
    os.sync()
    for shard in folder.glob("*.safetensors"):
        fd = os.open(shard, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn: Callable[[], Any], repeats: int, cold: Path | None = None) -> tuple[Any, float]:
    """Best time of ``repeats`` calls; with ``cold``, evict that folder before each."""
    best, out = float("inf"), None
    for _ in range(repeats):
        out = None
        if cold is not None:
            evict(cold)
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return out, best


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().reshape(-1).view(torch.uint8)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names whose tensors differ in dtype, shape or any byte (or are missing in ``b``)."""
    bad = [k for k in a if k not in b]
    for k in a.keys() & b.keys():
        x, y = a[k], b[k]
        if (x.dtype, x.shape) != (y.dtype, y.shape) or not torch.equal(_raw(x), _raw(y)):
            bad.append(k)
    return bad


def v2_checks(folder: Path, index: Path, ref: dict[str, torch.Tensor]) -> list[str]:
    """Checkpoints v2 on CUDA: a subset, a save from CUDA tensors, a one-rank NCCL load."""
    import torch.distributed as dist

    bad = []
    names = [n for n in ref if n.endswith("1")][:5] or list(ref)[:3]
    subset = iopipe.load_checkpoint(index, device="cuda", names=names)
    bad += same({n: ref[n] for n in names}, subset)
    on_gpu = iopipe.load_checkpoint(index, device="cuda")
    saved = folder / "resaved"
    iopipe.save_checkpoint(on_gpu, saved, max_shard_bytes=256 << 20)
    bad += same(ref, iopipe.load_checkpoint(saved, copy=True))
    print(f"subset cuda, save from cuda: {'ok' if not bad else 'MISMATCH'}")
    if dist.is_available() and dist.is_nccl_available():
        store = folder / "nccl-store"
        dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1)
        try:
            shared = iopipe.load_checkpoint(index, device="cuda", distributed=True)
        finally:
            dist.destroy_process_group()
        wrong = same(ref, shared)
        print(f"distributed=True on one NCCL rank: {'ok' if not wrong else 'MISMATCH'}")
        bad += wrong
    return bad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, help="folder for the checkpoint (default: temp)")
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--sweep", type=int, nargs="*", default=[], help="also time these concurrency values"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.data or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        index = generate(folder, args.gb)
        total = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        print(f"{torch.cuda.get_device_name()}; checkpoint {total / 1e9:.2f} GB, 2 shards")
        ref: dict[str, torch.Tensor] = {}
        for shard in sorted(folder.glob("*.safetensors")):
            # owned copies: a live mapping would keep pages cached through the evictions
            ref.update({k: v.clone() for k, v in load_file(shard).items()})
        torch.zeros(1, device="cuda")  # CUDA context outside the timings
        cpu, t_cpu = timed(lambda: iopipe.load_checkpoint(index), args.repeats)
        gpu, t_gpu = timed(lambda: iopipe.load_checkpoint(index, device="cuda"), args.repeats)
        _, t_st = timed(
            lambda: {
                k: v
                for s in sorted(folder.glob("*.safetensors"))
                for k, v in load_file(s, device="cuda").items()
            },
            args.repeats,
        )
        streamed = dict(iopipe.iter_checkpoint(index, device="cuda", max_inflight_bytes=64 << 20))
        print(f"warm iopipe cpu : {total / t_cpu / 1e9:6.2f} GB/s")
        print(f"warm iopipe cuda: {total / t_gpu / 1e9:6.2f} GB/s")
        print(f"warm safetensors cuda: {total / t_st / 1e9:6.2f} GB/s (reference)")
        for label, fn in (
            ("iopipe cpu ", lambda: iopipe.load_checkpoint(index)),
            ("iopipe cuda", lambda: iopipe.load_checkpoint(index, device="cuda")),
            (
                "safetensors cuda",
                lambda: {
                    k: v
                    for s in sorted(folder.glob("*.safetensors"))
                    for k, v in load_file(s, device="cuda").items()
                },
            ),
        ):
            _, t = timed(fn, args.repeats, cold=folder)
            print(f"cold {label}: {total / t / 1e9:6.2f} GB/s")
        cold_gpu, _ = timed(lambda: iopipe.load_checkpoint(index, device="cuda"), 1, cold=folder)
        for threads in args.sweep:
            for device in ("cpu", "cuda"):
                _, t = timed(
                    lambda d=device, n=threads: iopipe.load_checkpoint(  # type: ignore[misc]
                        index, device=d, concurrency=n
                    ),
                    args.repeats,
                )
                print(f"  concurrency={threads:2} {device:4}: {total / t / 1e9:6.2f} GB/s")
        bad = same(ref, cpu) + same(cpu, gpu) + same(ref, streamed) + same(ref, cold_gpu)
        bad += v2_checks(folder, index, ref)
    if bad:
        print(f"MISMATCH in {len(bad)} tensors, e.g. {bad[:5]}", file=sys.stderr)
        return 1
    print(f"bit-exact: cpu == cuda == safetensors for all {len(ref)} tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
