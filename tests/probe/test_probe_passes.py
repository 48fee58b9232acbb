"""The probe's repeats: a cell is its median pass, and noise between passes decides nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from iopipe.io.listing import sized_files
from iopipe.probe.probe import probe
from iopipe.probe.report import ProbeCell, ProbeReport, median_pass


def _cell(conc: int, mb_per_s: float, *, chunk: int = 65536) -> ProbeCell:
    """A measured cell that read 100 MB at ``mb_per_s``."""
    return ProbeCell(
        concurrency=conc,
        chunk_bytes=chunk,
        files=10,
        bytes=100_000_000,
        wall_s=100 / mb_per_s,
        cpu_s=0.0,
        runq_s=0.0,
        p50_ms=1.0,
        p99_ms=2.0,
    )


def _report(cells: list[ProbeCell]) -> ProbeReport:
    return ProbeReport("x", 10, 100_000_000, False, None, True, 2, tuple(cells))


def test_a_cell_is_its_median_pass_with_the_spread() -> None:
    cell = median_pass([_cell(4, 300.0), _cell(4, 100.0), _cell(4, 200.0), _cell(4, 900.0)])
    assert cell.mb_per_s == pytest.approx(200.0)  # the lower median: a pass that happened
    assert cell.passes == 4
    assert cell.best_mb_per_s == pytest.approx(900.0)
    assert cell.spread == pytest.approx((900 - 100) / 200)


def test_median_pass_needs_a_pass() -> None:
    with pytest.raises(ValueError, match="at least one pass"):
        median_pass([])


def test_a_cell_whose_fastest_pass_reaches_the_best_counts_as_as_good() -> None:
    # One reader's median is 8% below four readers', but one of its passes was as fast:
    # the difference is noise, and the fewest readers are recommended.
    one = median_pass([_cell(1, 920.0), _cell(1, 1000.0), _cell(1, 880.0)])
    four = median_pass([_cell(4, 1000.0), _cell(4, 990.0), _cell(4, 1010.0)])
    assert _report([one, four]).recommended().concurrency == 1
    # Without that pass the gap is real.
    steady = median_pass([_cell(1, 920.0), _cell(1, 925.0), _cell(1, 918.0)])
    assert _report([steady, four]).recommended().concurrency == 4


def test_the_probe_reads_small_folders_again_until_the_minimum_time(tmp_path: Path) -> None:
    for i in range(5):
        (tmp_path / f"{i}.bin").write_bytes(bytes(1000))
    files = sized_files(tmp_path)
    report = probe(
        str(tmp_path), files, concurrency=[1, 2], chunk_bytes=[4096], repeats=2, min_time=0.2
    )
    for cell in report.cells:
        assert cell.passes >= 2
        assert (cell.files, cell.bytes) == (5, 5000)  # each pass reads every file once
    once = probe(str(tmp_path), files, concurrency=[1], chunk_bytes=[4096], repeats=1, min_time=0)
    assert once.cells[0].passes == 1


@pytest.mark.parametrize(("repeats", "min_time"), [(0, 0.1), (1, -1.0)])
def test_bad_repeats_or_minimum_time_are_refused(
    tmp_path: Path, repeats: int, min_time: float
) -> None:
    (tmp_path / "a").write_bytes(b"x")
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        probe(
            str(tmp_path),
            sized_files(tmp_path),
            concurrency=[1],
            chunk_bytes=[4096],
            repeats=repeats,
            min_time=min_time,
        )
