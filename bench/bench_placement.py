"""GIL-bound items: iopipe.DataLoader's "auto" against torch's DataLoader, over several epochs.

A map-style dataset whose ``__getitem__`` is pure Python that holds the GIL
(a loop of integer arithmetic, about 0.5 ms an item), batch 8, shuffled, the
training loop doing nothing else.  torch's two worker processes run it on two
cores; threads run it on one.  ``iopipe-w2`` is ``iopipe.DataLoader`` at
torch-w2's arguments (``worker_type="auto"``: the first epoch on threads, then
the placement judge's trial on processes, ``iopipe/loader/placement.py``);
``iopipe-w2-threads`` is the same loader with the judge never suspecting
(``"auto"`` as it was before the judge).  Every case runs in a fresh process,
the systems interleaved within each repeat; rates are items/s per epoch.

Usage: ``python -m bench.bench_placement [--repeats 5] [--epochs 4]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = ("torch-w0", "torch-w2", "iopipe-w2", "iopipe-w2-threads")
ITEMS = 256
BATCH = 8
WORK = 12_000  # loop steps per item: about 0.5 ms of Python here


class PyItems:
    """``ITEMS`` items of pure Python work (picklable: defined at module level)."""

    def __len__(self) -> int:
        return ITEMS

    def __getitem__(self, i: int) -> Any:
        import torch

        s = 0
        for k in range(WORK):
            s += k * i % 7
        return torch.tensor([s, i])


def run_case(system: str, epochs: int) -> dict[str, Any]:
    """Run ``epochs`` epochs of ``system`` in this process; return the rate of each."""
    import gc

    import torch

    torch.set_num_threads(1)  # intra-op threads would compete with the loaders' (2 cores)
    if system.startswith("torch"):
        from torch.utils.data import DataLoader
    else:
        from iopipe import DataLoader
        from iopipe.loader import placement

        if system.endswith("-threads"):
            placement.PlaceJudge.suspect = lambda self, ep: False  # type: ignore[method-assign]
    workers = 0 if system.endswith("w0") else 2
    gen = torch.Generator().manual_seed(0)
    loader = DataLoader(
        PyItems(), batch_size=BATCH, shuffle=True, generator=gen, num_workers=workers
    )
    rates, modes, checksum = [], [], 0
    gc.collect()
    for _ in range(epochs):
        t0 = time.perf_counter()
        n = 0
        for batch in loader:
            n += len(batch)
            checksum += int(batch[:, 1].sum())
        rates.append(n / (time.perf_counter() - t0))
        modes.append(getattr(loader, "worker_mode", "torch"))
    if hasattr(loader, "close"):
        loader.close()
    return {"system": system, "rates": rates, "modes": modes, "checksum": checksum}


def _fresh(system: str, epochs: int) -> dict[str, Any]:
    code = (
        "import json, sys; from bench.bench_placement import run_case; "
        f"print(json.dumps(run_case({system!r}, {epochs})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--epochs", type=int, default=4)
    args = p.parse_args(argv)
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SYSTEMS}
    for r in range(args.repeats):
        for s in SYSTEMS:
            rec = _fresh(s, args.epochs)
            runs[s].append(rec)
            rates = " ".join(f"{x:6.0f}" for x in rec["rates"])
            print(f"repeat {r + 1} {s:18s} {rates}  {' '.join(rec['modes'])}", flush=True)
    sums = {rec["checksum"] for recs in runs.values() for rec in recs}
    assert len(sums) == 1, f"the systems loaded different items: {sums}"
    print(f"\nmedian items/s per epoch ({args.repeats} repeats, fresh process each)")
    med = {
        s: [statistics.median(rec["rates"][e] for rec in runs[s]) for e in range(args.epochs)]
        for s in SYSTEMS
    }
    for s in SYSTEMS:
        print(f"  {s:18s} " + " ".join(f"{x:7.0f}" for x in med[s]))
    for s in ("iopipe-w2", "iopipe-w2-threads"):
        ratios = [
            statistics.median(
                a["rates"][e] / b["rates"][e]
                for a, b in zip(runs[s], runs["torch-w2"], strict=True)
            )
            for e in range(args.epochs)
        ]
        print(f"  {s} / torch-w2 per epoch: " + " ".join(f"{x:.2f}" for x in ratios))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
