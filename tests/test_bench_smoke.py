"""Smoke test of the benchmark harness (bench/): tiny data, two systems, one repeat.

It checks that the harness runs cases in fresh processes and that the checksums they report
agree with each other and with one computed here from the files themselves. No timing asserts.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from bench import _harness, _workloads, gen_data


def _expected_checksum(paths: list[str]) -> str:
    total = 0
    for path in paths:
        with open(path, "rb") as f:
            head = f.read(_workloads.SMALL_SAMPLE_BYTES)
        total += int(np.frombuffer(head, dtype=np.uint64).sum(dtype=np.uint64))
    return f"{total % (1 << 64):016x}"


def test_harness_checksums_agree(tmp_path: Path) -> None:
    data_dir = gen_data.generate(tmp_path / "data", scale=0.015, only=["small"])
    paths = _workloads.paths("small_files", data_dir)
    assert len(paths) == 300

    records = _harness.run_matrix(
        workloads=["small_files"],
        systems_=["plain", "torch-w0"],
        temps=["warm"],
        repeats=1,
        data_dir=data_dir,
    )

    assert [(r["system"], r["status"]) for r in records] == [("plain", "ok"), ("torch-w0", "ok")]
    assert os.getpid() not in {r["pid"] for r in records}
    assert all(r["samples"] == 300 and r["batches"] == 2 for r in records)
    assert {r["checksum"] for r in records} == {_expected_checksum(paths)}
    rows = _harness.summarize(records)
    assert [(r["system"], r["checksum_ok"]) for r in rows] == [("plain", True), ("torch-w0", True)]


def test_prepare_warms_and_evicts_every_file(tmp_path: Path) -> None:
    data_dir = gen_data.generate(tmp_path / "data", scale=0.001, only=["small"])
    paths = _workloads.paths("small_files", data_dir)
    assert len(paths) == 20
    _harness.prepare(paths, "cold")
    _harness.prepare(paths, "warm")
    with pytest.raises(ValueError, match="temp must be 'warm' or 'cold', got 'hot'"):
        _harness.prepare(paths, "hot")
