"""Token shard files: raw ``.bin`` arrays and ``.npy`` arrays, described without loading them.

A shard is a flat array of token ids stored little-endian.  For ``.npy`` files the
header (magic, version, a Python-literal dict with ``descr``, ``fortran_order`` and
``shape``) is parsed here from its first bytes; the data is never read.  Raw files
carry no header, so their dtype must be given.
"""

from __future__ import annotations

import ast
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..io.files import open_regular
from ..runtime.errors import IopipeError

__all__ = ["SUPPORTED_DTYPES", "TokenFile", "TokenFileError", "describe_shards", "parse_npy_header"]

#: Token dtypes a shard may hold (little-endian).  Narrower ones are the norm
#: (GPT-2's 50257 ids fit uint16); every one is widened to int64 in batches.
SUPPORTED_DTYPES = ("uint16", "uint32", "int32", "int64")
_NPY_MAGIC = b"\x93NUMPY"
_NPY_HEADER_MAX = 1 << 20  # numpy itself refuses headers past 10 kB by default


class TokenFileError(IopipeError, ValueError):
    """A token shard is missing, unreadable as tokens, or has an unsupported layout.

    Attributes:
        path: The file at fault.
    """

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (str(self), self.path))


def _rebuild(text: str, path: str) -> TokenFileError:
    err = TokenFileError("", path=path)
    err.args = (text,)
    return err


@dataclass(frozen=True, slots=True)
class TokenFile:
    """One shard: where its tokens start in the file, how many, and their dtype."""

    path: str
    dtype: np.dtype[Any]
    data_offset: int  # byte offset of token 0
    n_tokens: int

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize


def check_dtype(dtype: Any, *, where: str) -> np.dtype[Any]:
    """Return ``dtype`` as a little-endian numpy dtype from SUPPORTED_DTYPES.

    Raises:
        TypeError: ``dtype`` is not a dtype.
        ValueError: an unsupported or big-endian dtype (``where`` names the source).
    """
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be a numpy dtype or its name, got {dtype!r}") from None
    if dt.byteorder == ">" or (dt.byteorder == "=" and not np.little_endian):
        raise ValueError(f"{where}: big-endian token dtype {dt.str!r} is not supported")
    if dt.name not in SUPPORTED_DTYPES:
        raise ValueError(
            f"{where}: token dtype {dt.name!r} is not supported (use one of {SUPPORTED_DTYPES})"
        )
    little: np.dtype[Any] = dt.newbyteorder("<")
    return little


def parse_npy_header(head: bytes, *, path: str) -> tuple[np.dtype[Any], int, int]:
    """Parse the start of an ``.npy`` file: return ``(dtype, data_offset, n_tokens)``.

    Args:
        head: The file's first bytes (at least the whole header).
        path: Named in errors.

    Raises:
        TokenFileError: bad magic, unknown version, truncated or malformed header,
            ``fortran_order`` true, an array that is not 1-D, or an unsupported dtype.
    """
    if not head.startswith(_NPY_MAGIC):
        raise TokenFileError("not an .npy file (bad magic)", path=path)
    if len(head) < 10:
        raise TokenFileError("truncated .npy header", path=path)
    major = head[6]
    if major == 1:
        (hlen,), start = struct.unpack_from("<H", head, 8), 10
    elif major in (2, 3):
        if len(head) < 12:
            raise TokenFileError("truncated .npy header", path=path)
        (hlen,), start = struct.unpack_from("<I", head, 8), 12
    else:
        raise TokenFileError(f"unsupported .npy format version {major}.{head[7]}", path=path)
    if start + hlen > len(head):
        raise TokenFileError(
            f"truncated .npy header: it claims {hlen} bytes, the file has {len(head) - start}",
            path=path,
        )
    text = head[start : start + hlen].decode("utf-8" if major == 3 else "latin1", "replace")
    try:
        meta = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise TokenFileError(f"malformed .npy header {text.strip()!r:.120}", path=path) from None
    if not isinstance(meta, dict) or not {"descr", "fortran_order", "shape"} <= meta.keys():
        raise TokenFileError(
            f".npy header must be a dict with descr, fortran_order and shape, got {meta!r:.120}",
            path=path,
        )
    shape = meta["shape"]
    if not isinstance(shape, tuple) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise TokenFileError(f"malformed .npy shape {shape!r}", path=path)
    if len(shape) != 1:
        raise TokenFileError(
            f"token arrays must be 1-D, this one has shape {shape} (flatten it when saving)",
            path=path,
        )
    if meta["fortran_order"] is not False:
        # A 1-D array has the same bytes either way, but numpy never writes one with
        # fortran_order=True: such a header comes from another writer, so we refuse
        # it rather than guess what it meant.
        raise TokenFileError("fortran_order=True arrays are not supported", path=path)
    descr = meta["descr"]
    if not isinstance(descr, str):
        raise TokenFileError(f"unsupported .npy dtype {descr!r} (a structured dtype)", path=path)
    try:
        dtype = check_dtype(descr, where=path)
    except (TypeError, ValueError) as exc:
        raise TokenFileError(str(exc).removeprefix(f"{path}: "), path=path) from None
    return dtype, start + hlen, shape[0]


