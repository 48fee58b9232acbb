"""Shards on ``http(s)://`` and ``s3://``: ranged reads through obstore.

obstore (Python bindings of the Rust ``object_store`` crate, which Apache Arrow,
DataFusion and Polars read object storage with) gives one client for S3 and
plain HTTP: pooled keep-alive connections, ranged GETs awaited on the
pipeline's own event loop (no thread held per request), and retries with
exponential backoff and jitter on 5xx responses, dropped connections and
timeouts, never on 4xx (:data:`RETRY`).  A :class:`Remote` makes one store per
host or bucket for one pipeline.

S3 takes its credentials, region and endpoint from the standard AWS variables
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``AWS_REGION``/``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3``); an
``http://`` endpoint is allowed as given (a local MinIO or moto).  HTTP servers
must answer ``Range`` requests (nginx, any static file server).

A shard's index is fetched from ``URL.index``; without one the shard is streamed
once and its headers parsed (:func:`~.tar.scan_tar`), cached for the process.
"""

from __future__ import annotations

import asyncio
import errno
import io
import os
import re
import threading
import urllib.parse
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from obstore.store import ClientConfig, RetryConfig, S3Config

from .tar import (
    INDEX_SUFFIX,
    MAX_INDEX_BYTES,
    Member,
    ShardError,
    cached,
    check_index,
    parse_index,
    scan_tar,
)

__all__ = ["CLIENT", "RETRY", "Remote"]

#: Retries of a failed request: 5xx, resets and timeouts, with exponential backoff.
RETRY: RetryConfig = {
    "max_retries": 5,
    "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=5)},
    "retry_timeout": timedelta(seconds=120),
}
#: Client settings: a bounded wait for every connect and request.
CLIENT: ClientConfig = {
    "connect_timeout": timedelta(seconds=10),
    "timeout": timedelta(seconds=300),
}
MAX_URL = 4096
#: Ranges of one object closer than this are fetched in one request (obstore's default).
COALESCE = 1 << 20


_first_pid: list[int] = []  # the process that first used obstore


def _obstore() -> Any:
    try:
        import obstore
    except ImportError:
        raise ImportError(
            "http(s):// and s3:// shards need obstore: pip install 'iopipe-ml[remote]'"
        ) from None
    if not _first_pid:
        _first_pid.append(os.getpid())
    elif _first_pid[0] != os.getpid():
        # obstore's runtime (its threads) does not survive os.fork(): every request
        # in the child would wait for ever.
        raise RuntimeError(
            "remote shards cannot be read in a process forked from one that already read "
            "them (obstore's runtime does not survive fork): start workers with 'spawn' or "
            "'forkserver'"
        )
    return obstore


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _make_store(scheme: str, netloc: str, endpoint: str | None) -> Any:
    _obstore()
    from obstore.store import HTTPStore, S3Store

    if scheme in ("http", "https"):
        client: ClientConfig = {**CLIENT, "allow_http": scheme == "http"}
        return HTTPStore.from_url(f"{scheme}://{netloc}", client_options=client, retry_config=RETRY)
    config: S3Config = {}
    if endpoint:
        config["endpoint"] = endpoint
    client = {**CLIENT, "allow_http": bool(endpoint and endpoint.startswith("http://"))}
    return S3Store(netloc, config=config, client_options=client, retry_config=RETRY)


def _error(url: str, exc: BaseException, what: str) -> OSError:
    """An obstore failure as an OSError naming the URL (FileNotFoundError for a 404)."""
    from obstore.exceptions import NotFoundError

    text = " ".join(str(exc).split())[:400]
    if isinstance(exc, NotFoundError | FileNotFoundError):  # obstore raises either
        return FileNotFoundError(errno.ENOENT, f"no such shard object ({what}): {text}", url)
    return OSError(errno.EIO, f"{what} failed: {text}", url)


def _glob(pattern: str) -> re.Pattern[str]:
    """A key glob as a regex: ``*`` and ``?`` stay within one ``/`` part, as on disk."""
    out = []
    for part in re.split(r"(\*|\?|\[[^]]*\])", pattern):
        if part == "*":
            out.append("[^/]*")
        elif part == "?":
            out.append("[^/]")
        elif part.startswith("[") and part.endswith("]") and len(part) > 2:
            out.append("[" + part[1:-1].replace("!", "^", 1) + "]")
        else:
            out.append(re.escape(part))
    return re.compile("".join(out))


