"""Pipelines from config files (TOML, JSON, YAML) and back: ``from_config`` / ``to_config``.

A config is a mapping with three keys (see docs/config.md)::

    [source]                      # exactly one of files / iterable / items
    files = "data/**/*.jpg"
    shuffle = true

    [options]                     # Pipeline options (all optional)
    timeout = 60

    [[stages]]                    # in order; "stage" names the builder method
    stage = "read"
    chunk_bytes = "4MiB"
    concurrency = "auto"

User functions are written ``"package.module:function"``; sizes may be written
``"4MiB"``.  Every validation error is a :class:`ConfigError` whose message
starts with the key path (``stages[2].concurrency: expected an int >= 1 or
'auto', got 'x'``).
"""

from __future__ import annotations

import difflib
import fractions
import json
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..runtime.errors import show
from .trust import (
    ConfigError,
    FunctionName,
    Trust,
    check_name,
    function_name,
    resolve_function,
)

if TYPE_CHECKING:
    from ..stages.base import Stage
    from ..stages.source import Source
    from .builder import Pipeline

__all__ = [
    "ConfigError",
    "format_size",
    "function_name",
    "load_config",
    "parse_size",
    "pipeline_from_config",
    "pipeline_to_config",
    "resolve_function",
]


# -- sizes ----------------------------------------------------------------------------

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "kb": 10**3,
    "m": 1 << 20,
    "mib": 1 << 20,
    "mb": 10**6,
    "g": 1 << 30,
    "gib": 1 << 30,
    "gb": 10**9,
    "t": 1 << 40,
    "tib": 1 << 40,
    "tb": 10**12,
}
#: Sizes fit a signed 64-bit count of bytes (what the OS and numpy take).
MAX_SIZE = (1 << 63) - 1
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")


def parse_size(value: int | str) -> int:
    """Return the number of bytes ``value`` denotes.

    Accepts an int or a string: ``"4MiB"``, ``"256KiB"``, ``"1G"``, ``"1.5GiB"``,
    ``"512"``.  ``K``/``M``/``G``/``T`` and ``KiB``... are powers of 1024;
    ``KB``/``MB``/``GB``/``TB`` are powers of 1000.

    Raises:
        ValueError: not a size, or a fraction of a byte.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value > MAX_SIZE:  # negative ones are the caller's to refuse, by name
            raise ValueError(f"size {show(value)} is larger than 2**63 - 1 bytes")
        return value
    if isinstance(value, str) and len(value) <= 64 and (m := _SIZE.fullmatch(value)):
        unit = _UNITS.get(m.group(2).lower())
        exact = fractions.Fraction(m.group(1)) * (unit or 0)  # exact: no float rounding
        n = -1 if unit is None or exact.denominator != 1 else int(exact)
    else:
        n = -1
    if n < 0:
        raise ValueError(
            f"not a size in bytes: {show(value)} (write e.g. 4194304, '4MiB', '256KiB')"
        )
    if n > MAX_SIZE:
        raise ValueError(f"size {show(value)} is larger than 2**63 - 1 bytes")
    return n


def format_size(n: int) -> str:
    """Return ``n`` bytes in the shortest exact binary unit: ``4194304 -> "4MiB"``."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return f"{n}B"


# -- value checkers: each returns the converted value or raises ConfigError ---------------


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


def _items(v: Any, path: str) -> list[Any]:
    if isinstance(v, list):
        return v
    raise ConfigError(path, f"expected a list, got {show(v)}")


Spec = dict[str, tuple[Callable[[Any, str], Any], bool]]  # key -> (checker, required)

_SOURCE: Spec = {
    "files": (_files, False),
    "iterable": (_function, False),
    "items": (_items, False),
    "shuffle": (_bool, False),
    "seed": (_int(0), False),
    "rank": (_int(0), False),
    "world_size": (_int(1), False),
    "shard": (_choice("pad", "drop"), False),
    "allow_empty": (_bool, False),  # files only: a glob matching nothing gives empty epochs
}
_SOURCE_KINDS = ("files", "iterable", "items")

_OPTIONS: Spec = {
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
    "stall_warning": (_number, False),
    "max_inflight_bytes": (_size, False),
    "fuse": (_bool, False),
}

