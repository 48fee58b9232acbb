"""The runtime a pipeline starts on its first ``iter()``: the loop thread and the opened stages.

:func:`build_runtime` opens what the planner (:mod:`.plan`) made of a builder chain;
:meth:`Runtime.start_epoch` starts one pass over them, whose coroutine
(:meth:`Runtime.run_epoch`) wires the queues and runs every stage on the loop
thread until END reaches the consumer.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

from ..control.autotune import AutoTuner, make_tuner
from ..runtime.channels import END, GroupQueue, Handoff
from ..runtime.errors import StageError
from ..runtime.loop import LoopThread
from ..runtime.policy import FailurePolicy
from ..stages.base import Stage
from ..stages.fused import plan as fused_plan
from ..stages.pump import leaf_errors
from .epoch import STOP_TIMEOUT_S, Epoch, budgeted_reader
from .plan import Plan, plan
from .shape import handoff_groups
from .spec import PipelineSpec

__all__ = ["Runtime", "Sink", "build_runtime"]


class Sink:
    """Adapts the hand-off to the ``put`` interface of a stage's output queue."""

    def __init__(self, handoff: Handoff, tap: Callable[[int], None] | None = None) -> None:
        self.handoff = handoff
        self.tap = tap  # the autotuner's throughput meter (iopipe/control/autotune.py)
        self.policy: FailurePolicy | None = None  # on_error="skip": checked at the end

    async def put(self, group: Any) -> None:
        """Hand ``group`` (or END, or an error's group) to the consumer."""
        if group is END:
            if self.policy is not None:  # a fraction's last check, over the whole epoch
                self.policy.check(final=True)
            self.handoff.put_end()
        else:
            await self.handoff.put(group)
            if self.tap is not None:
                self.tap(group.weight)


