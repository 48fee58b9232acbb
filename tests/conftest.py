"""Suite-wide fixtures: the leak check every test passes, and both event-loop implementations.

* ``_no_leaks`` (autouse): no ``iopipe-*`` thread started by a test outlives it, no
  child process it started outlives it, and it leaves no new open file descriptor.
  Threads are joined with a deadline (never slept on).  Threads and descriptors that
  other libraries keep for the life of the process (multiprocessing's forkserver and
  resource tracker) are ignored; so is anything that existed before the test.
* ``pytest_asyncio_loop_factories``: every ``async def`` test runs twice, on asyncio's
  default loop and on uvloop, so no stage depends on one loop implementation
  (pytest-asyncio >= 1.3's supported hook; the ``event_loop_policy`` override is
  deprecated there).
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import time
from collections.abc import Callable, Iterator, Mapping

import pytest

from tests._helpers import fd_table, iopipe_threads, join_threads, process_lifetime_fds

#: Longest a test's leftover threads may take to finish after it (a bound, not a sleep).
LEAK_JOIN_TIMEOUT_S = 10.0


def _loop_factories() -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
        "asyncio": asyncio.new_event_loop
    }
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a runtime dependency on Linux
        pass
    else:
        factories["uvloop"] = uvloop.new_event_loop
    return factories


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Run every async test on asyncio's loop and on uvloop (ids ``[asyncio]``, ``[uvloop]``)."""
    return _loop_factories()


@pytest.fixture(autouse=True, scope="session")
def _process_singletons() -> None:
    """Create what libraries keep for the life of the process before any test looks at fds.

    libuv opens a pipe the first time any uvloop loop is made and keeps it until exit;
    obstore starts one tokio runtime (an epoll and an eventfd) on its first request.
    """
    try:
        import obstore
        from obstore.store import MemoryStore

        async def _touch() -> None:
            store = MemoryStore()
            await obstore.put_async(store, "x", b"x")
            await obstore.get_range_async(store, "x", start=0, length=1)

        asyncio.run(_touch())
    except ImportError:  # pragma: no cover
        pass
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return
    uvloop.new_event_loop().close()


#: How long sockets of a dropped pipeline may take to close (measured: under 1 s).
SOCKET_CLOSE_S = 3.0


def _new_fds(before: dict[int, str]) -> dict[int, str]:
    now = fd_table()
    keep = process_lifetime_fds()
    return {fd: target for fd, target in now.items() if before.get(fd) != target and fd not in keep}


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    """Fail a test that leaves iopipe threads, child processes or open descriptors behind."""
    threads_before = set(iopipe_threads())
    children_before = set(multiprocessing.active_children())
    fds_before = fd_table()
    yield
    new = [t for t in iopipe_threads() if t not in threads_before]
    if new or _new_fds(fds_before):
        # A pipeline caught in a reference cycle is released by the collector: that is
        # the documented safety net, so collect before calling anything a leak.
        gc.collect()
    alive = join_threads(new, LEAK_JOIN_TIMEOUT_S)
    children = [p for p in multiprocessing.active_children() if p not in children_before]
    for p in children:
        p.join(LEAK_JOIN_TIMEOUT_S)
    children = [p for p in children if p.is_alive()]
    leaked_fds = _new_fds(fds_before)
    deadline = time.monotonic() + SOCKET_CLOSE_S
    while leaked_fds and time.monotonic() < deadline:
        if not all(t.startswith("socket:") for t in leaked_fds.values()):
            break
        # Pooled HTTP connections (obstore's, remote shards) close on their client's
        # runtime shortly after the pipeline holding them is dropped.
        time.sleep(0.05)
        leaked_fds = _new_fds(fds_before)
    problems: list[str] = []
    if alive:
        problems.append(f"threads still alive after the test: {sorted(alive)}")
    if children:
        problems.append(f"child processes still alive: {children}")
    if leaked_fds:
        problems.append(f"file descriptors left open: {leaked_fds}")
    if problems:
        pytest.fail("leak: " + "; ".join(problems), pytrace=False)


@pytest.fixture(params=[False, True], ids=["asyncio-loop", "uvloop"])
def use_uvloop(request: pytest.FixtureRequest) -> bool:
    """The ``use_uvloop`` option of a composed pipeline: both loop implementations."""
    value: bool = request.param
    if value:
        pytest.importorskip("uvloop")
    return value
