"""Tests of autotuning (iopipe/control/autotune.py).

The controller is driven by synthetic measurements: a fake stage whose time per
item depends on how many calls are in flight, so its throughput peaks at a known
concurrency.  Deterministic, no clocks: the assertions are on the setting chosen
after a number of measurements.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pytest

from iopipe import Pipeline
from iopipe.control.autotune import AutoTuner, make_tuner
from iopipe.control.climber import HillClimber, Knob
from iopipe.runtime.limits import CapacityLimiter
from iopipe.stages.decode import Decoder
from iopipe.stages.prefetch import Prefetcher

MAX_STEPS = 60


def peaked(peak: int) -> Callable[[int], float]:
    """Throughput of a fake stage with ``c`` calls in flight.

    Up to ``peak`` calls each item takes 1 s (the calls overlap perfectly); beyond
    it they contend and each takes ``(c / peak) ** 2`` s, so items/s is ``c`` up
    to the peak and ``peak**2 / c`` after it.
    """

    def rate(c: int) -> float:
        per_item_s = 1.0 if c <= peak else (c / peak) ** 2
        return c / per_item_s

    return rate


def cheapest_within(f: Callable[[int], float], hi: int = 64, tolerance: float = 0.05) -> int:
    """The least concurrency whose throughput is within ``tolerance`` of the peak's."""
    top = max(f(c) for c in range(1, hi + 1))
    return min(c for c in range(1, hi + 1) if f(c) >= (1 - tolerance) * top)


def drive(
    climber: HillClimber, rate: Callable[[Mapping[str, int]], float], steps: int = MAX_STEPS
) -> int:
    """Feed ``climber`` the rate of each setting it proposes until it settles; return the steps."""
    for step in range(steps):
        if climber.settled:
            return step
        climber.observe(rate(climber.setting))
    raise AssertionError(f"not settled after {steps} steps: at {climber.best}")


@pytest.mark.parametrize("peak", [1, 2, 3, 6, 13, 40, 64])
@pytest.mark.parametrize("start", [1, 4, 64])
def test_converges_on_the_concurrency_where_throughput_peaks(peak: int, start: int) -> None:
    climber = HillClimber([Knob("map", 1, 64, start)])
    f = peaked(peak)
    steps = drive(climber, lambda s: f(s["map"]))
    # Up to 19 the peak is the only setting within 5% of itself; beyond, the climber
    # settles on the cheapest concurrency within 5% of the peak (38 for 40).
    assert climber.best == {"map": cheapest_within(f)}
    if peak < 20:
        assert climber.best == {"map": peak}
    assert steps <= 45


def test_a_plateau_settles_on_its_cheapest_end() -> None:
    # More than 5 in flight buys nothing: stay at 5, not at whatever was tried last.
    climber = HillClimber([Knob("read", 1, 64, 1)])
    drive(climber, lambda s: float(min(s["read"], 5)))
    assert climber.best == {"read": 5}


def test_moves_down_within_tolerance_of_the_best_never_drift_further() -> None:
    # Each step down loses 3% (under the 5% tolerance); the losses must not add up.
    climber = HillClimber([Knob("read", 1, 64, 32)], tolerance=0.05)
    drive(climber, lambda s: 100.0 * 0.97 ** (32 - s["read"]) if s["read"] <= 32 else 100.0)
    (value,) = climber.best.values()
    assert 100.0 * 0.97 ** (32 - value) >= 95.0


def test_measurement_noise_below_the_tolerance_does_not_move_the_answer() -> None:
    noise = iter(np.random.default_rng(7).uniform(0.985, 1.015, size=MAX_STEPS))
    f = peaked(6)
    climber = HillClimber([Knob("map", 1, 64, 1)])
    drive(climber, lambda s: f(s["map"]) * next(noise))
    assert climber.best == {"map": 6}


def test_two_knobs_are_tuned_in_turn_within_the_cpu_budget() -> None:
    # The pipeline delivers at the pace of its slower stage.  Reads peak at 13 in
    # flight (130 items/s); decode would peak at 6 workers but the CPU budget
    # allows 4 (160 items/s, and 3 would be too few: 120).
    read, decode = peaked(13), peaked(6)
    climber = HillClimber(
        [Knob("read", 1, 64, 8), Knob("map", 1, 16, 1)],
        feasible=lambda s: s["map"] <= 4,
    )
    drive(climber, lambda s: min(read(s["read"]) * 10, decode(s["map"]) * 40))
    assert climber.best == {"read": 13, "map": 4}


def test_a_setting_outside_the_budget_is_never_measured() -> None:
    seen: list[int] = []

    def rate(s: Mapping[str, int]) -> float:
        seen.append(s["map"])
        return peaked(6)(s["map"])

    climber = HillClimber([Knob("map", 1, 64, 1)], feasible=lambda s: s["map"] <= 3)
    drive(climber, rate)
    assert climber.best == {"map": 3}
    assert max(seen) == 3


