"""Tests of pipelines from config files and back (iopipe/pipeline/config.py)."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from iopipe import ConfigError, IopipeError, Pipeline
from iopipe.pipeline.config import function_name, resolve_function
from iopipe.pipeline.schema import OPTIONS
from iopipe.pipeline.sizes import format_size, parse_size


def first_byte(buf: Any) -> int:
    """A map function named in configs by this module's import name."""
    return int(buf[0])


def tens() -> list[int]:
    """A source factory: ``iterable = "<module>:tens"``."""
    return [10, 20, 30]


def collate_sum(items: list[int]) -> int:
    return sum(items)


NOT_CALLABLE = 3
MOD = __name__  # how pytest imported this module


@pytest.fixture
def data(tmp_path: Path) -> Path:
    for i in range(12):
        (tmp_path / f"{i:02d}.bin").write_bytes(bytes([i]) * 10)
    return tmp_path


def full_config(folder: Path) -> dict[str, Any]:
    return {
        "source": {"files": str(folder / "*.bin"), "shuffle": True, "seed": 3},
        "options": {"timeout": 30, "handoff": 3, "group_size": 4, "stats_interval": 60},
        "stages": [
            {"stage": "read", "chunk_bytes": "4MiB", "concurrency": 4},
            {"stage": "prefetch", "n": 8},
            {"stage": "map", "fn": f"{MOD}:first_byte", "concurrency": 2, "name": "decode"},
            {"stage": "batch", "batch_size": 5, "collate_fn": f"{MOD}:collate_sum"},
        ],
    }


# -- round trip ------------------------------------------------------------------------


def test_to_config_round_trips(data: Path) -> None:
    pipe = Pipeline.from_config(full_config(data), allow=[MOD])
    cfg = pipe.to_config()
    assert cfg == {
        "source": {
            "files": str(data / "*.bin"),
            "shuffle": True,
            "seed": 3,
            "shard": "pad",
        },
        "options": {
            "timeout": 30,
            "handoff": 3,
            "group_size": 4,
            "stats_interval": 60,
        },
        "stages": [
            {"stage": "read", "chunk_bytes": 4 << 20, "concurrency": 4, "with_source": False},
            {"stage": "prefetch", "n": 8},
            {
                "stage": "map",
                "fn": f"{MOD}:first_byte",
                "concurrency": 2,
                "executor": "thread",
                "ordered": True,
                "name": "decode",
            },
            {
                "stage": "batch",
                "batch_size": 5,
                "drop_last": False,
                "collate_fn": f"{MOD}:collate_sum",
            },
        ],
    }
    assert Pipeline.from_config(cfg, allow=[MOD]).to_config() == cfg
    assert json.loads(json.dumps(cfg)) == cfg


def test_a_pipeline_built_in_code_round_trips_and_runs_the_same(data: Path) -> None:
    built = (
        Pipeline.from_files(str(data), cpu_budget=2, memory_budget_bytes=1 << 20)
        .read(concurrency="auto")
        .map(first_byte, concurrency="auto")
        .map(int, executor="inline")
        .prefetch("auto")
    )
    cfg = built.to_config()
    assert cfg["source"] == {"files": str(data), "shuffle": False, "seed": 0, "shard": "pad"}
    # Options left at their defaults are not written.
    assert cfg["options"] == {"cpu_budget": 2, "memory_budget_bytes": 1 << 20}
    assert [s.get("concurrency", s.get("n")) for s in cfg["stages"]] == ["auto", "auto", 4, "auto"]
    assert "name" not in cfg["stages"][2]  # "map_1" is what map() names a second map anyway
    rebuilt = Pipeline.from_config(cfg, allow=[MOD])
    assert rebuilt.to_config() == cfg
    with built, rebuilt:
        assert list(rebuilt) == list(built) == list(range(12))


def test_sources_from_items_and_from_a_named_iterable() -> None:
    pipe = Pipeline.from_config({"source": {"items": [1, 2, 3]}})
    assert pipe.to_config()["source"] == {
        "items": [1, 2, 3],
        "shuffle": False,
        "seed": 0,
        "shard": "pad",
    }
    with pipe:
        assert list(pipe) == [1, 2, 3]
    named = Pipeline.from_config({"source": {"iterable": f"{MOD}:tens"}}, allow=[MOD])
    assert named.to_config()["source"]["iterable"] == f"{MOD}:tens"
    with named:
        assert list(named) == [10, 20, 30]
    # A plain list built in code is written inline.
    assert Pipeline.from_iterable([4, 5]).to_config()["source"]["items"] == [4, 5]


