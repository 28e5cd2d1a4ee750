"""The daemon's job side: launch, stdio sessions, the cluster-wide process table, signals, wait.

Each node is the authority for the jobs it hosts (`self.hosted`); a listing asks every node that
answers and merges. A command's session lives on its own node's daemon (the job's *origin*); when
the job runs elsewhere, its stdio crosses between the two daemons as one-way `job.*` messages,
throttled end to end by the command's credit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

from kerrighed import protocol as p
from kerrighed.caps import Cap, Capabilities
from kerrighed.errors import (JobLost, KrgError, NodeDown, NodeStateError, NoSuchJob, PermissionDenied,
                              ProtocolError, UsageError)
from kerrighed.ids import make_gpid
from kerrighed.jobs import HostedJob, JobRecord, Shepherd, load_record, spawn, spawn_restore, tree_stats
from kerrighed.localsock import Caller, read_frames

if TYPE_CHECKING:
    from kerrighed.daemon import Daemon

log = logging.getLogger(__name__)

LOCAL_BITS = 21
FINISHED_TTL = 600.0            # how long an ended job's status waits for `krg wait`
LIST_TIMEOUT = 10.0
MIGRATION_TIMEOUT = 120.0
IMAGE_PIECE = 8 << 20           # bytes of image per message while migrating
REFRESH_INTERVAL = 1.0          # seconds between two re-reads of one node's job list


class GpidAllocator:
    """Local ids for global PIDs, from a counter persisted in the state directory, skipping ids
    still in use: a gpid is never given twice while its job or its status is known."""

    def __init__(self, path: Path, node: int):
        self.path, self.node = path, node
        try:
            self.next = int(path.read_text())
        except (OSError, ValueError):
            self.next = 1

    def allocate(self, in_use) -> int:
        for _ in range(1 << LOCAL_BITS):
            local = self.next
            self.next = local + 1 if local + 1 < (1 << LOCAL_BITS) else 1
            gpid = make_gpid(self.node, local)
            if gpid not in in_use:
                self.path.write_text(str(self.next))
                return gpid
        raise KrgError("no free global PID on this node")


def caller_groups(pid: int) -> list[int]:
    """The caller's supplementary groups, from /proc (SO_PEERCRED carries only uid and gid)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Groups:"):
                return [int(g) for g in line.split()[1:]]
    except OSError:
        pass
    return []


