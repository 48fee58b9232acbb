"""Tests of the bottleneck verdict and the periodic stats reports (iopipe/observe/verdict.py).

The verdict is checked on synthetic PipelineStats, one per kind of bottleneck, so
the figures are exact; one test takes it from a real pipeline end to end.
"""

from __future__ import annotations

import logging
import threading
from types import MappingProxyType
from typing import Any

import pytest

import iopipe
from iopipe import Pipeline, PipelineStats, StageStats, Verdict, bottleneck
from iopipe.observe.verdict import StatsReporter, busy_share

ELAPSED = 10.0


def stage(
    name: str,
    *,
    busy: float = 0.0,
    conc: int = 1,
    wait_in: float = 0.0,
    wait_out: float = 0.0,
    queue: float = 0.0,
    cap: int = 100,
    extra: dict[str, float] | None = None,
) -> StageStats:
    """A stage busy ``busy`` of its capacity, its output queue ``queue`` full on average."""
    return StageStats(
        name=name,
        concurrency=conc,
        items=1000,
        bytes=0,
        busy_s=busy * ELAPSED * conc,
        wait_input_s=wait_in * ELAPSED,
        wait_output_s=wait_out * ELAPSED,
        queue_capacity=cap,
        queue_mean=queue * cap,
        queue_now=0,
        elapsed_s=ELAPSED,
        extra=MappingProxyType(extra or {}),
    )


def pstats(*stages: StageStats, wait: float) -> PipelineStats:
    return PipelineStats(stages, ELAPSED, 1000, wait * ELAPSED, 0)


def test_a_saturated_stage_bounds_throughput() -> None:
    # map is busy all the time, its input queue full and its output queue empty;
    # upstream waits for room, downstream waits for input.
    stats = pstats(
        stage("source", busy=0.01, wait_out=0.99, queue=1.0),
        stage("read", busy=0.31, conc=4, wait_out=0.69, queue=0.95),
        stage("map", busy=0.97, conc=4, wait_in=0.03, queue=0.02),
        stage("batch", busy=0.05, wait_in=0.95, queue=0.0, cap=2),
        wait=0.41,
    )
    v = bottleneck(stats)
    assert (v.kind, v.stage) == ("stage", "map")
    assert str(v) == (
        "map bounds throughput: busy 97%; read busy 31%; batch busy 5%; "
        "the training loop waited 41.0% of the time"
    )
    assert v.busy["map"] == pytest.approx(0.97)
    assert v.consumer_wait_share == pytest.approx(0.41)


def test_a_stage_below_its_maximum_concurrency_still_counts_as_saturated() -> None:
    # The reader's governor holds it at one read of 16: utilization says 6%, but it
    # never waits for input or for room, so it is working all the time.
    s = stage("read", busy=1 / 16, conc=16, wait_in=0.0, wait_out=0.0)
    assert s.utilization == pytest.approx(1 / 16)
    assert busy_share(s) == 1.0


def test_the_source_bounds_throughput() -> None:
    # A slow iterable: the source works all the time, every stage waits for input.
    stats = pstats(
        stage("source", busy=0.98, wait_out=0.02, queue=0.0),
        stage("map", busy=0.10, conc=2, wait_in=0.9, queue=0.0),
        wait=0.85,
    )
    v = bottleneck(stats)
    assert (v.kind, v.stage) == ("source", "source")
    assert str(v) == (
        "source bounds throughput: busy 98%; map busy 10%; "
        "the training loop waited 85.0% of the time"
    )


def test_storage_bounds_throughput_and_the_reader_says_it_waited_on_io() -> None:
    stats = pstats(
        stage("source", busy=0.01, wait_out=0.99, queue=1.0),
        stage(
            "read",
            busy=0.95,
            conc=16,
            wait_in=0.05,
            queue=0.0,
            extra={"cpu_s": 0.15 * 0.95 * ELAPSED * 16},
        ),
        stage("map", busy=0.2, wait_in=0.8),
        wait=0.6,
    )
    v = bottleneck(stats)
    assert (v.kind, v.stage) == ("source", "read")
    assert str(v).startswith(
        "read bounds throughput (storage: reads waited on I/O 85% of their time): busy 95%"
    )


def test_cpu_bound_reads_are_told_apart_from_storage() -> None:
    stats = pstats(
        stage("source", busy=0.01, wait_out=0.99, queue=1.0),
        stage("read", busy=0.9, wait_in=0.1, extra={"cpu_s": 0.8 * 0.9 * ELAPSED}),
        wait=0.6,
    )
    assert "(CPU: reads spent 80% of their time on the CPU)" in str(bottleneck(stats))


