"""Files named by input iopipe does not control: regular files only, bounded, contained.

Every reader opens the files a listing, an index or a config names through
:func:`open_regular`: a FIFO there would block an ``open()`` or a read
forever, ``/dev/zero`` never ends, and ``/proc`` files report a size of 0 while
holding data.  :func:`read_small` reads a whole file up to a bound (indexes,
headers) and :func:`contained` checks a name an index gives for a file beside
it.  Listing is in :mod:`iopipe.io.listing`, exact reads in :mod:`iopipe.io.reads`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

#: Flags for a plain read-only open.
O_READ = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)

_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


class NotRegularFileError(OSError):
    """A path names something other than a regular file (a FIFO, a device, /proc...).

    An :class:`OSError` (``errno.EINVAL``) with the path as ``filename``, so it
    is skipped under ``on_error="skip"`` as any unreadable file is.
    """


def open_regular(path: str | os.PathLike[str], flags: int = O_READ) -> int:
    """Open ``path`` with ``flags`` if it is a regular file; return the descriptor.

    The open itself never blocks (``O_NONBLOCK``, cleared after the check).

    Raises:
        NotRegularFileError: a FIFO, socket or device, or a file that reports
            0 bytes but holds data (``/proc``, ``/sys``).
        IsADirectoryError: a directory.
        OSError: the open failed.
    """
    fd, _ = open_sized(path, flags)
    if not flags & os.O_NONBLOCK:
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        except BaseException:
            os.close(fd)
            raise
    return fd


def open_sized(path: str | os.PathLike[str], flags: int = O_READ) -> tuple[int, int]:
    """:func:`open_regular` for the readers' hot path: return ``(fd, size)``.

    ``O_NONBLOCK`` stays set (saving two system calls per file): Linux ignores
    it for regular files, whose reads wait for storage either way.
    """
    fd = os.open(path, flags | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), os.fspath(path))
        if not stat.S_ISREG(st.st_mode):
            kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
            _refuse(path, f"{kind}, not a regular file")
        if st.st_size == 0 and os.pread(fd, 1, 0):
            _refuse(path, "reports 0 bytes but holds data (a /proc or /sys file?)")
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def _refuse(path: str | os.PathLike[str], why: str) -> None:
    raise NotRegularFileError(
        errno.EINVAL, f"{why}; iopipe reads regular files only", os.fspath(path)
    )


def read_small(path: str | os.PathLike[str], limit: int) -> bytes:
    """The whole content of the regular file ``path``, at most ``limit`` bytes.

    Raises:
        NotRegularFileError: see :func:`open_regular`.
        ValueError: the file is larger than ``limit``.
        OSError: it could not be read.
    """
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise ValueError(f"{os.fspath(path)}: {size} bytes, more than the {limit} allowed")
        parts, got = [], 0
        while got <= size:  # a file growing meanwhile is read up to the bound, not past it
            part = os.pread(fd, min(limit + 1 - got, 1 << 20), got)
            if not part:
                break
            parts.append(part)
            got += len(part)
        if got > limit:
            raise ValueError(f"{os.fspath(path)}: grew past the {limit} bytes allowed")
        return b"".join(parts)
    finally:
        os.close(fd)


def contained(name: object, what: str) -> str:
    """Check that ``name``, a file an index names, stays in the index's folder.

    Only plain relative names are accepted: no absolute path, no ``..``, no
    NUL, no empty part.  Symlinks inside the folder are followed (a Hugging
    Face cache links its snapshots to blobs one level up): who made the folder
    chose them; an index, often downloaded alone, cannot.

    Raises:
        ValueError: the name is not a string or would leave the folder; the
            message names ``what`` (e.g. the index entry).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what}: expected a file name, got {name!r:.80}")
    parts = name.replace("\\", "/").split("/")
    if (
        "\x00" in name
        or os.path.isabs(name)
        or name.startswith(("/", "\\"))
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise ValueError(
            f"{what}: {name!r:.200} is not a plain relative file name "
            "(an index may only name files in its own folder)"
        )
    return name
