"""A parent killed by SIGKILL or SIGTERM leaves no process behind.

``map(executor="process")`` runs a process pool whose workers are children of
the forkserver, not of the pipeline's process: nothing told them their
parent had gone (the workers, the forkserver and the resource tracker were
all alive 60 s later).  Each worker now watches its parent and exits with it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

_CHILD = """
import time
from iopipe import Pipeline

def slow(x):
    time.sleep(0.05)
    return x

if __name__ == "__main__":
    pipe = Pipeline.from_iterable(range(10**6), group_size=1).map(
        slow, executor="process", concurrency=2
    )
    it = iter(pipe)
    next(it)
    next(it)
    print("ready", flush=True)
    for _ in it:
        pass
"""


def _session(sid: int) -> list[int]:
    """Live processes of session ``sid`` (zombies left out)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            text = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[3]) == sid:
            out.append(int(name))
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_process_pool_workers_exit_with_their_parent(tmp_path: Path, sig: int) -> None:
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # the session id finds every descendant
        cwd=tmp_path,
        env=env,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        assert len(_session(proc.pid)) >= 3  # the parent, two workers, the forkserver
        os.kill(proc.pid, sig)
        proc.wait(30)
        deadline = time.monotonic() + 20
        while _session(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _session(proc.pid) == []
    finally:
        for pid in _session(proc.pid):
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
