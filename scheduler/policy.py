"""Placement policies decide where a new job goes (balancers, which running job moves where, are in
`scheduler.balancer`).

A policy is a pure function of a `ClusterView`: no sockets, no clocks, no psutil. It may keep a
little state of its own (round robin's position), but the daemon gathers every figure and performs
every decision, so each policy is tested with hand-written views.
"""

from __future__ import annotations

from abc import abstractmethod

from kerrighed.errors import KrgError
from scheduler._plugin import Plugin, Registry
from scheduler.view import ClusterView, JobSpec, NodeLoad


class NoNodeAvailable(KrgError):
    """No online node can take the job."""


class Policy(Plugin):
    kind = "policy"

    @abstractmethod
    def place(self, job: JobSpec, view: ClusterView) -> int:
        """The node id, among `view.ids`, where `job` should start."""


_policies = Registry(Policy, "kerrighed.policies")
register = _policies.register
get_policy = _policies.get
known_policies = _policies.known
policy_names = _policies.names


def require_nodes(view: ClusterView) -> None:
    if not view.nodes:
        raise NoNodeAvailable("no online node to place the job on; add one with 'krgadm nodes add'")


def _least_loaded(job: JobSpec, view: ClusterView) -> int:
    require_nodes(view)
    candidates = view.nodes
    if job.mem_hint is not None:
        candidates = tuple(n for n in view.nodes if n.mem_free >= job.mem_hint)
        if not candidates:
            roomiest = max(view.nodes, key=lambda n: n.mem_free)
            raise NoNodeAvailable(f"no online node has {_mib(job.mem_hint)} free for the job "
                                  f"(largest: {_mib(roomiest.mem_free)} on node {roomiest.node})")

    def key(n: NodeLoad):
        # Placed jobs count on top of the load average, which lags a minute behind new work.
        return ((n.load + n.jobs) / n.capacity, -n.mem_free, n.node)

    return min(candidates, key=key).node


def _mib(size: int) -> str:
    return f"{size / 2**20:.0f} MiB"


@register
class RoundRobin(Policy):
    name = "round_robin"
    description = "new jobs go round the ring of online nodes in id order (Kerrighed's round_robin_balancer)"

    def __init__(self, **params):
        super().__init__(**params)
        self._last: int | None = None

    def place(self, job: JobSpec, view: ClusterView) -> int:
        require_nodes(view)
        # Like Kerrighed: start after the deciding node, then follow the ring from the last target
        # even if that node has left since, so joins and leaves never restart the round.
        last = view.local if self._last is None else self._last
        self._last = next((n for n in view.ids if n > last), view.ids[0])
        return self._last


@register
class LeastLoaded(Policy):
    name = "least_loaded"
    description = ("the node with the lowest (load + placed jobs) per usable CPU; "
                   "ties go to the most free memory, then the lowest id")

    def place(self, job: JobSpec, view: ClusterView) -> int:
        return _least_loaded(job, view)


@register
class Local(Policy):
    name = "local"
    description = "the node the job was launched on, or the least loaded one if it has left"

    def place(self, job: JobSpec, view: ClusterView) -> int:
        if job.origin in view.ids:
            return job.origin
        return _least_loaded(job, view)
