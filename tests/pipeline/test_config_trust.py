"""What a config may run: functions only from allowed modules, checked before any import."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from iopipe import ConfigError, Pipeline
from iopipe.probe.cli import main

MOD = __name__


def double(x: int) -> int:
    return 2 * x


@pytest.fixture
def planted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A module ``planted_mod`` that leaves ``imported.txt`` when its top level runs."""
    marker = tmp_path / "imported.txt"
    pkg = tmp_path / "planted_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "sub.py").write_text("def triple(x):\n    return 3 * x\n")
    (tmp_path / "planted_mod.py").write_text(
        "import os\n"
        f"open({str(marker)!r}, 'w').close()\n"
        "def tens():\n    return [10, 20]\n"
        "def inc(x):\n    return x + 1\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield marker
    for name in ("planted_mod", "planted_pkg", "planted_pkg.sub"):
        sys.modules.pop(name, None)


def _map(fn: str, items: list[Any] | None = None) -> dict[str, Any]:
    return {"source": {"items": items or [1, 2]}, "stages": [{"stage": "map", "fn": fn}]}


def test_a_function_from_a_module_not_allowed_is_refused_and_never_runs(tmp_path: Path) -> None:
    victim = tmp_path / "made-by-the-config"
    cfg = _map("os:system", [f"touch {victim}"])
    with pytest.raises(ConfigError) as info:
        Pipeline.from_config(cfg)
    assert info.value.path == "stages[0].fn"
    assert str(info.value).startswith(
        "stages[0].fn: 'os:system' is not allowed: module 'os' is not in the allow list"
    )
    assert "--allow os" in str(info.value)
    assert "What a config may run" in str(info.value)
    assert not victim.exists()


def test_a_source_factory_not_allowed_is_not_called(monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    calls: list[object] = []
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: calls.append(a) or "/nowhere")
    with pytest.raises(ConfigError, match=r"^source\.iterable: 'tempfile:mkdtemp' is not allowed"):
        Pipeline.from_config({"source": {"iterable": "tempfile:mkdtemp"}})
    assert calls == []


def test_a_module_not_allowed_is_never_imported(planted: Path) -> None:
    with pytest.raises(ConfigError, match=r"'planted_mod:inc' is not allowed"):
        Pipeline.from_config(_map("planted_mod:inc"))
    assert "planted_mod" not in sys.modules
    assert not planted.exists()
    with Pipeline.from_config(_map("planted_mod:inc"), allow=["planted_mod"]) as pipe:
        assert list(pipe) == [2, 3]
    assert planted.exists()


def test_nothing_is_imported_before_the_whole_config_is_checked(planted: Path) -> None:
    cfg = _map("planted_mod:inc")
    cfg["stages"].append({"stage": "batch", "batch_size": 0})
    with pytest.raises(ConfigError, match=r"^stages\[1\]\.batch_size: expected an int >= 1"):
        Pipeline.from_config(cfg, allow=["planted_mod"])
    assert not planted.exists()


def test_allow_covers_a_package_and_its_modules_only(planted: Path) -> None:
    with Pipeline.from_config(_map("planted_pkg.sub:triple"), allow="planted_pkg") as pipe:
        assert list(pipe) == [3, 6]
    for allow in (["planted_pkg.sub.x"], ["planted"], ["planted_pk"]):
        with pytest.raises(ConfigError, match=r"'planted_pkg\.sub:triple' is not allowed"):
            Pipeline.from_config(_map("planted_pkg.sub:triple"), allow=allow)


def test_an_allowed_module_is_no_door_to_other_modules(planted: Path) -> None:
    # planted_mod imports os; naming os.system through it is refused.
    for fn, step in (
        ("planted_mod:os.system", "'os'"),
        ("planted_mod:inc.__globals__", "'__globals__'"),
    ):
        with pytest.raises(ConfigError, match=f"reaches past 'planted_mod' \\({step}\\)"):
            Pipeline.from_config(_map(fn), allow=["planted_mod"])
    with Pipeline.from_config(_map("planted_mod:os.fspath", ["a"]), trusted=True) as pipe:
        assert list(pipe) == ["a"]  # trusted: the attribute path is followed


def test_pure_builtins_need_no_allow_list_and_the_rest_of_builtins_is_refused() -> None:
    cfg = {
        "source": {"items": [b"ab", b"c"]},
        "stages": [
            {"stage": "map", "fn": "builtins:len"},
            {"stage": "batch", "batch_size": 2, "collate_fn": "builtins:sum"},
        ],
    }
    with Pipeline.from_config(cfg) as pipe:
        assert list(pipe) == [3]
    for name in ("eval", "exec", "open", "__import__", "compile", "getattr", "print", "input"):
        with pytest.raises(ConfigError, match=f"'builtins:{name}' is not allowed"):
            Pipeline.from_config(_map(f"builtins:{name}"))
    with pytest.raises(ConfigError, match=r"expected 'package\.module:function'"):
        Pipeline.from_config(_map("builtins:len.__self__ x"))


def test_a_pipeline_using_builtins_round_trips_without_an_allow_list() -> None:
    pipe = Pipeline.from_iterable(["x", "yz"]).map(len).batch(2, collate_fn=sum)
    assert Pipeline.from_config(pipe.to_config()).to_config() == pipe.to_config()


def test_a_config_written_from_code_loads_back_with_its_module_allowed() -> None:
    cfg = Pipeline.from_iterable([1, 2]).map(double).to_config()
    assert cfg["stages"][0]["fn"] == f"{MOD}:double"
    with pytest.raises(ConfigError, match="is not allowed"):
        Pipeline.from_config(cfg)
    with Pipeline.from_config(cfg, allow=[MOD.split(".")[0]]) as pipe:
        assert list(pipe) == [2, 4]


def test_trusted_allows_any_importable_function() -> None:
    with Pipeline.from_config(_map("operator:neg"), trusted=True) as pipe:
        assert list(pipe) == [-1, -2]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"allow": [5]}, ValueError, "allow: expected module names like 'myproject', got 5"),
        ({"allow": ["a b"]}, ValueError, "allow: expected module names"),
        ({"allow": [""]}, ValueError, "allow: expected module names"),
        ({"trusted": "yes"}, TypeError, "trusted must be a bool, got 'yes'"),
    ],
)
def test_bad_trust_arguments(kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        Pipeline.from_config({"source": {"items": [1]}}, **kwargs)


def test_iopipe_run_refuses_a_config_naming_a_module_not_allowed(
    planted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "cfg.toml"
    cfg.write_text('source.items = [1, 2]\n[[stages]]\nstage = "map"\nfn = "planted_mod:inc"\n')
    assert main(["run", str(cfg), "--json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("iopipe run: error: stages[0].fn: 'planted_mod:inc' is not allowed")
    assert "--allow planted_mod" in err
    assert not planted.exists()
    assert main(["run", str(cfg), "--json", "--allow", "planted_mod"]) == 0
    assert '"elements": 2' in capsys.readouterr().out
    sys.modules.pop("planted_mod", None)
    assert main(["run", str(cfg), "--json", "--trusted"]) == 0


def test_iopipe_run_refuses_a_bad_module_name_as_usage() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "iopipe", "run", "x.toml", "--allow", "a b"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 2
    assert "argument --allow: expected a module name like 'myproject', got 'a b'" in out.stderr


def test_every_name_is_permitted_before_any_is_imported(planted: Path) -> None:
    cfg = _map("planted_mod:inc")
    cfg["stages"].append({"stage": "map", "fn": "os:system"})
    with pytest.raises(ConfigError, match=r"^stages\[1\]\.fn: 'os:system' is not allowed"):
        Pipeline.from_config(cfg, allow=["planted_mod"])
    assert "planted_mod" not in sys.modules
    assert not planted.exists()


def test_a_builtin_outside_the_safe_ones_is_refused_without_suggesting_all_builtins() -> None:
    for name in ("eval", "bytes", "bytearray", "type"):
        with pytest.raises(ConfigError) as info:
            Pipeline.from_config(_map(f"builtins:{name}"))
        assert "not one of the pure built-ins a config may name" in str(info.value)
        assert "allow=['builtins']" not in str(info.value)


def test_a_module_alias_in_sys_modules_does_not_pass_for_the_allowed_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import os as real_os

    monkeypatch.setitem(sys.modules, "innocent_alias", real_os)
    with pytest.raises(ConfigError, match=r"'innocent_alias' is module 'os'"):
        Pipeline.from_config(_map("innocent_alias:getcwd"), allow=["innocent_alias"])


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (
            {"source": {"items": [1]}, "stages": [{"stage": [1]}]},
            r"^stages\[0\]\.stage: unknown stage \[1\]",
        ),
        (
            {"source": {"items": [1]}, "x" * 100_000: 1},
            r"^x{60}\.\.\.\(100000 characters\): unknown key",
        ),
        (
            _map("m" * 10_000 + ":f"),
            r"^stages\[0\]\.fn: expected 'package\.module:function', got 'mmm",
        ),
    ],
)
def test_hostile_names_and_keys_are_config_errors_quoted_short(
    cfg: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        Pipeline.from_config(cfg)
    assert len(str(info.value)) < 1000
