"""Functions a config names (``"package.module:function"``) and which of them it may run.

A config is data that may come from anywhere (a repository, a job queue, a
colleague), yet naming a function in it runs code: importing a module runs
its top level, and the function is called on every item.  So a config may
name only:

- functions in modules the caller allows (``allow=["myproject"]`` allows
  ``myproject`` and every module below it; ``iopipe run --allow myproject``);
- a few pure built-ins (:data:`SAFE_BUILTINS`: ``builtins:len``,
  ``builtins:bytes``...), which read their argument and touch nothing else;
- anything, when the caller says the config is trusted (``trusted=True``,
  ``iopipe run --trusted``), as a Python file would be.

The check is on the name, before anything is imported: a refused module's
top level never runs.  See docs/config.md ("What a config may run").
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from ..runtime.errors import IopipeError, show

__all__ = [
    "SAFE_BUILTINS",
    "ConfigError",
    "FunctionName",
    "Trust",
    "check_name",
    "function_name",
    "resolve_function",
]

#: Built-ins a config may name without an allow list: each reads its argument
#: and returns a value, with no I/O, no import and no access to other objects.
#: ``bytes`` and ``bytearray`` are not among them: ``bytes(60_000_000_000)``
#: from a config's items would allocate 60 GB.
SAFE_BUILTINS = frozenset(
    {
        "abs",
        "bool",
        "dict",
        "float",
        "frozenset",
        "int",
        "len",
        "list",
        "max",
        "memoryview",
        "min",
        "round",
        "set",
        "sorted",
        "str",
        "sum",
        "tuple",
    }
)

_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_HELP = 'see docs/config.md, "What a config may run"'
_MAX_NAME = 500  # characters in a "package.module:function" name


class FunctionName(str):
    """A well-formed ``"package.module:function"`` from a config, not yet imported."""

    __slots__ = ()

    @property
    def module(self) -> str:
        """The module part: ``"package.module"``."""
        return self.split(":")[0]


class ConfigError(IopipeError, ValueError):
    """A pipeline config is invalid.

    Attributes:
        path: The key path of the offending value (``"stages[2].concurrency"``),
            or ``""`` for the document as a whole.
    """

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


def check_name(v: Any, path: str) -> FunctionName:
    """Return ``v`` as a :class:`FunctionName` if it is well formed; import nothing."""
    if isinstance(v, str) and len(v) <= _MAX_NAME and v.count(":") == 1:
        mod, qual = v.split(":")
        if _MODULE.fullmatch(mod) and all(p.isidentifier() for p in qual.split(".")):
            return FunctionName(v)
    raise ConfigError(path, f"expected 'package.module:function', got {show(v)}")


@dataclass(frozen=True)
class Trust:
    """Which modules a config's functions may come from (see the module docstring).

    Args:
        allow: module names; each allows itself and every module below it.
        trusted: allow every module (the config is as trusted as code).
    """

    allow: tuple[str, ...] = ()
    trusted: bool = False

    @classmethod
    def of(cls, allow: Iterable[str] | str | None, trusted: bool) -> Trust:
        """Check the caller's arguments and build the policy."""
        if not isinstance(trusted, bool):
            raise TypeError(f"trusted must be a bool, got {show(trusted)}")
        names = (allow,) if isinstance(allow, str) else tuple(allow or ())
        for name in names:
            if not isinstance(name, str) or not _MODULE.fullmatch(name):
                raise ValueError(f"allow: expected module names like 'myproject', got {show(name)}")
        return cls(names, trusted)

    def permits(self, name: FunctionName) -> bool:
        """Whether a config may name ``name``."""
        if self.allows_module(name.module):
            return True
        return name.module == "builtins" and name.split(":")[1] in SAFE_BUILTINS

    def permits_module_object(self, module: Any) -> bool:
        """Whether an imported module is what its allowed name says (not an alias)."""
        real = getattr(module, "__name__", None)
        return isinstance(real, str) and (self.allows_module(real) or real == "builtins")

    def allows_module(self, mod: str) -> bool:
        """Whether functions from module ``mod`` may be named."""
        return self.trusted or any(mod == a or mod.startswith(a + ".") for a in self.allow)

    def resolve(self, name: FunctionName, path: str) -> Callable[..., Any]:
        """Import and return ``name`` if this policy permits it.

        Raises:
            ConfigError: the module is not allowed (nothing was imported), or the
                name does not resolve to a callable.
        """
        self.check(name, path)
        return resolve_function(name, path, self)

    def check(self, name: FunctionName, path: str) -> None:
        """Raise the refusal if this policy does not permit ``name``; import nothing.

        Raises:
            ConfigError: the module is not allowed.
        """
        if self.permits(name):
            return
        if name.module == "builtins":
            raise ConfigError(
                path,
                f"{str(name)!r} is not allowed: it is not one of the pure built-ins a config "
                f"may name ({', '.join(sorted(SAFE_BUILTINS))}); {_HELP}",
            )
        top = name.module.split(".")[0]
        raise ConfigError(
            path,
            f"{str(name)!r} is not allowed: module {name.module!r} is not in the allow "
            f"list (from_config(..., allow=[{top!r}]) or iopipe run --allow {top}; "
            f"trusted=True or --trusted for a config as trusted as code); {_HELP}",
        )


