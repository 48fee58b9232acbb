"""WebDataset tar shards: written by iopipe, read by the ``webdataset`` package and back.

Round trips are byte-exact both ways; ``Pipeline.from_shards`` gives every sample
exactly once per epoch under shuffle, in every rank layout, with equal counts per
rank, and resumes mid-epoch exactly; corrupt, truncated and missing shards raise
errors naming the shard.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from iopipe import Pipeline, ShardError, StageError, write_shards
from iopipe.shards.tar import INDEX_SUFFIX
from iopipe.shards.urls import expand_braces

wds = pytest.importorskip("webdataset")


def _samples(n: int, *, big: int = 0) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        s: dict[str, Any] = {
            "__key__": f"part{i % 3}/s{i:05d}",
            "bin": os.urandom(1 + (i * 7919) % 3000) if not big else os.urandom(big),
            "cls": str(i % 10).encode(),
            "json": json.dumps({"i": i}).encode(),
        }
        out.append(s)
    return out


def _plain(sample: dict[str, Any]) -> dict[str, Any]:
    """A sample as comparable values: fields as bytes, without reader-specific keys."""
    return {
        k: (v if k.startswith("__") else bytes(v))
        for k, v in sample.items()
        if k not in ("__url__", "__local_path__")
    }


def _wds_read(shards: list[str]) -> list[dict[str, Any]]:
    """The samples of ``shards`` as the ``webdataset`` package reads them.

    Its tar iterator and key grouping over files we open and close (its
    ``WebDataset`` pipeline leaves shard files to the garbage collector).
    """
    from webdataset import tariterators as ti

    out = []
    for url in shards:
        with open(url, "rb") as f:
            files = ({**x, "__url__": url} for x in ti.tar_file_iterator(f))
            out.extend(_plain(s) for s in ti.group_by_keys(files))
    return out


def _read_all(pipe: Pipeline[Any]) -> list[dict[str, Any]]:
    try:
        return [_plain(s) for s in pipe]
    finally:
        pipe.close()


def test_webdataset_reads_what_iopipe_writes(tmp_path: Path) -> None:
    want = _samples(200)
    shards = write_shards(want, tmp_path, shard_bytes=64 << 10)
    assert len(shards) > 3
    assert all(os.path.exists(p + INDEX_SUFFIX) for p in shards)
    got = _wds_read(shards)
    assert got == [_plain(s) for s in want]


def test_iopipe_reads_what_webdataset_writes(tmp_path: Path) -> None:
    want = _samples(150)
    pattern = str(tmp_path / "w-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=40) as sink:
        for s in want:
            sink.write(s)
    got = _read_all(Pipeline.from_shards(str(tmp_path / "w-{000000..000003}.tar")))
    assert got == [_plain(s) for s in want]  # no index beside them: the headers were scanned


def test_iopipe_reads_back_what_it_writes_with_and_without_index(tmp_path: Path) -> None:
    want = [_plain(s) for s in _samples(90)]
    shards = write_shards(want, tmp_path, shard_bytes=32 << 10)
    got = _read_all(Pipeline.from_shards(shards))
    assert got == want
    for p in shards:
        os.unlink(p + INDEX_SUFFIX)
    assert _read_all(Pipeline.from_shards(str(tmp_path / "*.tar"))) == want


def test_long_keys_and_large_members(tmp_path: Path) -> None:
    want = [{"__key__": "a/" + "x" * 180 + f"{i}", "bin": os.urandom(3 << 20)} for i in range(3)]
    shards = write_shards(want, tmp_path, shard_bytes=1)  # one sample a shard
    assert len(shards) == 3
    got = _read_all(Pipeline.from_shards(shards, chunk_bytes=1 << 20))
    assert got == [_plain(s) for s in want]
    assert _wds_read(shards) == got


def test_samples_map_and_batch_like_files(tmp_path: Path) -> None:
    shards = write_shards(_samples(64), tmp_path, shard_bytes=16 << 10)
    pipe = Pipeline.from_shards(shards).map(lambda s: int(bytes(s["cls"]))).batch(16)
    try:
        batches = [b.tolist() for b in pipe]
    finally:
        pipe.close()
    assert [x for b in batches for x in b] == [i % 10 for i in range(64)]
    assert len(batches) == 4


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("mode", ["pad", "drop"])
def test_shuffle_visits_each_sample_once_per_epoch_on_every_rank_layout(
    tmp_path: Path, world: int, mode: str
) -> None:
    n = 101
    shards = write_shards(_samples(n), tmp_path, shard_bytes=24 << 10)
    per_rank: list[list[list[str]]] = []
    for rank in range(world):
        pipe = Pipeline.from_shards(
            shards, shuffle=True, seed=3, rank=rank, world_size=world, shard=mode
        )
        try:
            per_rank.append([[s["__key__"] for s in pipe] for _ in range(2)])
        finally:
            pipe.close()
    for epoch in range(2):
        keys = [r[epoch] for r in per_rank]
        assert len({len(k) for k in keys}) == 1  # equal counts per rank
        every = [k for r in keys for k in r]
        if mode == "drop":
            assert len(set(every)) == len(every) == n - n % world
        else:
            assert set(every) == {s["__key__"] for s in _samples(n)}
            assert len(every) == -(-n // world) * world
    orders = [tuple(k for r in per_rank for k in r[e]) for e in range(2)]
    assert orders[0] != orders[1]  # each epoch its own permutation
    if world == 1:
        assert list(orders[0]) != sorted(orders[0])  # shuffled, not shard order


def test_the_shuffle_is_deterministic_in_seed_and_epoch(tmp_path: Path) -> None:
    shards = write_shards(_samples(50), tmp_path, shard_bytes=16 << 10)

    def keys(seed: int) -> list[str]:
        pipe = Pipeline.from_shards(shards, shuffle=True, seed=seed)
        try:
            return [s["__key__"] for s in pipe]
        finally:
            pipe.close()

    assert keys(1) == keys(1)
    assert keys(1) != keys(2)


def test_resume_mid_epoch_is_exact(tmp_path: Path) -> None:
    shards = write_shards(_samples(120), tmp_path, shard_bytes=32 << 10)
    pipe = Pipeline.from_shards(shards, shuffle=True, seed=9)
    try:
        whole = [s["__key__"] for s in pipe]
        pipe.set_epoch(0)
        it = iter(pipe)
        head = [next(it)["__key__"] for _ in range(37)]
        state = pipe.state_dict()
    finally:
        pipe.close()
    for _ in range(2):  # resumed twice from the same state: the same rest
        again = Pipeline.from_shards(shards, shuffle=True, seed=9)
        again.load_state_dict(state)
        try:
            rest = [s["__key__"] for s in again]
        finally:
            again.close()
        assert head + rest == whole


def test_a_truncated_shard_names_itself_and_the_member(tmp_path: Path) -> None:
    shards = write_shards(_samples(30), tmp_path, shard_bytes=1 << 20, index=False)
    path = shards[0]
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ShardError) as info:
        Pipeline.from_shards(path)
    assert path in str(info.value)


def test_a_truncated_shard_with_a_stale_index_is_scanned_not_trusted(tmp_path: Path) -> None:
    (path,) = write_shards(_samples(30), tmp_path, shard_bytes=1 << 20)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ShardError, match=r"truncated|not a readable tar"):
        Pipeline.from_shards(path)


def test_a_shard_that_is_not_a_tar(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(ShardError, match=r"bad\.tar"):
        Pipeline.from_shards(str(bad))
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    with pytest.raises(ShardError, match=r"empty\.tar"):
        Pipeline.from_shards(str(empty))


@pytest.mark.parametrize(
    "doc",
    [
        "not json",
        json.dumps({"version": 99}),
        json.dumps({"version": 1, "tar_bytes": None}),
        "SIZE:" + json.dumps({"names": ["a.x"], "offsets": [10**12], "sizes": [1]}),
        "SIZE:" + json.dumps({"names": ["a.x", "b.x"], "offsets": [1024, 512], "sizes": [8, 8]}),
        "SIZE:" + json.dumps({"names": [1], "offsets": [512], "sizes": [8]}),
    ],
)
def test_a_corrupt_index_is_an_error_naming_it(tmp_path: Path, doc: str) -> None:
    (path,) = write_shards(_samples(5), tmp_path, shard_bytes=1 << 20)
    if doc.startswith("SIZE:"):
        body = json.loads(doc[5:])
        body |= {"version": 1, "tar_bytes": os.path.getsize(path)}
        doc = json.dumps(body)
    Path(path + INDEX_SUFFIX).write_text(doc)
    if '"tar_bytes": null' in doc:
        assert len(_read_all(Pipeline.from_shards(path))) == 5  # stale: scanned instead
        return
    with pytest.raises(ShardError) as info:
        Pipeline.from_shards(path)
    assert INDEX_SUFFIX in str(info.value)


def test_a_member_unreadable_at_read_time_names_the_shard_and_sample(tmp_path: Path) -> None:
    shards = write_shards(_samples(40), tmp_path, shard_bytes=1 << 20)
    pipe = Pipeline.from_shards(shards)
    with open(shards[0], "r+b") as f:  # shortened after the index was read
        f.truncate(4096)
    try:
        with pytest.raises(StageError) as info:
            list(pipe)
    finally:
        pipe.close()
    assert shards[0] in str(info.value)
    assert "sample" in str(info.value)


def test_missing_shards(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.tar"):
        Pipeline.from_shards(str(tmp_path / "nope.tar"))
    with pytest.raises(FileNotFoundError):
        Pipeline.from_shards(str(tmp_path / "*.tar"))


def test_duplicate_fields_in_one_sample_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "dup.tar"
    with tarfile.open(path, "w") as tar:
        for name in ("a.txt", "a.txt"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, __import__("io").BytesIO(b"x"))
    with pytest.raises(ShardError, match="two 'txt' members"):
        Pipeline.from_shards(str(path))


def test_brace_expansion() -> None:
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}/{1..2}") == ["a/1", "a/2", "b/1", "b/2"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    for bad in ("x{1..}", "x{3..1}", "x{a{b}}", "x}", "x{0..99999999}"):
        with pytest.raises(ValueError):
            expand_braces(bad)


@pytest.mark.parametrize(
    "sample",
    [
        {"jpg": b"x"},
        {"__key__": "a.b", "jpg": b"x"},
        {"__key__": "../up", "jpg": b"x"},
        {"__key__": "k"},
        {"__key__": "k", "JPG": b"x"},
        {"__key__": "k", "jpg": 1.5},
    ],
)
def test_write_refuses_samples_a_reader_would_misread(tmp_path: Path, sample: Any) -> None:
    with pytest.raises((ValueError, TypeError)):
        write_shards([sample], tmp_path)
    assert not list(tmp_path.iterdir())  # no half-written shard


def test_pack_a_folder_from_the_command_line(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for i in range(25):
        d = src / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"img{i:03d}.jpg").write_bytes(os.urandom(100 + i))
        (d / f"img{i:03d}.cls").write_text(str(i % 2))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "iopipe", "pack", str(src), str(out), "--shard-bytes", "4KiB"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    shards = proc.stdout.split()
    assert len(shards) > 2
    got = _read_all(Pipeline.from_shards(shards))
    assert [s["__key__"] for s in got] == sorted(f"c{i % 2}/img{i:03d}" for i in range(25))
    for s in got:
        i = int(s["__key__"][-3:])
        assert s["jpg"] == (src / f"c{i % 2}" / f"img{i:03d}.jpg").read_bytes()
        assert s["cls"] == str(i % 2).encode()
    assert _wds_read(shards) == got


def test_pack_refuses_a_file_without_extension(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "README").write_text("x")
    proc = subprocess.run(
        [sys.executable, "-m", "iopipe", "pack", str(tmp_path / "src"), str(tmp_path / "o")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "no extension" in proc.stderr


# -- hostile and stale shards (review) ----------------------------------------------
def test_a_corrupt_header_mid_tar_is_an_error_not_a_short_shard(tmp_path: Path) -> None:
    (path,) = write_shards(_samples(10), tmp_path, shard_bytes=1 << 20, index=False)
    with tarfile.open(path) as tar:
        at = tar.getmembers()[5].offset  # the header of member 5
    data = bytearray(Path(path).read_bytes())
    data[at + 100] ^= 0xFF  # its mode field: the checksum fails
    Path(path).write_bytes(bytes(data))
    with pytest.raises(ShardError, match="not the end of a tar"):
        Pipeline.from_shards(path)


def test_concatenated_tars_are_refused(tmp_path: Path) -> None:
    a = write_shards(_samples(4), tmp_path / "a", shard_bytes=1 << 20, index=False)[0]
    b = write_shards(_samples(4), tmp_path / "b", shard_bytes=1 << 20, index=False)[0]
    both = tmp_path / "both.tar"
    both.write_bytes(Path(a).read_bytes() + Path(b).read_bytes())
    with pytest.raises(ShardError, match="concatenated"):
        Pipeline.from_shards(str(both))


def test_an_index_of_another_tar_of_the_same_size_is_refused(tmp_path: Path) -> None:
    (path,) = write_shards(
        [{"__key__": f"k{i}", "bin": b"x" * 1000} for i in range(5)], tmp_path / "a"
    )
    index = Path(path + INDEX_SUFFIX).read_bytes()
    (other,) = write_shards(
        [{"__key__": f"k{i}", "bin": b"y" * (995 if i % 2 else 1005)} for i in range(5)],
        tmp_path / "b",
        index=False,
    )
    assert os.path.getsize(other) == os.path.getsize(path)
    Path(other + INDEX_SUFFIX).write_bytes(index)
    with pytest.raises(ShardError, match="index does not describe it"):
        Pipeline.from_shards(other)


def test_a_gzipped_tar_says_so(tmp_path: Path) -> None:
    import gzip

    (path,) = write_shards(_samples(3), tmp_path / "a", index=False)
    gz = tmp_path / "x.tar.gz"
    gz.write_bytes(gzip.compress(Path(path).read_bytes()))
    with pytest.raises(ShardError, match="gzip"):
        Pipeline.from_shards(str(gz))


def test_a_folder_glob_leaves_indexes_out(tmp_path: Path) -> None:
    shards = write_shards(_samples(20), tmp_path, shard_bytes=16 << 10)
    assert _read_all(Pipeline.from_shards(str(tmp_path / "*"))) == _read_all(
        Pipeline.from_shards(shards)
    )


def test_writing_beside_an_earlier_set_is_refused(tmp_path: Path) -> None:
    write_shards(_samples(3), tmp_path)
    with pytest.raises(FileExistsError, match="already holds shards"):
        write_shards(_samples(3), tmp_path)


@pytest.mark.parametrize(
    "samples",
    [
        [{"__key__": "__meta__/1", "x": b"1"}],
        [{"__key__": "a\x00b", "x": b"1"}],
        [{"__key__": "k", "x": b"1"}, {"__key__": "k", "y": b"2"}],
        [{"__key__": "k", 3: b"1"}],
    ],
)
def test_keys_a_reader_would_drop_or_merge_are_refused(tmp_path: Path, samples: Any) -> None:
    with pytest.raises(ValueError):
        write_shards(samples, tmp_path)


def test_brace_padding_follows_braceexpand() -> None:
    assert expand_braces("x{1..010}")[:2] == ["x001", "x002"]


def _size_of(sample: dict[str, Any]) -> int:
    return len(sample["bin"])


def test_a_shard_pipeline_round_trips_through_a_config(tmp_path: Path) -> None:
    write_shards(_samples(40), tmp_path / "s", shard_bytes=16 << 10)
    pipe = (
        Pipeline.from_shards(str(tmp_path / "s" / "*.tar"), shuffle=True, seed=2, concurrency=3)
        .map(_size_of)
        .batch(8)
    )
    config = pipe.to_config()
    assert config["source"]["shards"] == str(tmp_path / "s" / "*.tar")
    assert config["source"]["concurrency"] == 3
    assert [st["stage"] for st in config["stages"]] == ["map", "batch"]  # read/split implied
    again = Pipeline.from_config(config, allow=[__name__])
    try:
        assert [b.tolist() for b in again] == [b.tolist() for b in pipe]
        assert again.to_config() == config
    finally:
        pipe.close()
        again.close()


def test_shard_keys_on_another_source_are_refused() -> None:
    from iopipe import ConfigError

    with pytest.raises(ConfigError, match="shards"):
        Pipeline.from_config({"source": {"items": [1, 2], "chunk_bytes": 10}})


def test_a_sample_split_by_a_large_other_member_is_refused(tmp_path: Path) -> None:
    import io

    path = tmp_path / "gap.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("k.a", b"1"), ("README", b"x" * (200 << 10)), ("k.b", b"2")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ShardError, match="other members between its fields"):
        Pipeline.from_shards(str(path))