def test_the_training_loop_bounds_throughput() -> None:
    # The consumer almost never waited: data was ready whenever it asked; every
    # stage is blocked on a full queue downstream.
    stats = pstats(
        stage("source", busy=0.01, wait_out=0.99, queue=1.0),
        stage("read", busy=0.2, conc=4, wait_out=0.8, queue=0.97),
        stage("map", busy=0.45, conc=2, wait_out=0.55, queue=0.99, cap=2),
        wait=0.004,
    )
    v = bottleneck(stats)
    assert (v.kind, v.stage) == ("consumer", None)
    assert str(v) == (
        "the training loop bounds throughput: it waited 0.4% of the time; "
        "the output queue was 99% full; busiest stage map busy 45%"
    )


def test_no_clear_bottleneck_when_the_consumer_waits_but_no_stage_is_saturated() -> None:
    stats = pstats(
        stage("source", busy=0.05, wait_out=0.95, queue=0.3),
        stage("read", busy=0.3, conc=8, wait_in=0.7, queue=0.2),
        stage("map", busy=0.45, conc=2, wait_in=0.55, queue=0.1),
        wait=0.35,
    )
    v = bottleneck(stats)
    assert (v.kind, v.stage) == ("none", None)
    assert str(v) == (
        "no clear bottleneck: the training loop waited 35.0% of the time but no stage is "
        "saturated (busiest map busy 45%); raise prefetch or concurrency to hide latency"
    )


def test_nothing_measured_yet() -> None:
    v = bottleneck(PipelineStats((), 0.0, 0, 0.0, 0))
    assert v == Verdict("none", None, message="no clear bottleneck: nothing delivered yet")
    assert str(v) == "no clear bottleneck: nothing delivered yet"


def test_verdict_is_exported_and_frozen() -> None:
    assert iopipe.bottleneck is bottleneck
    v = bottleneck(PipelineStats((), 0.0, 0, 0.0, 0))
    with pytest.raises(AttributeError):
        v.kind = "stage"  # type: ignore[misc]


def test_verdict_of_a_real_pipeline(tmp_path: Any) -> None:
    for i in range(64):
        (tmp_path / f"{i:03d}.bin").write_bytes(bytes(100))
    with Pipeline.from_files(str(tmp_path)).read(concurrency=2).batch(8) as pipe:
        assert sum(b.numel() for b in pipe) == 64 * 100
        v = bottleneck(pipe.stats())
    assert v.kind in ("stage", "source", "consumer", "none")
    assert set(v.busy) == {"source", "read", "batch"}
    assert str(v)
    assert "\n" not in str(v)


# -- periodic reports ---------------------------------------------------------------


def test_monitoring_options_are_validated() -> None:
    with pytest.raises(ValueError, match=r"stats_interval must be a number > 0 or None, got 0"):
        Pipeline.from_iterable(range(3), stats_interval=0)
    with pytest.raises(TypeError, match=r"on_stats must be callable or None, got 'log'"):
        Pipeline.from_iterable(range(3), on_stats="log")


