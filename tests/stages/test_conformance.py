"""The stage-conformance suite: every operator passes the same properties (torchdata's pattern).

Each case builds a pipeline over real files whose last operator is the stage under test,
once with fusion (the planner's rewrite) and once without, and checks the shared
contract from tests/_helpers.py: every epoch yields every element in order with the
right ``len()``; an error raised by user code or by storage reaches the loop naming the
stage and the item, and the next epoch works; ``close()`` midway joins every thread;
a state saved midway resumes to exactly the rest.  ``test_every_stage_has_a_case``
fails when a new stage class appears without a case here.
"""

from __future__ import annotations

import inspect
import pkgutil
from collections.abc import Callable
from importlib import import_module
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import iopipe.stages
from iopipe import Pipeline
from iopipe.runtime.channels import BatchKey
from iopipe.stages.base import Stage
from tests._helpers import (
    check_close_midway,
    check_error_propagation,
    check_order_and_count,
    check_state_midway,
    make_files,
)

N = 24
BATCH = 5


def _value(x: Any) -> int:
    """An element's identity: the first byte of a file read, or the int itself."""
    return int(x[0]) if isinstance(x, np.ndarray) else int(x)


def _first(x: Any) -> int:
    return int(x[0])


def _batch_values(b: Any) -> list[int]:
    return [int(v) for v in b]


# name -> (how the stage extends a read pipeline, what one element is turned into for
# comparison, whether elements are batches).  Files hold their index as first byte.
CASES: dict[str, tuple[Callable[[Pipeline[Any]], Pipeline[Any]], bool]] = {
    "read": (lambda p: p, False),
    "prefetch": (lambda p: p.prefetch(4), False),
    "map": (lambda p: p.map(_first), False),
    "map_async": (lambda p: p.map(_afirst), False),
    "map_process": (lambda p: p.map(_first, executor="process", concurrency=2), False),
    "batch": (lambda p: p.map(_first).batch(BATCH), True),
    "cache": (lambda p: p.cache(max_bytes=1 << 20), False),
    "to_device": (lambda p: p.map(_first).batch(BATCH).to_device("cpu"), True),
    "filter": (lambda p: p.filter(_kept), False),
    "flat_map": (lambda p: p.flat_map(_alone), False),
    "shuffle": (lambda p: p.shuffle(1), False),  # a buffer of 1 keeps the order
}

# Stage classes and the case that covers each (a fused run is the planner's rewrite of
# read/map/batch, covered by every case with fuse=True).
COVERED = {
    "ChunkedReader": "read",
    "Prefetcher": "prefetch",
    "Decoder": "map",
    "Batcher": "batch",
    "Cache": "cache",
    "DeviceTransfer": "to_device",
    "Fused": "map",
    "Filter": "filter",
    "FlatMap": "flat_map",
    "ShuffleBuffer": "shuffle",
}


def _kept(x: Any) -> bool:
    return True  # drops are tested in test_filter.py; here: the stage's contract


def _alone(x: Any) -> list[Any]:
    return [x]


async def _afirst(x: Any) -> int:
    return int(x[0])


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("conformance")
    made = make_files(root, [64 + i for i in range(N)])
    paths = sorted(p for p, _ in made)
    for i, p in enumerate(paths):  # the first byte names the file
        data = bytearray(Path(p).read_bytes())
        data[0] = i
        Path(p).write_bytes(bytes(data))
    return paths


def _factory(files: list[str], case: str, fuse: bool) -> Callable[[], Pipeline[Any]]:
    extend, _ = CASES[case]

    def make() -> Pipeline[Any]:
        src = Pipeline.from_iterable(files, group_size=4, fuse=fuse).read(concurrency=2)
        return extend(src)

    return make


def _plain(case: str, got: list[Any]) -> list[Any]:
    batched = CASES[case][1]
    return [_batch_values(b) for b in got] if batched else [_value(x) for x in got]


def _expected(case: str) -> list[Any]:
    values = list(range(N))
    if CASES[case][1]:
        return [values[i : i + BATCH] for i in range(0, N, BATCH)]
    return values


def _comparable(make: Callable[[], Pipeline[Any]], case: str) -> Callable[[], Pipeline[Any]]:
    """The pipeline with a last map that turns elements into plain ints (or int lists)."""
    batched = CASES[case][1]
    return lambda: make().map(_batch_values if batched else _value, name="compare")


PARAMS = [
    pytest.param(c, f, id=f"{c}-{'fused' if f else 'plain'}") for c in CASES for f in (True, False)
]


@pytest.mark.parametrize(("case", "fuse"), PARAMS)
def test_order_and_count(files: list[str], case: str, fuse: bool) -> None:
    check_order_and_count(_comparable(_factory(files, case, fuse), case), _expected(case))


@pytest.mark.parametrize(("case", "fuse"), PARAMS)
def test_close_midway(files: list[str], case: str, fuse: bool) -> None:
    check_close_midway(_factory(files, case, fuse), take=2)


@pytest.mark.parametrize(("case", "fuse"), PARAMS)
def test_state_midway(files: list[str], case: str, fuse: bool) -> None:
    check_state_midway(
        _comparable(_factory(files, case, fuse), case), _expected(case), take=2, epochs_before=1
    )


@pytest.mark.parametrize(("case", "fuse"), PARAMS)
def test_a_missing_file_names_the_reader_and_the_path(
    files: list[str], case: str, fuse: bool
) -> None:
    victim = [*files[:-1], files[-1] + ".gone"]
    extend, _ = CASES[case]

    def make() -> Pipeline[Any]:
        return extend(Pipeline.from_iterable(victim, group_size=4, fuse=fuse).read(concurrency=2))

    check_error_propagation(make, stage="read", item=victim[-1], cause=FileNotFoundError)


def _boom_on_seven(x: Any) -> Any:
    if _value(x) == 7:
        raise ValueError("seven")
    return x


@pytest.mark.parametrize(("case", "fuse"), PARAMS)
def test_a_user_error_after_the_stage_names_the_item(
    files: list[str], case: str, fuse: bool
) -> None:
    """An error downstream of the stage still names its own stage and item: the stage passed
    the item on intact (for batches, the batch's first key names it)."""
    make = _factory(files, case, fuse)
    batched = CASES[case][1]
    # A batch's key names its number and its first and last items (batch 1 holds 5..9).
    item: Any = BatchKey(1, files[BATCH], files[2 * BATCH - 1]) if batched else files[7]
    fn = _fail_batch_one if batched else _boom_on_seven
    check_error_propagation(
        lambda: make().map(fn, name="check"), stage="check", item=item, cause=ValueError
    )


def _fail_batch_one(b: Any) -> Any:
    if int(b[0]) == BATCH:
        raise ValueError("batch one")
    return b


def test_every_stage_has_a_case() -> None:
    classes = set()
    for mod in pkgutil.iter_modules(iopipe.stages.__path__):
        module = import_module(f"iopipe.stages.{mod.name}")
        for name, obj in vars(module).items():
            stage = inspect.isclass(obj) and issubclass(obj, Stage) and obj is not Stage
            concrete = mod.name != "base"  # base.py holds the base classes, not operators
            if (
                stage
                and concrete
                and obj.__module__ == module.__name__
                and not name.startswith("_")
            ):
                classes.add(name)
    missing = classes - set(COVERED)
    assert not missing, f"stages without a conformance case: {sorted(missing)}"
    assert set(COVERED.values()) <= set(CASES)
