"""Lifecycle tests: break, del, close, with, errors, KeyboardInterrupt, interpreter exit.

Every way of leaving an epoch or a pipeline must stop the work in flight, close
files and join threads within a bounded time (issue 2, "Lifecycle").  The suite's
leak fixture (conftest.py) checks threads and descriptors after each test; these
tests also check them *at the moment* the pipeline should have let go.
"""

from __future__ import annotations

import _thread
import gc
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from iopipe import Pipeline, PipelineClosedError
from tests._helpers import (
    CountingSequence,
    check_close_midway,
    fd_table,
    iopipe_threads,
    join_threads,
    make_files,
    wait_until,
)

REPO = Path(__file__).resolve().parents[2]
#: Bound on a child interpreter's whole run, import of torch included (not a timing assert:
#: a pipeline that kept the interpreter alive would hang it forever).
CHILD_TIMEOUT_S = 60


def slow_pipeline(n: int = 10**6, **options: Any) -> Pipeline[Any]:
    def slow(x: int) -> int:
        time.sleep(0.001)
        return x

    return Pipeline.from_iterable(range(n), **options).map(slow, concurrency=2).batch(4)


def new_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    return [t for t in iopipe_threads() if t not in before]


# -- break ---------------------------------------------------------------------------


def test_break_stops_the_epoch_and_the_next_iter_starts_afresh() -> None:
    seq = CountingSequence(10**6)
    with Pipeline.from_iterable(seq, group_size=8).map(lambda x: x) as pipe:
        for x in pipe:
            assert x == 0
            break
        ep = pipe._last
        assert ep is not None
        # Stopping waited for the epoch's task: nothing of it runs any more.
        assert ep.ended is not None
        produced = seq.produced
        assert produced < 10**6
        assert [x for _, x in zip(range(5), pipe, strict=False)] == [0, 1, 2, 3, 4]
        assert pipe._last is not ep


def test_state_after_a_break_is_where_the_consumer_stood() -> None:
    with Pipeline.from_iterable(range(100), group_size=8) as pipe:
        for i, _ in enumerate(pipe):
            if i == 10:
                break
        assert pipe.state_dict() == {"epoch": 0, "consumed": 11}
        state = pipe.state_dict()
    with Pipeline.from_iterable(range(100), group_size=8) as again:
        again.load_state_dict(state)
        assert list(again) == list(range(11, 100))


def test_200_early_breaks_leave_no_threads_or_descriptors(tmp_path: Path) -> None:
    make_files(tmp_path, [100, 5000, 20_000] * 20)
    pipe = (
        Pipeline.from_files(str(tmp_path / "*.bin"))
        .read(chunk_bytes=4096, concurrency=4)
        .map(len)
        .batch(4)
    )
    with pipe:
        for _ in pipe:  # warm up: the runtime's threads start once
            break
        fds = fd_table()
        for _ in range(200):
            for _ in pipe:
                break
        # Worker pools grow lazily up to their size, never beyond: the loop thread,
        # 4 readers, 4 decoders and the collating thread, whatever the breaks.
        names = sorted(t.name.rsplit("_", 1)[0] for t in iopipe_threads())
        assert len(names) <= 1 + 4 + 4 + 1, names
        assert set(names) <= {"iopipe-loop", "iopipe-read", "iopipe-map", "iopipe-batch"}
        assert fd_table().keys() == fds.keys()
        assert sum(len(b) for b in pipe) == 60  # still whole after all that


def test_many_abandoned_pipelines_leave_nothing_behind() -> None:
    base = set(iopipe_threads())
    fds = fd_table()
    for _ in range(30):
        pipe = slow_pipeline(group_size=4)
        it = iter(pipe)
        next(it)
        del it, pipe  # no close(): dropping the last reference stops everything
        assert new_threads(base) == []
    assert fd_table().keys() == fds.keys()


# -- close, with, del ------------------------------------------------------------------


def test_close_midway_joins_threads_and_stays_closed() -> None:
    check_close_midway(lambda: slow_pipeline(), take=3)


def test_next_after_close_raises_even_with_items_buffered() -> None:
    pipe = Pipeline.from_iterable(range(1000))  # groups of 64: 63 items stay buffered
    it = iter(pipe)
    assert next(it) == 0
    pipe.close()
    with pytest.raises(PipelineClosedError, match="closed"):
        next(it)
    with pytest.raises(PipelineClosedError):
        list(pipe)


def test_close_before_iterating_and_twice_is_fine() -> None:
    pipe = Pipeline.from_iterable(range(10)).map(str)
    pipe.close()
    pipe.close()
    with pytest.raises(PipelineClosedError, match="this pipeline was closed"):
        iter(pipe)


