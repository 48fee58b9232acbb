"""Save a state dict as (sharded) safetensors, atomically, with parallel writes.

The layout is what ``safetensors`` and Hugging Face loaders read: each shard a
safetensors file (8-byte little-endian header length, a JSON header padded with
spaces to a multiple of 8, then the tensors' bytes back to back, no gaps); a
checkpoint over ``max_shard_bytes`` becomes ``model-00001-of-0000N.safetensors``
... plus ``model.safetensors.index.json`` (``{"metadata": {"total_size": ...},
"weight_map": {name: shard}}``).

Atomic: everything is written into a hidden sibling (``.NAME.iopipe-XXXXXX``),
every file fsynced, then renamed onto the final name and the parent folder
fsynced. A crash at any point leaves the final name absent (or, with
``overwrite=True``, the previous checkpoint), never a half-written one; a hidden
sibling left by a killed process can be deleted.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from iopipe.checkpoint.header import DTYPES, CheckpointError
from iopipe.checkpoint.io import bytes_of
from iopipe.runtime.errors import show

__all__ = ["DEFAULT_MAX_SHARD_BYTES", "save_checkpoint"]

#: Default largest shard: Hugging Face's default ``max_shard_size`` ("5GB").
DEFAULT_MAX_SHARD_BYTES = 5_000_000_000
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
#: Bytes one ``write`` hands the kernel at most (bounds the copy of a CUDA tensor too).
_WRITE_BYTES = 64 << 20


def _checked(state_dict: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """The entries to save; refuses what safetensors cannot hold or would alias."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of str -> Tensor, got {state_dict!r}")
    out = []
    for name, tensor in state_dict.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise CheckpointError(f"cannot save a tensor named {name!r}", tensor=str(name))
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state_dict[{show(name)}] is a {type(tensor).__name__}, not a Tensor")
        if tensor.layout != torch.strided or tensor.device.type == "meta":
            raise CheckpointError(
                f"cannot save {show(name)}: a {tensor.layout} tensor on {tensor.device} "
                "(safetensors holds dense tensors with data)",
                tensor=name,
            )
        if tensor.dtype not in _NAMES:
            raise CheckpointError(f"cannot save {show(name)}: dtype {tensor.dtype}", tensor=name)
        out.append((name, tensor.detach()))
    _refuse_overlaps(out)
    return out


def _refuse_overlaps(entries: list[tuple[str, torch.Tensor]]) -> None:
    """Refuse two tensors over the same bytes (tied weights): saved twice, they untie.

    Views of one buffer that do not overlap (what a distributed load returns) are fine.
    """
    spans = []
    for name, tensor in entries:
        if tensor.numel() == 0:
            continue
        start = tensor.data_ptr()
        reach = sum((n - 1) * step for n, step in zip(tensor.shape, tensor.stride(), strict=True))
        end = start + (reach + 1) * tensor.itemsize
        spans.append((tensor.device, start, end, name))
    spans.sort(key=lambda s: (str(s[0]), s[1]))
    for (dev_a, _, end_a, name_a), (dev_b, start_b, _, name_b) in itertools.pairwise(spans):
        if dev_a == dev_b and start_b < end_a:
            raise CheckpointError(
                f"{show(name_a)} and {show(name_b)} share memory (tied weights?): save one of "
                "them, and tie them again after loading",
                tensor=name_b,
            )


def _shards(entries: list[tuple[str, torch.Tensor]], limit: int) -> list[list[int]]:
    """Greedy shards in the given order; a tensor over ``limit`` gets one of its own."""
    shards: list[list[int]] = []
    size = 0
    for i, (_, tensor) in enumerate(entries):
        if not shards or (size + tensor.nbytes > limit and size > 0):
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += tensor.nbytes
    return shards or [[]]


