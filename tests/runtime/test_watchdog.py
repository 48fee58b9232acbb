"""The stall watchdog, timeouts that name the stuck stage and item, and stuck jobs.

Issue 7 items 2 ("a read or decode that never returns") and 3 (stall watchdog):
a starving consumer is told, on the ``"iopipe"`` logger, which stage holds its
data and which item is stuck there; with ``timeout`` the error says the same,
the epoch stops, ``close()`` does not wait for the stuck job, and the
interpreter exits promptly even though a worker thread never returns.  Stuck
functions block on events the tests release at the end (the leak fixture then
sees their threads end).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from torch.utils.data import Dataset

from iopipe import ConfigError, DataLoader, Pipeline
from iopipe.runtime.threads import WorkerPool
from iopipe.runtime.watchdog import StallTimeoutError
from tests._helpers import make_files

REPO = Path(__file__).resolve().parents[2]
#: Hang guard for a child interpreter (torch import included), not a timing assert.
CHILD_TIMEOUT_S = 60


class Gate:
    """A map function that blocks on item ``stuck`` until released (bounded)."""

    def __init__(self, stuck: int) -> None:
        self.stuck = stuck
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, x: int) -> int:
        if x == self.stuck:
            self.entered.set()
            self.release.wait(60)
        return x


@pytest.fixture
def gate() -> Iterator[Gate]:
    g = Gate(3)
    yield g
    g.release.set()


class Signal(logging.Handler):
    """Collects the ``iopipe`` logger's records; ``seen`` is set at the first one."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen = threading.Event()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        self.seen.set()


@pytest.fixture
def signal() -> Iterator[Signal]:
    handler = Signal()
    log = logging.getLogger("iopipe")
    log.addHandler(handler)
    yield handler
    log.removeHandler(handler)


# -- warnings --------------------------------------------------------------------------


def test_a_stall_warning_names_the_stage_and_item_and_the_wait_goes_on(
    gate: Gate, signal: Signal
) -> None:
    pipe = Pipeline.from_iterable(range(6), group_size=1, stall_warning=0.05).map(gate)
    with pipe:
        it = iter(pipe)
        assert [next(it) for _ in range(3)] == [0, 1, 2]
        # Release the stuck item once the watchdog has spoken: next() then returns it.
        releaser = threading.Thread(
            target=lambda: signal.seen.wait(30) and gate.release.set(), name="test-release"
        )
        releaser.start()
        assert next(it) == 3
        releaser.join(30)
        assert list(it) == [4, 5]
    first = signal.messages[0]
    assert first.startswith("iopipe: no data for ")
    assert "items are stuck in stage 'map' on item 3 for " in first
    assert "queued after each stage, items/capacity: source " in first