def test_close_from_another_thread_wakes_a_waiting_consumer() -> None:
    release = threading.Event()
    entered = threading.Event()

    def stuck(x: int) -> int:
        if x == 1:
            entered.set()
            release.wait(30)
        return x

    pipe = Pipeline.from_iterable(range(10), group_size=1).map(stuck)
    it = iter(pipe)
    assert next(it) == 0
    assert entered.wait(30)
    closer = threading.Thread(target=pipe.close, name="test-closer")
    # close() waits (bounded) for the stuck worker; let it go once close() has begun.
    closer.start()
    with pytest.raises(PipelineClosedError):
        next(it)
    release.set()
    closer.join(30)
    assert not closer.is_alive()


def test_with_block_closes_on_exit_and_on_error() -> None:
    base = set(iopipe_threads())
    with slow_pipeline() as pipe:
        next(iter(pipe))
        assert new_threads(base)
    assert new_threads(base) == []
    assert pipe._closed

    def train() -> None:
        with slow_pipeline() as pipe2:
            for _ in pipe2:
                raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        train()
    assert new_threads(base) == []


def test_del_mid_epoch_joins_threads_at_once() -> None:
    base = set(iopipe_threads())
    pipe = slow_pipeline()
    it = iter(pipe)
    next(it)
    started = new_threads(base)
    assert any(t.name == "iopipe-loop" for t in started)
    del it, pipe
    assert [t.name for t in started if t.is_alive()] == []


def test_a_pipeline_in_a_reference_cycle_is_released_by_the_collector() -> None:
    class Holder:
        pass

    base = set(iopipe_threads())
    h = Holder()
    h.me = h  # type: ignore[attr-defined]
    h.pipe = slow_pipeline()  # type: ignore[attr-defined]
    h.it = iter(h.pipe)  # type: ignore[attr-defined]
    next(h.it)  # type: ignore[attr-defined]
    started = new_threads(base)
    del h
    gc.collect()
    assert join_threads(started, 10.0) == []


# -- exceptions and KeyboardInterrupt in the loop body ---------------------------------------


def train_and_fail(pipe: Pipeline[Any], exc: type[BaseException]) -> None:
    for _ in pipe:
        raise exc("from the training loop")


@pytest.mark.parametrize("exc", [ValueError, KeyboardInterrupt])
def test_an_exception_in_the_loop_body_stops_the_epoch(exc: type[BaseException]) -> None:
    seq = CountingSequence(10**6)
    with Pipeline.from_iterable(seq, group_size=8).map(lambda x: x).batch(4) as pipe:
        with pytest.raises(exc):
            train_and_fail(pipe, exc)
        ep = pipe._last
        assert ep is not None
        assert ep.ended is not None  # stopped, not left running in the background
        assert seq.produced < 10**6
        assert len(next(iter(pipe))) == 4  # and the pipeline can start a new epoch


def test_keyboard_interrupt_while_waiting_for_data() -> None:
    # SIGINT in the main thread while it is blocked in next(): the interrupt surfaces
    # at once (no hang in the hand-off wait) and the epoch is stopped.
    entered = threading.Event()
    release = threading.Event()

    def stuck(x: int) -> int:
        if x == 1:
            entered.set()
            release.wait(30)
        return x

    main = threading.main_thread()

    def main_waits_in_handoff() -> bool:
        frame = sys._current_frames().get(main.ident or -1)
        while frame is not None:
            if frame.f_code.co_name == "get" and frame.f_code.co_filename.endswith("channels.py"):
                return True
            frame = frame.f_back
        return False

    def interrupt() -> None:
        # Interrupt only once the main thread is inside the hand-off wait.
        if entered.wait(30) and wait_until(main_waits_in_handoff, 30):
            _thread.interrupt_main()

    # A suite started as a background shell job inherits SIGINT ignored, and then
    # interrupt_main() does nothing: install Python's own handler for this test.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _interrupted_in_handoff(stuck, interrupt, release)
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupted_in_handoff(
    stuck: Callable[[int], int], interrupt: Callable[[], None], release: threading.Event
) -> None:
    with Pipeline.from_iterable(range(10), group_size=1).map(stuck) as pipe:
        it = iter(pipe)
        assert next(it) == 0
        helper = threading.Thread(target=interrupt, name="test-interrupt")
        helper.start()
        with pytest.raises(KeyboardInterrupt):
            next(it)
        helper.join(30)
        release.set()
        ep = pipe._last
        assert ep is not None
        assert ep.ended is not None
        assert list(pipe) == list(range(10))


# -- child interpreters ---------------------------------------------------------------


def run_child(script: str, tmp_path: Path) -> subprocess.Popen[str]:
    path = tmp_path / "child.py"
    # A shell that starts a job in the background makes it ignore SIGINT, and a
    # Python started so keeps ignoring it: restore the default handler first.
    path.write_text(
        "import signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
        + textwrap.dedent(script)
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=str(tmp_path),
    )