_STAGES: dict[str, Spec] = {
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


def _table(v: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(v, Mapping):
        raise ConfigError(path, f"expected a table, got {type(v).__name__}: {show(v)}")
    for k in v:
        if not isinstance(k, str):
            raise ConfigError(path, f"keys must be strings, got {show(k)}")
    return v


def _cut(key: str) -> str:
    """A key from the document, cut short for a key path."""
    return key if len(key) <= 80 else f"{key[:60]}...({len(key)} characters)"


def _unknown(what: str, got: Any, known: list[str], *, quote: bool = False) -> str:
    """``unknown key; did you mean 'concurrency'? expected one of ...``."""
    names = ", ".join(map(repr, known)) if quote else ", ".join(known)
    head = f"unknown {what} {show(got)}" if quote else f"unknown {what}"
    near = isinstance(got, str) and len(got) <= 100
    close = difflib.get_close_matches(got, known, n=1) if near else []
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{head}{hint}; expected one of {names}"


def _check(table: Any, spec: Spec, path: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Validate ``table`` against ``spec``; return the converted values."""
    t = _table(table, path)
    out: dict[str, Any] = {}
    for k, v in t.items():
        if k in skip:
            continue
        if k not in spec:
            raise ConfigError(f"{path}.{_cut(k)}", _unknown("key", k, sorted(spec)))
        out[k] = spec[k][0](v, f"{path}.{k}")
    for k, (_, required) in spec.items():
        if required and k not in t:
            raise ConfigError(f"{path}.{k}", "required key missing")
    return out


# -- reading ---------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a config file: ``.toml``, ``.json``, or ``.yaml``/``.yml`` (needs PyYAML).

    Raises:
        FileNotFoundError: no such file.
        ConfigError: unknown suffix, or the file does not parse.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".toml", ".json", ".yaml", ".yml"):
        raise ConfigError(
            "", f"{p}: unknown config format {suffix or '(none)'!r}; use .toml, .json or .yaml"
        )
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"no such config file: {p}") from None
    except IsADirectoryError:
        raise ConfigError("", f"{p}: is a folder, not a config file") from None
    try:
        if suffix == ".toml":
            doc: Any = tomllib.loads(text)
        elif suffix == ".json":
            doc = json.loads(text)
        else:
            doc = _load_yaml(text, p)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        kind = "TOML" if suffix == ".toml" else "JSON"
        raise ConfigError("", f"{p}: invalid {kind}: {exc}") from None
    except RecursionError:
        raise ConfigError("", f"{p}: nested too deeply") from None
    except ValueError as exc:  # an integer of more than 4300 digits, say
        raise ConfigError("", f"{p}: {str(exc)[:300]}") from None
    if not isinstance(doc, dict):
        raise ConfigError("", f"{p}: expected a table at the top, got {type(doc).__name__}")
    return doc


def _load_yaml(text: str, p: Path) -> Any:
    try:
        import yaml
    except ImportError:
        raise ConfigError(
            "", f"{p}: reading YAML needs PyYAML: pip install 'iopipe-ml[yaml]'"
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        one_line = " ".join(str(exc).split())
        raise ConfigError("", f"{p}: invalid YAML: {one_line}") from None


_UNTRUSTED = Trust()


def pipeline_from_config(
    config: Mapping[str, Any] | str | os.PathLike[str],
    build: type[Pipeline[Any]],
    trust: Trust = _UNTRUSTED,
) -> tuple[Pipeline[Any], dict[str, Any]]:
    """Build a pipeline with ``build`` (the Pipeline class) from a config mapping or file.

    Returns the pipeline and its source's origin (what ``to_config`` writes for
    the source).  The whole document is checked first; only then are the
    functions it names imported, each if ``trust`` permits it.  See
    :meth:`Pipeline.from_config`.
    """
    from ..stages.source import EMPTY_HINT

    doc = load_config(config) if isinstance(config, str | os.PathLike) else config
    top = _table(doc, "")
    for k in top:
        if k not in ("source", "options", "stages"):
            raise ConfigError(_cut(k), _unknown("key", k, ["options", "source", "stages"]))
    if "source" not in top:
        raise ConfigError("source", "required key missing")
    source = _check(top["source"], _SOURCE, "source")
    kinds = [k for k in _SOURCE_KINDS if k in source]
    if len(kinds) != 1:
        raise ConfigError("source", "expected exactly one of 'files', 'iterable', 'items'")
    options = _check(top.get("options", {}), _OPTIONS, "options")
    stages = top.get("stages", [])
    if not isinstance(stages, list):
        raise ConfigError("stages", f"expected a list of tables, got {type(stages).__name__}")
    specs = [_stage_spec(st, f"stages[{i}]") for i, st in enumerate(stages)]
    tables = [("source", source), ("options", options)]
    tables += [(f"stages[{i}]", args) for i, (_, args) in enumerate(specs)]
    for path, table in tables:  # every name is permitted before any is imported
        for k, v in table.items():
            if isinstance(v, FunctionName):
                trust.check(v, f"{path}.{k}")
    for path, table in tables:
        _resolve(table, path, trust, skip=("iterable",) if path == "source" else ())

    kind = kinds[0]
    if kind != "files" and "allow_empty" in source:
        raise ConfigError("source.allow_empty", f"applies to a 'files' source only, not {kind!r}")
    what = source.pop(kind)
    iterable = _iterable(what, trust) if kind == "iterable" else None
    pipe: Pipeline[Any]
    try:
        if kind == "files":
            try:
                pipe = build.from_files(what, **source, **options)
            except FileNotFoundError as exc:  # say it in the config's words
                text = str(exc).replace(EMPTY_HINT, "set allow_empty = true in the source table")
                raise (
                    FileNotFoundError(exc.errno, text) if exc.errno else FileNotFoundError(text)
                ) from None
        else:
            items: Any = what if kind == "items" else iterable
            pipe = build.from_iterable(items, **source, **options)
    except (TypeError, ValueError) as exc:
        raise ConfigError("source", str(exc)) from None
    origin: dict[str, Any] = {kind: str(what) if kind == "iterable" else what}
    if source.get("allow_empty"):
        origin["allow_empty"] = True
    for i, (method, args) in enumerate(specs):
        try:
            pipe = getattr(pipe, method)(**args)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"stages[{i}]", str(exc)) from None
    return pipe, origin


def _stage_spec(entry: Any, path: str) -> tuple[str, dict[str, Any]]:
    t = _table(entry, path)
    if "stage" not in t:
        raise ConfigError(f"{path}.stage", "required key missing")
    method = t["stage"]
    if not isinstance(method, str) or method not in _STAGES:
        raise ConfigError(f"{path}.stage", _unknown("stage", method, list(_STAGES), quote=True))
    return method, _check(t, _STAGES[method], path, skip=("stage",))


def _resolve(table: dict[str, Any], path: str, trust: Trust, skip: tuple[str, ...] = ()) -> None:
    """Replace each checked function name in ``table`` by the function, as ``trust`` permits."""
    for k, v in table.items():
        if isinstance(v, FunctionName) and k not in skip:
            table[k] = trust.resolve(v, f"{path}.{k}")


def _iterable(name: FunctionName, trust: Trust) -> Any:
    obj: Any = trust.resolve(name, "source.iterable")
    try:
        iter(obj)
    except TypeError:
        obj = obj()  # a factory: called with no arguments
    return obj


# -- writing ---------------------------------------------------------------------------

_METHOD = {
    "read": "read",
    "prefetch": "prefetch",
    "map": "map",
    "batch": "batch",
    "cache": "cache",
    "to_device": "to_device",
}
_FUNCTIONS = ("fn", "collate_fn", "on_stats")


def pipeline_to_config(
    src: Source, options: Mapping[str, Any], defaults: Mapping[str, Any], stages: Sequence[Stage]
) -> dict[str, Any]:
    """Return the config of a pipeline as plain data (see :meth:`Pipeline.to_config`).

    Args:
        src: the pipeline's source; options: its options; defaults: the options'
            default values (left out of the config); stages: its stages, in order.

    Raises:
        ConfigError: a part cannot be written (a lambda as ``fn``, a source built
            from an arbitrary iterable).
    """
    origin = getattr(src, "origin", None)
    if origin is None:
        items = src.items
        if isinstance(items, list | tuple | range) and _plain(list(items)):
            origin = {"items": list(items)}
        else:
            raise ConfigError(
                "source",
                f"a source built from a {type(items).__name__} cannot be written to a config; "
                "use Pipeline.from_files or an 'iterable' named 'package.module:name'",
            )
    source: dict[str, Any] = dict(origin)
    if isinstance(source.get("files"), list):  # byte ranges as lists: plain data
        source["files"] = [x if isinstance(x, str) else list(x) for x in source["files"]]
    source.update({k: v for k, v in src.config().items() if v is not None})
    # Options left at their defaults are not written: the config says what was chosen.
    chosen = {k: v for k, v in options.items() if not (k in defaults and v == defaults[k])}
    out: dict[str, Any] = {
        "source": source,
        "options": _plain_values({k: v for k, v in chosen.items() if v is not None}, "options"),
        "stages": [],
    }
    for i, stage in enumerate(stages):
        if stage.kind not in _METHOD:
            raise ConfigError(f"stages[{i}]", f"a {stage.kind!r} stage has no config form")
        cfg: dict[str, Any] = {"stage": _METHOD[stage.kind], **stage.config()}
        if stage.autotune:
            cfg["n" if stage.kind == "prefetch" else "concurrency"] = "auto"
        if stage.kind == "map" and not re.fullmatch(r"map(_\d+)?", stage.name):
            cfg["name"] = stage.name
        cfg = {k: v for k, v in cfg.items() if v is not None}
        out["stages"].append(_plain_values(cfg, f"stages[{i}]"))
    return out


def _plain_values(table: dict[str, Any], path: str) -> dict[str, Any]:
    """Replace functions by their names; check everything left is plain data."""
    out: dict[str, Any] = {}
    for k, v in table.items():
        if k in _FUNCTIONS and callable(v):
            v = function_name(v, f"{path}.{k}")
        if not _plain([v]):
            raise ConfigError(f"{path}.{k}", f"{show(v)} cannot be written to a config")
        out[k] = v
    return out


def _plain(values: list[Any]) -> bool:
    for v in values:
        if isinstance(v, list):
            if not _plain(v):
                return False
        elif not isinstance(v, str | int | float | bool):
            return False
    return True
