"""Safetensors headers: find a checkpoint's shards, parse and validate every header.

A safetensors file is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end)}, "__metadata__": {...}}``),
then the data section; offsets are relative to the data section's start. A sharded
Hugging Face checkpoint adds ``model.safetensors.index.json`` whose ``weight_map`` maps
each tensor name to the shard file holding it.

Everything here runs before a single tensor byte is read, so a corrupt checkpoint fails
fast with a :class:`CheckpointError` naming the file and the tensor, and the loader can
trust every offset it is handed (no read goes past the data section, no two tensors
share bytes).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from iopipe.io.files import contained, open_regular, read_small
from iopipe.runtime.errors import IopipeError, show

__all__ = ["DTYPES", "CheckpointError", "ShardHeader", "TensorSpec", "plan_checkpoint"]

#: Largest JSON header accepted; safetensors itself refuses headers over 100 MB.
MAX_HEADER_BYTES = 100_000_000

_INDEX_SUFFIX = ".safetensors.index.json"
#: An index maps names to files: 64 MiB holds about a million entries.
MAX_INDEX_BYTES = 64 << 20
#: torch's tensors have at most 64 dimensions, each below 2**63; so is the product of
#: the sizes (zeros counted as 1) times the item size, or torch's stride and storage
#: arithmetic overflows even for a tensor of no elements.
_MAX_DIMS = 64
_MAX_DIM = 1 << 63


def _dtype_table() -> dict[str, torch.dtype]:
    """Return the safetensors dtype names that this torch build can hold."""
    table = {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
        "C64": torch.complex64,
    }
    # Newer dtypes exist only in newer torch builds; these are the ones
    # safetensors.torch can also load, so bit-exactness can be checked against it.
    optional = {
        "F8_E4M3": "float8_e4m3fn",
        "F8_E4M3FNUZ": "float8_e4m3fnuz",
        "F8_E5M2": "float8_e5m2",
        "F8_E5M2FNUZ": "float8_e5m2fnuz",
        "U16": "uint16",
        "U32": "uint32",
        "U64": "uint64",
    }
    for name, attr in optional.items():
        dtype = getattr(torch, attr, None)
        if isinstance(dtype, torch.dtype):
            table[name] = dtype
    return table


#: Safetensors dtype name -> torch dtype, for every dtype iopipe can load.
DTYPES: dict[str, torch.dtype] = _dtype_table()


class CheckpointError(IopipeError):
    """A checkpoint is missing, corrupt, or does not fit the module it is loaded into.

    Attributes:
        path: The file at fault (a shard or an index), or ``None``.
        tensor: The tensor at fault, or ``None`` when the error is not about one tensor.
    """

    def __init__(self, message: str, *, path: str | None = None, tensor: str | None = None):
        super().__init__(message)
        self.path = path
        self.tensor = tensor

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_error, (str(self), self.path, self.tensor))


def _rebuild_error(message: str, path: str | None, tensor: str | None) -> CheckpointError:
    return CheckpointError(message, path=path, tensor=tensor)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One tensor as a header describes it, with its absolute position in its file."""

    name: str
    path: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class ShardHeader:
    """A parsed, validated safetensors header.

    Attributes:
        path: The file.
        file_bytes: Its size when the header was read.
        data_start: Absolute offset of the data section (``8 + header length``).
        tensors: Its tensors, sorted by offset.
        metadata: The ``__metadata__`` entry, or ``None``.
    """

    path: str
    file_bytes: int
    data_start: int
    tensors: tuple[TensorSpec, ...]
    metadata: dict[str, str] | None


def read_header(path: str) -> ShardHeader:
    """Read and validate the header of one safetensors file.

    Raises:
        CheckpointError: The file is missing, truncated, or its header is invalid.
    """
    try:
        fd = open_regular(path)
    except OSError as exc:
        raise CheckpointError(f"cannot open {path}: {exc.strerror}", path=path) from exc
    try:
        return header_from(path, os.fstat(fd).st_size, lambda at, n: _pread_exact(fd, n, at))
    finally:
        os.close(fd)


