"""CPU seconds and peak memory of this process and its descendants, read from /proc.

Why not psutil for the sampling: on this machine ``psutil.Process.memory_full_info()`` costs
~3.8 ms per call and ``children(recursive=True)`` ~1.5 ms of CPU (it scans all of /proc); at one
sample per 50 ms over three processes that would take ~25% of one of the two cores away from
the system being measured. Reading ``/proc/PID/statm`` costs ~20 us and
``/proc/PID/task/*/children`` ~50 us, so RSS is sampled every interval, while PSS (reading
``smaps_rollup`` walks the page tables: ~2.7 ms for a 230 MB process) is sampled only when the
tree's RSS reaches a new high or every ``pss_every_s``, and once more at the end. The tree's
PSS total only grows with its RSS (pages shared inside the tree are split, not added, when a
worker exits), so sampling at RSS highs finds its peak.

The sampler thread's own CPU time is measured and left out of the tree's CPU seconds.
"""

from __future__ import annotations

import os
import threading
import time

_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICK = os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """Return the pids of all live descendants of ``pid`` (children first)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tids = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            out.extend(kids)
            todo.extend(kids)
    return out


def rss_bytes(pid: int) -> int:
    """Return the resident set size of ``pid`` in bytes (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def pss_bytes(pid: int) -> tuple[int, int]:
    """Return the proportional set size of ``pid`` in bytes: (all, anonymous + shmem).

    The second excludes file-backed pages (mostly shared libraries such as libtorch), whose
    share depends on how many other processes on the machine map the same files. Both are 0
    when the process is gone.
    """
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            data = f.read()
    except OSError:
        return 0, 0
    total = anon = 0
    for line in data.splitlines():
        if line.startswith(b"Pss:"):
            total = int(line.split()[1]) * 1024
        elif line.startswith((b"Pss_Anon:", b"Pss_Shmem:")):
            anon += int(line.split()[1]) * 1024
    return total, anon


def _cpu_ticks(pid: int) -> int:
    """Return utime+stime+cutime+cstime of a live ``pid`` in clock ticks (0 when gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return 0
    fields = data[data.rindex(b")") + 2 :].split()
    return sum(int(x) for x in fields[11:15])


def tree_cpu_s() -> float:
    """Return CPU seconds used so far by this process, its reaped and its live descendants."""
    t = os.times()
    own = t.user + t.system + t.children_user + t.children_system
    return own + sum(_cpu_ticks(p) for p in descendants(os.getpid())) / _TICK


class TreeSampler:
    """Samples the peak RSS and PSS (all, and anonymous) of this process tree in a thread.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. ``stop`` takes a last
    sample, so a short run still gets one.
    """

    def __init__(self, *, interval_s: float = 0.05, pss_every_s: float = 0.5) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
        self.interval_s = interval_s
        self.pss_every_s = pss_every_s
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_pss_anon = 0
        self.samples = 0
        self.pss_samples = 0
        self.cpu_s = 0.0
        self._pss_at_rss = 0
        self._last_pss = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def start(self) -> TreeSampler:
        """Start sampling; returns ``self``."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling and take a final sample (PSS included)."""
        self._stop.set()
        self._thread.join(timeout=10.0)
        t0 = time.thread_time()
        self.sample(force_pss=True)
        self.cpu_s += time.thread_time() - t0

    def __enter__(self) -> TreeSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def sample(self, *, force_pss: bool = False) -> None:
        """Take one sample of the tree's RSS, and of its PSS when due."""
        pids = [os.getpid(), *descendants(os.getpid())]
        rss = sum(rss_bytes(p) for p in pids)
        self.samples += 1
        self.peak_rss = max(self.peak_rss, rss)
        now = time.monotonic()
        due = rss > self._pss_at_rss + (1 << 20) or now - self._last_pss >= self.pss_every_s
        if force_pss or due:
            pss = [pss_bytes(p) for p in pids]
            self.peak_pss = max(self.peak_pss, sum(t for t, _ in pss))
            self.peak_pss_anon = max(self.peak_pss_anon, sum(a for _, a in pss))
            self.pss_samples += 1
            self._pss_at_rss = max(self._pss_at_rss, rss)
            self._last_pss = now

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)
        self.cpu_s += time.thread_time()
