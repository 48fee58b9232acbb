"""iopipe: keep accelerators fed.

Layout (everything public is re-exported here; modules with a leading underscore
are private):

- ``_pipeline``  Pipeline: the builder API and the runtime that drives stages
- ``_loop``      the background event-loop thread (uvloop when importable)
- ``_queue``     bounded queues between stages and the one thread hand-off
- ``_stats``     per-stage counters and the frozen snapshots of ``stats()``
- ``_errors``    the exception hierarchy
- ``_policy``    ``on_error="skip"`` / ``max_failures``: the failure policy
- ``_verdict``   the bottleneck verdict and periodic stats reports
- ``_config``    pipelines from config files (TOML, JSON, YAML) and back
- ``_autotune``  ``concurrency="auto"``: the hill-climbing controller
- ``_loader``    DataLoader: torch's DataLoader on the engine (``_loader_state``:
                 resume; ``_workers``: worker jobs and torch's worker processes)
- ``_probe``, ``_cli``  the ``iopipe`` command (``probe``, ``run``)
- ``stages/``    one stage per module: source, reader, prefetch, decode, batch,
                 cache, device
- ``formats/``   file formats: token shards, safetensors checkpoints
"""

from ._config import ConfigError
from ._errors import IopipeError, PipelineClosedError, StageError, TooManyFailures
from ._loader import DataLoader
from ._pipeline import Pipeline
from ._stats import PipelineStats, StageStats
from ._verdict import Verdict, bottleneck
from .formats import (
    CheckpointError,
    LoadResult,
    TokenFile,
    TokenFileError,
    TokenShards,
    iter_checkpoint,
    load_checkpoint,
    load_into,
)

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
]
