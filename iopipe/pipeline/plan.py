"""The planner: what a :class:`~.spec.PipelineSpec` runs as, decided before anything opens.

:func:`plan` is a pure function of the spec (it opens nothing): fresh copies of
the source and stages, inactive stages left out, the byte bound given to the
stage that declares it gates bytes, the failure policy given to every stage
under ``on_error="skip"``, the autotuner's bounds for ``"auto"`` settings (the
runtime starts the tuner once the stages are open), and whether
the runtime may fuse (stages/fused.py rewrites the opened stages into fused
units; never under ``"skip"``, where failures are dropped stage by stage).
"""

from __future__ import annotations

import dataclasses

from ..runtime.policy import FailurePolicy
from ..stages.base import Stage
from ..stages.source import Source
from .epoch import budgeted_reader
from .spec import PipelineSpec

__all__ = ["Plan", "plan"]


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """What a runtime opens and runs: one per running pipeline."""

    source: Source
    stages: list[Stage]
    group_size: int
    use_uvloop: bool | None
    fuse: bool
    max_inflight_bytes: int | None
    policy: FailurePolicy | None
    cpu_budget: int | None
    memory_budget_bytes: int | None


def plan(spec: PipelineSpec) -> Plan:
    """Plan fresh, unopened copies of ``spec``'s source and stages under its options."""
    opts = spec.options
    stages = [s for s in (s.fresh() for s in spec.stages) if s.active]
    if opts.max_inflight_bytes is not None:
        gated = budgeted_reader(stages)
        if gated is not None:
            gated.byte_bound = opts.max_inflight_bytes  # a gated reader is never fused
    source = spec.source.unopened_copy()
    policy = _failure_policy(opts.on_error, opts.max_failures, source, stages)
    return Plan(
        source=source,
        stages=stages,
        group_size=spec.group_size,
        use_uvloop=opts.use_uvloop,
        fuse=opts.fuse and policy is None,
        max_inflight_bytes=opts.max_inflight_bytes,
        policy=policy,
        cpu_budget=opts.cpu_budget,
        memory_budget_bytes=opts.memory_budget_bytes,
    )


def _failure_policy(
    on_error: str, max_failures: int | float | None, source: Source, stages: list[Stage]
) -> FailurePolicy | None:
    """The policy of ``on_error="skip"``, given to every stage (None for ``"raise"``)."""
    if on_error != "skip":
        return None
    counters = source.counters
    policy = FailurePolicy(max_failures, lambda: counters.items)
    for s in stages:
        s.policy = policy
    return policy
