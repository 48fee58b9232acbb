"""Sharded safetensors checkpoints: fast loading into memory or into a model, and saving."""

from .api import iter_checkpoint, load_checkpoint
from .header import CheckpointError
from .into import LoadResult, load_into
from .save import save_checkpoint

__all__ = [
    "CheckpointError",
    "LoadResult",
    "iter_checkpoint",
    "load_checkpoint",
    "load_into",
    "save_checkpoint",
]