def test_a_lasting_change_in_throughput_restarts_the_search() -> None:
    f, g = peaked(6), peaked(20)
    climber = HillClimber([Knob("read", 1, 64, 1)], drift=0.3, drift_windows=3)
    drive(climber, lambda s: f(s["read"]))
    assert climber.best == {"read": 6}
    # One noisy window among normal ones: the median of the last three holds.
    for rate in (1.0, f(6), f(6)):
        climber.observe(rate)
    assert climber.settled
    # The storage got faster and stays so: one window is not a trend, two of the
    # last three are, and the search restarts.
    climber.observe(g(6) * 2)
    assert climber.settled
    climber.observe(g(6) * 2)
    assert not climber.settled
    drive(climber, lambda s: g(s["read"]))
    assert climber.best == {"read": cheapest_within(g)} == {"read": 19}


def test_the_same_measurements_give_the_same_settings() -> None:
    def run() -> list[dict[str, int]]:
        climber = HillClimber([Knob("a", 1, 32, 2), Knob("b", 1, 8, 1)])
        trail = []
        while not climber.settled:
            s = climber.setting
            trail.append(s)
            climber.observe(peaked(11)(s["a"]) + peaked(3)(s["b"]))
        return trail

    assert run() == run()


def test_knob_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match=r"knob m: need lo <= start <= hi"):
        Knob("m", 1, 4, 5)
    with pytest.raises(ValueError, match=r"HillClimber needs at least one knob"):
        HillClimber([])


# -- the tuner attached to stages: synthetic clock, real limiters -------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_tuner_sets_a_stage_limit_to_the_peak_from_delivered_groups() -> None:
    # A fake map stage whose throughput peaks at 5 jobs in flight; the clock
    # advances by the time each delivered group of 64 items takes at the current limit.
    stage = Decoder(int, concurrency=16, executor="inline")
    stage.autotune = True
    stage.open(64)
    clock = FakeClock()
    tuner = AutoTuner(
        [stage], group_size=64, cpu_budget=16, memory_budget_bytes=1 << 30, clock=clock
    )
    assert stage.limiter is not None
    f = peaked(5)
    for _ in range(400):
        clock.now += 64 / f(stage.limiter.total_tokens)
        tuner.on_group(64)
        if tuner.climber.settled:
            break
    assert tuner.climber.settled
    assert stage.limiter.total_tokens == 5
    assert stage.counters.concurrency == 5
    # Every window was measured at one setting, and the tuner saw the peak.
    assert max(tuner.history, key=lambda h: h[1])[0] == {"map": 5}


def test_the_tuner_keeps_map_jobs_within_the_cpu_budget() -> None:
    stages = [
        Decoder(int, concurrency=8, executor="process"),
        Decoder(int, concurrency=8, executor="inline", name="map_1"),
        Decoder(int, concurrency=8, executor="thread", name="map_2"),
    ]
    for s in stages:
        s.autotune = True
        s._limit = CapacityLimiter(8)  # as open() would, without starting pools
    tuner = AutoTuner(stages, group_size=8, cpu_budget=3, memory_budget_bytes=1 << 30)
    # They start low within the budget; a process counts for one CPU, a thread for
    # half of one (it waits for the GIL part of the time); inline jobs for none.
    assert [s.limiter.total_tokens for s in stages if s.limiter] == [1, 2, 2]
    assert tuner.feasible({"map": 2, "map_1": 8, "map_2": 2})
    assert not tuner.feasible({"map": 2, "map_1": 1, "map_2": 3})


def test_the_memory_budget_bounds_prefetch_and_reads() -> None:
    pre = Prefetcher(1)
    pre.autotune = True
    tuner = AutoTuner([pre], group_size=10, cpu_budget=2, memory_budget_bytes=1000)

    class Reader:
        kind = "read"
        counters = type("C", (), {"items": 10, "bytes": 1000})()

    tuner._readers.append(Reader())  # 100 bytes per item read so far
    assert tuner.feasible({"prefetch": 1})  # 1 group of 10 items: 1000 bytes
    assert not tuner.feasible({"prefetch": 2})


def test_make_tuner_only_when_a_stage_is_on_auto() -> None:
    assert (
        make_tuner([Decoder(int)], group_size=4, cpu_budget=None, memory_budget_bytes=None) is None
    )


# -- the builder and a real pipeline ------------------------------------------------------


