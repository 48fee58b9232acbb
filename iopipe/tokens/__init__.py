"""Token shards for LLM training: flat token files read as fixed windows."""

from .files import TokenFile, TokenFileError
from .shards import TokenShards

__all__ = ["TokenFile", "TokenFileError", "TokenShards"]
