"""Fault injection (issue 7): what breaks mid-epoch must surface as an error, never a hang.

Each case runs against :class:`iopipe.Pipeline` and :class:`iopipe.DataLoader` where
it applies (``api`` parameter): a function or ``__getitem__`` raising on chosen
items, files changing under the reader after listing, a worker process killed with
SIGKILL, an exception in the training loop's body, SIGINT, the interpreter exiting
mid-epoch, ``os.fork()`` after a pipeline ran, and two threads iterating their own
pipelines at once.  The ``on_error="skip"`` cases and jobs that never return are
tested with their features (the failure policy's and the watchdog's test files).

What tests/guarantees/test_lifecycle.py already proves for a Pipeline (break, close, SIGINT and
interpreter exit of a Pipeline script) is referenced, not repeated: here the same
cases run for the DataLoader.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import Dataset

from iopipe import DataLoader, Pipeline, StageError
from tests._helpers import check_error_propagation, consume, make_files
from tests.guarantees.test_lifecycle import finish, run_child, wait_for_line

BAD = 9  # the item (or index) that fails


# -- functions and datasets that fail (module level: they pickle for worker processes) --


def fail_on_bad(x: int) -> int:
    if x == BAD:
        raise ValueError(f"cannot decode item {x}")
    return x


async def afail_on_bad(x: int) -> int:
    return fail_on_bad(x)


class Faulty(Dataset[int]):
    """``dataset[BAD]`` raises KeyError."""

    def __len__(self) -> int:
        return 20

    def __getitem__(self, i: int) -> int:
        if i == BAD:
            raise KeyError(f"no sample {i}")
        return i


def _first_time(mark: str) -> bool:
    """True exactly once per marker file, across processes (O_EXCL)."""
    try:
        fd = os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def die_once(item: tuple[int, str]) -> int:
    """Kill the worker process running it with SIGKILL, the first time it sees BAD."""
    x, mark = item
    if x == BAD and _first_time(mark):
        os.kill(os.getpid(), signal.SIGKILL)
    return x


class DiesOnce(Dataset[int]):
    """A dataset whose worker process is SIGKILLed at index BAD, the first time only."""

    def __init__(self, mark: str) -> None:
        self.mark = mark

    def __len__(self) -> int:
        return 20

    def __getitem__(self, i: int) -> int:
        return die_once((i, self.mark))


class FileBytes(Dataset[bytes]):
    """A dataset reading whole files by path, as a user's __getitem__ would."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> bytes:
        with open(self.paths[i], "rb") as f:
            return f.read()


# -- a function / __getitem__ raising on chosen items --------------------------------------


@pytest.mark.parametrize("executor", ["thread", "process", "async", "inline"])
def test_pipeline_map_raising_names_stage_and_item(executor: str) -> None:
    fn = afail_on_bad if executor == "async" else fail_on_bad

    def make() -> Pipeline[Any]:
        return Pipeline.from_iterable(range(20), group_size=4).map(
            fn, executor=executor, concurrency=2
        )

    err = check_error_propagation(
        make,
        stage="map",
        item=BAD,
        cause=ValueError,
        match="cannot decode item 9",
        prefix_of=list(range(20)),
    )
    assert str(err) == "stage 'map' failed on item 9: ValueError: cannot decode item 9"


def test_pipeline_state_after_an_error_is_sane() -> None:
    with Pipeline.from_iterable(range(20), group_size=4).map(fail_on_bad) as pipe:
        got, err = consume(pipe)
        assert isinstance(err, StageError)
        assert got == list(range(len(got)))  # some groups before the failing one, in order
        assert len(got) <= 8
        assert pipe.state_dict() == {"epoch": 0, "consumed": len(got)}
        # Resume after the bad item: the rest of the epoch is whole.
        pipe.load_state_dict({"epoch": 0, "consumed": BAD + 1})
        assert list(pipe) == list(range(BAD + 1, 20))
        assert pipe.state_dict() == {"epoch": 1, "consumed": 0}


