"""Tests of the chunked reader alone (iopipe/stages/reader.py), on both loop implementations."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from iopipe import Pipeline, StageError
from iopipe.runtime.channels import Group
from iopipe.stages.read_jobs import normalize_item
from iopipe.stages.reader import ChunkedReader
from tests._helpers import (
    as_bytes,
    check_close_midway,
    check_error_propagation,
    check_order_and_count,
    check_state_midway,
    groups_of,
    items_of,
    make_files,
    run_stage,
)

SMALL_CHUNK = 4096
DEFAULT_CHUNK = 4 << 20
MIB = 1 << 20


def edge_sizes(chunk: int) -> list[int]:
    """The sizes issue 2 names: 0, 1, chunk-1, chunk, chunk+1, 3.5 chunks, 10 MiB+3."""
    return [0, 1, chunk - 1, chunk, chunk + 1, chunk * 7 // 2, 10 * MIB + 3]


@pytest.fixture(scope="module")
def small_chunk_files(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, bytes]]:
    return make_files(tmp_path_factory.mktemp("small"), edge_sizes(SMALL_CHUNK), seed=1)


@pytest.fixture(scope="module")
def default_chunk_files(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, bytes]]:
    return make_files(tmp_path_factory.mktemp("default"), edge_sizes(DEFAULT_CHUNK), seed=2)


async def read_all(items: list[Any], *, group: int = 3, **kw: Any) -> list[Any]:
    stage = ChunkedReader(**kw)
    return items_of(await run_stage(stage, groups_of(items, group, keys=items)))


def assert_buffers(got: list[Any], want: list[bytes]) -> None:
    assert len(got) == len(want)
    for i, (buf, data) in enumerate(zip(got, want, strict=True)):
        assert isinstance(buf, np.ndarray), i
        assert buf.dtype == np.uint8, i
        assert len(buf) == len(data), f"item {i}: {len(buf)} bytes, want {len(data)}"
        assert as_bytes(buf) == data, f"item {i}: bytes differ"


# -- exact bytes ---------------------------------------------------------------------


@pytest.mark.parametrize("concurrency", [1, 4])
async def test_edge_sizes_with_a_small_chunk(
    small_chunk_files: list[tuple[str, bytes]], concurrency: int
) -> None:
    paths = [p for p, _ in small_chunk_files]
    got = await read_all(paths, chunk_bytes=SMALL_CHUNK, concurrency=concurrency)
    assert_buffers(got, [d for _, d in small_chunk_files])


async def test_edge_sizes_with_the_default_chunk(
    default_chunk_files: list[tuple[str, bytes]],
) -> None:
    assert ChunkedReader().chunk_bytes == DEFAULT_CHUNK
    paths = [p for p, _ in default_chunk_files]
    got = await read_all(paths)
    assert_buffers(got, [d for _, d in default_chunk_files])


async def test_each_size_alone_and_in_any_group_position(tmp_path: Path) -> None:
    files = make_files(tmp_path, edge_sizes(SMALL_CHUNK)[:-1] * 2, seed=3)
    for group in (1, 2, 5):
        got = await read_all([p for p, _ in files], group=group, chunk_bytes=SMALL_CHUNK)
        assert_buffers(got, [d for _, d in files])


async def test_buffers_support_len_and_the_buffer_protocol(tmp_path: Path) -> None:
    (path, data), *_ = make_files(tmp_path, [10_000])
    (buf,) = await read_all([path], chunk_bytes=SMALL_CHUNK)
    assert len(buf) == 10_000
    view = memoryview(buf)
    assert view.nbytes == 10_000
    assert view.readonly is False
    assert bytes(view) == data
    import torch

    assert torch.from_numpy(buf).numel() == 10_000  # wraps without a copy


async def test_many_small_files_keep_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    files = make_files(tmp_path, rng.integers(0, 3 * SMALL_CHUNK, 300).tolist(), seed=5)
    got = await read_all([p for p, _ in files], group=32, chunk_bytes=SMALL_CHUNK, concurrency=8)
    assert_buffers(got, [d for _, d in files])


async def test_path_objects_are_read(tmp_path: Path) -> None:
    files = make_files(tmp_path, [5, 0, 9000])
    got = await read_all([Path(p) for p, _ in files], chunk_bytes=SMALL_CHUNK)
    assert_buffers(got, [d for _, d in files])


# -- byte ranges -----------------------------------------------------------------------


async def test_byte_ranges_read_exactly_their_bytes(tmp_path: Path) -> None:
    (path, data), *_ = make_files(tmp_path, [5 * SMALL_CHUNK + 17], seed=7)
    c = SMALL_CHUNK
    ranges = [
        (path, 0, 0),
        (path, 0, 1),
        (path, 3, c - 1),
        (path, c, c),
        (path, 100, c + 1),
        (path, 7, 3 * c + c // 2),  # spans chunks, unaligned
        (path, 0, len(data)),
        (path, len(data), 0),
        (path, len(data) - 1, 1),
    ]
    got = await read_all(ranges, chunk_bytes=c)
    assert_buffers(got, [data[o : o + n] for _, o, n in ranges])


async def test_a_range_past_the_end_of_file_names_the_path(tmp_path: Path) -> None:
    ((path, _),) = make_files(tmp_path, [1000])
    for length in (1001, 3 * SMALL_CHUNK):  # read whole, and chunked
        item = (path, 0, length)
        with pytest.raises(StageError) as info:
            await read_all([(path, 0, 10), item], chunk_bytes=SMALL_CHUNK)
        err = info.value
        assert err.stage == "read"
        assert err.item == item
        assert isinstance(err.__cause__, EOFError)
        assert path in str(err.__cause__)
        assert path in str(err)


def test_normalize_item_accepts_paths_and_ranges_only() -> None:
    assert normalize_item("a") == ("a", 0, None)
    assert normalize_item(Path("a")) == ("a", 0, None)
    assert normalize_item(("a", 4, 8)) == ("a", 4, 8)
    with pytest.raises(ValueError, match="byte range offset must be an int >= 0, got -1"):
        normalize_item(("a", -1, 8))
    with pytest.raises(ValueError, match="byte range length must be an int >= 0, got -8"):
        normalize_item(("a", 0, -8))
    with pytest.raises(TypeError, match="read\\(\\) expects paths or"):
        normalize_item(5)
    with pytest.raises(TypeError, match="read\\(\\) expects paths or"):
        normalize_item(("a", 1))


async def test_a_bad_item_fails_the_stage_with_the_reason() -> None:
    with pytest.raises(StageError, match="expects paths or") as info:
        await read_all([42])
    assert info.value.stage == "read"


# -- errors name the path --------------------------------------------------------------


async def test_a_missing_file_names_its_path(tmp_path: Path) -> None:
    files = make_files(tmp_path, [10, 20, 30])
    missing = str(tmp_path / "gone.bin")
    with pytest.raises(StageError) as info:
        await read_all([files[0][0], missing, files[2][0]], group=3)
    err = info.value
    assert (err.stage, err.item) == ("read", missing)
    assert isinstance(err.__cause__, FileNotFoundError)
    assert missing in str(err)
    assert f"iopipe stage: read, item: {missing}" in err.__notes__


async def test_a_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(StageError) as info:
        await read_all([str(tmp_path)])
    assert info.value.item == str(tmp_path)
    assert isinstance(info.value.__cause__, IsADirectoryError)


def test_a_file_removed_between_listing_and_reading_names_the_path(tmp_path: Path) -> None:
    files = make_files(tmp_path, [100] * 10)
    pipe = Pipeline.from_files(str(tmp_path / "*.bin")).read(chunk_bytes=SMALL_CHUNK)
    victim = files[6][0]
    os.remove(victim)
    check_error_propagation(
        lambda: pipe,
        stage="read",
        item=victim,
        cause=FileNotFoundError,
        match="gone|No such file",
        prefix_of=[np.frombuffer(d, np.uint8) for _, d in files],
    )


# -- options, stats and the shared properties ------------------------------------------


async def test_with_source_pairs_each_buffer_with_its_item(tmp_path: Path) -> None:
    files = make_files(tmp_path, [3, 5000, 0])
    items = [files[0][0], (files[1][0], 10, 100), files[2][0]]
    got = await read_all(items, with_source=True, chunk_bytes=SMALL_CHUNK)
    assert [src for src, _ in got] == items
    want = [files[0][1], files[1][1][10:110], b""]
    assert [as_bytes(buf) for _, buf in got] == want


async def test_stats_count_items_and_bytes(tmp_path: Path) -> None:
    files = make_files(tmp_path, [10, 5000, 20_000])
    stage = ChunkedReader(chunk_bytes=SMALL_CHUNK)
    st = stage.fresh()
    st.open(3)
    from iopipe.runtime.channels import END, GroupQueue

    inq, outq = GroupQueue(6), GroupQueue(6)
    paths = [p for p, _ in files]
    await inq.put(Group(paths, paths))
    await inq.put(END)
    try:
        await st.run(inq, outq)
    finally:
        st.close(10)
    assert st.counters.items == 3
    assert st.counters.bytes == 25_010
    assert st.counters.jobs >= 1


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"chunk_bytes": 0}, "chunk_bytes must be an int >= 1, got 0"),
        ({"chunk_bytes": 1.5}, "chunk_bytes must be an int >= 1, got 1.5"),
        ({"concurrency": 0}, "concurrency must be an int >= 1, got 0"),
    ],
)
def test_reader_arguments_are_validated(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ChunkedReader(**kw)


@pytest.fixture
def many_files(tmp_path: Path) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(11)
    return make_files(tmp_path, rng.integers(0, 9000, 40).tolist(), seed=11)


def test_reader_pipeline_keeps_order_and_count(many_files: list[tuple[str, bytes]]) -> None:
    paths = [p for p, _ in many_files]
    want = [np.frombuffer(d, np.uint8) for _, d in many_files]
    check_order_and_count(
        lambda: Pipeline.from_iterable(paths, group_size=8).read(chunk_bytes=SMALL_CHUNK), want
    )


def test_reader_pipeline_closes_midway(many_files: list[tuple[str, bytes]]) -> None:
    paths = [p for p, _ in many_files]
    check_close_midway(
        lambda: Pipeline.from_iterable(paths, group_size=4).read(chunk_bytes=SMALL_CHUNK), take=5
    )


def test_reader_pipeline_resumes_midway(many_files: list[tuple[str, bytes]]) -> None:
    paths = [p for p, _ in many_files]
    want = [np.frombuffer(d, np.uint8) for _, d in many_files]
    check_state_midway(
        lambda: Pipeline.from_iterable(paths, group_size=4).read(chunk_bytes=SMALL_CHUNK),
        want,
        take=13,
    )


@pytest.mark.parametrize("cold", [True, False])
def test_a_job_probes_the_page_cache_on_a_sample_of_its_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cold: bool
) -> None:
    """One read in eight asks RWF_NOWAIT; the misses are estimated for the whole job."""
    from iopipe.stages.read_jobs import read_job

    files = make_files(tmp_path, [100 + i for i in range(20)], seed=3)
    real = os.preadv
    probes = []

    def preadv(fd: int, buffers: Any, offset: int, flags: int = 0) -> int:
        if flags:
            probes.append(fd)
            if cold:
                raise BlockingIOError
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    entries = [(p, 0, None) for p, _ in files]
    out, misses = read_job(entries, DEFAULT_CHUNK, 1)
    assert [bytes(b) for b in out] == [d for _, d in files]
    assert len(probes) == 3  # reads 0, 8 and 16
    assert misses == (20 if cold else 0)
