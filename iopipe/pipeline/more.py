"""The other ways a :class:`~.builder.Pipeline` starts: shards and mixtures.

A base of ``Pipeline`` (its class methods build the pipeline class they are
called on), kept apart for size.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..shards.pipe import shard_pipeline
from ..stages.source import Source
from .mix import Mix

if TYPE_CHECKING:
    from .builder import Pipeline

__all__ = ["MoreSources"]


class MoreSources:
    """``Pipeline.from_shards`` and ``Pipeline.mix``."""

    @classmethod
    def from_shards(
        cls,
        urls: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
        *,
        shuffle: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        shard: str = "pad",
        chunk_bytes: int = 4 << 20,
        concurrency: int | str = 16,
        **options: Any,
    ) -> Pipeline[dict[str, Any]]:
        """Start a pipeline over the samples of WebDataset tar shards (docs/shards.md).

        ``urls``: paths, globs and brace ranges (``shard-{000000..000099}.tar``).
        Each element is ``{"__key__", "__url__", field: uint8 view of its bytes}``;
        with ``shuffle`` each epoch visits every sample of every shard once, in an
        order drawn from ``(seed, epoch)``.  ``chunk_bytes``, ``concurrency``: as
        :meth:`read` (for remote shards ``concurrency`` is the requests in flight;
        ``"auto"`` tunes it while running); the rest as :meth:`from_files`.
        """
        pipe: Pipeline[dict[str, Any]] = shard_pipeline(
            cls, urls, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size,
            shard=shard, chunk_bytes=chunk_bytes, concurrency=concurrency, options=options,
        )  # fmt: skip
        return pipe

    @classmethod
    def mix(
        cls,
        pipes: Iterable[Pipeline[Any]],
        weights: Any,
        *,
        seed: int = 0,
        stop: str = "all",
        **options: Any,
    ) -> Pipeline[Any]:
        """Elements of ``pipes`` drawn by ``weights`` (or ``weights(epoch)``), resumable.

        Deterministic in ``(seed, epoch)``; ``stop``: ``"all"`` or ``"first"`` exhausted
        (docs/shards.md, "Mixing").
        """
        mixed = Mix(list(pipes), weights, seed=seed, stop=stop)
        build: Any = cls  # a Pipeline subclass: it takes a source and options
        pipe: Pipeline[Any] = build(Source(mixed, rank=0, world_size=1), **options)
        return pipe
