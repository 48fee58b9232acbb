"""The helped loads (iopipe/loader/helped.py): the judge, and the run's order, bounds and errors."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from iopipe.loader.helped import run_helped
from iopipe.loader.judge import HELP_AWAY_S, HelpJudge
from iopipe.loader.workers import Failed

CLOCK = {"now": 0.0}  # the drives of one test share a clock that only moves forward


def drive(judge: HelpJudge, away: float, fetch_off: float, fetch_on: float, n: int) -> list[bool]:
    """Feed ``n`` batches: away ``away`` s each; a batch takes ``fetch_on`` s when helped."""
    now, helping, out = CLOCK["now"], False, []
    for _ in range(n):
        now += away
        helping_next = judge.step(away, now) > 0
        now += fetch_on if helping else fetch_off
        helping = helping_next
        out.append(helping)
    CLOCK["now"] = now
    return out


def test_a_loop_that_comes_straight_back_is_never_helped() -> None:
    judge = HelpJudge()
    assert not any(drive(judge, HELP_AWAY_S / 10, 0.001, 0.0, 500))


def test_help_is_kept_where_it_makes_batches_come_faster() -> None:
    judge = HelpJudge(window=8, hold=4)
    out = drive(judge, 0.01, 0.005, 0.0001, 200)  # a GPU step overlapping the load
    assert out[:5] == [False] * 5  # measured without help first
    assert judge.helping
    assert sum(out) > 0.8 * len(out)


def test_help_is_dropped_where_it_does_not_pay() -> None:
    judge = HelpJudge(window=8, hold=4)
    out = drive(judge, 0.01, 0.005, 0.006, 400)  # helped batches came slower (contention)
    assert not judge.helping
    # only the measuring windows help: 8 of every 8 + 8 + 32 batches
    assert sum(out) < 0.25 * len(out)


def test_the_verdict_is_measured_again_after_the_hold() -> None:
    judge = HelpJudge(window=4, hold=2)
    drive(judge, 0.01, 0.005, 0.006, 40)
    assert not judge.helping
    drive(judge, 0.01, 0.005, 0.0001, 40)  # the loop changed: now help pays
    assert judge.helping


class Recorder:
    def __init__(self, sleep: float = 0.0, fail_at: int = -1) -> None:
        self.sleep, self.fail_at = sleep, fail_at
        self.lock = threading.Lock()
        self.active = self.max_active = 0
        self.threads: set[str] = set()

    def __call__(self, job: tuple[int, Any]) -> Any:
        n, x = job
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.threads.add(threading.current_thread().name)
        try:
            time.sleep(self.sleep)
            if n == self.fail_at:
                raise KeyboardInterrupt  # a BaseException: fn turns the rest into Failed
            return x * 10
        finally:
            with self.lock:
                self.active -= 1


def test_helped_run_keeps_order_one_load_at_a_time_and_stops() -> None:
    fn = Recorder(sleep=0.001)
    run = run_helped(fn, enumerate(range(60)), pin=False)
    got = []
    for b in run:
        got.append(b)
        time.sleep(0.004)  # away long enough to be helped, and helped batches come faster
    assert got == [x * 10 for x in range(60)]
    assert fn.max_active == 1
    assert any(n.startswith("iopipe-helper") for n in fn.threads)
    assert not [t for t in threading.enumerate() if t.name.startswith("iopipe-helper")]


def test_a_job_that_raises_in_the_helper_is_raised_at_its_turn() -> None:
    fn = Recorder(sleep=0.001, fail_at=30)
    run = run_helped(fn, enumerate(range(60)), pin=False)
    got: list[Any] = []

    def train() -> None:
        for b in run:
            got.append(b)
            time.sleep(0.004)

    with pytest.raises(KeyboardInterrupt):
        train()
    assert got == [x * 10 for x in range(30)]  # every batch before it, in order
    assert not [t for t in threading.enumerate() if t.name.startswith("iopipe-helper")]


def test_failed_batches_travel_in_order() -> None:
    def fn(job: tuple[int, Any]) -> Any:
        return Failed(ValueError(job[0])) if job[0] % 7 == 3 else job[1]

    got = list(run_helped(fn, enumerate(range(40)), pin=False))
    assert [g for g in got if not isinstance(g, Failed)] == [x for x in range(40) if x % 7 != 3]
    assert [g.exc.args[0] for g in got if isinstance(g, Failed)] == [3, 10, 17, 24, 31, 38]


def test_a_dropped_run_retires_its_helper() -> None:
    fn = Recorder(sleep=0.001)
    it = iter(run_helped(fn, enumerate(range(10_000)), pin=False))
    for _ in range(30):
        next(it)
        time.sleep(0.004)
    del it  # the generator's finally stops and joins the helper
    assert not [t for t in threading.enumerate() if t.name.startswith("iopipe-helper")]


def test_a_sampler_error_in_a_helper_is_raised_after_the_batches_before_it() -> None:
    def jobs() -> Any:
        for i in range(100):
            if i == 30:
                raise LookupError("the sampler broke")
            yield i, i

    fn = Recorder(sleep=0.001)
    run = run_helped(fn, jobs(), pin=False, depth=4, helpers=2, judge=HelpJudge(2, gate_away=False))
    got: list[Any] = []

    def train() -> None:
        got.extend(run)

    with pytest.raises(LookupError, match="the sampler broke"):
        train()
    assert got == [x * 10 for x in range(30)]
    assert not [t for t in threading.enumerate() if t.name.startswith("iopipe-helper")]


def test_a_stopped_run_keeps_no_batch_and_its_stats_stop_counting() -> None:
    fn = Recorder(sleep=0.002)
    run = run_helped(
        fn,
        enumerate(range(1000)),
        pin=False,
        depth=4,
        helpers=2,
        judge=HelpJudge(2, gate_away=False),
    )
    it = iter(run)
    for _ in range(10):
        next(it)
    run.stop()  # helpers may be loading: what they finish now is dropped
    stats = run.stats(0)
    assert stats.stage("fetch").queue_now == 0
    time.sleep(0.05)
    assert run.stats(0).elapsed_s == stats.elapsed_s
    assert list(it) == []  # the epoch is over for its iterator too


def test_helpers_that_pin_run_on_the_consumers_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    calls: list[tuple[str, int]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(
        torch.cuda, "set_device", lambda d: calls.append((threading.current_thread().name, d))
    )

    def fn(job: tuple[int, Any]) -> Any:  # a Failed batch is never pinned
        time.sleep(0.001)
        return Failed(ValueError(job[0]))

    run = run_helped(
        fn, enumerate(range(40)), pin=True, depth=4, helpers=2, judge=HelpJudge(2, gate_away=False)
    )
    assert len(list(run)) == 40
    assert calls
    assert all(name.startswith("iopipe-helper") and d == 3 for name, d in calls)
