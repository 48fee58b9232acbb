"""File formats iopipe reads fast: safetensors checkpoints and token shards."""

from __future__ import annotations

from iopipe.formats._checkpoint import iter_checkpoint, load_checkpoint
from iopipe.formats._load_into import LoadResult, load_into
from iopipe.formats._st_header import CheckpointError
from iopipe.formats._token_files import TokenFile, TokenFileError
from iopipe.formats._tokens import TokenShards

__all__ = [
    "CheckpointError",
    "LoadResult",
    "TokenFile",
    "TokenFileError",
    "TokenShards",
    "iter_checkpoint",
    "load_checkpoint",
    "load_into",
]