class JobService:
    def __init__(self, daemon: Daemon):
        self.d = daemon
        self.me = daemon.me
        self.jobs_dir = daemon.home.state_dir(self.me) / "jobs"
        self.jobs_dir.mkdir(mode=0o700, exist_ok=True)
        self.gpids = GpidAllocator(daemon.home.state_dir(self.me) / "gpid.next", self.me)
        self.hosted: dict[int, HostedJob] = {}
        self.finished: dict[int, tuple[JobRecord, float]] = {}   # gpid -> (record, ended at)
        self.sessions: dict[int, Session] = {}                    # commands attached here
        self.known: dict[int, dict] = {}     # other nodes' jobs as last listed: gpid -> entry
        self.version = 0                     # bumped when a job starts or ends here
        self._seen: dict[int, int] = {}      # node -> version of its list we hold
        self._refreshing: set[int] = set()
        self._last_refresh: dict[int, float] = {}
        self._early_events: dict[int, list[p.JobEvent]] = {}
        self.proc_caps: dict[tuple[int, int], Capabilities] = {}

    # -- start-up: adopt the jobs a previous daemon left running ---------------------------------------

    async def adopt(self) -> None:
        for job_dir in sorted(self.jobs_dir.iterdir()):
            record = load_record(job_dir)
            if record is None:
                continue
            if record.status is not None:
                self.finished[record.gpid] = (record, time.monotonic())
                continue
            try:
                shepherd = await asyncio.to_thread(Shepherd.connect, job_dir / "ctl.sock")
            except (OSError, KrgError) as e:
                log.warning("job %d: its shepherd is gone (%s); recording it as lost", record.gpid, e)
                record.status = {"code": 255}
                self.finished[record.gpid] = (record, time.monotonic())
                continue
            record.host_pid = shepherd.host_pid
            self.hosted[record.gpid] = HostedJob(record, shepherd, job_dir, self._job_done)
            self._changed(record.gpid)
            log.info("adopted job %d (%s)", record.gpid, record.argv[0])

    # -- launching ---------------------------------------------------------------------------------------

    async def handle_run(self, caller: Caller, msg: p.RunJob, reader, writer) -> None:
        """proc.run: start the job, reply with its gpid, then carry its stdio until it ends."""
        try:
            if not msg.argv:
                raise UsageError("no program to run")
            node = self.place(msg, caller.uid)
            gpid = self.gpids.allocate(self.hosted.keys() | self.finished.keys() | self.sessions.keys())
            caps = self.inherited_caps(caller.pid)
            if msg.new_app:                  # krg run --app: like Kerrighed's krgcr-run
                app, caps = gpid, _checkpointable(caps)
            elif msg.join_app is not None:   # krg run --app APPID: that one or nothing
                app = await self._joinable(msg.join_app, caller.uid)
                if app is None:
                    raise PermissionDenied(f"application {msg.join_app} is not one of yours "
                                           f"(no running job of uid {caller.uid} in it)")
            else:
                app = self.app_of(caller.pid) or await self._joinable(msg.app, caller.uid) or gpid
            start = p.JobStart(
                gpid=gpid, argv=msg.argv, env={**msg.env, "KRG_APP": str(app)}, cwd=msg.cwd, umask=msg.umask,
                uid=caller.uid, gid=caller.gid, groups=caller_groups(caller.pid), origin=self.me, tty=msg.tty,
                rows=msg.rows, cols=msg.cols, detach=msg.detach, window=msg.window, caps=caps.to_dict(), app=app)
            session = None if msg.detach else Session(self, gpid, node, caller, writer, msg.window)
            if session:
                self.sessions[gpid] = session
            try:
                if node == self.me:
                    await self.start_local(start, session, msg.window)
                else:
                    await self.d.transport.request(node, start, timeout=30)
            except BaseException:
                self.sessions.pop(gpid, None)
                raise
        except KrgError as e:
            await _send(writer, p.Error.of(e))
            return
        log.info("job %d (%s) of uid %d started on node %d", gpid, msg.argv[0], caller.uid, node)
        await _send(writer, p.Ok(result={"gpid": gpid, "node": node, "app": app}))
        if session:
            session.open()
            await session.run(reader)

    def place(self, msg: p.RunJob, uid: int) -> int:
        online = self.d.members.online(time.monotonic())
        if msg.node is not None:
            self.d.cfg.node(msg.node)
            if msg.node not in online:
                raise NodeStateError(f"node {msg.node} is not online (online: {','.join(map(str, online))}); "
                                     f"add it with 'krgadm nodes add -n {msg.node}'")
            return msg.node
        if not online:
            return self.me      # no cluster formed: run here, like a plain machine
        return self.d.place(msg.argv, uid, online)

    async def start_local(self, start: p.JobStart, sink, window: int) -> HostedJob:
        job_dir = self.jobs_dir / str(start.gpid)
        job_dir.mkdir(mode=0o700)
        record = JobRecord(gpid=start.gpid, argv=start.argv, uid=start.uid, gid=start.gid, cwd=start.cwd,
                           origin=start.origin, node=self.me, start_time=time.time(), tty=start.tty,
                           detach=start.detach, app=start.app, caps=start.caps)
        try:
            init_cwd = self.d.home.job_run_dir(start.gpid)
            init_cwd.mkdir(parents=True, exist_ok=True)
            await spawn(record, start.env, start.groups, start.umask, job_dir / "ctl.sock", start.rows, start.cols,
                        init_cwd, cgroup=self.d.balancing.cgroup)
            shepherd = await asyncio.to_thread(Shepherd.connect, job_dir / "ctl.sock")
        except BaseException:
            _remove_dir(job_dir)
            raise
        record.host_pid = shepherd.host_pid
        job = HostedJob(record, shepherd, job_dir, self._job_done, sink=sink, credit=window)
        job.save()
        self.hosted[record.gpid] = job
        self._changed(record.gpid)
        return job

    def _job_done(self, job: HostedJob) -> None:
        self.hosted.pop(job.gpid, None)
        shutil.rmtree(self.d.home.job_run_dir(job.gpid), ignore_errors=True)
        if job.record.detach or job.sink is None:
            self.finished[job.gpid] = (job.record, time.monotonic())     # someone may `krg wait`
        else:
            _remove_dir(job.job_dir)
        self._changed(job.gpid)

    # -- node to node: the host side ---------------------------------------------------------------------

    async def handle_job_start(self, node: int, msg: p.JobStart, payload):
        sink = None if msg.detach else RemoteSink(self.d, msg.origin, msg.gpid)
        await self.start_local(msg, sink, msg.window)
        return p.Ok(result={"gpid": msg.gpid, "node": self.me})

    async def handle_job_attach(self, node: int, msg: p.JobAttach, payload):
        job = self._hosted(msg.gpid)
        if job.record.origin != msg.origin:      # a restarted job attached to by `restart -f`
            job.record.origin = msg.origin       # where job.moved and node failures must look
            job.save()
        job.attach(RemoteSink(self.d, msg.origin, msg.gpid) if msg.origin != self.me else self.sessions.get(msg.gpid),
                   msg.window)
        return p.Ok()

    async def handle_job_input(self, node: int, msg: p.JobInput, payload):
        if (job := self.hosted.get(msg.gpid)) is not None:
            for data in payload:
                job.feed(data)

    async def handle_job_eof(self, node: int, msg: p.JobEof, payload):
        if (job := self.hosted.get(msg.gpid)) is not None:
            job.eof()

    async def handle_job_credit(self, node: int, msg: p.JobCredit, payload):
        # Credit for a job hosted here is output credit; for a session here, input credit.
        if (job := self.hosted.get(msg.gpid)) is not None and job.sink is not None:
            job.grant(msg.nbytes)
        elif (session := self.sessions.get(msg.gpid)) is not None:
            session.input_credit(msg.nbytes)

    async def handle_job_winsize(self, node: int, msg: p.JobWinsize, payload):
        if (job := self.hosted.get(msg.gpid)) is not None:
            job.resize(msg.rows, msg.cols)

    async def handle_job_signal(self, node: int, msg: p.JobSignal, payload):
        self._hosted(msg.gpid).signal(msg.signal, msg.uid)
        return p.Ok()

    async def handle_job_list(self, node: int, msg: p.JobList, payload):
        version = self.version      # before the listing: an event after it is newer than the list
        return p.Ok(result={"jobs": await self.local_listing(msg.uid), "version": version})

    async def handle_job_wait(self, node: int, msg: p.JobWait, payload):
        return p.Ok(result={"status": await self.wait_local(msg.gpid)})

    # -- node to node: the origin side ---------------------------------------------------------------------

    async def handle_job_output(self, node: int, msg: p.JobOutput, payload):
        if (session := self.sessions.get(msg.gpid)) is not None:
            for data in payload:
                session.output(msg.fd, data)

    async def handle_job_exit(self, node: int, msg: p.JobExit, payload):
        if (session := self.sessions.get(msg.gpid)) is not None:
            status = {"code": msg.code} if msg.code is not None else {"signal": msg.signal}
            session.exited(status)

    def _hosted(self, gpid: int) -> HostedJob:
        job = self.hosted.get(gpid)
        if job is None:
            raise NoSuchJob(f"no job {gpid} on node {self.me}")
        return job

    # -- membership events --------------------------------------------------------------------------------

    def node_down(self, node: int) -> None:
        """A node died: sessions of its jobs end as lost; its sessions' jobs here go to their logs."""
        for session in list(self.sessions.values()):
            if session.node == node:
                session.lost(f"node {node} died")
        for job in self.hosted.values():
            if job.record.origin == node and isinstance(job.sink, RemoteSink):
                job.attach(None, 0)

    def node_restarted(self, node: int) -> None:
        """A node's daemon restarted and adopted its jobs anew: point their stdio back here."""
        for session in self.sessions.values():
            if session.node == node:
                session.reattach()
        for job in self.hosted.values():
            if job.record.origin == node and isinstance(job.sink, RemoteSink):
                job.attach(None, 0)     # that daemon's sessions are gone; `krg` re-attaches

    # -- the process table ---------------------------------------------------------------------------------
    # Every node keeps a copy of every other node's job list, re-read whenever that node's heartbeat
    # shows a new version: so any node can list, as lost, the jobs of a node that died.

    def peer_version(self, node: int, version: int) -> None:
        if self._seen.get(node) != version and node not in self._refreshing:
            self._refreshing.add(node)
            asyncio.ensure_future(self._refresh(node, version))

    async def _refresh(self, node: int, version: int) -> None:
        try:
            # At most one re-read per node per REFRESH_INTERVAL: a burst of launches there must
            # not turn into a burst of full listings here.
            wait = self._last_refresh.get(node, 0.0) + REFRESH_INTERVAL - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._last_refresh[node] = time.monotonic()
            reply = await self.d.transport.request(node, p.JobList(), timeout=LIST_TIMEOUT)
            self._remember(node, reply["jobs"])
            self._seen[node] = reply["version"]
        except KrgError as e:
            log.debug("could not re-read node %d's jobs: %s", node, e)
        finally:
            self._refreshing.discard(node)
        # Deltas that came while we read: those past the list's version still apply, in order.
        for event in sorted(self._early_events.pop(node, []), key=lambda e: e.version):
            self._apply_event(node, event)

    def _remember(self, node: int, jobs: list[dict]) -> None:
        self.known = {g: e for g, e in self.known.items() if e["node"] != node}
        self.known.update((j["gpid"], j) for j in jobs if j["node"] == node)

    def _changed(self, gpid: int) -> None:
        """A job started or ended here: tell every node at once (a small delta, in version order);
        a node that missed one re-reads the whole list."""
        self.version += 1
        event = p.JobEvent(version=self.version, gpid=gpid, entry=self._summary(gpid))
        now = time.monotonic()
        for node in self.d.cfg.nodes:
            if node != self.me and self.d.members.is_present(node, now):
                self.d.transport.send(node, event)

    def _summary(self, gpid: int) -> dict | None:
        """What other nodes keep of a job of ours: enough to list it, as lost if we die."""
        if gpid in self.hosted:
            record, state = self.hosted[gpid].record, "running"
        elif gpid in self.finished and self.finished[gpid][0].detach:
            record, state = self.finished[gpid][0], "exited"
        else:
            return None
        return {**_entry(record), "state": state, "cpu_time": 0.0, "rss": 0, "nprocs": 0}

    async def handle_job_event(self, node: int, msg: p.JobEvent, payload):
        if node in self._refreshing:
            self._early_events.setdefault(node, []).append(msg)
            return
        self._apply_event(node, msg)

    def _apply_event(self, node: int, msg: p.JobEvent) -> None:
        seen = self._seen.get(node)
        if seen is not None and msg.version <= seen:
            return                                      # the list we read already has it
        if seen == msg.version - 1:
            self._seen[node] = msg.version
        else:
            # We missed one (or never read the list): read it all, but keep this one meanwhile;
            # the node may die before the read, and then this is all we know of the job.
            self.peer_version(node, msg.version)
        if msg.entry is None:
            self.known.pop(msg.gpid, None)
        else:
            self.known[msg.gpid] = {**msg.entry, "node": node}

    # -- listing ----------------------------------------------------------------------------------

    async def local_listing(self, uid: int | None = None) -> list[dict]:
        jobs = [j for j in self.hosted.values() if uid is None or j.record.uid == uid]
        # Reading /proc takes a while with many processes: not on the event loop.
        stats = await asyncio.to_thread(tree_stats, [j.record.host_pid for j in jobs]) if jobs else {}
        out = [{**_entry(j.record), **stats[j.record.host_pid]} for j in jobs]
        for record, _ in self.finished.values():
            if record.detach and (uid is None or record.uid == uid):
                out.append({**_entry(record), "state": "exited", "cpu_time": 0.0, "rss": 0, "nprocs": 0})
        return out

    async def listing(self, uid: int | None = None, node: int | None = None) -> list[dict]:
        """Every job of the cluster: each present node lists its own; jobs last seen on a node
        that is gone are shown as lost."""
        now = time.monotonic()
        nodes = [n for n in self.d.cfg.nodes if self.d.members.is_present(n, now)]
        if node is not None:
            self.d.cfg.node(node)
            nodes = [n for n in nodes if n == node]
        replies = await asyncio.gather(*(self._list_node(n, uid) for n in nodes), return_exceptions=True)
        jobs, answered = [], set()
        for n, r in zip(nodes, replies):
            if isinstance(r, Exception):
                log.warning("node %d did not list its jobs: %s", n, r)
                continue
            answered.add(n)
            jobs += r
        listed = {j["gpid"] for j in jobs}
        if uid is None:
            for n in answered - {self.me}:
                self._remember(n, [j for j in jobs if j["node"] == n])
        for gpid, e in self.known.items():
            if e["node"] not in answered and gpid not in listed and (node is None or e["node"] == node) \
                    and (uid is None or e["uid"] == uid):
                jobs.append({**e, "state": "lost"})
        return sorted(jobs, key=lambda j: j["gpid"])

    async def _list_node(self, node: int, uid: int | None) -> list[dict]:
        if node == self.me:
            return await self.local_listing(uid)
        return (await self.d.request_unless_down(node, p.JobList(uid=uid), timeout=LIST_TIMEOUT))["jobs"]

    async def locate(self, gpid: int) -> int:
        if gpid in self.hosted or gpid in self.finished:
            return self.me
        if gpid in self.sessions:
            return self.sessions[gpid].node
        # A daemon that just started has not heard every node yet: give them a heartbeat or two.
        settled = self.d.members.started + 2 * self.d.cfg.failure_timeout
        while True:
            for j in await self.listing():
                if j["gpid"] == gpid:
                    if j["state"] == "lost":
                        raise NodeStateError(f"job {gpid} is lost: node {j['node']} is gone")
                    return j["node"]
            if time.monotonic() > settled:
                raise NoSuchJob(f"no job {gpid} in the cluster")
            await asyncio.sleep(self.d.cfg.heartbeat_interval)

    # -- migration ----------------------------------------------------------------------------------------
    # Freeze and dump with CRIU (which kills the tree once its images are safe), hand the images to
    # the target, whose new shepherd restores the job and owns it. If the dump fails, CRIU leaves the
    # job running here; if the target cannot restore it, it is restored here from the same images:
    # never lost, never running twice.

    async def handle_migrate(self, msg: p.MigrateJob, caller: Caller) -> dict:
        node = await self.locate(msg.gpid)
        req = p.JobMigrate(gpid=msg.gpid, target=msg.node, uid=caller.uid)
        if node == self.me:
            return await self.migrate_out(req)
        return await self.d.transport.request(node, req, timeout=MIGRATION_TIMEOUT)

    async def handle_job_migrate(self, node: int, msg: p.JobMigrate, payload):
        return p.Ok(result=await self.migrate_out(msg))

    async def migrate_out(self, msg: p.JobMigrate) -> dict:
        from checkpoint import criu      # pycriu and protobuf: only for the daemons that migrate

        job = self._hosted(msg.gpid)
        record = job.record
        if msg.uid not in (0, record.uid):
            raise PermissionDenied(f"job {msg.gpid} belongs to uid {record.uid}: permission denied")
        if not _caps(record.caps).has("CAN_MIGRATE"):
            raise PermissionDenied(f"job {msg.gpid} may not migrate: it lacks CAN_MIGRATE "
                                   f"(krgcapset -k {msg.gpid} -e +CAN_MIGRATE)")
        online = self.d.members.online(time.monotonic())
        if msg.target not in online:
            raise NodeStateError(f"node {msg.target} is not online (online: {','.join(map(str, online))})")
        if msg.target == self.me:
            raise UsageError(f"job {msg.gpid} already runs on node {self.me}")
        if job.held is not None:
            raise NodeStateError(f"job {msg.gpid} is already migrating")
        images = job.job_dir / "images"
        shutil.rmtree(images, ignore_errors=True)
        images.mkdir(mode=0o700)
        t0 = time.monotonic()
        job.hold()
        # The job does not run from the dump's start to the restore's end: that is its downtime.
        try:
            # A pty's slave is inherited at restore: the master stays with the shepherd.
            external = [criu.fd_key(record.host_pid, 0)] if record.tty else []
            await self.d.balancing.release(job)     # CRIU's parasite runs in the job: not at the job's quota
            stats = await asyncio.to_thread(criu.dump, record.host_pid, images, external=external)
        except criu.CriuError as e:
            await self.d.balancing.enclose(job)
            job.resume()
            shutil.rmtree(images, ignore_errors=True)
            raise KrgError(f"cannot checkpoint job {msg.gpid}: {e}") from None
        # The tree is gone. What it wrote before goes to its reader now, ahead of the restored job.
        for stream, data in job.drain():
            if job.sink is not None:
                job.sink.output(stream, data)
        job.forget()
        names = sorted(f.name for f in images.iterdir())
        moved = JobRecord.from_dict(record.to_dict())
        moved.status = None
        t_dumped = time.monotonic()
        try:
            await self._send_images(msg.target, msg.gpid, images, names)
            t_sent = time.monotonic()
            await self.d.request_unless_down(
                msg.target, p.JobRestore(record=moved.to_dict(), files=names, window=job.credit),
                timeout=MIGRATION_TIMEOUT)
        except KrgError as e:
            log.warning("job %d: node %d could not restore it (%s); restoring it here", msg.gpid, msg.target, e)
            self.hosted.pop(msg.gpid, None)
            back = await self.restore_job(moved, images, job.job_dir, job.sink, job.credit)
            back.waiters += job.waiters
            for data in job.held or ():
                back.feed(data)
            raise KrgError(f"migration of job {msg.gpid} to node {msg.target} failed ({e}); "
                           f"it goes on on node {self.me}") from None
        self.hosted.pop(msg.gpid, None)
        for waiter in job.waiters:          # a `krg wait` follows the job to its new node
            if not waiter.done():
                waiter.set_result({"moved": msg.target})
        for data in job.held or ():
            self.d.transport.send(msg.target, p.JobInput(gpid=msg.gpid), [data])
        self._moved(msg.gpid, record.origin, msg.target)
        _remove_dir(images)
        _remove_dir(job.job_dir)
        self._changed(msg.gpid)
        done = time.monotonic()
        times = {"downtime_s": done - t0, "dump_s": t_dumped - t0, "transfer_s": t_sent - t_dumped,
                 "restore_s": done - t_sent, "criu_frozen_s": (stats.frozen_time or 0) / 1e6}
        log.info("job %d migrated to node %d: down %.3f s (dump %.3f, transfer %.3f, restore %.3f)",
                 msg.gpid, msg.target, times["downtime_s"], times["dump_s"], times["transfer_s"], times["restore_s"])
        return {"gpid": msg.gpid, "node": msg.target, **times}

    async def _send_images(self, target: int, gpid: int, images: Path, names: list[str]) -> None:
        """The images, piece by piece: one piece in memory at a time, each acknowledged before
        the next (the flow control), none larger than a frame."""
        for name in names:
            with open(images / name, "rb") as f:
                offset = 0
                while True:
                    piece = await asyncio.to_thread(f.read, IMAGE_PIECE)
                    if not piece and offset:
                        break
                    await self.d.request_unless_down(target, p.JobImage(gpid=gpid, name=name, offset=offset),
                                                     timeout=MIGRATION_TIMEOUT, payload=[piece])
                    offset += len(piece)
                    if not piece:
                        break

    async def handle_job_image(self, node: int, msg: p.JobImage, payload):
        if "/" in msg.name or msg.name in ("", ".", "..") or len(payload) != 1 or msg.offset < 0:
            raise ProtocolError("job.image: bad file name or payload")
        if msg.gpid in self.hosted:
            raise NodeStateError(f"job {msg.gpid} already runs on node {self.me}")
        images = self.jobs_dir / str(msg.gpid) / "images"
        images.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = images / msg.name
        with open(path, "r+b" if msg.offset else "wb") as f:
            f.seek(msg.offset)
            await asyncio.to_thread(f.write, payload[0])
        return p.Ok()

    def _moved(self, gpid: int, origin: int, node: int) -> None:
        if origin == self.me:
            if (session := self.sessions.get(gpid)) is not None:
                session.node = node
        else:
            self.d.transport.send(origin, p.JobMoved(gpid=gpid, node=node))

    async def handle_job_moved(self, node: int, msg: p.JobMoved, payload):
        if (session := self.sessions.get(msg.gpid)) is not None:
            session.node = msg.node

    async def handle_job_restore(self, node: int, msg: p.JobRestore, payload):
        record = JobRecord.from_dict(msg.record)
        job_dir = self.jobs_dir / str(record.gpid)
        images = job_dir / "images"
        if not images.is_dir() or sorted(f.name for f in images.iterdir()) != sorted(msg.files):
            _remove_dir(images)
            _remove_dir(job_dir)
            raise ProtocolError(f"job.restore: the images of job {record.gpid} did not all arrive")
        if record.detach:
            sink = None
        elif record.origin == self.me:
            sink = self.sessions.get(record.gpid)
        else:
            sink = RemoteSink(self.d, record.origin, record.gpid)
        try:
            await self.restore_job(record, images, job_dir, sink, msg.window)
        except BaseException:
            _remove_dir(images)
            _remove_dir(job_dir)
            raise
        _remove_dir(images)
        return p.Ok(result={"node": self.me})

    async def restore_job(self, record: JobRecord, images: Path, job_dir: Path, sink, window: int) -> HostedJob:
        """Restore a job from CRIU images under a new shepherd, and host it here (migration's
        target, a failed migration's source, an application's restart)."""
        self.d.home.job_run_dir(record.gpid).mkdir(parents=True, exist_ok=True)     # the init's cwd
        ctl = job_dir / "ctl.sock"
        await spawn_restore(record, images, ctl)
        shepherd = await asyncio.to_thread(Shepherd.connect, ctl)
        record.node, record.host_pid = self.me, shepherd.host_pid
        job = HostedJob(record, shepherd, job_dir, self._job_done, sink=sink, credit=window)
        job.save()
        self.hosted[record.gpid] = job
        await self.d.balancing.restored(job)      # into this node's cgroup, if it has a CPU limit
        self._changed(record.gpid)
        return job

    # -- Kerrighed capabilities ---------------------------------------------------------------------------
    # A job's capabilities live in its record; a local process's (the shell that ran `krgcapset`
    # without -k) in `self.proc_caps`, keyed by pid and start time so a reused pid is not mistaken.

    def inherited_caps(self, pid: int) -> Capabilities:
        """What a job launched by process `pid` gets: the fork rule applied to its nearest ancestor
        with capabilities (a job's init or a process given some with krgcapset), else the default."""
        by_init = {j.record.host_pid: j for j in self.hosted.values()}
        for ancestor in _ancestry(pid):
            if ancestor in by_init:
                return _caps(by_init[ancestor].record.caps).child()
            key = (ancestor, _start_time(ancestor))
            if key in self.proc_caps:
                return self.proc_caps[key].child()
        return Capabilities.DEFAULT

    def app_of(self, pid: int) -> int | None:
        """The application a process belongs to: that of the job whose tree it is in, if any."""
        by_init = {j.record.host_pid: j for j in self.hosted.values()}
        for ancestor in _ancestry(pid):
            if ancestor in by_init:
                return by_init[ancestor].record.app
        return None

    async def _joinable(self, app: int | None, uid: int) -> int | None:
        """An application a command asks to join ($KRG_APP): only one with a running job of the
        same user (root may join any), so nobody slips a job into another user's application."""
        if app is None:
            return None
        for entries in (self.known.values(), await self.listing()):     # the copy first, then everyone
            if any(e.get("app") == app and (uid == 0 or e["uid"] == uid) and e.get("state") != "lost"
                   for e in entries):
                return app
        return None

    async def handle_caps_get(self, msg: p.CapsGet, caller: Caller) -> dict:
        return (await self._caps_op(msg.pid, msg.gpid, None, caller)).to_dict()

    async def handle_caps_set(self, msg: p.CapsSet, caller: Caller) -> dict:
        return (await self._caps_op(msg.pid, msg.gpid, msg.changes, caller)).to_dict()

    async def _caps_op(self, pid, gpid, changes, caller: Caller) -> Capabilities:
        if (pid is None) == (gpid is None):
            raise UsageError("give either a process id or a job's global PID")
        if gpid is not None:
            node = await self.locate(gpid)
            if node != self.me:
                res = await self.d.transport.request(node, p.JobCaps(gpid=gpid, uid=caller.uid, changes=changes))
                return Capabilities.from_dict(res)
            return self._job_caps(gpid, caller.uid, changes)
        owner = _owner(pid)
        if owner is None:
            raise NoSuchJob(f"no process {pid} on node {self.me}")
        if caller.uid not in (0, owner):
            raise PermissionDenied(f"process {pid} belongs to uid {owner}: permission denied")
        key = (pid, _start_time(pid))
        current = self.proc_caps.get(key) or self.inherited_caps(_parent(pid))
        if changes:
            current = current.apply([tuple(c) for c in changes], force_root=caller.uid == 0)
            self.proc_caps = {k: v for k, v in self.proc_caps.items() if _start_time(k[0]) == k[1]}
            self.proc_caps[key] = current
        return current

    def _job_caps(self, gpid: int, uid: int, changes) -> Capabilities:
        job = self._hosted(gpid)
        if uid not in (0, job.record.uid):
            raise PermissionDenied(f"job {gpid} belongs to uid {job.record.uid}: permission denied")
        current = _caps(job.record.caps)
        if changes:
            current = current.apply([tuple(c) for c in changes], force_root=uid == 0)
            job.record.caps = current.to_dict()
            job.save()
        return current

    async def handle_job_caps(self, node: int, msg: p.JobCaps, payload):
        return p.Ok(result=self._job_caps(msg.gpid, msg.uid, msg.changes).to_dict())

    # -- kill and wait --------------------------------------------------------------------------------------

    async def handle_kill(self, msg: p.KillJobs, caller: Caller) -> dict:
        if not 0 < msg.signal < signal.NSIG:
            raise UsageError(f"invalid signal {msg.signal}")
        for gpid in msg.gpids:
            node = await self.locate(gpid)
            if node == self.me:
                self._hosted(gpid).signal(msg.signal, caller.uid)
            else:
                await self.d.transport.request(node, p.JobSignal(gpid=gpid, signal=msg.signal, uid=caller.uid))
        return {"signalled": msg.gpids}

    async def handle_wait(self, msg: p.WaitJob, caller: Caller) -> dict:
        node = await self.locate(msg.gpid)
        while True:
            if node == self.me:
                status = await self.wait_local(msg.gpid)
            else:
                try:
                    status = (await self.d.request_unless_down(node, p.JobWait(gpid=msg.gpid), timeout=None))["status"]
                except NodeDown:
                    raise JobLost(f"job {msg.gpid} is lost: node {node} died") from None
            if "moved" not in status:
                return {"status": status}
            node = status["moved"]          # it migrated while we waited: wait where it went

    async def wait_local(self, gpid: int) -> dict:
        if gpid in self.finished:
            record, _ = self.finished.pop(gpid)
            _remove_dir(self.jobs_dir / str(gpid))
            self._changed(gpid)
            return record.status
        job = self._hosted(gpid)
        fut = asyncio.get_running_loop().create_future()
        job.waiters.append(fut)
        status = await fut
        if gpid in self.finished:
            self.finished.pop(gpid)
            _remove_dir(self.jobs_dir / str(gpid))
            self._changed(gpid)
        return status

    async def end_all(self, timeout: float = 10.0) -> None:
        """Kill every hosted job and wait until each is reaped (the cluster is going down)."""
        jobs = list(self.hosted.values())
        waits = []
        for job in jobs:
            fut = asyncio.get_running_loop().create_future()
            job.waiters.append(fut)
            waits.append(fut)
            job.signal(signal.SIGKILL, 0)
        if waits:
            done, pending = await asyncio.wait(waits, timeout=timeout)
            if pending:
                log.warning("%d jobs did not end within %g s", len(pending), timeout)
        for record, _ in list(self.finished.values()):
            _remove_dir(self.jobs_dir / str(record.gpid))
        self.finished.clear()

    def expire(self) -> None:
        cutoff = time.monotonic() - FINISHED_TTL
        for gpid, (_, ended) in list(self.finished.items()):
            if ended < cutoff:
                del self.finished[gpid]
                _remove_dir(self.jobs_dir / str(gpid))
                self._changed(gpid)

    async def handle_attach(self, caller: Caller, msg: p.AttachJob, reader, writer) -> None:
        """proc.attach: a command takes the stdio of a job it launched back (after a daemon restart)."""
        try:
            node = await self.locate(msg.gpid)
            owner = (self.hosted[msg.gpid].record.uid if msg.gpid in self.hosted
                     else next((j["uid"] for j in await self.listing() if j["gpid"] == msg.gpid), None))
            if caller.uid not in (0, owner):
                raise PermissionDenied(f"job {msg.gpid} is not yours")
            session = Session(self, msg.gpid, node, caller, writer, msg.window)
            self.sessions[msg.gpid] = session
            if node == self.me:
                self._hosted(msg.gpid).attach(session, msg.window)
            else:
                await self.d.transport.request(node, p.JobAttach(gpid=msg.gpid, origin=self.me, window=msg.window))
        except KrgError as e:
            self.sessions.pop(msg.gpid, None)
            await _send(writer, p.Error.of(e))
            return
        await _send(writer, p.Ok(result={"gpid": msg.gpid, "node": node}))
        session.open()
        await session.run(reader)