def test_auto_arguments_are_validated() -> None:
    pipe = Pipeline.from_iterable(range(3))
    with pytest.raises(ValueError, match=r"^concurrency must be an int >= 1 or 'auto', got 'x'$"):
        pipe.map(int, concurrency="x")
    with pytest.raises(ValueError, match=r"^concurrency must be an int >= 1 or 'auto', got 0$"):
        pipe.read(concurrency=0)
    with pytest.raises(
        ValueError, match=r"^prefetch size must be an int >= 1 or 'auto', got 'lots'$"
    ):
        pipe.prefetch("lots")
    with pytest.raises(ValueError, match=r"^cpu_budget must be an int >= 1 or None, got 0$"):
        Pipeline.from_iterable(range(3), cpu_budget=0)
    with pytest.raises(
        ValueError, match=r"^memory_budget_bytes must be an int >= 1 or None, got '1G'$"
    ):
        Pipeline.from_iterable(range(3), memory_budget_bytes="1G")


def test_auto_pools_are_created_at_the_budget() -> None:
    pipe = (
        Pipeline.from_iterable(range(3), cpu_budget=3)
        .map(int, concurrency="auto")
        .map(int, concurrency="auto", executor="process")
        .read(concurrency="auto")
    )
    assert [(s.concurrency, s.autotune) for s in pipe._spec.stages] == [
        (6, True),  # two threads per CPU
        (3, True),  # one process per CPU
        (64, True),
    ]


def square(x: int) -> int:
    return x * x


def test_an_auto_pipeline_delivers_everything_in_order_across_epochs(tmp_path: Any) -> None:
    for i in range(300):
        (tmp_path / f"{i:03d}.bin").write_bytes(bytes([i % 251]) * 16)
    pipe = (
        Pipeline.from_files(str(tmp_path), group_size=4, cpu_budget=2)
        .read(concurrency="auto")
        .map(lambda b: int(b[0]), concurrency="auto")
        .prefetch("auto")
        .map(square, concurrency=2)
    )
    want = [(i % 251) ** 2 for i in range(300)]
    with pipe:
        for _ in range(3):
            assert list(pipe) == want
        tuner = pipe._rt.tuner  # type: ignore[union-attr]
        assert tuner is not None
        for setting, _ in tuner.history:
            assert 1 <= setting["map"] <= 2
            assert 1 <= setting["read"] <= 64
            assert 1 <= setting["prefetch"] <= 32


def test_one_lucky_window_does_not_move_the_setting() -> None:
    climber = HillClimber([Knob("map", 1, 8, 2)])
    assert climber.observe(100.0) == {"map": 2}  # the current setting takes two windows
    assert climber.observe(100.0) == {"map": 4}  # then the first trial
    assert climber.observe(200.0) == {"map": 4}  # looks better: measured once more
    assert climber.observe(100.0) == {"map": 3}  # not confirmed: rejected; next trial
    assert climber.best == {"map": 2}
    assert climber.observe(100.0) == {"map": 1}  # no better: rejected at once
    assert climber.observe(150.0) == {"map": 1}  # better: measured once more
    assert climber.observe(140.0) == {"map": 2}  # confirmed: accepted; next trial
    assert climber.best == {"map": 1}


def test_an_auto_prefetch_after_batch_counts_batches_and_resizes_its_live_queue() -> None:
    from iopipe.runtime.channels import GroupQueue
    from iopipe.stages.batch import Batcher

    batcher, pre = Batcher(4), Prefetcher(1)
    pre.autotune = True
    tuner = AutoTuner([batcher, pre], group_size=8, cpu_budget=2, memory_budget_bytes=1 << 30)
    queues = [GroupQueue(16), GroupQueue(8), GroupQueue(4)]  # source, batch, prefetch outputs
    tuner.start_epoch([batcher, pre], queues)
    assert (pre.n, pre.capacity, queues[2].capacity) == (2, 8, 8)  # starts at 2 groups
    tuner.apply({"prefetch": 3})
    # 3 groups of one batch of 4 items: n counts batches, capacities count source items.
    assert (pre.n, pre.capacity, queues[2].capacity, queues[2].counters.capacity) == (3, 12, 12, 12)
    assert queues[1].capacity == 8  # other queues untouched


def test_stats_report_where_the_tuner_stands_and_none_without_auto() -> None:
    auto = Pipeline.from_iterable(range(2000)).map(int, concurrency="auto").batch(10)
    plain = Pipeline.from_iterable(range(200)).map(int).batch(10)
    with auto, plain:
        assert sum(len(b) for b in auto) == 2000
        state = auto.stats().autotune
        assert state is not None
        assert state.phase in ("grow", "trim", "settled")
        assert state.settled == (state.phase == "settled")
        assert set(state.knobs) == {"map"}
        assert state.knobs["map"] >= 1
        with pytest.raises(TypeError):
            state.knobs["map"] = 3  # type: ignore[index]  # a snapshot, read-only
        assert sum(len(b) for b in plain) == 200
        assert plain.stats().autotune is None
