"""Kerrighed's `checkpoint` and `restart` of whole applications, across nodes.

An application is every job sharing an application id. `checkpoint` freezes all of them on all
nodes first, then every node dumps its own jobs in parallel into the same version of the image
store (`<home>/chkpt/<appid>/v<N>.partial`, made `v<N>` once complete), then resumes (or ends)
them: a consistent snapshot. `restart` restores every job of a version on the nodes that dumped them
(or others, when those are gone), in parallel, with their global PIDs. The store must be readable
by every node: one directory on a local cluster; KDFS on a real one (to come).
"""

from __future__ import annotations

import asyncio
import logging
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


class AppCheckpoints:
    def __init__(self, daemon: Daemon):
        self.d = daemon
        self.jobs = daemon.jobs

    def store(self):
        from checkpoint.store import Store      # only daemons that checkpoint need it

        return Store(self.d.home.path / "chkpt")

    # -- the coordinator (the node the command talks to) -------------------------------------------------

    async def handle_checkpoint(self, msg: p.CheckpointApp, caller) -> dict:
        appid = msg.id if msg.app else self._app_of(msg.id, await self.jobs.listing())
        nodes = await self._nodes_of(appid)
        if msg.mode == "unfreeze":
            await self._on_all(nodes, p.AppThaw(app=appid, signal=msg.signal))
            return {"appid": appid}
        if msg.mode != "ckpt-only":
            try:
                await self._on_all(nodes, p.AppFreeze(app=appid, uid=caller.uid))
            except KrgError:
                await self._on_all(nodes, p.AppThaw(app=appid), quiet=True)
                raise
        if msg.mode == "freeze":
            return {"appid": appid}
        version = self.store().new_version(appid)
        try:
            await self._on_all(nodes, p.AppDump(app=appid, version=version.n))
            meta = version.commit(msg.description)
        except BaseException:
            version.abort()
            if msg.mode != "ckpt-only":
                await self._on_all(nodes, p.AppThaw(app=appid), quiet=True)
            raise
        if msg.mode == "kill":
            await self._on_all(nodes, p.AppThaw(app=appid, signal=msg.signal or signal.SIGTERM))
        elif msg.mode == "checkpoint":
            await self._on_all(nodes, p.AppThaw(app=appid))
        log.info("application %d checkpointed as v%d on nodes %s", appid, version.n, nodes)
        return {"appid": appid, "version": meta.version, "description": meta.description, "date": meta.date}

    async def handle_restart(self, msg: p.RestartApp, caller) -> dict:
        version = self.store().get(msg.appid, msg.version)
        jobs = version.jobs()
        if not jobs:
            raise KrgError("restart: invalid checkpoint files (no job in them)")
        if any(j.get("app") == msg.appid and j["state"] not in ("exited", "lost") for j in await self.jobs.listing()):
            raise NodeStateError(f"an application using appid {msg.appid} is already running")
        for job in jobs:
            if caller.uid not in (0, job.meta().uid):
                raise PermissionDenied(f"application {msg.appid} belongs to uid {job.meta().uid}")
        online = self.d.members.online(time.monotonic()) or [self.d.me]
        plan: dict[int, list[list[int]]] = {}
        for i, job in enumerate(jobs):
            node = job.node if job.node in online else online[i % len(online)]
            plan.setdefault(node, []).append([job.node, job.gpid])
        await asyncio.gather(*(self._ask(node, p.AppRestore(appid=msg.appid, version=msg.version, jobs=js,
                                                             frozen=msg.frozen))
                               for node, js in plan.items()))
        log.info("application %d restarted from v%d on nodes %s", msg.appid, msg.version, sorted(plan))
        return {"appid": msg.appid, "version": msg.version, "gpids": sorted(j.gpid for j in jobs)}

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
        results = await asyncio.gather(*(self._ask(n, msg) for n in nodes), return_exceptions=True)
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
        for job in self._hosted_of(msg.app):
            job.signal(msg.signal or signal.SIGCONT, 0)
            if msg.signal:
                job.signal(signal.SIGCONT, 0)      # a stopped job must run to die of most signals
        return p.Ok()

    async def handle_dump(self, node: int, msg: p.AppDump, payload):
        from checkpoint import criu
        from checkpoint.store import JobMeta, Version

        version = Version(self.store(), msg.app, msg.version, partial=True)

        async def dump(job: HostedJob) -> None:
            r = job.record
            where = version.job(self.d.me, r.gpid)
            external = [criu.fd_key(r.host_pid, 0)] if r.tty else []
            await asyncio.to_thread(criu.dump, r.host_pid, where.images, leave_running=True, external=external)
            where.write_meta(JobMeta(gpid=r.gpid, argv=r.argv, uid=r.uid, gid=r.gid, cwd=r.cwd, node=self.d.me,
                                     app=r.app, caps=r.caps, tty=r.tty))

        try:
            await asyncio.gather(*(dump(j) for j in self._hosted_of(msg.app)))
        except criu.CriuError as e:
            raise KrgError(f"cannot checkpoint application {msg.app} on node {self.d.me}: {e}") from None
        return p.Ok()

    async def handle_restore(self, node: int, msg: p.AppRestore, payload):
        version = self.store().get(msg.appid, msg.version)

        async def restore(dumped_on: int, gpid: int) -> None:
            where = version.job(dumped_on, gpid)
            meta = where.meta()
            record = JobRecord(gpid=gpid, argv=meta.argv, uid=meta.uid, gid=meta.gid, cwd=meta.cwd,
                               origin=self.d.me, node=self.d.me, start_time=time.time(), tty=meta.tty,
                               detach=True, app=meta.app, caps=meta.caps)
            job_dir = self.jobs.jobs_dir / str(gpid)
            if self.jobs.finished.pop(gpid, None) is not None:
                shutil.rmtree(job_dir, ignore_errors=True)     # the ended run it restarts from a snapshot of
            job_dir.mkdir(mode=0o700)
            try:
                job = await self.jobs.restore_job(record, where.images, job_dir, sink=None, window=0)
            except BaseException:
                shutil.rmtree(job_dir, ignore_errors=True)
                raise
            if not msg.frozen:
                job.signal(signal.SIGCONT, 0)

        await asyncio.gather(*(restore(n, g) for n, g in msg.jobs))
        return p.Ok()
