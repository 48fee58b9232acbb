"""Where a DataLoader stands: epoch plans, RNG snapshots and the resumable index stream.

Exact resume without storing sample data rests on one fact: an epoch's batches are
a pure function of the RNG states at the moment its sampler starts drawing.  So
each epoch records those states (the loader's ``generator``, any generator a
sampler carries, and torch's global RNG when a sampler may draw from it), and a
restored loader sets them back at the same point and skips the batches already
consumed.  Everything else about torch's RNG order is left to run as it does
in torch: ``iter(index_sampler)``, then the base-seed draw, then the sampler's
first draw (see ``torch/utils/data/dataloader.py``, ``_BaseDataLoaderIter``).
"""

from __future__ import annotations

import base64
import collections
import itertools
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import (
    BatchSampler,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)

__all__ = [
    "STATE_VERSION",
    "EpochPlan",
    "IndexStream",
    "RngState",
    "advance",
    "draw_base_seed",
    "make_state",
    "parse_state",
    "rng_sources",
]

STATE_VERSION = 1

#: Samplers whose order does not depend on any RNG.
_DETERMINISTIC = (SequentialSampler, BatchSampler, DistributedSampler)
#: torch samplers that draw from their ``generator``, or the global RNG when it is None.
_RANDOM = (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)


def _encode(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def _decode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def draw_base_seed(generator: torch.Generator | None) -> int:
    """Draw the base seed exactly as torch's ``_BaseDataLoaderIter.__init__`` does."""
    return int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())


def advance(state: str) -> str:
    """Return a generator state ``state`` after one base-seed draw."""
    g = torch.Generator()
    g.set_state(_decode(state))
    draw_base_seed(g)
    return _encode(g.get_state())


def _sampler_chain(sampler: Any) -> Iterator[Any]:
    seen = 0
    while sampler is not None and seen < 8:
        yield sampler
        sampler = getattr(sampler, "sampler", None)
        seen += 1


def rng_sources(
    generator: torch.Generator | None, index_sampler: Any
) -> tuple[list[torch.Generator], bool]:
    """Return the generators that decide an epoch's order, and whether the global RNG may.

    The loader's own ``generator`` comes first (it is the one the base seed is
    drawn from).  A sampler of an unknown class may draw from the global RNG, so
    it counts as using it; plain sequences (``sampler=[3, 1, 2]``) do not.
    """
    gens: list[torch.Generator] = [generator] if generator is not None else []
    uses_global = False
    for s in _sampler_chain(index_sampler):
        g = getattr(s, "generator", None)
        if isinstance(g, torch.Generator):
            if not any(g is x for x in gens):
                gens.append(g)
        elif isinstance(s, _RANDOM) or not isinstance(s, (*_DETERMINISTIC, Sequence, range)):
            uses_global = True
    return gens, uses_global


@dataclass(frozen=True)
class RngState:
    """The states of the RNGs an epoch's sampler draws from, as JSON-able strings.

    Attributes:
        generators: One base64 state per generator of :func:`rng_sources`, in order.
        global_state: torch's global (CPU) RNG state, or None when it is not needed.
    """

    generators: tuple[str, ...]
    global_state: str | None

    @classmethod
    def capture(cls, gens: Sequence[torch.Generator], use_global: bool) -> RngState:
        """Snapshot the current states of ``gens`` (and of the global RNG if ``use_global``)."""
        return cls(
            tuple(_encode(g.get_state()) for g in gens),
            _encode(torch.get_rng_state()) if use_global else None,
        )

    def apply(self, gens: Sequence[torch.Generator]) -> None:
        """Set ``gens`` (and the global RNG, when recorded) to the recorded states."""
        for g, s in zip(gens, self.generators, strict=True):
            g.set_state(_decode(s))
        if self.global_state is not None:
            torch.set_rng_state(_decode(self.global_state))

    def to_json(self) -> dict[str, Any]:
        return {"generators": list(self.generators), "global": self.global_state}

    @classmethod
    def from_json(cls, data: Any, n_generators: int) -> RngState:
        """Parse :meth:`to_json` output; raise ValueError when it does not fit this loader."""
        if not isinstance(data, dict) or not isinstance(data.get("generators"), list):
            raise ValueError(f"state['rng'] is malformed: {data!r:.120}")
        gens = data["generators"]
        glob = data.get("global")
        if len(gens) != n_generators:
            raise ValueError(
                f"state['rng'] holds {len(gens)} generator states but this DataLoader "
                f"has {n_generators} generators (generator= and samplers' generators)"
            )
        if not all(isinstance(s, str) for s in gens) or not isinstance(glob, str | None):
            raise ValueError(f"state['rng'] is malformed: {data!r:.120}")
        return cls(tuple(gens), glob)


