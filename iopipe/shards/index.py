"""The samples of a set of shards, addressable by number: one byte range each.

:class:`SampleTable` is a :class:`~collections.abc.Sequence` over every sample of
every shard, in shard order, held in numpy arrays (a few bytes a member, plus
the member names).  Item ``i`` is a :class:`SampleRange`: the
``(path, offset, length)`` of the sample's bytes in its shard (what the reader
reads; the tar headers between its members come along, 512 bytes or more a
member), carrying its key, its shard and where each field lies in the range.
The pipeline's :class:`~iopipe.stages.source.Source` shuffles, shards across
ranks and resumes over it like any sized source, so a shuffle is a permutation
of all samples of all shards, with no buffer.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any, overload

import numpy as np

from .tar import ShardError, shard_members, split_name

__all__ = ["MAX_HEADER_GAP", "SampleRange", "SampleTable", "split_sample"]

#: Bytes between two fields of one sample, at most: its header blocks (a pax record
#: for a long name included).
MAX_HEADER_GAP = 64 << 10


class SampleRange(tuple[str, int, int]):
    """``(path, offset, length)`` of one sample in its shard, with its key and field layout.

    ``fields``: ``(field, start, size)`` with ``start`` relative to ``offset``.
    """

    key: str
    url: str
    fields: tuple[tuple[str, int, int], ...]

    def __new__(
        cls, path: str, offset: int, length: int, key: str, fields: tuple[tuple[str, int, int], ...]
    ) -> SampleRange:
        self = super().__new__(cls, (path, offset, length))
        self.key, self.url, self.fields = key, path, fields
        return self

    def __repr__(self) -> str:  # what errors name: the shard and the sample
        return f"<sample {self.key!r} of shard {self.url!r}, bytes {self[1]}+{self[2]}>"

    def __reduce__(self) -> Any:  # picklable (process executors)
        return (SampleRange, (self[0], self[1], self[2], self.key, self.fields))


class _Shard:
    """One shard's samples: member arrays and, per sample, its first member and count."""

    __slots__ = ("first", "names", "offsets", "path", "sizes", "width")

    def __init__(self, path: str, remote: Any) -> None:
        members = shard_members(path, remote)
        names: list[str] = []
        offsets: list[int] = []
        sizes: list[int] = []
        first: list[int] = []
        width: list[int] = []
        key: str | None = None
        fields: set[str] = set()
        for m in members:
            split = split_name(m.name)
            if split is None:
                continue
            k, field = split
            if k != key:
                key, fields = k, set()
                first.append(len(names))
                width.append(0)
            if field in fields:
                raise ShardError(f"shard {path}: sample {k!r} has two {field!r} members")
            fields.add(field)
            names.append(m.name)
            offsets.append(m.offset)
            sizes.append(m.size)
            width[-1] += 1
        self.path = path
        self.names = names
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.first = np.asarray(first, dtype=np.int64)
        self.width = np.asarray(width, dtype=np.int64)
        self.check_gaps()

    def __len__(self) -> int:
        return len(self.first)

    def sample(self, j: int) -> SampleRange:
        a = int(self.first[j])
        b = a + int(self.width[j])
        start = int(self.offsets[a])
        fields = []
        key = ""
        for k in range(a, b):
            split = split_name(self.names[k])
            assert split is not None  # only samples' members are kept
            key, field = split
            fields.append((field, int(self.offsets[k]) - start, int(self.sizes[k])))
        end = int(self.offsets[b - 1] + self.sizes[b - 1])
        return SampleRange(self.path, start, end - start, key, tuple(fields))

    def check_gaps(self) -> None:
        """Refuse a sample whose range would span more than its headers (non-sample members).

        A sample is read as one range from its first member's data to its last's end;
        other members between its fields (a ``README`` in the middle) would be read too.
        """
        if not len(self.first):
            return
        last = self.first + self.width - 1
        span = self.offsets[last] + self.sizes[last] - self.offsets[self.first]
        fields = np.add.reduceat(self.sizes, self.first)
        bad = np.flatnonzero(span - fields > self.width * MAX_HEADER_GAP)
        if len(bad):
            j = int(bad[0])
            raise ShardError(
                f"shard {self.path}: sample {self.names[int(self.first[j])]!r} has "
                f"{int(span[j] - fields[j])} bytes of other members between its fields; "
                "iopipe reads a sample as one range"
            )


class SampleTable(Sequence[SampleRange]):
    """Every sample of ``shards`` (paths or URLs, in order), numbered from 0.

    ``remote``: the :class:`~.remote.Remote` that reads URLs (None: local paths only).

    Raises:
        FileNotFoundError: a shard does not exist.
        ShardError: a shard or its index is corrupt or truncated.
    """

    def __init__(self, shards: Sequence[str], remote: Any = None) -> None:
        self.shards = [_Shard(p, remote) for p in shards]
        self._ends: list[int] = []
        n = 0
        for s in self.shards:
            n += len(s)
            self._ends.append(n)

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    @overload
    def __getitem__(self, i: int) -> SampleRange: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[SampleRange]: ...
    def __getitem__(self, i: int | slice) -> SampleRange | Sequence[SampleRange]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample {i} of {n}")
        s = bisect.bisect_right(self._ends, i)
        before = self._ends[s - 1] if s else 0
        return self.shards[s].sample(i - before)


def split_sample(pair: tuple[SampleRange, Any]) -> dict[str, Any]:
    """``(range, buffer)`` -> ``{"__key__", "__url__", field: zero-copy view of its bytes}``."""
    item, buf = pair
    out: dict[str, Any] = {"__key__": item.key, "__url__": item.url}
    for field, start, size in item.fields:
        out[field] = buf[start : start + size]
    return out
