"""What probes, filters and policies share: named, parameterised, found by name.

Kerrighed loaded scheduler components by name and let users write their own. Here a component is a
class with a `name`; the ones shipped with Kerrighed register themselves in-tree, and third parties
publish theirs as Python entry points (`kerrighed.policies`, `kerrighed.probes`,
`kerrighed.filters`), so a pip-installed package is enough to add one. In-tree names win, so a
plugin cannot silently replace a shipped component.
"""

from __future__ import annotations

import enum
from abc import ABC
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, ClassVar, Generic, TypeVar

from kerrighed.errors import ConfigError


class _Required(enum.Enum):
    REQUIRED = "required"


REQUIRED = _Required.REQUIRED

_KIND_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


@dataclass(frozen=True)
class Param:
    """One parameter a component accepts: its type (bool, int, float or str) and its default."""

    kind: type
    default: Any = REQUIRED


class Plugin(ABC):
    """Base of probes, filters and policies: `__init__(**params)` checks params against the spec."""

    kind: ClassVar[str]              # "policy", "probe", "filter": set by each family's base class
    name: ClassVar[str]
    description: ClassVar[str]
    param_spec: ClassVar[Mapping[str, Param]] = {}

    def __init__(self, **params):
        self.params: dict[str, Any] = self._checked(params)

    @classmethod
    def accepted_params(cls) -> dict[str, Param]:
        """The spec merged along the class hierarchy, so a subclass adds to its base's parameters."""
        merged: dict[str, Param] = {}
        for klass in reversed(cls.__mro__):
            merged.update(vars(klass).get("param_spec", {}))
        return merged

    @classmethod
    def _checked(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        spec = cls.accepted_params()
        unknown = sorted(set(given) - set(spec))
        if unknown:
            valid = ", ".join(sorted(spec)) or "none"
            raise ConfigError(f"{cls.kind} {cls.name!r} has no parameter {unknown[0]!r} (valid: {valid})")
        values = {}
        for key, param in spec.items():
            if key in given:
                values[key] = cls._typed(key, param.kind, given[key])
            elif param.default is REQUIRED:
                raise ConfigError(f"{cls.kind} {cls.name!r} needs parameter {key!r} "
                                  f"(e.g. {cls.name}:{key}=...)")
            else:
                values[key] = param.default
        return values

    @classmethod
    def _typed(cls, key: str, kind: type, value: Any) -> Any:
        # bool is an int in Python: keep `true` out of numeric parameters and 1 out of flags.
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
            return value
        raise ConfigError(f"{cls.kind} {cls.name!r}: parameter {key!r} must be "
                          f"{_KIND_WORDS[kind]}, not {value!r}")

    def _bad_param(self, key: str, must: str) -> ConfigError:
        return ConfigError(f"{self.kind} {self.name!r}: parameter {key!r} must be {must}, "
                           f"not {self.params[key]!r}")


P = TypeVar("P", bound=Plugin)


class Registry(Generic[P]):
    """The components of one family: in-tree ones by name, then an entry-point group."""

    def __init__(self, base: type[P], group: str):
        self.base = base
        self.group = group
        self._in_tree: dict[str, type[P]] = {}

    def register(self, cls: type[P]) -> type[P]:
        """Class decorator for in-tree components."""
        if not issubclass(cls, self.base):
            raise TypeError(f"{cls.__name__} is not a {self.base.__name__}")
        if cls.name in self._in_tree:
            raise ValueError(f"{self.base.kind} {cls.name!r} registered twice")
        self._in_tree[cls.name] = cls
        return cls

    def get(self, name: str) -> type[P]:
        if name in self._in_tree:
            return self._in_tree[name]
        for ep in self._entry_points():
            if ep.name == name:
                return self._load(ep)
        raise ConfigError(f"unknown {self.base.kind} {name!r} (known: {', '.join(self.names())})")

    def names(self) -> list[str]:
        """Every known name, without importing any plugin."""
        return sorted(set(self._in_tree) | {ep.name for ep in self._entry_points()})

    def known(self) -> dict[str, str]:
        """Name -> description. A plugin that fails to load is listed with the reason, so a listing
        shows what is broken instead of failing as a whole."""
        described = {name: cls.description for name, cls in self._in_tree.items()}
        for ep in self._entry_points():
            if ep.name not in described:
                try:
                    described[ep.name] = self._load(ep).description
                except ConfigError as e:
                    described[ep.name] = f"(cannot load: {e})"
        return dict(sorted(described.items()))

    def _entry_points(self):
        return entry_points(group=self.group)

    def _load(self, ep) -> type[P]:
        kind = self.base.kind
        try:
            cls = ep.load()
        except Exception as e:     # a third party's import can fail in any way: report, don't crash
            raise ConfigError(f"{kind} {ep.name!r} ({ep.value}) failed to load: {e}") from e
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise ConfigError(f"{kind} {ep.name!r} ({ep.value}) is not a {self.base.__name__} subclass")
        if getattr(cls, "name", None) != ep.name:
            # Otherwise `scheduler show` would print a name that differs from the configured one.
            raise ConfigError(f"{kind} {ep.name!r} ({ep.value}) calls itself "
                              f"{getattr(cls, 'name', None)!r}; the entry point and the class must agree")
        return cls
