"""The cluster-wide scheduler configuration: which placement policy, which balancer, their parameters.

It travels between nodes and to `krgadm` as a plain dict (msgpack), and is written on the command line
as `NAME` or `NAME:key=value,key=value`. Nodes boot with round-robin placement and no balancer, so no
running job moves until an administrator configures a balancer (Kerrighed moved nothing either).
Policies and balancers are two families with their own names (`kerrighed.policies`,
`kerrighed.balancers`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kerrighed.errors import ConfigError, UsageError
from scheduler.balancer import Balancer, get_balancer
from scheduler.policy import Policy, get_policy, policy_names

_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?")
_BOOLS = {"true": True, "false": False}


@dataclass(frozen=True)
class SchedulerConfig:
    policy: str = "round_robin"
    params: dict[str, Any] = field(default_factory=dict)
    balancer: str | None = None
    balancer_params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "params": dict(self.params),
                "balancer": self.balancer, "balancer_params": dict(self.balancer_params)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SchedulerConfig:
        if not isinstance(data, Mapping):
            raise ConfigError(f"scheduler configuration must be a table, not {data!r}")
        valid = ("policy", "params", "balancer", "balancer_params")
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ConfigError(f"unknown scheduler setting {unknown[0]!r} (valid: {', '.join(valid)})")
        policy = data.get("policy", cls.policy)
        balancer = data.get("balancer")
        if not isinstance(policy, str):
            raise ConfigError(f"scheduler policy must be a name, not {policy!r}")
        if balancer is not None and not isinstance(balancer, str):
            raise ConfigError(f"scheduler balancer must be a name, not {balancer!r}")
        return cls(policy, _params(data, "params"), balancer, _params(data, "balancer_params"))

    def validate(self) -> None:
        """Build both components once, so a bad name or parameter fails now with ConfigError."""
        self.make_policy()
        self.make_balancer()

    def make_policy(self) -> Policy:
        return get_policy(self.policy)(**self.params)

    def make_balancer(self) -> Balancer | None:
        if self.balancer is None:
            if self.balancer_params:
                raise ConfigError("balancer parameters are set but no balancer is")
            return None
        try:
            cls = get_balancer(self.balancer)
        except ConfigError as e:
            if self.balancer in policy_names():
                raise ConfigError(f"{e}; {self.balancer!r} is a placement policy, which places new jobs "
                                  "but never moves running ones") from None
            raise
        return cls(**self.balancer_params)


def _params(data: Mapping[str, Any], key: str) -> dict[str, Any]:
    params = data.get(key) or {}
    if not isinstance(params, Mapping) or not all(isinstance(k, str) for k in params):
        raise ConfigError(f"scheduler {key} must be a table of name = value, not {params!r}")
    return dict(params)


def parse_assignment(text: str) -> tuple[str, dict[str, Any]]:
    """`least_loaded` or `least_loaded:key=value,key=value` -> (name, params).

    Integers, decimals and true/false become numbers and booleans; anything else stays a string.
    """
    name, colon, rest = text.partition(":")
    name = name.strip()
    if not name or any(c.isspace() for c in name):
        raise UsageError(f"invalid scheduler component {text!r}: expected NAME or NAME:key=value,...")
    params: dict[str, Any] = {}
    if colon:
        for item in rest.split(","):
            key, eq, value = (part.strip() for part in item.partition("="))
            if not (key and eq and value):
                raise UsageError(f"invalid parameter {item.strip()!r} in {text!r}: expected key=value")
            if key in params:
                raise UsageError(f"parameter {key!r} given twice in {text!r}")
            params[key] = _value(value)
    return name, params


def _value(text: str) -> Any:
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    return _BOOLS.get(text.lower(), text)
