"""Benchmark checkpoint loading: iopipe vs safetensors vs the disk's limit.

Generates a ~0.8 GB two-shard Hugging Face style checkpoint (a small Llama-like model:
bf16 matrices, f32 norms) under ``--data``, then times, each case in a fresh
subprocess, interleaved, ``--repeats`` times, cold (``os.sync()`` and
``POSIX_FADV_DONTNEED`` on every shard before the case) and warm (files in page cache):

* ``iopipe``: ``iopipe.load_checkpoint(index)``.
* ``st_touch``: ``safetensors.torch.load_file`` per shard, then one byte of every page
  read (its default is a lazy mmap; untouched it would measure nothing). Reference.
* ``st_owned``: ``load_file`` then ``clone()`` of every tensor, dropping the mapping
  (owned memory, like iopipe's result).
* ``plain``: one thread ``readinto`` over every shard, in 16 MiB pieces, into one
  reused pre-touched buffer: what the disk (or page cache) gives with no destination
  memory to fault in.

Destination memory is treated the same for every case: each subprocess first touches
and frees as much anonymous memory as the checkpoint holds, right before timing
(this VM charges a lot for first touching memory that sat idle), then resets its
peak-RSS counter. Every system then allocates its own destinations as it normally
would. GB/s counts the shards' file bytes.

Usage: ``.venv/bin/python bench/bench_checkpoint.py [--data DIR] [--repeats 3]``;
``--sweep`` times iopipe over chunk sizes and thread counts instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CASES = ("iopipe", "iopipe_copy", "st_touch", "st_owned", "plain")
DIST_CASES = ("dist2", "dist4")
SAVE_CASES = ("save_iopipe", "save_st")
INDEX = "model.safetensors.index.json"


# -- data ------------------------------------------------------------------------------


def _layout() -> list[tuple[str, tuple[int, ...], str]]:
    """Tensors of a small Llama-like model: (name, shape, dtype); ~0.8 GB."""
    hidden, inter, vocab, layers = 2048, 5632, 32000, 5
    out = [("model.embed_tokens.weight", (vocab, hidden), "bf16")]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + f"self_attn.{x}_proj.weight", (hidden, hidden), "bf16") for x in "qkvo"]
        out += [(p + f"mlp.{x}_proj.weight", (inter, hidden), "bf16") for x in ("gate", "up")]
        out += [
            (p + "mlp.down_proj.weight", (hidden, inter), "bf16"),
            (p + "input_layernorm.weight", (hidden,), "f32"),
            (p + "post_attention_layernorm.weight", (hidden,), "f32"),
            (p + "self_attn.rotary_emb.inv_freq", (hidden // 32,), "f32"),
        ]
    out += [("model.norm.weight", (hidden,), "f32"), ("lm_head.weight", (vocab, hidden), "bf16")]
    return out


def generate(folder: Path) -> list[Path]:
    """Write the checkpoint (two shards and an index) unless it is already there."""
    import torch
    from safetensors.torch import save_file

    layout = _layout()
    shards = [folder / f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    stamp = folder / "layout.json"
    if stamp.exists() and json.loads(stamp.read_text()) == [list(map(str, t)) for t in layout]:
        return shards
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    dtypes = {"bf16": torch.bfloat16, "f32": torch.float32}
    half = len(layout) // 2
    weight_map = {}
    for shard, part in zip(shards, (layout[:half], layout[half:]), strict=True):
        tensors = {
            name: torch.randn(shape, generator=gen, dtype=torch.float32).to(dtypes[dt])
            for name, shape, dt in part
        }
        save_file(tensors, shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard.name))
        del tensors
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    stamp.write_text(json.dumps([list(map(str, t)) for t in layout]))
    return shards


# -- one case, in a fresh process -----------------------------------------------------


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _evict(paths: list[Path]) -> None:
    os.sync()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _pretouch(nbytes: int) -> None:
    """Touch and free ``nbytes`` of fresh memory so no case pays for idle memory."""
    import numpy as np

    region = np.ones(nbytes, dtype=np.uint8)  # writes every page
    del region  # large blocks go straight back to the kernel, still warm


def _touch(out: dict[str, Any]) -> None:
    """Read one byte of every page of every tensor: the same work for every case."""
    import torch

    for tensor in out.values():
        if tensor.numel():
            flat = tensor.reshape(-1).view(torch.uint8)
            int(flat[::4096].sum())


def _run_case(case: str, folder: Path, shards: list[Path], opts: dict[str, Any]) -> Any:
    import torch
    from safetensors.torch import load_file

    import iopipe

    if case in ("iopipe", "iopipe_copy"):
        if opts.pop("buffered_only", False):  # A/B knob: no O_DIRECT reads
            import iopipe.checkpoint.io as ckpt_io

            ckpt_io.DIRECT_MIN_FILE_BYTES = 1 << 62
        kwargs = {k: v for k, v in opts.items() if v}
        got = iopipe.load_checkpoint(folder / INDEX, copy=case == "iopipe_copy", **kwargs)
        _touch(got)  # mapped tensors are read here, as safetensors' are
        return got
    if case in ("st_touch", "st_owned"):
        out: dict[str, torch.Tensor] = {}
        for shard in shards:
            for name, tensor in load_file(shard).items():
                out[name] = tensor.clone() if case == "st_owned" else tensor
        _touch(out)
        return out
    if case.startswith("save_"):
        return _save(case, folder, opts)
    buffer = opts["buffer"]
    view = memoryview(buffer)
    piece = 16 << 20
    for shard in shards:
        with open(shard, "rb", buffering=0) as f:
            at = 0
            while True:
                got = f.readinto(view[at : at + piece])
                if not got:
                    break
                at = (at + got) % (len(buffer) - piece)
    return None


def _save(case: str, folder: Path, opts: dict[str, Any]) -> None:
    """Save the loaded state dict (in ``opts``) in two shards, fsynced, as each system would."""
    from safetensors.torch import save_file

    import iopipe

    state, out = opts["state"], folder.parent / "save-out"
    if case == "save_iopipe":
        half = sum(t.nbytes for t in state.values()) // 2 + 1
        iopipe.save_checkpoint(state, out, max_shard_bytes=half)
        return
    out.mkdir()
    names = list(state)
    halves = (names[: len(names) // 2], names[len(names) // 2 :])
    weight_map = {}
    for i, part in enumerate(halves, 1):
        path = out / f"model-0000{i}-of-00002.safetensors"
        save_file({n: state[n] for n in part}, path, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, path.name))
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)  # iopipe fsyncs; so must the reference
        os.close(fd)
    (out / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def child(case: str, mode: str, folder: Path, opts: dict[str, Any]) -> None:
    # Imports happen before timing, for every case alike.
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401

    import iopipe  # noqa: F401

    shards = sorted(folder.glob("*.safetensors"))
    total = sum(p.stat().st_size for p in shards)
    if case == "plain":
        opts["buffer"] = bytearray(64 << 20)  # reused; bytearray() zero-fills: pre-touched
    if case.startswith("save_"):
        import shutil

        import iopipe as _io

        shutil.rmtree(folder.parent / "save-out", ignore_errors=True)
        opts["state"] = _io.load_checkpoint(folder / INDEX, copy=True)
    _pretouch(total)
    if mode == "cold":
        _evict(shards)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS)
    before = _status("VmRSS")
    cpu = os.times()
    start = time.perf_counter()
    result = _run_case(case, folder, shards, opts)
    elapsed = time.perf_counter() - start
    cpu_s = sum(os.times()[:2]) - sum(cpu[:2])  # user + system, all threads
    peak = _status("VmHWM")
    del result
    if case.startswith("save_"):
        import shutil

        shutil.rmtree(folder.parent / "save-out", ignore_errors=True)
    print(
        json.dumps(
            {"gbps": total / elapsed / 1e9, "peak_mb": (peak - before) / 1e6, "cpu_s": cpu_s}
        )
    )


def spawn(case: str, mode: str, folder: Path, opts: dict[str, Any]) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", case, "--mode", mode, "--data", str(folder)]
    cmd += ["--opts", json.dumps(opts)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    if out.returncode:
        raise RuntimeError(f"{case}/{mode} failed:\n{out.stderr}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def rank_child(rank: int, world: int, store: str, folder: Path) -> None:
    """One rank of a distributed load: gloo over a file store, preadv bytes counted."""
    import threading

    import torch
    import torch.distributed as dist

    import iopipe

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"file://{store}")
    shards = sorted(folder.glob("*.safetensors"))
    _pretouch(sum(p.stat().st_size for p in shards))
    read, lock, real = [0], threading.Lock(), os.preadv

    def counted(fd: int, buffers: Any, offset: int, *rest: Any) -> int:
        got = real(fd, buffers, offset, *rest)
        with lock:
            read[0] += got
        return got

    os.preadv = counted
    dist.barrier()
    start = time.perf_counter()
    out = iopipe.load_checkpoint(folder / INDEX, distributed=True)
    _touch(out)
    elapsed = time.perf_counter() - start
    dist.barrier()
    dist.destroy_process_group()
    print(json.dumps({"elapsed": elapsed, "bytes": read[0]}))


def spawn_dist(world: int, mode: str, folder: Path) -> dict[str, float]:
    """A distributed load on ``world`` gloo ranks: GB/s by the slowest rank, bytes per rank."""
    import tempfile

    shards = sorted(folder.glob("*.safetensors"))
    if mode == "cold":
        _evict(shards)
    store = tempfile.mktemp(prefix="iopipe-bench-store-")
    cmd = [sys.executable, __file__, "--data", str(folder), "--world", str(world), "--store", store]
    procs = [
        subprocess.Popen([*cmd, "--rank", str(r)], stdout=subprocess.PIPE, text=True)
        for r in range(world)
    ]
    outs = []
    for proc in procs:
        stdout, _ = proc.communicate(timeout=300)
        if proc.returncode:
            raise RuntimeError(f"dist{world}/{mode}: a rank failed")
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(store)
    total = sum(p.stat().st_size for p in shards)
    data = sum(o["bytes"] for o in outs)
    return {
        "gbps": total / max(o["elapsed"] for o in outs) / 1e9,
        "share": max(o["bytes"] for o in outs) / data,
        "peak_mb": 0.0,
        "cpu_s": 0.0,
    }


# -- driver ---------------------------------------------------------------------------


def _warm(shards: list[Path]) -> None:
    for shard in shards:
        with open(shard, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass


def bench(folder: Path, repeats: int) -> dict[tuple[str, str], list[dict[str, float]]]:
    shards = generate(folder)
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for rep in range(repeats):
        order = (
            CASES[rep % len(CASES) :] + CASES[: rep % len(CASES)]
        )  # rotate: no case always first
        for mode in ("cold", "warm"):
            if mode == "warm":
                _warm(shards)
            for case in order:
                results.setdefault((case, mode), []).append(spawn(case, mode, folder, {}))
            for case in DIST_CASES if rep % 2 else DIST_CASES[::-1]:
                run = spawn_dist(int(case[-1]), mode, folder)
                results.setdefault((case, mode), []).append(run)
        for case in SAVE_CASES if rep % 2 else SAVE_CASES[::-1]:
            results.setdefault((case, "save"), []).append(spawn(case, "warm", folder, {}))
    return results


def _fmt(runs: list[dict[str, float]]) -> tuple[float, str]:
    rates = [r["gbps"] for r in runs]
    peak = max(r["peak_mb"] for r in runs)
    cpu = statistics.median(r["cpu_s"] for r in runs)
    med = statistics.median(rates)
    return med, f"{med:6.2f}  {min(rates):5.2f}-{max(rates):<6.2f} {cpu:6.2f}  {peak:7.0f}"


def report(results: dict[tuple[str, str], list[dict[str, float]]], total: int) -> None:
    print(f"\ncheckpoint: {total / 1e9:.2f} GB in 2 shards; every case touches every page")
    print("GB/s: median and min-max; CPU s: user+system, median; peak MB: RSS growth, max")
    print(f"{'case':11} {'mode':5} {'GB/s':>6}  {'min-max':11} {'CPU s':>6}  {'peak MB':>7}")
    med: dict[tuple[str, str], float] = {}
    for mode in ("cold", "warm"):
        for case in CASES + DIST_CASES:
            med[(case, mode)], text = _fmt(results[(case, mode)])
            print(f"{case:11} {mode:5} {text}")
    for case in SAVE_CASES:
        med[(case, "save")], text = _fmt(results[(case, "save")])
        print(f"{case:11} {'write':5} {text}")
    print("\nratios (targets):")
    checks = [
        ("cold iopipe / plain", med[("iopipe", "cold")] / med[("plain", "cold")], 0.9),
        ("cold iopipe / st_touch", med[("iopipe", "cold")] / med[("st_touch", "cold")], 1.3),
        ("warm iopipe / st_touch", med[("iopipe", "warm")] / med[("st_touch", "warm")], 0.9),
        ("warm copy / st_owned", med[("iopipe_copy", "warm")] / med[("st_owned", "warm")], 1.0),
        ("save iopipe / st+fsync", med[("save_iopipe", "save")] / med[("save_st", "save")], 0.0),
    ]
    for world in (2, 4):
        for mode in ("cold", "warm"):
            ratio = med[(f"dist{world}", mode)] / med[("iopipe", mode)]
            checks.append((f"{mode} dist{world} / iopipe", ratio, 0.0))
    for label, ratio, target in checks:
        verdict = "" if not target else ("  ok" if ratio >= target else "  MISSED")
        goal = f">= {target}" if target else "(reference)"
        print(f"  {label:24} {ratio:5.2f}x  {goal}{verdict}")
    print("\nbytes read by the busiest rank, share of the checkpoint (target <= 1/world + 10%):")
    for world in (2, 4):
        for mode in ("cold", "warm"):
            share = max(r["share"] for r in results[(f"dist{world}", mode)])
            ok = "ok" if share <= 1 / world * 1.1 else "MISSED"
            print(f"  dist{world} {mode:5} {share:5.3f} (<= {1 / world * 1.1:.3f})  {ok}")


def sweep(folder: Path, repeats: int) -> None:
    shards = generate(folder)
    grid = [(c, t) for c in (4, 8, 16, 32) for t in (1, 2, 4, 8)]
    rows: dict[tuple[int, int, str], list[float]] = {}
    for _ in range(repeats):
        for mode in ("cold", "warm"):
            if mode == "warm":
                _warm(shards)
            for chunk, threads in grid:
                opts = {"chunk_bytes": chunk << 20, "concurrency": threads}
                rows.setdefault((chunk, threads, mode), []).append(
                    spawn("iopipe", mode, folder, opts)["gbps"]
                )
    print(f"{'chunk MiB':>9} {'threads':>7} {'cold GB/s':>10} {'warm GB/s':>10}")
    for chunk, threads in grid:
        cold = statistics.median(rows[(chunk, threads, "cold")])
        warm = statistics.median(rows[(chunk, threads, "warm")])
        print(f"{chunk:9} {threads:7} {cold:10.2f} {warm:10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=HERE / "data" / "ckpt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sweep", action="store_true", help="tune chunk size and threads")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--child", choices=CASES + SAVE_CASES, help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("cold", "warm"), help=argparse.SUPPRESS)
    parser.add_argument("--opts", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank is not None:
        rank_child(args.rank, args.world, args.store, args.data)
        return
    if args.child:
        child(args.child, args.mode, args.data, json.loads(args.opts))
        return
    if args.sweep:
        sweep(args.data, args.repeats)
        return
    started = time.perf_counter()
    results = bench(args.data, args.repeats)
    total = sum(p.stat().st_size for p in args.data.glob("*.safetensors"))
    report(results, total)
    print(
        f"\n{args.repeats} repeats, each case in a fresh process; {time.perf_counter() - started:.0f} s"
    )
    if args.json:
        args.json.write_text(json.dumps({f"{c}/{m}": r for (c, m), r in results.items()}))


if __name__ == "__main__":
    main()
