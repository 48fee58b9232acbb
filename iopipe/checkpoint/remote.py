"""Checkpoints on ``http(s)://`` and ``s3://``: headers and tensors by ranged GETs.

The client is the one remote shards use (:class:`iopipe.shards.remote.Remote`,
over obstore): pooled keep-alive connections, retries with backoff on 5xx,
resets and timeouts, never on 4xx, every request bounded in time. S3 takes its
credentials and endpoint from the standard AWS variables.

A checkpoint URL is a ``.safetensors`` object, a ``*.safetensors.index.json``
(its shards named relative to it, each name checked like a local one), or a
folder ending in ``/`` (its ``model.safetensors.index.json`` if there is one, else
its ``model.safetensors``: an HTTP server cannot be listed). Each header costs two
small GETs (its length, then the JSON) after a HEAD; tensors then come in
requests of at most ``chunk_bytes`` contiguous bytes, ``concurrency`` in flight,
each copied once from the response into its tensors.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Generator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Any

import torch

from iopipe.checkpoint.header import (
    MAX_INDEX_BYTES,
    CheckpointError,
    ShardHeader,
    by_shard,
    header_from,
    keep_wanted,
    weight_map_of,
)
from iopipe.checkpoint.io import Request, bytes_of, plan_reads
from iopipe.checkpoint.load import cast
from iopipe.runtime.threads import WorkerPool
from iopipe.shards.remote import Remote

__all__ = ["fetch_into", "is_remote", "new_client", "plan_remote", "remote_pairs"]

_SCHEMES = ("http://", "https://", "s3://")
_INDEX = "model.safetensors.index.json"


def is_remote(path: object) -> bool:
    """Whether ``path`` is an ``http(s)://`` or ``s3://`` URL."""
    return isinstance(path, str) and path.startswith(_SCHEMES)


def new_client() -> Any:
    """A client for one load: its connections are reused by all of the load's requests
    and closed when the last reference to it goes."""
    return Remote()


def _failed(url: str, exc: Exception, what: str) -> CheckpointError:
    return CheckpointError(f"{url}: {what} failed: {exc}", path=url)


def _header(client: Any, url: str) -> ShardHeader:
    try:
        size, _ = client.size(url)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{url}: no such object", path=url) from exc
    except (OSError, ValueError) as exc:
        raise _failed(url, exc, "HEAD") from exc

    def read(at: int, n: int) -> bytes:
        try:
            return bytes(client.fetch_range(url, at, n))
        except (OSError, ValueError) as exc:  # a ShardError is a ValueError
            raise _failed(url, exc, f"reading the header (bytes {at}+{n})") from exc

    return header_from(url, size, read)


def _shard_url(index_url: str, shard: str) -> str:
    base = index_url.rsplit("/", 1)[0]
    name = shard if index_url.startswith("s3://") else urllib.parse.quote(shard)
    return f"{base}/{name}"


def _plan_index(client: Any, url: str, raw: bytes) -> list[ShardHeader]:
    shards = by_shard(weight_map_of(raw, url))
    return [
        keep_wanted(_header(client, _shard_url(url, shard)), names, url, shard)
        for shard, names in shards.items()
    ]


def _get_small(client: Any, url: str) -> bytes | None:
    try:
        raw: bytes | None = client.get_small(url, MAX_INDEX_BYTES)
    except (OSError, ValueError) as exc:
        raise _failed(url, exc, "GET") from exc
    return raw


def plan_remote(client: Any, url: str) -> list[ShardHeader]:
    """The validated headers of the checkpoint at ``url`` (see the module docstring).

    Raises:
        CheckpointError: Missing objects, corrupt headers or index, failed requests.
    """
    if url.endswith(".json"):
        raw = _get_small(client, url)
        if raw is None:
            raise CheckpointError(f"{url}: no such object", path=url)
        return _plan_index(client, url, raw)
    if url.endswith("/"):
        raw = _get_small(client, url + _INDEX)
        if raw is None:
            return [_header(client, url + "model.safetensors")]
        return _plan_index(client, url + _INDEX, raw)
    if url.endswith(".safetensors"):
        return [_header(client, url)]
    raise CheckpointError(
        f"{url}: a remote checkpoint is a .safetensors URL, an index .json URL, or a folder "
        "URL ending in /",
        path=url,
    )


