"""Sharded safetensors checkpoints: fast loading into memory or into a model."""

from .header import CheckpointError
from .into import LoadResult, load_into
from .load import iter_checkpoint, load_checkpoint

__all__ = ["CheckpointError", "LoadResult", "iter_checkpoint", "load_checkpoint", "load_into"]
