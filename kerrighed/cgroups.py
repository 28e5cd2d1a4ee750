"""A node's CPU limit: one cgroup per node with a CPU quota, its jobs' processes inside.

A local cluster runs all its nodes on one machine, where every simulated node could use every CPU
and no node would ever be busier than another. With `cpu_limit = 0.5` (cluster.toml, or
`krgadm cluster start --local N --cpu-limit 0.5`) each node's daemon makes a cgroup of its own
with a quota of half a CPU and starts its jobs in it, so that four jobs on one node really run
four times slower than one job on each of four nodes, as on separate machines.

Both kinds of machine this project runs on are handled:

    cgroup v2  <cgroup2 mount>/<name>/cpu.max = "QUOTA PERIOD"   (cpu enabled in the root's
               cgroup.subtree_control; used when the cgroup2 hierarchy offers the cpu controller)
    cgroup v1  <cpu hierarchy>/<name>/cpu.cfs_quota_us and cpu.cfs_period_us   (e.g. a hybrid
               machine: v1 hierarchies at /sys/fs/cgroup/{cpu,...}, cgroup2 at .../unified
               with no controller)

The cgroup is made at the root of the hierarchy (so no enclosing limit applies) and named after
the cluster and the node, so that two local clusters on one machine never share one. It is
removed when the daemon stops.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from kerrighed.errors import ConfigError

log = logging.getLogger(__name__)

PERIOD_US = 100_000             # the kernel's default CFS period
MIN_QUOTA_US = 1_000            # the kernel refuses less


@dataclass(frozen=True)
class Hierarchy:
    version: int                # 1 or 2
    root: Path                  # where it is mounted

    def __str__(self) -> str:
        return f"cgroup v{self.version} at {self.root}"


def _mounts(text: str) -> list[tuple[str, str, list[str]]]:
    """(mount point, file system type, options) of each line of /proc/self/mounts."""
    out = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 4:
            point = fields[1].replace("\\040", " ")
            out.append((point, fields[2], fields[3].split(",")))
    return out


def find_cpu_hierarchy(mounts: str | None = None) -> Hierarchy:
    """The hierarchy whose cpu controller we may use: cgroup2 if it offers cpu, else a v1 hierarchy
    with cpu; a ConfigError naming what is missing if neither."""
    if mounts is None:
        mounts = Path("/proc/self/mounts").read_text()
    table = _mounts(mounts)
    unified = [Path(point) for point, fstype, _ in table if fstype == "cgroup2"]
    offered = {}
    for root in unified:
        try:
            offered[root] = (root / "cgroup.controllers").read_text().split()
        except OSError:
            offered[root] = []
        if "cpu" in offered[root]:
            return Hierarchy(2, root)
    for point, fstype, options in table:
        if fstype == "cgroup" and "cpu" in options:
            return Hierarchy(1, Path(point))
    if unified:
        v2 = "; ".join(f"the cgroup2 hierarchy at {root} does not offer it (its controllers: "
                       f"{' '.join(offered[root]) or 'none'})" for root in unified)
    else:
        v2 = "no cgroup2 hierarchy is mounted"
    raise ConfigError(f"cannot limit the nodes' CPU (cpu_limit): no cgroup v1 hierarchy with the 'cpu' "
                      f"controller is mounted, and {v2}")


def cgroup_name(home: Path, session: int, node: int) -> str:
    """krg-<session>-<hash of the home>-node<N>: unique to one node of one cluster on this machine."""
    digest = hashlib.sha1(os.fsencode(os.path.abspath(home))).hexdigest()[:8]
    return f"krg-{session}-{digest}-node{node}"


class NodeCgroup:
    """The cgroup of one node: made with its quota, jobs' processes put in, removed at the end."""

    def __init__(self, hierarchy: Hierarchy, name: str, cpus: float):
        if not cpus > 0:
            raise ConfigError(f"cpu_limit must be a positive number of CPUs, not {cpus}")
        self.hierarchy, self.name, self.cpus = hierarchy, name, cpus
        self.path = hierarchy.root / name
        self.procs = self.path / "cgroup.procs"

    def __str__(self) -> str:
        return str(self.path)

    @property
    def quota_us(self) -> int:
        return max(MIN_QUOTA_US, round(self.cpus * PERIOD_US))

    def create(self) -> None:
        """Make the cgroup (or take over the one a killed daemon left) and set its quota."""
        try:
            if self.hierarchy.version == 2:
                self._enable_cpu_controller()
            self.path.mkdir(exist_ok=True)
            if self.hierarchy.version == 2:
                _write(self.path / "cpu.max", f"{self.quota_us} {PERIOD_US}")
            else:
                _write(self.path / "cpu.cfs_period_us", str(PERIOD_US))
                _write(self.path / "cpu.cfs_quota_us", str(self.quota_us))
        except OSError as e:
            raise ConfigError(f"cannot limit this node to {self.cpus:g} CPU with {self.hierarchy}: "
                              f"{e.filename or self.path}: {e.strerror}") from None
        log.info("jobs of this node run in %s, limited to %g CPU (%d us every %d us)", self.path, self.cpus,
                 self.quota_us, PERIOD_US)

    def _enable_cpu_controller(self) -> None:
        control = self.hierarchy.root / "cgroup.subtree_control"
        if "cpu" not in control.read_text().split():
            _write(control, "+cpu")

    def add(self, pid: int) -> bool:
        """Put process `pid` (all its threads) in; False if it is gone."""
        try:
            _write(self.procs, str(pid))
            return True
        except ProcessLookupError:
            return False
        except OSError as e:
            if e.errno == errno.ESRCH:
                return False
            raise

    def release(self, pid: int) -> bool:
        """Take process `pid` out, into the hierarchy's root (no quota); False if it is gone."""
        try:
            _write(self.hierarchy.root / "cgroup.procs", str(pid))
            return True
        except ProcessLookupError:
            return False
        except OSError as e:
            if e.errno == errno.ESRCH:
                return False
            raise

    def holds(self, pid: int) -> bool:
        return cgroup_of(pid, self.hierarchy) == "/" + self.name

    def members(self) -> list[int]:
        try:
            return [int(x) for x in self.procs.read_text().split()]
        except OSError:
            return []

    def remove(self, timeout: float = 3.0) -> bool:
        """Remove the cgroup. Processes still in it after `timeout` s (a shepherd taking its time to
        exit) are moved to the root first. False if it could not be removed."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.path.rmdir()
                return True
            except FileNotFoundError:
                return True
            except OSError as e:
                if e.errno != errno.EBUSY:
                    log.warning("cannot remove %s: %s", self.path, e.strerror)
                    return False
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        left = self.members()
        log.warning("%s still holds processes %s; moving them out", self.path, left)
        for pid in left:
            try:
                self.release(pid)
            except OSError:
                pass
        try:
            self.path.rmdir()
            return True
        except OSError as e:
            log.warning("cannot remove %s: %s", self.path, e.strerror)
            return False


def cgroup_of(pid: int, hierarchy: Hierarchy) -> str | None:
    """The path of `pid`'s cgroup in `hierarchy` (from /proc/PID/cgroup), None if it is gone."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        ident, controllers, path = line.split(":", 2)
        if hierarchy.version == 2 and ident == "0" and controllers == "":
            return path
        if hierarchy.version == 1 and "cpu" in controllers.split(","):
            return path
    return None


def _write(path: Path, text: str) -> None:
    # One write(2) per value: cgroup files take a value per write call.
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
