"""The byte budget's escape when the pipeline after the reader is idle (runtime/budget.py)."""

from __future__ import annotations

import asyncio

from iopipe.runtime.budget import ByteBudget


def test_one_group_passes_per_idle_sighting_not_every_waiter_at_once() -> None:
    """After one group is let through for idleness, the next needs two fresh sightings.

    Under load both waiters had seen "idle" before the first passed; the second then
    passed on its very next poll, before the first group's read had even started
    (a peak of 10 items over a 9-item bound in tests/guarantees/test_inflight_bytes.py).
    """
    sightings = 0

    def idle() -> bool:
        nonlocal sightings
        sightings += 1
        return True

    async def main() -> list[tuple[str, int]]:
        budget = ByteBudget(100, idle=idle)
        full = budget.ticket(1)
        await budget.wait_room(full, 100)  # fits: the bound is now held
        passed: list[tuple[str, int]] = []

        async def wait(name: str) -> None:
            t = budget.ticket(1)
            await budget.wait_room(t, 50)
            passed.append((name, sightings))

        await asyncio.wait_for(asyncio.gather(wait("first"), wait("second")), 10)
        assert budget.held == 200  # both passed over the bound, one after the other
        return passed

    (first, at_first), (second, at_second) = asyncio.run(main())
    assert (first, second) == ("first", "second")  # the older group first
    # The second waiter looked twice more after the first passed (it alone looks now).
    assert at_second - at_first >= 2
