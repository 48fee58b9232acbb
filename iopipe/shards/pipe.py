"""``Pipeline.from_shards`` and ``iopipe pack``: shards as a pipeline's source, folders as shards.

:func:`shard_pipeline` is given the pipeline class (the builder passes itself,
so this module does not import it): a :class:`~iopipe.stages.source.Source`
over a :class:`~.index.SampleTable`, a ``read(with_source=True)`` of each
sample's byte range and a ``map`` that splits the range into fields.  Shuffle,
ranks, resume and every pipeline option are the source's and the pipeline's.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from ..io.files import read_small
from ..io.listing import list_files
from ..stages.source import Source
from .index import SampleRange, SampleTable, split_sample
from .tar import is_remote, split_name, write_shards
from .urls import shard_paths

__all__ = ["pack_folder", "shard_pipeline"]

#: The largest file ``pack`` puts in a shard.
MAX_PACK_FILE = 1 << 34


def shard_pipeline(
    cls: Any,
    urls: Any,
    *,
    shuffle: bool,
    seed: int,
    rank: int | None,
    world_size: int | None,
    shard: str,
    chunk_bytes: int,
    concurrency: int | str,
    options: dict[str, Any],
) -> Any:
    """The pipeline of ``cls`` over the samples of the shards ``urls`` names."""
    if isinstance(urls, str | os.PathLike):
        urls = [urls]
    urls = [os.fspath(u) if isinstance(u, os.PathLike) else u for u in urls]  # read twice
    remote = _remote_for(urls)
    paths = shard_paths(urls, remote)
    table = SampleTable(paths, remote)
    src = Source(table, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size, shard=shard)
    # What a config says of this source; "stages": the stages this function adds,
    # which to_config leaves out (from_shards adds them again).
    src.origin = {"shards": urls if len(urls) > 1 else urls[0], "stages": 1 if remote else 2}
    if chunk_bytes != 4 << 20:
        src.origin["chunk_bytes"] = chunk_bytes
    if concurrency != 16:
        src.origin["concurrency"] = concurrency
    if is_remote(paths[0]):
        # Requests awaited on the loop: `concurrency` in flight, no thread held by one.
        return cls(src, **options).map(
            FetchSample(remote), executor="async", concurrency=concurrency, name="fetch"
        )
    pipe = cls(src, **options).read(
        chunk_bytes=chunk_bytes, concurrency=concurrency, with_source=True
    )
    # As wide as the reads: a fused run is as wide as its narrowest map.
    return pipe.map(split_sample, concurrency=concurrency, name="split")


def _remote_for(urls: Any) -> Any:
    """A :class:`~.remote.Remote` when ``urls`` names remote shards (None: local only)."""
    if not any(is_remote(os.fspath(u)) for u in urls if isinstance(u, str | os.PathLike)):
        return None
    from .remote import Remote

    return Remote()


class FetchSample:
    """The map of a remote shard pipeline: a sample's byte range fetched and split.

    Holds the pipeline's :class:`~.remote.Remote` (its connections live as long).
    """

    def __init__(self, remote: Any) -> None:
        self.remote = remote

    async def __call__(self, item: SampleRange) -> dict[str, Any]:
        buf = await self.remote.fetch_range_async(item[0], item[1], item[2])
        return split_sample((item, buf))


def _folder_samples(src: str, pattern: str | None) -> Iterator[dict[str, Any]]:
    """The files under ``src`` as samples: key = relative path up to the first dot."""
    files = list_files(os.path.join(src, pattern) if pattern else src)
    by_key: dict[str, dict[str, str]] = {}
    for path in files:
        rel = os.path.relpath(path, src).replace(os.sep, "/")
        split = split_name(rel)
        if split is None:
            raise ValueError(
                f"{path}: no extension (or a __meta__ name): WebDataset readers skip such "
                "members; rename it or leave it out with --pattern"
            )
        key, field = split
        fields = by_key.setdefault(key, {})
        if field in fields:
            raise ValueError(f"{path} and {fields[field]} are both field {field!r} of {key!r}")
        fields[field] = path
    for key in sorted(by_key):
        sample: dict[str, Any] = {"__key__": key}
        for field, path in by_key[key].items():
            sample[field] = read_small(path, MAX_PACK_FILE)
        yield sample


def pack_folder(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    shard_bytes: int = 256 << 20,
    pattern: str | None = None,
) -> list[str]:
    """Pack the files under ``src`` (or those matching ``pattern`` there) into shards in ``out``.

    Files with the same relative path up to the first dot of their name are one
    sample (``a/0001.jpg`` and ``a/0001.cls``: key ``a/0001``, fields ``jpg``
    and ``cls``); samples go in key order.

    Raises:
        FileNotFoundError: ``src`` holds no matching file.
        ValueError: a file has no extension (WebDataset would skip it).
    """
    return write_shards(_folder_samples(os.fspath(src), pattern), out, shard_bytes=shard_bytes)
