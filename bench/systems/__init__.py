"""The systems under test, one module each, behind one registry.

Every system module defines ``available() -> str | None`` (None, or why it cannot run here)
and ``batches(workload) -> Iterator[batch]`` (optionally ``expected_checksum(workload)``, see
:func:`expected_checksum`): a generator that builds the system, yields one
epoch of collated batches and shuts the system down when it is exhausted or closed. Modules
are imported only by the case process that runs them, so a case never pays for (or is slowed
by the threads of) a framework it does not use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Generator
from functools import partial
from typing import Any

from bench._workloads import Workload

#: system name -> (module under bench.systems, keyword arguments for its ``batches``)
SYSTEMS: dict[str, tuple[str, dict[str, Any]]] = {
    "plain": ("plain", {}),
    "torch-w0": ("torch_loader", {"num_workers": 0}),
    "torch-w2": ("torch_loader", {"num_workers": 2}),
    "spdl": ("spdl_pipeline", {}),
    "torchdata": ("torchdata_nodes", {}),
    "iopipe": ("iopipe_pipeline", {}),
    "iopipe-dl": ("iopipe_loader", {"num_workers": 2}),
    "iopipe-dl-w0": ("iopipe_loader", {"num_workers": 0}),
    # Diagnostic (not in the default matrix): one helper; worker_type="main" (num_workers=0
    # without the helper thread, loader/helped.py).
    "iopipe-dl-w1": ("iopipe_loader", {"num_workers": 1}),
    "iopipe-dl-main": ("iopipe_loader", {"num_workers": 0, "worker_type": "main"}),
}
#: What ``bench.run`` runs when ``--systems`` is not given.
DEFAULT = tuple(n for n in SYSTEMS if n not in ("iopipe-dl-w1", "iopipe-dl-main"))
BASELINES = ("plain", "torch-w0", "torch-w2", "spdl", "torchdata")


def _module(name: str) -> Any:
    if name not in SYSTEMS:
        raise ValueError(f"system: unknown {name!r}; expected one of {tuple(SYSTEMS)}")
    return importlib.import_module(f"bench.systems.{SYSTEMS[name][0]}")


def unavailable(name: str) -> str | None:
    """Return why system ``name`` cannot run here, or None when it can."""
    try:
        module = _module(name)
    except ImportError as exc:
        return f"cannot import: {exc}"
    reason: str | None = module.available()
    return reason


def expected_checksum(name: str, wl: Workload) -> int | None:
    """Return the checksum system ``name`` must deliver on ``wl`` when it does its own work.

    None (the usual case) means: the same work as every other system, so its checksum must
    equal the plain loop's. A system that picks its own samples (iopipe's TokenShards draws
    its own random windows) defines ``expected_checksum(wl)`` to say what it must deliver.
    """
    fn = getattr(_module(name), "expected_checksum", None)
    return None if fn is None else fn(wl)


def batches_fn(name: str) -> Callable[[Workload], Generator[Any, None, None]]:
    """Return the function that yields one epoch of batches of system ``name``."""
    module = _module(name)
    fn: Callable[[Workload], Generator[Any, None, None]] = partial(
        module.batches, **SYSTEMS[name][1]
    )
    return fn
