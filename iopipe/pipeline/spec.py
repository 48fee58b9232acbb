"""A pipeline as data: its source, its stages and its options, frozen and checked once.

:class:`Options` is the one place the keyword options of :class:`~iopipe.Pipeline`
live: their names, defaults and checks (the constructor, chained pipelines,
config files read and written all go through it).  :class:`PipelineSpec` is what a
builder chain is: each chaining method returns a new spec with one more stage.
The planner (:mod:`.plan`) turns a spec into the stages a runtime runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ..runtime.watchdog import DEFAULT_STALL_WARNING_S
from ..stages.base import Stage
from ..stages.source import Source
from .options import check_options
from .shape import group_size_of

__all__ = ["Options", "PipelineSpec"]


@dataclasses.dataclass(frozen=True, slots=True)
class Options:
    """The keyword options of :class:`~iopipe.Pipeline` (documented there), checked on creation.

    The fields repeat the constructor's keywords and defaults (the public signature
    spells them out); tests/pipeline/test_spec.py holds the two, and the config
    table's keys, to the same names and values.

    Raises:
        ValueError, TypeError: an option is invalid (the message names it).
    """

    timeout: float | None = None
    handoff: int = 2
    group_size: int | None = None
    use_uvloop: bool | None = None
    stats_interval: float | None = None
    on_stats: Callable[..., Any] | None = None
    cpu_budget: int | None = None
    memory_budget_bytes: int | None = None
    on_error: str = "raise"
    max_failures: int | float | None = None
    stall_warning: float | None = DEFAULT_STALL_WARNING_S
    max_inflight_bytes: int | None = None
    fuse: bool = True

    def __post_init__(self) -> None:
        check_options(self.as_dict())

    def as_dict(self) -> dict[str, Any]:
        """Every option by name, as keyword arguments of :class:`~iopipe.Pipeline`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @staticmethod
    def defaults() -> dict[str, Any]:
        """Every option's default value, by name."""
        return {f.name: f.default for f in dataclasses.fields(Options)}


@dataclasses.dataclass(frozen=True, slots=True)
class PipelineSpec:
    """A builder chain: the source, the stages in order (unopened) and the options."""

    source: Source
    stages: tuple[Stage, ...]
    options: Options

    def then(self, stage: Stage) -> PipelineSpec:
        """This chain with ``stage`` appended, renamed ``name_1``, ``name_2``... if taken."""
        names = {s.name for s in self.stages}
        if stage.name in names:
            base, n = stage.name, 1
            while f"{base}_{n}" in names:
                n += 1
            stage.name = stage.counters.name = f"{base}_{n}"
        return dataclasses.replace(self, stages=(*self.stages, stage))

    @property
    def group_size(self) -> int:
        """Items per group: as given, else the first batch size, else 64 (docs/design.md)."""
        return group_size_of(self.options.group_size, self.stages)
