"""Exact reads, and reads that tell whether the page cache held the bytes.

:func:`read_exact` fills a buffer with ``os.preadv``, looping on short reads.
:func:`read_cached` is the one page-cache residency probe: a ``preadv`` with
``RWF_NOWAIT`` (Linux), which copies what the page cache holds and fails with
``EAGAIN`` instead of waiting for storage.  :func:`read_probing` combines the
two: it fills the buffer and says whether the bytes had to come from storage.
"""

from __future__ import annotations

import errno
import os
from typing import Any

import numpy as np

__all__ = ["RWF_NOWAIT", "read_cached", "read_exact", "read_probing"]

#: ``preadv`` flag that fails with EAGAIN instead of waiting for storage (Linux); 0 elsewhere.
RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)

#: What a file system that does not do ``RWF_NOWAIT`` answers.
_NO_NOWAIT_ERRNOS = (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)


def read_exact(fd: int, buf: Any, offset: int, path: str) -> None:
    """Fill ``buf`` from ``fd`` at ``offset`` with ``os.preadv``; short files raise EOFError."""
    n = os.preadv(fd, [buf], offset)
    want = len(buf) if isinstance(buf, np.ndarray) else memoryview(buf).nbytes
    if n == want:
        return
    view = memoryview(buf).cast("B")
    got = n
    while got < want:
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise EOFError(
                f"{path}: expected {want} bytes at offset {offset}, the file ended after {got}"
            )
        got += n


def read_cached(fd: int, buf: Any, offset: int, flags: int = RWF_NOWAIT) -> int | None:
    """Copy into ``buf`` what the page cache holds of ``fd`` at ``offset``; never wait.

    One ``preadv(..., flags)`` (``flags`` is :data:`RWF_NOWAIT`, which must be
    non-zero): a short read means the rest is not cached.

    Returns:
        The bytes copied (0 when the read was refused with ``EAGAIN``: nothing
        cached there), or None when this file system does not do the probe.

    Raises:
        OSError: the read failed for another reason.
    """
    try:
        return os.preadv(fd, [buf], offset, flags)
    except BlockingIOError:
        return 0
    except OSError as exc:
        if exc.errno in _NO_NOWAIT_ERRNOS:
            return None
        raise


def read_probing(fd: int, buf: Any, offset: int, path: str, flags: int) -> int:
    """Fill ``buf`` like :func:`read_exact`; say whether the bytes had to come from storage.

    With ``flags=RWF_NOWAIT`` the first ``preadv`` returns only what the page cache
    holds, so a short or refused read is a cache miss, measured exactly and for the
    price of one syscall.  Returns 1 for a miss, 0 for a hit, -1 when the file
    system does not support the probe (the caller stops probing).
    """
    if not flags:
        read_exact(fd, buf, offset, path)
        return 0
    want = len(buf)
    n = read_cached(fd, buf, offset, flags)
    if n is None:
        read_exact(fd, buf, offset, path)
        return -1
    missed = 0 if n == want else 1
    if n < want:
        read_exact(fd, buf[n:], offset + n, path)
    return missed