def header_from(path: str, file_bytes: int, read: Callable[[int, int], bytes]) -> ShardHeader:
    """Validate the header of the ``file_bytes``-byte shard at ``path``, read by ``read``.

    ``read(offset, n)`` returns the ``n`` bytes at ``offset`` (a local file, an object).

    Raises:
        CheckpointError: Truncated, or the header is invalid.
    """
    if file_bytes < 8:
        raise CheckpointError(
            f"{path}: truncated file: {file_bytes} bytes, too short for the 8-byte header length",
            path=path,
        )
    header_bytes = int.from_bytes(read(0, 8), "little")
    if header_bytes > file_bytes - 8:
        raise CheckpointError(
            f"{path}: header length {header_bytes} runs past the end of the file "
            f"({file_bytes} bytes); truncated or not a safetensors file",
            path=path,
        )
    if header_bytes > MAX_HEADER_BYTES:
        raise CheckpointError(
            f"{path}: header length {header_bytes} exceeds the {MAX_HEADER_BYTES}-byte limit",
            path=path,
        )
    raw = read(8, header_bytes)
    data_start = 8 + header_bytes
    tensors, metadata = _parse_header(path, raw, data_start, file_bytes - data_start)
    return ShardHeader(path, file_bytes, data_start, tensors, metadata)


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    parts = []
    while size:
        part = os.pread(fd, size, offset)
        if not part:
            break  # the caller checked the size; a shrinking file shows up as bad JSON
        parts.append(part)
        size -= len(part)
        offset += len(part)
    return b"".join(parts)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {show(key)}")
        out[key] = value
    return out


def _parse_header(
    path: str, raw: bytes, data_start: int, data_bytes: int
) -> tuple[tuple[TensorSpec, ...], dict[str, str] | None]:
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise CheckpointError(f"{path}: header JSON is nested too deeply", path=path) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid JSON header: {exc}", path=path) from exc
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path}: header is not a JSON object (got {type(header).__name__})", path=path
        )
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise CheckpointError(f"{path}: __metadata__ must be an object of strings", path=path)
    specs = [
        _tensor_spec(path, name, entry, data_start, data_bytes) for name, entry in header.items()
    ]
    specs.sort(key=lambda s: (s.offset, s.nbytes))
    _check_overlaps(path, specs)
    return tuple(specs), metadata


def _tensor_spec(path: str, name: str, entry: Any, data_start: int, data_bytes: int) -> TensorSpec:
    def fail(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor {show(name)}: {what}", path=path, tensor=name)

    if not isinstance(entry, dict):
        raise fail("entry is not a JSON object")
    dtype_name = entry.get("dtype")
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        known = ", ".join(sorted(DTYPES))
        raise fail(f"unknown dtype {show(dtype_name)} (known: {known})")
    shape = entry.get("shape")
    if not (
        isinstance(shape, list)
        and len(shape) <= _MAX_DIMS
        and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < _MAX_DIM for d in shape)
    ):
        raise fail(
            f"shape must be a list of non-negative integers (below 2**63, at most "
            f"{_MAX_DIMS} of them), got {show(shape)}"
        )
    offsets = entry.get("data_offsets")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise fail(f"data_offsets must be [begin, end] integers, got {show(offsets)}")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise fail(f"data_offsets [{begin}, {end}) are not an increasing range")
    if end > data_bytes:
        raise fail(
            f"data_offsets [{begin}, {end}) run past the end of the data section "
            f"({data_bytes} bytes); file truncated?"
        )
    dtype = DTYPES[dtype_name]
    if math.prod(max(d, 1) for d in shape) * dtype.itemsize >= _MAX_DIM:
        raise fail(f"shape {show(shape)} of {dtype_name} is too large: sizes multiply past 2**63")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes != end - begin:
        raise fail(
            f"shape {shape} of {dtype_name} needs {nbytes} bytes but data_offsets "
            f"[{begin}, {end}) hold {end - begin}"
        )
    return TensorSpec(name, path, dtype, tuple(shape), data_start + begin, nbytes)


def _check_overlaps(path: str, specs: list[TensorSpec]) -> None:
    """Refuse tensors that share bytes (``specs`` sorted by offset); gaps are allowed."""
    previous: TensorSpec | None = None
    for spec in specs:
        if spec.nbytes == 0:
            continue
        if previous is not None and spec.offset < previous.offset + previous.nbytes:
            raise CheckpointError(
                f"{path}: tensor {show(spec.name)} overlaps tensor {show(previous.name)} in the "
                "data section",
                path=path,
                tensor=spec.name,
            )
        previous = spec


