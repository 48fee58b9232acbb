"""Which token windows an epoch visits: pure functions of ``(seed, epoch, position)``.

Nothing here is stored per epoch.  Window ``k`` of an epoch is computed on demand
from a counter-based hash (splitmix64), and the shuffled order of packed mode is a
keyed Feistel permutation evaluated at the positions asked for (cycle-walking
keeps it a bijection of ``[0, n)``).  So an epoch of any size costs no memory and
no start-up time, resuming needs only a position, and any rank can compute its
share without talking to the others.

Ranks: global position ``p`` of an epoch goes to rank ``p % world_size``; every
rank gets ``total // world_size`` positions and the last ``total % world_size``
positions of the epoch's order are skipped (different ones each epoch when the
order is shuffled), so ranks are disjoint and equally long.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["MODES", "WindowPlan", "feistel_permute", "uniform_ints"]

MODES = ("windows", "packed")
_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)
_FEISTEL_ROUNDS = 4
_SALT = {"windows": 0x5A17, "packed": 0xFACC}

I64 = np.ndarray[Any, np.dtype[np.int64]]
U64 = np.ndarray[Any, np.dtype[np.uint64]]


def _mix_int(x: int) -> int:
    """splitmix64's finaliser on a Python int (for keys)."""
    x &= _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _mix(x: U64) -> U64:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _C1
    x = x ^ (x >> np.uint64(27))
    x = x * _C2
    return x ^ (x >> np.uint64(31))


def epoch_key(seed: int, epoch: int, salt: int) -> int:
    """A 64-bit key for one (seed, epoch, purpose)."""
    return _mix_int(_mix_int(_mix_int(seed) + salt) + epoch * _GOLDEN)


def uniform_ints(key: int, positions: I64, high: int) -> I64:
    """Return one integer uniform in ``[0, high)`` per position, a pure function of both.

    Uses 53 bits of ``splitmix64(key + (position + 1) * golden)``; the bias is below
    ``high / 2**53`` (nil for any realistic token count).
    """
    h = _mix(np.uint64(key) + (positions.astype(np.uint64) + np.uint64(1)) * np.uint64(_GOLDEN))
    u = (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    return np.minimum((u * high).astype(np.int64), high - 1)


def feistel_permute(positions: I64, n: int, key: int) -> I64:
    """Map each of ``positions`` (in ``[0, n)``) through a keyed permutation of ``[0, n)``.

    A balanced Feistel network over the smallest even power of two >= ``n``, with a
    splitmix64 round function; values that land outside ``[0, n)`` are walked
    through the network again (cycle-walking), which keeps the map a bijection.
    The domain is < 4n, so a value walks fewer than 4 times on average.
    """
    if n <= 1:
        return positions.astype(np.int64, copy=True)
    bits = max(2, (n - 1).bit_length())
    bits += bits & 1
    half = np.uint64(bits // 2)
    mask = np.uint64((1 << (bits // 2)) - 1)
    keys = [np.uint64(_mix_int(key + (r + 1) * _GOLDEN)) for r in range(_FEISTEL_ROUNDS)]

    def rounds(x: U64) -> U64:
        left, right = x >> half, x & mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        out: U64 = (left << half) | right
        return out

    out = rounds(positions.astype(np.uint64))
    limit = np.uint64(n)
    while True:
        bad = out >= limit
        if not bad.any():
            return out.astype(np.int64)
        out[bad] = rounds(out[bad])


class WindowPlan:
    """The windows of ``seq_len + 1`` tokens that one rank visits in each epoch.

    Args:
        sizes: Tokens in each shard, in shard order.
        seq_len: Tokens of ``x`` (and of ``y``); a window holds ``seq_len + 1``.
        mode: ``"windows"``: each window starts at a position drawn uniformly from
            every valid start of every shard (a shard is thus picked with weight
            equal to its number of valid starts); windows never cross shards.
            ``"packed"``: shard ``i`` is cut into ``(n_i - 1) // seq_len`` windows
            starting at multiples of ``seq_len``; consecutive windows share one token,
            so every token is a target exactly once and an input exactly once per
            epoch, except a shard's first token (never a target), its last (never
            an input) and the ``< seq_len`` tokens after its last whole window.
        seed: Seeds the draws (windows) or the permutation (packed).
        total: Windows per epoch over all ranks; default (and forced in packed
            mode) the number of packed windows.
        shuffle: Packed mode only: visit windows in a permuted order (else in file
            order).
        rank, world_size: This process's share (see the module docstring).

    Raises:
        ValueError: no shard holds ``seq_len + 1`` tokens, or fewer windows than ranks.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        *,
        seq_len: int,
        mode: str,
        seed: int,
        total: int | None,
        shuffle: bool,
        rank: int,
        world_size: int,
    ) -> None:
        n = np.asarray(sizes, dtype=np.int64)
        self.seq_len = seq_len
        self.mode = mode
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.valid = np.maximum(n - seq_len, 0)  # window starts per shard
        self.packed = np.maximum(n - 1, 0) // seq_len  # packed windows per shard
        if int(self.valid.sum()) == 0:
            raise ValueError(
                f"no token shard holds seq_len + 1 = {seq_len + 1} tokens (largest: "
                f"{int(n.max()) if len(n) else 0})"
            )
        counts = self.valid if mode == "windows" else self.packed
        self._ends = np.cumsum(counts)  # inclusive prefix sums, for searchsorted
        self._space = int(self._ends[-1])
        self.total = int(self.packed.sum()) if total is None else total
        if self.total < world_size:
            raise ValueError(
                f"an epoch of {self.total} windows cannot be shared by world_size={world_size}"
            )

    def __len__(self) -> int:
        """Windows this rank visits per epoch."""
        return self.total // self.world_size

    def windows(self, epoch: int, start: int, stop: int) -> tuple[I64, I64]:
        """Return ``(shard index, first token)`` of this rank's windows ``[start, stop)``."""
        k = np.arange(start, stop, dtype=np.int64)
        p = self.rank + self.world_size * k  # global positions
        salt = _SALT[self.mode]
        if self.mode == "windows":
            flat = uniform_ints(epoch_key(self.seed, epoch, salt), p, self._space)
        elif self.shuffle:
            flat = feistel_permute(p, self._space, epoch_key(self.seed, epoch, salt))
        else:
            flat = p
        shard = np.searchsorted(self._ends, flat, side="right").astype(np.int64)
        before = self._ends[shard] - (self.valid if self.mode == "windows" else self.packed)[shard]
        local = flat - before
        first = local if self.mode == "windows" else local * self.seq_len
        return shard, first.astype(np.int64)
