"""Kerrighed capabilities: what a job may do in the cluster (migrate, be checkpointed, ...).

Kerrighed kept four bit sets per process and changed them with `krgcapset`; our users know that
interface, so this module keeps its bits, its names, its rules and its `krgcapset -s` text. It is
pure logic: the daemon stores a `Capabilities` per job and asks it questions.

- Effective is what is checked; Permitted bounds Effective and can only shrink; the two inheritable
  sets are what children get: child.permitted = parent.inheritable_permitted, child.effective =
  parent.inheritable_effective & parent.inheritable_permitted, inheritable sets copied.
- Changing any set needs CHANGE_KERRIGHED_CAP effective. Root may bypass that and the shrink-only
  rule (`force_root`); nobody may break the bounds between the sets.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from kerrighed.errors import PermissionDenied, ProtocolError, UsageError


class Cap(enum.IntEnum):
    """Kerrighed 3.0's capability bits, with its names."""

    CHANGE_KERRIGHED_CAP = 0
    CAN_MIGRATE = 1
    DISTANT_FORK = 2
    FORK_DELAY = 3
    CHECKPOINTABLE = 4
    USE_REMOTE_MEMORY = 5
    USE_INTRA_CLUSTER_KERSTREAMS = 6
    USE_INTER_CLUSTER_KERSTREAMS = 7
    USE_WORLD_VISIBLE_KERSTREAMS = 8
    SEE_LOCAL_PROC_STAT = 9
    DEBUG = 10
    SYSCALL_EXIT_HOOK = 11

    @property
    def mask(self) -> int:
        return 1 << self


def _mask(caps: Iterable[Cap]) -> int:
    mask = 0
    for cap in caps:
        mask |= cap.mask
    return mask


ALL = _mask(Cap)
# The ones this cluster implements, like the kernel's KRG_CAP_SUPPORTED: the other names are known
# so that Kerrighed scripts get "not supported" rather than "unknown", but no job may hold them.
SUPPORTED = _mask([Cap.CHANGE_KERRIGHED_CAP, Cap.CAN_MIGRATE, Cap.DISTANT_FORK, Cap.CHECKPOINTABLE,
                   Cap.USE_REMOTE_MEMORY, Cap.SEE_LOCAL_PROC_STAT])

SETS = ("permitted", "effective", "inheritable_permitted", "inheritable_effective")
_TITLES = {"permitted": "Permitted", "effective": "Effective",
           "inheritable_permitted": "Inheritable Permitted", "inheritable_effective": "Inheritable Effective"}
# Each set must stay within its bound; permitted's bound is SUPPORTED (ALL for stored values).
_BOUNDS = {"effective": "permitted", "inheritable_permitted": "permitted",
           "inheritable_effective": "inheritable_permitted"}

_OCTAL = re.compile(r"[0-7]+")


