"""TokenShards: batches of ``(x, y)`` token windows from ``.bin``/``.npy`` shards.

The pieces (each in its own module):

* ``_token_files``: shards described from their size and ``.npy`` header, never loaded;
* ``_token_index``: which windows an epoch visits, a pure function of
  ``(seed, epoch, position)`` (``WindowPlan``);
* :class:`TokenSource` (here): the pipeline's source, emitting the windows'
  ``(path, byte offset, byte length)`` ranges as arrays (``WindowRanges``), a
  group of batches at a time;
* ``_token_reader``: :class:`TokenBatcher`, which reads a batch's ranges
  concurrently into its ``(x, y)`` tensors.

``TokenShards`` is a :class:`~iopipe.Pipeline` of those two, so it inherits the
background loop, prefetching, ``stats()``, ``state_dict()`` (``consumed`` counts
windows) and chaining (``.to_device(...)``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from ..io.listing import list_files
from ..pipeline.builder import Pipeline
from ..runtime.channels import Group
from ..stages.base import OutQueue
from ..stages.source import Source, resolve_rank
from .files import TokenFile, describe_shards
from .index import MODES, WindowPlan
from .reader import TokenBatcher, WindowRanges

__all__ = ["TokenShards", "TokenSource"]

#: Windows computed at once by the source (amortises numpy's per-call cost).
_PLAN_CHUNK = 1024
#: Bytes of ``x`` and ``y`` that travel together through the engine, as whole
#: batches (see TokenBatcher): 256 windows at seq_len 1024.
_GROUP_BYTES = 4 << 20


class TokenSource(Source):
    """Emit this rank's windows of an epoch as ``(path, byte offset, byte length)``.

    Windows come from ``plan``, a pure function of ``(seed, epoch, position)``, so
    resuming after ``skip`` windows just starts at position ``skip``.  The first
    group of an epoch is ``first`` windows (one batch), so the first batch is read
    alone instead of with a whole group of batches (time to first batch).
    """

    def __init__(self, plan: WindowPlan, files: list[TokenFile], first: int = 0) -> None:
        super().__init__(range(len(plan)), seed=plan.seed)
        self.plan = plan
        self.first = first
        self.paths = [f.path for f in files]
        self._base = np.array([f.data_offset for f in files], dtype=np.int64)
        self._itemsize = files[0].itemsize  # one dtype for all shards (TokenShards checks)

    def __len__(self) -> int:
        return len(self.plan)

    def config(self) -> dict[str, Any]:
        p = self.plan
        return {"seed": p.seed, "mode": p.mode, "rank": p.rank, "world_size": p.world_size}

    def ranges(self, epoch: int, start: int, stop: int) -> WindowRanges:
        """Byte ranges of this rank's windows ``[start, stop)`` of ``epoch``."""
        shard, first = self.plan.windows(epoch, start, stop)
        offsets = self._base[shard] + first * self._itemsize
        return WindowRanges(self.paths, shard, offsets, self._itemsize * (self.plan.seq_len + 1))

    async def produce(
        self, outq: OutQueue, *, epoch: int, skip: int, group_size: int, cache: Any = None
    ) -> None:
        """Put this epoch's windows from position ``skip`` on ``outq``, ``group_size`` at a time."""
        from ..runtime.channels import END

        n = len(self.plan)
        g = group_size
        chunk = max(g, _PLAN_CHUNK // g * g)
        for lo in range(skip, n, chunk):
            t0 = time.perf_counter()
            ranges = self.ranges(epoch, lo, min(n, lo + chunk))
            self.counters.busy_s += time.perf_counter() - t0
            cuts = list(range(0, len(ranges), g))
            if lo == skip and 0 < self.first < min(g, len(ranges)):
                cuts.insert(1, self.first)  # a multiple of the batch size: batches stay aligned
            for a, b in zip(cuts, [*cuts[1:], len(ranges)], strict=True):
                part = ranges[a:b]
                await self._put(outq, Group(part, part))  # type: ignore[arg-type]
        await outq.put(END)


def _shard_paths(paths: str | os.PathLike[str] | Iterable[Any]) -> list[str]:
    if isinstance(paths, str | os.PathLike):
        return list_files(paths)
    out = [os.fspath(p) for p in paths]
    if not out:
        raise ValueError("paths is empty: give at least one token shard")
    return out


def _check_args(
    seq_len: int,
    batch_size: int,
    seed: int,
    mode: str,
    windows_per_epoch: int | None,
    shuffle: bool,
) -> None:
    """Refuse bad :class:`TokenShards` arguments, before any file is opened."""
    _check_int("seq_len", seq_len, 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("seed", seed, 0)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if windows_per_epoch is not None:
        if mode != "windows":
            raise ValueError("windows_per_epoch applies to mode='windows' only")
        _check_int("windows_per_epoch", windows_per_epoch, 1)
    if not shuffle and mode != "packed":
        raise ValueError("shuffle=False applies to mode='packed' only (windows are random)")


def _one_dtype(files: list[TokenFile]) -> list[TokenFile]:
    """``files``, if they all hold tokens of one dtype."""
    kinds = {f.dtype for f in files}
    if len(kinds) > 1:
        names = ", ".join(sorted(f"{f.dtype.name} ({f.path})" for f in files))
        raise ValueError(f"all token shards must share one dtype, got {names:.300}")
    return files


def _check_int(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


class TokenShards(Pipeline[tuple[torch.Tensor, torch.Tensor]]):
    """Batches of ``(x, y)`` token windows read from token shards, for language models.

    Iterating yields one epoch of ``(x, y)`` pairs of int64 tensors of shape
    ``(batch_size, seq_len)`` (the last may be shorter without ``drop_last``),
    where ``y[:, i] == x[:, i + 1]`` and ``y[:, -1]`` is the token after ``x``'s
    window: each row comes from one window of ``seq_len + 1`` consecutive tokens of
    one shard.  Windows never cross shards.  Only the windows' bytes are read, with
    ``preadv`` on background threads, the page-cache misses of a group of batches
    announced to the kernel together so that they are read concurrently; nothing is
    memory-mapped or loaded whole.  See docs/llm.md.

    Args:
        paths: A glob (``**`` recursive), a directory, one file, or a list of files.
            ``.npy`` files (1-D, little-endian) bring their dtype; other files are
            raw arrays of ``dtype``.
        seq_len: Tokens per row of ``x``.
        batch_size: Rows per batch.
        mode: ``"windows"``: random windows, as nanoGPT samples them: each start
            drawn uniformly among all valid starts of all shards, a pure function
            of ``(seed, epoch, position)``.  ``"packed"``: every shard cut into
            consecutive windows that share one token (stride ``seq_len``), so each
            token is a target once per epoch; visited in a shuffled order drawn
            from ``(seed, epoch)`` (or in file order with ``shuffle=False``).
        dtype: Token dtype of raw files (``"uint16"``, ``"uint32"``, ``"int32"`` or
            ``"int64"``); required when there is a raw file.
        seed: Seeds the windows (or the packed order).
        shuffle: Packed mode only; ``False`` visits windows in file order.
        windows_per_epoch: Windows per epoch over all ranks (windows mode only);
            default: as many as packed mode has, about ``tokens / seq_len``.
        drop_last: Drop the last batch of an epoch when it is short.
        rank, world_size: This process's share; default from ``torch.distributed``
            when it is initialised now, else everything.  Ranks see disjoint window
            positions (``total // world_size`` each; see ``_token_index``).
        prefetch: Batches being read ahead of the consumer, rounded up to whole
            groups, at least 2 (batches travel in groups of about 4 MiB of output,
            256 windows at ``seq_len=1024``); ``handoff`` more groups wait, read.
        merge_gap_bytes: Read ranges of one file this close together in one
            ``preadv``; ``None`` never merges.
        **options: Pipeline options (``timeout``, ``handoff``, ``use_uvloop``, ...: see
            :meth:`Pipeline.from_files`).

    Raises:
        ValueError: a bad argument, or no shard holds ``seq_len + 1`` tokens.
        TokenFileError: a shard is missing or malformed (the message names it).
        FileNotFoundError: the glob or directory matched no file.
    """

    def __init__(
        self,
        paths: str | os.PathLike[str] | Iterable[Any],
        *,
        seq_len: int,
        batch_size: int,
        mode: str = "windows",
        dtype: Any = None,
        seed: int = 0,
        shuffle: bool = True,
        windows_per_epoch: int | None = None,
        drop_last: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        prefetch: int = 16,
        merge_gap_bytes: int | None = 64 << 10,
        **options: Any,
    ) -> None:
        _check_args(seq_len, batch_size, seed, mode, windows_per_epoch, shuffle)
        r, world = resolve_rank(rank, world_size)
        files = _one_dtype(describe_shards(_shard_paths(paths), dtype))
        plan = WindowPlan(
            [f.n_tokens for f in files],
            seq_len=seq_len,
            mode=mode,
            seed=seed,
            total=windows_per_epoch,
            shuffle=bool(shuffle),
            rank=r,
            world_size=world,
        )
        per_group = max(1, _GROUP_BYTES // (16 * seq_len * batch_size))
        reader = TokenBatcher(
            seq_len=seq_len,
            batch_size=batch_size,
            batches_per_group=per_group,
            dtype=files[0].dtype,
            drop_last=drop_last,
            prefetch=prefetch,
            merge_gap_bytes=merge_gap_bytes,
        )
        super().__init__(
            TokenSource(plan, files, first=batch_size if per_group > 1 else 0),
            (reader,),
            **{"group_size": per_group * batch_size, **options},
        )
        self.shards: tuple[TokenFile, ...] = tuple(files)
        self.plan = plan
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.mode = mode

    @property
    def num_tokens(self) -> int:
        """Tokens in all shards together."""
        return sum(f.n_tokens for f in self.shards)

    def windows(self, epoch: int) -> np.ndarray[Any, np.dtype[np.int64]]:
        """Return this rank's windows of ``epoch`` as rows ``(shard index, first token)``.

        The exact windows iteration reads, in order (before ``drop_last``); for
        inspection and tests.  Computing it costs memory proportional to the epoch.
        """
        _check_int("epoch", epoch, 0)
        shard, first = self.plan.windows(epoch, 0, len(self.plan))
        return np.stack([shard, first], axis=1)

    def __enter__(self) -> TokenShards:
        return self

    def __repr__(self) -> str:
        return (
            f"<iopipe.TokenShards {len(self.shards)} shards, {self.num_tokens} tokens, "
            f"mode={self.mode!r}, seq_len={self.seq_len}, batch_size={self.batch_size}>"
        )
