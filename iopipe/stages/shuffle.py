"""ShuffleBuffer: a bounded shuffle for streams that cannot be indexed (iterables, filters).

Holds up to ``size`` elements; once full, each new element takes the place of
one drawn at random, which goes out; at the end of the epoch the rest go out
in a random order.  Draws come from an RNG seeded by ``(seed, epoch)``, so an
epoch's order is the same every time it runs on the same input.

Resume replays: a buffer's contents at a checkpoint depend on everything
before it, so the runtime starts the epoch's source from its beginning and this
stage drops the ``skip`` elements the consumer already had
(:meth:`begin_epoch`).  Exact, at the cost of reading that part again.
``state_dict()["consumed"]`` counts this stage's outputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..runtime.channels import END, Group
from ..runtime.errors import StageError
from .base import OutQueue, Stage
from .pump import drain

__all__ = ["MAX_BUFFER", "ShuffleBuffer"]

#: The largest buffer (elements).
MAX_BUFFER = 10_000_000


class ShuffleBuffer(Stage):
    """Shuffle a stream within a window of ``size`` elements (see the module)."""

    kind = "shuffle"
    replays = True
    one_to_one = False  # outputs are other items than the inputs of the same group

    def __init__(self, size: int, *, seed: int = 0, name: str | None = None) -> None:
        super().__init__(name=name, concurrency=1)
        if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= MAX_BUFFER:
            raise ValueError(
                f"shuffle buffer size must be an int in [1, {MAX_BUFFER}], got {size!r}"
            )
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"shuffle seed must be an int >= 0, got {seed!r}")
        self.size = size
        self.seed = seed
        self._epoch = 0
        self._skip = 0

    def config(self) -> dict[str, Any]:
        return {"size": self.size, "seed": self.seed}

    def window(self) -> int:
        return 1 + -(-self.size // max(1, getattr(self, "unit", 1)))

    def begin_epoch(self, epoch: int, skip: int) -> None:
        self._epoch, self._skip = epoch, skip

    async def run(self, inq: Any, outq: OutQueue) -> None:
        rng = np.random.Generator(np.random.PCG64([self.seed, self._epoch]))
        out = _Out(outq, max(1, getattr(self, "unit", 64)), self._skip, self)
        buf: list[tuple[Any, Any]] = []
        async for group in drain(inq, self.counters):
            if group.hits or group.batched:
                raise StageError(
                    self.name, None, TypeError("shuffle() goes before batch() and cache()")
                )
            for pair in zip(group.items, group.keys, strict=True):
                if len(buf) < self.size:
                    buf.append(pair)
                    continue
                j = int(rng.integers(self.size))
                await out.put(buf[j])
                buf[j] = pair
        for j in rng.permutation(len(buf)).tolist():
            await out.put(buf[j])
        await out.flush()
        await outq.put(END)


class _Out:
    """Collects outputs into groups of ``unit``, dropping the first ``skip`` (a resume)."""

    def __init__(self, outq: OutQueue, unit: int, skip: int, stage: Stage) -> None:
        self.outq, self.unit, self.skip, self.stage = outq, unit, skip, stage
        self.items: list[Any] = []
        self.keys: list[Any] = []

    async def put(self, pair: tuple[Any, Any]) -> None:
        if self.skip:
            self.skip -= 1
            return
        self.items.append(pair[0])
        self.keys.append(pair[1])
        if len(self.items) >= self.unit:
            await self.flush()

    async def flush(self) -> None:
        if self.items:
            self.stage.counters.items += len(self.items)
            await self.outq.put(Group(self.items, self.keys))
            self.items, self.keys = [], []