def wait_for_line(proc: subprocess.Popen[str], want: str) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        line = proc.stdout.readline()
        if line.strip() == want:
            return
        if not line:
            break
    proc.kill()
    _, err = proc.communicate()
    pytest.fail(f"child never printed {want!r}; stderr:\n{err}")


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"child did not exit within {CHILD_TIMEOUT_S} s; stderr:\n{err}")
    return proc.returncode, out, err


SLOW_SCRIPT = """
    import time
    from iopipe import Pipeline

    def slow(x):
        time.sleep(0.05)  # a slow decode
        return x

    pipe = Pipeline.from_iterable(range(10**6)).map(slow, concurrency=2)
    it = iter(pipe)
    next(it)
    print("ready", flush=True)
    for _ in it:  # stuck iterating a slow pipeline
        pass
"""


@pytest.mark.slow
def test_sigint_stops_a_script_iterating_a_slow_pipeline(tmp_path: Path) -> None:
    proc = run_child(SLOW_SCRIPT, tmp_path)
    wait_for_line(proc, "ready")
    proc.send_signal(signal.SIGINT)
    code, _, err = finish(proc)
    assert "KeyboardInterrupt" in err
    assert code != 0
    assert "Traceback" in err
    assert "iopipe" not in err.split("KeyboardInterrupt")[-1]  # nothing after: clean exit


EXIT_SCRIPTS = {
    "global": """
        import time
        from iopipe import Pipeline

        def slow(x):
            time.sleep(0.01)
            return x

        pipe = Pipeline.from_files("data/*.bin").read(chunk_bytes=4096).map(len).batch(2)
        it = iter(pipe)
        next(it)
        print("left mid-epoch", flush=True)
    """,
    "cycle": """
        from iopipe import Pipeline

        class Trainer:
            def __init__(self):
                self.me = self
                self.pipe = Pipeline.from_iterable(x for x in range(10**6)).map(str)
                self.it = iter(self.pipe)

        t = Trainer()
        next(t.it)
        print("left mid-epoch", flush=True)
    """,
    "stuck-consumer-thread": """
        import threading
        from iopipe import Pipeline

        pipe = Pipeline.from_iterable(range(10**6), group_size=2).map(str).prefetch(8)
        started = threading.Event()

        def consume():
            for _ in pipe:
                started.set()
                threading.Event().wait(3600)  # a daemon consumer that never returns

        threading.Thread(target=consume, daemon=True).start()
        started.wait(30)
        print("left mid-epoch", flush=True)
    """,
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(EXIT_SCRIPTS))
def test_the_interpreter_exits_with_a_pipeline_left_mid_epoch(kind: str, tmp_path: Path) -> None:
    make_files(tmp_path / "data", [10, 5000, 9000, 3] * 10)
    proc = run_child(EXIT_SCRIPTS[kind], tmp_path)
    code, out, err = finish(proc)
    assert out.strip() == "left mid-epoch"
    assert code == 0, err
    assert "Traceback" not in err, err


# -- the leak probes themselves ------------------------------------------------------------


def test_the_leak_probes_see_threads_and_descriptors() -> None:
    before = fd_table()
    r, w = os.pipe()
    try:
        assert {r, w} <= fd_table().keys() - before.keys()
    finally:
        os.close(r)
        os.close(w)
    assert fd_table().keys() == before.keys()
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, name="iopipe-probe-check")
    t.start()
    assert t in iopipe_threads()
    stop.set()
    assert join_threads([t], 10) == []


def test_a_job_that_never_returns_is_waited_for_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopping the epoch waits for a running job (bounded); close() then does not wait again.

    (It waited once more per step: a break then close() took 10 s + 10 s, close() alone 20 s.)
    """
    import iopipe.pipeline.epoch as epoch_module

    monkeypatch.setattr(epoch_module, "STOP_TIMEOUT_S", 0.2)
    release = threading.Event()

    def stuck(x: int) -> int:
        if x == 1:
            release.wait(60)
        return x

    pipe = Pipeline.from_iterable(range(4), group_size=1, stall_warning=None, fuse=False)
    pipe = pipe.map(stuck)
    try:
        it = iter(pipe)
        next(it)
        stage = it._ep.rt.stages[0]  # the epoch's copy of the map stage
        deadline = time.monotonic() + 10
        while not stage.running_jobs() and time.monotonic() < deadline:
            time.sleep(0.01)
        jobs = list(stage._inflight)
        assert jobs  # the stuck job runs
        del it  # stops the epoch: waits for the job up to the bound, then gives up on it
        running = [job for job in jobs if not job.done()]
        assert running  # the stuck one
        assert all(job.abandoned for job in running)
        pipe.close()
    finally:
        release.set()
        for job in jobs:
            if not job.cancelled():  # a job still queued at the stop was cancelled, never ran
                job.exception(30)  # its thread ends before the leak checks look