def _header(entries: list[tuple[str, torch.Tensor]], metadata: dict[str, str]) -> bytes:
    """A safetensors header for ``entries`` in that order, padded to 8 bytes."""
    head: dict[str, object] = {"__metadata__": metadata}
    at = 0
    for name, tensor in entries:
        head[name] = {
            "dtype": _NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [at, at + tensor.nbytes],
        }
        at += tensor.nbytes
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def _write_shard(path: Path, entries: list[tuple[str, torch.Tensor]], meta: dict[str, str]) -> int:
    """Write one shard file and fsync it; returns its tensor bytes."""
    # Widest items first, as safetensors orders them: every offset stays aligned.
    entries = sorted(entries, key=lambda e: -e[1].itemsize)
    total = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        _write_all(fd, memoryview(_header(entries, meta)))
        for _, tensor in entries:
            flat = tensor.reshape(-1)
            step = max(1, _WRITE_BYTES // max(1, tensor.itemsize))
            for start in range(0, flat.numel(), step):
                part = flat[start : start + step].to("cpu").contiguous()
                _write_all(fd, bytes_of(part))
            total += tensor.nbytes
        os.fsync(fd)
    finally:
        os.close(fd)
    return total


def _write_all(fd: int, data: memoryview) -> None:
    data = data.cast("B")
    while data:
        data = data[os.write(fd, data) :]


def save_checkpoint(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
    concurrency: int = 4,
) -> list[str]:
    """Save ``state_dict`` as safetensors, sharded, fsynced, renamed into place at the end.

    ``path`` ending in ``.safetensors`` is one file (``max_shard_bytes`` does not
    apply); any other ``path`` is a folder with ``model.safetensors``, or over
    ``max_shard_bytes``, ``model-0000i-of-0000N.safetensors`` shards plus the Hugging
    Face ``model.safetensors.index.json``. Tensors may be on any device and need not
    be contiguous; wider dtypes come first in each shard (every tensor aligned).

    Args:
        state_dict: Name -> tensor. Two names over the same memory (tied weights) are
            refused: save one and tie again after loading.
        path: The file or folder to create.
        max_shard_bytes: Largest shard's tensor bytes; a larger tensor gets its own.
        metadata: Extra ``__metadata__`` strings (``format: pt`` is always set).
        overwrite: Replace an existing ``path`` (after the new one is complete).
        concurrency: Shards written at once.

    Returns:
        The files written, index last.

    Raises:
        CheckpointError: A tensor cannot be saved, or ``path`` exists (without
            ``overwrite``). OSError: writing failed. Either way nothing is left
            under ``path`` (or, with ``overwrite``, the old checkpoint is).
    """
    entries = _checked(state_dict)
    meta = _metadata(metadata)
    for name, value in (("max_shard_bytes", max_shard_bytes), ("concurrency", concurrency)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    final = Path(path)
    if (final.exists() or final.is_symlink()) and not overwrite:
        raise CheckpointError(f"{final} exists; pass overwrite=True to replace it", path=str(final))
    single = final.name.endswith(".safetensors")
    groups = [list(range(len(entries)))] if single else _shards(entries, max_shard_bytes)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.iopipe-", dir=final.parent))
    try:
        names = _file_names(len(groups), final.name if single else None)
        names = _write_files(work, entries, groups, names, meta, concurrency)
        written = _publish(work, final, single, overwrite)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return [str(written / n) for n in names] if not single else [str(written)]


def _write_files(
    work: Path,
    entries: list[tuple[str, torch.Tensor]],
    groups: list[list[int]],
    names: list[str],
    meta: dict[str, str],
    concurrency: int,
) -> list[str]:
    """Write each shard (``concurrency`` at once) and the index into ``work``; fsync all."""
    with ThreadPoolExecutor(min(concurrency, len(groups)), "iopipe-save") as pool:
        jobs = [
            pool.submit(_write_shard, work / n, [entries[i] for i in g], meta)
            for n, g in zip(names, groups, strict=True)
        ]
        sizes = [job.result() for job in jobs]
    if len(groups) > 1:
        weight_map = {entries[i][0]: n for n, g in zip(names, groups, strict=True) for i in g}
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        _write_small(work / _INDEX, json.dumps(index, indent=2).encode())
        names = [*names, _INDEX]
    _sync_dir(work)
    return names


def _metadata(extra: Mapping[str, str] | None) -> dict[str, str]:
    meta = {"format": "pt"}
    for key, value in (extra or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata must map str to str, got {key!r}: {value!r}")
        meta[key] = value
    return meta


def _file_names(count: int, single: str | None) -> list[str]:
    if single is not None:
        return [single]
    if count == 1:
        return [_SINGLE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _write_small(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        _write_all(fd, memoryview(data))
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(work: Path, final: Path, single: bool, overwrite: bool) -> Path:
    """Rename the finished ``work`` onto ``final``; an old ``final`` goes only after."""
    source = work / final.name if single else work
    if single:
        os.replace(source, final)  # atomic, over an old file too
    else:
        old = None
        if overwrite and (final.exists() or final.is_symlink()):
            old = final.with_name(f".{final.name}.iopipe-old-{os.getpid()}")
            os.rename(final, old)
        try:
            os.rename(source, final)
        except BaseException:
            if old is not None:
                os.rename(old, final)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    _sync_dir(final.parent)
    if single:
        shutil.rmtree(work, ignore_errors=True)
    return final
