"""Tests of the background event-loop thread (iopipe/runtime/loop.py)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import pytest

from iopipe.runtime.loop import LoopThread, new_event_loop


def test_new_event_loop_picks_uvloop_when_importable() -> None:
    uvloop = pytest.importorskip("uvloop")
    for choice in (None, True):
        loop = new_event_loop(choice)
        try:
            assert isinstance(loop, uvloop.Loop)
        finally:
            loop.close()


def test_new_event_loop_without_uvloop_is_asyncios() -> None:
    loop = new_event_loop(False)
    try:
        assert type(loop).__module__.startswith("asyncio")
    finally:
        loop.close()


async def test_async_tests_run_on_both_loop_implementations(request: pytest.FixtureRequest) -> None:
    # conftest's pytest_asyncio_loop_factories parametrizes every async test.
    loop = asyncio.get_running_loop()
    kind = "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
    assert f"[{kind}]" in request.node.name


@pytest.mark.parametrize("use_uvloop", [False, True], ids=["asyncio", "uvloop"])
def test_loop_thread_runs_submitted_coroutines_on_a_named_thread(use_uvloop: bool) -> None:
    if use_uvloop:
        pytest.importorskip("uvloop")
    lt = LoopThread(use_uvloop=use_uvloop)
    try:
        assert lt.alive
        assert not lt.in_loop_thread

        async def where() -> tuple[str, bool]:
            return threading.current_thread().name, lt.in_loop_thread

        assert lt.submit(where()).result(10) == ("iopipe-loop", True)
    finally:
        lt.stop()
    assert not lt.alive


def test_call_soon_runs_on_the_loop_and_is_a_no_op_once_stopped() -> None:
    lt = LoopThread()
    ran = threading.Event()
    names: list[str] = []

    def mark() -> None:
        names.append(threading.current_thread().name)
        ran.set()

    lt.call_soon(mark)
    assert ran.wait(10)
    assert names == ["iopipe-loop"]
    lt.stop()
    lt.call_soon(mark)  # loop closed: silently nothing
    assert names == ["iopipe-loop"]


def test_stop_is_idempotent_and_joins_the_thread() -> None:
    lt = LoopThread()
    thread = lt._thread
    lt.stop()
    assert not thread.is_alive()
    assert lt.loop.is_closed()
    lt.stop()  # again: nothing to do


def test_stop_cancels_leftover_tasks_and_runs_their_cleanup() -> None:
    lt = LoopThread()
    started = threading.Event()
    cleaned = threading.Event()

    async def forever() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.set()

    fut = lt.submit(forever())
    assert started.wait(10)
    lt.stop()
    assert cleaned.is_set()
    assert fut.cancelled()


def test_stop_called_on_the_loop_thread_only_schedules_it() -> None:
    lt = LoopThread()
    thread = lt._thread

    async def stop_from_inside() -> bool:
        lt.stop()  # must not try to join itself
        return True

    assert lt.submit(stop_from_inside()).result(10)
    thread.join(10)
    assert not thread.is_alive()
    assert not lt.alive


def test_async_generators_are_finalised_on_stop() -> None:
    lt = LoopThread()
    closed = threading.Event()
    first = threading.Event()

    async def agen() -> AsyncIterator[int]:
        try:
            yield 1
            first.set()
            await asyncio.Event().wait()
            yield 2
        finally:
            closed.set()

    async def consume() -> None:
        async for _ in agen():
            pass

    lt.submit(consume())
    assert first.wait(10)
    lt.stop()
    assert closed.is_set()
