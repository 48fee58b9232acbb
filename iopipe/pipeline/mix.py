"""``Pipeline.mix``: elements drawn from several pipelines by weight, deterministic and resumable.

:class:`Mix` is the source of the mixed pipeline: an iterable whose
``for_epoch(e)`` (called by the source for each epoch) starts epoch ``e`` of
every member and draws, element by element, which member gives the next one:
with probability proportional to its weight among the members not yet
exhausted, from an RNG seeded by ``(seed, e)``.  The epoch ends when every
member is exhausted (``stop="all"``) or at the first that is (``"first"``).

The draw sequence depends only on ``(seed, e)``, the weights of epoch ``e``
and the members' lengths, so a resume (the source skips the elements already
consumed) replays it exactly: correct, at the cost of reading those elements
again.  ``weights`` may be a function of the epoch number, so that the mixture
changes between epochs and a resume still sees the weights of its own epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

__all__ = ["Mix"]

STOPS = ("all", "first")


def _check_weights(weights: Sequence[float], n: int) -> list[float]:
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"mix: {n} pipelines but {len(w)} weights")
    if any(not math.isfinite(x) or x < 0 for x in w) or not any(x > 0 for x in w):
        raise ValueError(f"mix: weights must be finite, >= 0 and not all 0, got {w}")
    return w


class Mix:
    """The elements of ``pipes``, each drawn from a member chosen by weight (see the module)."""

    def __init__(
        self,
        pipes: Sequence[Any],
        weights: Sequence[float] | Callable[[int], Sequence[float]],
        *,
        seed: int = 0,
        stop: str = "all",
    ) -> None:
        if len(pipes) < 1:
            raise ValueError("mix: needs at least one pipeline")
        if len({id(p) for p in pipes}) != len(pipes):
            raise ValueError(
                "mix: a pipeline appears twice (one pipeline runs one epoch at a time)"
            )
        if stop not in STOPS:
            raise ValueError(f"mix: stop must be one of {STOPS}, got {stop!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"mix: seed must be an int >= 0, got {seed!r}")
        if not callable(weights):
            _check_weights(weights, len(pipes))
        self.pipes = list(pipes)
        self.weights = weights
        self.seed = seed
        self.stop = stop

    def weights_for(self, epoch: int) -> list[float]:
        """The members' weights in ``epoch``."""
        w = self.weights(epoch) if callable(self.weights) else self.weights
        return _check_weights(w, len(self.pipes))

    def __iter__(self) -> Iterator[Any]:
        return self.for_epoch(0)

    def for_epoch(self, epoch: int) -> Iterator[Any]:
        """Epoch ``epoch`` of the mixture (the same sequence every time it is asked for)."""
        weights = np.asarray(self.weights_for(epoch))
        rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
        its: list[Iterator[Any] | None] = []
        try:
            for p in self.pipes:
                p.set_epoch(epoch)
                its.append(iter(p))
            live = weights > 0
            while live.any():
                w = np.where(live, weights, 0.0)
                k = int(rng.choice(len(w), p=w / w.sum()))
                it = its[k]
                assert it is not None
                try:
                    x = next(it)
                except StopIteration:
                    if self.stop == "first":
                        return
                    live[k] = False
                    its[k] = None
                    continue
                yield x
        finally:
            for p in self.pipes:
                p.stop_epoch()
