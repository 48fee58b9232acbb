"""Load a checkpoint: the fastest path picked per shard, subsets, renames and ranks.

Each shard goes the way that suits where its bytes are and where they go:

* **mapped** (CPU destination, ``copy=False``, shard mostly in the page cache): the
  tensors are copy-on-write views of a private mapping of the file
  (:mod:`iopipe.checkpoint.mapped`); nothing is copied, as with safetensors.
* **read** (everything else): concurrent ``preadv`` into owned tensors, ``O_DIRECT``
  for large shards mostly not cached, and for CUDA a ring of pinned staging buffers
  (:mod:`iopipe.checkpoint.load`).
* **distributed** (``distributed=True``): each rank reads a disjoint share of the
  bytes and the ranks exchange them (:mod:`iopipe.checkpoint.dist`).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Generator, Mapping
from typing import Any, NamedTuple

import torch

from iopipe.checkpoint.dist import load_shared
from iopipe.checkpoint.header import ShardHeader, plan_checkpoint
from iopipe.checkpoint.load import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_CONCURRENCY,
    DEFAULT_MAX_INFLIGHT_BYTES,
    _Loader,
    _named,
    _validate,
    cast,
)
from iopipe.checkpoint.mapped import is_cached, map_shards
from iopipe.checkpoint.remote import is_remote, new_client, plan_remote, remote_pairs
from iopipe.checkpoint.select import Names, Rename, renamed, select

__all__ = ["Planned", "iter_checkpoint", "load_checkpoint", "planned", "stream"]

#: The dtype to cast each tensor to, by name (None: keep it), or one for all.
Casts = torch.dtype | None | Mapping[str, torch.dtype | None]


class Planned(NamedTuple):
    """A checkpoint's headers, and the client that reads them (None: local files)."""

    headers: list[ShardHeader]
    client: Any


def planned(path: str | os.PathLike[str], names: Names | None, rename: Rename | None) -> Planned:
    """The validated headers of ``path``, cut to ``names`` and renamed by ``rename``."""
    client = None
    if isinstance(path, str) and is_remote(path):
        client = new_client()
        headers = plan_remote(client, path)
    else:
        headers = plan_checkpoint(path)
    return Planned(renamed(select(headers, names), rename), client)


