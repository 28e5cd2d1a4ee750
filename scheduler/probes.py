"""Probes measure this node: CPU use, memory, load. The daemon runs each one every `period_ms`.

These are the only scheduler parts that touch the machine, which is why `import scheduler` does not
import this module (nor psutil): a policy or a CLI can use the scheduler without paying for them.
Names of probes and of their values are Kerrighed's (cpu_usage, ram_free, mean_load, ...).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import psutil

from scheduler._plugin import Param, Plugin, Registry


class Probe(Plugin):
    kind = "probe"
    param_spec = {"period_ms": Param(int, 1000)}    # Kerrighed's default period
    values: ClassVar[tuple[str, ...]]               # the names `measure` returns

    def __init__(self, **params):
        super().__init__(**params)
        if self.params["period_ms"] <= 0:
            raise self._bad_param("period_ms", "a positive number of milliseconds")

    @property
    def period_ms(self) -> int:
        return self.params["period_ms"]

    @abstractmethod
    def measure(self) -> dict[str, float]:
        """One measurement: a value for each name in `values`."""


_probes = Registry(Probe, "kerrighed.probes")
register = _probes.register
get_probe = _probes.get
known_probes = _probes.known


@register
class CpuProbe(Probe):
    name = "cpu"
    description = ("cpu_usage: percent of a CPU busy since the previous measure, "
                   "summed over CPUs (0..100 x CPUs)")
    values = ("cpu_usage",)

    def __init__(self, **params):
        super().__init__(**params)
        # Our own previous sample, not psutil.cpu_percent's module-wide one, which `krg info`
        # also uses: two callers of that would each see the other's interval.
        self._previous = psutil.cpu_times(percpu=True)

    def measure(self) -> dict[str, float]:
        now = psutil.cpu_times(percpu=True)
        usage = sum(_busy_percent(before, after) for before, after in zip(self._previous, now))
        self._previous = now
        return {"cpu_usage": usage}


def _busy_percent(before, after) -> float:
    idle, total = _idle_and_total(after)
    idle0, total0 = _idle_and_total(before)
    elapsed = total - total0
    if elapsed <= 0:
        return 0.0
    return max(0.0, min(100.0, 100.0 * (1 - (idle - idle0) / elapsed)))


def _idle_and_total(times) -> tuple[float, float]:
    # Linux counts guest time inside user time as well: leave it out of the total, as psutil does.
    total = sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
    return times.idle + getattr(times, "iowait", 0.0), total


@register
class MemProbe(Probe):
    name = "mem"
    description = "ram_free (bytes available to new work) and ram_total"
    values = ("ram_free", "ram_total")

    def measure(self) -> dict[str, float]:
        mem = psutil.virtual_memory()
        # `available`, not `free`: page cache is reclaimable, and heartbeats report the same figure.
        return {"ram_free": float(mem.available), "ram_total": float(mem.total)}


@register
class LoadProbe(Probe):
    name = "load"
    description = "active_tasks (runnable tasks now) and mean_load (1-min load average)"
    values = ("active_tasks", "mean_load")

    def measure(self) -> dict[str, float]:
        # /proc/loadavg: "0.52 0.58 0.59 3/1204 56789"; the fourth field is running/total.
        with open("/proc/loadavg") as f:
            fields = f.read().split()
        return {"active_tasks": float(fields[3].split("/")[0]), "mean_load": float(fields[0])}