def _caps(d: dict | None) -> Capabilities:
    return Capabilities.from_dict(d) if d else Capabilities.DEFAULT


def _checkpointable(caps: Capabilities) -> Capabilities:
    """The root of a new application: CHECKPOINTABLE effective and inheritable-effective (what
    Kerrighed's krgcr-run gave it), as far as its permitted sets allow."""
    bit = Cap.CHECKPOINTABLE.mask
    return Capabilities(caps.permitted, caps.effective | (bit & caps.permitted), caps.inheritable_permitted,
                        caps.inheritable_effective | (bit & caps.inheritable_permitted))


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _parent(pid: int) -> int:
    fields = _stat(pid)
    return int(fields[1]) if fields else 0


def _start_time(pid: int) -> int:
    fields = _stat(pid)
    return int(fields[19]) if fields else -1


def _ancestry(pid: int):
    """pid, its parent, its grandparent... up to init."""
    seen = 0
    while pid > 1 and seen < 512:
        yield pid
        pid, seen = _parent(pid), seen + 1


def _owner(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def _entry(r: JobRecord) -> dict:
    return {"gpid": r.gpid, "node": r.node, "uid": r.uid, "argv": r.argv, "start_time": r.start_time,
            "app": r.app, "tty": r.tty, "detach": r.detach, "status": r.status, "origin": r.origin,
            "caps": r.caps}


def _remove_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


async def _send(writer, msg: p.Message, payload=()) -> None:
    writer.write(p.pack_stream(p.encode(msg, 0, payload)))
    await writer.drain()


class RemoteSink:
    """A hosted job's stdio going to the daemon of its origin node."""

    def __init__(self, daemon: Daemon, origin: int, gpid: int):
        self.d, self.origin, self.gpid = daemon, origin, gpid

    def output(self, fd: int, data: bytes) -> None:
        self.d.transport.send(self.origin, p.JobOutput(gpid=self.gpid, fd=fd), [data])

    def input_credit(self, nbytes: int) -> None:
        self.d.transport.send(self.origin, p.JobCredit(gpid=self.gpid, nbytes=nbytes))

    def exited(self, status: dict) -> None:
        self.d.transport.send(self.origin, p.JobExit(gpid=self.gpid, code=status.get("code"),
                                                     signal=status.get("signal")))


class Session:
    """A command attached to a job, on the command's own node: relays stdio, signals, resizes."""

    def __init__(self, svc: JobService, gpid: int, node: int, caller: Caller, writer, window: int):
        self.svc, self.gpid, self.node, self.caller, self.writer = svc, gpid, node, caller, writer
        self.window = window
        self.over = False
        self._early: list[bytes] | None = []     # what the job says before the command is told its gpid

    def open(self) -> None:
        for frame in self._early or ():
            self.writer.write(frame)
        self._early = None

    # the job's side, called by the hosted job or by job.* messages from its host
    def output(self, fd: int, data: bytes) -> None:
        self._write(p.Output(fd=fd), [data])

    def input_credit(self, nbytes: int) -> None:
        self._write(p.Credit(nbytes=nbytes))

    def exited(self, status: dict) -> None:
        self._write(p.Exit(code=status.get("code"), signal=status.get("signal")))
        self._end()

    def lost(self, reason: str) -> None:
        self._write(p.Lost(reason=reason))
        self._end()

    def reattach(self) -> None:
        asyncio.ensure_future(self._reattach())

    async def _reattach(self) -> None:
        try:
            await self.svc.d.transport.request(
                self.node, p.JobAttach(gpid=self.gpid, origin=self.svc.me, window=self.window))
        except KrgError as e:
            self.lost(f"node {self.node} restarted and lost job {self.gpid} ({e})")

    def _write(self, msg: p.Message, payload=()) -> None:
        if self.over:
            return
        frame = p.pack_stream(p.encode(msg, 0, payload))
        if self._early is not None:
            self._early.append(frame)
        else:
            self.writer.write(frame)

    def _end(self) -> None:
        self.over = True
        self.svc.sessions.pop(self.gpid, None)
        if self._early is None:
            self.writer.close()     # else the launch reply is still to be sent; open() flushes

    # the command's side
    async def run(self, reader) -> None:
        try:
            while not self.over:
                frames = await read_frames(reader)
                if frames is None:
                    break
                msg, _, payload = p.decode(frames)
                await self._from_command(msg, payload)
        except (KrgError, ConnectionError) as e:
            log.warning("job %d: session ended: %s", self.gpid, e)
        if not self.over:
            # The command went away with its job still running: hang up on the job, as a
            # terminal closing would, and keep its output in its log.
            log.info("job %d: its command went away; sending SIGHUP", self.gpid)
            await self._let_go()
            await self._signal(signal.SIGHUP)

    async def _let_go(self) -> None:
        """The job's output goes to its log from now on (the job's host is told if it is remote)."""
        self.over = True
        self.svc.sessions.pop(self.gpid, None)
        # job.attach to the host itself, where no session of this job is: its log.
        await self._to_job(lambda j: j.attach(None, 0), p.JobAttach(gpid=self.gpid, origin=self.node, window=0))

    async def _from_command(self, msg: p.Message, payload: list[bytes]) -> None:
        if isinstance(msg, p.Input):
            await self._to_job(lambda j: [j.feed(d) for d in payload], p.JobInput(gpid=self.gpid), payload)
        elif isinstance(msg, p.InputEof):
            await self._to_job(lambda j: j.eof(), p.JobEof(gpid=self.gpid))
        elif isinstance(msg, p.Credit):
            await self._to_job(lambda j: j.grant(msg.nbytes), p.JobCredit(gpid=self.gpid, nbytes=msg.nbytes))
        elif isinstance(msg, p.Winsize):
            await self._to_job(lambda j: j.resize(msg.rows, msg.cols),
                               p.JobWinsize(gpid=self.gpid, rows=msg.rows, cols=msg.cols))
        elif isinstance(msg, p.Signal):
            await self._signal(msg.signal)
        elif isinstance(msg, p.Detach):
            log.info("job %d: its command let go of it", self.gpid)
            await self._let_go()
            self.writer.close()
        else:
            raise KrgError(f"{msg.op} is not a message of a job session")

    async def _to_job(self, local, remote: p.Message | None, payload=()) -> None:
        if self.node == self.svc.me:
            if (job := self.svc.hosted.get(self.gpid)) is not None:
                local(job)
        elif remote is not None:
            self.svc.d.transport.send(self.node, remote, payload)

    async def _signal(self, sig: int) -> None:
        try:
            if self.node == self.svc.me:
                if (job := self.svc.hosted.get(self.gpid)) is not None:
                    job.signal(sig, self.caller.uid)
            else:
                await self.svc.d.transport.request(self.node, p.JobSignal(gpid=self.gpid, signal=sig,
                                                                           uid=self.caller.uid))
        except KrgError as e:
            log.warning("job %d: signal %d not delivered: %s", self.gpid, sig, e)