def _describe_one(path: str, dtype: np.dtype[Any] | None) -> TokenFile:
    try:
        fd = open_regular(path)
    except OSError as exc:
        raise TokenFileError(f"cannot open token shard: {exc.strerror}", path=path) from None
    with open(fd, "rb", buffering=0) as f:
        size = os.fstat(fd).st_size
        if not path.endswith(".npy"):
            return _raw_file(path, size, dtype)
        head = f.read(12)
        # Version 1 gives the header length in 2 bytes at offset 8, later ones in 4.
        need = 10 if head[6:7] == b"\x01" else 12
        if head.startswith(_NPY_MAGIC) and len(head) >= need:
            hlen = struct.unpack_from("<H" if need == 10 else "<I", head, 8)[0]
            if hlen > _NPY_HEADER_MAX:
                raise TokenFileError(f".npy header of {hlen} bytes is too large", path=path)
            head += f.read(hlen)
        file_dtype, offset, n = parse_npy_header(head, path=path)
        if dtype is not None and dtype != file_dtype:
            raise TokenFileError(
                f"holds {file_dtype.name} tokens but dtype={dtype.name} was given", path=path
            )
        if offset + n * file_dtype.itemsize > size:
            raise TokenFileError(
                f"truncated: the header promises {n} tokens ({n * file_dtype.itemsize} bytes "
                f"after byte {offset}) but the file has {size} bytes",
                path=path,
            )
    return TokenFile(path, file_dtype, offset, n)


def _raw_file(path: str, size: int, dtype: np.dtype[Any] | None) -> TokenFile:
    if dtype is None:
        raise ValueError(
            f"dtype is required for raw token files (like {path!r}): pass dtype='uint16' or "
            "'uint32'"
        )
    if size % dtype.itemsize:
        raise TokenFileError(
            f"size {size} is not a multiple of the {dtype.name} item size {dtype.itemsize}",
            path=path,
        )
    return TokenFile(path, dtype, 0, size // dtype.itemsize)


def describe_shards(paths: Iterable[str], dtype: Any = None) -> list[TokenFile]:
    """Describe every shard in ``paths`` (in the given order) from its size and header.

    Args:
        paths: Token files; ``.npy`` files are recognised by their suffix.
        dtype: The dtype of raw files (required when there is one); for ``.npy``
            files, if given, it must match the header.

    Raises:
        TokenFileError: a file is missing or malformed.
        ValueError: raw files without ``dtype``, or an unsupported ``dtype``.
    """
    dt = check_dtype(dtype, where="dtype") if dtype is not None else None
    return [_describe_one(os.fspath(p), dt) for p in paths]
