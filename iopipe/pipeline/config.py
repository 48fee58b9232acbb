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
``"4MiB"`` (:mod:`iopipe.pipeline.sizes`).  Every validation error is a :class:`ConfigError` whose message
starts with the key path (``stages[2].concurrency: expected an int >= 1 or
'auto', got 'x'``).
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..runtime.errors import show
from ..stages.source import EMPTY_HINT
from .schema import (
    OPTIONS,
    SHARD_KEYS,
    SOURCE,
    SOURCE_KINDS,
    as_table,
    check_table,
    cut_key,
    stage_spec,
    unknown_key,
)
from .spec import Options, PipelineSpec
from .trust import ConfigError, FunctionName, Trust, function_name, resolve_function

if TYPE_CHECKING:
    from .builder import Pipeline

__all__ = [
    "ConfigError",
    "function_name",
    "load_config",
    "pipeline_from_config",
    "pipeline_to_config",
    "resolve_function",
]


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
    doc = load_config(config) if isinstance(config, str | os.PathLike) else config
    kind, source, options, specs = _checked(doc)
    tables = [("source", source), ("options", options)]
    tables += [(f"stages[{i}]", args) for i, (_, args) in enumerate(specs)]
    for path, table in tables:  # every name is permitted before any is imported
        for k, v in table.items():
            if isinstance(v, FunctionName):
                trust.check(v, f"{path}.{k}")
    for path, table in tables:
        _resolve(table, path, trust, skip=("iterable",) if path == "source" else ())
    pipe, origin = _source_pipeline(build, kind, source, options, trust)
    for i, (method, args) in enumerate(specs):
        try:
            pipe = getattr(pipe, method)(**args)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"stages[{i}]", str(exc)) from None
    return pipe, origin


#: A checked config: its source's kind, the source and options tables, and each
#: stage's builder method and arguments.
_Checked = tuple[str, dict[str, Any], dict[str, Any], list[tuple[str, dict[str, Any]]]]


def _checked(doc: Any) -> _Checked:
    """Check a whole config document (nothing it names is imported yet)."""
    top = as_table(doc, "")
    for k in top:
        if k not in ("source", "options", "stages"):
            raise ConfigError(cut_key(k), unknown_key("key", k, ["options", "source", "stages"]))
    if "source" not in top:
        raise ConfigError("source", "required key missing")
    source = check_table(top["source"], SOURCE, "source")
    kinds = [k for k in SOURCE_KINDS if k in source]
    if len(kinds) != 1:
        raise ConfigError("source", "expected exactly one of 'files', 'iterable', 'items'")
    options = check_table(top.get("options", {}), OPTIONS, "options")
    stages = top.get("stages", [])
    if not isinstance(stages, list):
        raise ConfigError("stages", f"expected a list of tables, got {type(stages).__name__}")
    specs = [stage_spec(st, f"stages[{i}]") for i, st in enumerate(stages)]
    return kinds[0], source, options, specs


def _source_pipeline(
    build: type[Pipeline[Any]],
    kind: str,
    source: dict[str, Any],
    options: dict[str, Any],
    trust: Trust,
) -> tuple[Pipeline[Any], dict[str, Any]]:
    """The pipeline of the checked, resolved ``source`` table, and its origin."""
    if kind != "files" and "allow_empty" in source:
        raise ConfigError("source.allow_empty", f"applies to a 'files' source only, not {kind!r}")
    for k in SHARD_KEYS:
        if kind != "shards" and k in source:
            raise ConfigError(f"source.{k}", f"applies to a 'shards' source only, not {kind!r}")
    what = source.pop(kind)
    if kind == "shards":
        try:
            shards: Pipeline[Any] = build.from_shards(what, **source, **options)
        except (TypeError, ValueError) as exc:
            raise ConfigError("source", str(exc)) from None
        return shards, dict(shards.source.origin or {})
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
    return pipe, origin


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


def pipeline_to_config(spec: PipelineSpec) -> dict[str, Any]:
    """Return the config of a pipeline's ``spec`` as plain data (see :meth:`Pipeline.to_config`).

    Options left at their defaults are not written: the config says what was chosen.

    Raises:
        ConfigError: a part cannot be written (a lambda as ``fn``, a source built
            from an arbitrary iterable).
    """
    src, defaults = spec.source, Options.defaults()
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
    implied = source.pop("stages", 0)  # stages the source's constructor adds (shards)
    if isinstance(source.get("files"), list):  # byte ranges as lists: plain data
        source["files"] = [x if isinstance(x, str) else list(x) for x in source["files"]]
    source.update({k: v for k, v in src.config().items() if v is not None})
    chosen = {k: v for k, v in spec.options.as_dict().items() if v != defaults[k]}
    # An option switched off (None) where its default is on is written as false.
    chosen.update({k: False for k, v in chosen.items() if v is None and defaults[k] is not None})
    out: dict[str, Any] = {
        "source": source,
        "options": _plain_values({k: v for k, v in chosen.items() if v is not None}, "options"),
        "stages": [],
    }
    for i, stage in enumerate(spec.stages):
        if i < implied:
            continue
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
