"""The fused run (iopipe/stages/fused.py): same output as the staged stages, faster on cached data.

Every case runs the same pipeline with ``fuse=True`` and ``fuse=False`` and asserts
identical batches, errors, stats counts and resume positions; the "staged"
path (what a fused run does while reads wait on storage) is forced by making
the reader look storage-bound.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from iopipe import Pipeline, StageError
from iopipe.control.governor import RateGovernor, TokenBound
from iopipe.runtime.channels import BatchKey
from iopipe.runtime.limits import CapacityLimiter
from iopipe.stages.batch import Batcher
from iopipe.stages.cache import Cache
from iopipe.stages.decode import Decoder
from iopipe.stages.fused import Fused, plan
from iopipe.stages.reader import ChunkedReader
from tests._helpers import assert_same, consume, make_files


def first_bytes(buf: Any) -> torch.Tensor:
    return torch.from_numpy(np.asarray(buf[:16]).copy())


def total(buf: Any) -> int:
    return int(np.asarray(buf).sum())


def fail_on_sum(x: int) -> int:
    if x % 7 == 3:
        raise ValueError(f"bad {x}")
    return x


@pytest.fixture
def files(tmp_path: Path) -> list[str]:
    sizes = [16, 100, 5000, 20, 0, 33, 4096, 4097, 9000, 17] * 7
    return [p for p, _ in make_files(tmp_path, sizes)]


def build(files: list[str], *, fuse: bool, **kw: Any) -> Pipeline[Any]:
    return (
        Pipeline.from_files(files, shuffle=True, seed=5, fuse=fuse)
        .read(chunk_bytes=kw.get("chunk_bytes", 4096), concurrency=4)
        .map(total, concurrency=2)
        .batch(kw.get("batch_size", 8), drop_last=kw.get("drop_last", False))
    )


def both(files: list[str], **kw: Any) -> tuple[list[Any], list[Any]]:
    with build(files, fuse=True, **kw) as a, build(files, fuse=False, **kw) as b:
        out = list(a), list(b)
        assert a._rt is not None
        assert b._rt is not None
        assert kinds(a._rt.plan) == ["read+map+batch"]  # the fused run did run
        assert kinds(b._rt.plan) == ["read", "map", "batch"]
        return out


# -- the plan ----------------------------------------------------------------


def kinds(stages: list[Any]) -> list[str]:
    return ["+".join(m.kind for m in s.members) if isinstance(s, Fused) else s.kind for s in stages]


def test_plan_fuses_read_thread_maps_and_a_final_batch() -> None:
    r, m1, m2, b = ChunkedReader(), Decoder(total), Decoder(total), Batcher(4)
    assert kinds(plan([r, m1, m2, b])) == ["read+map+map+batch"]
    assert kinds(plan([r, b, Decoder(total)])) == ["read+batch", "map"]


def test_plan_breaks_runs_at_what_cannot_fuse() -> None:
    proc = Decoder(total, executor="process")
    assert kinds(plan([ChunkedReader(), proc, Decoder(total), Batcher(2)])) == [
        "read",
        "map",
        "map+batch",
    ]
    assert kinds(plan([ChunkedReader(), Cache(max_bytes=10), Decoder(total)])) == [
        "read",
        "cache",
        "map",
    ]
    inline = Decoder(total, executor="inline")
    assert kinds(plan([ChunkedReader(), inline])) == ["read", "map"]
    auto = Decoder(total)
    auto.autotune = True
    assert kinds(plan([ChunkedReader(), auto, Batcher(2)])) == ["read", "map", "batch"]
    # A batcher cannot start a run, a lone stage is not worth one.
    assert kinds(plan([Batcher(2), Decoder(total)])) == ["batch", "map"]
    assert kinds(plan([ChunkedReader()])) == ["read"]


# -- same output ----------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 3, 8, 64, 1000])
@pytest.mark.parametrize("drop_last", [False, True])
def test_fused_batches_equal_the_staged_ones(
    files: list[str], batch_size: int, drop_last: bool
) -> None:
    a, b = both(files, batch_size=batch_size, drop_last=drop_last)
    assert_same(a, b)
    assert len(a) == (len(files) // batch_size if drop_last else -(-len(files) // batch_size))


def test_items_larger_than_a_chunk_are_read_in_pieces_then_mapped(files: list[str]) -> None:
    a, b = both(files, chunk_bytes=1000)  # most files are larger than a chunk
    assert_same(a, b)


@pytest.mark.parametrize("chunk_bytes", [1 << 20, 1000])  # whole reads; pieces (resumed)
def test_a_read_after_a_map_pairs_buffers_with_the_mapped_items(
    files: list[str], chunk_bytes: int
) -> None:
    def make(fuse: bool) -> Pipeline[Any]:
        return (
            Pipeline.from_iterable([Path(f).name for f in files], fuse=fuse)
            .map(lambda name: str(Path(files[0]).parent / name))
            .read(chunk_bytes=chunk_bytes, with_source=True)
            .batch(4, collate_fn=list)
        )

    with make(True) as a, make(False) as b:
        got, want = list(a), list(b)
        assert a._rt is not None
        assert kinds(a._rt.plan) == ["map+read+batch"]
    assert [[(p, bytes(buf)) for p, buf in batch] for batch in got] == [
        [(p, bytes(buf)) for p, buf in batch] for batch in want
    ]
    assert got[0][0][0] == files[0]  # the mapped item (a path), not the source's name
    assert bytes(got[0][0][1]) == Path(files[0]).read_bytes()


def test_with_source_and_several_maps(files: list[str]) -> None:
    def make(fuse: bool) -> Pipeline[Any]:
        return (
            Pipeline.from_files(files, fuse=fuse)
            .read(chunk_bytes=4096, with_source=True)
            .map(lambda pb: (Path(pb[0]).name, total(pb[1])))
            .map(lambda nt: nt[1] * 2)
            .batch(5, collate_fn=list)
        )

    with make(True) as a, make(False) as b:
        assert list(a) == list(b)


def test_the_staged_path_gives_the_same_batches(
    files: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Fused, "_cached", lambda self: False)
    a, b = both(files)
    assert_same(a, b)


def test_resume_mid_epoch_matches(files: list[str]) -> None:
    got = {}
    for fuse in (True, False):
        with build(files, fuse=fuse) as pipe:
            it = iter(pipe)
            for _ in range(3):
                next(it)
            state = pipe.state_dict()
            del it
            pipe.load_state_dict(state)
            got[fuse] = (state, list(pipe))
    assert got[True][0] == got[False][0] == {"epoch": 0, "consumed": 24}
    assert_same(got[True][1], got[False][1])


def test_stats_count_each_member_as_if_staged(files: list[str]) -> None:
    counts = {}
    for fuse in (True, False):
        with build(files, fuse=fuse) as pipe:
            list(pipe)
            st = pipe.stats()
            counts[fuse] = [(s.name, s.items, s.bytes) for s in st.stages]
    assert counts[True] == counts[False]
    names = [name for name, _, _ in counts[True]]
    assert names == ["source", "read", "map", "batch"]


# -- errors ---------------------------------------------------------------------


@pytest.mark.parametrize("cached", [True, False])
def test_a_failing_map_names_the_map_and_the_item(
    files: list[str], cached: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Fused, "_cached", lambda self: cached)
    pipe = (
        Pipeline.from_iterable(range(40))
        .map(fail_on_sum, concurrency=2)
        .map(int, concurrency=2)
        .batch(4)
    )
    with pipe:
        got, err = consume(pipe)
    assert isinstance(err, StageError)
    assert (err.stage, err.item) == ("map", 3)
    assert isinstance(err.__cause__, ValueError)
    assert_same(got, [])  # batch 0 holds item 3


def test_a_missing_file_names_the_reader_and_the_path(files: list[str]) -> None:
    gone = files[9]
    Path(gone).unlink()
    with build(files[:20], fuse=True) as pipe:
        _, err = consume(pipe)
    assert isinstance(err, StageError)
    assert err.stage == "read"
    assert err.item == gone
    assert isinstance(err.__cause__, FileNotFoundError)


def test_a_failing_collate_names_the_batch(files: list[str]) -> None:
    def bad(items: list[Any]) -> Any:
        if 9 in items:
            raise RuntimeError("cannot collate")
        return items

    pipe = Pipeline.from_iterable(range(20)).map(int).batch(4, collate_fn=bad)
    with pipe:
        got, err = consume(pipe)
    assert got == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert isinstance(err, StageError)
    assert err.stage == "batch"
    assert err.item == BatchKey(2, 8, 11)


def test_fuse_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="fuse must be True or False, got 1"):
        Pipeline.from_iterable(range(3), fuse=1)


# -- the rate governor ----------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def feed(gov: RateGovernor, clock: Clock, jobs: int, seconds_per_job: float) -> None:
    for _ in range(jobs):
        clock.t += seconds_per_job
        gov.observe(100)


def window(gov: RateGovernor, clock: Clock, seconds_per_job: float) -> None:
    """Finish one measurement window's jobs at the given pace.

    A window is ``limit + 1`` jobs; ``2 * limit + 1`` for a governor started high.
    """
    limit = gov.limiter.limit
    feed(gov, clock, (2 * limit if gov._start_high else limit) + 1, seconds_per_job)


class Busy(CapacityLimiter):
    """A limiter whose other slots are always taken (a full pipeline): when a job
    finishes, ``limit - 1`` others are still running."""

    @property
    def borrowed_tokens(self) -> int:
        return self.total_tokens - 1


def governor(monkeypatch: pytest.MonkeyPatch, start: int, maximum: int, **kw: Any) -> Any:
    clock = Clock()
    lim = Busy(start)
    gov = RateGovernor(TokenBound(lim), maximum, clock=clock, **kw)
    gov.started()
    feed(gov, clock, 1, 1.0)  # the first job is a warm-up: slow, and not judged
    return gov, lim, clock


def test_the_governor_keeps_a_second_job_only_when_it_pays(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gov, lim, clock = governor(monkeypatch, 1, 4)
    window(gov, clock, 0.1)  # 1,000 items/s at one job
    assert lim.total_tokens == 2  # no job of the old limit was running: measured at once
    window(gov, clock, 0.1)  # no faster with two: back to one
    assert lim.total_tokens == 1
    feed(gov, clock, 1, 0.001)  # settling: the other job of the two finishes, not judged
    for _ in range(2 * RateGovernor.REPROBE - 1):  # a failed trial doubles the wait
        window(gov, clock, 0.1)
    assert lim.total_tokens == 1


def test_a_clearly_slower_trial_is_undone_before_its_window_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Short jobs: a window lasts MIN_WINDOW_S, but limit + 1 slow jobs already tell."""
    gov, lim, clock = governor(monkeypatch, 1, 4)
    feed(gov, clock, 5, 0.01)  # 10,000 items/s at one job (a window of 0.05 s)
    assert lim.total_tokens == 2
    feed(gov, clock, 2, 0.015)  # two-thirds of the rate, but only two jobs: not judged
    assert lim.total_tokens == 2
    feed(gov, clock, 1, 0.015)  # limit + 1 jobs under 3/4 of the rate: undone at 0.045 s
    assert lim.total_tokens == 1
    gov2, lim2, clock2 = governor(monkeypatch, 1, 4)
    feed(gov2, clock2, 5, 0.01)
    feed(gov2, clock2, 3, 0.012)  # a little slower: the whole window decides
    assert lim2.total_tokens == 2
    feed(gov2, clock2, 2, 0.012)
    assert lim2.total_tokens == 1


