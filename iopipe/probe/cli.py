"""The ``iopipe`` command: ``iopipe probe PATH`` and ``iopipe run CONFIG``.

Exit status: 0 on success, 2 for bad usage or bad input (a missing path, an
empty folder, an unreadable file, an invalid config: one line on stderr, no
traceback unless ``--debug``), 1 for any other failure, 130 on Ctrl-C.
Sizes may be written ``4MiB``, ``256KiB``, ``1G`` here (and in config files) only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..io.listing import sized_files
from ..pipeline.config import ConfigError
from ..pipeline.sizes import format_size_approx, parse_size
from .probe import probe
from .report import plot

__all__ = ["main"]

USAGE_ERROR = 2
FAILURE = 1


class InputError(Exception):
    """Bad input: reported on one line with exit status 2."""


def _csv(convert: Callable[[str], int], what: str) -> Callable[[str], list[int]]:
    def parse(text: str) -> list[int]:
        try:
            values = [convert(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            values = []
        if not values or any(v < 1 for v in values):
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {what}, got {text!r}"
            )
        return sorted(set(values))

    return parse


def _seconds(text: str, *, zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and (value > 0 or (zero and value == 0))):
        bound = ">= 0" if zero else "> 0"
        raise argparse.ArgumentTypeError(f"expected a number of seconds {bound}, got {text!r}")
    return value


def _positive(text: str) -> float:
    return _seconds(text, zero=False)


def _non_negative(text: str) -> float:
    return _seconds(text, zero=True)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
    return value


def _module(text: str) -> str:
    if not all(part.isidentifier() for part in text.split(".")):
        raise argparse.ArgumentTypeError(f"expected a module name like 'myproject', got {text!r}")
    return text


def _version() -> str:
    from .. import __version__

    return f"iopipe {__version__} (distribution iopipe-ml)"


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``iopipe`` command."""
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the traceback of a failure",
    )
    parser = argparse.ArgumentParser(
        prog="iopipe",
        description="Measure storage and run configured iopipe pipelines.",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_probe(sub, debug)
    _add_run(sub, debug)
    _add_pack(sub, debug)
    return parser


def _add_probe(sub: Any, debug: argparse.ArgumentParser) -> None:
    """The ``probe`` command's arguments."""
    p = sub.add_parser(
        "probe",
        parents=[debug],
        help="measure how fast the files under PATH can be read, and how",
        description=(
            "Read the files under PATH with every combination of reads in flight "
            "(--concurrency) and read size (--chunk-bytes); print MB/s, files/s and "
            "p50/p99 latency per file, and recommend settings for Pipeline.read()."
        ),
    )
    p.add_argument("path", metavar="PATH", help="a folder, a file, or http(s)/s3 objects")
    p.add_argument(
        "--pattern", metavar="GLOB", help="only files matching GLOB under PATH (e.g. '**/*.jpg')"
    )
    p.add_argument(
        "--concurrency",
        type=_csv(int, "ints >= 1"),
        default=[1, 4, 16, 64],
        metavar="N,N,...",
        help="reads in flight to try (default: 1,4,16,64)",
    )
    p.add_argument(
        "--chunk-bytes",
        type=_csv(parse_size, "sizes such as 256KiB or 4MiB"),
        default=[256 << 10, 4 << 20],
        metavar="SIZE,...",
        help="largest single reads to try (default: 256KiB,4MiB)",
    )
    p.add_argument(
        "--cold",
        action="store_true",
        help="evict the files from the page cache before each measurement (sync + fadvise)",
    )
    p.add_argument(
        "--duration",
        type=_positive,
        metavar="S",
        help="seconds per pass at most (default: read every file once)",
    )
    p.add_argument(
        "--repeats",
        type=_count,
        default=3,
        metavar="N",
        help="passes per cell at least; each cell reports its median pass (default: 3)",
    )
    p.add_argument(
        "--min-time",
        type=_non_negative,
        default=0.5,
        metavar="S",
        help="seconds per cell at least: small folders are read again until then (default: 0.5)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.add_argument("--plot", metavar="FILE.png", help="write a chart of MB/s against concurrency")
    p.set_defaults(func=cmd_probe)


def _add_run(sub: Any, debug: argparse.ArgumentParser) -> None:
    """The ``run`` command's arguments."""
    r = sub.add_parser(
        "run",
        parents=[debug],
        help="run a configured pipeline with no model and report what bounds it",
        description=(
            "Build the pipeline of CONFIG (.toml, .json or .yaml; see docs/config.md), "
            "iterate it with no model attached and report per-stage throughput, queue "
            "occupancy and the bottleneck verdict after each epoch."
        ),
    )
    r.add_argument("config", metavar="CONFIG", help="pipeline config file")
    r.add_argument(
        "--epochs", type=_count, default=1, metavar="N", help="epochs to run (default 1)"
    )
    r.add_argument(
        "--limit",
        type=_count,
        metavar="N",
        help="stop each epoch after N batches (items without a batch stage)",
    )
    r.add_argument(
        "--allow",
        action="append",
        default=[],
        type=_module,
        metavar="MODULE",
        help=(
            "a module (and every module below it) whose functions the config may name; "
            "repeat for more. Without it a config may name only a few pure built-ins "
            "(docs/config.md, 'What a config may run')"
        ),
    )
    r.add_argument(
        "--trusted",
        action="store_true",
        help="the config is as trusted as code: it may name any importable function",
    )
    r.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    r.set_defaults(func=cmd_run)


def _add_pack(sub: Any, debug: argparse.ArgumentParser) -> None:
    """The ``pack`` command's arguments."""
    k = sub.add_parser(
        "pack",
        parents=[debug],
        help="pack the files under SRC into WebDataset tar shards in OUT",
        description=(
            "Write the files under SRC as samples of tar shards OUT/shard-000000.tar, ... "
            "(each with a member index beside it): files sharing a relative path up to the "
            "first dot of their name are one sample, keyed by it, their extensions its "
            "fields (docs/shards.md)."
        ),
    )
    k.add_argument("src", metavar="SRC", help="the folder to pack")
    k.add_argument("out", metavar="OUT", help="the folder the shards go to (made if missing)")
    k.add_argument(
        "--shard-bytes",
        type=parse_size,
        default=256 << 20,
        metavar="SIZE",
        help="start a new shard past this size (default 256MiB)",
    )
    k.add_argument("--pattern", metavar="GLOB", help="only files matching GLOB under SRC")
    k.set_defaults(func=cmd_pack)


def cmd_pack(args: argparse.Namespace) -> int:
    """``iopipe pack``: a folder into shards; print one line per shard."""
    from ..shards import pack_folder

    if not os.path.isdir(args.src):
        raise InputError(f"{args.src}: not a folder")
    try:
        shards = pack_folder(args.src, args.out, shard_bytes=args.shard_bytes, pattern=args.pattern)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    for path in shards:
        print(path)
    return 0


def _bar(**kwargs: Any) -> Any:
    from tqdm import tqdm

    return tqdm(file=sys.stderr, disable=None, dynamic_ncols=True, **kwargs)


# -- probe -------------------------------------------------------------------------------


def cmd_probe(args: argparse.Namespace) -> int:
    """``iopipe probe``: measure the grid, print the table (or JSON), the advice, the plot."""
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise InputError("--plot needs matplotlib: pip install 'iopipe-ml[plot]'") from None
        folder = os.path.dirname(os.path.abspath(args.plot))
        if not os.path.isdir(folder):  # before the measurement, not after it
            raise InputError(f"--plot {args.plot}: the folder {folder} does not exist")
    read = None
    if args.path.startswith(("http://", "https://", "s3://")):
        from ..shards.remote import remote_files

        files, read = remote_files(args.path, args.pattern)
    else:
        files = sized_files(args.path, args.pattern)  # OSError: bad input, exit status 2
    cells = len(args.concurrency) * len(args.chunk_bytes)
    with _bar(total=cells, unit="cell") as bar:
        report = probe(
            args.path,
            files,
            concurrency=args.concurrency,
            chunk_bytes=args.chunk_bytes,
            cold=args.cold,
            duration=args.duration,
            repeats=args.repeats,
            min_time=args.min_time,
            progress=bar,
            read=read,
        )
    if args.plot:
        plot(report, args.plot)
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
        return 0
    temp = "cold: evicted before each measurement" if args.cold else "warm: page-cached"
    if not args.cold and not report.warmed:
        temp = "warm: not pre-read, larger than half the available memory"
    if read is not None:
        temp = "remote: ranged GETs, neither warmed nor evicted"
    print(
        f"probe: {report.files:,} files, {format_size_approx(report.bytes)} under "
        f"{args.path} ({temp}); {report.cpus} CPUs"
    )
    print(report.table())
    print(f"recommendation: {report.advice()}")
    if args.plot:
        print(f"plot: {args.plot}")
    return 0


def _oserror(exc: OSError) -> str:
    return str(exc.strerror) if exc.strerror and exc.filename is None else str(exc)


# -- run ---------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    """``iopipe run``: iterate a configured pipeline and report its stats and verdict."""
    from ..observe.verdict import bottleneck
    from ..pipeline.builder import Pipeline

    pipe = Pipeline.from_config(args.config, allow=args.allow, trusted=args.trusted)
    unit = "batches" if _batched(pipe) else "items"
    epochs: list[dict[str, Any]] = []
    with pipe:
        try:
            total: int | None = len(pipe)
        except TypeError:
            total = None
        if args.limit is not None:
            total = min(total, args.limit) if total is not None else args.limit
        for e in range(args.epochs):
            n = 0
            t0 = time.perf_counter()
            with _bar(total=total, unit=unit[:-1], desc=f"epoch {e}") as bar:
                for _ in pipe:
                    n += 1
                    bar.update(1)
                    if args.limit is not None and n >= args.limit:
                        break
            wall = time.perf_counter() - t0
            stats = pipe.stats()
            verdict = bottleneck(stats)
            tuner = stats.autotune
            epochs.append(_epoch_doc(e, n, wall, stats, verdict, tuner))
            if not args.json:
                rate = n / wall if wall > 0 else 0.0
                print(
                    f"epoch {e}: {n:,} {unit} in {wall:.2f} s ({rate:,.1f}/s); consumer "
                    f"waited {stats.consumer_wait_s:.2f} s ({stats.consumer_wait_share:.1%})"
                )
                print(stats.table())
                if tuner is not None:
                    state = tuner.phase
                    knobs = ", ".join(f"{k}={v}" for k, v in tuner.knobs.items())
                    print(f"autotune ({state}): {knobs}")
                print(f"verdict: {verdict}")
    if args.json:
        doc = {"schema": "iopipe.run/1", "config": args.config, "unit": unit, "epochs": epochs}
        print(json.dumps(doc, indent=1))
    return 0


def _batched(pipe: Any) -> bool:
    """Whether the pipeline yields batches (it has a batch stage)."""
    try:
        stages = pipe.to_config().get("stages", [])
    except (TypeError, ValueError):
        return False
    return any(isinstance(st, dict) and st.get("stage") == "batch" for st in stages)


def _epoch_doc(e: int, n: int, wall: float, stats: Any, verdict: Any, tuner: Any) -> dict[str, Any]:
    from ..observe.verdict import busy_share

    return {
        "epoch": e,
        "elements": n,
        "wall_s": round(wall, 6),
        "elements_per_s": round(n / wall, 3) if wall > 0 else 0.0,
        "consumer_wait_share": round(stats.consumer_wait_share, 4),
        "stages": [
            {
                "name": s.name,
                "concurrency": s.concurrency,
                "items": s.items,
                "items_per_s": round(s.items_per_s, 3),
                "bytes": s.bytes,
                "busy": round(busy_share(s, stats.elapsed_s), 4),
                "utilization": round(s.utilization, 4),
                "wait_input_s": round(s.wait_input_s, 6),
                "wait_output_s": round(s.wait_output_s, 6),
                "queue_mean": round(s.queue_mean, 3),
                "queue_capacity": s.queue_capacity,
            }
            for s in stats.stages
        ],
        "autotune": None if tuner is None else {"settled": tuner.settled, **tuner.knobs},
        "verdict": {"kind": verdict.kind, "stage": verdict.stage, "message": str(verdict)},
    }


# -- entry point -------------------------------------------------------------------------


def _reason(exc: BaseException) -> tuple[int, str]:
    """Exit status and one-line message for a failure."""
    from ..runtime.errors import StageError

    if isinstance(exc, InputError | ConfigError):
        return USAGE_ERROR, str(exc)
    if isinstance(exc, OSError):
        return USAGE_ERROR, _oserror(exc)
    if isinstance(exc, StageError) and isinstance(exc.__cause__, OSError):
        return USAGE_ERROR, str(exc)
    return FAILURE, f"{type(exc).__name__}: {exc}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``iopipe`` command; return its exit status."""
    # As `python -m iopipe` does: a config's "mymodule:fn" is found in the
    # current folder (a console script's sys.path[0] is its own bin folder).
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status: int = args.func(args)
        return status
    except KeyboardInterrupt:
        print(f"iopipe {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        status, reason = _reason(exc)
        line = " ".join(reason.split())  # one line, whatever the message holds
        print(f"iopipe {args.command}: error: {line}", file=sys.stderr)
        return status