def fetch_into(client: Any, url: str, offset: int, nbytes: int, buffers: list[memoryview]) -> None:
    """Fill ``buffers`` (``nbytes`` in all) with the bytes of ``url`` from ``offset``.

    Raises:
        OSError, ValueError: The request failed or came back short.
    """
    data = client.fetch_range(url, offset, nbytes)
    at = 0
    for buffer in buffers:
        n = len(buffer)
        buffer[:] = data[at : at + n]
        at += n


def remote_pairs(
    headers: list[ShardHeader],
    client: Any,
    *,
    device: torch.device,
    casts: torch.dtype | Mapping[str, torch.dtype | None] | None,
    concurrency: int,
    chunk_bytes: int,
) -> Generator[tuple[str, torch.Tensor], None, None]:
    """Yield ``(name, tensor)`` as each tensor's requests complete (CPU, then ``device``).

    At most ``concurrency`` requests of ``chunk_bytes`` are in flight; a tensor is
    allocated when its first request is sent.
    """
    specs = [s for h in headers for s in h.tensors]
    requests = plan_reads(headers, chunk_bytes, set()).requests
    remaining = [s.nbytes for s in specs]
    tensors: list[torch.Tensor | None] = [None] * len(specs)
    views: list[memoryview | None] = [None] * len(specs)

    def finish(i: int) -> tuple[str, torch.Tensor]:
        tensor, spec = tensors[i], specs[i]
        assert tensor is not None
        tensors[i] = views[i] = None
        dtype = casts.get(spec.name) if isinstance(casts, Mapping) else casts
        tensor = cast(tensor, dtype)
        return spec.name, tensor if device.type == "cpu" else tensor.to(device)

    for i, spec in enumerate(specs):
        if spec.nbytes == 0:
            tensors[i] = torch.empty(spec.shape, dtype=spec.dtype)
            yield finish(i)
    pool = WorkerPool(concurrency, "iopipe-ckpt")
    inflight: dict[Any, Request] = {}
    sent = 0
    try:
        while sent < len(requests) or inflight:
            while sent < len(requests) and len(inflight) < concurrency:
                request = requests[sent]
                sent += 1
                for i, _, _ in request.pieces:
                    if tensors[i] is None:
                        tensor = torch.empty(specs[i].shape, dtype=specs[i].dtype)
                        tensors[i], views[i] = tensor, bytes_of(tensor)
                url = headers[request.file].path
                buffers = [views[i][s : s + n] for i, s, n in request.pieces]  # type: ignore[index]
                job = pool.submit(fetch_into, client, url, request.offset, request.nbytes, buffers)
                inflight[job] = request
            # Every request ends: obstore bounds each by its timeouts and retries.
            done, _ = wait(inflight, return_when=FIRST_COMPLETED)
            for finished in done:
                request = inflight.pop(finished)
                _result(finished, request, headers, specs)
                for i, _, n in request.pieces:
                    remaining[i] -= n
                    if remaining[i] == 0:
                        yield finish(i)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _result(job: Future[None], request: Request, headers: list[ShardHeader], specs: Any) -> None:
    try:
        job.result()
    except (OSError, ValueError) as exc:
        url = headers[request.file].path
        name = specs[request.pieces[0][0]].name
        raise CheckpointError(
            f"{url}: reading {request.nbytes} bytes at offset {request.offset} "
            f"(tensor {name!r}) failed: {exc}",
            path=url,
            tensor=name,
        ) from exc
