"""What a pipeline config may hold: each key's checker, and the checks of whole tables.

Every checker takes ``(value, key path)`` and returns the converted value or
raises :class:`ConfigError` naming the key path.  :data:`SOURCE`,
:data:`OPTIONS` and :data:`STAGES` say which keys each table takes, with
their checkers and whether they are required; :func:`check_table` applies one.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Any

from ..runtime.errors import show
from .sizes import parse_size
from .trust import ConfigError, FunctionName, check_name

__all__ = [
    "OPTIONS",
    "SOURCE",
    "SHARD_KEYS",
    "SOURCE_KINDS",
    "STAGES",
    "Spec",
    "as_table",
    "check_table",
    "cut_key",
    "stage_spec",
    "unknown_key",
]


def _int(lo: int, *, auto: bool = False) -> Callable[[Any, str], Any]:
    want = f"an int >= {lo}" + (" or 'auto'" if auto else "")

    def check(v: Any, path: str) -> Any:
        if auto and v == "auto":
            return v
        if isinstance(v, int) and not isinstance(v, bool) and v >= lo:
            return v
        raise ConfigError(path, f"expected {want}, got {show(v)}")

    return check


def _size(v: Any, path: str) -> int:
    try:
        n = parse_size(v)
    except ValueError:
        n = 0
    if n >= 1:
        return n
    raise ConfigError(
        path, f"expected a size in bytes (an int >= 1 or a string such as '4MiB'), got {show(v)}"
    )


def _bool(v: Any, path: str) -> bool:
    if isinstance(v, bool):
        return v
    raise ConfigError(path, f"expected true or false, got {show(v)}")


def _number(v: Any, path: str) -> float:
    if isinstance(v, int | float) and not isinstance(v, bool) and v > 0:
        return v
    raise ConfigError(path, f"expected a number > 0, got {show(v)}")


def _number_or_off(v: Any, path: str) -> float | None:
    """A number > 0, or ``false``: off (the option's None, which config files cannot write)."""
    if v is False:
        return None
    if isinstance(v, int | float) and not isinstance(v, bool) and v > 0:
        return v
    raise ConfigError(path, f"expected a number > 0 or false (off), got {show(v)}")


def _str(v: Any, path: str) -> str:
    if isinstance(v, str) and v:
        return v
    raise ConfigError(path, f"expected a non-empty string, got {show(v)}")


def _choice(*options: str) -> Callable[[Any, str], Any]:
    def check(v: Any, path: str) -> Any:
        if v in options:
            return v
        raise ConfigError(path, f"expected one of {', '.join(map(repr, options))}, got {show(v)}")

    return check


def _max_failures(v: Any, path: str) -> int | float:
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        return v
    if isinstance(v, float) and 0 < v < 1:
        return v
    raise ConfigError(path, f"expected an int >= 0 or a number in (0, 1), got {show(v)}")


def _function(v: Any, path: str) -> FunctionName:
    return check_name(v, path)  # imported later, once the whole config is checked


def _is_range(x: Any) -> bool:
    return (
        isinstance(x, list | tuple)
        and len(x) == 3
        and isinstance(x[0], str)
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in x[1:])
    )


def _files(v: Any, path: str) -> Any:
    if isinstance(v, str) and v:
        return v
    if isinstance(v, list) and v and all((isinstance(x, str) and x) or _is_range(x) for x in v):
        return [x if isinstance(x, str) else tuple(x) for x in v]  # byte ranges as tuples
    raise ConfigError(
        path,
        "expected a glob, a folder, or a list of paths and [path, offset, length] ranges, "
        f"got {show(v)}",
    )


def _shards(v: Any, path: str) -> Any:
    if (isinstance(v, str) and v) or (
        isinstance(v, list) and v and all(isinstance(x, str) and x for x in v)
    ):
        return v
    raise ConfigError(path, f"expected shard URLs: a string or a list of them, got {show(v)}")


def _items(v: Any, path: str) -> list[Any]:
    if isinstance(v, list):
        return v
    raise ConfigError(path, f"expected a list, got {show(v)}")


Spec = dict[str, tuple[Callable[[Any, str], Any], bool]]  # key -> (checker, required)

