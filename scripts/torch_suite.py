"""Run torch's own DataLoader tests against ``iopipe.DataLoader`` (its default mode).

torch's ``test/test_dataloader.py`` is not part of this repository (it is torch's
code) and is never fetched here: a developer downloads it once, for the torch
version installed, e.g. from
https://github.com/pytorch/pytorch/blob/v2.13.0/test/test_dataloader.py, and
passes its path.  The script copies it into a temporary folder, makes a second
copy whose ``DataLoader`` name is ``iopipe.DataLoader`` (one line added after the
imports; spawned worker processes import that copy too), runs both with pytest,
and compares: every test that passes on torch must pass on iopipe, except the
documented ones (docs/dataloader.md, "torch's own test suite").

Usage::

    .venv/bin/python scripts/torch_suite.py PATH/test_dataloader.py [-k EXPR] [--only iopipe]

Needs ``expecttest`` (``pip install expecttest``), which torch's test utilities
import.  Exit status 0 when nothing beyond the documented list fails.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

#: Tests that pass on torch and not on iopipe, by design (docs/dataloader.md).
_PRIVATE = "reads torch's private iterator attribute `_workers`"
EXPECTED_DIFFERENT: dict[str, str] = {
    f"{cls}::{test}": _PRIVATE
    for cls in ("TestDataLoader", "TestDataLoaderPersistentWorkers")
    for test in ("test_partial_workers", "test_iterable_style_dataset")
}

_PATCH = "\nfrom iopipe import DataLoader  # added by iopipe's scripts/torch_suite.py\n"


def _patched(text: str) -> str:
    """The test file with ``DataLoader`` bound to iopipe's after torch's imports."""
    m = re.search(r"^from torch\.utils\.data import \(.*?\)\n", text, re.S | re.M)
    if m is None:
        m = re.search(r"^from torch\.utils\.data import .*DataLoader.*\n", text, re.M)
    if m is None:
        raise SystemExit("torch_suite: no `from torch.utils.data import ... DataLoader` line found")
    return text[: m.end()] + _PATCH + text[m.end() :]


def _run(folder: Path, name: str, extra: list[str], log: Path) -> set[str]:
    """Run pytest on ``folder/name``; return the node ids that passed."""
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        name,
        "-q",
        "-p",
        "no:cacheprovider",
        "--timeout",
        "300",
        "-rA",
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with log.open("w") as out:
        subprocess.run(cmd, cwd=folder, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
    passed = set()
    for line in log.read_text().splitlines():
        if line.startswith("PASSED "):
            passed.add(line.split()[1].split("::", 1)[1])  # drop the file name
    return passed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("test_file", type=Path, help="torch's test/test_dataloader.py")
    ap.add_argument("-k", help="pytest -k expression (a subset)")
    ap.add_argument("--only", choices=["torch", "iopipe"], help="run one side only")
    ap.add_argument("--logs", type=Path, help="keep the pytest logs in this folder")
    args = ap.parse_args()
    text = args.test_file.read_text()
    extra = ["-k", args.k] if args.k else []
    with tempfile.TemporaryDirectory(prefix="iopipe-torch-suite-") as tmp:
        root = Path(tmp)
        logs = args.logs or root
        logs.mkdir(parents=True, exist_ok=True)
        results: dict[str, set[str]] = {}
        for side, body in (("torch", text), ("iopipe", _patched(text))):
            if args.only and side != args.only:
                continue
            folder = root / side
            folder.mkdir()
            (folder / "test_dataloader.py").write_text(body)
            (folder / "pytest.ini").write_text("[pytest]\n")
            results[side] = _run(folder, "test_dataloader.py", extra, logs / f"{side}.log")
            print(f"{side}: {len(results[side])} passed (log: {logs / f'{side}.log'})")
        if len(results) < 2:
            return 0
        missing = sorted(results["torch"] - results["iopipe"])
        unexpected = [t for t in missing if t not in EXPECTED_DIFFERENT]
        for t in missing:
            why = EXPECTED_DIFFERENT.get(t)
            print(f"  {'expected' if why else 'FAILS'}: {t}" + (f" ({why})" if why else ""))
        extra_passes = sorted(results["iopipe"] - results["torch"])
        for t in extra_passes:
            print(f"  passes on iopipe only: {t}")
        if args.logs is None and unexpected:
            keep = Path(tempfile.mkdtemp(prefix="iopipe-torch-suite-logs-"))
            for f in ("torch.log", "iopipe.log"):
                shutil.copy(root / f, keep / f)
            print(f"logs kept in {keep}")
        print(f"{len(unexpected)} torch-passing tests fail on iopipe beyond the documented list")
        return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
