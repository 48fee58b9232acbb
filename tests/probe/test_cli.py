"""Tests of the ``iopipe`` command (iopipe/probe/cli.py, iopipe/probe/probe.py).

The commands run as real subprocesses (the console script and ``python -m
iopipe``).  Each pays for importing torch, so the module fixture starts them all
at once, a few at a time, and the tests assert on their results.  A few
checks of argument parsing run in-process through ``main()``.

``--cold`` is checked with the kernel's own answer: ``mincore`` on a mapping of
the file says which of its pages are in the page cache (no timing involved).
"""

from __future__ import annotations

import importlib.util
import json
import mmap
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from iopipe.checkpoint.io import resident_share
from iopipe.probe.cli import main
from iopipe.probe.probe import evict, warm

REPO = Path(__file__).resolve().parents[2]
IOPIPE = Path(sys.executable).parent / "iopipe"  # the console script
PARALLEL = 4
PLOT = importlib.util.find_spec("matplotlib") is not None
DATA_BYTES = 2 * (20 * 1000 + 100 * 190) + (1 << 20)
TIMEOUT_S = 240.0


# -- page-cache residency (mincore) ---------------------------------------------------


def resident_pages(path: Path) -> tuple[int, int]:
    """Return ``(resident, total)`` pages of ``path`` in the page cache (mincore: reads nothing)."""
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    fd = os.open(path, os.O_RDONLY)
    try:
        share = resident_share(fd, 0, size)
    finally:
        os.close(fd)
    if share is None:
        raise OSError("mincore is not available here")
    return round(share * pages), pages


# -- running the commands ---------------------------------------------------------------


@dataclass
class Run:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str