def stream(
    headers: list[ShardHeader],
    client: Any,
    *,
    device: torch.device,
    casts: Casts,
    copy: bool,
    budget: int | None,
    max_inflight_bytes: int,
    concurrency: int,
    chunk_bytes: int,
) -> Generator[tuple[str, torch.Tensor], None, None]:
    """Yield ``(name, tensor)`` for every tensor of ``headers``, each shard by its path.

    Mapped shards come first (they cost no reads), then the read ones in completion
    order. ``budget`` bounds the read tensors not yet yielded (see ``_Loader``).
    """

    if client is not None:
        yield from remote_pairs(
            headers,
            client,
            device=device,
            casts=casts,
            concurrency=concurrency,
            chunk_bytes=chunk_bytes,
        )
        return

    def dtype_of(name: str) -> torch.dtype | None:
        return casts.get(name) if isinstance(casts, Mapping) else casts

    can_map = device.type == "cpu" and not copy
    mapped = [h for h in headers if can_map and is_cached(h)]
    taken = {id(h) for h in mapped}
    rest = [h for h in headers if id(h) not in taken]
    for header, tensors in zip(mapped, map_shards(mapped, concurrency), strict=True):
        for spec, tensor in zip(header.tensors, tensors, strict=True):
            yield spec.name, cast(tensor, dtype_of(spec.name))
    if not rest:
        return
    loader = _Loader(
        rest,
        device=device,
        dtype=[dtype_of(spec.name) for h in rest for spec in h.tensors],
        budget=budget,
        max_inflight_bytes=max_inflight_bytes,
        concurrency=concurrency,
        chunk_bytes=chunk_bytes,
    )
    with contextlib.closing(_named(loader)) as pairs:
        yield from pairs


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    names: Names | None = None,
    rename: Rename | None = None,
    copy: bool = False,
    distributed: bool = False,
    group: Any = None,
    max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
    concurrency: int | None = DEFAULT_CONCURRENCY,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> dict[str, torch.Tensor]:
    """Load a safetensors checkpoint, picking the fastest safe path for each shard.

    Headers are validated first. To CPU with ``copy=False``, a shard mostly in the
    page cache is *mapped* (copy-on-write views: nothing copied, the file never
    written; a file rewritten in place under live tensors shows through, so pass
    ``copy=True`` if files may change); other shards are read by concurrent
    ``preadv`` into owned tensors (``O_DIRECT`` when uncached), through pinned
    staging for CUDA, or by ranged GETs for URLs. See docs/llm.md.

    Args:
        path: A ``.safetensors`` file, a ``*.safetensors.index.json``, a folder (its
            index, else its ``*.safetensors``), or such an ``http(s)://``/``s3://`` URL.
        device: Where the tensors go (other than CPU/CUDA: read to CPU, then moved).
        dtype: Cast floating-point tensors (float8 included) to it; others keep theirs.
        names: Only these tensors, and only their bytes are read: exact names (each
            must exist), a glob (``"model.layers.1.*"``) or a predicate.
        rename: A function of the name or a prefix map (``{"model.": ""}``, longest
            prefix wins); collisions are refused before anything is read.
        copy: Always owned memory, never mapped.
        distributed: Under ``torch.distributed``, each rank reads ~1/world_size of the
            bytes and the ranks exchange them; every rank gets everything, its tensors
            views of one buffer. All ranks must pass the same arguments.
        group: The process group for ``distributed`` (default: the world).
        max_inflight_bytes: Bound on the pinned staging ring (CUDA).
        concurrency, chunk_bytes: Reads in flight (default: one per core, 4 to 16) and
            the largest read (adjacent small tensors share one).

    Returns:
        Tensor name -> tensor, in file order.

    Raises:
        CheckpointError: Missing, corrupt, a failed read, or ``names``/``rename`` do
            not fit; names the file and, where it applies, the tensor.
        ValueError, TypeError: An argument is invalid.
    """
    dev, threads = _validate(device, dtype, max_inflight_bytes, concurrency, chunk_bytes)
    plan = functools.partial(planned, path, names, rename)
    sizes = {"concurrency": threads, "chunk_bytes": chunk_bytes}
    if distributed:
        return load_shared(plan, device=dev, dtype=dtype, group=group, **sizes)
    headers, client = plan()  # keys in file order, whatever order reads complete in:
    out: dict[str, Any] = dict.fromkeys(spec.name for h in headers for spec in h.tensors)
    pairs = stream(headers, client, device=dev, casts=dtype, copy=copy, budget=None,
                   max_inflight_bytes=max_inflight_bytes, **sizes)  # fmt: skip
    with contextlib.closing(pairs):
        return out | dict(pairs)


def iter_checkpoint(
    path: str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    names: Names | None = None,
    rename: Rename | None = None,
    copy: bool = False,
    max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
    concurrency: int | None = DEFAULT_CONCURRENCY,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Generator[tuple[str, torch.Tensor], None, None]:
    """Yield ``(name, tensor)`` pairs as tensors finish loading, with bounded memory.

    Same arguments, paths and guarantees as :func:`load_checkpoint`. Headers and
    arguments are validated by this call, before it returns the iterator. Mapped
    shards' tensors come first (they cost no memory of their own), then the read
    ones in completion order (roughly file order). Read tensors allocated but not
    yet yielded never exceed ``max_inflight_bytes`` (one larger tensor is admitted
    alone), so memory beyond what the caller keeps stays bounded. Reads continue in
    the background while the caller works on a yielded tensor.

    The pool threads and open files live until the iterator is exhausted, fails, or is
    closed; ``close()`` waits for the reads in flight, then closes every file. To stop
    early without waiting for garbage collection, close it (``with
    contextlib.closing(iter_checkpoint(path)) as pairs: ...``).
    """
    dev, threads = _validate(device, dtype, max_inflight_bytes, concurrency, chunk_bytes)
    return stream(
        *planned(path, names, rename),
        device=dev,
        casts=dtype,
        copy=copy,
        budget=max_inflight_bytes,
        max_inflight_bytes=max_inflight_bytes,
        concurrency=threads,
        chunk_bytes=chunk_bytes,
    )
