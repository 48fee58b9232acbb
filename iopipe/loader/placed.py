"""Between epochs: ``"auto"``'s thread loads moved to torch's processes, or back.

:class:`PlacedEpochs` is the part of :class:`~iopipe.DataLoader` that feeds the
pure judge of :mod:`.placement` with each epoch's figures and carries out its
verdicts: the trial epoch on processes (its first batch watched, and the epoch
started again on threads, from the same RNG states, when it does not come) and
the return to threads.
"""

from __future__ import annotations

import logging
import warnings
from pickle import PickleError
from typing import TYPE_CHECKING, Any, TypeVar

from .epochs import EpochRunner
from .modes import PROBE_TIMEOUT_S, RngSnapshot
from .placement import (
    WARMUP,
    EpochFigures,
    PlaceJudge,
    TrialFailed,
    attr_ids,
    first_batch,
    usable_cores,
)
from .state import EpochPlan, RngState

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .iterator import LoaderIter

__all__ = ["PlacedEpochs"]

logger = logging.getLogger("iopipe")
_T_co = TypeVar("_T_co", covariant=True)
_JOIN_S = 10.0  # longest wait for the thread that took a trial's first batch


class PlacedEpochs(EpochRunner[_T_co]):
    """The epochs of a DataLoader, placed on threads or processes as measured."""

    _first_vars: dict[str, int] | None = None  # the dataset's attributes at the first epoch
    _trialing: bool = False  # the epoch being started is the trial on processes

    def _iter_epoch(self, reuse: LoaderIter | None = None) -> LoaderIter:
        raise NotImplementedError

    def _place(self) -> bool:
        """Feed the judge the epoch that ended; carry out its verdict.

        Returns whether the next epoch is the trial on processes.
        """
        placer, plan = self._placer, self._plan
        if placer is None:
            if not (
                self._helped and self._mode == "thread" and self._options.worker_type == "auto"
            ):
                return False
            if self.num_workers == 0 or self._policy is not None:
                return False
            placer = self._placer = PlaceJudge(usable_cores())
        if plan is None or placer.phase == "settled":
            return False
        self._end_epoch()  # the last epoch's helpers are joined before any fork
        mode = placer.after(self._figures(plan))
        if mode == "process" and not self._pristine():
            placer.phase, placer.verdict = "settled", "thread"
            placer.reason = (
                "the dataset's attributes were added or rebound while it loaded (a file, "
                "connection or pool opened lazily?): forked workers would share them, so it "
                "stays on threads"
            )
            mode = None
        if placer.phase == "settled" or mode is not None:
            logger.info("iopipe.DataLoader: %s", placer.reason)
        if mode is None:
            return False
        self._switch(mode, placer.reason)
        return mode == "process"

    def _figures(self, plan: EpochPlan) -> EpochFigures:
        run = self._helped_run if self._mode == "thread" else None
        loads = run.loads() if run is not None else (0, 0.0, 0.0)
        batches = max(0, plan.timed - WARMUP)
        return EpochFigures(self._mode, batches, plan.next_s, plan.last_t - plan.first_t, *loads)

    def _pristine(self) -> bool:
        """Whether the dataset (and a persistent workers' copy) has the attributes it started with."""
        if self._first_vars is None:
            return False
        fetch = self._helped_fetch.fn if self._helped_fetch is not None else None
        copy = getattr(fetch, "dataset", self.dataset)
        return all(attr_ids(ds) == self._first_vars for ds in (self.dataset, copy))

    def _switch(self, mode: str, reason: str, *, kill: bool = False) -> None:
        """Load on ``mode`` (``"process"``, or back to the helped ``"thread"``) from now on.

        ``kill``: terminate the worker processes (a trial that failed: they may hang).
        """
        if kill:
            self._procs.abort()
        self._procs.end_epoch()  # the source thread leaves torch's iterator
        pipe, self._pipe, self._feed, self._inner = self._pipe, None, None, None
        if pipe is not None:  # made for the other mode
            pipe.close()
        self._procs.close()
        self._helped = mode == "thread"
        self._stream.record = mode == "process"  # names the batch a worker failed on
        self._mode, self._mode_reason = mode, reason

    def _start(self, plan: EpochPlan, hand_draw: bool) -> Iterator[Any]:
        batches = super()._start(plan, hand_draw)
        if not self._trialing:
            return batches
        return first_batch(batches, PROBE_TIMEOUT_S)

    def _iter_trial(self, reuse: LoaderIter | None) -> LoaderIter:
        """The epoch on processes :meth:`_place` chose; on threads if its first batch fails."""
        rngs = RngSnapshot.take()
        gens = RngState.capture(self._gens, False)
        self._trialing = True
        try:
            with warnings.catch_warnings():
                # torch's note on a dataset that does not pickle: the trial handles it.
                warnings.filterwarnings("ignore", "Got pickle error", UserWarning)
                return self._iter_epoch(reuse)
        except (TrialFailed, OSError, RuntimeError, TypeError, AttributeError, PickleError) as exc:
            puller = exc.puller if isinstance(exc, TrialFailed) else None
            rngs.restore()
            gens.apply(self._gens)
            assert self._placer is not None
            self._placer.phase, self._placer.verdict = "settled", "thread"
            reason = f"torch's worker processes did not start: {exc}; back to threads"
            logger.info("iopipe.DataLoader: %s", reason)
            self._switch("thread", reason, kill=True)  # the trial's epoch and workers end
            if puller is not None:
                puller.join(_JOIN_S)
            return self._iter_epoch(reuse)
        finally:
            self._trialing = False
