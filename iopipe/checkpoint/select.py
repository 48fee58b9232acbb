"""Subsets and renames: which tensors of a checkpoint to load, and under which names.

Both act on the parsed headers before a tensor byte is read: a subset drops the other
tensors from the plan, so their bytes are never read (the reader merges only
contiguous tensors into one request, never across a gap); a rename changes the names
the caller sees and is checked for collisions up front.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Collection, Mapping
from typing import Any

from iopipe.checkpoint.header import CheckpointError, ShardHeader
from iopipe.runtime.errors import show

__all__ = ["Names", "Rename", "new_names", "renamed", "renamer", "select"]

#: ``names=``: exact names, one glob pattern, or a predicate over names.
Names = str | Collection[str] | Callable[[str], Any]
#: ``rename=``: a function of the name, or ``{old prefix: new prefix}``.
Rename = Callable[[str], str] | Mapping[str, str]


def _matcher(names: Names) -> tuple[Callable[[str], bool], set[str] | None]:
    """A predicate for ``names``, and the exact names it must find (None: a pattern)."""
    if isinstance(names, str):
        pattern = names
        return (lambda n: fnmatch.fnmatchcase(n, pattern)), None
    if callable(names):
        fn = names
        return (lambda n: bool(fn(n))), None
    if isinstance(names, Collection) and not isinstance(names, bytes | Mapping):
        wanted = set(names)
        bad = [n for n in wanted if not isinstance(n, str)]
        if bad:
            raise TypeError(f"names: every entry must be a str, got {bad[0]!r}")
        return wanted.__contains__, wanted
    raise TypeError(
        f"names must be a list of names, a glob pattern or a callable, got {type(names).__name__}"
    )


def select(headers: list[ShardHeader], names: Names | None) -> list[ShardHeader]:
    """Cut ``headers`` to the tensors ``names`` selects (all of them when None).

    Raises:
        CheckpointError: An exact name is not in the checkpoint, or a pattern or
            predicate selects nothing.
        TypeError: ``names`` is none of the accepted kinds.
    """
    if names is None:
        return headers
    keep, exact = _matcher(names)
    out = [
        dataclasses.replace(h, tensors=tuple(s for s in h.tensors if keep(s.name))) for h in headers
    ]
    found = {s.name for h in out for s in h.tensors}
    where = headers[0].path if headers else None
    if exact is not None:
        missing = sorted(exact - found)
        if missing:
            shown = ", ".join(show(n) for n in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise CheckpointError(
                f"names: not in the checkpoint: {shown}{more}", path=where, tensor=missing[0]
            )
    elif not found and any(h.tensors for h in headers):
        raise CheckpointError(f"names={names!r} selects no tensor of the checkpoint", path=where)
    return [h for h in out if h.tensors]


def renamer(rename: Rename | None) -> Callable[[str], str] | None:
    """``rename`` as a function of the name (a prefix map: the longest prefix that matches)."""
    if rename is None or callable(rename):
        return rename
    if not isinstance(rename, Mapping):
        raise TypeError(f"rename must be a callable or a prefix mapping, got {rename!r}")
    for old, new in rename.items():
        if not isinstance(old, str) or not isinstance(new, str):
            raise TypeError(f"rename: prefixes must be str, got {old!r}: {new!r}")
    prefixes = sorted(rename.items(), key=lambda kv: len(kv[0]), reverse=True)

    def by_prefix(name: str) -> str:
        for old, new in prefixes:
            if name.startswith(old):
                return new + name[len(old) :]
        return name

    return by_prefix


def new_names(headers: list[ShardHeader], rename: Callable[[str], str] | None) -> list[str]:
    """The caller's name for every tensor of ``headers``, in order; collisions refused.

    Raises:
        CheckpointError: Two tensors get the same name, or ``rename`` returns a non-str.
    """
    specs = [s for h in headers for s in h.tensors]
    if rename is None:
        return [s.name for s in specs]
    out: list[str] = []
    seen: dict[str, str] = {}
    for spec in specs:
        new = rename(spec.name)
        if not isinstance(new, str):
            raise CheckpointError(
                f"rename({show(spec.name)}) returned {new!r}, not a str",
                path=spec.path,
                tensor=spec.name,
            )
        if new in seen:
            raise CheckpointError(
                f"rename maps both {show(seen[new])} and {show(spec.name)} to {show(new)}",
                path=spec.path,
                tensor=spec.name,
            )
        seen[new] = spec.name
        out.append(new)
    return out


def renamed(headers: list[ShardHeader], rename: Rename | None) -> list[ShardHeader]:
    """``headers`` with each tensor under the name ``rename`` gives it (checked first)."""
    fn = renamer(rename)
    if fn is None:
        return headers
    names = iter(new_names(headers, fn))
    return [
        dataclasses.replace(
            h, tensors=tuple(dataclasses.replace(s, name=next(names)) for s in h.tensors)
        )
        for h in headers
    ]
