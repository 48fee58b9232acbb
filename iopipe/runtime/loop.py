"""The background event-loop thread.

Each :class:`~iopipe.Pipeline` owns one :class:`LoopThread` (see docs/design.md for
why not one per process).  The thread is named ``iopipe-loop`` and runs uvloop
when it is importable, asyncio's default loop otherwise.  The consumer thread
talks to it only through :meth:`LoopThread.submit` and ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["LoopThread", "new_event_loop"]

T = TypeVar("T")

_JOIN_TIMEOUT_S = 10.0

# Imported with iopipe rather than at the first epoch (5 ms of its time to first
# batch); new_event_loop() imports it again, from the module cache.
try:
    import uvloop  # noqa: F401
except ImportError:  # pragma: no cover - uvloop is a dependency; asyncio's loop works
    pass


def new_event_loop(use_uvloop: bool | None = None) -> asyncio.AbstractEventLoop:
    """Return a new event loop: uvloop's when importable (or asked for), else asyncio's.

    Args:
        use_uvloop: ``True`` requires uvloop, ``False`` forbids it, ``None`` uses it
            when it can be imported.

    Raises:
        ImportError: ``use_uvloop=True`` and uvloop is not installed.
    """
    if use_uvloop is not False:
        try:
            import uvloop
        except ImportError:
            if use_uvloop:
                raise
        else:
            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
            return loop
    return asyncio.new_event_loop()


class LoopThread:
    """An event loop running forever in a daemon thread until :meth:`stop`.

    Thread-safety: :meth:`submit`, :meth:`call_soon` and :meth:`stop` may be called
    from any thread; everything else about the loop belongs to the loop thread.
    """

    def __init__(self, name: str = "iopipe-loop", use_uvloop: bool | None = None) -> None:
        self.loop = new_event_loop(use_uvloop)
        self._ready = threading.Event()
        # The thread's target must not reference the owning Pipeline, or the
        # Pipeline could never be garbage-collected while the loop runs.
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        if not self._ready.wait(_JOIN_TIMEOUT_S):  # pragma: no cover - defensive
            raise RuntimeError("iopipe: the event-loop thread did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        try:
            self.loop.run_forever()
        finally:
            try:
                self._cancel_leftovers()
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            finally:
                self.loop.close()

    def _cancel_leftovers(self) -> None:
        tasks = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))

    @property
    def alive(self) -> bool:
        """Whether the loop thread is still running."""
        return self._thread.is_alive() and not self.loop.is_closed()

    @property
    def in_loop_thread(self) -> bool:
        """Whether the caller is the loop thread itself."""
        return threading.current_thread() is self._thread

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop; return a thread-safe future of its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop thread soon; a no-op once the loop is closed."""
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop closed: nothing left to notify
            pass

    def stop(self, timeout: float = _JOIN_TIMEOUT_S) -> None:
        """Cancel what runs on the loop, stop it and join the thread (bounded by ``timeout``).

        Safe to call more than once and from a finalizer.  Called from the loop
        thread itself it only schedules the stop.
        """
        if not self._thread.is_alive():
            return
        self.call_soon(self.loop.stop)
        if not self.in_loop_thread:
            self._thread.join(timeout)
