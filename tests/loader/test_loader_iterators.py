"""Several iterators of one ``iopipe.DataLoader``, as users take them.

Re-taking ``iter(loader)`` in the middle of an epoch, stopping after
``len(loader)`` batches without a StopIteration, holding two at once: the
batches are torch's, ``state_dict()`` follows the iterator the loop now reads,
and ``close()`` stops every copy's threads.
"""

from __future__ import annotations

import random
import threading
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader as TorchLoader
from torch.utils.data import Dataset

from iopipe import DataLoader

# The differential datasets: one drawing from every global RNG, one plain.
from tests.loader.test_loader_fidelity import Augmented, Plain
from tests.loader.test_loader_fidelity import _as_lists as _lists


def _reassigning_loop(cls: type, dataset: Dataset[Any], workers: int) -> Any:
    """Steps that re-take ``iter(loader)`` mid-epoch and after exactly len(loader) batches."""
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    loader = cls(dataset, batch_size=4, shuffle=True, num_workers=workers)
    seen = []
    try:
        it = iter(loader)
        seen += [_lists(next(it)) for _ in range(2)]
        it = iter(loader)  # mid-epoch: the old iterator is dropped
        seen += [_lists(next(it)) for _ in range(len(loader))]  # exactly one epoch
        it = iter(loader)
        seen += [_lists(b) for b in it]
        return seen, torch.rand(()).item()
    finally:
        if isinstance(loader, DataLoader):
            loader.close()


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("cls", [Augmented, Plain])
def test_retaking_iter_gives_torchs_batches(cls: type, workers: int) -> None:
    want = _reassigning_loop(TorchLoader, cls(), workers)
    assert _reassigning_loop(DataLoader, cls(), workers) == want


@pytest.mark.parametrize("workers", [0, 2])
def test_state_dict_follows_the_iterator_taken_mid_epoch(workers: int) -> None:
    with DataLoader(Plain(), batch_size=4, shuffle=True, num_workers=workers) as dl:
        it = iter(dl)
        next(it)
        it = iter(dl)  # the loop restarts: the first epoch is abandoned
        next(it)
        state = dl.state_dict()
        assert (state["epoch"], state["batches"], state["in_epoch"]) == (1, 1, True)
        rest = [_lists(b) for b in it]
        assert len(rest) == len(dl) - 1
        after = dl.state_dict()
        assert (after["epoch"], after["batches"], after["in_epoch"]) == (2, 0, False)
    with DataLoader(Plain(), batch_size=4, shuffle=True, num_workers=workers) as resumed:
        resumed.load_state_dict(state)
        assert [_lists(b) for b in resumed] == rest


def test_len_batches_without_stopiteration_end_the_epoch() -> None:
    with DataLoader(Plain(), batch_size=4, num_workers=2, worker_type="thread") as dl:
        first = iter(dl)
        for _ in range(len(dl)):
            next(first)
        second = iter(dl)  # the epoch was done: the loader runs it itself, no copy
        assert dl._current is not None
        assert dl._current() is second
        with pytest.raises(StopIteration):
            next(first)  # as torch's exhausted iterator
        next(second)
        assert dl.state_dict()["batches"] == 1


def test_close_stops_the_other_iterators() -> None:
    with DataLoader(Plain(), batch_size=4, num_workers=2, worker_type="thread") as dl:
        before = set(threading.enumerate())
        outer = iter(dl)
        next(outer)
        side = iter(dl)
        next(side)
        dl.close()
        assert set(threading.enumerate()) - before == set()
        for it in (outer, side):
            with pytest.raises(RuntimeError, match="close"):
                next(it)
        assert len(list(dl)) == len(dl)  # usable again


def test_skip_past_max_failures_ends_the_epoch_for_iter() -> None:
    class Broken(Plain):
        def __getitem__(self, i: int) -> Any:
            raise ValueError(i)

    from iopipe import TooManyFailures

    with DataLoader(Broken(), batch_size=4, on_error="skip", max_failures=2) as dl:
        it = iter(dl)
        with pytest.raises(TooManyFailures):
            next(it)
        again = iter(dl)  # a new epoch on the loader itself, not on a copy
        assert dl._current is not None
        assert dl._current() is again
        assert not dl._sides


def test_retaking_iter_mid_epoch_does_not_double_the_worker_processes() -> None:
    import multiprocessing as mp

    with DataLoader(Plain(), batch_size=4, num_workers=2, worker_type="process") as dl:
        it = iter(dl)
        next(it)
        it = iter(dl)  # the old epoch's workers go with its iterator, as torch's
        counts = []
        for _ in it:
            counts.append(len(mp.active_children()))
        assert max(counts) == 2


def test_a_state_taken_after_len_batches_resumes_at_the_next_epoch() -> None:
    def loader() -> DataLoader[Any]:
        return DataLoader(
            Plain(), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1)
        )

    with loader() as dl:
        it = iter(dl)
        for _ in range(len(dl)):
            next(it)
        state = dl.state_dict()
        want = [_lists(b) for b in dl]  # the uninterrupted run's next epoch
    assert (state["batches"], state["in_epoch"]) == (0, False)
    with loader() as resumed:
        resumed.load_state_dict(state)
        assert [_lists(b) for b in resumed] == want


@pytest.mark.parametrize("worker_type", ["main", "thread"])
def test_stats_from_another_thread_never_ends_an_epoch(worker_type: str) -> None:
    workers = 0 if worker_type == "main" else 2
    done = threading.Event()
    with DataLoader(Plain(), batch_size=4, num_workers=workers, worker_type=worker_type) as dl:

        def monitor() -> None:
            while not done.is_set():
                dl.stats()
                dl.state_dict()

        watcher = threading.Thread(target=monitor, daemon=True)
        watcher.start()
        try:
            for _ in range(150):
                it = iter(dl)
                for _ in range(3):
                    next(it)
        finally:
            done.set()
            watcher.join(10)
