"""KeyboardInterrupt and SystemExit raised by user code inside a stage.

asyncio lets those two out of a task and through the event loop, which once
killed the loop thread ("the event-loop thread died", then "Event loop is
closed" for every later epoch).  Now the consumer gets the user's own
exception, naming the stage and item, never skipped, and the next epoch runs.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils.data import Dataset

from iopipe import DataLoader, Pipeline

FATAL = [KeyboardInterrupt, SystemExit]


class Once:
    """Raises ``exc`` the first time it sees item 3 (a picklable callable)."""

    def __init__(self, exc: type[BaseException]) -> None:
        self.exc = exc
        self.armed = True

    def __call__(self, x: Any) -> Any:
        if x == 3 and self.armed:
            self.armed = False
            raise self.exc()
        return x


class Raising(Dataset[Any]):
    def __init__(self, exc: type[BaseException]) -> None:
        self.once = Once(exc)

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> Any:
        return self.once(i)


def _two_epochs(make: Any, exc: type[BaseException]) -> tuple[BaseException, list[Any]]:
    pipe = make()
    try:
        with pytest.raises(exc) as info:
            list(pipe)
        return info.value, list(pipe)  # the same object runs its next epoch
    finally:
        pipe.close()


@pytest.mark.parametrize("exc", FATAL)
@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_in_a_map(exc: type[BaseException], on_error: str) -> None:
    err, again = _two_epochs(
        lambda: Pipeline.from_iterable(range(8), on_error=on_error).map(Once(exc)), exc
    )
    assert "raised in iopipe stage 'map', item 3" in err.__notes__
    assert again == list(range(8))


def test_in_a_process_map() -> None:
    once = Once(SystemExit)
    pipe = Pipeline.from_iterable(range(8), group_size=1).map(once, executor="process")
    with pipe, pytest.raises(SystemExit) as info:
        list(pipe)
    assert any("'map'" in n for n in info.value.__notes__)


@pytest.mark.parametrize("exc", FATAL)
def test_in_a_collate(exc: type[BaseException]) -> None:
    def collate(items: list[int]) -> list[int]:
        return [once(x) for x in items]

    once = Once(exc)
    err, again = _two_epochs(
        lambda: Pipeline.from_iterable(range(8)).batch(2, collate_fn=collate), exc
    )
    assert any("'batch'" in n for n in err.__notes__)
    assert again == [[0, 1], [2, 3], [4, 5], [6, 7]]


@pytest.mark.parametrize("exc", FATAL)
def test_in_a_source_iterable(exc: type[BaseException]) -> None:
    class Items:
        def __init__(self) -> None:
            self.once = Once(exc)

        def __iter__(self) -> Any:
            return (self.once(i) for i in range(8))

    items = Items()
    err, again = _two_epochs(lambda: Pipeline.from_iterable(items).map(str), exc)
    assert err.__notes__
    assert again == [str(i) for i in range(8)]


@pytest.mark.parametrize("exc", FATAL)
@pytest.mark.parametrize("workers", [0, 2])
def test_in_a_dataset_getitem(exc: type[BaseException], workers: int) -> None:
    dl = DataLoader(Raising(exc), batch_size=2, num_workers=workers, worker_type="thread")
    err, again = _two_epochs(lambda: dl, exc)
    assert any("dataset[3] failed" in n for n in err.__notes__)
    assert torch.cat(again).tolist() == list(range(8))


@pytest.mark.parametrize("workers", [0, 2])
def test_in_a_dataloader_collate_fn(workers: int) -> None:
    once = Once(KeyboardInterrupt)

    def collate(items: list[int]) -> list[int]:
        return [once(x) for x in items]

    dl = DataLoader(
        list(range(8)), batch_size=2, num_workers=workers, worker_type="thread", collate_fn=collate
    )
    _, again = _two_epochs(lambda: dl, KeyboardInterrupt)
    assert again == [[0, 1], [2, 3], [4, 5], [6, 7]]