class Gate:
    """Produces items until released; lets a test hold an epoch open without sleeping."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def __iter__(self) -> Any:
        yield 0
        self.release.wait(30)
        yield 1


def test_on_stats_and_the_log_receive_reports_while_the_epoch_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reported = threading.Event()
    seen: list[PipelineStats] = []

    def on_stats(stats: PipelineStats) -> None:
        seen.append(stats)
        reported.set()

    gate = Gate()
    caplog.set_level(logging.INFO, logger="iopipe")
    pipe = Pipeline.from_iterable(gate, stats_interval=0.01, on_stats=on_stats, group_size=1)
    with pipe:
        it = iter(pipe)
        assert next(it) == 0
        assert reported.wait(30), "no report while the epoch ran"
        gate.release.set()
        assert list(it) == [1]
    assert seen[0].stages[0].name == "source"
    assert seen[0].delivered >= 1
    # The log record precedes the callback in each report.
    logged = [r.getMessage() for r in caplog.records if r.name == "iopipe"]
    assert logged
    assert logged[0].splitlines()[1].startswith("epoch 0: ")


class FakeLoop:
    def __init__(self) -> None:
        self.scheduled: list[float] = []

    def call_later(self, delay: float, fn: Any, *args: Any) -> None:
        self.scheduled.append(delay)


def test_the_reporter_reschedules_while_running_and_stops_after_the_end() -> None:
    seen: list[PipelineStats] = []
    pipe = Pipeline.from_iterable(range(4))
    with pipe:
        it = iter(pipe)
        next(it)
        ep = pipe._last
        assert ep is not None
        reporter = StatsReporter(pipe, ep, 0.5, seen.append)
        loop = FakeLoop()
        ended = ep.ended
        ep.ended = None  # as seen mid-epoch
        reporter._tick(loop)
        assert loop.scheduled == [0.5]
        list(it)
        ep.ended = ended if ended is not None else 1.0
        reporter._tick(loop)  # the epoch is over: a last report, no new tick
        assert loop.scheduled == [0.5]
        assert [s.delivered for s in seen][-1] == 4
        # A newer epoch reports for itself: the old reporter goes quiet.
        list(pipe)
        reporter._tick(loop)
        assert len(seen) == 2


def test_a_failing_callback_is_logged_once_and_dropped(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    def bad(stats: PipelineStats) -> None:
        calls.append(1)
        raise RuntimeError("sink down")

    pipe = Pipeline.from_iterable(range(4))
    with pipe:
        list(pipe)
        reporter = StatsReporter(pipe, pipe._last, 1.0, bad)  # type: ignore[arg-type]
        caplog.set_level(logging.INFO, logger="iopipe")
        reporter.report(pipe.stats())
        reporter.report(pipe.stats())
    assert calls == [1]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "on_stats raised; it will not be called again" in errors[0].getMessage()


def test_a_stage_that_finished_early_counts_as_idle_since() -> None:
    # The source handed out everything in its first 0.1 s without ever waiting:
    # over the 10 s epoch it was busy 1%, not 100%.
    early = StageStats("source", 1, 1000, 0, 0.05, 0.0, 0.0, 100, 0.0, 0, 0.1)
    assert busy_share(early) == 1.0  # over its own run
    assert busy_share(early, ELAPSED) == pytest.approx(0.01)
    stats = pstats(
        early,
        stage("map", busy=0.9, conc=2, wait_in=0.05),
        wait=0.5,
    )
    assert bottleneck(stats).stage == "map"


# -- fused pipelines (the default): one busy figure, right verdicts ------------------


def _slow(x: Any) -> Any:
    import time

    time.sleep(0.01)
    return x


def _fused_run(tmp_path: Any, *, map_fn: Any, consumer_s: float, files: int = 40) -> Any:
    import time

    for i in range(files):
        (tmp_path / f"{i:03d}.bin").write_bytes(bytes(64))
    pipe = Pipeline.from_files(str(tmp_path)).read(concurrency=1).map(map_fn).batch(4)
    with pipe:
        for _ in pipe:
            time.sleep(consumer_s)
        stats = pipe.stats()
    return stats, bottleneck(stats)


def _nothing(x: Any) -> Any:
    return x


def test_fused_slow_consumer_is_the_bottleneck_and_no_stage_reads_busy(tmp_path: Any) -> None:
    stats, v = _fused_run(tmp_path, map_fn=_nothing, consumer_s=0.05)
    assert v.kind == "consumer", str(v)
    # Every member of the fused run waited for the consumer: none was busy most of the time.
    for s in stats.stages:
        assert v.busy[s.name] < 0.5, (s.name, v.busy, str(stats))
    # The table prints the verdict's busy figure.
    table = stats.table()
    for s in stats.stages:
        row = next(line for line in table.splitlines() if line.startswith(s.name + " "))
        assert f"{v.busy[s.name]:.0%}" in row.split(), (row, v.busy)


def test_fused_slow_map_is_named(tmp_path: Any) -> None:
    _, v = _fused_run(tmp_path, map_fn=_slow, consumer_s=0.0)
    assert v.kind == "stage", str(v)
    assert v.stage == "map", str(v)


class _SlowSource:
    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self) -> Any:
        import time

        for i in range(self.n):
            time.sleep(0.01)
            yield i

    def __len__(self) -> int:
        return self.n


def test_fused_slow_source_is_named() -> None:
    with Pipeline.from_iterable(_SlowSource(40)).map(_nothing).batch(4) as pipe:
        assert sum(len(b) for b in pipe) == 40
        v = bottleneck(pipe.stats())
    assert v.kind == "source", str(v)
    assert v.stage == "source", str(v)
    assert v.busy["map"] < 0.5, str(v)


def test_the_table_prints_figures_rounded_not_raw_floats() -> None:
    extra = {"cpu_s": 0.0116726, "hits": 12, "bytes_held": 123456.789, "ratio": 2.5}
    text = pstats(stage("read", busy=0.123456, wait_in=0.0333333, extra=extra), wait=0.5).table()
    assert "read: cpu_s=0.0117, hits=12, bytes_held=123,457, ratio=2.5" in text.splitlines()
    row = next(line for line in text.splitlines() if line.startswith("read "))
    busy, wait_in, wait_out = row.split()[5:8]
    assert busy.endswith("%")
    assert busy[:-1].isdigit()
    assert (wait_in, wait_out) == ("0.33s", "0.00s")
    assert "0.0116726" not in text
    assert "e+" not in text