def test_the_governor_climbs_while_each_doubling_pays(monkeypatch: pytest.MonkeyPatch) -> None:
    gov, lim, clock = governor(monkeypatch, 1, 4)
    window(gov, clock, 0.1)
    assert lim.total_tokens == 2
    window(gov, clock, 0.05)  # twice the rate: keep, try 4
    assert lim.total_tokens == 4
    feed(gov, clock, 1, 0.001)  # settling: the other job started under two finishes
    window(gov, clock, 0.04)  # 25% more: keep; at the maximum
    assert lim.total_tokens == 4


def test_settling_waits_for_the_jobs_of_the_old_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    gov, lim, clock = governor(monkeypatch, 4, 4, start_high=True)
    window(gov, clock, 0.025)  # four jobs: 4,000 items/s
    assert lim.total_tokens == 2
    feed(gov, clock, 3, 0.001)  # the three others started under four finish: not judged
    window(gov, clock, 0.1)  # were they credited to two, 1,000 items/s would look fine
    assert lim.total_tokens == 4  # measured alone, two are slower: back to four


def test_the_governor_tries_again_after_settling(monkeypatch: pytest.MonkeyPatch) -> None:
    """A noisy first trial does not decide the run: a later re-probe finds the gain."""
    gov, lim, clock = governor(monkeypatch, 1, 2)
    window(gov, clock, 0.1)
    window(gov, clock, 0.1)  # the trial looked no better (say, a noisy neighbour)
    assert lim.total_tokens == 1
    feed(gov, clock, 1, 0.1)  # settling back at one
    for _ in range(2 * RateGovernor.REPROBE - 1):
        window(gov, clock, 0.1)
    assert lim.total_tokens == 1
    window(gov, clock, 0.1)  # ... then a re-probe
    assert lim.total_tokens == 2
    window(gov, clock, 0.05)  # now two jobs are twice as fast: kept
    assert lim.total_tokens == 2
    for _ in range(RateGovernor.REPROBE):  # the next re-probe tries fewer
        window(gov, clock, 0.05)
    assert lim.total_tokens == 1
    feed(gov, clock, 1, 0.001)  # settling
    window(gov, clock, 0.1)  # slower: back to two
    assert lim.total_tokens == 2


