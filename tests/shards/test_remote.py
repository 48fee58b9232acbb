"""Shards over HTTP (nginx) and S3 (moto's server): the same samples as from disk.

Also retries (500s and dropped connections are retried, a 403 is not), missing
objects, shards without an index (scanned by streaming them once) and the
request count of a read, all against servers on 127.0.0.1 started by the
fixtures in conftest.py.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from iopipe import Pipeline, StageError, write_shards
from iopipe.shards.tar import INDEX_SUFFIX

pytest.importorskip("obstore")


def _samples(n: int) -> list[dict[str, Any]]:
    return [
        {"__key__": f"d{i % 2}/k{i:04d}", "bin": os.urandom(50 + (i * 131) % 2000), "cls": str(i)}
        for i in range(n)
    ]


def _plain(pipe: Pipeline[Any]) -> list[dict[str, Any]]:
    try:
        return [
            {k: (v if k.startswith("__") else bytes(v)) for k, v in s.items() if k != "__url__"}
            for s in pipe
        ]
    finally:
        pipe.close()


@pytest.fixture
def local(tmp_path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    shards = write_shards(_samples(120), tmp_path / "shards", shard_bytes=48 << 10)
    return shards, _plain(Pipeline.from_shards(shards))


def test_the_same_samples_from_disk_and_nginx(
    nginx: tuple[str, Path], local: tuple[list[str], list[dict[str, Any]]]
) -> None:
    base, www = nginx
    shards, want = local
    for p in shards:
        shutil.copy(p, www)
        shutil.copy(p + INDEX_SUFFIX, www)
    n = len(shards)
    url = f"{base}/shard-{{000000..{n - 1:06d}}}.tar"
    assert _plain(Pipeline.from_shards(url)) == want
    got = _plain(Pipeline.from_shards(url, shuffle=True, seed=4))
    assert sorted(got, key=lambda s: s["__key__"]) == sorted(want, key=lambda s: s["__key__"])
    assert [s["__key__"] for s in got] != [s["__key__"] for s in want]


def test_the_same_samples_from_disk_and_moto_s3(
    s3: Any, local: tuple[list[str], list[dict[str, Any]]]
) -> None:
    shards, want = local
    s3.create_bucket(Bucket="data")
    for p in shards:
        for f in (p, p + INDEX_SUFFIX):
            s3.upload_file(f, "data", "train/" + os.path.basename(f))
    assert _plain(Pipeline.from_shards("s3://data/train/shard-*.tar")) == want
    # Two ranks: disjoint halves of one permutation, equal in count.
    ranks = [
        _plain(Pipeline.from_shards("s3://data/train/*.tar", shuffle=True, rank=r, world_size=2))
        for r in range(2)
    ]
    keys = [[s["__key__"] for s in r] for r in ranks]
    assert len(keys[0]) == len(keys[1]) == 60
    assert set(keys[0]).isdisjoint(keys[1])
    assert set(keys[0]) | set(keys[1]) == {s["__key__"] for s in want}


def test_a_remote_shard_without_index_is_scanned_once(
    flaky: Any, local: tuple[list[str], list[dict[str, Any]]]
) -> None:
    shards, want = local
    for p in shards:
        flaky.files[os.path.basename(p)] = Path(p).read_bytes()  # no .index beside them
    urls = [f"{flaky.url}/{os.path.basename(p)}" for p in shards]
    assert _plain(Pipeline.from_shards(urls)) == want


def test_500s_and_dropped_connections_are_retried(
    flaky: Any, local: tuple[list[str], list[dict[str, Any]]]
) -> None:
    shards, want = local
    p = shards[0]
    for f in (p, p + INDEX_SUFFIX):
        flaky.files[os.path.basename(f)] = Path(f).read_bytes()
    flaky.faults[:] = ["500", "reset", "503"]
    got = _plain(Pipeline.from_shards(f"{flaky.url}/{os.path.basename(p)}"))
    assert got
    assert got == want[: len(got)]
    assert not flaky.faults  # every fault was met, and retried past


def test_a_403_is_not_retried_and_names_the_shard(
    flaky: Any, local: tuple[list[str], list[dict[str, Any]]]
) -> None:
    shards, _ = local
    p = shards[0]
    for f in (p, p + INDEX_SUFFIX):
        flaky.files[os.path.basename(f)] = Path(f).read_bytes()
    url = f"{flaky.url}/{os.path.basename(p)}"
    pipe = Pipeline.from_shards(url, concurrency=1)  # indexed while the server answers
    flaky.faults[:] = ["403"]  # the next request only: a retry of it would succeed
    before = len(flaky.requests)
    try:
        with pytest.raises(StageError) as info:
            list(pipe)
    finally:
        pipe.close()
    assert url in str(info.value)
    assert "403" in str(info.value)
    assert flaky.requests[before] == "GET"


def test_a_missing_remote_shard_is_file_not_found(flaky: Any) -> None:
    with pytest.raises(FileNotFoundError) as info:
        Pipeline.from_shards(f"{flaky.url}/nope.tar")
    assert "nope.tar" in str(info.value)


def test_an_http_glob_is_refused(flaky: Any) -> None:
    with pytest.raises(ValueError, match="braces"):
        Pipeline.from_shards(f"{flaky.url}/shard-*.tar")


def test_local_and_remote_do_not_mix(flaky: Any, tmp_path: Path) -> None:
    (p,) = write_shards(_samples(3), tmp_path, shard_bytes=1 << 20)
    flaky.files["x.tar"] = Path(p).read_bytes()
    with pytest.raises(ValueError, match="not both"):
        Pipeline.from_shards([p, f"{flaky.url}/x.tar"])


def test_probe_measures_an_http_prefix(flaky: Any, tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    for i in range(3):
        flaky.files[f"obj-{i}.bin"] = os.urandom(300_000)
    proc = subprocess.run(
        [
            sys.executable, "-m", "iopipe", "probe", f"{flaky.url}/obj-{{0..2}}.bin",
            "--concurrency", "1,4", "--chunk-bytes", "64KiB", "--repeats", "1",
            "--min-time", "0", "--json",
        ],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["files"] == 3
    assert all(c["bytes"] == 900_000 for c in report["results"])


def test_probe_measures_an_s3_prefix(s3: Any, tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    s3.create_bucket(Bucket="probe")
    for i in range(2):
        s3.put_object(Bucket="probe", Key=f"p/x{i}.bin", Body=os.urandom(200_000))
    proc = subprocess.run(
        [
            sys.executable, "-m", "iopipe", "probe", "s3://probe/p/", "--concurrency", "2",
            "--chunk-bytes", "64KiB", "--repeats", "1", "--min-time", "0", "--json",
        ],
        capture_output=True, text=True, check=False, timeout=120, env=dict(os.environ),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["files"] == 2
    assert report["results"][0]["bytes"] == 400_000


def test_a_sample_with_empty_fields_over_http(flaky: Any, tmp_path: Path) -> None:
    samples = [{"__key__": "a", "x": b""}, {"__key__": "b", "x": b"12"}]
    (p,) = write_shards(samples, tmp_path / "e")
    for f in (p, p + INDEX_SUFFIX):
        flaky.files[os.path.basename(f)] = Path(f).read_bytes()
    got = _plain(Pipeline.from_shards(f"{flaky.url}/{os.path.basename(p)}"))
    assert got == [{"__key__": "a", "x": b""}, {"__key__": "b", "x": b"12"}]


def test_two_pipelines_from_one_from_shards_run_at_once(
    flaky: Any, local: tuple[list[str], list[dict[str, Any]]]
) -> None:
    shards, want = local
    for p in shards:
        for f in (p, p + INDEX_SUFFIX):
            flaky.files[os.path.basename(f)] = Path(f).read_bytes()
    base = Pipeline.from_shards([f"{flaky.url}/{os.path.basename(p)}" for p in shards], timeout=60)
    other = base.map(lambda s: s)
    a, b = iter(base), iter(other)
    got_a, got_b = [], []
    for x, y in zip(a, b, strict=True):  # both loops fetch through one Remote
        got_a.append(x["__key__"])
        got_b.append(y["__key__"])
    base.close()
    other.close()
    assert got_a == got_b == [s["__key__"] for s in want]


def test_credentials_in_a_url_are_refused_and_not_echoed(flaky: Any) -> None:
    url = flaky.url.replace("http://", "http://alice:s3cret@") + "/x.tar"
    with pytest.raises(ValueError) as info:
        Pipeline.from_shards(url)
    assert "s3cret" not in str(info.value)


def test_s3_keys_keep_percent_signs_and_globs_stay_in_one_folder(s3: Any, tmp_path: Path) -> None:
    (p,) = write_shards(_samples(4), tmp_path / "k")
    s3.create_bucket(Bucket="keys")
    s3.upload_file(p, "keys", "t/100%41.tar")
    s3.upload_file(p, "keys", "t/sub/deep.tar")
    got = _plain(Pipeline.from_shards("s3://keys/t/*.tar"))
    assert len(got) == 4  # t/100%41.tar only: not t/sub/deep.tar
