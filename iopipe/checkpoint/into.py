"""Fill an ``nn.Module`` from a safetensors checkpoint, one streamed tensor at a time."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Generator
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from iopipe.checkpoint.api import planned, stream
from iopipe.checkpoint.header import CheckpointError, ShardHeader
from iopipe.checkpoint.load import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_CONCURRENCY,
    DEFAULT_MAX_INFLIGHT_BYTES,
    _validate,
)
from iopipe.checkpoint.select import Rename

__all__ = ["LoadResult", "load_into"]


class LoadResult(NamedTuple):
    """What :func:`load_into` could not match (the fields of torch's ``_IncompatibleKeys``)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


class _Slot(NamedTuple):
    """Where one state-dict entry lives: ``getattr(owner, attr)``."""

    owner: nn.Module
    attr: str
    is_parameter: bool
    current: torch.Tensor


def _module_slots(module: nn.Module) -> dict[str, _Slot]:
    """Map every state-dict key of ``module`` to its slot (persistent buffers only)."""
    slots: dict[str, _Slot] = {}
    for prefix, owner in module.named_modules(remove_duplicate=False):
        base = f"{prefix}." if prefix else ""
        for attr, param in owner.named_parameters(recurse=False, remove_duplicate=False):
            slots[base + attr] = _Slot(owner, attr, True, param)
        # torch has no public word for a buffer's persistence: its own state_dict reads this.
        skip = owner._non_persistent_buffers_set
        for attr, buf in owner.named_buffers(recurse=False, remove_duplicate=False):
            if attr not in skip:
                slots[base + attr] = _Slot(owner, attr, False, buf)
    return slots


def _aliases(slots: dict[str, _Slot]) -> dict[str, list[str]]:
    """Map each key to the other keys holding the very same tensor (tied weights)."""
    groups: dict[int, list[str]] = {}
    for key, slot in slots.items():
        groups.setdefault(id(slot.current), []).append(key)
    return {key: [k for k in groups[id(slot.current)] if k != key] for key, slot in slots.items()}


def _check_keys(
    name: str,
    slots: dict[str, _Slot],
    headers: list[ShardHeader],
    aliases: dict[str, list[str]],
    strict: bool,
) -> LoadResult:
    shapes = {spec.name: spec.shape for header in headers for spec in header.tensors}
    # A tied weight saved once (as Hugging Face does) counts as present under every alias.
    missing = [k for k in slots if k not in shapes and not any(a in shapes for a in aliases[k])]
    unexpected = [k for k in shapes if k not in slots]
    errors = []
    if strict and missing:
        errors.append("Missing key(s) in state_dict: " + ", ".join(f'"{k}"' for k in missing))
    if strict and unexpected:
        errors.append("Unexpected key(s) in state_dict: " + ", ".join(f'"{k}"' for k in unexpected))
    for key, slot in slots.items():
        if key in shapes and tuple(slot.current.shape) != shapes[key]:
            errors.append(
                f"size mismatch for {key}: copying a param with shape "
                f"{torch.Size(shapes[key])} from checkpoint, the shape in current model is "
                f"{slot.current.shape}."
            )
    if errors:
        raise CheckpointError(
            f"Error(s) in loading state_dict for {name}:\n\t" + "\n\t".join(errors)
        )
    return LoadResult(missing, unexpected)


def _default_device(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def _assign(slots: dict[str, _Slot], keys: list[str], tensor: torch.Tensor) -> None:
    """Make ``tensor`` the value of every key in ``keys`` (one key plus its unloaded aliases)."""
    first = slots[keys[0]]
    value: torch.Tensor = tensor
    if first.is_parameter:
        value = nn.Parameter(tensor, requires_grad=first.current.requires_grad)
    for key in keys:
        slot = slots[key]
        if slot.is_parameter:
            slot.owner._parameters[slot.attr] = value  # type: ignore[assignment]
        else:
            slot.owner._buffers[slot.attr] = value


def load_into(
    module: nn.Module,
    path: str | os.PathLike[str],
    *,
    strict: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype | Literal["module"] | None = None,
    rename: Rename | None = None,
    copy: bool = False,
    max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
    concurrency: int | None = DEFAULT_CONCURRENCY,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> LoadResult:
    """Fill ``module``'s parameters and persistent buffers from a checkpoint.

    Semantics are ``module.load_state_dict(..., assign=True)``: each loaded tensor
    *becomes* the parameter (``nn.Parameter`` with the old ``requires_grad``) or
    buffer, so a module on the meta device is materialised without allocating its
    weights twice; tensors are assigned as they stream in (at most
    ``max_inflight_bytes`` loaded but unassigned). Keys and shapes are checked before
    any tensor is read. Tied weights stay tied when the checkpoint holds one of their
    keys (the others are not reported missing). Mapped parameters (cached shards,
    ``copy=False``) are copy-on-write: training them never writes the file.

    Args:
        module: The module to fill (any device, ``meta`` included).
        path, rename, copy: As for :func:`load_checkpoint`; ``rename`` maps the
            checkpoint's names onto the module's keys.
        strict: Raise if the checkpoint and ``module.state_dict()`` keys differ.
        device: Default: the device of the module's first non-meta tensor, else CPU.
        dtype: Cast floating-point tensors to it; ``"module"``: to the dtype of the
            tensor each one replaces; default: keep the checkpoint's dtypes.
        max_inflight_bytes, concurrency, chunk_bytes: As for :func:`iter_checkpoint`.

    Returns:
        The missing and unexpected keys (both empty when ``strict``).

    Raises:
        CheckpointError: The checkpoint is corrupt, or keys differ (``strict``) or a
            shape differs (``load_state_dict``'s wording); nothing is assigned then.
    """
    target = _default_device(module) if device is None else device
    if isinstance(dtype, str) and dtype != "module":
        raise ValueError(f"dtype must be a torch.dtype, 'module' or None, got {dtype!r}")
    fixed = None if isinstance(dtype, str) else dtype
    dev, threads = _validate(target, fixed, max_inflight_bytes, concurrency, chunk_bytes)
    plan = planned(path, None, rename)
    targets = _targets(module, plan.headers, strict)
    casts: Any = fixed
    if dtype == "module":
        casts = {key: slot.current.dtype for key, slot in targets.slots.items()}
    pairs = stream(targets.wanted, plan.client, device=dev, casts=casts, copy=copy,
                   budget=max_inflight_bytes, max_inflight_bytes=max_inflight_bytes,
                   concurrency=threads, chunk_bytes=chunk_bytes)  # fmt: skip
    _assign_streamed(pairs, targets)
    return targets.result


class _Targets(NamedTuple):
    """What a checkpoint fills in a module, checked against its headers."""

    slots: dict[str, _Slot]
    aliases: dict[str, list[str]]  # see _aliases
    result: LoadResult
    wanted: list[ShardHeader]  # the headers cut to the tensors the module has


def _targets(module: nn.Module, headers: list[ShardHeader], strict: bool) -> _Targets:
    """Match ``module``'s state-dict keys to the checkpoint (see :func:`_check_keys`)."""
    slots = _module_slots(module)
    aliases = _aliases(slots)
    result = _check_keys(type(module).__name__, slots, headers, aliases, strict)
    wanted = [
        ShardHeader(
            h.path,
            h.file_bytes,
            h.data_start,
            tuple(s for s in h.tensors if s.name in slots),
            h.metadata,
        )
        for h in headers
    ]
    return _Targets(slots, aliases, result, wanted)


def _assign_streamed(
    stream: Generator[tuple[str, torch.Tensor], None, None], targets: _Targets
) -> None:
    """Assign each tensor as it is loaded, to its key and the aliases not loaded themselves."""
    loaded = {spec.name for header in targets.wanted for spec in header.tensors}
    aliases = targets.aliases
    with contextlib.closing(stream) as pairs:
        for key, tensor in pairs:
            _assign(targets.slots, [key, *(a for a in aliases[key] if a not in loaded)], tensor)
