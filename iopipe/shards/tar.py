"""WebDataset tar shards: writing them, and the index of where each member's bytes are.

A shard is a plain tar file; each sample is one or more consecutive members
named ``KEY.FIELD`` (``train/0001.jpg``, ``train/0001.cls``): the key is the
name up to the first dot of its last path component, the field the rest,
lower-cased (WebDataset's ``base_plus_ext``).  Members that are not regular
files, have no extension, or are named ``__...__`` are not samples'
(WebDataset skips them too).

The index lists, for each member in file order, its name, where its data
starts and how long it is, so that a sample is one byte range of the shard.
:func:`write_shards` writes it beside each shard (``shard-000000.tar.index``,
JSON); :func:`shard_members` reads it when it matches the shard's size, and
otherwise scans the tar's headers (they are read, the data is skipped), caching
the result for the process.  Everything read from a shard or an index is
checked against the shard's size: a truncated or corrupt shard raises
:class:`ShardError` naming it (and the member).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import io
import json
import os
import re
import tarfile
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from ..io.files import open_sized, read_small
from ..runtime.errors import IopipeError, show

__all__ = ["INDEX_SUFFIX", "MAX_INDEX_BYTES", "Member", "ShardError", "cached", "is_remote"]
__all__ += ["parse_index", "scan_tar", "shard_members", "split_name", "write_shards"]

#: The index file beside a shard: ``<shard>`` + this.
INDEX_SUFFIX = ".index"
INDEX_VERSION = 1
#: Members of one shard, at most (an index or a tar naming more is refused; a
#: scan holds one ``TarInfo`` a member while it runs).
MAX_MEMBERS = 4_000_000
#: The largest index file read (about 60 bytes a member, so MAX_MEMBERS fit).
MAX_INDEX_BYTES = 256 << 20
_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # WebDataset's base_plus_ext
_META = re.compile(r"__[^/]*__($|/)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: Bytes after a tar's end-of-archive marker, at most (tar pads to 10 KiB records).
MAX_TAIL = 64 << 10
_BLOCK = tarfile.BLOCKSIZE


class ShardError(IopipeError, ValueError):
    """A shard (or its index) is truncated, corrupt or not a tar file; names it and the member."""


@dataclasses.dataclass(frozen=True, slots=True)
class Member:
    """One regular member of a shard: its name, and where its data lies in the file."""

    name: str
    offset: int
    size: int


def split_name(name: str) -> tuple[str, str] | None:
    """``(key, field)`` of a member name as WebDataset splits it; None: not a sample's member."""
    if _META.match(name):
        return None
    m = _NAME.match(name)
    if m is None:
        return None
    return m.group(1), m.group(2).lower()


# -- writing --------------------------------------------------------------------
def _as_bytes(key: str, field: str, value: Any) -> bytes | memoryview:
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value).encode()
    try:
        return memoryview(value).cast("B")
    except TypeError:
        raise TypeError(
            f"sample {key!r}: field {field!r} must be bytes-like, str or int, "
            f"got {type(value).__name__}"
        ) from None


def _sample_members(sample: Mapping[str, Any]) -> tuple[str, list[tuple[str, Any]]]:
    """Check one sample; return its key and its ``(member name, bytes)`` in field order."""
    if not isinstance(sample, Mapping):
        raise TypeError(f"a sample must be a dict, got {type(sample).__name__}")
    key = sample.get("__key__")
    if not isinstance(key, str) or not key:
        raise ValueError(f"a sample needs a non-empty str '__key__', got {show(key)}")
    base = key.rsplit("/", 1)[-1]
    parts = key.split("/")
    if "." in base or not base or key.startswith("/") or ".." in parts:
        raise ValueError(
            f"sample key {key!r}: its last part must be non-empty with no '.', and the key "
            "relative with no '..' (a reader splits member names at the first dot)"
        )
    if any(_META.match(p + "/") for p in parts) or _CONTROL.search(key):
        raise ValueError(
            f"sample key {key!r}: no '__...__' part and no control character (readers skip them)"
        )
    out = []
    for field, value in sample.items():
        if not isinstance(field, str):
            raise ValueError(f"sample {key!r}: field names are str, got {field!r:.80}")
        if field.startswith("__"):
            continue  # __key__, __url__ and other metadata are not members
        if not field or "/" in field or field != field.lower() or _CONTROL.search(field):
            raise ValueError(
                f"sample {key!r}: field names are lower-case, non-empty, no '/': {field!r}"
            )
        out.append((f"{key}.{field}", _as_bytes(key, field, value)))
    if not out:
        raise ValueError(f"sample {key!r} has no fields")
    return key, out


