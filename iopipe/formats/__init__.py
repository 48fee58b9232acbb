"""File formats iopipe reads fast: safetensors checkpoints (token shards join later)."""

from __future__ import annotations

from iopipe.formats._checkpoint import iter_checkpoint, load_checkpoint
from iopipe.formats._load_into import LoadResult, load_into
from iopipe.formats._st_header import CheckpointError

__all__ = [
    "CheckpointError",
    "LoadResult",
    "iter_checkpoint",
    "load_checkpoint",
    "load_into",
]