def test_warnings_repeat_while_the_wait_lasts_and_say_the_same(gate: Gate, signal: Signal) -> None:
    pipe = Pipeline.from_iterable(range(6), group_size=1, stall_warning=0.05, timeout=0.3)
    with pipe.map(gate, name="decode") as p:
        it = iter(p)
        assert [next(it) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(TimeoutError):
            next(it)
    # The first wait ends at the warning interval, before the timeout: one or more.
    assert signal.messages
    assert all("stuck in stage 'decode' on item 3" in m for m in signal.messages)


def test_stall_warning_none_logs_nothing(gate: Gate, signal: Signal) -> None:
    pipe = Pipeline.from_iterable(range(6), group_size=1, stall_warning=None, timeout=0.2)
    with pipe.map(gate) as p:
        it = iter(p)
        assert [next(it) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(TimeoutError):
            next(it)
    assert signal.messages == []


# -- timeouts ---------------------------------------------------------------------------


def test_the_timeout_error_names_stage_item_and_duration(gate: Gate) -> None:
    pipe = Pipeline.from_iterable(range(6), group_size=1, timeout=0.5, stall_warning=None)
    with pipe.map(gate) as p:
        it = iter(p)
        assert [next(it) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(
            TimeoutError,
            match=r"^iopipe: no data within timeout=0\.5 s; items are stuck in stage 'map' "
            r"on item 3 for \d+\.\d s$",
        ) as info:
            next(it)
    err = info.value
    assert isinstance(err, StallTimeoutError)
    assert err.stall.stage == "map"
    assert err.stall.jobs[0].keys == (3,)
    assert err.stall.jobs[0].running_s > 0


def test_a_stuck_job_in_a_fused_run_is_named_by_its_member(tmp_path: Path) -> None:
    make_files(tmp_path, [100] * 8)
    g = Gate(-1)
    seen: list[int] = []

    def stuck_on_fifth(buf: Any) -> int:
        seen.append(1)
        if len(seen) == 5:
            g.release.wait(60)
        return len(buf)

    pipe = (
        Pipeline.from_files(str(tmp_path / "*.bin"), timeout=0.5, stall_warning=None)
        .read(concurrency=1)
        .map(stuck_on_fifth, concurrency=1)
        .batch(4)
    )
    try:
        with pipe:
            it = iter(pipe)
            assert len(next(it)) == 4
            with pytest.raises(TimeoutError, match=r"stuck in stage 'map' on items '.*f0004\.bin'"):
                next(it)
    finally:
        g.release.set()


def test_close_after_a_timeout_does_not_wait_for_the_stuck_job(gate: Gate) -> None:
    pipe = Pipeline.from_iterable(range(6), group_size=1, timeout=0.3).map(gate, name="slow")
    it = iter(pipe)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(TimeoutError, match="stage 'slow' on item 3"):
        next(it)
    pipe.close()
    # close() returned although the job is still blocked: its thread was not joined.
    assert not gate.release.is_set()
    assert any(t.name.startswith("iopipe-slow_") for t in threading.enumerate())
    assert pipe._last is not None
    assert pipe._last.ended is not None  # the epoch was stopped


def test_a_stuck_source_iterable_is_named(tmp_path: Path) -> None:
    release = threading.Event()

    def gen() -> Iterator[int]:
        yield 1
        release.wait(60)

    try:
        pipe = Pipeline.from_iterable(gen(), group_size=1, timeout=0.5, stall_warning=None)
        with pipe.map(str) as p:
            it = iter(p)
            assert next(it) == "1"
            with pytest.raises(
                TimeoutError, match=r"timeout=0\.5 s; items are stuck in stage 'source' for "
            ):
                next(it)
    finally:
        release.set()


# -- the interpreter exits --------------------------------------------------------------

NEVER_RETURNS = """
    import signal, threading
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from iopipe import Pipeline

    def never(x):
        if x == 2:
            threading.Event().wait()  # a map that never returns
        return x

    pipe = {build}
    it = iter(pipe)
    try:
        for _ in it:
            pass
    except TimeoutError as exc:
        print("caught:", exc, flush=True)
    {finish}
"""

BUILDS = {
    "map": "Pipeline.from_iterable(range(10), group_size=1, timeout=0.5).map(never)",
    "read-map-batch": (
        "Pipeline.from_files('data/*.bin', timeout=0.5)"
        ".read().map(lambda b: never(int(b[0]))).batch(2)"
    ),
}


@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("finish", ["pipe.close()", "pass"], ids=["close", "no-close"])
def test_the_interpreter_exits_promptly_with_a_job_that_never_returns(
    build: str, finish: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for i in range(10):
        (data / f"{i:02d}.bin").write_bytes(bytes([i]) * 8)
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(NEVER_RETURNS.format(build=BUILDS[build], finish=finish)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run(
            [sys.executable, str(script)],
            capture_output=True,
            text=True,
            env=env,
            cwd=str(tmp_path),
            timeout=CHILD_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the child hung with a stuck job; stderr:\n{exc.stderr}")
    assert proc.returncode == 0, proc.stderr
    assert "caught: iopipe: no data within timeout=0.5 s; items are stuck in stage 'map'" in (
        proc.stdout
    )
    assert "Traceback" not in proc.stderr


STUCK_NO_TIMEOUT = """
    import threading
    from iopipe import Pipeline

    entered = threading.Event()

    def never(x):
        if x == 2:
            entered.set()
            threading.Event().wait()  # never returns; no timeout anywhere
        return x

    pipe = Pipeline.from_iterable(range(10), group_size=1).map(never)

    def consume():
        try:
            for _ in pipe:  # blocks in next() until exit closes the pipeline
                pass
        except Exception:
            pass

    threading.Thread(target=consume, daemon=True).start()
    entered.wait(30)
    print("leaving", flush=True)
"""


def test_the_interpreter_exits_with_a_stuck_job_and_no_timeout(tmp_path: Path) -> None:
    # At exit nobody waits for a running job: not the epoch's stop, not close().
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(STUCK_NO_TIMEOUT))
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run(
            [sys.executable, str(script)],
            capture_output=True,
            text=True,
            env=env,
            cwd=str(tmp_path),
            timeout=CHILD_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the child hung with a stuck job; stderr:\n{exc.stderr}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "leaving"
    assert "Traceback" not in proc.stderr


# -- DataLoader ----------------------------------------------------------------------------


class Blocking(Dataset[int]):
    """``dataset[5]`` blocks until ``release`` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> int:
        if i == 5:
            self.release.wait(60)
        return i


def test_the_dataloader_timeout_names_the_stuck_batch_and_indices() -> None:
    ds = Blocking()
    with DataLoader(ds, batch_size=2, timeout=0.4) as dl:
        try:
            it = iter(dl)
            assert [b.tolist() for b in (next(it), next(it))] == [[0, 1], [2, 3]]
            with pytest.raises(
                RuntimeError,
                match=r"^DataLoader timed out after 0\.4 seconds: no data within timeout=0\.4 s; "
                r"items are stuck in stage 'fetch' on batch 2 \(indices \[4, 5\]\) for \d",
            ):
                next(it)
        finally:
            ds.release.set()


# -- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1.5, "60", True])
def test_invalid_stall_warning_is_refused(bad: Any) -> None:
    with pytest.raises(
        ValueError, match=rf"stall_warning must be a number of seconds > 0 or None, got {bad!r}"
    ):
        Pipeline.from_iterable(range(3), stall_warning=bad)


def test_stall_warning_in_a_config() -> None:
    cfg = {"source": {"items": [1, 2]}, "options": {"stall_warning": 5}}
    pipe = Pipeline.from_config(cfg)
    assert pipe._spec.options.stall_warning == 5
    assert pipe.to_config()["options"] == {"stall_warning": 5}
    with pytest.raises(
        ConfigError, match=r"options\.stall_warning: expected a number > 0 or false \(off\), got 0"
    ):
        Pipeline.from_config({"source": {"items": [1]}, "options": {"stall_warning": 0}})


# -- WorkerPool ---------------------------------------------------------------------------------


def test_worker_pool_names_daemon_threads_and_grows_lazily() -> None:
    pool = WorkerPool(3, "iopipe-test")
    try:
        assert pool.submit(lambda: 7).result(10) == 7
        assert pool.submit(pow, 2, 5).result(10) == 32
        # One job at a time: the idle worker is reused, none is added.
        assert [t.name for t in pool.threads] == ["iopipe-test_0"]
        assert all(t.daemon for t in pool.threads)
    finally:
        pool.shutdown(wait=False)
        assert pool.join(10) == []


def test_worker_pool_shutdown_cancels_queued_jobs_and_refuses_new_ones() -> None:
    pool = WorkerPool(1, "iopipe-test")
    release = threading.Event()
    running = pool.submit(release.wait, 30)
    assert _wait(running.running)  # taken by the worker: only the next one is queued
    queued = pool.submit(lambda: 1)
    pool.shutdown(wait=False, cancel_futures=True)
    assert queued.cancelled()
    with pytest.raises(RuntimeError, match="cannot submit to 'iopipe-test' after shutdown"):
        pool.submit(lambda: 2)
    release.set()
    assert running.result(10) is True
    assert pool.join(10) == []


def test_worker_pool_join_skips_an_abandoned_job_and_bounds_the_rest() -> None:
    pool = WorkerPool(2, "iopipe-test")
    release = threading.Event()
    stuck = pool.submit(release.wait, 60)
    other = pool.submit(release.wait, 60)
    assert _wait(lambda: stuck.running() and other.running())
    pool.shutdown(wait=False)
    assert len(pool.join(0.05)) == 2  # bounded: both still run
    stuck.abandoned = other.abandoned = True
    assert len(pool.join(30)) == 2  # returns at once: nobody waits for abandoned jobs
    release.set()
    assert stuck.result(30) is True
    assert other.result(30) is True
    assert pool.join(30) == []  # and they end when their jobs return


def test_worker_pool_keeps_one_job_at_a_time_on_one_thread() -> None:
    """The worker goes idle before its result wakes the submitter, and is woken first."""
    pool = WorkerPool(4, "iopipe-test")
    try:
        ran_on = {
            pool.submit(lambda: threading.current_thread().name).result(10) for _ in range(200)
        }
        assert ran_on == {"iopipe-test_0"}
        assert len(pool.threads) == 1
        # Two at once need two threads; afterwards one at a time keeps to the last idle one.
        release = threading.Event()
        first = pool.submit(release.wait, 30)
        assert _wait(first.running)
        second = pool.submit(lambda: threading.current_thread().name)
        assert second.result(10) == "iopipe-test_1"
        release.set()
        assert first.result(10) is True
        names = [pool.submit(lambda: threading.current_thread().name).result(10) for _ in range(50)]
        assert len(set(names)) == 1
    finally:
        pool.shutdown(wait=False)
        assert pool.join(10) == []


def test_worker_pool_runs_queued_jobs_in_submit_order() -> None:
    pool = WorkerPool(1, "iopipe-test")
    release = threading.Event()
    order: list[int] = []
    try:
        blocker = pool.submit(release.wait, 30)
        jobs = [pool.submit(order.append, i) for i in range(20)]
        release.set()
        for j in [blocker, *jobs]:
            j.result(10)
        assert order == list(range(20))
    finally:
        pool.shutdown(wait=False)
        assert pool.join(10) == []


def test_governed_slots_go_to_the_lowest_waiting_batch() -> None:
    """A later batch must not take the slot an earlier one waits for (the consumer needs it)."""
    from iopipe.loader.workers import GovernedSlots

    slots = GovernedSlots(1, govern=False)
    entered: list[int] = []

    def fetch(n: int) -> None:
        slots.acquire(n)
        entered.append(n)
        slots.release()

    slots.acquire(0)
    late = threading.Thread(target=fetch, args=(5,))
    late.start()
    assert _wait(lambda: slots.limiter.statistics().tasks_waiting == 1)
    early = threading.Thread(target=fetch, args=(2,))
    early.start()
    assert _wait(lambda: slots.limiter.statistics().tasks_waiting == 2)
    slots.release()
    late.join(10)
    early.join(10)
    assert entered == [2, 5]


def test_worker_pool_rejects_a_bad_size() -> None:
    with pytest.raises(ValueError, match="max_workers must be an int >= 1, got 0"):
        WorkerPool(0, "iopipe-test")


def _wait(predicate: Any, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            return False
        tick.wait(0.005)
    return True