class _Shard:
    """One shard being written: a ``.tmp`` file renamed into place when complete."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.tmp = f"{path}.tmp"
        self.file = open(self.tmp, "wb")  # noqa: SIM115 (closed in finish/abort)
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        self.members: list[Member] = []
        self.samples = 0

    def add(self, name: str, data: bytes | memoryview) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        info.uname = info.gname = ""
        self.tar.addfile(info, io.BytesIO(data))
        # Python's tarfile writes the header, then the data: its offset is what was
        # written before it, less the data and its padding.
        end = self.file.tell()
        size = len(data)
        self.members.append(Member(name, end - size - (-size % _BLOCK), size))

    def finish(self, index: bool) -> str:
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        size = os.path.getsize(self.tmp)
        with contextlib.suppress(FileNotFoundError):  # an index of another tar: never beside it
            os.unlink(f"{self.path}{INDEX_SUFFIX}")
        os.replace(self.tmp, self.path)  # the tar first: a crash leaves it without an index
        if index:
            _write_index(self.path, size, self.members)
        return self.path

    def abort(self) -> None:
        self.file.close()
        for p in (self.tmp, f"{self.path}{INDEX_SUFFIX}.tmp"):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


def write_shards(
    samples: Iterable[Mapping[str, Any]],
    out: str | os.PathLike[str],
    *,
    shard_bytes: int = 256 << 20,
    pattern: str = "shard-%06d.tar",
    index: bool = True,
) -> list[str]:
    """Write ``samples`` (dicts: ``{"__key__": "0001", "jpg": b"...", "cls": 3}``) as tar shards.

    Each field becomes a member ``KEY.FIELD`` (bytes-like values as they are, ``str``
    as UTF-8, ``int`` in decimal, as WebDataset's writer does); keys starting with
    ``__`` are left out.  A new shard starts when the next sample would take the
    current one past ``shard_bytes`` (a larger sample gets a shard of its own).
    Each shard is written to ``NAME.tmp``, synced and renamed, so a shard under its
    final name is complete; with ``index`` its member index is written beside it.

    Returns:
        The shards' paths, in order.

    Raises:
        ValueError: a sample without a usable ``__key__``, or with bad field names.
        TypeError: a field value that is not bytes-like, str or int.
    """
    if not isinstance(shard_bytes, int) or isinstance(shard_bytes, bool) or shard_bytes < 1:
        raise ValueError(f"shard_bytes must be an int >= 1, got {shard_bytes!r}")
    if "%" not in pattern or "/" in pattern:
        raise ValueError(f"pattern must be a file name with a %d field, got {pattern!r}")
    folder = os.fspath(out)
    os.makedirs(folder, exist_ok=True)
    _refuse_existing(folder, pattern)
    return _write_all(samples, folder, pattern, shard_bytes, index)


def _refuse_existing(folder: str, pattern: str) -> None:
    """Refuse a folder holding shards of ``pattern``: a new set would mix with them."""
    old = sorted(glob.glob(os.path.join(glob.escape(folder), re.sub(r"%0?\d*d", "*", pattern))))
    if old:
        raise FileExistsError(
            f"{folder} already holds shards ({os.path.basename(old[0])}, ...): a new set "
            "beside them would mix with them; write to an empty folder"
        )


def _write_all(
    samples: Iterable[Mapping[str, Any]], folder: str, pattern: str, shard_bytes: int, index: bool
) -> list[str]:
    written: list[str] = []
    last_key: str | None = None
    shard: _Shard | None = None
    size = 0
    try:
        for sample in samples:
            key, members = _sample_members(sample)
            if key == last_key:
                raise ValueError(
                    f"two consecutive samples have the key {key!r}: a reader merges them"
                )
            last_key = key
            need = sum(_BLOCK + len(b) + (-len(b) % _BLOCK) for _, b in members)
            if shard is not None and shard.samples and size + need > shard_bytes:
                written.append(shard.finish(index))
                shard = None
            if shard is None:
                shard = _Shard(os.path.join(folder, pattern % len(written)))
                size = 0
            for name, data in members:
                shard.add(name, data)
            shard.samples += 1
            size += need
        if shard is not None:
            written.append(shard.finish(index))
            shard = None
    finally:
        if shard is not None:
            shard.abort()
    return written


def _write_index(path: str, tar_size: int, members: list[Member]) -> None:
    doc = {
        "version": INDEX_VERSION,
        "tar_bytes": tar_size,
        "names": [m.name for m in members],
        "offsets": [m.offset for m in members],
        "sizes": [m.size for m in members],
    }
    tmp = f"{path}{INDEX_SUFFIX}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, f"{path}{INDEX_SUFFIX}")


# -- reading --------------------------------------------------------------------
_cache: dict[tuple[str, int, Any], list[Member]] = {}
_cache_lock = threading.Lock()


def cached(ident: tuple[str, int, Any], load: Any) -> list[Member]:
    """The members cached for ``ident`` (path or URL, size, version), else ``load()``'s."""
    with _cache_lock:
        hit = _cache.get(ident)
    if hit is not None:
        return hit
    members: list[Member] = load()
    with _cache_lock:
        if len(_cache) > 4096:
            _cache.clear()
        _cache[ident] = members
    return members


def shard_members(path: str, remote: Any = None) -> list[Member]:
    """The regular members of the tar at ``path``, in file order (index, cache or scan).

    ``http(s)://`` and ``s3://`` URLs are read through ``remote``, a
    :class:`~.remote.Remote`.

    Raises:
        FileNotFoundError: no such shard.
        ShardError: the shard is not a tar, is truncated, or its index does not
            describe it.
    """
    if is_remote(path):
        members: list[Member] = remote.members(path)
        return members
    fd, size = open_sized(path)
    try:
        mtime = os.fstat(fd).st_mtime_ns
    finally:
        os.close(fd)

    def load() -> list[Member]:
        raw = _local_index(path)
        members = None if raw is None else parse_index(raw, f"{path}{INDEX_SUFFIX}", size)
        if members is None:
            with open(path, "rb") as f:

                def tail(at: int, n: int) -> bytes:
                    return os.pread(f.fileno(), n, at)

                members = scan_tar(f, path, size, stream=False, tail=tail)
        else:
            with open(path, "rb") as f:
                check_index(members, path, lambda at, n: os.pread(f.fileno(), n, at))
        return members

    return cached((os.path.abspath(path), size, mtime), load)


def is_remote(url: str) -> bool:
    return url.startswith(("http://", "https://", "s3://"))


def _local_index(path: str) -> bytes | None:
    ipath = f"{path}{INDEX_SUFFIX}"
    try:
        return read_small(ipath, MAX_INDEX_BYTES)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ShardError(f"shard index {ipath}: cannot read it: {exc}") from None


def parse_index(raw: bytes, ipath: str, size: int) -> list[Member] | None:
    """The members an index lists for a tar of ``size`` bytes (None: it is for another size)."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ShardError(f"shard index {ipath}: not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("version") != INDEX_VERSION:
        raise ShardError(
            f"shard index {ipath}: not an iopipe shard index (version {INDEX_VERSION})"
        )
    if doc.get("tar_bytes") != size:
        return None  # the shard changed since: scan it
    names, offsets, sizes = doc.get("names"), doc.get("offsets"), doc.get("sizes")
    if not (isinstance(names, list) and isinstance(offsets, list) and isinstance(sizes, list)):
        raise ShardError(f"shard index {ipath}: names, offsets and sizes must be lists")
    if not len(names) == len(offsets) == len(sizes) or len(names) > MAX_MEMBERS:
        raise ShardError(f"shard index {ipath}: names, offsets and sizes differ in length")
    members = []
    end = 0
    for name, off, n in zip(names, offsets, sizes, strict=True):
        ok = isinstance(name, str) and 0 < len(name) <= 4096
        ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in (off, n))
        if not ok or off < end or n < 0 or off + n > size:
            raise ShardError(
                f"shard index {ipath}: member {show(name)} at {show(off)} of {show(n)} bytes "
                f"does not fit the {size}-byte shard in order"
            )
        end = off + n
        members.append(Member(name, off, n))
    return members


def scan_tar(fileobj: Any, name: str, size: int, *, stream: bool, tail: Any) -> list[Member]:
    """Read a tar's headers from ``fileobj`` (seeking over the data, or reading it if ``stream``).

    Every member must fit the ``size`` bytes of the shard, and what follows the
    end of the archive must be zeros (``tail(offset, n)`` reads it): Python's
    tarfile ends quietly at a corrupt header, or between two concatenated tars.
    """
    members: list[Member] = []
    last = "(the first header)"
    end = 0
    try:
        # Uncompressed only: a compressed tar's members have no byte range in the file.
        if stream:
            tar = tarfile.open(fileobj=fileobj, mode="r|")  # noqa: SIM115 (closed below)
        else:
            tar = tarfile.open(fileobj=fileobj, mode="r:")  # noqa: SIM115 (closed below)
        with tar:
            count = 0
            for info in tar:
                last = info.name
                count += 1
                if count > MAX_MEMBERS:  # directories and links count too
                    raise ShardError(f"shard {name}: more than {MAX_MEMBERS} members")
                getattr(tar, "members", []).clear()  # tarfile keeps every TarInfo otherwise
                if info.issparse():
                    raise ShardError(f"shard {name}: member {show(info.name)} is sparse")
                if not info.isreg():
                    continue
                if info.offset_data + info.size > size:
                    raise ShardError(
                        f"shard {name}: member {show(info.name)} needs {info.size} bytes "
                        f"at {info.offset_data}, past the shard's end ({size} bytes): truncated"
                    )
                members.append(Member(info.name, info.offset_data, info.size))
                if len(members) > MAX_MEMBERS:
                    raise ShardError(f"shard {name}: more than {MAX_MEMBERS} members")
            end = tar.offset  # where the end-of-archive marker (or a bad header) starts
    except tarfile.TarError as exc:
        hint = ""
        if tail(0, 2) == b"\x1f\x8b":
            hint = " (it is gzip-compressed: iopipe reads uncompressed tars only)"
        raise ShardError(
            f"shard {name}: not a readable tar after member {show(last)}: {exc}{hint}"
        ) from None
    rest = size - end
    if rest > MAX_TAIL or (rest and tail(end, rest).strip(b"\0")):
        raise ShardError(
            f"shard {name}: {rest} bytes after member {show(last)} are not the end of a tar "
            f"(at byte {end}): a corrupt header, or tars concatenated"
        )
    return members


def check_index(members: list[Member], name: str, read: Any) -> None:
    """Check an index against its tar: the headers of a few members say the same size.

    ``read(offset, n)`` reads the shard.  The header block before a member's data
    holds its size; the first, middle and last members are checked.
    """
    for m in {0, len(members) // 2, len(members) - 1} if members else ():
        mem = members[m]
        block = read(mem.offset - _BLOCK, _BLOCK) if mem.offset >= _BLOCK else b""
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError:
            info = None
        if info is None or info.size != mem.size:
            raise ShardError(
                f"shard {name}: its index does not describe it (member {show(mem.name)}): "
                f"a shard rewritten after its index; delete {name}{INDEX_SUFFIX} to scan it"
            )
