"""Differential tests: ``iopipe.DataLoader``'s default against torch's DataLoader.

Same seeds, same arguments, a training loop that draws random numbers between
batches: the batches, the loop's own draws and every global RNG state after the
epochs must be torch's, for datasets that draw from the global RNGs (random
augmentations), ones that use ``get_worker_info()``, iterable ones, and plain
ones (which must run on threads, the fast path).
"""

from __future__ import annotations

import random
import threading
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader as TorchLoader
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from iopipe import DataLoader

N = 24


class Augmented(Dataset[Any]):
    """Sample ``i`` with a draw from each global RNG, as random augmentations make."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> Any:
        return (i, torch.rand(()).item(), float(np.random.rand()), random.random())


class Plain(Dataset[Any]):
    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> Any:
        return torch.full((2,), float(i))


class WorkerAware(Dataset[Any]):
    """Returns which worker fetched it (None in the main process)."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> Any:
        info = get_worker_info()
        return (i, -1 if info is None else info.id)


class AugmentedStream(IterableDataset[Any]):
    """Splits itself across workers with get_worker_info() and draws random numbers."""

    def __iter__(self) -> Any:
        info = get_worker_info()
        start, step = (0, 1) if info is None else (info.id, info.num_workers)
        for i in range(start, N, step):
            yield (i, torch.rand(()).item(), float(np.random.rand()))


DATASETS = {
    "augmented": Augmented,
    "plain": Plain,
    "worker-aware": WorkerAware,
    "stream": AugmentedStream,
}


def _seed(s: int) -> None:
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


