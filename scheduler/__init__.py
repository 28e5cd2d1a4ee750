"""Kerrighed's scheduler framework: probes measure, filters smooth or threshold, policies decide.

The daemon owns one `Scheduler` per node. It builds a `ClusterView` from heartbeats, asks `place`
where a new job goes and (on the node that decides for the cluster) `rebalance` which running jobs
should move, and performs the answers itself: everything here is pure, so it is tested without
sockets or clocks (the time comes in the view). Probes (`scheduler.probes`)
are the only part that measures the machine and are deliberately not imported here.
"""

from __future__ import annotations

from typing import Any

from kerrighed.errors import ConfigError
from scheduler._plugin import Plugin
from scheduler.balancer import Balancer, get_balancer, known_balancers
from scheduler.config import SchedulerConfig, parse_assignment
from scheduler.policy import NoNodeAvailable, Policy, get_policy, known_policies, require_nodes
from scheduler.view import ClusterView, JobLoad, JobSpec, Migration, NodeLoad

__all__ = [
    "Balancer", "ClusterView", "JobLoad", "JobSpec", "Migration", "NoNodeAvailable", "NodeLoad", "Policy",
    "Scheduler", "SchedulerConfig", "get_balancer", "get_policy", "known_balancers", "known_policies",
    "parse_assignment",
]


class Scheduler:
    """The active placement policy and balancer of one node, and the config they came from."""

    def __init__(self, config: SchedulerConfig | None = None):
        self.config = config or SchedulerConfig()
        self._policy = self.config.make_policy()
        self._balancer = self.config.make_balancer()

    def place(self, job: JobSpec, view: ClusterView) -> int:
        require_nodes(view)
        node = self._policy.place(job, view)
        if node not in view.ids:     # a third-party policy's bug must not send a job nowhere
            raise ConfigError(f"policy {self._policy.name!r} chose node {node}, which is not online "
                              f"(online: {','.join(map(str, view.ids))})")
        return node

    @property
    def balancing(self) -> bool:
        return self._balancer is not None

    def rebalance(self, view: ClusterView, jobs: tuple[JobLoad, ...]) -> list[Migration]:
        """Migrations of running jobs to start now; none without a balancer."""
        if self._balancer is None:
            return []
        migrations = self._balancer.rebalance(view, jobs)
        by_gpid = {j.gpid: j for j in jobs}
        for m in migrations:
            job = by_gpid.get(m.job)
            # Checked here once so that no balancer, ours or a plugin, moves a job without CAN_MIGRATE.
            if job is None or job.node != m.source:
                why = f"it is not a job on node {m.source}"
            elif not job.can_migrate:
                why = "it lacks the CAN_MIGRATE capability"
            elif m.target not in view.ids or m.target == m.source:
                why = f"node {m.target} is not another online node"
            else:
                continue
            raise ConfigError(f"balancer {self._balancer.name!r} asked to move job {m.job} "
                              f"to node {m.target}, but {why}")
        return migrations

    def reconfigure(self, config: SchedulerConfig) -> None:
        """Switch to `config`; a component whose name and parameters are unchanged keeps its state
        (round robin's position). Nothing changes if the new config is invalid."""
        old = self.config
        same_policy = (config.policy, config.params) == (old.policy, old.params)
        same_balancer = (config.balancer, config.balancer_params) == (old.balancer, old.balancer_params)
        policy = self._policy if same_policy else config.make_policy()
        balancer = self._balancer if same_balancer else config.make_balancer()
        self.config, self._policy, self._balancer = config, policy, balancer

    def describe(self) -> dict[str, Any]:
        """What `krgadm scheduler show` prints: each active component's name, parameters and description."""
        return {"policy": _describe(self._policy),
                "balancer": None if self._balancer is None else _describe(self._balancer)}


def _describe(component: Plugin) -> dict[str, Any]:
    return {"name": component.name, "params": dict(component.params), "description": component.description}
