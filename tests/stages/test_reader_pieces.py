"""Large items read in pieces: work bounded by the workers, not by size / chunk_bytes."""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from iopipe import Pipeline
from iopipe.stages import reader
from iopipe.stages.read_jobs import NeedRoom, piece_bytes, read_job


@pytest.mark.parametrize(
    ("size", "chunk", "workers", "want"),
    [
        (16 << 20, 4 << 20, 8, 4 << 20),  # chunks of 1 MiB or more: one chunk a job, as before
        (2 << 20, 256 << 10, 8, 256 << 10),  # few chunks: one a job, every worker busy
        (16 << 20, 256 << 10, 8, 1 << 20),  # many small chunks: a job reads 1 MiB of them
        (2 << 30, 4096, 8, 1 << 20),
        (16 << 20, 16, 8, 1 << 20),
        (100, 16, 64, 16),
        (5 << 20, 3 << 20, 1, 3 << 20),
    ],
)
def test_a_job_reads_whole_chunks_enough_for_every_worker(
    size: int, chunk: int, workers: int, want: int
) -> None:
    got = piece_bytes(size, chunk, workers)
    assert got == want
    assert got % chunk == 0
    jobs = -(-size // got)
    assert jobs >= min(workers, -(-size // chunk))  # no worker idles for want of a job
    assert jobs <= max(workers, size // (1 << 20) + 1)  # and jobs do not grow with size / chunk


def _file(tmp_path: Path, size: int) -> tuple[str, bytes]:
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / f"big-{size}.bin"
    path.write_bytes(data)
    return str(path), data


def test_a_large_item_with_tiny_chunks_is_read_exactly_in_few_jobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 4 MiB in 16-byte chunks was 262,144 jobs, each an asyncio task made up front.
    path, data = _file(tmp_path, (4 << 20) + 5)
    real, pieces = reader.read_piece, []

    def piece(large: Any, start: int, stop: int, *args: Any) -> Any:
        pieces.append((start, stop))
        return real(large, start, stop, *args)

    monkeypatch.setattr(reader, "read_piece", piece)
    with Pipeline.from_files([path]).read(chunk_bytes=16, concurrency=4) as pipe:
        (buf,) = list(pipe)
    assert bytes(buf) == data
    assert sorted(pieces) == [
        (a, min(a + (1 << 20), len(data))) for a in range(0, len(data), 1 << 20)
    ]


def test_byte_ranges_read_in_pieces_are_exact(tmp_path: Path) -> None:
    path, data = _file(tmp_path, 3 << 20)
    ranges = [(path, 7, (2 << 20) + 3), (path, 1 << 20, 1 << 20), (path, 0, 0)]
    with Pipeline.from_files(ranges).read(chunk_bytes=4096, concurrency=3) as pipe:
        got = [bytes(b) for b in pipe]
    assert got == [data[o : o + n] for _, o, n in ranges]


def test_a_large_item_under_skip_is_read_in_pieces_too(tmp_path: Path) -> None:
    path, data = _file(tmp_path, 2 << 20)
    items = [path, str(tmp_path / "missing.bin"), path]
    pipe = Pipeline.from_files(items, on_error="skip").read(chunk_bytes=1024, concurrency=2)
    with pipe:
        got = [bytes(b) for b in pipe]
    assert got == [data, data]


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self.changed = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self.changed:
            self.messages.append(record.getMessage())
            self.changed.notify_all()


@pytest.fixture
def warnings() -> Iterator[_Warnings]:
    handler = _Warnings()
    log = logging.getLogger("iopipe")
    log.addHandler(handler)
    yield handler
    log.removeHandler(handler)


def test_a_stall_on_a_large_item_names_the_reader_the_item_and_its_age(
    tmp_path: Path, warnings: _Warnings, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, data = _file(tmp_path, 4 << 20)
    real = reader.read_piece
    second_started, release = threading.Event(), threading.Event()
    calls: list[int] = []

    def piece(large: Any, start: int, *args: Any) -> Any:
        calls.append(start)
        if len(calls) == 1:
            time.sleep(0.3)  # the item is at least this old when the second piece runs
        elif len(calls) == 2:
            second_started.set()
            release.wait(30)
        return real(large, start, *args)

    def releaser() -> None:
        second_started.wait(30)
        with warnings.changed:
            seen = len(warnings.messages)
            warnings.changed.wait_for(lambda: len(warnings.messages) > seen, 30)
            marks.append(seen)
        release.set()

    marks: list[int] = []
    monkeypatch.setattr(reader, "read_piece", piece)
    t = threading.Thread(target=releaser, name="test-releaser")
    t.start()
    pipe = Pipeline.from_files([path], stall_warning=0.05).read(chunk_bytes=64 << 10, concurrency=1)
    try:
        with pipe:
            (buf,) = list(pipe)
    finally:
        release.set()
        t.join(30)
    assert bytes(buf) == data
    message = warnings.messages[marks[0]]
    found = re.search(r"stuck in stage 'read' on item '([^']+)' for ([\d.]+) s", message)
    assert found, message
    assert found.group(1).endswith(os.path.basename(path))
    assert float(found.group(2)) >= 0.3  # the item's age, not the second piece's


def test_a_job_stopped_for_room_reports_no_cache_observation(tmp_path: Path) -> None:
    # A job that read nothing must not tell the read governor "all cached".
    path, _ = _file(tmp_path, 1 << 16)
    out, misses = read_job(
        [(path, 0, None)] * 4, 1 << 22, getattr(os, "RWF_NOWAIT", 0), reserve=lambda n: False
    )
    assert len(out) == 1
    assert isinstance(out[0], NeedRoom)
    assert misses == -1