def _as_lists(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.tolist()
    if isinstance(batch, list | tuple):
        return [_as_lists(x) for x in batch]
    return batch


def _run(cls: type, kind: str, workers: int, shuffle: str, epochs: int = 2) -> Any:
    _seed(7)
    kw: dict[str, Any] = {"batch_size": 4, "num_workers": workers}
    if kind != "stream":
        if shuffle == "gen":
            kw |= {"shuffle": True, "generator": torch.Generator().manual_seed(3)}
        elif shuffle == "global":
            kw["shuffle"] = True
    loader = cls(DATASETS[kind](), **kw)
    seen, loop_draws = [], []
    try:
        for _ in range(epochs):
            for batch in loader:
                seen.append(_as_lists(batch))
                loop_draws.append(torch.rand(()).item())  # the training loop's own draws
                loop_draws.append(float(np.random.rand()))
                loop_draws.append(random.random())
    finally:
        if isinstance(loader, DataLoader):
            mode = loader._mode
            loader.close()
        else:
            mode = None
    states = (torch.get_rng_state(), np.random.get_state()[1].tolist(), random.getstate())
    return seen, loop_draws, states, mode


@pytest.mark.parametrize("shuffle", ["none", "global", "gen"])
@pytest.mark.parametrize("workers", [0, 2, 4])
@pytest.mark.parametrize("kind", list(DATASETS))
def test_default_mode_gives_torchs_batches_and_rng(kind: str, workers: int, shuffle: str) -> None:
    if kind == "stream" and shuffle != "none":
        pytest.skip("an iterable dataset has no sampler to shuffle")
    want, want_draws, want_states, _ = _run(TorchLoader, kind, workers, shuffle)
    got, got_draws, got_states, mode = _run(DataLoader, kind, workers, shuffle)
    assert got == want
    assert got_draws == want_draws
    assert torch.equal(got_states[0], want_states[0])
    assert got_states[1:] == want_states[1:]
    # Which workers ran it: the fast path where it keeps torch's semantics.
    expected = {
        ("augmented", 0): "main",
        ("plain", 0): "main",  # a helper thread may run ahead (loader/helped.py)
        ("worker-aware", 0): "main",  # get_worker_info() is None in both
        ("stream", 0): "main",
    }.get((kind, workers), "thread" if kind == "plain" else "process")
    assert mode == expected


def test_the_choice_is_logged_once_with_its_reason(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="iopipe")
    with DataLoader(Augmented(), batch_size=4, num_workers=2) as dl:
        for _ in range(2):
            list(dl)
    lines = [r.getMessage() for r in caplog.records if "loading on" in r.getMessage()]
    assert lines == [
        "iopipe.DataLoader: loading on torch's 2 worker processes: "
        "__getitem__ drew from torch's global RNG"
    ]


def test_a_worker_init_fn_gets_processes_and_is_called() -> None:
    with DataLoader(WorkerAware(), batch_size=4, num_workers=2, worker_init_fn=_init) as dl:
        ids = {wid for batch in dl for wid in batch[1].tolist()}
        assert dl._mode == "process"
    assert ids == {0, 1}


def _init(worker_id: int) -> None:
    assert get_worker_info().id == worker_id


def test_explicit_worker_type_is_kept() -> None:
    with DataLoader(Augmented(), batch_size=4, num_workers=2, worker_type="thread") as dl:
        assert len(list(dl)) == N // 4
        assert dl._mode == "thread"


def test_generic_alias_as_torch() -> None:
    assert DataLoader[int] is not None
    assert DataLoader[int].__origin__ is DataLoader


class SlowFirst(Dataset[Any]):
    """Index 0 waits until a sample of a third batch was fetched (or 20 s).

    By then the second batch is complete, strictly before the first.
    """

    def __init__(self) -> None:
        import threading

        self.other = threading.Event()

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> int:
        if i == 0:
            self.other.wait(20)
        elif i >= 4:
            self.other.set()
        return i


def test_in_order_false_hands_out_later_batches_before_a_slow_first() -> None:
    # As torch: with in_order=False a slow batch 0 does not hold back the others.
    ds = SlowFirst()
    with DataLoader(ds, batch_size=2, num_workers=2, in_order=False, worker_type="thread") as dl:
        order = [batch[0].item() for batch in dl]
    assert sorted(order) == [0, 2, 4, 6]
    assert order[0] != 0


# -- several live iterators ------------------------------------------------------------
def _two_iterators(cls: type, kind: str, workers: int) -> Any:
    """zip(loader, loader), and next(iter(loader)) inside a loop over the loader."""
    _seed(11)
    shuffle = None if kind == "stream" else True
    loader = cls(DATASETS[kind](), batch_size=5, shuffle=shuffle, num_workers=workers)
    try:
        zipped = [(_as_lists(a), _as_lists(b)) for a, b in zip(loader, loader, strict=True)]
        outer, peeks = [], []
        for batch in loader:
            outer.append(_as_lists(batch))
            peeks.append(_as_lists(next(iter(loader))))  # a logging callback's peek
        return zipped, outer, peeks, torch.rand(()).item()
    finally:
        if isinstance(loader, DataLoader):
            loader.close()


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", ["augmented", "plain", "stream"])
def test_several_live_iterators_run_side_by_side_as_torchs(kind: str, workers: int) -> None:
    want = _two_iterators(TorchLoader, kind, workers)
    got = _two_iterators(DataLoader, kind, workers)
    assert got == want
    assert len(got[0]) >= 5
    assert len(got[1]) == len(got[2]) == len(got[0])


def test_persistent_workers_reset_the_one_iterator_as_torch() -> None:
    with DataLoader(Plain(), batch_size=4, num_workers=2, persistent_workers=True) as dl:
        first = iter(dl)
        next(first)
        second = iter(dl)
        assert second is first  # torch resets its persistent iterator and returns it
        assert len(list(first)) == len(dl)
        assert iter(dl) is first  # after the epoch too


def test_dropping_a_reused_persistent_iterator_stops_its_latest_epoch() -> None:
    with DataLoader(
        WorkerAware(), batch_size=4, num_workers=2, persistent_workers=True, worker_type="process"
    ) as dl:
        it = iter(dl)
        list(it)
        it = iter(dl)  # the same iterator, reset: a new epoch with its own source thread
        next(it)
        stop = dl._procs.stop_event
        assert stop is not None
        assert not stop.is_set()
        del it
        assert stop.is_set()  # the dropped iterator released this epoch's source, not the first's


def test_a_dropped_second_iterator_leaves_no_threads() -> None:
    with DataLoader(Plain(), batch_size=4, num_workers=2, worker_type="thread") as dl:
        outer = iter(dl)
        taken = [next(outer) for _ in range(len(dl) - 1)]  # the loader's own threads all ran
        before = set(threading.enumerate())
        side = iter(dl)
        assert len(list(side)) == len(dl)
        assert set(threading.enumerate()) > before  # the second iterator has its own threads
        del side  # as torch's iterator, dropping it stops its workers at once
        assert set(threading.enumerate()) - before == set()
        assert len(taken) + len(list(outer)) == len(dl)  # the first iterator went on untouched


_LAZY_NUMPY = """
import sys
import torch
import iopipe
from torch.utils.data import Dataset

if "numpy.random" in sys.modules:
    print("imported")
    raise SystemExit(0)

class FirstImport(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        import numpy.random
        return i + DRAW

if __name__ == "__main__":
    with iopipe.DataLoader(FirstImport(), batch_size=2, num_workers=2) as dl:
        assert len(list(dl)) == 4
        print(dl._mode, dl._mode_reason)
"""


@pytest.mark.parametrize(
    ("draw", "want"),
    [
        (
            "numpy.random.rand()",
            "process __getitem__ drew from numpy's global RNG "
            "(numpy.random was first imported meanwhile)",
        ),
        ("numpy.random.randint(1 << 30)", "process"),  # one 32-bit word
        ("numpy.random.default_rng(i).random()", "thread"),  # imported, global RNG untouched
    ],
)
def test_a_dataset_that_first_imports_numpy_random(tmp_path: Any, draw: str, want: str) -> None:
    """numpy.random is not imported to watch it; imported by the batch, a draw from it counts."""
    import subprocess
    import sys

    script = tmp_path / "lazy.py"
    script.write_text(_LAZY_NUMPY.replace("DRAW", draw))
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=True
    ).stdout.strip()
    if out == "imported":
        pytest.skip("torch or iopipe imports numpy.random here")
    assert out.startswith(want)


class Scaled(Dataset[Any]):
    def __init__(self) -> None:
        self.scale = 1

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> int:
        return i * self.scale


@pytest.mark.parametrize("cls", [TorchLoader, DataLoader])
def test_persistent_workers_keep_the_dataset_as_it_was_when_they_started(cls: Any) -> None:
    # torch's test_dataset_not_reset: an attribute set between epochs does not reach
    # persistent workers (they hold the dataset they started with).
    ds = Scaled()
    loader = cls(ds, batch_size=4, num_workers=2, persistent_workers=True)
    try:
        first = [b.tolist() for b in loader]
        ds.scale = 100
        second = [b.tolist() for b in loader]
    finally:
        if isinstance(loader, DataLoader):
            loader.close()
    assert first == second == [[0, 1, 2, 3], [4, 5, 6, 7]]
