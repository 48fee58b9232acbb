"""Prefetcher: keep up to N finished items ready ahead of the consumer."""

from __future__ import annotations

from typing import Any

from .base import OutQueue, Stage
from .pump import drain

__all__ = ["Prefetcher"]


class Prefetcher(Stage):
    """Forward groups unchanged through an output queue that holds ``n`` items.

    The producer side keeps working until ``n`` items wait here, so bursts of
    slow items upstream do not reach the consumer.
    """

    kind = "prefetch"
    knob = "prefetch"

    def __init__(self, n: int, *, name: str | None = None) -> None:
        super().__init__(name=name, concurrency=1)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"prefetch size must be an int >= 1, got {n!r}")
        self.n = n
        self.capacity = n

    def config(self) -> dict[str, Any]:
        return {"n": self.n}

    def window(self) -> int:
        return 1

    def ready_depth(self, weight: int) -> int | None:
        return self.n * weight

    async def run(self, inq: Any, outq: OutQueue) -> None:
        async for group in drain(inq, self.counters):
            self.counters.items += len(group.items)
            await outq.put(group)
        from ..runtime.channels import END

        await outq.put(END)
