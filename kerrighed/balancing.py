"""The daemon's side of dynamic load balancing: limit, measure, report, decide on one node, migrate.

- **Limit.** With a `cpu_limit` for this node, its jobs run in a cgroup of their own with that CPU
  quota (kerrighed.cgroups): what makes a node of a local cluster as busy as a real one would be.
  A node's *capacity* is its limit, or its CPU count; every heartbeat carries it, and placement and
  balancing compare loads per CPU of capacity.
- **Measure.** While a balancer is configured, every MEASURE_S each node reads, for every job it
  hosts, the time its threads ran plus the time they waited to run (/proc/TID/schedstat): per
  second, that is the CPU work the job wants, one for a busy loop even when its node's quota
  throttles it to a tenth of a CPU. The node's *runnable* work is the sum over its jobs (work
  outside the cluster is not counted: the balancer moves jobs, and balances what it can move).
- **Report.** Heartbeats carry capacity, runnable work, and the node's migratable jobs that use
  CPU (CAN_MIGRATE effective; at most REPORTED_JOBS): load, CPU time, age, time since it arrived.
- **Decide.** The lowest-numbered online node runs the scheduler's balancer every ROUND_S over
  the last figures heard (one decider: two nodes never move the same job), and asks each chosen
  job's host to migrate it by the ordinary migration path. A migration that fails is logged and
  the job goes on where it was (the migration path guarantees it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from kerrighed import protocol as p
from kerrighed.caps import Capabilities
from kerrighed.cgroups import NodeCgroup, cgroup_name, find_cpu_hierarchy
from kerrighed.errors import KrgError
from scheduler import ClusterView, JobLoad, Migration, NodeLoad

if TYPE_CHECKING:
    from kerrighed.daemon import Daemon
    from kerrighed.jobs import HostedJob

log = logging.getLogger(__name__)

MEASURE_S = 0.5          # how often a node measures its jobs (while a balancer is configured)
ROUND_S = 0.5            # how often the deciding node runs the balancer
REPORTED_JOBS = 32       # migratable jobs a heartbeat lists, those with the most CPU time first
REPORTED_MIN_LOAD = 0.1  # a job wanting less CPU than this is not listed: moving it gains nothing
SMOOTHING = 0.5          # weight of the newest measure in a job's load (the rest: the previous one)
UNMEASURED_LOAD = 1.0    # what a job not measured yet counts for in its node's runnable work
MIGRATION_TIMEOUT = 120.0


class Balancing:
    def __init__(self, daemon: Daemon):
        self.d = daemon
        node = daemon.me
        limit = daemon.cfg.cpu_limit_of(node)
        self.cgroup: NodeCgroup | None = None
        if limit is not None:       # made by start(); a machine that cannot fails the daemon's start
            self.cgroup = NodeCgroup(find_cpu_hierarchy(), cgroup_name(daemon.home.path, daemon.cfg.session, node),
                                     limit)
        self.capacity = float(limit if limit is not None else (psutil.cpu_count() or 1))
        self.loads: dict[int, float] = {}                     # gpid -> CPUs it wants (smoothed)
        self.arrived: dict[int, float] = {}                   # gpid -> when it was restored here
        self._samples: dict[int, tuple[float, float]] = {}    # gpid -> (when, run + wait seconds)
        self._figures: dict = {}
        self.moving: set[int] = set()                         # migrations this node asked for
        self._task: asyncio.Task | None = None

    # -- life cycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """After the jobs were adopted: put them in the node's cgroup (a limit set since they
        started), then measure and decide in the background."""
        if self.cgroup is not None:
            self.cgroup.create()
        for job in list(self.d.jobs.hosted.values()):
            await self.enclose(job)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.cgroup is not None:
            if self.d.jobs.hosted:
                # They will be adopted by the next daemon of this node, which uses the same cgroup.
                log.info("keeping %s for the %d jobs still running", self.cgroup, len(self.d.jobs.hosted))
            else:
                await asyncio.to_thread(self.cgroup.remove)

    def stats(self) -> dict:
        """What this node's heartbeats add to its figures."""
        return {"capacity": self.capacity, **self._figures}

    # -- the node's cgroup -------------------------------------------------------------------------------

    async def restored(self, job: HostedJob) -> None:
        """A job just restored here (migration, restart): note when, and put it in the cgroup."""
        self.arrived[job.gpid] = time.monotonic()
        await self.enclose(job)

    async def release(self, job: HostedJob) -> None:
        """Out of the cgroup, before CRIU dumps the job: CRIU's parasite code runs inside the job's
        processes, and at the node's quota, shared with every busy job there, a dump took seconds.
        The job is frozen for the dump, so it gains no CPU by it; a dump that fails puts it back."""
        if self.cgroup is not None and job.record.host_pid:
            try:
                await asyncio.to_thread(_release, self.cgroup, job.record.host_pid)
            except OSError as e:
                log.warning("job %d: cannot take it out of %s: %s", job.gpid, self.cgroup, e)

    async def enclose(self, job: HostedJob) -> None:
        """Move a job's processes (shepherd, init and all below) into this node's cgroup. A job
        started here is in it from its first instruction (jobs.spawn); a restored one is made by
        CRIU outside it and moved within milliseconds of its restore."""
        if self.cgroup is not None and job.record.host_pid:
            try:
                await asyncio.to_thread(_enclose, self.cgroup, job.record.host_pid)
            except OSError as e:
                log.warning("job %d: cannot put it in %s: %s", job.gpid, self.cgroup, e)

    # -- measuring -----------------------------------------------------------------------------------------

    async def _run(self) -> None:
        next_round = 0.0
        while True:
            try:
                if self.d.scheduler.balancing:
                    await self._measure()
                    now = time.monotonic()
                    if now >= next_round and self._deciding():
                        next_round = now + ROUND_S
                        self._decide(now)
                elif self._figures:
                    self._figures, self._samples, self.loads = {}, {}, {}
            except Exception:           # a bug here must not stop balancing for good
                log.exception("balancer round failed")
            await asyncio.sleep(MEASURE_S)

    async def _measure(self) -> None:
        jobs = list(self.d.jobs.hosted.values())
        inits = {j.gpid: j.record.host_pid for j in jobs if j.record.host_pid and j.record.status is None}
        figures = await asyncio.to_thread(_job_figures, inits)
        now = time.monotonic()
        loads = {}
        for gpid, (run_wait, _, _) in figures.items():
            before = self._samples.get(gpid)
            if before is not None and now > before[0]:
                rate = max(0.0, run_wait - before[1]) / (now - before[0])
                old = self.loads.get(gpid)
                loads[gpid] = rate if old is None else SMOOTHING * rate + (1 - SMOOTHING) * old
            self._samples[gpid] = (now, run_wait)
        self._samples = {g: s for g, s in self._samples.items() if g in figures}
        self.arrived = {g: t for g, t in self.arrived.items() if g in self.d.jobs.hosted}
        self.loads = loads
        runnable = sum(loads.get(g, UNMEASURED_LOAD) for g in figures)
        wall = time.time()
        listed = []
        for job in jobs:
            if job.gpid not in loads or loads[job.gpid] < REPORTED_MIN_LOAD or job.gpid not in figures:
                continue
            caps = Capabilities.from_dict(job.record.caps) if job.record.caps else Capabilities.DEFAULT
            if not caps.has("CAN_MIGRATE"):
                continue
            _, cpu_time, rss = figures[job.gpid]
            arrived = self.arrived.get(job.gpid)
            listed.append([job.gpid, round(loads[job.gpid], 3), round(cpu_time, 2),
                           round(max(0.0, wall - job.record.start_time), 2),
                           None if arrived is None else round(now - arrived, 2), rss])
        listed.sort(key=lambda e: (-e[2], e[0]))
        self._figures = {"runnable": round(runnable, 3), "migratable": listed[:REPORTED_JOBS]}
        self.d.stats.setdefault(self.d.me, {}).update(self.stats())

    # -- deciding (on one node) ----------------------------------------------------------------------------

    def _deciding(self) -> bool:
        online = self.d.members.online(time.monotonic())
        return bool(online) and min(online) == self.d.me

    def snapshot(self, now: float) -> tuple[ClusterView, tuple[JobLoad, ...]]:
        """The cluster as the heartbeats last described it: nodes that report their runnable work."""
        nodes, jobs = [], []
        for n in self.d.members.online(now):
            st = self.d.stats.get(n)
            if not st or "runnable" not in st:
                continue            # not measuring yet (it has not adopted the balancer)
            cpus = st["cpus"]
            nodes.append(NodeLoad(node=n, cpus=cpus, load=st["load"][0], cpu_percent=st["cpu_percent"],
                                  mem_total=st["mem_total"], mem_free=st["mem_free"], jobs=st.get("jobs", 0),
                                  cpu_share=min(1.0, st.get("capacity", cpus) / cpus), runnable=st["runnable"]))
            for gpid, load, cpu_time, age, resident, rss in st.get("migratable", ()):
                jobs.append(JobLoad(gpid=gpid, node=n, cpu_percent=100.0 * load, rss=rss, can_migrate=True,
                                    load=load, cpu_time=cpu_time, age=age, resident=resident))
        return ClusterView(nodes=tuple(nodes), local=self.d.me, now=now, moving=frozenset(self.moving)), tuple(jobs)

    def _decide(self, now: float) -> None:
        view, jobs = self.snapshot(now)
        if len(view.nodes) < 2:
            return
        try:
            moves = self.d.scheduler.rebalance(view, jobs)
        except KrgError as e:
            log.warning("balancer: %s", e)
            return
        for move in moves:
            if move.job not in self.moving:
                self.moving.add(move.job)
                asyncio.get_running_loop().create_task(self._migrate(move, view))

    async def _migrate(self, move: Migration, view: ClusterView) -> None:
        source, target = view.node(move.source), view.node(move.target)
        log.info("balancer: moving job %d from node %d (load %.2f per CPU) to node %d (load %.2f per CPU)",
                 move.job, move.source, source.busy, move.target, target.busy)
        req = p.JobMigrate(gpid=move.job, target=move.target, uid=0)
        try:
            if move.source == self.d.me:
                result = await self.d.jobs.migrate_out(req)
            else:
                result = await self.d.request_unless_down(move.source, req, timeout=MIGRATION_TIMEOUT)
            log.info("balancer: job %d moved from node %d to node %d (down %.2f s)", move.job, move.source,
                     move.target, result.get("downtime_s", 0.0))
        except KrgError as e:
            log.warning("balancer: job %d stays on node %d: %s", move.job, move.source, e)
        except Exception:
            log.exception("balancer: moving job %d failed", move.job)
        finally:
            self.moving.discard(move.job)