def test_the_governor_keeps_fewer_jobs_when_they_are_as_fast(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gov, lim, clock = governor(monkeypatch, 1, 2)
    window(gov, clock, 0.1)
    window(gov, clock, 0.04)  # two jobs pay: kept
    assert lim.total_tokens == 2
    for _ in range(RateGovernor.REPROBE):  # re-probe down
        window(gov, clock, 0.04)
    assert lim.total_tokens == 1
    feed(gov, clock, 1, 0.001)  # settling: the other job of the old limit finishes
    window(gov, clock, 0.039)  # one job is as fast (the consumer is the bottleneck)
    assert lim.total_tokens == 1


def test_a_governor_with_one_job_never_moves(monkeypatch: pytest.MonkeyPatch) -> None:
    gov, lim, clock = governor(monkeypatch, 1, 1)
    feed(gov, clock, 100, 0.1)
    assert lim.total_tokens == 1


def test_a_governor_starting_high_first_tries_fewer_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The DataLoader's start: all workers, then half as many if that is as fast."""
    gov, lim, clock = governor(monkeypatch, 4, 4, start_high=True)
    window(gov, clock, 0.025)  # 4,000 items/s with four
    assert lim.total_tokens == 2
    feed(gov, clock, 3, 0.001)  # settling: the jobs started under four finish fast
    window(gov, clock, 0.024)  # as fast with two: kept
    assert lim.total_tokens == 2
    gov2, lim2, clock2 = governor(monkeypatch, 4, 4, start_high=True)
    window(gov2, clock2, 0.025)
    feed(gov2, clock2, 3, 0.001)  # settling (would look fast, and is not judged)
    window(gov2, clock2, 0.05)  # half as fast: back to four
    assert lim2.total_tokens == 4


def test_governed_slots_bound_running_fetches_as_the_limit_moves() -> None:
    """The DataLoader's fetch bound: never more running than the current limit."""
    import threading

    from iopipe.loader.workers import GovernedSlots

    slots = GovernedSlots(4, govern=False)
    running, peak, lock = 0, [], threading.Lock()
    go = threading.Event()

    def fetch() -> None:
        nonlocal running
        with slots:
            with lock:
                running += 1
                peak.append(running)
            go.wait(10)
            with lock:
                running -= 1

    slots.limiter.total_tokens = 2
    threads = [threading.Thread(target=fetch) for _ in range(6)]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join(10)
    assert max(peak) <= 2
    assert len(peak) == 6


def test_governed_slots_feed_their_governor(monkeypatch: pytest.MonkeyPatch) -> None:
    from iopipe.loader.workers import GovernedSlots

    clock = Clock()
    slots = GovernedSlots(2)
    assert slots.governor is not None
    slots.governor.clock = clock
    for _ in range(6):  # a warm-up fetch, then a window at two (2 * 2 + 1 fetches)
        with slots:
            clock.t += 0.1
    assert slots.limiter.total_tokens == 1  # the first trial: one fewer step
    slots.restart()
    with pytest.raises(KeyError), slots:  # a failed fetch releases and is not counted
        raise KeyError(1)
    assert slots.limiter.total_tokens == 1
    assert GovernedSlots(1).governor is None


def test_a_bad_read_item_names_the_reader_and_the_item(files: list[str]) -> None:
    pipe = Pipeline.from_iterable([files[0], 3.5, files[1]]).read().map(total).batch(2)
    with pipe:
        got, err = consume(pipe)
    assert pipe._rt is not None
    assert kinds(pipe._rt.plan) == ["read+map+batch"]
    assert got == []
    assert isinstance(err, StageError)
    assert (err.stage, err.item) == ("read", 1)  # a float's key is its index in the source
    assert isinstance(err.__cause__, TypeError)
    assert "read() expects paths or (path, offset, length) tuples, got float: 3.5" in str(err)


def test_a_step_up_that_contends_for_the_gil_is_undone_at_its_first_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Jobs that report their CPU: twice the CPU per item under two jobs ends the trial."""
    clock = Clock()
    lim = Busy(1)
    gov = RateGovernor(TokenBound(lim), 4, clock=clock)
    gov.started()
    for _ in range(3):  # warm-up and a measured window: 1 ms of CPU per 100 items
        clock.t += 0.1
        gov.observe(100, 0.001)
    assert lim.total_tokens == 2
    clock.t += 0.1
    gov.observe(100, 0.0011)  # 10% more CPU: no contention, the trial goes on
    assert lim.total_tokens == 2
    clock.t += 0.1
    gov.observe(100, 0.0025)  # 2.5x the CPU per item: contending, back to one at once
    assert lim.total_tokens == 1