def _start(argv: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}
    return subprocess.Popen(
        argv,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_all(commands: dict[str, list[str]]) -> dict[str, Run]:
    """Run ``commands`` as subprocesses, ``PARALLEL`` at a time; return their results."""
    pending = list(commands.items())
    running: list[tuple[str, list[str], subprocess.Popen[str]]] = []
    done: dict[str, Run] = {}
    deadline = time.monotonic() + TIMEOUT_S
    while pending or running:
        while pending and len(running) < PARALLEL:
            name, argv = pending.pop(0)
            running.append((name, argv, _start(argv)))
        name, argv, proc = running.pop(0)
        try:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for _, _, p in [(name, argv, proc), *running]:
                p.kill()
                p.communicate()
            raise
        done[name] = Run(argv, proc.returncode, out, err)
    return done


def cli(*args: str, module: bool = True) -> list[str]:
    return [sys.executable, "-m", "iopipe", *args] if module else [str(IOPIPE), *args]


@dataclass
class World:
    root: Path
    data: Path
    cold: Path
    runs: dict[str, Run]
    cold_before: tuple[int, int]
    cold_after: tuple[int, int]
    warm_before: tuple[int, int]
    warm_after: tuple[int, int]


CONFIG = """
[source]
files = "{data}"

[[stages]]
stage = "read"
concurrency = 2

[[stages]]
stage = "map"
fn = "builtins:len"
concurrency = "auto"

[[stages]]
stage = "batch"
batch_size = 8
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("cli")
    data = root / "data"
    for d in range(2):
        (data / f"{d}").mkdir(parents=True)
        for i in range(20):
            (data / f"{d}" / f"{i:02d}.bin").write_bytes(os.urandom(1000 + 100 * i))
    (root / "empty").mkdir()
    unreadable = root / "unreadable"
    unreadable.mkdir()
    (unreadable / "ok.bin").write_bytes(b"x")
    (unreadable / "gone.bin").symlink_to(root / "no-such-target")
    cold = root / "cold"
    cold.mkdir()
    (cold / "big.bin").write_bytes(os.urandom(1 << 20))
    (data / "1" / "big.bin").write_bytes(os.urandom(1 << 20))
    (root / "run.toml").write_text(CONFIG.format(data=data))
    (root / "bad.toml").write_text(
        CONFIG.format(data=data).replace('concurrency = "auto"', 'concurrency = "x"')
    )
    plot = root / "probe.png"
    small = ["--concurrency", "1,2", "--chunk-bytes", "4KiB,64KiB"]
    commands = {
        "json": cli("probe", str(data), *small, "--json", *(["--plot", str(plot)] if PLOT else [])),
        "human": cli("probe", str(data), *small, module=False),
        # A deadline already past when the reader starts: the cell reads nothing,
        # so what the probe evicted stays evicted.
        "cold": cli("probe", str(cold), "--cold", "--concurrency", "1", "--duration", "1e-9"),
        "missing": cli("probe", str(root / "nope")),
        "empty": cli("probe", str(root / "empty")),
        "unreadable": cli("probe", str(unreadable)),
        "run": cli("run", str(root / "run.toml"), "--epochs", "2", module=False),
        "bad_config": cli("run", str(root / "bad.toml")),
    }
    warm([str(cold / "big.bin")])
    evict([str(data / "1" / "big.bin")])  # the (warm) probes of data read it back in
    cold_before = resident_pages(cold / "big.bin")
    warm_before = resident_pages(data / "1" / "big.bin")
    runs = run_all(commands)
    return World(
        root=root,
        data=data,
        cold=cold,
        runs=runs,
        cold_before=cold_before,
        cold_after=resident_pages(cold / "big.bin"),
        warm_before=warm_before,
        warm_after=resident_pages(data / "1" / "big.bin"),
    )


def ok(run: Run) -> Run:
    assert run.returncode == 0, f"{run.argv} failed ({run.returncode}):\n{run.stderr[-3000:]}"
    return run


# -- probe --------------------------------------------------------------------------------


def _check_schema(doc: Any, schema: Any, where: str = "$") -> None:
    """Assert that ``doc`` has exactly the keys of ``schema`` with values of its types."""
    if isinstance(schema, dict):
        assert isinstance(doc, dict), where
        assert set(doc) == set(schema), f"{where}: {sorted(doc)} != {sorted(schema)}"
        for k, sub in schema.items():
            _check_schema(doc[k], sub, f"{where}.{k}")
    elif isinstance(schema, list):
        assert isinstance(doc, list), where
        assert doc, f"{where}: empty"
        for i, item in enumerate(doc):
            _check_schema(item, schema[0], f"{where}[{i}]")
    else:
        assert isinstance(doc, schema), f"{where}: {doc!r} is not {schema}"


NUM = (int, float)
CELL = {
    "concurrency": int,
    "chunk_bytes": int,
    "files": int,
    "bytes": int,
    "wall_s": NUM,
    "mb_per_s": NUM,
    "files_per_s": NUM,
    "p50_ms": NUM,
    "p99_ms": NUM,
    "cpu_s": NUM,
    "runq_s": NUM,
    "runnable": NUM,
    "passes": int,
    "spread": NUM,
}
SCHEMA = {
    "schema": str,
    "path": str,
    "files": int,
    "bytes": int,
    "cold": bool,
    "warmed": bool,
    "duration_s": type(None),
    "cpus": int,
    "results": [CELL],
    "recommendation": {
        "concurrency": int,
        "chunk_bytes": int,
        "mb_per_s": NUM,
        "files_per_s": NUM,
        "bound": str,
        "speedup": NUM,
        "advice": str,
    },
}


def test_probe_json_is_one_document_with_every_cell(world: World) -> None:
    run = ok(world.runs["json"])
    doc = json.loads(run.stdout)  # the whole of stdout is one JSON document
    _check_schema(doc, SCHEMA)
    assert doc["schema"] == "iopipe.probe/1"
    assert (doc["files"], doc["bytes"], doc["cold"], doc["warmed"]) == (41, DATA_BYTES, False, True)
    assert [(c["concurrency"], c["chunk_bytes"]) for c in doc["results"]] == [
        (1, 4096),
        (1, 65536),
        (2, 4096),
        (2, 65536),
    ]
    for c in doc["results"]:
        assert (c["files"], c["bytes"]) == (41, doc["bytes"])  # the median pass's
        assert c["p50_ms"] <= c["p99_ms"]
        assert c["passes"] >= 3  # --repeats' default, more until --min-time (0.5 s)
        assert c["spread"] >= 0
    rec = doc["recommendation"]
    assert (rec["concurrency"], rec["chunk_bytes"]) in [
        (c["concurrency"], c["chunk_bytes"]) for c in doc["results"]
    ]
    assert rec["bound"] in ("storage", "cpu")
    assert rec["advice"].startswith(f"read(concurrency={rec['concurrency']}, chunk_bytes=")


@pytest.mark.skipif(not PLOT, reason="needs matplotlib (pip install 'iopipe-ml[plot]')")
def test_probe_plot_is_a_png(world: World) -> None:
    ok(world.runs["json"])
    png = (world.root / "probe.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")


def test_probe_human_output_has_a_table_and_a_recommendation(world: World) -> None:
    lines = ok(world.runs["human"]).stdout.splitlines()
    assert lines[0].startswith(f"probe: 41 files, 1.1 MiB under {world.data} (warm: page-cached); ")
    assert lines[1].split() == [
        "conc",
        "chunk",
        "MB/s",
        "±",
        "files/s",
        "p50",
        "ms",
        "p99",
        "ms",
        "runnable",
    ]
    rows = [line.split()[:2] for line in lines[2:6]]
    assert rows == [["1", "4KiB"], ["1", "64KiB"], ["2", "4KiB"], ["2", "64KiB"]]
    assert lines[6].startswith("recommendation: read(concurrency=")
    assert ("storage-bound" in lines[6]) != ("CPU-bound" in lines[6])
    assert len(lines) == 7


def test_cold_evicts_the_files_from_the_page_cache(world: World) -> None:
    ok(world.runs["cold"])
    resident, pages = world.cold_before
    if resident != pages:
        pytest.skip("this file system keeps no page cache to measure")
    assert world.cold_after == (0, pages)


def test_warm_reads_every_file_into_the_page_cache_first(world: World) -> None:
    ok(world.runs["human"])
    if world.warm_before[0] != 0:
        pytest.skip("this file system does not evict on POSIX_FADV_DONTNEED")
    resident, pages = world.warm_after
    assert resident == pages


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("missing", "iopipe probe: error: no such file or directory: {root}/nope\n"),
        ("empty", "iopipe probe: error: no files under {root}/empty\n"),
        (
            "unreadable",
            "iopipe probe: error: cannot read {root}/unreadable/gone.bin: No such file or directory\n",
        ),
        (
            "bad_config",
            "iopipe run: error: stages[1].concurrency: expected an int >= 1 or 'auto', got 'x'\n",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line(world: World, name: str, message: str) -> None:
    run = world.runs[name]
    assert run.returncode == 2
    assert run.stderr == message.format(root=world.root)
    assert run.stdout == ""


def test_debug_raises_instead_of_one_line(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"^no such file or directory: .*/nope$"):
        main(["probe", str(tmp_path / "nope"), "--debug"])
    with pytest.raises(FileNotFoundError, match=r"^no such file or directory: .*/nope$"):
        main(["--debug", "probe", str(tmp_path / "nope")])


# -- run ----------------------------------------------------------------------------------


def test_run_reports_stages_queues_and_the_verdict_each_epoch(world: World) -> None:
    out = ok(world.runs["run"]).stdout
    assert out.count("verdict: ") == 2
    assert "epoch 0: 6 batches in " in out
    assert "epoch 1: 6 batches in " in out
    assert out.count("epoch 0:") == out.count("epoch 1:") == 1  # one line per epoch
    for stage in ("source", "read", "map", "batch"):
        assert f"\n{stage} " in out
    assert "queue" in out  # occupancy column
    assert "autotune (" in out  # map is on auto


# -- in-process: parsing and the rest of run ----------------------------------------------


@pytest.mark.parametrize("command", [[], ["probe"], ["run"]])
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    usage = " ".join(["usage: iopipe", *command, "[-h] [--debug]"])
    assert capsys.readouterr().out.startswith(usage)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["probe", ".", "--concurrency", "1,x"],
            "argument --concurrency: expected a comma-separated list of ints >= 1, got '1,x'",
        ),
        (
            ["probe", ".", "--concurrency", "0"],
            "argument --concurrency: expected a comma-separated list of ints >= 1, got '0'",
        ),
        (
            ["probe", ".", "--chunk-bytes", "4MB,lots"],
            "argument --chunk-bytes: expected a comma-separated list of sizes such as 256KiB or 4MiB, got '4MB,lots'",
        ),
        (
            ["probe", ".", "--duration", "-1"],
            "argument --duration: expected a number of seconds > 0, got '-1'",
        ),
        (
            ["probe", ".", "--duration", "nan"],
            "argument --duration: expected a number of seconds > 0, got 'nan'",
        ),
        (["probe", ".", "--repeats", "0"], "argument --repeats: expected an int >= 1, got '0'"),
        (
            ["probe", ".", "--min-time", "-0.1"],
            "argument --min-time: expected a number of seconds >= 0, got '-0.1'",
        ),
        (["run", "x.toml", "--epochs", "0"], "argument --epochs: expected an int >= 1, got '0'"),
        (["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate'"),
    ],
)
def test_usage_errors_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_sizes_are_accepted_on_the_command_line() -> None:
    from iopipe.probe.cli import build_parser

    args = build_parser().parse_args(["probe", ".", "--chunk-bytes", "256KiB,4MiB,1G"])
    assert args.chunk_bytes == [256 << 10, 4 << 20, 1 << 30]


def test_run_json_and_limit(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(world.root / "run.toml"), "--limit", "2", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == "iopipe.run/1"
    (epoch,) = doc["epochs"]
    assert epoch["elements"] == 2
    assert [s["name"] for s in epoch["stages"]] == ["source", "read", "map", "batch"]
    assert epoch["verdict"]["kind"] in ("stage", "source", "consumer", "none")
    assert epoch["autotune"]["map"] >= 1


def test_missing_config_and_pattern_without_match(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", str(world.root / "none.toml")]) == 2
    assert (
        capsys.readouterr().err
        == f"iopipe run: error: no such config file: {world.root}/none.toml\n"
    )
    assert main(["probe", str(world.data), "--pattern", "*.jpg"]) == 2
    assert (
        capsys.readouterr().err
        == f"iopipe probe: error: no files matching '*.jpg' under {world.data}\n"
    )


def test_plot_without_matplotlib_is_bad_input(
    world: World, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["probe", str(world.data), "--plot", str(world.root / "x.png")]) == 2
    assert capsys.readouterr().err == (
        "iopipe probe: error: --plot needs matplotlib: pip install 'iopipe-ml[plot]'\n"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_a_file_without_read_permission_is_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "secret.bin"
    f.write_bytes(b"x")
    f.chmod(0)
    assert main(["probe", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"iopipe probe: error: cannot read {f}: Permission denied\n"


# -- the installed console script -------------------------------------------------------


def test_console_script_imports_functions_from_the_current_folder(tmp_path: Path) -> None:
    # `iopipe run` finds "mymod:double" in the folder it runs in, as `python -m iopipe` does.
    exe = Path(sys.executable).parent / "iopipe"
    if not exe.exists():
        pytest.skip("the iopipe console script is not installed in this environment")
    (tmp_path / "mymod.py").write_text("def double(x):\n    return 2 * x\n")
    (tmp_path / "cfg.toml").write_text(
        'source.items = [1, 2, 3]\n[[stages]]\nstage = "map"\nfn = "mymod:double"\n'
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [str(exe), "run", "cfg.toml", "--allow", "mymod", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["unit"] == "items"
    assert doc["epochs"][0]["elements"] == 3


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from iopipe import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"iopipe {__version__} (distribution iopipe-ml)\n"


def test_plot_into_a_missing_folder_fails_before_measuring(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    (tmp_path / "a.bin").write_bytes(b"x" * 10)
    with pytest.raises(Exception, match="does not exist"):
        main(["--debug", "probe", str(tmp_path), "--plot", str(tmp_path / "no" / "p.png")])
