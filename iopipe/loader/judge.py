"""How many helper threads pay for a DataLoader's helped loads (``helped.py``): :class:`HelpJudge`."""

from __future__ import annotations

__all__ = ["HELP_AWAY_S", "HelpJudge"]

#: The consumer must stay away from ``next()`` this long (EWMA over batches)
#: before the helper is woken: below it, the wake-up costs more than it saves.
HELP_AWAY_S = 0.0005


class HelpJudge:
    """Decides how many helpers run ahead: only as many as were measured to pay.

    Help pays when it overlaps loads with what the loop does away from
    ``next()`` (a GPU step that leaves the GIL and a core free) or with each
    other (reads that wait on storage); it costs when everything is Python
    under the GIL on a busy machine (helpers then only contend, and hold
    batches in memory).  Nothing observable tells these apart, so the judge
    measures: it runs each setting in ``order`` (from all helpers down,
    stopping at the first setting 10% slower than one already tried) for
    ``window`` batches and at least ``min_window_s``, compares the time per
    batch (from one ``next()`` to the next), keeps the fewest helpers within 3%
    of the fastest, and holds that ``hold`` times as long as the measuring took
    (twice as long again each time the same verdict comes back, up to 8x), so
    measuring costs a few percent of the time at most; then it measures again.  With ``gate_away`` (``num_workers=0``) nothing helps
    while the loop comes back to ``next()`` within :data:`HELP_AWAY_S` (the
    wake-up would cost more).  Pure: fed ``step(away, now)`` at each ``next()``.
    """

    __slots__ = (
        "_away",
        "_hold_until",
        "_i",
        "_n",
        "_start",
        "_streak",
        "_times",
        "_trial_t0",
        "best",
        "gate_away",
        "hold",
        "min_window_s",
        "order",
        "window",
    )

    def __init__(
        self,
        helpers: int = 1,
        *,
        gate_away: bool = True,
        window: int = 8,
        hold: int = 16,
        min_window_s: float = 0.02,
    ) -> None:
        self.window, self.hold, self.gate_away = window, hold, gate_away
        self.min_window_s = min_window_s
        # Off first where help must be earned; else all of them first (cold reads need them).
        self.order = list(range(helpers + 1)) if gate_away else list(range(helpers, -1, -1))
        self._away = 0.0  # EWMA of the time away from next()
        self._i = 0  # the setting being measured: order[_i]; len(order): holding `best`
        self._n = 0  # batches into the current setting (or the hold)
        self._start = 0.0  # when the setting's measured part began
        self._times: dict[int, float] = {}  # helpers -> seconds per batch
        self.best = 0  # the verdict the hold keeps
        self._trial_t0 = 0.0  # when the measuring began
        self._hold_until = 0.0  # when the hold ends
        self._streak = 0  # verdicts in a row that were the same

    @property
    def helping(self) -> bool:
        """Whether the verdict held now lets any helper run."""
        return self.best > 0

    def step(self, away: float, now: float) -> int:
        """The loop came back after ``away`` s at ``now``: helpers allowed for the next batches."""
        self._away = 0.7 * self._away + 0.3 * away
        if self.gate_away and self._away <= HELP_AWAY_S:
            self._i = self._n = 0  # nothing to overlap: measure afresh once there is
            self._times.clear()
            return 0
        self._n += 1
        if self._i == len(self.order):  # holding
            if now < self._hold_until:
                return self.best
            self._i = self._n = 0  # measure again: the loop may have changed
            self._times.clear()
            return self.order[0]
        if self._n == 1:
            self._start = now  # the setting's first batch was asked for under the last one
            if self._i == 0:
                self._trial_t0 = now
        elif self._n > self.window and now - self._start >= self.min_window_s:
            per = (now - self._start) / (self._n - 1)
            fastest = min(self._times.values(), default=per)
            self._times[self.order[self._i]] = per
            self._i, self._n = self._i + 1, 0
            if per > 1.1 * fastest:  # worse than one already tried: the rest in order are too
                self._i = len(self.order)
            if self._i == len(self.order):
                self._decide(now)
                return self.best
        return self.order[self._i]

    def _decide(self, now: float) -> None:
        fastest = min(self._times.values())
        best = min(k for k, t in self._times.items() if t <= 1.03 * fastest or t == fastest)
        self._streak = self._streak + 1 if best == self.best else 0
        self.best = best
        self._hold_until = now + self.hold * (now - self._trial_t0) * 2 ** min(self._streak, 3)

    def new_run(self) -> None:
        """An epoch starts: a window part-way through would span the pause between epochs."""
        if self._i < len(self.order):
            self._n = 0