class Runtime:
    """What a running pipeline owns: the loop thread and the opened stages of a plan."""

    def __init__(self, plan: Plan) -> None:
        source, stages, group_size = plan.source, plan.stages, plan.group_size
        self.source = source
        self.stages = stages  # as planned: stats, errors and state speak of these
        self.group_size = group_size
        #: The ``max_inflight_bytes`` option: each epoch gets a ByteBudget of it.
        self.max_inflight_bytes = plan.max_inflight_bytes
        self.policy: FailurePolicy | None = plan.policy  # for on_error="skip"
        self.cache = next((s for s in stages if s.serves_source), None)
        self.loop = LoopThread(use_uvloop=plan.use_uvloop)
        self.closed = False
        # The process that started the threads: a child made by os.fork() inherits
        # this object but none of its threads (see shutdown and Pipeline._runtime).
        self.pid = os.getpid()
        self.latest: Epoch | None = None  # the epoch started last (start_epoch)
        source.open()
        weight = 1
        for s in stages:
            s.open(group_size if weight == 1 else 1)
            depth = s.ready_depth(weight)
            if depth is not None:
                s.capacity = depth
            if s.batch_size is not None:
                weight *= s.batch_size
        # What runs: consecutive thread stages fused where they can be (stages/fused.py);
        # a unit of the plan that is not a stage of the chain is opened over its parts.
        self.plan: list[Stage] = fused_plan(stages) if plan.fuse else list(stages)
        for s in self.plan:
            if s.parts():
                s.open(s.parts()[0].unit)
        # When a stage is "auto"; it sets their knobs, so after they are open.
        self.tuner: AutoTuner | None = make_tuner(
            stages,
            group_size=group_size,
            cpu_budget=plan.cpu_budget,
            memory_budget_bytes=plan.memory_budget_bytes,
        )

    def start_epoch(self, epoch: int, skip: int, handoff: int) -> Epoch:
        """Start epoch ``epoch`` after its first ``skip`` source items (``handoff``: groups)."""
        ep = Epoch(self, epoch, skip, handoff_groups(self.stages, self.group_size, handoff))
        self.latest = ep
        return ep

    def shutdown(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop the loop, then release every stage's workers (idempotent, any thread)."""
        if self.closed:
            return
        self.closed = True
        if self.pid != os.getpid():
            # Inherited through os.fork(): the loop, the workers and their pipes
            # belong to the parent (closing them here would stop its pipeline), and
            # locks may be held by threads that do not exist in this process.
            return
        deadline = time.monotonic() + timeout  # one bound for the whole shutdown
        self.loop.stop(timeout)
        for s in self.stages:
            s.close(max(0.0, deadline - time.monotonic()))
        for s in self.plan:
            if s.parts():
                s.close(timeout)
        self.source.close(max(0.0, deadline - time.monotonic()))

    async def run_epoch(self, ep: Epoch) -> None:
        """Run the source and every stage until END reaches the consumer (loop thread)."""
        ep.task = asyncio.current_task()
        self._reset(ep)
        sink: Any = Sink(ep.handoff, self.tuner.on_group if self.tuner is not None else None)
        sink.policy = self.policy
        ins, outs = self._wire(ep, sink)
        if self.tuner is not None:
            self.tuner.start_epoch(self.stages, ep.queues)
        first = ins[0] if self.stages else sink
        try:
            await self._run_tasks(ep, first, ins, outs)
        except BaseExceptionGroup as eg:
            error = epoch_failure(eg)
            if error is not None:
                ep.handoff.put_error(error)
        finally:
            ep.ended = time.perf_counter()

    def _reset(self, ep: Epoch) -> None:
        """Zero the counters and give the epoch's byte budget to the reader it gates."""
        self.source.counters.__init__("source", 1)  # type: ignore[misc]
        for s in self.stages:
            s.reset_counters()
            s.begin_epoch(ep.epoch, ep.skip)
        reader = budgeted_reader(self.stages)
        if reader is not None:
            reader.budget = ep.budget
        if self.policy is not None:
            self.policy.reset()

    def _wire(self, ep: Epoch, sink: Any) -> tuple[list[Any], list[Any]]:
        """The input and output queue of each unit of the plan; sets ``ep.queues``."""
        plan = self.plan
        queues: list[Any] = [GroupQueue(self._capacity(s)) for s in plan[:-1]]
        ins: list[Any] = [GroupQueue(2 * self.group_size), *queues] if plan else []
        outs: list[Any] = [*queues, ep.handoff] if plan else []
        # The output queue of the source and of each stage (None inside a fused run).
        out_of: dict[int, Any] = {}
        for unit, q in zip(plan, outs, strict=True):
            members = unit.parts() or [unit]
            for m in members:
                out_of[id(m)] = None
            out_of[id(members[-1])] = q
        ep.queues = [ins[0] if plan else ep.handoff, *(out_of[id(s)] for s in self.stages)]
        return ins, ([*queues, sink] if plan else [])

    async def _run_tasks(self, ep: Epoch, first: Any, ins: list[Any], outs: list[Any]) -> None:
        """The source's task and one per unit of the plan, until all end (or one fails)."""
        async with asyncio.TaskGroup() as tg:
            src = tg.create_task(
                self.source.produce(
                    first,
                    epoch=ep.epoch,
                    # A stage that replays drops the consumed part itself.
                    skip=0 if any(s.replays for s in self.stages) else ep.skip,
                    group_size=self.group_size,
                    cache=self.cache,
                ),
                name="source",
            )
            for stage, inq, outq in zip(self.plan, ins, outs, strict=True):
                task = tg.create_task(stage.run(inq, outq), name=stage.name)
                task.add_done_callback(ep.stage_done)
            src.add_done_callback(ep.stage_done)

    def _capacity(self, stage: Stage) -> int:
        return stage.capacity if stage.capacity is not None else 2 * self.group_size


def epoch_failure(eg: BaseExceptionGroup[Any]) -> BaseException | None:
    """What the consumer gets for an epoch's failed tasks (None: all were cancelled)."""
    errors = [
        as_stage_error(e)
        # One exception can be raised by two tasks (a job and the emitter
        # awaiting it): count each once.
        for e in {id(e): e for e in leaf_errors(eg)}.values()
        if not isinstance(e, asyncio.CancelledError)
    ]
    # Several groups of one stage can fail at once (a broken process pool fails
    # every job in flight; two batches fail to collate): the consumer gets that
    # stage's first failure, and a group only when several stages failed.
    by_stage: dict[Any, BaseException] = {}
    for e in errors:
        by_stage.setdefault(getattr(e, "stage", id(e)), e)
    errors = list(by_stage.values())
    if not errors:
        return None
    if len(errors) == 1:
        return errors[0]
    return BaseExceptionGroup("several iopipe stages failed", errors)


def as_stage_error(exc: BaseException) -> BaseException:
    """``exc`` as a StageError (one raised outside any stage names the pipeline)."""
    if isinstance(exc, StageError):
        return exc
    return StageError("pipeline", None, exc)


def build_runtime(spec: PipelineSpec) -> Runtime:
    """Plan ``spec`` (:func:`~.plan.plan`) and open the runtime that runs it."""
    return Runtime(plan(spec))