@dataclass(eq=False)
class EpochPlan:
    """One epoch of a DataLoader: what to replay, what to skip, what was consumed.

    Shared by the loader (for ``state_dict``) and the epoch's iterator (which
    counts ``yielded``).  Touched by the consumer thread, except ``snapshot``
    which the index stream sets when the sampler starts (before ``iter()`` returns).

    Attributes:
        epoch: Epoch number (counts ``iter()`` calls, continued across a resume).
        skip: Batches of this epoch consumed before a resume; not fetched again.
        at_start: RNG states to set when the sampler starts (a resume), or None.
        snapshot: RNG states found when the sampler started (what a state records).
        yielded: Batches handed to the consumer by this epoch's iterator.
        finished: The iterator raised StopIteration.
        superseded: A newer ``iter()`` replaced this epoch's iterator.
        timed: Batches whose ``next()`` :meth:`took` saw.
        next_s: Time the consumer spent in ``next()`` for them, after the warm-up.
        first_t, last_t: When the first timed ``next()`` began and the last batch
            came (``time.perf_counter()``; 0.0 before any).
    """

    epoch: int
    skip: int = 0
    at_start: RngState | None = None
    snapshot: RngState | None = None
    yielded: int = 0
    finished: bool = False
    superseded: bool = False
    sent: collections.deque[Any] = field(default_factory=collections.deque)
    timed: int = 0
    next_s: float = 0.0
    first_t: float = 0.0
    last_t: float = 0.0

    @property
    def consumed(self) -> int:
        return self.skip + self.yielded

    def took(self, began: float, warmup: int) -> None:
        """A batch came to the consumer: its ``next()`` began at ``began``.

        The first ``warmup`` batches are counted in ``timed`` but not timed.
        """
        self.timed += 1
        if self.timed <= warmup:
            return
        now = time.perf_counter()
        if not self.first_t:
            self.first_t = began
        self.last_t = now
        self.next_s += now - began


class IndexStream:
    """The index sampler of one epoch at a time, made resumable.

    Iterating it (torch's iterator does, as it would iterate its ``batch_sampler``)
    runs the current :class:`EpochPlan`: set the RNG states to replay, record the
    states found, start the user's sampler, drop the ``skip`` batches consumed
    before a resume, then yield the rest.  The body runs on the first ``next()``,
    i.e. after torch's base-seed draw, as for a plain sampler.

    Args:
        index_sampler: The loader's ``batch_sampler`` (or ``sampler`` when
            ``batch_size=None``).
        gens, use_global: What :func:`rng_sources` found.
        record: Keep every yielded index batch in ``plan.sent`` until the consumer
            takes it (worker processes: to name the batch a worker failed on).
    """

    def __init__(
        self,
        index_sampler: Iterable[Any],
        gens: list[torch.Generator],
        use_global: bool,
        *,
        record: bool = False,
    ) -> None:
        self.index_sampler = index_sampler
        self.gens = gens
        self.use_global = use_global
        self.record = record
        self.plan = EpochPlan(0)

    def __len__(self) -> int:
        return len(self.index_sampler)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        return self._run(self.plan)

    def _run(self, plan: EpochPlan) -> Iterator[Any]:
        if plan.at_start is not None:
            plan.at_start.apply(self.gens)
        if self.gens or self.use_global:
            plan.snapshot = RngState.capture(self.gens, self.use_global)
        it = iter(self.index_sampler)
        if plan.skip:
            collections.deque(itertools.islice(it, plan.skip), maxlen=0)
        if not self.record:
            yield from it
            return
        for index in it:
            plan.sent.append(index)
            yield index


def make_state(
    epoch: int, batches: int, in_epoch: bool, rng: RngState | None, base_seed: bool
) -> dict[str, Any]:
    """A DataLoader state (what :func:`parse_state` reads back)."""
    return {
        "version": STATE_VERSION,
        "epoch": epoch,
        "batches": batches,
        "in_epoch": in_epoch,
        "base_seed": base_seed,
        "rng": None if rng is None else rng.to_json(),
    }


def parse_state(state: Any) -> tuple[int, int, bool, Any, bool]:
    """Validate a DataLoader state; return (epoch, batches, in_epoch, rng, base_seed).

    Raises:
        ValueError: ``state`` is not a state of this version of iopipe.DataLoader.
    """
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ValueError(
            f"not an iopipe.DataLoader state (version {STATE_VERSION}): {state!r:.200}"
        )
    try:
        epoch, batches = state["epoch"], state["batches"]
        in_epoch, base_seed = state["in_epoch"], state["base_seed"]
        rng = state["rng"]
    except KeyError as exc:
        raise ValueError(f"iopipe.DataLoader state lacks {exc.args[0]!r}: {state!r:.200}") from None
    for name, value in (("epoch", epoch), ("batches", batches)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"state[{name!r}] must be an int >= 0, got {value!r}")
    if not isinstance(in_epoch, bool) or not isinstance(base_seed, bool):
        raise ValueError(f"state['in_epoch'] and state['base_seed'] must be bools: {state!r:.200}")
    return epoch, batches, in_epoch, rng, base_seed
