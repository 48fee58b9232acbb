"""Tests of iopipe.TokenShards (iopipe/tokens/)."""

from __future__ import annotations

import os
import struct
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import iopipe
from iopipe import TokenFileError, TokenShards
from iopipe.tokens import reader as _token_reader
from iopipe.tokens.files import parse_npy_header
from iopipe.tokens.index import feistel_permute, uniform_ints
from iopipe.tokens.reader import Recycler, WindowRanges, plan_reads, read_group
from tests._helpers import (
    assert_same,
    check_close_midway,
    check_error_propagation,
    check_order_and_count,
    check_state_midway,
)

Batch = tuple[torch.Tensor, torch.Tensor]


# -- data and the numpy reference ------------------------------------------------------


def _write(path: Path, tokens: np.ndarray[Any, Any]) -> str:
    if path.suffix == ".npy":
        np.save(path, tokens)
    else:
        tokens.tofile(path)
    return str(path)


def _shards(
    root: Path,
    sizes: Sequence[int],
    dtype: str = "uint16",
    suffix: str = ".bin",
    *,
    seed: int = 0,
) -> tuple[list[str], list[np.ndarray[Any, Any]]]:
    """Write shards of random tokens; return their paths (sorted) and contents."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    high = np.iinfo(dtype).max if dtype in ("uint16", "uint32") else 1 << 30
    paths, arrays = [], []
    for i, n in enumerate(sizes):
        tokens = rng.integers(0, high, size=n, dtype=np.int64).astype(dtype)
        paths.append(_write(root / f"shard{i:03d}{suffix}", tokens))
        arrays.append(tokens)
    return paths, arrays


def _positions(root: Path, sizes: Sequence[int]) -> tuple[list[str], list[np.ndarray[Any, Any]]]:
    """Shards whose tokens are their global positions (uint32): a token names its place."""
    paths, arrays, start = [], [], 0
    for i, n in enumerate(sizes):
        tokens = np.arange(start, start + n, dtype=np.uint32)
        paths.append(_write(root / f"pos{i:03d}.bin", tokens))
        arrays.append(tokens)
        start += n
    return paths, arrays


def _expected(
    data: list[np.ndarray[Any, Any]],
    windows: np.ndarray[Any, Any],
    seq_len: int,
    batch_size: int,
    drop_last: bool,
) -> list[Batch]:
    """The batches a loader must yield for ``windows``, built with numpy slicing."""
    rows = [data[s][f : f + seq_len + 1].astype(np.int64) for s, f in windows.tolist()]
    if drop_last:
        rows = rows[: len(rows) - len(rows) % batch_size]
    out = []
    for a in range(0, len(rows), batch_size):
        block = np.stack(rows[a : a + batch_size])
        out.append((torch.from_numpy(block[:, :-1].copy()), torch.from_numpy(block[:, 1:].copy())))
    return out


# -- the loader against the numpy reference ---------------------------------------


@pytest.mark.parametrize(
    ("dtype", "suffix"),
    [("uint16", ".bin"), ("uint32", ".bin"), ("uint16", ".npy"), ("int32", ".npy")],
)
@pytest.mark.parametrize("mode", ["windows", "packed"])
def test_batches_match_numpy_slicing(tmp_path: Path, mode: str, dtype: str, suffix: str) -> None:
    paths, data = _shards(tmp_path, [300, 1000, 45, 517], dtype, suffix)
    kwargs: dict[str, Any] = {"dtype": dtype} if suffix == ".bin" else {}

    def make() -> TokenShards:
        return TokenShards(
            tmp_path / f"*{suffix}",
            seq_len=16,
            batch_size=5,
            mode=mode,
            seed=3,
            drop_last=False,
            **kwargs,
        )

    with make() as ts:
        assert [s.path for s in ts.shards] == paths
        assert ts.num_tokens == sum(len(d) for d in data)
        assert ts.shards[0].dtype == np.dtype(dtype)
        windows = [ts.windows(e) for e in range(2)]
    check_order_and_count(make, lambda e: _expected(data, windows[e], 16, 5, False))
    x, y = _expected(data, windows[0], 16, 5, False)[0]
    assert x.dtype == y.dtype == torch.int64
    assert x.shape == (5, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_a_list_of_paths_and_a_directory(tmp_path: Path) -> None:
    paths, data = _shards(tmp_path / "d", [200, 300])
    for source in (list(reversed(paths)), tmp_path / "d", [Path(p) for p in paths]):
        with TokenShards(source, seq_len=8, batch_size=4, dtype="uint16") as ts:
            got = list(ts)
            want = _expected(
                [data[paths.index(s.path)] for s in ts.shards], ts.windows(0), 8, 4, True
            )
            assert_same(got, want)


def test_len_and_drop_last(tmp_path: Path) -> None:
    _shards(tmp_path, [1 + 8 * 23])  # 23 packed windows
    for drop_last, batches, last in ((True, 4, 5), (False, 5, 3)):
        with TokenShards(
            tmp_path / "*.bin",
            seq_len=8,
            batch_size=5,
            dtype="uint16",
            mode="packed",
            drop_last=drop_last,
        ) as ts:
            got = list(ts)
            assert len(ts) == len(got) == batches
            assert len(got[-1][0]) == last


@pytest.mark.parametrize("drop_last", [True, False])
def test_groups_of_any_size_are_recut_into_whole_batches(tmp_path: Path, drop_last: bool) -> None:
    paths, data = _shards(tmp_path, [3000])
    kw: dict[str, Any] = {"seq_len": 8, "batch_size": 5, "dtype": "uint16", "drop_last": drop_last}
    with TokenShards(paths, group_size=7, **kw) as odd, TokenShards(paths, **kw) as usual:
        got = list(odd)
        assert_same(got, list(usual))
        assert_same(got, _expected(data, odd.windows(0), 8, 5, drop_last))
        assert len(got) == len(odd)


def test_windows_per_epoch(tmp_path: Path) -> None:
    _shards(tmp_path, [500])
    with TokenShards(
        tmp_path / "*.bin", seq_len=8, batch_size=10, dtype="uint16", windows_per_epoch=95
    ) as ts:
        assert len(ts.windows(0)) == 95
        assert len(ts) == 9
        assert sum(len(x) for x, _ in ts) == 90


# -- windows mode ----------------------------------------------------------------------


def test_windows_never_cross_a_shard_and_follow_valid_starts(tmp_path: Path) -> None:
    seq_len = 16
    sizes = [17, 10, 400, 16, 2000, 33]  # 10 and 16 hold no window; 17 holds exactly one
    paths, _ = _shards(tmp_path, sizes)
    with TokenShards(
        paths, seq_len=seq_len, batch_size=8, dtype="uint16", windows_per_epoch=40_000
    ) as ts:
        w = ts.windows(0)
    shard, first = w[:, 0], w[:, 1]
    n = np.asarray(sizes)[shard]
    assert (first >= 0).all()
    assert (first + seq_len + 1 <= n).all()
    valid = np.maximum(np.asarray(sizes) - seq_len, 0)
    counts = np.bincount(shard, minlength=len(sizes))
    assert counts[1] == counts[3] == 0
    share = counts / counts.sum()
    assert np.allclose(share, valid / valid.sum(), atol=0.01)
    assert set(first[shard == 0].tolist()) == {0}
    assert set(first[shard == 2].tolist()) == set(range(400 - seq_len))  # every start is drawn


def test_windows_are_deterministic_and_epochs_differ(tmp_path: Path) -> None:
    paths, data = _shards(tmp_path, [3000, 2000])

    def make(seed: int = 0) -> TokenShards:
        return TokenShards(paths, seq_len=32, batch_size=4, dtype="uint16", seed=seed)

    with make() as a, make() as b, make(seed=1) as c:
        first = list(a)
        assert_same(list(b), first)
        assert not np.array_equal(a.windows(0), c.windows(0))
        second = list(a)  # epoch 1
        assert not np.array_equal(a.windows(0), a.windows(1))
        assert_same(second, _expected(data, a.windows(1), 32, 4, True))
        a.set_epoch(0)
        assert_same(list(a), first)


def test_uniform_ints_and_feistel_permutation() -> None:
    u = uniform_ints(7, np.arange(100_000, dtype=np.int64), 10)
    assert u.min() == 0
    assert u.max() == 9
    assert np.allclose(np.bincount(u) / len(u), 0.1, atol=0.01)
    for n in (1, 2, 3, 4, 5, 17, 1000, 4097):
        perm = feistel_permute(np.arange(n, dtype=np.int64), n, 12345)
        assert sorted(perm.tolist()) == list(range(n))
    a = feistel_permute(np.arange(1000, dtype=np.int64), 1000, 1)
    b = feistel_permute(np.arange(1000, dtype=np.int64), 1000, 2)
    assert not np.array_equal(a, b)
    assert not np.array_equal(a, np.arange(1000))


# -- packed mode -------------------------------------------------------------------------


def test_packed_targets_every_token_once(tmp_path: Path) -> None:
    seq_len = 8
    sizes = [1 + 8 * 20, 1 + 8 * 7 + 5, 8, 50]  # whole windows; a tail of 5; too short; tail 1
    paths, data = _positions(tmp_path, sizes)
    with TokenShards(
        paths, seq_len=seq_len, batch_size=3, dtype="uint32", mode="packed", drop_last=False
    ) as ts:
        batches = list(ts)
    xs = np.concatenate([x.flatten().numpy() for x, _ in batches])
    ys = np.concatenate([y.flatten().numpy() for _, y in batches])
    targets, inputs = Counter(ys.tolist()), Counter(xs.tolist())
    assert set(targets.values()) == {1}
    assert set(inputs.values()) == {1}
    want_y: set[int] = set()
    want_x: set[int] = set()
    for d in data:
        m = (len(d) - 1) // seq_len  # whole windows; tokens past them are not covered
        want_y.update(d[1 : 1 + m * seq_len].tolist())
        want_x.update(d[: m * seq_len].tolist())
    assert set(targets) == want_y
    assert set(inputs) == want_x


def test_packed_order_is_shuffled_per_epoch_or_in_file_order(tmp_path: Path) -> None:
    paths, _ = _shards(tmp_path, [1 + 8 * 30, 1 + 8 * 20])
    kw: dict[str, Any] = {"seq_len": 8, "batch_size": 4, "dtype": "uint16", "mode": "packed"}
    with TokenShards(paths, **kw) as ts, TokenShards(paths, shuffle=False, **kw) as plain:
        in_order = plain.windows(0)
        assert in_order.tolist() == [[0, 8 * k] for k in range(30)] + [
            [1, 8 * k] for k in range(20)
        ]
        assert np.array_equal(plain.windows(1), in_order)
        e0, e1 = ts.windows(0), ts.windows(1)
        for e in (e0, e1):
            assert sorted(map(tuple, e.tolist())) == sorted(map(tuple, in_order.tolist()))
        assert not np.array_equal(e0, in_order)
        assert not np.array_equal(e0, e1)


def test_merged_and_single_reads_agree(tmp_path: Path) -> None:
    paths, data = _shards(tmp_path, [1 + 16 * 300, 1000])
    kw: dict[str, Any] = {"seq_len": 16, "batch_size": 7, "dtype": "uint16", "mode": "packed"}
    with (
        TokenShards(paths, shuffle=False, **kw) as merged,
        TokenShards(paths, shuffle=False, merge_gap_bytes=None, **kw) as single,
    ):
        a, b = list(merged), list(single)
        assert_same(a, b)
        assert_same(a, _expected(data, merged.windows(0), 16, 7, True))
        # consecutive packed windows share a token: every group became one read
        assert merged.stats().stage("tokens").bytes < single.stats().stage("tokens").bytes


def test_plan_reads_merges_nearby_windows_up_to_a_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_token_reader, "MAX_MERGED_BYTES", 80)
    shard = np.array([0, 0, 1, 0, 0, 0], dtype=np.int64)
    offset = np.array([50, 0, 0, 10, 300, 75], dtype=np.int64)
    ranges = WindowRanges(["a", "b"], shard, offset, 20)
    assert plan_reads(ranges, 0) == [  # overlapping or touching only
        (0, 0, 30, [1, 3], [0, 10]),
        (0, 50, 70, [0], None),
        (0, 75, 95, [5], None),
        (0, 300, 320, [4], None),
        (1, 0, 20, [2], None),
    ]
    assert plan_reads(ranges, 40) == [
        (0, 0, 70, [1, 3, 0], [0, 10, 50]),  # adding the window at 75 would span 95 > 80
        (0, 75, 95, [5], None),
        (0, 300, 320, [4], None),
        (1, 0, 20, [2], None),
    ]
    assert [r[3] for r in plan_reads(ranges, None)] == [[0], [1], [2], [3], [4], [5]]
    assert ranges[2] == ("b", 0, 20)
    assert ranges[1:3][0] == ("a", 0, 20)


# -- resume, ranks ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["windows", "packed"])
def test_resume_mid_epoch_yields_exactly_the_rest(tmp_path: Path, mode: str) -> None:
    paths, data = _shards(tmp_path, [1500, 900])

    def make() -> TokenShards:
        return TokenShards(paths, seq_len=16, batch_size=4, dtype="uint16", mode=mode, seed=5)

    with make() as ts:
        want = _expected(data, ts.windows(1), 16, 4, True)
    state = check_state_midway(make, want, take=7, epochs_before=1)
    assert state == {"epoch": 1, "consumed": 28}


def test_a_state_resumes_in_the_middle_of_a_group(tmp_path: Path) -> None:
    # seq_len 1024, batch 2: 128 batches travel together; stop after 3 of them
    paths, data = _shards(tmp_path, [40_000])
    kw: dict[str, Any] = {"seq_len": 1024, "batch_size": 2, "dtype": "uint16", "mode": "packed"}
    with TokenShards(paths, **kw) as ts:
        want = _expected(data, ts.windows(0), 1024, 2, True)
        it = iter(ts)
        head = [next(it) for _ in range(3)]
        state = ts.state_dict()
    assert state == {"epoch": 0, "consumed": 6}
    with TokenShards(paths, **kw) as again:
        again.load_state_dict(state)
        assert_same(head + list(again), want)


@pytest.mark.parametrize("mode", ["windows", "packed"])
def test_ranks_are_disjoint_and_equally_long(tmp_path: Path, mode: str) -> None:
    paths, data = _shards(tmp_path, [1 + 8 * 50, 1 + 8 * 31])  # 81 packed windows
    kw: dict[str, Any] = {"seq_len": 8, "batch_size": 4, "dtype": "uint16", "mode": mode}
    with TokenShards(paths, **kw) as whole:
        everything = whole.windows(0)
    world = 4
    seen: list[np.ndarray[Any, Any]] = []
    lengths = set()
    for rank in range(world):
        with TokenShards(paths, rank=rank, world_size=world, **kw) as ts:
            w = ts.windows(0)
            # rank r owns the epoch's positions r, r + world, ...: disjoint by construction
            assert np.array_equal(w, everything[rank::world][: len(everything) // world])
            lengths.add((len(w), len(ts)))
            assert_same(list(ts), _expected(data, w, 8, 4, True))
            seen.append(w)
    assert lengths == {(20, 5)}
    if mode == "packed":  # packed windows are distinct, so the ranks' windows are too
        together = {tuple(r) for w in seen for r in w.tolist()}
        assert len(together) == 4 * 20


# -- shard files and their errors -----------------------------------------------------


def _npy_bytes(header: str, *, version: int = 1, magic: bytes = b"\x93NUMPY") -> bytes:
    text = header.encode("latin1")
    if version == 1:
        return magic + bytes([1, 0]) + struct.pack("<H", len(text)) + text
    return magic + bytes([version, 0]) + struct.pack("<I", len(text)) + text


@pytest.mark.parametrize("dtype", ["uint16", "uint32", "int32", "int64"])
def test_npy_headers_bring_their_dtype(tmp_path: Path, dtype: str) -> None:
    tokens = (np.arange(300) * 7 % 1000).astype(dtype)
    path = tmp_path / "t.npy"
    np.save(path, tokens)
    with TokenShards(path, seq_len=10, batch_size=2, mode="packed", shuffle=False) as ts:
        (shard,) = ts.shards
        assert (shard.dtype, shard.n_tokens) == (np.dtype(dtype), 300)
        x, y = next(iter(ts))
        assert x.tolist() == [tokens[:10].tolist(), tokens[10:20].tolist()]
        assert y.tolist() == [tokens[1:11].tolist(), tokens[11:21].tolist()]


def test_npy_version_2_header(tmp_path: Path) -> None:
    tokens = np.arange(100, dtype=np.uint16)
    path = tmp_path / "v2.npy"
    with open(path, "wb") as f:
        np.lib.format.write_array(f, tokens, version=(2, 0))
    head = path.read_bytes()[:200]
    dtype, offset, n = parse_npy_header(head, path=str(path))
    assert (dtype, n) == (np.dtype("uint16"), 100)
    assert path.read_bytes()[offset:] == tokens.tobytes()


GOOD = "{'descr': '<u2', 'fortran_order': False, 'shape': (100,), }"


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"NOTNUMPY" + b"\0" * 100, r"not an \.npy file \(bad magic\)"),
        (_npy_bytes(GOOD, version=9), r"unsupported \.npy format version 9\.0"),
        (_npy_bytes(GOOD)[:30], r"truncated \.npy header: it claims \d+ bytes, the file has 20"),
        (_npy_bytes("{'descr': '<u2', 'fortran_order': False"), r"malformed \.npy header"),
        (
            _npy_bytes("{'descr': '<u2', 'shape': (3,)}"),
            r"must be a dict with descr, fortran_order",
        ),
        (_npy_bytes(GOOD.replace("False", "True")), r"fortran_order=True arrays are not supported"),
        (
            _npy_bytes(GOOD.replace("(100,)", "(10, 10)")),
            r"must be 1-D, this one has shape \(10, 10\)",
        ),
        (_npy_bytes(GOOD.replace("(100,)", "(-1,)")), r"malformed \.npy shape \(-1,\)"),
        (_npy_bytes(GOOD.replace("<u2", "<f4")), r"token dtype 'float32' is not supported"),
        (_npy_bytes(GOOD.replace("<u2", ">u2")), r"big-endian token dtype '>u2' is not supported"),
        (_npy_bytes(GOOD.replace("'<u2'", "[('a', '<u2')]")), r"a structured dtype"),
        (_npy_bytes(GOOD) + b"\0" * 199, r"truncated: the header promises 100 tokens \(200 bytes"),
    ],
)
def test_npy_header_errors_name_the_file(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "bad.npy"
    path.write_bytes(content)
    with pytest.raises(TokenFileError, match=match) as info:
        TokenShards(path, seq_len=4, batch_size=2)
    assert info.value.path == str(path)
    assert str(info.value).startswith(f"{path}: ")
    assert isinstance(info.value, iopipe.IopipeError)
    assert isinstance(info.value, ValueError)


def test_raw_file_errors(tmp_path: Path) -> None:
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\0" * 11)
    with pytest.raises(
        ValueError, match=r"dtype is required for raw token files \(like '.*odd\.bin'\)"
    ):
        TokenShards(odd, seq_len=4, batch_size=2)
    with pytest.raises(TokenFileError, match=r"odd\.bin: size 11 is not a multiple of the uint16"):
        TokenShards(odd, seq_len=4, batch_size=2, dtype="uint16")
    with pytest.raises(ValueError, match=r"dtype: token dtype 'float32' is not supported"):
        TokenShards(odd, seq_len=4, batch_size=2, dtype="float32")
    with pytest.raises(TypeError, match=r"dtype must be a numpy dtype or its name, got 'nope'"):
        TokenShards(odd, seq_len=4, batch_size=2, dtype="nope")
    with pytest.raises(TokenFileError, match=r"missing\.bin: cannot open token shard"):
        TokenShards([tmp_path / "missing.bin"], seq_len=4, batch_size=2, dtype="uint16")
    with pytest.raises(FileNotFoundError, match="no files match"):
        TokenShards(tmp_path / "*.nothing", seq_len=4, batch_size=2, dtype="uint16")


def test_shard_set_errors(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.npy", np.arange(50, dtype=np.uint16))
    b = _write(tmp_path / "b.npy", np.arange(50, dtype=np.uint32))
    with pytest.raises(ValueError, match=r"all token shards must share one dtype, got uint16 \("):
        TokenShards([a, b], seq_len=4, batch_size=2)
    with pytest.raises(TokenFileError, match=r"a\.npy: holds uint16 tokens but dtype=uint32"):
        TokenShards([a], seq_len=4, batch_size=2, dtype="uint32")
    with pytest.raises(
        ValueError, match=r"no token shard holds seq_len \+ 1 = 51 tokens \(largest: 50\)"
    ):
        TokenShards([a], seq_len=50, batch_size=2)
    with pytest.raises(
        ValueError, match=r"an epoch of 12 windows cannot be shared by world_size=16"
    ):
        TokenShards([a], seq_len=4, batch_size=2, mode="packed", rank=0, world_size=16)
    with pytest.raises(ValueError, match="paths is empty"):
        TokenShards([], seq_len=4, batch_size=2)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"seq_len": 0}, ValueError, r"seq_len must be an int >= 1, got 0"),
        ({"batch_size": 2.0}, ValueError, r"batch_size must be an int >= 1, got 2\.0"),
        (
            {"mode": "random"},
            ValueError,
            r"mode must be one of \('windows', 'packed'\), got 'random'",
        ),
        ({"seed": -1}, ValueError, r"seed must be an int >= 0, got -1"),
        ({"mode": "packed", "windows_per_epoch": 5}, ValueError, r"applies to mode='windows' only"),
        ({"windows_per_epoch": 0}, ValueError, r"windows_per_epoch must be an int >= 1, got 0"),
        ({"shuffle": False}, ValueError, r"shuffle=False applies to mode='packed' only"),
        ({"prefetch": 0}, ValueError, r"prefetch must be an int >= 1, got 0"),
        ({"merge_gap_bytes": -1}, ValueError, r"merge_gap_bytes must be an int >= 0 or None"),
        ({"rank": 2, "world_size": 2}, ValueError, r"rank must be an int in \[0, 2\), got 2"),
        ({"rank": 0}, ValueError, r"give both rank and world_size or neither"),
        ({"timeout": 0}, ValueError, r"timeout must be a number of seconds > 0 or None, got 0"),
    ],
)
def test_argument_errors(tmp_path: Path, kwargs: dict[str, Any], error: type, match: str) -> None:
    _shards(tmp_path, [100])
    args: dict[str, Any] = {"seq_len": 4, "batch_size": 2, "dtype": "uint16", **kwargs}
    with pytest.raises(error, match=match):
        TokenShards(tmp_path / "*.bin", **args)


def test_a_shard_truncated_after_listing_fails_naming_it(tmp_path: Path) -> None:
    paths, _ = _shards(tmp_path, [1 + 8 * 10])

    def make() -> TokenShards:
        return TokenShards(
            paths,
            seq_len=8,
            batch_size=2,
            dtype="uint16",
            mode="packed",
            shuffle=False,
            merge_gap_bytes=None,
        )

    pipe = make()
    os.truncate(paths[0], 2 * 60)  # windows from token 56 on now run past the end
    try:
        err = check_error_propagation(
            lambda: pipe,
            stage="tokens",
            item=(paths[0], 2 * 56, 18),
            cause=EOFError,
            match=r"expected 18 bytes at offset 112, the file ended after 8",
        )
    finally:
        pipe.close()
    assert paths[0] in str(err)


# -- engine integration ---------------------------------------------------------------


def test_close_midway_and_stats(tmp_path: Path) -> None:
    paths, _ = _shards(tmp_path, [5000])
    kw: dict[str, Any] = {"seq_len": 32, "batch_size": 4, "dtype": "uint16"}
    check_close_midway(lambda: TokenShards(paths, **kw), take=3)
    with TokenShards(paths, **kw) as ts:
        n = sum(1 for _ in ts)
        st = ts.stats()
    tokens = st.stage("tokens")
    assert tokens.items == n == len(ts)
    assert 0 < tokens.bytes <= 2 * 5000 * n  # merged reads may cover a window twice
    assert st.stage("source").items == len(ts.windows(0))
    assert "TokenShards 1 shards, 5000 tokens" in repr(ts)


@pytest.mark.parametrize("drop_last", [True, False])
def test_the_first_batch_is_read_alone_and_batches_stay_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, drop_last: bool
) -> None:
    """Time to first batch: the epoch's first group is one batch; the rest are whole groups."""
    paths, data = _shards(tmp_path, [20_000])
    sizes: list[int] = []
    real = _token_reader.read_group

    def spy(ranges: Any, *args: Any, **kwargs: Any) -> Any:
        sizes.append(len(ranges))
        return real(ranges, *args, **kwargs)

    monkeypatch.setattr(_token_reader, "read_group", spy)
    # seq_len 64, batch 4: groups of 4 MiB / (16 * 64 * 4) = 1024 batches' worth, capped by
    # the epoch: 1,000 windows, so a first batch of 4 and a second group of the rest.
    with TokenShards(
        paths, seq_len=64, batch_size=4, dtype="uint16", drop_last=drop_last, windows_per_epoch=999
    ) as ts:
        want = _expected(data, ts.windows(0), 64, 4, drop_last)
        got = list(ts)
    assert sizes[0] == 4
    assert sum(sizes) == (996 if drop_last else 999)  # drop_last: the short batch is not read
    assert len(got) == len(want)
    for (gx, gy), (wx, wy) in zip(got, want, strict=True):
        assert torch.equal(gx, wx)
        assert torch.equal(gy, wy)