@dataclass(frozen=True)
class Capabilities:
    permitted: int
    effective: int
    inheritable_permitted: int
    inheritable_effective: int

    # What a job gets when nobody ran krgcapset: Kerrighed's init task values (KRG_CAP_INIT_*_SET),
    # everything supported permitted and inheritable-permitted, only CHANGE_KERRIGHED_CAP effective
    # and inheritable-effective. So a job may not migrate or be checkpointed until the user asks
    # (`krgcapset -d +CAN_MIGRATE`), and DEFAULT.child() == DEFAULT.
    DEFAULT: ClassVar[Capabilities]

    def __post_init__(self):
        for name in SETS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value & ~ALL or value < 0:
                raise ValueError(f"{name} capabilities must be bits of 0{ALL:o}, not {value!r}")
        for name, bound in _BOUNDS.items():
            outside = getattr(self, name) & ~getattr(self, bound)
            if outside:
                raise ValueError(f"{name} capabilities {names(outside)} are not in the {bound} set")

    def has(self, cap: Cap | int | str) -> bool:
        """Whether `cap` (a Cap, a bit number or a name) is effective, which is what Kerrighed checked."""
        return bool(self.effective & _cap(cap).mask)

    @property
    def can_change(self) -> bool:
        """Whether krgcapset may change these without root."""
        return self.has(Cap.CHANGE_KERRIGHED_CAP)

    def child(self) -> Capabilities:
        """The capabilities of a process this one forks (or a job it launches)."""
        return Capabilities(
            permitted=self.inheritable_permitted,
            effective=self.inheritable_effective & self.inheritable_permitted,
            inheritable_permitted=self.inheritable_permitted,
            inheritable_effective=self.inheritable_effective,
        )

    def change(self, set_name: str, spec: str, *, force_root: bool = False) -> Capabilities:
        """One krgcapset change: `spec` is `+NAME,...`, `-NAME,...`, `NAME,...` or an octal number."""
        return self.apply([(set_name, spec)], force_root=force_root)

    def apply(self, changes: Iterable[tuple[str, str]], *, force_root: bool = False) -> Capabilities:
        """Several changes made by one krgcapset command, in order.

        Like krgcapset, the right to change is checked once, on the capabilities before the command,
        so `-e -CHANGE_KERRIGHED_CAP -d +CAN_MIGRATE` works in either order.
        """
        parsed = [(_set_name(set_name), *_parse(spec)) for set_name, spec in changes]
        if not (force_root or self.can_change):
            raise PermissionDenied("changing Kerrighed capabilities needs CHANGE_KERRIGHED_CAP "
                                   "in the effective set")
        caps = self
        for set_name, sign, mask in parsed:
            value = getattr(caps, set_name)
            if sign == "+":
                value |= mask
            elif sign == "-":
                value &= ~mask
            else:
                value = mask
            caps = caps._set(set_name, value, force_root)
        return caps

    def _set(self, set_name: str, value: int, force_root: bool) -> Capabilities:
        unsupported = value & ~SUPPORTED
        if unsupported:
            raise UsageError(f"capabilities not supported by this cluster: {names(unsupported)} "
                             f"(supported: {names(SUPPORTED)})")
        if set_name == "permitted":
            regained = value & ~self.permitted
            if regained and not force_root:
                raise PermissionDenied(f"{names(regained)} left the permitted set and cannot be regained")
            # Shrinking the bound shrinks what it bounds, where Kerrighed refused the whole request.
            return Capabilities(value, self.effective & value, self.inheritable_permitted & value,
                                self.inheritable_effective & value)
        bound = _BOUNDS[set_name]
        outside = value & ~getattr(self, bound)
        if outside:
            hint = ("" if bound == "permitted"
                    else f"; add it there first with 'krgcapset -i +{names(outside)}'")
            raise PermissionDenied(f"cannot add {names(outside)} to the {_label(set_name)} set: "
                                   f"not in the {_label(bound)} set{hint}")
        if set_name == "inheritable_permitted":
            return replace(self, inheritable_permitted=value,
                           inheritable_effective=self.inheritable_effective & value)
        return replace(self, **{set_name: value})

    def show(self) -> str:
        """Exactly what `krgcapset -s` printed, final newline included."""
        return "".join(f"{_TITLES[name]} Capabilities: 0{getattr(self, name):o}\n"
                       f"{_listing(getattr(self, name))}\n" for name in SETS)

    def to_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in SETS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Capabilities:
        try:
            return cls(**{name: data[name] for name in SETS})
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"malformed capabilities {data!r}: {e}") from None


Capabilities.DEFAULT = Capabilities(
    permitted=SUPPORTED,
    effective=Cap.CHANGE_KERRIGHED_CAP.mask,
    inheritable_permitted=SUPPORTED,
    inheritable_effective=Cap.CHANGE_KERRIGHED_CAP.mask,
)


def names(mask: int) -> str:
    """`CAN_MIGRATE,CHECKPOINTABLE` for a mask, in bit order; `none` for 0."""
    return ",".join(cap.name for cap in Cap if mask & cap.mask) or "none"


def _cap(cap: Cap | int | str) -> Cap:
    try:
        if isinstance(cap, str):
            return Cap[cap.strip().upper()]
        return Cap(cap)
    except (KeyError, ValueError):
        raise UsageError(f"unknown capability {cap!r} (known: {names(ALL)})") from None


def _set_name(set_name: str) -> str:
    if set_name not in SETS:
        raise UsageError(f"unknown capability set {set_name!r} (sets: {', '.join(SETS)})")
    return set_name


def _label(set_name: str) -> str:
    return _TITLES[set_name].lower()


def _parse(spec: str) -> tuple[str, int]:
    """krgcapset's syntax -> (sign, mask): `+` adds the mask, `-` removes it, `` sets it exactly."""
    text = spec.strip()
    if text.isdigit():
        # Always octal, as `krgcapset -s` prints and its usage promises, leading 0 or not (Kerrighed's
        # strtol(base 0) read `10` as decimal).
        if not _OCTAL.fullmatch(text):
            raise UsageError(f"invalid capability value {spec!r}: not an octal number")
        value = int(text, 8)
        if value & ~ALL:
            raise UsageError(f"invalid capability value {spec!r}: bits beyond 0{ALL:o} "
                             f"(known: {names(ALL)})")
        return "", value
    sign = text[0] if text[:1] in ("+", "-") else ""
    items = text[len(sign):].split(",")
    if not text or not all(item.strip() for item in items):
        raise UsageError(f"invalid capability list {spec!r}: "
                         "expected [+|-]NAME[,NAME...] or an octal number")
    return sign, _mask(_cap(item) for item in items)


def _listing(mask: int) -> str:
    """krgcapset's list of names: tab-indented, comma-separated, wrapped before column 80.

    It reproduces print_capability()'s column count as written, quirks included, since scripts
    parse this output; an empty set prints an empty line.
    """
    out = []
    column = 8
    for cap in Cap:
        if not mask & cap.mask:
            continue
        width = len(cap.name) + 2
        if column + width < 80:
            if column != 8:
                out.append(", ")
                width += 2
            else:
                out.append("\t")
        else:
            out.append("\n\t")
            column = 8
        out.append(cap.name)
        column += width
    return "".join(out)
