"""Where ``worker_type="auto"``'s loads run: threads, or torch's processes when they pay.

The judge (``iopipe/loader/placement.py``) is pure and driven here with made-up
epoch figures; the loader's switch between modes is driven with the judge's
thresholds turned so that its verdict is known in advance, and must keep
torch's batches and RNG draws across every switch.  No test asserts timing.
"""

from __future__ import annotations

import os
import random
import threading
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader as TorchLoader
from torch.utils.data import Dataset

from iopipe import DataLoader
from iopipe.loader import placement
from iopipe.loader.placement import EpochFigures, PlaceJudge
from iopipe.loader.processes import WorkerProcesses

N = 96


def _thread_epoch(**kw: Any) -> EpochFigures:
    """A thread epoch that looks bound by GIL-holding loads, changed by ``kw``."""
    base: dict[str, Any] = {
        "mode": "thread",
        "batches": 32,
        "next_s": 0.9,
        "wall_s": 1.0,
        "loads": 32,
        "load_s": 0.9,
        "load_cpu_s": 0.85,
    }
    return EpochFigures(**(base | kw))


def _process_epoch(next_s: float, batches: int = 32) -> EpochFigures:
    return EpochFigures("process", batches, next_s, 1.0)


# -- the judge ------------------------------------------------------------------
def test_a_gil_bound_thread_epoch_is_suspected() -> None:
    assert PlaceJudge(cores=2).suspect(_thread_epoch())


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"batches": 8, "loads": 8}, "too few batches to judge"),
        ({"next_s": 0.1}, "the loop computes: threads overlap it"),
        ({"load_cpu_s": 0.2}, "loads wait on storage, not the CPU"),
        ({"load_s": 0.016, "load_cpu_s": 0.015}, "batches cheaper than a process hand-off"),
        ({"mode": "process"}, "not a thread epoch"),
    ],
)
def test_what_is_not_suspected(change: dict[str, Any], why: str) -> None:
    assert not PlaceJudge(cores=2).suspect(_thread_epoch(**change)), why


def test_one_core_never_tries_processes() -> None:
    assert not PlaceJudge(cores=1).suspect(_thread_epoch())


def test_the_trial_stays_on_processes_only_when_they_are_faster() -> None:
    judge = PlaceJudge(cores=2)
    assert judge.after(_thread_epoch(next_s=0.9)) == "process"
    assert judge.phase == "trial"
    # 0.9 / 32 a batch on threads; 0.5 / 32 on processes: more than KEEP_GAIN faster.
    assert judge.after(_process_epoch(0.5)) is None
    assert (judge.phase, judge.verdict) == ("settled", "process")
    assert "staying on processes" in judge.reason
    assert judge.after(_process_epoch(5.0)) is None  # settled: never again
    assert judge.after(_thread_epoch()) is None


def test_a_trial_not_faster_by_the_margin_goes_back_to_threads() -> None:
    judge = PlaceJudge(cores=2)
    judge.after(_thread_epoch(next_s=0.9))
    assert judge.after(_process_epoch(0.9 / placement.KEEP_GAIN * 1.01)) == "thread"
    assert (judge.phase, judge.verdict) == ("settled", "thread")
    assert "back to threads" in judge.reason


def test_a_short_trial_epoch_is_not_judged() -> None:
    judge = PlaceJudge(cores=2)
    judge.after(_thread_epoch())
    assert judge.after(_process_epoch(0.1, batches=3)) is None  # broken off early
    assert judge.phase == "trial"
    assert judge.after(_process_epoch(0.1)) is None
    assert judge.verdict == "process"


def test_unsuspected_epochs_keep_watching() -> None:
    judge = PlaceJudge(cores=2)
    for _ in range(3):
        assert judge.after(_thread_epoch(next_s=0.05)) is None
    assert judge.phase == "watch"
    assert judge.after(_thread_epoch()) == "process"


# -- the loader's switch ----------------------------------------------------------
class Plain(Dataset[Any]):
    """Cheap items, no RNG: ``"auto"`` puts them on helped threads."""

    def __init__(self) -> None:
        self.scale = 1

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> Any:
        return torch.tensor([i * self.scale, i])


