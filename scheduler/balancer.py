"""Balancers decide which running job moves where: Kerrighed's dynamic load balancing.

A balancer sees a `ClusterView` (every online node's capacity and the work it runs now, and the
time of the snapshot) and the migratable jobs, and answers with migrations. Like placement
policies it is pure: the daemon measures, passes the time in and performs the migrations. One node
decides for the whole cluster (the daemon lets the lowest online id do it, so two nodes never move
the same job), which lets a balancer remember what it decided: the moves still in flight, when a
node last gave a job away.

Third parties publish theirs in the `kerrighed.balancers` entry-point group.
"""

from __future__ import annotations

import math
from abc import abstractmethod

from scheduler._plugin import Param, Plugin, Registry
from scheduler.view import ClusterView, JobLoad, Migration

MIN_JOB_LOAD = 0.1      # a job wanting less than a tenth of a CPU gains nothing by moving
SETTLE_S = 2.0          # after its migration ended, how long a move counts on its target unreported
FLIGHT_S = 120.0        # a move whose end is never seen is forgotten after this long


class Balancer(Plugin):
    kind = "balancer"

    @abstractmethod
    def rebalance(self, view: ClusterView, jobs: tuple[JobLoad, ...]) -> list[Migration]:
        """The migrations to start now. `jobs` are the migratable jobs the nodes reported (each
        node lists its busiest ones), `view.now` the time of the snapshot."""


_balancers = Registry(Balancer, "kerrighed.balancers")
register = _balancers.register
get_balancer = _balancers.get
known_balancers = _balancers.known
balancer_names = _balancers.names


@register
class MosixLoadBalancer(Balancer):
    """Kerrighed's mosix_load_balancer, for a cluster-wide decider.

    A node's load is the CPU work its jobs want (runnable threads, throttled ones included) per
    CPU it may use, so a node limited to half a CPU running two busy loops has load 4. From the
    most loaded node down, a node that has not given a job away for `interval` seconds gives
    its best candidate (a migratable job using CPU, running for `min_age` s, not moved in the last
    `residency` s; the one with the most CPU time first: what has run long tends to run on) to
    the node that would be least loaded with it, if the source's load exceeds that target's load
    *after* the move times `stability` (MOSIX's stability factor: no move that merely swaps
    which node is the busy one).
    """

    name = "mosix_load_balancer"
    description = ("MOSIX-style: a CPU-hungry migratable job goes from a loaded node to the least loaded "
                   "one if the source stays `stability` x busier than the target would be; one job "
                   "leaves a node every `interval` s at most; a moved job stays `residency` s")
    param_spec = {
        "stability": Param(float, 1.3),     # Kerrighed's stab_factor, 130 %
        "interval": Param(float, 2.0),      # Kerrighed's legacy setting: one migration every 2 s
        "residency": Param(float, 5.0),
        "min_age": Param(float, 1.0),
    }

    def __init__(self, **params):
        super().__init__(**params)
        if self.params["stability"] < 1:
            raise self._bad_param("stability", "1 or more (1.3: the source must stay 30 % busier)")
        for key in ("interval", "residency", "min_age"):
            if self.params[key] < 0:
                raise self._bad_param(key, "0 or more seconds")
        self._left: dict[int, float] = {}                         # node -> when a job last left it
        self._moved: dict[int, float] = {}                        # gpid -> when we moved it
        self._flying: dict[int, tuple[Migration, float, float]] = {}   # gpid -> (move, its load, when)
        self._landed: dict[int, float] = {}                       # gpid -> when its migration was seen over

    def rebalance(self, view: ClusterView, jobs: tuple[JobLoad, ...]) -> list[Migration]:
        now = view.now
        stability, interval = self.params["stability"], self.params["interval"]
        self._forget(now)
        capacity = {n.node: n.capacity for n in view.nodes}
        work = {n.node: n.load if n.runnable is None else n.runnable for n in view.nodes}
        self._count_flying(work, {j.gpid: j.node for j in jobs}, view.moving, now)

        candidates: dict[int, list[JobLoad]] = {}
        for job in sorted(jobs, key=lambda j: (-j.cpu_time, j.gpid)):
            if job.node in work and job.gpid not in view.moving and self._eligible(job, now):
                candidates.setdefault(job.node, []).append(job)

        def busy(node: int) -> float:
            return work[node] / capacity[node]

        moves = []
        for source in sorted(work, key=lambda n: (-busy(n), n)):
            if now - self._left.get(source, -math.inf) < interval:
                continue
            for job in candidates.get(source, ()):
                others = [n for n in work if n != source]
                if not others:
                    break
                target = min(others, key=lambda n: ((work[n] + job.load) / capacity[n], n))
                if busy(source) > stability * (work[target] + job.load) / capacity[target]:
                    move = Migration(job=job.gpid, source=source, target=target)
                    moves.append(move)
                    work[source] = max(0.0, work[source] - job.load)
                    work[target] += job.load
                    self._left[source] = now
                    self._moved[job.gpid] = now
                    self._flying[job.gpid] = (move, job.load, now)
                    break
        return moves

    def _eligible(self, job: JobLoad, now: float) -> bool:
        residency = self.params["residency"]
        return (job.can_migrate and job.load is not None and job.load >= MIN_JOB_LOAD
                and job.age >= self.params["min_age"]
                and (job.resident is None or job.resident >= residency)
                and now - self._moved.get(job.gpid, -math.inf) >= residency
                and job.gpid not in self._flying)

    def _count_flying(self, work: dict[int, float], where: dict[int, int], moving: frozenset[int],
                      now: float) -> None:
        """A move decided lately is not in the figures yet (the job is being dumped, or its new
        node has not reported it): count it where it goes, so the next round does not send a
        second job to the same idle node, nor take another from a source that already gave. It
        counts while the migration is under way (`view.moving`) and SETTLE_S after, unless the
        target reports the job before."""
        for gpid, (move, load, _) in list(self._flying.items()):
            node = where.get(gpid)
            if gpid not in moving:
                self._landed.setdefault(gpid, now)
            if node == move.target or move.source not in work or move.target not in work \
                    or node not in (None, move.source) or now - self._landed.get(gpid, now) > SETTLE_S:
                del self._flying[gpid]          # arrived (its target counts it now), failed, or moot
                self._landed.pop(gpid, None)
                continue
            if node == move.source:
                work[move.source] = max(0.0, work[move.source] - load)
            work[move.target] += load

    def _forget(self, now: float) -> None:
        residency = self.params["residency"]
        self._moved = {g: t for g, t in self._moved.items() if now - t < residency}
        self._flying = {g: f for g, f in self._flying.items() if now - f[2] < FLIGHT_S}
        self._landed = {g: t for g, t in self._landed.items() if g in self._flying}
        self._left = {n: t for n, t in self._left.items() if now - t < self.params["interval"]}