def test_byte_ranges_round_trip(data: Path) -> None:
    f = str(data / "03.bin")
    pipe = Pipeline.from_files([(f, 0, 4), (f, 4, 6), f]).read()
    cfg = pipe.to_config()
    assert cfg["source"]["files"] == [[f, 0, 4], [f, 4, 6], f]
    again = Pipeline.from_config(json.loads(json.dumps(cfg)), allow=[MOD])
    assert again.to_config() == cfg
    with pipe, again:
        assert (
            [bytes(b) for b in again]
            == [bytes(b) for b in pipe]
            == [
                b"\x03" * 4,
                b"\x03" * 6,
                b"\x03" * 10,
            ]
        )


def test_config_files_in_toml_json_and_yaml_build_the_same_pipeline(
    data: Path, tmp_path: Path
) -> None:
    toml = f"""
[source]
files = "{data / "*.bin"}"
shuffle = true
seed = 3

[options]
timeout = 30
handoff = 3
group_size = 4
stats_interval = 60

[[stages]]
stage = "read"
chunk_bytes = "4MiB"
concurrency = 4

[[stages]]
stage = "prefetch"
n = 8

[[stages]]
stage = "map"
fn = "{MOD}:first_byte"
concurrency = 2
name = "decode"

[[stages]]
stage = "batch"
batch_size = 5
collate_fn = "{MOD}:collate_sum"
"""
    (tmp_path / "p.toml").write_text(toml)
    (tmp_path / "p.json").write_text(json.dumps(full_config(data)))
    yaml = pytest.importorskip("yaml")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(full_config(data)))
    want = Pipeline.from_config(full_config(data), allow=[MOD]).to_config()
    for name in ("p.toml", "p.json", "p.yaml"):
        assert Pipeline.from_config(tmp_path / name, allow=[MOD]).to_config() == want, name
        assert Pipeline.from_config(str(tmp_path / name), allow=[MOD]).to_config() == want, name


def test_to_config_refuses_what_has_no_name() -> None:
    with pytest.raises(
        ConfigError,
        match=r"^stages\[0\]\.fn: <function .*<lambda>.* cannot be named in a config: use a module-level function$",
    ):
        Pipeline.from_iterable([1]).map(lambda x: x).to_config()
    with pytest.raises(
        ConfigError, match=r"^source: a source built from a generator cannot be written to a config"
    ):
        Pipeline.from_iterable(x for x in [1]).to_config()


# -- validation: every error names its key path ----------------------------------------