SOURCE: Spec = {
    "files": (_files, False),
    "iterable": (_function, False),
    "items": (_items, False),
    "shuffle": (_bool, False),
    "seed": (_int(0), False),
    "rank": (_int(0), False),
    "world_size": (_int(1), False),
    "shard": (_choice("pad", "drop"), False),
    "allow_empty": (_bool, False),  # files only: a glob matching nothing gives empty epochs
    "shards": (_shards, False),
    "chunk_bytes": (_size, False),  # shards only: their reads
    "concurrency": (_int(1, auto=True), False),  # shards only: reads or requests in flight
}
SOURCE_KINDS = ("files", "iterable", "items", "shards")
#: Source keys that only a ``shards`` source takes.
SHARD_KEYS = ("chunk_bytes", "concurrency")

OPTIONS: Spec = {
    "timeout": (_number, False),
    "handoff": (_int(1), False),
    "group_size": (_int(1), False),
    "use_uvloop": (_bool, False),
    "stats_interval": (_number, False),
    "on_stats": (_function, False),
    "cpu_budget": (_int(1), False),
    "memory_budget_bytes": (_size, False),
    "on_error": (_choice("raise", "skip"), False),
    "max_failures": (_max_failures, False),
    "stall_warning": (_number_or_off, False),
    "max_inflight_bytes": (_size, False),
    "fuse": (_bool, False),
}

STAGES: dict[str, Spec] = {
    "read": {
        "chunk_bytes": (_size, False),
        "concurrency": (_int(1, auto=True), False),
        "with_source": (_bool, False),
    },
    "prefetch": {"n": (_int(1, auto=True), True)},
    "map": {
        "fn": (_function, True),
        "concurrency": (_int(1, auto=True), False),
        "executor": (_choice("thread", "process", "async", "inline"), False),
        "ordered": (_bool, False),
        "name": (_str, False),
    },
    "batch": {
        "batch_size": (_int(1), True),
        "drop_last": (_bool, False),
        "collate_fn": (_function, False),
    },
    "cache": {"max_bytes": (_size, True)},
    "to_device": {"device": (_str, True), "pin_memory": (_bool, False)},
}


def as_table(v: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(v, Mapping):
        raise ConfigError(path, f"expected a table, got {type(v).__name__}: {show(v)}")
    for k in v:
        if not isinstance(k, str):
            raise ConfigError(path, f"keys must be strings, got {show(k)}")
    return v


def cut_key(key: str) -> str:
    """A key from the document, cut short for a key path."""
    return key if len(key) <= 80 else f"{key[:60]}...({len(key)} characters)"


def unknown_key(what: str, got: Any, known: list[str], *, quote: bool = False) -> str:
    """``unknown key; did you mean 'concurrency'? expected one of ...``."""
    names = ", ".join(map(repr, known)) if quote else ", ".join(known)
    head = f"unknown {what} {show(got)}" if quote else f"unknown {what}"
    near = isinstance(got, str) and len(got) <= 100
    close = difflib.get_close_matches(got, known, n=1) if near else []
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{head}{hint}; expected one of {names}"


def check_table(table: Any, spec: Spec, path: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Validate ``table`` against ``spec``; return the converted values."""
    t = as_table(table, path)
    out: dict[str, Any] = {}
    for k, v in t.items():
        if k in skip:
            continue
        if k not in spec:
            raise ConfigError(f"{path}.{cut_key(k)}", unknown_key("key", k, sorted(spec)))
        out[k] = spec[k][0](v, f"{path}.{k}")
    for k, (_, required) in spec.items():
        if required and k not in t:
            raise ConfigError(f"{path}.{k}", "required key missing")
    return out


def stage_spec(entry: Any, path: str) -> tuple[str, dict[str, Any]]:
    t = as_table(entry, path)
    if "stage" not in t:
        raise ConfigError(f"{path}.stage", "required key missing")
    method = t["stage"]
    if not isinstance(method, str) or method not in STAGES:
        raise ConfigError(f"{path}.stage", unknown_key("stage", method, list(STAGES), quote=True))
    return method, check_table(t, STAGES[method], path, skip=("stage",))
