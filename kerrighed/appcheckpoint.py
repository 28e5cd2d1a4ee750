"""Kerrighed's `checkpoint` and `restart` of whole applications, across nodes.

An application is every job sharing an application id. `checkpoint` freezes all of them on all
nodes first, then every node dumps its own jobs in parallel into the same version of the image
store (in KDFS, `<mount>/.kerrighed/chkpt/<appid>/v<N>.partial`, made `v<N>` once complete; `<home>/chkpt`
when KDFS is off), then resumes (or ends)
them: a consistent snapshot. `restart` restores every job of a version with its global PID, each
on the node that dumped it if that node is online, else where the scheduler places it (or all on
one node, or all through the scheduler, when asked). Every chosen node first checks it can read
its jobs' images, then all restore in parallel, stopped; if one fails, the others kill what they
restored, so a restart happens whole or not at all; then the application is thawed. The store
must be readable by every node: one directory on a local cluster; KDFS on a real one (to come).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import time
from typing import TYPE_CHECKING

from kerrighed import protocol as p
from kerrighed.errors import KrgError, NodeStateError, PermissionDenied, UsageError
from kerrighed.jobs import HostedJob, JobRecord

if TYPE_CHECKING:
    from kerrighed.daemon import Daemon

log = logging.getLogger(__name__)

STEP_TIMEOUT = 300.0
DISCARD_TIMEOUT = 30.0         # a killed job's end, as its shepherd reports it


class AppCheckpoints:
    def __init__(self, daemon: Daemon):
        self.d = daemon
        self.jobs = daemon.jobs

    def store(self):
        """The versioned image store: in KDFS (every node reads what any node dumped), or in the
        home when KDFS is off. Blocking file work: call it, and the store's methods, off the loop,
        since this very daemon may be the one serving the mount's requests."""
        from checkpoint.store import Store      # only daemons that checkpoint need it
        from kdfs.mount import mounted

        if not self.d.cfg.kdfs.enabled:
            return Store(self.d.home.path / "chkpt")
        mp = self.d.home.kdfs_mountpoint(self.d.cfg)
        if not mounted(mp):
            raise KrgError(f"the checkpoint store is in KDFS, which is not mounted at {mp} on node {self.d.me}")
        private = mp / ".kerrighed"
        private.mkdir(mode=0o700, exist_ok=True)   # images hold every user's memory: root's only
        return Store(private / "chkpt")

    # -- the coordinator (the node the command talks to) -------------------------------------------------

    async def handle_checkpoint(self, msg: p.CheckpointApp, caller) -> dict:
        appid = msg.id if msg.app else self._app_of(msg.id, await self.jobs.listing())
        nodes = await self._nodes_of(appid)
        if msg.mode == "unfreeze":
            await self._on_all(nodes, p.AppThaw(app=appid, uid=caller.uid, signal=msg.signal))
            return {"appid": appid}
        if msg.mode != "ckpt-only":
            try:
                await self._on_all(nodes, p.AppFreeze(app=appid, uid=caller.uid))
            except KrgError:
                await self._on_all(nodes, p.AppThaw(app=appid, uid=caller.uid), quiet=True)
                raise
        if msg.mode == "freeze":
            return {"appid": appid}
        version = await asyncio.to_thread(lambda: self.store().new_version(appid))
        try:
            await self._on_all(nodes, p.AppDump(app=appid, version=version.n))
            meta = await asyncio.to_thread(version.commit, msg.description)
        except BaseException:
            await asyncio.to_thread(version.abort)
            if msg.mode != "ckpt-only":
                await self._on_all(nodes, p.AppThaw(app=appid, uid=caller.uid), quiet=True)
            raise
        if msg.mode == "kill":
            await self._on_all(nodes, p.AppThaw(app=appid, uid=caller.uid, signal=msg.signal or signal.SIGTERM))
        elif msg.mode == "checkpoint":
            await self._on_all(nodes, p.AppThaw(app=appid, uid=caller.uid))
        log.info("application %d checkpointed as v%d on nodes %s", appid, version.n, nodes)
        return {"appid": appid, "version": meta.version, "description": meta.description, "date": meta.date}

    async def handle_restart(self, msg: p.RestartApp, caller) -> dict:
        online = self.d.members.online(time.monotonic()) or [self.d.me]
        if msg.node is not None:
            self.d.cfg.node(msg.node)
            if msg.node not in online:
                raise NodeStateError(f"node {msg.node} is not online (online: {','.join(map(str, online))}); "
                                     f"add it with 'krgadm nodes add -n {msg.node}'")
        version = await asyncio.to_thread(lambda: self.store().get(msg.appid, msg.version))
        jobs = await asyncio.to_thread(version.jobs)
        if not jobs:
            raise KrgError("restart: invalid checkpoint files (no job in them)")
        if any(j.get("app") == msg.appid and j["state"] not in ("exited", "lost") for j in await self.jobs.listing()):
            raise NodeStateError(f"an application using appid {msg.appid} is already running")
        metas = {}
        for job in jobs:
            try:
                metas[job.gpid] = meta = await asyncio.to_thread(job.meta)
            except (OSError, ValueError, KrgError) as e:
                raise KrgError(f"invalid checkpoint files (job {job.gpid}: {e})") from None
            if caller.uid not in (0, meta.uid):
                raise PermissionDenied(f"application {msg.appid} belongs to uid {meta.uid}")
        where = restart_plan([(j.node, j.gpid) for j in jobs], online, node=msg.node, spread=msg.spread,
                             place=lambda gpid: self.d.place(metas[gpid].argv, metas[gpid].uid, online))
        plan: dict[int, list[list[int]]] = {}
        for (dumped_on, gpid), node in where.items():
            plan.setdefault(node, []).append([dumped_on, gpid])

        def ask(check: bool):
            return {node: p.AppRestore(appid=msg.appid, version=msg.version, jobs=js, check=check)
                    for node, js in plan.items()}

        # First every node says it can read its jobs' images and take their PIDs: the usual failure
        # (a store that is not shared) restores nothing at all.
        await self._on_each(ask(check=True))
        # Then all restore at once, stopped; if one fails, the others kill what they restored.
        try:
            await self._on_each(ask(check=False))
        except BaseException:
            await self._on_each({node: p.AppDiscard(appid=msg.appid, gpids=[g for _, g in js])
                                 for node, js in plan.items()}, quiet=True)
            raise
        # What other nodes remember of the runs that ended (a status for `krg wait`) is stale now.
        now = time.monotonic()
        await self._on_each({n: p.AppDiscard(appid=msg.appid, gpids=[g for (_, g), m in where.items() if m != n])
                             for n in self.d.cfg.nodes if self.d.members.is_present(n, now)}, quiet=True)
        if not msg.frozen:
            await self._on_all(sorted(plan), p.AppThaw(app=msg.appid, uid=caller.uid))
        log.info("application %d restarted from v%d: %s", msg.appid, msg.version,
                 ", ".join(f"job {g} on node {n}" for (_, g), n in sorted(where.items(), key=lambda kv: kv[0][1])))
        gpids = sorted(metas)
        return {"appid": msg.appid, "version": msg.version, "gpids": gpids,
                "root": msg.appid if msg.appid in metas else gpids[0],
                "nodes": {str(g): n for (_, g), n in where.items()},
                "tty": {str(g): m.tty for g, m in metas.items()}}

    def _app_of(self, gpid: int, listing: list[dict]) -> int:
        for j in listing:
            if j["gpid"] == gpid and j["state"] not in ("exited", "lost"):
                return j.get("app") or gpid
        raise UsageError(f"no running job {gpid} in the cluster")

    async def _nodes_of(self, appid: int) -> list[int]:
        nodes = sorted({j["node"] for j in await self.jobs.listing()
                        if j.get("app") == appid and j["state"] not in ("exited", "lost")})
        if not nodes:
            raise UsageError(f"no running application {appid}")
        return nodes

    async def _on_all(self, nodes: list[int], msg: p.Message, quiet: bool = False) -> None:
        await self._on_each({n: msg for n in nodes}, quiet)

    async def _on_each(self, msgs: dict[int, p.Message], quiet: bool = False) -> None:
        """Ask every node its own message at once; the first error (by node id) once all answered."""
        nodes = sorted(msgs)
        results = await asyncio.gather(*(self._ask(n, msgs[n]) for n in nodes), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors and not quiet:
            raise errors[0] if isinstance(errors[0], KrgError) else KrgError(str(errors[0]))

    async def _ask(self, node: int, msg: p.Message):
        if node == self.d.me:
            return await self.d.peer_handlers[type(msg)](node, msg, [])
        return await self.d.request_unless_down(node, msg, timeout=STEP_TIMEOUT)

    # -- every node, for its own jobs ----------------------------------------------------------------------

    def _hosted_of(self, app: int) -> list[HostedJob]:
        return [j for j in self.jobs.hosted.values() if j.record.app == app]

    async def handle_freeze(self, node: int, msg: p.AppFreeze, payload):
        from kerrighed.jobservice import _caps

        jobs = self._hosted_of(msg.app)
        for job in jobs:
            if msg.uid not in (0, job.record.uid):
                raise PermissionDenied(f"job {job.gpid} belongs to uid {job.record.uid}: permission denied")
            if not _caps(job.record.caps).has("CHECKPOINTABLE"):
                raise PermissionDenied(f"job {job.gpid} is not checkpointable "
                                       f"(krgcapset -k {job.gpid} -e +CHECKPOINTABLE)")
        for job in jobs:
            job.signal(signal.SIGSTOP, 0)
        return p.Ok(result={"gpids": [j.gpid for j in jobs]})

    async def handle_thaw(self, node: int, msg: p.AppThaw, payload):
        jobs = self._hosted_of(msg.app)
        for job in jobs:
            if msg.uid not in (0, job.record.uid):
                raise PermissionDenied(f"job {job.gpid} belongs to uid {job.record.uid}: permission denied")
        for job in jobs:
            job.signal(msg.signal or signal.SIGCONT, 0)
            if msg.signal:
                job.signal(signal.SIGCONT, 0)      # a stopped job must run to die of most signals
        return p.Ok()

    async def handle_dump(self, node: int, msg: p.AppDump, payload):
        from checkpoint import criu
        from checkpoint.store import JobMeta, Version

        version = await asyncio.to_thread(lambda: Version(self.store(), msg.app, msg.version, partial=True))

        async def dump(job: HostedJob) -> None:
            r = job.record
            where = await asyncio.to_thread(version.job, self.d.me, r.gpid)
            external = [criu.fd_key(r.host_pid, 0)] if r.tty else []
            await asyncio.to_thread(criu.dump, r.host_pid, where.images, leave_running=True, external=external)
            await asyncio.to_thread(where.write_meta, JobMeta(
                gpid=r.gpid, argv=r.argv, uid=r.uid, gid=r.gid, cwd=r.cwd, node=self.d.me,
                app=r.app, caps=r.caps, tty=r.tty))

        try:
            await asyncio.gather(*(dump(j) for j in self._hosted_of(msg.app)))
        except criu.CriuError as e:
            raise KrgError(f"cannot checkpoint application {msg.app} on node {self.d.me}: {e}") from None
        return p.Ok()

    async def handle_restore(self, node: int, msg: p.AppRestore, payload):
        from checkpoint.store import CheckpointNotFound

        try:
            version = await asyncio.to_thread(lambda: self.store().get(msg.appid, msg.version))
        except CheckpointNotFound as e:
            raise CheckpointUnreadable(
                f"node {self.d.me} cannot read checkpoint v{msg.version} of application {msg.appid} "
                f"({e}); {SHARED_STORE}") from None
        for dumped_on, gpid in msg.jobs:
            await asyncio.to_thread(_readable, version, dumped_on, gpid, self.d.me)
            if gpid in self.jobs.hosted:
                raise NodeStateError(f"one PID (including session id or group id) of the application is already "
                                     f"in use: job {gpid} runs on node {self.d.me}")
        if msg.check:
            return p.Ok()

        async def restore(dumped_on: int, gpid: int) -> None:
            where = await asyncio.to_thread(version.job, dumped_on, gpid)
            meta = await asyncio.to_thread(where.meta)
            record = JobRecord(gpid=gpid, argv=meta.argv, uid=meta.uid, gid=meta.gid, cwd=meta.cwd,
                               origin=self.d.me, node=self.d.me, start_time=time.time(), tty=meta.tty,
                               detach=True, app=meta.app, caps=meta.caps)
            job_dir = self.jobs.jobs_dir / str(gpid)
            if self.jobs.finished.pop(gpid, None) is not None:
                shutil.rmtree(job_dir, ignore_errors=True)     # the ended run it restarts from a snapshot of
            job_dir.mkdir(mode=0o700)
            try:
                await self.jobs.restore_job(record, where.images, job_dir, sink=None, window=0)
            except BaseException:
                shutil.rmtree(job_dir, ignore_errors=True)
                raise
            # It comes back stopped, as it was dumped: the coordinator thaws the whole application
            # once every node has restored its part (or leaves it frozen: restart -U, restart -f).

        results = await asyncio.gather(*(restore(n, g) for n, g in msg.jobs), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self._discard(msg.appid, [g for _, g in msg.jobs])
            e = errors[0]
            raise e if isinstance(e, KrgError) else KrgError(f"cannot restore application {msg.appid} "
                                                              f"on node {self.d.me}: {e}")
        return p.Ok()

    async def handle_discard(self, node: int, msg: p.AppDiscard, payload):
        await self._discard(msg.appid, msg.gpids)
        return p.Ok()

    async def _discard(self, appid: int, gpids: list[int]) -> None:
        """Kill those of these jobs of `appid` that run here and forget the statuses of those that
        ended here: a restart that failed leaves nothing behind, one that worked no stale status."""
        waits = []
        for gpid in gpids:
            job = self.jobs.hosted.get(gpid)
            if job is None or job.record.app != appid:
                continue
            fut = asyncio.get_running_loop().create_future()
            job.waiters.append(fut)
            waits.append(fut)
            job.signal(signal.SIGKILL, 0)
            log.info("job %d of application %d discarded: its restart failed", gpid, appid)
        if waits:
            _, late = await asyncio.wait(waits, timeout=DISCARD_TIMEOUT)
            if late:
                log.warning("%d discarded jobs of application %d did not end within %g s",
                            len(late), appid, DISCARD_TIMEOUT)
        for gpid in gpids:
            ended = self.jobs.finished.get(gpid)
            if gpid not in self.jobs.hosted and ended is not None and ended[0].app == appid:
                del self.jobs.finished[gpid]
                shutil.rmtree(self.jobs.jobs_dir / str(gpid), ignore_errors=True)
                self.jobs._changed(gpid)


SHARED_STORE = ("the checkpoint store must be readable by every node that may restore "
                "(it lives in KDFS unless [kdfs] enabled = false)")


class CheckpointUnreadable(KrgError):
    """A node cannot read the images it is asked to restore."""


def _readable(version, dumped_on: int, gpid: int, node: int) -> None:
    """The job's metadata parses and its images directory can be listed and read on this node."""
    try:
        where = version.job(dumped_on, gpid)
        where.meta()
        names = os.listdir(where.images)
        if not names or not all(os.access(where.images / n, os.R_OK) for n in names):
            raise OSError(f"{where.images} holds no readable image")
    except (OSError, ValueError, KrgError) as e:
        raise CheckpointUnreadable(f"node {node} cannot read the images of job {gpid} "
                                   f"({getattr(e, 'strerror', None) or e}); {SHARED_STORE}") from None


def restart_plan(jobs: list[tuple[int, int]], online: list[int], place, node: int | None = None,
                 spread: bool = False) -> dict[tuple[int, int], int]:
    """Where each job of a checkpoint restarts: {(node it was dumped on, gpid): node}.

    `node`: all on that node. `spread`: every job where the scheduler places it (`place(gpid)`).
    Else each on the node that dumped it if that node is online (its files, its caches, what
    the user saw before), the others through the scheduler. Jobs are placed in gpid order.
    """
    plan = {}
    for dumped_on, gpid in sorted(jobs, key=lambda j: j[1]):
        if node is not None:
            plan[(dumped_on, gpid)] = node
        elif not spread and dumped_on in online:
            plan[(dumped_on, gpid)] = dumped_on
        else:
            plan[(dumped_on, gpid)] = place(gpid)
    return plan
