"""The autotuner's search: a pure hill climber over integer knobs.

:class:`HillClimber` is a controller without threads or clocks: given integer
knobs and a feasibility test, it proposes a setting, is told the throughput
measured under it (:meth:`HillClimber.observe`), and proposes the next.
:class:`~iopipe.control.autotune.AutoTuner` attaches it to a running pipeline.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = ["HillClimber", "Knob"]


@dataclass(frozen=True, slots=True)
class Knob:
    """One integer setting: its name, bounds and starting value."""

    name: str
    lo: int
    hi: int
    start: int

    def __post_init__(self) -> None:
        if not self.lo <= self.start <= self.hi:
            raise ValueError(f"knob {self.name}: need lo <= start <= hi, got {self}")


class HillClimber:
    """Coordinate-wise pattern search for integer settings that maximise a measured rate.

    One knob at a time, from the accepted value ``x`` with step ``s`` (initially
    ``x``, so the first moves double): try ``x + s`` and ``x - s``; a move that
    pays is kept and a move up doubles the step; when neither pays the step
    halves, and at zero the next knob's turn comes.  Two phases:

    * **grow**: a move pays when its rate beats the best rate seen so far by
      more than ``tolerance``.  Rounds over all knobs repeat while one changes
      something (at most ``max_rounds``).  Only improvements move, so one knob
      never gives up capacity another one needs (coordinate search that trims
      too early strands itself: read lowered while decode was the bottleneck).
      A round that changes nothing ends with a joint move, every knob raised
      at once (doubled where the budget allows, else by one): two stages in
      balance both bound throughput, and no single knob can show a gain.
    * **trim**: one round in which a move down (cheaper) also pays when its rate
      stays within ``tolerance`` of the best: the climber settles on the
      cheapest setting within ``tolerance`` of the best it measured.

    Every comparison is against the best rate of the whole search, so the
    trimming losses never add up beyond ``tolerance``, and the search ends
    (the best rate only grows, by more than ``tolerance`` per move up in rate).
    Then the climber is :attr:`settled` and keeps its setting, unless the
    median rate of the last ``drift_windows`` windows moves by more than
    ``drift`` from the settled rate: the workload changed (cold data got
    warm...) and a new search starts from the current setting.  The median
    keeps a few noisy windows from restarting it.

    Measurements are noisy (other processes, page-cache luck), so the rate of
    the current setting is the mean of two windows, a trial is accepted only
    when a second window confirms the first, and the best rate is that of
    accepted settings only, never one lucky window that would make every later
    comparison too strict.

    Deterministic and clock-free: the same rates give the same settings.
    """

    def __init__(
        self,
        knobs: list[Knob],
        *,
        feasible: Callable[[Mapping[str, int]], bool] | None = None,
        tolerance: float = 0.05,
        max_rounds: int = 4,
        drift: float = 0.4,
        drift_windows: int = 5,
    ) -> None:
        if not knobs:
            raise ValueError("HillClimber needs at least one knob")
        self.knobs = knobs
        self._feasible = feasible or (lambda s: True)
        self.tolerance = tolerance
        self.max_rounds = max_rounds
        self.drift = drift
        self.drift_windows = drift_windows
        self._x = {k.name: k.start for k in knobs}  # accepted setting
        self._trial: dict[str, int] | None = None  # setting under measurement, if not _x
        self._base: float | None = None  # rate measured at _x
        self._best = 0.0  # best rate of this search
        self._pending: float | None = None  # first window of a two-window measurement
        self._step = 1
        self._dirs: list[int] = []
        self.settled = False
        self.steps = 0  # measurements taken
        self._restart()

    # -- public -----------------------------------------------------------------------
    @property
    def setting(self) -> dict[str, int]:
        """The setting to run during the next measurement window."""
        return dict(self._trial if self._trial is not None else self._x)

    @property
    def best(self) -> dict[str, int]:
        """The accepted setting (what the pipeline settles on)."""
        return dict(self._x)

    @property
    def phase(self) -> str:
        """``"grow"``, ``"trim"`` or ``"settled"``."""
        return "settled" if self.settled else self._phase

    def observe(self, rate: float) -> dict[str, int]:
        """Record ``rate`` (items/s) measured under :attr:`setting`; return the next setting."""
        self.steps += 1
        if self.settled:
            self._watch(rate)
        elif self._pending is not None:  # the second window of the same setting
            first, self._pending = self._pending, None
            self._decide(rate, first)
        else:
            self._decide(rate, None)
        return self.setting

    def _decide(self, rate: float, first: float | None) -> None:
        """Act on a window's ``rate`` (``first``: the previous window of the same setting).

        The current setting's rate is the mean of two windows.  A trial that would
        be accepted is measured again and accepted only if the second window
        passes too: one lucky window must not move the setting.
        """
        if self._trial is None:
            if first is None:
                self._pending = rate
                return
            self._base = (first + rate) / 2
            self._best = max(self._best, self._base)
            self._propose()
            return
        ok = self._passes(rate)
        if ok and first is None:
            self._pending = rate
            return
        mean = rate if first is None else (first + rate) / 2
        if self._joint:
            self._judge_joint(ok, mean)
        else:
            self._judge(ok, mean)

    def _passes(self, rate: float) -> bool:
        """Whether ``rate`` under the trial justifies moving to it."""
        assert self._trial is not None
        if rate > self._best * (1 + self.tolerance):
            return True
        if self._joint or self._phase != "trim":
            return False
        knob = self.knobs[self._k]
        down = self._trial[knob.name] < self._x[knob.name]
        return down and rate >= self._best * (1 - self.tolerance)

    # -- search -----------------------------------------------------------------------
    def _restart(self) -> None:
        self.settled = False
        self._phase = "grow"
        self._round = 0
        self._changed = False
        self._joint = False  # the trial under measurement raises every knob
        self._k = 0
        self._recent: list[float] = []  # rates since settling, for drift
        self._pending = None
        self._trial = None
        self._base = None  # measure the current setting first
        self._best = 0.0
        self._begin_knob()

    def _begin_knob(self) -> None:
        # The first round doubles and halves from the start; later rounds and
        # the trim refine around a value already searched, in quarter steps.
        x = self._x[self.knobs[self._k].name]
        first = self._phase == "grow" and self._round == 0
        self._step = max(1, x if first else x // 4)
        self._dirs = [+1, -1] if self._phase == "grow" else [-1, +1]

    def _propose(self) -> None:
        """Set ``_trial`` to the next feasible candidate, moving on when a knob is done."""
        while True:
            knob = self.knobs[self._k]
            x = self._x[knob.name]
            while self._dirs:
                cand = x + self._dirs[0] * self._step
                if knob.lo <= cand <= knob.hi:
                    trial = {**self._x, knob.name: cand}
                    if self._feasible(trial):
                        self._trial = trial
                        return
                self._dirs.pop(0)
            self._step //= 2
            if self._step >= 1:
                self._dirs = [+1, -1] if self._phase == "grow" else [-1, +1]
                continue
            if not self._next_knob():
                return

    def _next_knob(self) -> bool:
        """Move to the next knob, round or phase.

        Returns False when it stops proposing single-knob moves: settled, or a
        joint move set as the trial.
        """
        self._k += 1
        if self._k < len(self.knobs):
            self._begin_knob()
            return True
        self._k = 0
        self._round += 1
        if self._phase == "trim":
            self.settled = True
            self._trial = None
            self._recent = []
            return False
        if not self._changed and self._round < self.max_rounds and len(self.knobs) > 1:
            joint = self._joint_move()
            if joint is not None:
                self._trial, self._joint = joint, True
                return False
        if not self._changed or self._round >= self.max_rounds:
            self._phase = "trim"
        self._changed = False
        self._begin_knob()
        return True

    def _joint_move(self) -> dict[str, int] | None:
        """Every knob raised at once as far as the budget allows, or None."""
        out = dict(self._x)
        for knob in self.knobs:
            x = out[knob.name]
            for cand in (min(knob.hi, 2 * x), min(knob.hi, x + 1)):
                if cand > x and self._feasible({**out, knob.name: cand}):
                    out[knob.name] = cand
                    break
        return out if out != self._x else None

    def _judge_joint(self, ok: bool, rate: float) -> None:
        self._joint = False
        if ok:
            self._x, self._base = self._trial or self._x, rate
            self._best = max(self._best, rate)
        else:
            self._phase = "trim"  # nothing grows: trim from here
        self._trial = None
        self._changed = False
        self._begin_knob()
        self._propose()

    def _judge(self, ok: bool, rate: float) -> None:
        assert self._trial is not None
        knob = self.knobs[self._k]
        up = self._trial[knob.name] > self._x[knob.name]
        if ok:
            self._best = max(self._best, rate)
            self._x = self._trial
            self._base = rate
            self._changed = True
            if up:
                self._step *= 2
            self._dirs = [+1, -1] if up else [-1, +1]  # keep going the same way first
        else:
            self._dirs.pop(0)
        self._trial = None
        self._propose()

    def _watch(self, rate: float) -> None:
        """Restart the search when the median of the last windows left the settled rate."""
        self._recent.append(rate)
        del self._recent[: -self.drift_windows]
        base = self._base or 0.0
        full = len(self._recent) == self.drift_windows and base > 0
        if full and abs(statistics.median(self._recent) - base) > self.drift * base:
            self._restart()