def _checked(url: str, data: Any, start: int, length: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
    arr = np.frombuffer(data, dtype=np.uint8)  # zero-copy over obstore's buffer
    if len(arr) != length:
        raise ShardError(
            f"shard {url}: asked for bytes {start}+{length}, got {len(arr)}: truncated?"
        )
    return arr


class _Stream(io.RawIOBase):
    """A file object over an obstore byte stream, for a streaming tar scan."""

    def __init__(self, chunks: Any) -> None:
        self._chunks = iter(chunks)
        self._buf = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            nxt = next(self._chunks, None)
            if nxt is None:
                return 0
            self._buf = memoryview(nxt).cast("B")
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


class Remote:
    """The stores (one per host or bucket) of one pipeline's remote shards.

    Their pooled connections close when the pipeline holding this is dropped.
    """

    def __init__(self) -> None:
        self._stores: dict[tuple[str, str, str | None], Any] = {}
        self._lock = threading.Lock()
        # Ranges asked for this turn of a loop, per (loop, URL) (each loop its own).
        self._pending: dict[tuple[int, str], list[tuple[int, int, Any]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def split(self, url: str) -> tuple[Any, str]:
        """The store for ``url``'s host or bucket, and the object's path in it."""
        if len(url) > MAX_URL:
            raise ValueError(f"a shard URL is at most {MAX_URL} characters: {url[:80]}...")
        scheme, _, rest = url.partition("://")
        if scheme == "s3":  # s3://bucket/key, the key as it is (it may hold ? # %)
            netloc, _, path = rest.partition("/")
            if not netloc or not path:
                raise ValueError(f"{url[:200]!r}: expected s3://bucket/key")
        else:
            u = urllib.parse.urlsplit(url)
            if u.username or u.password:
                raise ValueError(
                    "a shard URL may not hold credentials (user:password@); one for "
                    f"{u.scheme}://{u.hostname}/... was given"
                )
            if not u.netloc or u.query or u.fragment:
                raise ValueError(f"{url[:200]!r}: expected {scheme}://host/path, no query")
            netloc, path = u.netloc, urllib.parse.unquote(u.path.lstrip("/"))
        key = (scheme, netloc, _endpoint() if scheme == "s3" else None)
        with self._lock:
            store = self._stores.get(key)
            if store is None:
                store = self._stores[key] = _make_store(*key)
        return store, path

    def size(self, url: str) -> tuple[int, Any]:
        """``(size, version)`` of the object at ``url`` (its ETag or modification time)."""
        store, path = self.split(url)
        try:
            meta = _obstore().head(store, path)
        except Exception as exc:
            raise _error(url, exc, "HEAD") from exc
        return int(meta["size"]), meta.get("e_tag") or meta.get("last_modified")

    def get_small(self, url: str, limit: int) -> bytes | None:
        """The whole object at ``url`` if it exists (None: it does not), at most ``limit`` bytes."""
        try:
            size, _ = self.size(url)
        except FileNotFoundError:
            return None
        if size > limit:
            raise ShardError(f"{url}: {size} bytes, more than the {limit} an index may have")
        store, path = self.split(url)
        out = bytearray()
        try:  # a whole GET (a server need not answer ranges for it), read up to the limit
            for chunk in _obstore().get(store, path).stream(min_chunk_size=1 << 20):
                out += memoryview(chunk)
                if len(out) > limit:
                    raise ShardError(f"{url}: more than the {limit} bytes an index may have")
        except ShardError:
            raise
        except Exception as exc:
            raise _error(url, exc, "GET") from exc
        return bytes(out)

    def fetch_range(self, url: str, start: int, length: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
        """``length`` bytes of ``url`` from ``start`` (blocking), as a uint8 array over them."""
        if length == 0:
            return np.empty(0, np.uint8)
        store, path = self.split(url)
        try:
            data = _obstore().get_range(store, path, start=start, length=length)
        except Exception as exc:
            raise _error(url, exc, f"GET bytes {start}+{length}") from exc
        return _checked(url, data, start, length)

    async def fetch_range_async(
        self, url: str, start: int, length: int
    ) -> np.ndarray[Any, np.dtype[np.uint8]]:
        """:meth:`fetch_range` awaited on the running loop (no thread held while it waits).

        The ranges of one object asked for in the same turn of the loop (a group's
        samples, gathered by the map) go out as one ``get_ranges`` call: one
        crossing into obstore, which merges ranges less than :data:`COALESCE`
        bytes apart into one request.
        """
        if length == 0:  # a sample whose fields are all empty: nothing to ask for
            return np.empty(0, np.uint8)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        key = (id(loop), url)  # pipelines copied from one another run on their own loops
        batch = self._pending.get(key)
        if batch is None:
            batch = self._pending[key] = []
            loop.call_soon(self._flush, key)
        batch.append((start, length, fut))
        data = await fut
        return _checked(url, data, start, length)

    def _flush(self, key: tuple[int, str]) -> None:
        """Send the ranges of one URL asked for this turn (on the loop that asked)."""
        batch = self._pending.pop(key, [])
        task = asyncio.ensure_future(self._get_ranges(key[1], batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _get_ranges(self, url: str, batch: list[tuple[int, int, Any]]) -> None:
        """Fetch ``batch``'s ranges in one call; on a failure each alone (one bad range fails one)."""
        try:
            store, path = self.split(url)
            try:
                got = await _obstore().get_ranges_async(
                    store,
                    path,
                    starts=[a for a, _, _ in batch],
                    lengths=[n for _, n, _ in batch],
                    coalesce=COALESCE,
                )
            except Exception as exc:
                if len(batch) == 1:  # its own error (obstore has retried what may be retried)
                    raise _error(url, exc, f"GET bytes {batch[0][0]}+{batch[0][1]}") from exc
                await self._each(url, store, path, batch)  # so one bad range fails only itself
                return
            for (_, _, fut), data in zip(batch, got, strict=True):
                if not fut.done():
                    fut.set_result(data)
        except BaseException as exc:
            err = exc if isinstance(exc, Exception) else RuntimeError(f"fetch of {url} stopped")
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(err)
            if not isinstance(exc, Exception):
                raise

    async def _each(self, url: str, store: Any, path: str, batch: list[Any]) -> None:
        for start, length, fut in batch:
            if fut.done():
                continue
            try:
                data = await _obstore().get_range_async(store, path, start=start, length=length)
            except Exception as exc:
                if not fut.done():
                    fut.set_exception(_error(url, exc, f"GET bytes {start}+{length}"))
            else:
                if not fut.done():
                    fut.set_result(data)

    def members(self, url: str) -> list[Member]:
        """The regular members of the tar at ``url``: from ``url.index``, else one streamed scan."""
        size, version = self.size(url)

        def read(at: int, n: int) -> bytes:
            return bytes(self.fetch_range(url, at, n))

        def load() -> list[Member]:
            raw = self.get_small(f"{url}{INDEX_SUFFIX}", MAX_INDEX_BYTES)
            members = None if raw is None else parse_index(raw, f"{url}{INDEX_SUFFIX}", size)
            if members is not None:
                check_index(members, url, read)
                return members
            store, path = self.split(url)
            try:
                chunks = _obstore().get(store, path).stream(min_chunk_size=1 << 20)
                return scan_tar(_Stream(chunks), url, size, stream=True, tail=read)
            except (ShardError, OSError):
                raise
            except Exception as exc:
                raise _error(url, exc, "GET (scanning the tar)") from exc

        return cached((url, size, version), load)

    def list_s3(self, pattern: str) -> list[str]:
        """The ``s3://`` URLs matching a glob (``s3://bucket/prefix/shard-*.tar``), sorted.

        ``*`` and ``?`` match within one ``/`` part, as on disk.
        """
        store, path = self.split(pattern)
        magic = min((path.find(c) for c in "*?[" if c in path), default=len(path))
        prefix = path[:magic].rsplit("/", 1)[0] if "/" in path[:magic] else ""
        bucket = pattern[len("s3://") :].split("/", 1)[0]
        want = _glob(path)
        try:
            found = [
                meta["path"]
                for chunk in _obstore().list(store, prefix=prefix or None)
                for meta in chunk
                if want.fullmatch(meta["path"])
            ]
        except Exception as exc:
            raise _error(pattern, exc, "LIST") from exc
        return sorted(f"s3://{bucket}/{p}" for p in found if not p.endswith(INDEX_SUFFIX))


def remote_files(url: str, pattern: str | None) -> tuple[list[tuple[str, int]], Any]:
    """``(objects with their sizes, a blocking reader)`` for ``iopipe probe`` of a remote URL.

    ``url``: objects named with braces (``http://host/shard-{0..9}.tar``), an ``s3://``
    glob, or an ``s3://bucket/prefix/`` (every object below it, or those matching
    ``pattern`` there).
    """
    from .urls import expand_braces

    remote = Remote()
    if url.startswith("s3://") and (url.endswith("/") or pattern):
        url = url.rstrip("/") + "/" + (pattern or "*")
    names: list[str] = []
    for name in expand_braces(url):
        if any(c in name.split("://", 1)[1] for c in "*?["):
            if not name.startswith("s3://"):
                raise ValueError(
                    f"{name!r}: an HTTP server cannot be listed; name objects with braces"
                )
            names.extend(remote.list_s3(name))
        else:
            names.append(name)
    if not names:
        raise FileNotFoundError(f"no objects match {url!r}")
    files = [(n, remote.size(n)[0]) for n in names]

    def read(name: str, buf: Any, offset: int) -> None:
        buf[:] = remote.fetch_range(name, offset, len(buf))

    return files, read