@pytest.mark.parametrize(
    ("worker_type", "workers"), [("thread", 0), ("thread", 2), ("main", 0), ("process", 2)]
)
def test_loader_getitem_raising_names_the_index(worker_type: str, workers: int) -> None:
    # More of this (torch's exact semantics) in tests/loader/test_loader.py.
    with DataLoader(Faulty(), batch_size=4, num_workers=workers, worker_type=worker_type) as dl:
        it = iter(dl)
        assert [next(it).tolist() for _ in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
        with pytest.raises(KeyError, match="9") as info:
            next(it)
        notes = "\n".join(info.value.__notes__)
        assert "batch 2" in notes
        assert "[8, 9, 10, 11]" in notes
        # Iteration goes on after the failed batch, as with torch; then a new epoch runs.
        assert [b.tolist() for b in it] == [[12, 13, 14, 15], [16, 17, 18, 19]]
        assert dl.state_dict()["epoch"] == 1
        assert len([b for b in consume_loader(dl) if b != "KeyError"]) == 4


def consume_loader(dl: Any) -> list[Any]:
    out: list[Any] = []
    it = iter(dl)
    while True:
        try:
            out.append(next(it).tolist())
        except StopIteration:
            return out
        except KeyError:
            out.append("KeyError")


# -- files changing under the reader after listing ---------------------------------------


def files(tmp_path: Path, n: int = 6) -> list[str]:
    return [p for p, _ in make_files(tmp_path / "data", [100 * (i + 1) for i in range(n)])]


def test_a_file_removed_after_listing_names_the_path(tmp_path: Path) -> None:
    paths = files(tmp_path)
    pipe = Pipeline.from_files(str(tmp_path / "data" / "*.bin"), group_size=2).read()
    os.remove(paths[3])
    err = check_error_propagation(
        lambda: pipe, stage="read", item=paths[3], cause=FileNotFoundError
    )
    assert isinstance(err.__cause__, FileNotFoundError)
    assert err.__cause__.filename == paths[3]
    assert f"No such file or directory: '{paths[3]}'" in str(err)


def test_a_file_replaced_by_a_folder_names_the_path(tmp_path: Path) -> None:
    paths = files(tmp_path)
    pipe = Pipeline.from_files(str(tmp_path / "data"), group_size=2).read()
    os.remove(paths[2])
    os.mkdir(paths[2])
    err = check_error_propagation(
        lambda: pipe, stage="read", item=paths[2], cause=IsADirectoryError
    )
    assert isinstance(err.__cause__, IsADirectoryError)
    assert err.__cause__.filename == paths[2]
    assert str(err) == (
        f"stage 'read' failed on item {paths[2]}: IsADirectoryError: "
        f"[Errno 21] Is a directory: '{paths[2]}'"
    )


def test_a_byte_range_past_the_end_says_so(tmp_path: Path) -> None:
    paths = files(tmp_path)  # paths[1] has 200 bytes
    item = (paths[1], 100, 500)
    err = check_error_propagation(
        lambda: Pipeline.from_files([(paths[0], 0, 10), item]).read(),
        stage="read",
        item=item,
        cause=EOFError,
    )
    assert str(err.__cause__) == (
        f"{paths[1]}: byte range (offset 100, length 500) runs past the end of the file "
        "(200 bytes): a wrong range, or the file was truncated after listing"
    )


def test_a_range_truncated_after_listing_says_so(tmp_path: Path) -> None:
    paths = files(tmp_path)  # paths[4] has 500 bytes
    pipe = Pipeline.from_files([(p, 0, 100 * (i + 1)) for i, p in enumerate(paths)]).read()
    os.truncate(paths[4], 50)
    with pipe, pytest.raises(StageError, match=r"runs past the end of the file \(50 bytes\)"):
        list(pipe)


def test_a_whole_file_truncated_after_listing_is_read_as_it_now_is(tmp_path: Path) -> None:
    # A path (not a range) is sized when it is opened: the reader returns what the
    # file holds then.  (Truncated *while* being read, it raises EOFError naming it.)
    paths = files(tmp_path)
    pipe = Pipeline.from_files(str(tmp_path / "data" / "*.bin")).read()
    os.truncate(paths[5], 7)
    with pipe:
        assert [len(b) for b in pipe] == [100, 200, 300, 400, 500, 7]


@pytest.mark.parametrize("fault", ["removed", "folder"])
def test_loader_file_faults_reach_the_consumer_with_the_path(tmp_path: Path, fault: str) -> None:
    paths = files(tmp_path)
    with DataLoader(FileBytes(paths), batch_size=2, collate_fn=list, num_workers=2) as dl:
        os.remove(paths[3])
        if fault == "folder":
            os.mkdir(paths[3])
        cause = FileNotFoundError if fault == "removed" else IsADirectoryError
        it = iter(dl)
        assert [len(b) for b in next(it)] == [100, 200]
        with pytest.raises(cause) as info:
            next(it)
        assert info.value.filename == paths[3]
        assert "dataset[3] failed (batch 1, indices [2, 3])" in "\n".join(info.value.__notes__)
        assert [len(b) for b in next(it)] == [500, 600]


# -- a worker process killed with SIGKILL mid-epoch ---------------------------------------


def test_pipeline_process_worker_killed_raises_and_the_next_epoch_works(tmp_path: Path) -> None:
    mark = str(tmp_path / "killed")
    items = [(i, mark) for i in range(20)]
    pipe = Pipeline.from_iterable(items, group_size=2).map(
        die_once, executor="process", concurrency=2
    )
    with pipe:
        got, err = consume(pipe)
        assert os.path.exists(mark)  # the worker was killed
        # One StageError, though every job in flight failed with the pool.
        assert isinstance(err, StageError), repr(err)
        assert err.stage == "map"
        assert str(err).startswith("stage 'map' failed: BrokenProcessPool: A ")
        assert got == list(range(len(got)))
        # A broken pool is replaced at the next epoch: the same pipeline works again.
        assert list(pipe) == list(range(20))
    with Pipeline.from_iterable(items, group_size=2).map(die_once, executor="process") as again:
        assert list(again) == list(range(20))


@pytest.mark.parametrize("persistent", [False, True])
def test_loader_worker_killed_raises_and_the_next_epoch_works(
    tmp_path: Path, persistent: bool
) -> None:
    mark = str(tmp_path / "killed")
    dl = DataLoader(
        DiesOnce(mark),
        batch_size=4,
        num_workers=2,
        worker_type="process",
        persistent_workers=persistent,
    )
    with dl:
        with pytest.raises(
            RuntimeError, match=r"DataLoader worker \(pid \d+\) is killed by signal: Killed\. "
        ) as info:
            list(dl)
        assert ": -9}" in "\n".join(info.value.__notes__)  # the exit code: SIGKILL
        # A dead persistent worker is replaced too: the next epoch is whole.
        assert torch.cat(list(dl)).tolist() == list(range(20))
    with DataLoader(DiesOnce(mark), batch_size=4, num_workers=2, worker_type="process") as again:
        assert len(list(again)) == 5


# -- an exception in the training loop's body ---------------------------------------------
# Pipeline: tests/guarantees/test_lifecycle.py::test_an_exception_in_the_loop_body_stops_the_epoch.


@pytest.mark.parametrize(("worker_type", "workers"), [("thread", 2), ("process", 2)])
def test_loader_exception_in_the_loop_body(worker_type: str, workers: int) -> None:
    dl = DataLoader(Faulty(), batch_size=2, num_workers=workers, worker_type=worker_type)

    def train() -> None:
        for i, _ in enumerate(dl):
            if i == 1:
                raise ZeroDivisionError("a bug in the training step")

    with dl:
        with pytest.raises(ZeroDivisionError):
            train()
        assert dl.state_dict()["batches"] == 2  # where the consumer stood
        assert dl.state_dict()["in_epoch"] is True
        it = iter(dl)  # a new epoch starts at once
        assert next(it).tolist() == [0, 1]


# -- SIGINT and interpreter exit (child interpreters) -------------------------------------
# Pipeline: tests/guarantees/test_lifecycle.py::test_sigint_stops_a_script_iterating_a_slow_pipeline and
# ::test_the_interpreter_exits_with_a_pipeline_left_mid_epoch.

LOADER_SCRIPT = """
    import time
    from iopipe import DataLoader

    class Slow:
        def __len__(self):
            return 10**6

        def __getitem__(self, i):
            time.sleep(0.01)  # a slow sample
            return i

    if __name__ == "__main__":
        dl = DataLoader(Slow(), batch_size=4, num_workers=2, worker_type={worker_type!r})
        it = iter(dl)
        next(it)
        print("ready", flush=True)
        {rest}
"""


@pytest.mark.slow
@pytest.mark.parametrize("worker_type", ["thread", "process"])
def test_sigint_stops_a_script_iterating_a_loader(tmp_path: Path, worker_type: str) -> None:
    script = LOADER_SCRIPT.format(worker_type=worker_type, rest="for _ in it: pass")
    proc = run_child(script, tmp_path)
    wait_for_line(proc, "ready")
    proc.send_signal(signal.SIGINT)
    code, _, err = finish(proc)
    assert code != 0
    assert err.rstrip().endswith("KeyboardInterrupt"), err
    assert "Traceback" in err


@pytest.mark.slow
@pytest.mark.parametrize("worker_type", ["thread", "process"])
def test_the_interpreter_exits_with_a_loader_left_mid_epoch(
    tmp_path: Path, worker_type: str
) -> None:
    script = LOADER_SCRIPT.format(worker_type=worker_type, rest="print('left', flush=True)")
    code, out, err = finish(run_child(script, tmp_path))
    assert out.split() == ["ready", "left"], (code, out, err)
    assert code == 0, err
    assert "Traceback" not in err, err


# -- os.fork() after a pipeline ran ---------------------------------------------------------

FORK_SCRIPT = """
    import gc, os, re, sys
    from iopipe import DataLoader, Pipeline

    def child(pipe, it, dl, dit):
        # The inherited epoch's threads stayed in the parent: a clear error, no hang.
        try:
            next(it)
        except RuntimeError as exc:
            print("child: inherited epoch:", re.sub(r"[0-9]+", "N", str(exc)))
        # The inherited pipeline runs again here, on threads of this process.
        print("child: inherited pipeline", sum(len(b) for b in pipe))
        # Closing or dropping what was inherited touches nothing of the parent's.
        pipe.close()
        del dit
        dl.close()
        gc.collect()
        with Pipeline.from_iterable(range(30)).map(abs, concurrency=2).batch(4) as own:
            print("child: own pipeline", sum(len(b) for b in own))
        with DataLoader(list(range(30)), batch_size=4, num_workers=2) as own_dl:
            print("child: own loader", sum(len(b) for b in own_dl))
        # The parent's forkserver is not the child's: its process pool starts its own.
        with Pipeline.from_iterable(range(8)).map(abs, executor="process") as own_proc:
            print("child: own process map", sum(own_proc))

    if __name__ == "__main__":
        pipe = Pipeline.from_iterable(range(100), group_size=4).map(abs, concurrency=2).batch(4)
        dl = DataLoader(list(range(50)), batch_size=5, num_workers=2, worker_type={worker_type!r})
        assert sum(len(b) for b in pipe) == 100  # a whole epoch ran
        proc = Pipeline.from_iterable(range(8)).map(abs, executor="process", concurrency=1)
        assert sum(proc) == 28  # the forkserver runs
        it, dit = iter(pipe), iter(dl)
        next(it), next(dit)  # and one is mid-epoch at the fork
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                child(pipe, it, dl, dit)
                code = 0
            finally:
                sys.stdout.flush()
                os._exit(code)  # never the parent's atexit handlers
        _, status = os.waitpid(pid, 0)
        print("parent: child exit", os.waitstatus_to_exitcode(status))
        print("parent: rest", sum(len(b) for b in it), sum(len(b) for b in dit))
        print("parent: again", sum(len(b) for b in pipe), sum(len(b) for b in dl), sum(proc))
        pipe.close()
        proc.close()
        dl.close()
"""


@pytest.mark.slow
@pytest.mark.parametrize("worker_type", ["thread", "process"])
def test_fork_after_a_pipeline_ran(tmp_path: Path, worker_type: str) -> None:
    proc = run_child(FORK_SCRIPT.format(worker_type=worker_type), tmp_path)
    code, out, err = finish(proc)
    assert code == 0, err
    assert "Traceback" not in err, err
    assert out.splitlines() == [
        "child: inherited epoch: iopipe: this epoch was started in process N, before "
        "os.fork(); its threads are there. Start a new epoch here with iter(pipeline)",
        "child: inherited pipeline 100",
        "child: own pipeline 30",
        "child: own loader 30",
        "child: own process map 28",
        "parent: child exit 0",
        "parent: rest 96 45",
        "parent: again 100 50 28",
    ], out


# -- two threads, each iterating its own pipeline -----------------------------------------


@pytest.mark.parametrize("api", ["pipeline", "loader"])
def test_two_threads_each_iterate_their_own(api: str) -> None:
    n = 400
    both_started = threading.Barrier(2, timeout=30)
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def make(k: int) -> Any:
        data = list(range(k * n, (k + 1) * n))
        if api == "pipeline":
            return Pipeline.from_iterable(data, group_size=8).map(abs, concurrency=2).batch(8)
        return DataLoader(data, batch_size=8, num_workers=2)

    def run(k: int) -> None:
        try:
            with make(k) as src:
                got: list[int] = []
                for i, batch in enumerate(src):
                    got.extend(batch.tolist())
                    if i == 0:
                        both_started.wait()  # both are mid-epoch at the same time
                results[k] = got
        except BaseException as exc:
            errors.append(exc)
            both_started.abort()

    threads = [threading.Thread(target=run, args=(k,), name=f"test-consumer-{k}") for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert results == {k: list(range(k * n, (k + 1) * n)) for k in (0, 1)}
