"""Shard URLs: brace ranges and lists, globs, local paths.

``shard-{000000..000099}.tar`` expands to 100 names, zero-padded as written;
``{train,val}/x.tar`` to two.  Several brace groups multiply; nesting is not
supported.  After expansion, a name with glob characters is listed (sorted),
other names must exist.  ``s3://`` globs are listed in the bucket; ``http(s)://``
names are taken as given (a server cannot be listed) and checked when indexed.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable
from typing import Any

from ..io.listing import list_files
from .tar import INDEX_SUFFIX

__all__ = ["MAX_SHARDS", "expand_braces", "shard_paths"]

#: Shards one call may name, at most (a brace range is checked before it expands).
MAX_SHARDS = 1_000_000
_GROUP = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?[0-9]+)\.\.(-?[0-9]+)$")
_REMOTE = ("http://", "https://", "s3://")


def _choices(body: str, text: str) -> list[str]:
    m = _RANGE.match(body)
    if m is None:
        if "," not in body:
            raise ValueError(
                f"{text!r}: a brace group is a list a,b or a range 0..9, got {{{body}}}"
            )
        return body.split(",")
    a, b = m.group(1), m.group(2)
    lo, hi = int(a), int(b)
    if hi < lo:
        raise ValueError(f"{text!r}: the range {{{body}}} runs backwards")
    if hi - lo + 1 > MAX_SHARDS:
        raise ValueError(f"{text!r}: {{{body}}} names more than {MAX_SHARDS} shards")
    # Zero-padded when either bound is (as braceexpand, which WebDataset uses, does).
    padded = any(x.lstrip("-").startswith("0") and len(x.lstrip("-")) > 1 for x in (a, b))
    width = max(len(a), len(b)) if padded else 0
    return [str(k).zfill(width) for k in range(lo, hi + 1)]


def expand_braces(text: str) -> list[str]:
    """Every name ``text``'s brace groups stand for, in order."""
    m = _GROUP.search(text)
    if m is None:
        if "{" in text or "}" in text:
            raise ValueError(f"{text!r}: unbalanced or nested braces")
        return [text]
    head, tail = text[: m.start()], text[m.end() :]
    out: list[str] = []
    for choice in _choices(m.group(1), text):
        for rest in expand_braces(tail):
            out.append(head + choice + rest)
            if len(out) > MAX_SHARDS:
                raise ValueError(f"{text!r} names more than {MAX_SHARDS} shards")
    return out


def shard_paths(
    urls: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], remote: Any = None
) -> list[str]:
    """The shard files ``urls`` names (a string or a list of them), in order.

    Raises:
        FileNotFoundError: a name does not exist, or a glob matches nothing.
        ValueError: bad braces, no shard at all, or a remote URL (not supported yet).
    """
    specs = (
        [os.fspath(urls)] if isinstance(urls, str | os.PathLike) else [os.fspath(u) for u in urls]
    )
    paths: list[str] = []
    for spec in specs:
        if not isinstance(spec, str):
            raise TypeError(f"a shard URL must be a str or path, got {type(spec).__name__}")
        for name in expand_braces(spec):
            if name.startswith(_REMOTE):
                paths.extend(_remote(name, remote))
            elif glob.has_magic(name):  # a listing: shards only, not their indexes or .tmp files
                paths.extend(p for p in list_files(name) if not p.endswith((INDEX_SUFFIX, ".tmp")))
            elif os.path.isfile(name):
                paths.append(name)
            else:
                raise FileNotFoundError(f"no such shard: {name!r}")
            if len(paths) > MAX_SHARDS:
                raise ValueError(f"more than {MAX_SHARDS} shards")
    if not paths:
        raise ValueError("no shards given")
    if len({p.startswith(_REMOTE) for p in paths}) > 1:
        raise ValueError("shards are all local or all remote, not both")
    return paths


def _remote(url: str, remote: Any) -> list[str]:
    """An ``s3://`` glob listed; other remote URLs as they are (checked when indexed)."""
    if not glob.has_magic(url.split("://", 1)[1]):
        return [url]
    if not url.startswith("s3://"):
        raise ValueError(f"{url!r}: an HTTP server cannot be listed; name shards with braces")
    found: list[str] = remote.list_s3(url)
    if not found:
        raise FileNotFoundError(f"no shards match {url!r}")
    return found
