"""Files iopipe does not control: FIFOs, devices, /proc files, symlink loops, bogus ranges.

Each case once hung, read without bound, listed a file many times or ended an
epoch that ``on_error="skip"`` should have carried on; now each gives a clear
error naming the file, or is left out of a listing as docs/reliability.md says.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from iopipe import Pipeline, StageError, TokenFileError, TokenShards
from iopipe.io.files import NotRegularFileError, contained, open_regular, read_small
from iopipe.io.listing import list_files


def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / "a.bin").write_bytes(b"a" * 10)
    (root / "sub" / "b.bin").write_bytes(b"b" * 20)
    return root


def test_a_fifo_is_refused_at_once_naming_it(tmp_path: Path) -> None:
    fifo = tmp_path / "never-written.fifo"
    os.mkfifo(fifo)  # a plain open() for reading would wait for a writer for ever
    pipe = Pipeline.from_files([str(fifo)], timeout=30).read()
    with pipe, pytest.raises(StageError, match=r"never-written\.fifo") as info:
        next(iter(pipe))
    assert isinstance(info.value.__cause__, NotRegularFileError)
    assert "a FIFO, not a regular file" in str(info.value)


@pytest.mark.parametrize("path", ["/dev/zero", "/proc/self/status"])
def test_devices_and_proc_files_are_refused(path: str) -> None:
    if not os.path.exists(path):
        pytest.skip(f"{path} does not exist here")
    with pytest.raises(NotRegularFileError, match="regular file"):
        os.close(open_regular(path))
    with Pipeline.from_files([path]).read() as pipe, pytest.raises(StageError, match=path):
        next(iter(pipe))


def test_a_folder_listing_leaves_out_what_is_not_a_regular_file(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    os.mkfifo(root / "pipe.bin")
    os.symlink("/nonexistent/target", root / "dangling.bin")
    os.symlink("/dev/zero", root / "zero.bin")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(root / "sock.bin"))
        want = [str(root / "a.bin"), str(root / "sub" / "b.bin")]
        assert list_files(root) == want
        assert list_files(str(root / "**" / "*.bin")) == want
        with Pipeline.from_files(str(root)).read() as pipe:
            assert [bytes(b) for b in pipe] == [b"a" * 10, b"b" * 20]
    finally:
        sock.close()


_LOOPS = """
import sys
from iopipe.io.listing import list_files
print(len(list_files(sys.argv[1])))
"""


def test_recursive_globs_enter_each_folder_once(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    os.symlink(".", root / "self")
    os.symlink("..", root / "sub" / "up")
    out = subprocess.run(  # two loops: the standard glob never finishes
        [sys.executable, "-c", _LOOPS, str(root / "**" / "*.bin")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == "2"


def test_token_shards_count_each_file_once_through_a_symlink_loop(tmp_path: Path) -> None:
    root = tmp_path / "tokens"
    root.mkdir()
    np.save(root / "t.npy", np.arange(1000, dtype=np.uint16))
    os.symlink(".", root / "self")
    shards = TokenShards(str(root / "**" / "*.npy"), seq_len=9, batch_size=1)
    assert shards.num_tokens == 1000


def test_a_fifo_token_shard_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "tokens.npy"
    os.mkfifo(fifo)
    with pytest.raises(TokenFileError, match="FIFO"):
        TokenShards([str(fifo)], seq_len=4, batch_size=1)


@pytest.mark.parametrize("head", [b"\x93NUMPY\x02\x00\x10\x00", b"\x93NUMPY\x02\x00"])
def test_a_truncated_v2_npy_header_is_a_token_file_error(tmp_path: Path, head: bytes) -> None:
    path = tmp_path / "short.npy"
    path.write_bytes(head)
    with pytest.raises(TokenFileError, match="truncated"):
        TokenShards([str(path)], seq_len=4, batch_size=1)


def test_a_bogus_range_length_is_skipped_without_allocating(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    items = [(str(root / "a.bin"), 0, 10), (str(root / "a.bin"), 0, 1 << 50)]  # 1 PiB
    pipe = Pipeline.from_files(items, on_error="skip").read()
    with pipe:
        got = [bytes(b) for b in pipe]
    assert got == [b"a" * 10]
    assert pipe.stats().stage("read").failures == 1
    with (
        Pipeline.from_files(items[1:]).read() as pipe,
        pytest.raises(StageError, match="runs past the end of the file"),
    ):
        next(iter(pipe))


def test_read_small_is_bounded(tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    big.write_bytes(b"x" * 100)
    assert read_small(big, 100) == b"x" * 100
    with pytest.raises(ValueError, match="more than the 99"):
        read_small(big, 99)
    with pytest.raises(NotRegularFileError):
        read_small("/dev/zero", 1 << 20)


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../b", "", "a\x00b", "./a", 3])
def test_contained_refuses_names_that_leave_the_folder(name: object) -> None:
    with pytest.raises(ValueError, match="entry"):
        contained(name, "entry")


def test_contained_accepts_plain_names() -> None:
    assert contained("model-00001-of-00002.safetensors", "entry") == (
        "model-00001-of-00002.safetensors"
    )
    assert contained("sub/shard.bin", "entry") == "sub/shard.bin"
