"""Listing files: globs, folders, single paths; each folder entered once.

:func:`list_files` is what ``Pipeline.from_files``, configs and token shards
list with (a glob, a folder or a file, sorted); :func:`walk_files` walks a
folder without following a symlink loop; :func:`sized_files` is the listing
of ``iopipe probe`` (a folder and a glob relative to it, with each file's size
and a check that it opens).
"""

from __future__ import annotations

import fnmatch
import glob
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from .files import open_sized

__all__ = ["list_files", "sized_files", "walk_files"]


def walk_files(root: str, *, follow_links: bool) -> Iterator[str]:
    """Every regular file below ``root`` (paths joined to it), each folder once.

    With ``follow_links`` symlinked folders are entered, but a folder already
    entered (same device and inode) is not entered again: a ``self -> .`` link
    lists nothing twice.  FIFOs, sockets, devices and dangling links are left out.
    """
    seen: set[tuple[int, int]] = set()
    for folder, dirs, files in os.walk(root, followlinks=follow_links):
        try:
            st = os.stat(folder)
        except OSError:
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                yield path


def list_files(
    pattern: str | os.PathLike[str], *, allow_empty: bool = False, hint: str = ""
) -> list[str]:
    """Expand a glob (``**`` recursive), a directory (all files below) or one file path.

    Returns the paths sorted, so the listing is the same on every run and rank.

    Args:
        pattern: The glob, directory or file.
        allow_empty: Return ``[]`` when a glob or directory matches no file.
        hint: Appended to the no-match message (how the caller allows it).

    Raises:
        FileNotFoundError: the path does not exist, or nothing matches (unless
            ``allow_empty``); the message names the pattern.
    """
    text = os.fspath(pattern)
    if glob.has_magic(text):
        paths = _glob_files(text)
        nothing = f"no files match the glob {text!r}"
    elif os.path.isdir(text):
        paths = list(walk_files(text, follow_links=False))
        nothing = f"no files match {text!r}: the directory holds no files"
    elif os.path.isfile(text):
        paths = [text]
    else:
        raise FileNotFoundError(f"no such file or directory: {text!r}")
    if not paths and not allow_empty:
        raise FileNotFoundError(nothing + hint)
    paths.sort()
    return paths


def _glob_files(pattern: str) -> list[str]:
    """The regular files ``pattern`` matches, as ``glob.glob(recursive=True)``.

    ``**`` is matched against a walk that enters each folder once, where the
    standard glob follows a ``self -> .`` link until the path is too long
    (and two such links make it run for ever).  Names starting with a dot
    match only a part that starts with one, as with glob.
    """
    if "**" not in pattern:
        return [p for p in glob.glob(pattern) if os.path.isfile(p)]
    parts = pattern.split(os.sep)
    fixed = 0
    while fixed < len(parts) and not glob.has_magic(parts[fixed]):
        fixed += 1
    root = os.sep.join(parts[:fixed]) if fixed else ""
    if fixed == 1 and parts[0] == "":
        root = os.sep
    rest = parts[fixed:]
    out = []
    for path in walk_files(root or os.curdir, follow_links=True):
        rel = os.path.relpath(path, root or os.curdir).split(os.sep)
        if _match_parts(rest, rel):
            out.append(path if root else os.path.join(*rel))
    return out


def _match_parts(pattern: list[str], names: list[str]) -> bool:
    if not pattern:
        return not names
    head = pattern[0]
    if head == "**":
        for taken in range(len(names) + 1):
            if taken and names[taken - 1].startswith("."):
                return False  # ** does not enter hidden folders
            if _match_parts(pattern[1:], names[taken:]):
                return True
        return False
    if not names or (names[0].startswith(".") and not head.startswith(".")):
        return False
    return fnmatch.fnmatchcase(names[0], head) and _match_parts(pattern[1:], names[1:])


def sized_files(path: str | os.PathLike[str], pattern: str | None = None) -> list[tuple[str, int]]:
    """Return ``(path, size)`` of the regular files under ``path``, sorted; check they open.

    The listing of ``iopipe probe``, whose ``--pattern`` is a :mod:`pathlib`
    glob relative to the folder (``"*"`` matches names starting with a dot
    there, unlike :func:`list_files`), and for which a file that cannot be
    opened, a dangling link among them, is an error rather than left out.

    Args:
        path: A folder (searched recursively) or one file.
        pattern: A glob relative to ``path`` (``"*.jpg"``, ``"**/*.bin"``); default: every file.

    Raises:
        FileNotFoundError: ``path`` does not exist, or no file is found.
        PermissionError, OSError: a file cannot be opened (the message names it).
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"no such file or directory: {os.fspath(path)}")
    found = [root]
    if root.is_dir():
        found = sorted(root.glob(pattern) if pattern else root.rglob("*"))
    out: list[tuple[str, int]] = []
    for p in found:
        try:
            st = os.stat(p)
        except OSError as exc:
            raise type(exc)(exc.errno, f"cannot read {p}: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            continue
        try:
            os.close(open_sized(p)[0])  # a FIFO or /proc file is refused
        except OSError as exc:
            raise type(exc)(exc.errno, f"cannot read {p}: {exc.strerror}") from None
        out.append((os.fspath(p), st.st_size))
    if not out:
        where = f"matching {pattern!r} " if pattern else ""
        raise FileNotFoundError(f"no files {where}under {os.fspath(path)}")
    return out