# -- reading /proc (in a thread) ---------------------------------------------------------------------------


def _job_figures(inits: dict[int, int]) -> dict[int, tuple[float, float, int]]:
    """gpid -> (seconds its threads ran or waited to run, CPU seconds used, RSS bytes), summed
    over the tree under each init. Jobs that are gone are left out."""
    from kerrighed.jobs import _proc_table

    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_rest) in table.items():
        children.setdefault(ppid, []).append(pid)
    out = {}
    for gpid, init in inits.items():
        if init not in table:
            continue
        run_wait = cpu = 0.0
        rss = 0
        todo = [init]
        while todo:
            pid = todo.pop()
            todo += children.get(pid, ())
            cpu += table[pid][2]
            rss += table[pid][3]
            run_wait += _schedstat(pid)
        out[gpid] = (run_wait, cpu, rss)
    return out


def _schedstat(pid: int) -> float:
    """Seconds the threads of `pid` ran plus waited runnable (a throttled thread waits runnable)."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                run, wait = f.read().split()[:2]
            total += int(run) + int(wait)
        except (OSError, ValueError):
            pass            # the thread ended meanwhile
    return total / 1e9


def _enclose(cgroup: NodeCgroup, init: int, timeout: float = 2.0) -> None:
    """The shepherd (init's parent) and the tree under the init into the cgroup; again until a pass
    finds every process in it (one forking meanwhile has children outside). Right after a restore
    the init may still be the restorer's child, not yet handed to the shepherd: wait for that."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            root = psutil.Process(init)
            procs = [root, *root.children(recursive=True)]
            parent = root.ppid()
        except psutil.Error:
            return
        shepherd = parent > 1 and _is_shepherd(parent)
        pids = [pr.pid for pr in procs] + ([parent] if shepherd else [])
        outside = [pid for pid in pids if not cgroup.holds(pid)]
        if not outside and shepherd:
            return
        if time.monotonic() > deadline:
            if outside or not shepherd:
                log.warning("%s: processes %s of the job with init %d are still outside%s", cgroup, outside,
                            init, "" if shepherd else " (its shepherd not found)")
            return
        for pid in outside:
            cgroup.add(pid)
        if not outside:
            time.sleep(0.02)


def _release(cgroup: NodeCgroup, init: int) -> None:
    try:
        root = psutil.Process(init)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return
    for proc in procs:
        cgroup.release(proc.pid)


def _is_shepherd(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/exe").resolve().name == "krg-init"
    except OSError:
        return False