def resolve_function(name: str, path: str = "", trust: Trust | None = None) -> Callable[..., Any]:
    """Import ``"package.module:function"`` (or ``"module:Class.attr"``) and return it.

    With ``trust`` (not trusted), the attribute path may not cross into a module
    the policy does not allow (``"mymod:os.system"``) nor through a dunder
    (``"mymod:f.__globals__"``).  Callers holding a config go through
    :meth:`Trust.resolve`, which also checks the module itself before importing it.

    Raises:
        ConfigError: malformed, not importable, missing, not callable or not allowed.
    """
    if not isinstance(name, str) or name.count(":") != 1 or not all(name.split(":")):
        raise ConfigError(path, f"expected 'package.module:function', got {show(name)}")
    mod_name, qual = name.split(":")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ConfigError(path, f"cannot import module {mod_name!r}: {str(exc)[:300]}") from None
    if trust is not None and not trust.trusted and not trust.permits_module_object(obj):
        raise ConfigError(  # an alias in sys.modules, or an importer's redirection
            path, f"{name!r} is not allowed: {mod_name!r} is module {obj.__name__!r}; {_HELP}"
        )
    for part in qual.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(path, f"module {mod_name!r} has no attribute {qual!r}") from None
        if trust is not None and not trust.trusted and _escapes(obj, part, trust):
            raise ConfigError(
                path,
                f"{show(name)} is not allowed: it reaches past {mod_name!r} ({part!r}); {_HELP}",
            )
    if not callable(obj):
        raise ConfigError(path, f"{show(name)} is not callable")
    return obj  # type: ignore[no-any-return]


def _escapes(obj: Any, part: str, trust: Trust) -> bool:
    """Whether an attribute step leaves what ``trust`` allows."""
    if part.startswith("__") and part.endswith("__"):
        return True
    return isinstance(obj, ModuleType) and not trust.allows_module(obj.__name__)


def function_name(fn: Callable[..., Any], path: str = "") -> str:
    """Return ``"package.module:function"`` for ``fn``, checking that it resolves back to it.

    Raises:
        ConfigError: ``fn`` (a lambda, a local function, a partial...) has no importable name.
    """
    module = getattr(fn, "__module__", None)
    qual = getattr(fn, "__qualname__", None)
    if not module or not qual or "<" in qual:
        raise ConfigError(
            path, f"{fn!r:.80} cannot be named in a config: use a module-level function"
        )
    name = f"{module}:{qual}"
    try:
        same = resolve_function(name) is fn
    except ConfigError:
        same = False
    if not same:
        raise ConfigError(path, f"{fn!r:.80} cannot be named in a config: {show(name)} is not it")
    return name
