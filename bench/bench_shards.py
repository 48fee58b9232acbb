"""Shards: throughput against one-file-per-sample and WebDataset, shuffle quality, read amplification.

The small-files bench data (``python -m bench.gen_data --only small``) is packed
once into 64 MiB shards (``iopipe pack``) under ``bench/data/shards``.  Cases,
each in a fresh process, interleaved within every repeat, page-cached (the
data is read once first) or cold (evicted before each case):

* ``files``: ``Pipeline.from_files(...).read()``, one file per sample;
* ``shards``: ``Pipeline.from_shards(local shards)``;
* ``shards-http``: the same shards served by nginx on 127.0.0.1 (needs nginx);
* ``webdataset``: ``webdataset.WebDataset(shards)`` iterated in the process.

Every case shuffles: iopipe with its global permutation, WebDataset with its
shard shuffle plus a 1,000-sample buffer (its documented recipe).  Shuffle
quality is computed, not timed: the share of consecutive samples that come from
the same shard (1/shards for a uniform permutation), and the mean distance, in
the packed order, between neighbours.

Usage: ``python -m bench.bench_shards [--repeats 5] [--mode warm|cold]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._harness import evict, warm

ROOT = Path(__file__).resolve().parent.parent
SMALL = ROOT / "bench" / "data" / "scale-1" / "small"
SHARDS = ROOT / "bench" / "data" / "shards"
CASES = ("files", "shards", "shards-http", "webdataset")
WDS_BUFFER = 1000


def _shards() -> list[str]:
    if not SHARDS.exists() or not list(SHARDS.glob("*.tar")):
        from iopipe.shards import pack_folder

        tmp = Path(tempfile.mkdtemp(dir=SHARDS.parent))
        pack_folder(SMALL, tmp, shard_bytes=64 << 20)
        if SHARDS.exists():
            shutil.rmtree(SHARDS)
        tmp.rename(SHARDS)
    return sorted(str(p) for p in SHARDS.glob("*.tar"))


def run_case(case: str, base_url: str | None) -> dict[str, Any]:
    """One shuffled epoch of ``case`` in this process: samples/s and bytes of payload."""
    import gc

    from iopipe import Pipeline

    shards = _shards()
    gc.collect()
    t0 = time.perf_counter()
    n = size = 0
    if case == "webdataset":
        import webdataset as wds

        ds = wds.WebDataset(shards, shardshuffle=len(shards), empty_check=False).shuffle(WDS_BUFFER)
        for s in ds:
            n += 1
            size += sum(len(v) for k, v in s.items() if not k.startswith("__"))
    else:
        if case == "files":
            pipe: Any = Pipeline.from_files(str(SMALL), shuffle=True, seed=1).read(concurrency=16)
        elif case == "shards":
            pipe = Pipeline.from_shards(shards, shuffle=True, seed=1)
        else:
            names = [os.path.basename(p) for p in shards]
            pipe = Pipeline.from_shards([f"{base_url}/{x}" for x in names], shuffle=True, seed=1)
        with pipe:
            for s in pipe:
                n += 1
                if isinstance(s, dict):
                    size += sum(len(v) for k, v in s.items() if not k.startswith("__"))
                else:
                    size += len(s)
    wall = time.perf_counter() - t0
    return {"case": case, "samples": n, "bytes": size, "rate": n / wall}


def quality() -> dict[str, Any]:
    """Shuffle quality of iopipe's permutation and WebDataset's shard shuffle + buffer."""
    import webdataset as wds

    from iopipe import Pipeline

    shards = _shards()
    packed: dict[str, int] = {}
    order: dict[str, list[tuple[str, str]]] = {"iopipe": [], "webdataset": []}
    with Pipeline.from_shards(shards) as p:
        for i, s in enumerate(p):
            packed[s["__key__"]] = i
    with Pipeline.from_shards(shards, shuffle=True, seed=1) as p:
        order["iopipe"] = [(s["__url__"], s["__key__"]) for s in p]
    ds = wds.WebDataset(shards, shardshuffle=len(shards), empty_check=False).shuffle(WDS_BUFFER)
    order["webdataset"] = [(s["__url__"], s["__key__"]) for s in ds]
    out: dict[str, Any] = {"shards": len(shards), "samples": len(packed)}
    for name, seq in order.items():
        same = sum(a[0] == b[0] for a, b in itertools.pairwise(seq)) / max(1, len(seq) - 1)
        dist = statistics.mean(abs(packed[a[1]] - packed[b[1]]) for a, b in itertools.pairwise(seq))
        out[name] = {"same_shard": same, "mean_distance": dist}
    total = sum(os.path.getsize(p) for p in shards)
    payload = sum(os.path.getsize(p) for p in SMALL.rglob("*") if p.is_file())
    out["read_amplification"] = total / payload  # every byte range read once per epoch
    return out


def _fresh(case: str, base_url: str | None) -> dict[str, Any]:
    code = (
        "import json; from bench.bench_shards import run_case; "
        f"print(json.dumps(run_case({case!r}, {base_url!r})))"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, check=True
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _nginx(folder: str) -> tuple[subprocess.Popen[Any] | None, str | None]:
    exe = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(exe):
        return None, None
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tempfile.mkdtemp()
    conf = Path(root) / "nginx.conf"
    conf.write_text(
        f"daemon off; master_process off; error_log {root}/e.log; pid {root}/p;"
        f"events {{}} http {{ access_log off; client_body_temp_path {root}/b;"
        f" server {{ listen 127.0.0.1:{port}; root {folder}; }} }}"
    )
    proc = subprocess.Popen([exe, "-p", root, "-c", str(conf)])
    time.sleep(0.5)
    return proc, f"http://127.0.0.1:{port}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--mode", choices=("warm", "cold"), default="warm")
    args = p.parse_args(argv)
    shards = _shards()
    files = [str(x) for x in SMALL.rglob("*") if x.is_file()]
    print(json.dumps(quality(), indent=1))
    proc, base = _nginx(str(SHARDS))
    cases = [c for c in CASES if c != "shards-http" or base]
    rates: dict[str, list[float]] = {c: [] for c in cases}
    try:
        for r in range(args.repeats):
            for c in cases:
                if args.mode == "cold":
                    evict(shards + files)
                else:
                    warm(shards)
                rec = _fresh(c, base)
                rates[c].append(rec["rate"])
                print(f"repeat {r + 1} {c:12s} {rec['rate']:9,.0f} samples/s ({rec['samples']})")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
    print(f"\nmedian samples/s, {args.mode}, {args.repeats} repeats (fresh process each):")
    for c in cases:
        ratio = statistics.median(a / b for a, b in zip(rates[c], rates["files"], strict=True))
        print(f"  {c:12s} {statistics.median(rates[c]):9,.0f}  x{ratio:.2f} of files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