@pytest.fixture
def verdict(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Make the judge suspect every thread epoch and give the trial a known verdict."""

    def set_(keep: bool) -> None:
        monkeypatch.setattr(PlaceJudge, "suspect", lambda self, ep: ep.mode == "thread")
        monkeypatch.setattr(placement, "MIN_BATCHES", 1)
        # KEEP_GAIN 0: any trial is "faster"; huge: none is.
        monkeypatch.setattr(placement, "KEEP_GAIN", 0.0 if keep else 1e9)

    return set_


def _epochs(
    cls: type, epochs: int = 4, rebind: bool = False, **kw: Any
) -> tuple[Any, list[str | None], Any]:
    """Batches and the loop's draws over ``epochs``; worker modes; the global RNG states."""
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    ds = Plain()
    gen = torch.Generator().manual_seed(11)
    loader = cls(ds, batch_size=8, num_workers=2, shuffle=True, generator=gen, **kw)
    seen: list[Any] = []
    modes: list[str | None] = []
    try:
        for e in range(epochs):
            for batch in loader:
                seen.append(batch.tolist())
                seen.append(torch.rand(()).item())  # the loop's own draws
            modes.append(getattr(loader, "worker_mode", None))
            if rebind:
                ds.scale = 10 + e  # an attribute rebound between epochs
    finally:
        if isinstance(loader, DataLoader):
            loader.close()
    return seen, modes, torch.get_rng_state()


@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("keep", [True, False])
def test_switching_modes_keeps_torchs_batches_and_rng(
    verdict: Any, keep: bool, persistent: bool
) -> None:
    verdict(keep)
    want, _, want_rng = _epochs(TorchLoader, persistent_workers=persistent)
    got, modes, got_rng = _epochs(DataLoader, persistent_workers=persistent)
    assert got == want
    assert torch.equal(got_rng, want_rng)
    after = "process" if keep else "thread"
    assert modes == ["thread", "process", after, after]


def test_a_dataset_whose_attributes_changed_is_never_forked(verdict: Any) -> None:
    # Rebound between epochs, or set lazily while loading (a file, a pool): torch's
    # workers start from a dataset that never loaded; a fork now would share them.
    verdict(True)
    want, _, want_rng = _epochs(TorchLoader, rebind=True)
    got, modes, got_rng = _epochs(DataLoader, rebind=True)
    assert got == want
    assert torch.equal(got_rng, want_rng)
    assert modes == ["thread"] * 4


class LazyPool(Dataset[Any]):
    """Opens a thread pool on first use, as datasets open files: a fork would inherit it."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> Any:
        if not hasattr(self, "pool"):
            import concurrent.futures

            self.pool = concurrent.futures.ThreadPoolExecutor(1)
        return torch.tensor([self.pool.submit(int, i).result()])


def test_a_lazily_opened_pool_keeps_the_loader_on_threads(verdict: Any) -> None:
    verdict(True)
    ds = LazyPool()
    loader = DataLoader(ds, batch_size=8, num_workers=2)
    try:
        for _ in range(3):
            assert [int(x) for b in loader for x in b] == list(range(N))
            assert loader.worker_mode == "thread"
    finally:
        loader.close()
        ds.pool.shutdown()


def test_a_trial_whose_first_batch_never_comes_goes_back_to_threads(
    verdict: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    verdict(True)
    monkeypatch.setattr("iopipe.loader.placed.PROBE_TIMEOUT_S", 0.5)
    hang = threading.Event()

    parent = os.getpid()

    class Stuck(Plain):
        def __getitem__(self, i: int) -> Any:
            if os.getpid() != parent:  # only in a worker process
                hang.wait(30)
            return super().__getitem__(i)

    want, _, want_rng = _epochs(TorchLoader, epochs=3)
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    got, modes = [], []
    loader = DataLoader(
        Stuck(), batch_size=8, num_workers=2, shuffle=True,
        generator=torch.Generator().manual_seed(11),
    )  # fmt: skip
    try:
        for _ in range(3):
            for batch in loader:
                got.append(batch.tolist())
                got.append(torch.rand(()).item())
            modes.append(loader.worker_mode)
    finally:
        loader.close()
    assert got == want
    assert torch.equal(torch.get_rng_state(), want_rng)
    assert modes == ["thread", "thread", "thread"]


def test_the_judgement_is_logged(verdict: Any, caplog: pytest.LogCaptureFixture) -> None:
    verdict(False)
    with caplog.at_level("INFO", logger="iopipe"):
        _epochs(DataLoader, epochs=3)
    text = caplog.text
    assert "trying torch's worker processes for one epoch" in text
    assert "back to threads" in text


def test_processes_that_fail_to_start_leave_the_loader_on_threads(
    verdict: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    verdict(True)

    def broken(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("no processes here")

    monkeypatch.setattr(WorkerProcesses, "start_epoch", broken)
    want, _, want_rng = _epochs(TorchLoader, epochs=3)
    with caplog.at_level("INFO", logger="iopipe"):
        got, modes, got_rng = _epochs(DataLoader, epochs=3)
    assert got == want
    assert torch.equal(got_rng, want_rng)
    assert modes == ["thread", "thread", "thread"]
    assert "did not start" in caplog.text


@pytest.mark.parametrize(
    "kw",
    [
        {"worker_type": "thread"},  # the user chose threads
        {"on_error": "skip"},  # skipping runs on threads
        {"in_order": False},  # not a helped configuration
    ],
)
def test_no_switch_where_the_user_or_the_mode_rules_it_out(verdict: Any, kw: Any) -> None:
    verdict(True)
    _, modes, _ = _epochs(DataLoader, epochs=3, **kw)
    assert modes == ["thread"] * 3


def test_no_switch_with_num_workers_0(verdict: Any) -> None:
    verdict(True)
    loader = DataLoader(Plain(), batch_size=8, num_workers=0)
    try:
        for _ in range(3):
            assert sum(len(b) for b in loader) == N
            assert loader.worker_mode == "main"
    finally:
        loader.close()


def test_a_state_taken_on_processes_resumes_on_threads(verdict: Any) -> None:
    verdict(True)
    ds = Plain()
    gen = torch.Generator().manual_seed(2)
    loader = DataLoader(ds, batch_size=8, num_workers=2, shuffle=True, generator=gen)
    try:
        list(loader)  # threads
        it = iter(loader)  # the trial, on processes
        assert loader.worker_mode == "process"
        head = [next(it).tolist() for _ in range(3)]
        state = loader.state_dict()
        rest = [b.tolist() for b in it]
    finally:
        loader.close()
    fresh = DataLoader(
        Plain(), batch_size=8, num_workers=2, shuffle=True, generator=torch.Generator()
    )
    try:
        fresh.load_state_dict(state)
        resumed = [b.tolist() for b in fresh]
    finally:
        fresh.close()
    assert resumed == rest
    assert len(head) + len(rest) == N // 8
