"""WebDataset-compatible tar shards: writing, indexing, and reading them as a pipeline."""

from .pipe import pack_folder
from .tar import ShardError, write_shards

__all__ = ["ShardError", "pack_folder", "write_shards"]
