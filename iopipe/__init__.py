"""iopipe: keep accelerators fed.

The public API is exactly what this module exports; every subpackage is internal.
Layers, each built only on the ones above it in this list:

- ``io/``        bounded opens of regular files, exact reads, listing (no engine)
- ``runtime/``   errors, the loop thread, channels and the one thread hand-off,
                 worker threads, the capacity limiter (loop and thread faces), the byte
                 budget, the failure policy, counters, watchdog
- ``control/``   pure controllers with injected clocks: hill-climbing, governors
- ``stages/``    one operator per module over the runtime's job pump
- ``shards/``    WebDataset tar shards: writing, member indexes, samples as byte ranges
- ``pipeline/``  the builder (``Pipeline``), its frozen spec and planner, the runtime
                 that opens a plan, epochs, config files and trust
- ``observe/``   the bottleneck verdict and periodic stats reports
- ``loader/``    ``DataLoader``: torch's signature and semantics on the pipeline
- ``tokens/``, ``checkpoint/``  LLM workloads: token shards, safetensors checkpoints
- ``probe/``     the ``iopipe`` command (``probe``, ``run``)
"""

from .checkpoint import (
    CheckpointError,
    LoadResult,
    iter_checkpoint,
    load_checkpoint,
    load_into,
    save_checkpoint,
)
from .loader.loader import DataLoader
from .observe.verdict import Verdict, bottleneck
from .pipeline.builder import Pipeline
from .pipeline.config import ConfigError
from .runtime.errors import IopipeError, PipelineClosedError, StageError, TooManyFailures
from .runtime.stats import PipelineStats, StageStats
from .shards import ShardError, write_shards
from .tokens import TokenFile, TokenFileError, TokenShards

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataLoader",
    "IopipeError",
    "LoadResult",
    "Pipeline",
    "PipelineClosedError",
    "PipelineStats",
    "ShardError",
    "StageError",
    "StageStats",
    "TokenFile",
    "TokenFileError",
    "TokenShards",
    "TooManyFailures",
    "Verdict",
    "bottleneck",
    "iter_checkpoint",
    "load_checkpoint",
    "load_into",
    "save_checkpoint",
    "write_shards",
]
