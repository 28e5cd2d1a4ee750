"""What a policy sees: a snapshot of the cluster, the job to place, the migrations it asks for.

Policies are pure functions of these values, so they are plain frozen dataclasses the daemon builds
from heartbeats and the process table. This module is a leaf: it imports nothing of ours, and its
checks raise ValueError because a bad value here is a bug in whoever built it, not a user mistake.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NodeLoad:
    node: int
    cpus: int
    load: float              # 1-min load average
    cpu_percent: float
    mem_total: int           # bytes
    mem_free: int            # bytes
    jobs: int                # running jobs the cluster placed there
    cpu_share: float = 1.0   # fraction of its CPUs this node may use (a CPU-limited simulated node)
    runnable: float | None = None   # CPUs' worth of work its jobs want now (None: not measured)

    def __post_init__(self):
        if self.cpus < 1:
            raise ValueError(f"node {self.node}: cpus must be at least 1, not {self.cpus}")
        if not 0 < self.cpu_share <= 1:
            raise ValueError(f"node {self.node}: cpu_share must be in (0, 1], not {self.cpu_share}")
        if self.runnable is not None and self.runnable < 0:
            raise ValueError(f"node {self.node}: runnable must be 0 or more, not {self.runnable}")

    @property
    def capacity(self) -> float:
        """The CPUs this node may really use."""
        return self.cpus * self.cpu_share

    @property
    def busy(self) -> float:
        """Its load relative to its capacity: the runnable work (or, unmeasured, the load
        average) per usable CPU. 1.0 is a node exactly full; 2.0 has twice the work it can run."""
        return (self.load if self.runnable is None else self.runnable) / self.capacity


@dataclass(frozen=True)
class ClusterView:
    nodes: tuple[NodeLoad, ...]   # online nodes, sorted by id
    local: int                    # the node deciding
    now: float = 0.0              # when the snapshot was taken: seconds on the decider's monotonic clock
    moving: frozenset[int] = frozenset()   # jobs whose migration (asked by the decider) is under way

    def __post_init__(self):
        # The daemon builds views from dicts of heartbeats: sort here so no caller can forget.
        nodes = tuple(sorted(self.nodes, key=lambda n: n.node))
        for a, b in zip(nodes, nodes[1:]):
            if a.node == b.node:
                raise ValueError(f"node {a.node} appears twice in the cluster view")
        object.__setattr__(self, "nodes", nodes)
        object.__setattr__(self, "moving", frozenset(self.moving))

    @property
    def ids(self) -> tuple[int, ...]:
        return tuple(n.node for n in self.nodes)

    def node(self, node_id: int) -> NodeLoad:
        for n in self.nodes:
            if n.node == node_id:
                return n
        online = ",".join(map(str, self.ids)) or "none"
        raise KeyError(f"node {node_id} is not in the cluster view (online: {online})")


@dataclass(frozen=True)
class JobSpec:
    argv: tuple[str, ...]
    uid: int
    origin: int                      # node where it was launched
    mem_hint: int | None = None      # bytes the job expects to need
    cpus_hint: float | None = None   # CPUs the job expects to keep busy

    def __post_init__(self):
        object.__setattr__(self, "argv", tuple(self.argv))   # msgpack hands us lists


@dataclass(frozen=True)
class JobLoad:
    """A running job as a balancer sees it."""

    gpid: int
    node: int                # where it runs now
    cpu_percent: float
    rss: int                 # bytes
    can_migrate: bool        # CAN_MIGRATE is effective for it
    load: float | None = None        # CPUs' worth of work it wants (its threads' run + wait time
                                     # per second); None: not measured yet
    cpu_time: float = 0.0            # CPU seconds it has used
    age: float = 0.0                 # seconds since it started (wherever)
    resident: float | None = None    # seconds since it arrived on `node` by migration or
                                     # restart; None: it started there


@dataclass(frozen=True)
class Migration:
    job: int                 # global pid
    source: int
    target: int