def _set(cfg: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Return a copy of ``cfg`` with ``path`` ("stages.2.concurrency") set (or deleted)."""
    out = copy.deepcopy(cfg)
    *head, last = path.split(".")
    node: Any = out
    for part in head:
        node = node[int(part)] if part.isdigit() else node[part]
    key: Any = int(last) if last.isdigit() else last
    if value is DELETE:
        del node[key]
    else:
        node[key] = value
    return out


DELETE = object()

ERRORS = [
    (
        "stages.2.concurrency",
        "x",
        r"stages[2].concurrency: expected an int >= 1 or 'auto', got 'x'",
    ),
    ("stages.2.concurrency", 0, r"stages[2].concurrency: expected an int >= 1 or 'auto', got 0"),
    (
        "stages.2.concurrency",
        True,
        r"stages[2].concurrency: expected an int >= 1 or 'auto', got True",
    ),
    (
        "stages.0.chunk_bytes",
        "4 parsecs",
        "stages[0].chunk_bytes: expected a size in bytes (an int >= 1 or a string such as '4MiB'), got '4 parsecs'",
    ),
    (
        "stages.0.chunk_bytes",
        0,
        "stages[0].chunk_bytes: expected a size in bytes (an int >= 1 or a string such as '4MiB'), got 0",
    ),
    ("stages.0.with_source", "yes", "stages[0].with_source: expected true or false, got 'yes'"),
    (
        "stages.0.concurency",
        4,
        "stages[0].concurency: unknown key; did you mean 'concurrency'?; expected one of chunk_bytes, concurrency, with_source",
    ),
    ("stages.1.n", DELETE, "stages[1].n: required key missing"),
    ("stages.1.n", -1, "stages[1].n: expected an int >= 1 or 'auto', got -1"),
    (
        "stages.2.fn",
        "first_byte",
        "stages[2].fn: expected 'package.module:function', got 'first_byte'",
    ),
    (
        "stages.2.fn",
        f"{MOD}.no_such_module:f",
        f"stages[2].fn: cannot import module '{MOD}.no_such_module': No module named "
        f"'{MOD}.no_such_module'; '{MOD}' is not a package",
    ),
    ("stages.2.fn", f"{MOD}:nope", f"stages[2].fn: module '{MOD}' has no attribute 'nope'"),
    ("stages.2.fn", f"{MOD}:NOT_CALLABLE", f"stages[2].fn: '{MOD}:NOT_CALLABLE' is not callable"),
    ("stages.2.fn", DELETE, "stages[2].fn: required key missing"),
    (
        "stages.2.executor",
        "gpu",
        "stages[2].executor: expected one of 'thread', 'process', 'async', 'inline', got 'gpu'",
    ),
    ("stages.2.name", "", "stages[2].name: expected a non-empty string, got ''"),
    ("stages.3.batch_size", "8", "stages[3].batch_size: expected an int >= 1, got '8'"),
    ("stages.3.drop_last", 1, "stages[3].drop_last: expected true or false, got 1"),
    ("stages.3.collate_fn", 5, "stages[3].collate_fn: expected 'package.module:function', got 5"),
    (
        "stages.3.stage",
        "decode",
        "stages[3].stage: unknown stage 'decode'; expected one of 'read', 'prefetch', 'map', 'batch', 'cache', 'to_device'",
    ),
    ("stages.3.stage", DELETE, "stages[3].stage: required key missing"),
    ("stages.3", "batch", "stages[3]: expected a table, got str: 'batch'"),
    ("stages", {"stage": "read"}, "stages: expected a list of tables, got dict"),
    ("source.files", DELETE, "source: expected exactly one of 'files', 'iterable', 'items'"),
    ("source.items", [1], "source: expected exactly one of 'files', 'iterable', 'items'"),
    (
        "source.files",
        3,
        "source.files: expected a glob, a folder, or a list of paths and [path, offset, length] "
        "ranges, got 3",
    ),
    (
        "source.files",
        [["a", -1, 2]],
        "source.files: expected a glob, a folder, or a list of paths and [path, offset, length] "
        "ranges, got [['a', -1, 2]]",
    ),
    ("source.shuffle", "no", "source.shuffle: expected true or false, got 'no'"),
    ("source.seed", -1, "source.seed: expected an int >= 0, got -1"),
    ("source.shard", "even", "source.shard: expected one of 'pad', 'drop', got 'even'"),
    ("source.world_size", 0, "source.world_size: expected an int >= 1, got 0"),
    ("source.rank", 2, "source: rank must be an int in [0, 2), got 2"),
    ("source", DELETE, "source: required key missing"),
    ("source", [], "source: expected a table, got list: []"),
    ("options.timeout", 0, "options.timeout: expected a number > 0, got 0"),
    ("options.handoff", 1.5, "options.handoff: expected an int >= 1, got 1.5"),
    (
        "options.on_stats",
        "print",
        "options.on_stats: expected 'package.module:function', got 'print'",
    ),
    (
        "options.memory_budget_bytes",
        "lots",
        "options.memory_budget_bytes: expected a size in bytes (an int >= 1 or a string such as '4MiB'), got 'lots'",
    ),
    (
        "options.colour",
        "red",
        "options.colour: unknown key; expected one of " + ", ".join(sorted(OPTIONS)),
    ),
    ("version", 2, "version: unknown key; expected one of options, source, stages"),
]


@pytest.mark.parametrize(("path", "value", "message"), ERRORS, ids=[e[2][:60] for e in ERRORS])
def test_every_validation_error_names_the_key_path(
    data: Path, path: str, value: Any, message: str
) -> None:
    cfg = full_config(data)
    if path == "source.rank":
        cfg["source"]["world_size"] = 2
    with pytest.raises(ConfigError) as info:
        Pipeline.from_config(_set(cfg, path, value), allow=[MOD])
    assert str(info.value) == message
    assert info.value.path == message.split(":")[0]


def test_builder_errors_are_reported_at_their_stage(data: Path) -> None:
    cfg = full_config(data)
    cfg["stages"].append({"stage": "cache", "max_bytes": "1MiB"})
    with pytest.raises(ConfigError, match=r"^stages\[4\]: cache\(\) must come before batch\(\)"):
        Pipeline.from_config(cfg, allow=[MOD])


def test_config_error_is_a_value_error_and_an_iopipe_error() -> None:
    assert issubclass(ConfigError, ValueError)
    assert issubclass(ConfigError, IopipeError)


# -- files ------------------------------------------------------------------------------


def test_config_file_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match=r"^no such config file: .*missing\.toml$"):
        Pipeline.from_config(tmp_path / "missing.toml")
    (tmp_path / "p.ini").write_text("")
    with pytest.raises(
        ConfigError, match=r"p\.ini: unknown config format '\.ini'; use \.toml, \.json or \.yaml$"
    ):
        Pipeline.from_config(tmp_path / "p.ini")
    (tmp_path / "bad.toml").write_text("[source\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: invalid TOML: "):
        Pipeline.from_config(tmp_path / "bad.toml")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match=r"bad\.json: invalid JSON: "):
        Pipeline.from_config(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(ConfigError, match=r"list\.json: expected a table at the top, got list$"):
        Pipeline.from_config(tmp_path / "list.json")
    (tmp_path / "p.yaml").write_text("source: {items: [1]}\n")
    monkeypatch.setitem(sys.modules, "yaml", None)
    with pytest.raises(
        ConfigError, match=r"p\.yaml: reading YAML needs PyYAML: pip install 'iopipe-ml\[yaml\]'$"
    ):
        Pipeline.from_config(tmp_path / "p.yaml")


def test_missing_data_is_a_file_not_found_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no files match"):
        Pipeline.from_config({"source": {"files": str(tmp_path / "*.none")}})


# -- sizes and names ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "n"),
    [
        (4096, 4096),
        ("512", 512),
        ("4MiB", 4 << 20),
        ("256KiB", 256 << 10),
        ("256k", 256 << 10),
        ("1G", 1 << 30),
        ("1GB", 10**9),
        ("1.5GiB", 3 << 29),
        (" 2 MiB ", 2 << 20),
    ],
)
def test_parse_size(text: Any, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "MiB", "1.5B", "4 parsecs", "-1K", None, 1.5])
def test_parse_size_rejects(text: Any) -> None:
    with pytest.raises(ValueError, match=r"^not a size in bytes: "):
        parse_size(text)


def test_format_size() -> None:
    assert [format_size(n) for n in (4 << 20, 256 << 10, 1 << 30, 1000, 3 << 29)] == [
        "4MiB",
        "256KiB",
        "1GiB",
        "1000B",
        "1536MiB",
    ]


def test_function_names_resolve_both_ways() -> None:
    assert function_name(first_byte) == f"{MOD}:first_byte"
    assert resolve_function(f"{MOD}:first_byte") is first_byte
    assert resolve_function("os.path:join") is __import__("os").path.join


@pytest.mark.parametrize(
    ("text", "want"),
    [("9007199254740993", 9007199254740993), ("1.5GiB", 3 << 29), (".5K", 512)],
)
def test_sizes_are_parsed_exactly(text: str, want: int) -> None:
    assert parse_size(text) == want  # a float would round 2**53 + 1


@pytest.mark.parametrize("bad", ["1" * 400, 2**70, "9EiB", "16777216TiB"])
def test_huge_sizes_are_a_value_error(bad: object) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(bad)  # type: ignore[arg-type]


def test_a_deeply_nested_config_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "deep.json"
    path.write_text('{"source": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ConfigError, match="nested too deeply"):
        Pipeline.from_config(path)


def test_a_deeply_nested_value_in_a_mapping_is_a_config_error_shown_short() -> None:
    # A dict built in code (or by a YAML loader) need not pass load_config's depth check;
    # the message quotes the value bounded, not with a repr that recurses.
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(
        ConfigError, match=r"^options\.timeout: expected a number > 0, got \[\[\["
    ) as info:
        Pipeline.from_config({"source": {"items": [1]}, "options": {"timeout": deep}})
    assert len(str(info.value)) < 200