def plan_checkpoint(path: str | os.PathLike[str]) -> list[ShardHeader]:
    """Find a checkpoint's shards and parse every header.

    Args:
        path: A ``.safetensors`` file; a ``*.safetensors.index.json`` (Hugging Face
            sharded layout: ``weight_map`` maps each tensor to its shard, relative to
            the index's folder); or a folder, which means its index when it holds
            exactly one, else every ``*.safetensors`` in it (sorted by name).

    Returns:
        One header per shard, each listing only the tensors to load (an index's
        ``weight_map`` is authoritative: tensors a shard holds beyond it are skipped).

    Raises:
        CheckpointError: Anything missing, corrupt or ambiguous.
    """
    target = Path(path)
    if target.is_dir():
        indexes = sorted(target.glob("*" + _INDEX_SUFFIX))
        if len(indexes) > 1:
            names = ", ".join(p.name for p in indexes)
            raise CheckpointError(
                f"{target}: several index files ({names}); pass the one to load", path=str(target)
            )
        if indexes:
            return _plan_index(indexes[0])
        # Not only regular files: a FIFO or a link to /dev/zero here is refused by
        # read_header, not skipped (which would load part of the checkpoint).
        files = sorted(p for p in target.glob("*.safetensors") if not p.is_dir())
        if not files:
            raise CheckpointError(f"{target}: no .safetensors files in folder", path=str(target))
        return _unique_names([read_header(str(f)) for f in files])
    if target.name.endswith(".json"):
        return _plan_index(target)
    return [read_header(str(target))]


def _plan_index(index: Path) -> list[ShardHeader]:
    shards = by_shard(_read_weight_map(index))
    return [_index_shard(index, shard, names) for shard, names in shards.items()]


def _read_weight_map(index: Path) -> dict[str, str]:
    """The ``weight_map`` of an index: a regular file, bounded, no repeated or deep keys."""
    where = str(index)
    try:
        raw = read_small(index, MAX_INDEX_BYTES)  # not /dev/zero, not a FIFO
    except OSError as exc:
        raise CheckpointError(f"cannot read index {where}: {exc.strerror}", path=where) from exc
    except ValueError as exc:
        raise CheckpointError(f"index {exc}", path=where) from None
    return weight_map_of(raw, where)


def weight_map_of(raw: bytes, where: str) -> dict[str, str]:
    """Parse an index's bytes: its ``weight_map``, each shard name checked by :func:`contained`."""
    try:
        content = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise CheckpointError(f"{where}: index JSON is nested too deeply", path=where) from None
    except ValueError as exc:  # also UnicodeDecodeError and a duplicate key
        raise CheckpointError(f"{where}: invalid JSON in index: {exc}", path=where) from exc
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(
            f"{where}: index has no weight_map object of tensor name -> shard file", path=where
        )
    for name, shard in weight_map.items():
        try:
            contained(shard, f"{where}: weight_map[{show(name)}]")
        except ValueError as exc:
            raise CheckpointError(str(exc), path=where, tensor=name) from None
    return weight_map


def by_shard(weight_map: dict[str, str]) -> dict[str, set[str]]:
    """Shard name -> the tensor names the index maps to it, shards sorted by name."""
    out: dict[str, set[str]] = {}
    for name, shard in weight_map.items():
        out.setdefault(shard, set()).add(name)
    return dict(sorted(out.items()))


def keep_wanted(header: ShardHeader, wanted: set[str], where: str, shard: str) -> ShardHeader:
    """``header`` cut to the tensors an index maps to it; each of them must be there."""
    present = {spec.name for spec in header.tensors}
    missing = sorted(wanted - present)
    if missing:
        raise CheckpointError(
            f"{where}: tensor {show(missing[0])} is mapped to shard {show(shard)}, which has "
            f"no such tensor ({len(missing)} missing in that shard)",
            path=where,
            tensor=missing[0],
        )
    kept = tuple(spec for spec in header.tensors if spec.name in wanted)
    return ShardHeader(header.path, header.file_bytes, header.data_start, kept, header.metadata)


def _index_shard(index: Path, shard: str, wanted: set[str]) -> ShardHeader:
    """Read the header of ``shard`` (checked by :func:`contained`), keeping ``wanted``."""
    where, shard_path = str(index), index.parent / shard
    try:
        shard_path.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointError(
            f"{where}: index names shard {show(shard)}, which does not exist ({shard_path})",
            path=where,
        ) from None
    except OSError as exc:  # a name too long, a symlink loop, no permission
        raise CheckpointError(
            f"{where}: cannot open shard {show(shard)}: {exc.strerror}", path=where
        ) from exc
    header = read_header(str(shard_path))  # refuses a FIFO, a device, a folder
    return keep_wanted(header, wanted, where, shard)


def _unique_names(headers: list[ShardHeader]) -> list[ShardHeader]:
    seen: dict[str, str] = {}
    for header in headers:
        for spec in header.tensors:
            if spec.name in seen:
                raise CheckpointError(
                    f"tensor {show(spec.name)} is in both {seen[spec.name]} and {header.path}",
                    path=header.path,
                    tensor=spec.name,
                )
            seen[spec.name] = header.path
    return headers