def test_chains_like_a_pipeline(tmp_path: Path) -> None:
    paths, data = _shards(tmp_path, [800])
    with TokenShards(paths, seq_len=8, batch_size=4, dtype="uint16") as ts:
        want = _expected(data, ts.windows(0), 8, 4, True)
        with ts.to_device("cpu").map(lambda b: b[0].sum().item(), executor="inline") as sums:
            assert list(sums) == [int(x.sum()) for x, _ in want]


def test_the_cold_path_reads_what_the_page_cache_lacked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths, data = _shards(tmp_path, [4000])
    real = os.preadv
    advised: list[tuple[int, int]] = []

    def preadv(fd: int, buffers: Any, offset: int, flags: int = 0) -> int:
        if flags:  # RWF_NOWAIT: pretend every other read is cold
            if (offset // 2) % 2:
                raise BlockingIOError
            return real(fd, [memoryview(buffers[0])[:3]], offset)  # a partial hit
        return real(fd, buffers, offset)

    def fadvise(fd: int, offset: int, length: int, advice: int) -> None:
        advised.append((offset, length))

    monkeypatch.setattr(os, "preadv", preadv)
    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    shard = np.array([0] * 6, dtype=np.int64)
    first = np.array([0, 11, 500, 1001, 2000, 3001], dtype=np.int64)
    ranges = WindowRanges(paths, shard, 2 * first, 2 * 17)
    raw = np.zeros((6, 17), np.uint16)
    xy = np.zeros((2, 6, 16), np.int64)
    done, missed, nowait = read_group(ranges, None, raw, xy[0], xy[1], True)
    assert (done, missed, nowait) == (6 * 34, 6, True)
    assert sorted(advised) == sorted(
        (2 * f + (0 if (f % 2) else 3), 34 - (0 if (f % 2) else 3)) for f in first.tolist()
    )
    for row, f in enumerate(first.tolist()):
        assert raw[row].tolist() == data[0][f : f + 17].tolist()
    assert np.array_equal(xy[0], raw[:, :-1])
    assert np.array_equal(xy[1], raw[:, 1:])


def test_without_rwf_nowait_every_read_is_plain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths, data = _shards(tmp_path, [300])
    real = os.preadv

    def preadv(fd: int, buffers: Any, offset: int, flags: int = 0) -> int:
        if flags:
            raise OSError(95, "Operation not supported")
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    ranges = WindowRanges(paths, np.zeros(2, np.int64), np.array([0, 200]), 2 * 9)
    raw = np.zeros((2, 9), np.uint16)
    xy = np.zeros((2, 2, 8), np.int64)
    assert read_group(ranges, None, raw, xy[0], xy[1], True) == (36, 2, False)
    assert raw[1].tolist() == data[0][100:109].tolist()


def test_recycler_reuses_only_arrays_no_tensor_holds() -> None:
    pool = Recycler(keep=2)
    a = pool.take((2, 3, 4))
    x = torch.from_numpy(a[0])[1:]  # a batch the consumer still holds
    del a
    b = pool.take((2, 3, 4))
    assert not np.shares_memory(b, x.numpy())
    del x  # the consumer let go: the first array is free again
    c = pool.take((2, 3, 4))
    assert c is pool._arrays[0]
    assert not np.shares_memory(c, b)
    assert pool.take((9, 3, 4)).shape == (9, 3, 4)  # another shape: fresh, not pooled
    del b, c
    assert len(pool._arrays) == 2
    assert pool.take((2, 3, 4)) is pool._arrays[0]
