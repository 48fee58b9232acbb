"""Bad input everywhere (issue 7): each invalid argument gets a clear error, its message pinned.

Builder arguments fail when the pipeline is built, not mid-epoch: ``ValueError`` for
a value out of range, ``TypeError`` for a value of the wrong kind, each naming the
parameter and the value.  What can only fail while running (a ``collate_fn`` that
raises, a ``map`` returning something torch cannot collate, a path that is not one)
reaches ``next()`` as a :class:`StageError` naming the stage and the item or batch,
with the original exception as its cause.  A glob matching nothing says so, and how
to allow it.  (Validation errors the DataLoader shares with torch, word for word:
tests/loader/test_loader.py::test_validation_errors_as_torch.)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from iopipe import ConfigError, DataLoader, Pipeline, StageError
from tests._helpers import make_files


def base() -> Pipeline[int]:
    return Pipeline.from_iterable(range(10))


async def aident(x: int) -> int:
    return x


def nested() -> Callable[[int], int]:
    def inner(x: int) -> int:
        return x

    return inner


# (what, build, exception type, message pinned in full, as a regex)
CASES: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    # -- sources ---------------------------------------------------------------------
    (
        "from_files(int)",
        lambda: Pipeline.from_files(3),
        TypeError,
        r"paths must be a glob, a directory, a file or a list of paths and byte ranges, "
        r"got int: 3",
    ),
    (
        "from_files([])",
        lambda: Pipeline.from_files([]),
        ValueError,
        r"paths is an empty list; pass allow_empty=True to Pipeline.from_files for empty epochs",
    ),
    (
        "from_files(allow_empty='yes')",
        lambda: Pipeline.from_files(["a"], allow_empty="yes"),
        TypeError,
        r"allow_empty must be True or False, got 'yes'",
    ),
    (
        "from_iterable(int)",
        lambda: Pipeline.from_iterable(3),  # type: ignore[arg-type]
        TypeError,
        r"a source needs an iterable or async iterable, got int",
    ),
    (
        "from_iterable(str)",
        lambda: Pipeline.from_iterable("abc"),
        TypeError,
        r"a source needs a collection of items, got a single str/bytes",
    ),
    (
        "seed",
        lambda: Pipeline.from_iterable(range(3), seed=-1),
        ValueError,
        r"seed must be an int >= 0, got -1",
    ),
    (
        "shuffle='yes'",
        lambda: Pipeline.from_iterable(range(3), shuffle="yes"),
        TypeError,
        r"shuffle must be True or False, got 'yes'",
    ),
    (
        "shuffle of an iterator",
        lambda: Pipeline.from_iterable(iter(range(3)), shuffle=True),
        ValueError,
        r"shuffle=True needs a sized source \(a list, tuple or file glob\), got range_iterator",
    ),
    (
        "shard",
        lambda: Pipeline.from_iterable(range(3), shard="even"),
        ValueError,
        r"shard must be one of \('pad', 'drop'\), got 'even'",
    ),
    (
        "rank alone",
        lambda: Pipeline.from_iterable(range(3), rank=0),
        ValueError,
        r"give both rank and world_size or neither, got rank=0, world_size=None",
    ),
    (
        "rank out of range",
        lambda: Pipeline.from_iterable(range(3), rank=2, world_size=2),
        ValueError,
        r"rank must be an int in \[0, 2\), got 2",
    ),
    (
        "world_size",
        lambda: Pipeline.from_iterable(range(3), rank=0, world_size=0),
        ValueError,
        r"world_size must be an int >= 1, got 0",
    ),
    # -- options ---------------------------------------------------------------------
    (
        "unknown option",
        lambda: Pipeline.from_iterable(range(3), bogus=1),
        TypeError,
        r"Pipeline.__init__\(\) got an unexpected keyword argument 'bogus'",
    ),
    (
        "timeout",
        lambda: Pipeline.from_iterable(range(3), timeout=0),
        ValueError,
        r"timeout must be a number of seconds > 0 or None, got 0",
    ),
    (
        "handoff",
        lambda: Pipeline.from_iterable(range(3), handoff=0),
        ValueError,
        r"handoff must be an int >= 1, got 0",
    ),
    (
        "group_size",
        lambda: Pipeline.from_iterable(range(3), group_size=0),
        ValueError,
        r"group_size must be an int >= 1 or None, got 0",
    ),
    (
        "use_uvloop",
        lambda: Pipeline.from_iterable(range(3), use_uvloop="yes"),
        TypeError,
        r"use_uvloop must be True, False or None, got 'yes'",
    ),
    (
        "stats_interval",
        lambda: Pipeline.from_iterable(range(3), stats_interval=0),
        ValueError,
        r"stats_interval must be a number > 0 or None, got 0",
    ),
    (
        "on_stats",
        lambda: Pipeline.from_iterable(range(3), on_stats=3),
        TypeError,
        r"on_stats must be callable or None, got 3",
    ),
    (
        "cpu_budget",
        lambda: Pipeline.from_iterable(range(3), cpu_budget=0),
        ValueError,
        r"cpu_budget must be an int >= 1 or None, got 0",
    ),
    (
        "memory_budget_bytes",
        lambda: Pipeline.from_iterable(range(3), memory_budget_bytes=0),
        ValueError,
        r"memory_budget_bytes must be an int >= 1 or None, got 0",
    ),
    # -- read ------------------------------------------------------------------------
    (
        "read(chunk_bytes=0)",
        lambda: base().read(chunk_bytes=0),
        ValueError,
        r"chunk_bytes must be an int >= 1, got 0",
    ),
    (
        "read(chunk_bytes='4MiB')",
        lambda: base().read(chunk_bytes="4MiB"),  # type: ignore[arg-type]
        ValueError,
        r"chunk_bytes must be an int >= 1, got '4MiB'",
    ),
    (
        "read(concurrency='fast')",
        lambda: base().read(concurrency="fast"),
        ValueError,
        r"concurrency must be an int >= 1 or 'auto', got 'fast'",
    ),
    (
        "read(with_source='yes')",
        lambda: base().read(with_source="yes"),  # type: ignore[arg-type]
        TypeError,
        r"with_source must be True or False, got 'yes'",
    ),
    # -- prefetch --------------------------------------------------------------------
    (
        "prefetch(0)",
        lambda: base().prefetch(0),
        ValueError,
        r"prefetch size must be an int >= 1 or 'auto', got 0",
    ),
    (
        "prefetch('x')",
        lambda: base().prefetch("x"),
        ValueError,
        r"prefetch size must be an int >= 1 or 'auto', got 'x'",
    ),
    # -- map -------------------------------------------------------------------------
    (
        "map(not callable)",
        lambda: base().map(3),  # type: ignore[arg-type]
        TypeError,
        r"map\(\) needs a callable, got int: 3",
    ),
    (
        "map(concurrency=0)",
        lambda: base().map(abs, concurrency=0),
        ValueError,
        r"concurrency must be an int >= 1 or 'auto', got 0",
    ),
    (
        "map(executor='gpu')",
        lambda: base().map(abs, executor="gpu"),
        ValueError,
        r"executor must be one of \('thread', 'process', 'async', 'inline'\), got 'gpu'",
    ),
    (
        "map(sync fn, executor='async')",
        lambda: base().map(abs, executor="async"),
        TypeError,
        r"executor='async' needs an async def function, got <built-in function abs>",
    ),
    (
        "map(async fn, executor='thread')",
        lambda: base().map(aident, executor="thread"),
        TypeError,
        r"<function aident at 0x[0-9a-f]+> is an async function: use executor='async'",
    ),
    (
        "map(lambda, executor='process')",
        lambda: base().map(lambda x: x, executor="process"),
        TypeError,
        r"executor='process' needs a picklable function \(a def at module level, not a lambda "
        r"or a nested function\), got <function .*<lambda> at 0x[0-9a-f]+>: "
        r"AttributeError: Can't pickle local object .*",
    ),
    (
        "map(nested fn, executor='process')",
        lambda: base().map(nested(), executor="process"),
        TypeError,
        r"executor='process' needs a picklable function .*got <function nested.<locals>.inner .*",
    ),
    (
        "map(ordered='no')",
        lambda: base().map(abs, ordered="no"),  # type: ignore[arg-type]
        TypeError,
        r"ordered must be True or False, got 'no'",
    ),
    (
        "map(name=3)",
        lambda: base().map(abs, name=3),  # type: ignore[arg-type]
        TypeError,
        r"name must be a non-empty str or None, got 3",
    ),
    # -- batch -----------------------------------------------------------------------
    (
        "batch(0)",
        lambda: base().batch(0),
        ValueError,
        r"batch_size must be an int >= 1, got 0",
    ),
    (
        "batch(True)",
        lambda: base().batch(True),
        ValueError,
        r"batch_size must be an int >= 1, got True",
    ),
    (
        "batch(2.0)",
        lambda: base().batch(2.0),  # type: ignore[arg-type]
        ValueError,
        r"batch_size must be an int >= 1, got 2.0",
    ),
    (
        "batch(collate_fn=3)",
        lambda: base().batch(2, collate_fn=3),  # type: ignore[arg-type]
        TypeError,
        r"collate_fn must be callable, got 3",
    ),
    (
        "batch(drop_last='yes')",
        lambda: base().batch(2, drop_last="yes"),  # type: ignore[arg-type]
        TypeError,
        r"drop_last must be True or False, got 'yes'",
    ),
    # -- cache -----------------------------------------------------------------------
    (
        "cache(max_bytes=-1)",
        lambda: base().cache(max_bytes=-1),
        ValueError,
        r"max_bytes must be an int >= 0, got -1",
    ),
    (
        "cache(max_bytes='1GiB')",
        lambda: base().cache(max_bytes="1GiB"),  # type: ignore[arg-type]
        ValueError,
        r"max_bytes must be an int >= 0, got '1GiB'",
    ),
    (
        "cache after batch",
        lambda: base().batch(2).cache(max_bytes=10),
        ValueError,
        r"cache\(\) must come before batch\(\): it keys outputs by source item",
    ),
    (
        "two caches",
        lambda: base().cache(max_bytes=10).cache(max_bytes=10),
        ValueError,
        r"a pipeline can have only one cache\(\)",
    ),
    # -- to_device -------------------------------------------------------------------
    (
        "to_device('nonsense')",
        lambda: base().to_device("nonsense"),
        ValueError,
        r"device must be a torch.device or a name such as 'cuda:0', got 'nonsense': "
        r"Expected one of .* device type at start of device string: nonsense",
    ),
    # -- state -----------------------------------------------------------------------
    (
        "set_epoch(-1)",
        lambda: base().set_epoch(-1),
        ValueError,
        r"epoch must be an int >= 0, got -1",
    ),
    (
        "load_state_dict({'epoch': 0})",
        lambda: base().load_state_dict({"epoch": 0}),
        ValueError,
        r"not a Pipeline state: \{'epoch': 0\}",
    ),
    # -- DataLoader extras -----------------------------------------------------------
    (
        "DataLoader(worker_type='gpu')",
        lambda: DataLoader([1], worker_type="gpu"),
        ValueError,
        r"worker_type must be one of \('auto', 'thread', 'process', 'main'\), got 'gpu'",
    ),
    (
        "DataLoader(shard='even')",
        lambda: DataLoader([1], shard="even"),
        ValueError,
        r"shard must be one of \('pad', 'drop'\) or None, got 'even'",
    ),
    (
        "DataLoader(rank=0)",
        lambda: DataLoader([1], rank=0),
        ValueError,
        r"give both rank and world_size or neither, got rank=0, world_size=None",
    ),
    (
        "DataLoader(map-style, world_size=2)",
        lambda: DataLoader([1], rank=0, world_size=2),
        ValueError,
        r"rank, world_size and shard apply to iterable-style datasets; for a map-style dataset "
        r"pass sampler=torch.utils.data.DistributedSampler\(dataset\)",
    ),
    (
        "DataLoader(timeout, worker_type='main')",
        lambda: DataLoader([1], timeout=1, worker_type="main"),
        ValueError,
        r"timeout needs a background worker; got timeout=1 with worker_type='main', "
        r"num_workers=0",
    ),
    (
        "DataLoader.load_state_dict({})",
        lambda: DataLoader([1]).load_state_dict({}),
        ValueError,
        r"not an iopipe.DataLoader state \(version 1\): \{\}",
    ),
]


@pytest.mark.parametrize(
    ("build", "exc", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_invalid_arguments_fail_at_build_with_a_clear_message(
    build: Callable[[], Any], exc: type[Exception], message: str
) -> None:
    with pytest.raises(exc) as info:
        build()
    assert re.fullmatch(message, str(info.value)), str(info.value)


# -- failures that can only happen while running -------------------------------------------


def div_zero(batch: list[Any]) -> Any:
    return 1 / 0


def test_a_collate_fn_that_raises_names_the_batch_stage_and_its_items() -> None:
    pipe = Pipeline.from_iterable(range(10)).batch(4, collate_fn=div_zero)
    with pipe, pytest.raises(StageError) as info:
        list(pipe)
    err = info.value
    assert (
        str(err)
        == "stage 'batch' failed on item batch 0 (0 .. 3): ZeroDivisionError: division by zero"
    )
    assert err.stage == "batch"
    assert isinstance(err.__cause__, ZeroDivisionError)
    assert err.__notes__ == ["iopipe stage: batch, item: batch 0 (0 .. 3)"]


def test_a_collate_fn_that_raises_in_a_loader_names_the_batch() -> None:
    dl = DataLoader(list(range(10)), batch_size=4, collate_fn=div_zero)
    with dl, pytest.raises(ZeroDivisionError) as info:
        list(dl)
    assert info.value.__notes__ == ["iopipe.DataLoader: collate_fn failed on batch 0"]


UNCOLLATABLE = (
    r"default_collate: batch must contain tensors, numpy arrays, numbers, dicts or lists; "
    r"found <class 'object'>"
)


def to_object(x: int) -> object:
    return object()


def test_a_map_returning_an_uncollatable_object_names_the_stage_and_batch() -> None:
    pipe = Pipeline.from_iterable(range(10)).map(to_object).batch(4)
    with pipe, pytest.raises(StageError) as info:
        list(pipe)
    err = info.value
    assert re.fullmatch(
        r"stage 'batch' failed on item batch 0 \(0 \.\. 3\): TypeError: " + UNCOLLATABLE, str(err)
    )
    assert isinstance(err.__cause__, TypeError)


def test_a_dataset_returning_an_uncollatable_object_names_the_batch() -> None:
    with DataLoader([object()] * 4, batch_size=2) as dl, pytest.raises(TypeError) as info:
        list(dl)
    assert re.fullmatch(UNCOLLATABLE, str(info.value))
    assert info.value.__notes__ == ["iopipe.DataLoader: collate_fn failed on batch 0"]


def test_an_item_that_is_not_a_path_names_the_read_stage() -> None:
    with base().read() as pipe, pytest.raises(StageError) as info:
        list(pipe)
    assert str(info.value) == (
        "stage 'read' failed: TypeError: read() expects paths or (path, offset, length) "
        "tuples, got int: 0"
    )


def test_a_negative_byte_range_names_the_read_stage(tmp_path: Path) -> None:
    [(path, _)] = make_files(tmp_path, [10])
    with Pipeline.from_files([(path, -1, 4)]).read() as pipe, pytest.raises(StageError) as info:
        list(pipe)
    assert str(info.value) == (
        "stage 'read' failed: ValueError: byte range offset must be an int >= 0, got -1"
    )


# -- a glob matching nothing -------------------------------------------------------------------


def test_a_glob_matching_nothing_says_so_and_how_to_allow_it(tmp_path: Path) -> None:
    pattern = str(tmp_path / "*.bin")
    with pytest.raises(FileNotFoundError) as info:
        Pipeline.from_files(pattern)
    assert str(info.value) == (
        f"no files match the glob {pattern!r}; pass allow_empty=True to Pipeline.from_files "
        "for empty epochs"
    )


def test_an_empty_directory_says_so(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()  # folders alone are no files
    with pytest.raises(FileNotFoundError) as info:
        Pipeline.from_files(tmp_path)
    assert str(info.value) == (
        f"no files match {str(tmp_path)!r}: the directory holds no files; pass "
        "allow_empty=True to Pipeline.from_files for empty epochs"
    )


def test_a_missing_path_says_so(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        Pipeline.from_files(tmp_path / "nope")
    assert str(info.value) == f"no such file or directory: {str(tmp_path / 'nope')!r}"


@pytest.mark.parametrize("what", ["glob", "directory", "list"])
def test_allow_empty_gives_empty_epochs(tmp_path: Path, what: str) -> None:
    paths: Any = {"glob": str(tmp_path / "*.bin"), "directory": tmp_path, "list": []}[what]
    pipe = Pipeline.from_files(paths, allow_empty=True).read().batch(2)
    assert len(pipe) == 0
    with pipe:
        assert list(pipe) == []
        assert list(pipe) == []
        assert pipe.state_dict() == {"epoch": 2, "consumed": 0}


def test_allow_empty_in_a_config_round_trips(tmp_path: Path) -> None:
    config = {"source": {"files": str(tmp_path / "*.bin"), "allow_empty": True}}
    pipe = Pipeline.from_config(config)
    with pipe:
        assert list(pipe) == []
    again = Pipeline.from_config(pipe.to_config())
    assert again.to_config()["source"]["allow_empty"] is True
    with pytest.raises(FileNotFoundError, match="no files match the glob"):
        Pipeline.from_config({"source": {"files": str(tmp_path / "*.bin")}})
    with pytest.raises(ConfigError) as info:
        Pipeline.from_config({"source": {"items": [1], "allow_empty": True}})
    assert str(info.value) == "source.allow_empty: applies to a 'files' source only, not 'items'"
