"""krgd, the node daemon: one per node, a table of handlers over one asyncio loop.

It heartbeats to every configured node, feeds what it hears to the pure membership state machine and
carries out its decisions; it answers the commands of local users on a Unix socket and the requests
of other nodes on its CURVE-authenticated ZeroMQ socket.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import collections
import fcntl
import logging
import os
import signal
import sys
import time
from pathlib import Path

from kdfs import mount as kdfs_mount
from kerrighed import localcluster
from kerrighed import membership as mb
from kerrighed import protocol as p
from kerrighed.config import Home, atomic_write
from kerrighed.errors import ConfigError, KrgError, NodeDown, NodeStateError, PermissionDenied, Timeout
from kerrighed.appcheckpoint import AppCheckpoints
from kerrighed.balancing import Balancing
from kerrighed.jobservice import JobService
from kerrighed.kdfsservice import KdfsService
from kerrighed.localsock import Caller, LocalServer
from kerrighed.stats import node_stats
from kerrighed.transport import Transport
from scheduler import ClusterView, JobSpec, NodeLoad, Scheduler, SchedulerConfig, known_balancers, known_policies

log = logging.getLogger("krgd")

VIEW_CHANGE_TIMEOUT = 10.0      # how long nodes.add/del wait for the new view to settle


class Ready:
    """Tells the process that started a detached daemon whether start-up worked (no-op otherwise)."""

    def __init__(self, fd: int | None = None):
        self.fd = fd

    def ok(self) -> None:
        self._say("ok")

    def fail(self, message: str) -> None:
        self._say(message)

    def _say(self, text: str) -> None:
        if self.fd is not None:
            os.write(self.fd, text.encode())
            os.close(self.fd)
            self.fd = None


def detach(log_file: str | None) -> Ready:
    """Fork into the background. The parent exits once the daemon answers (status 0) or failed
    (status 1, with the reason on stderr), like a classic daemon's start-up."""
    r, w = os.pipe()
    if os.fork():
        os.close(w)
        with os.fdopen(r, "rb") as f:
            said = f.read().decode(errors="replace").strip()
        if said == "ok":
            os._exit(0)
        sys.stderr.write(f"krgd: {said or 'exited during start-up; see its log'}\n")
        os._exit(1)
    os.close(r)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    out = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if log_file else null
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    return Ready(w)


class Daemon:
    def __init__(self, home: Home, node: int, ready: Ready = Ready()):
        self.home, self.me = home, node
        self.cfg = home.load_config()
        self.cfg.node(node)     # fails early when this node is not configured
        public, secret = home.load_keypair(node)
        if public.decode() != self.cfg.node(node).public_key:
            raise ConfigError(f"the key pair in {home.key_file(node)} is not node {node}'s in {home.cluster_file}")
        self.incarnation = int.from_bytes(os.urandom(7), "big")
        self.members = mb.Membership(
            me=node, incarnation=self.incarnation, possible=frozenset(self.cfg.nodes),
            timeout=self.cfg.failure_timeout, started=time.monotonic(),
        )
        self.transport = Transport(self.cfg, node, public, secret, self.handle_peer)
        self.jobs = JobService(self)
        self.apps = AppCheckpoints(self)
        self.balancing = Balancing(self)          # the node's CPU limit (a cgroup), loads, the balancer
        self.kdfs = KdfsService(self) if self.cfg.kdfs.enabled else None
        self.local = LocalServer(home.socket(node), self.handle_local,
                                 streams={p.RunJob: self.jobs.handle_run, p.AttachJob: self.jobs.handle_attach})
        self.stats: dict[int, dict] = {}          # last figures heard from each node
        self.reports: dict[int, tuple[int, frozenset[int]]] = {}   # node -> (its view epoch, whom it hears)
        self.changed = asyncio.Event()            # set whenever membership may have changed
        self.stopping = asyncio.Event()
        self.reboot = False
        self.ready = ready
        self._down_waiters: dict[int, list[asyncio.Future]] = {}
        # What this node placed lately, per node: a heartbeat may have been sent just before a job
        # started there, so placements count on top of the reported jobs for a little while.
        self._placed: dict[int, list[float]] = collections.defaultdict(list)
        self.scheduler_file = home.state_dir(node) / "scheduler.json"
        self.scheduler_version, self.scheduler = self._load_scheduler()
        self.member_file = home.state_dir(node) / "member"   # present while this node is online

        self.local_handlers = {
            p.ClusterStatus: self.handle_cluster_status,
            p.ClusterInfo: self.handle_cluster_info,
            p.ClusterPoweroff: self.handle_cluster_poweroff,
            p.ClusterReboot: self.handle_cluster_reboot,
            p.NodesStatus: self.handle_nodes_status,
            p.NodesAdd: self.handle_nodes_add,
            p.NodesDel: self.handle_nodes_del,
            p.NodePing: self.handle_node_ping,
            p.DaemonStop: self.handle_daemon_stop,
            p.ListJobs: self.handle_list_jobs,
            p.MigrateJob: self.jobs.handle_migrate,
            p.CheckpointApp: self.apps.handle_checkpoint,
            p.RestartApp: self.apps.handle_restart,
            p.CapsGet: self.jobs.handle_caps_get,
            p.CapsSet: self.jobs.handle_caps_set,
            p.SchedulerShow: self.handle_scheduler_show,
            p.SchedulerSet: self.handle_scheduler_set,
            p.KillJobs: self.jobs.handle_kill,
            p.WaitJob: self.jobs.handle_wait,
        }
        self.root_only = {p.ClusterPoweroff, p.ClusterReboot, p.NodesAdd, p.NodesDel, p.DaemonStop, p.SchedulerSet}
        self.peer_handlers = {
            p.Heartbeat: self.handle_heartbeat,
            p.PeerPing: self.handle_peer_ping,
            p.PeerPoweroff: self.handle_peer_poweroff,
            p.PeerReboot: self.handle_peer_reboot,
            p.JobStart: self.jobs.handle_job_start,
            p.JobAttach: self.jobs.handle_job_attach,
            p.JobSignal: self.jobs.handle_job_signal,
            p.JobList: self.jobs.handle_job_list,
            p.JobWait: self.jobs.handle_job_wait,
            p.JobCaps: self.jobs.handle_job_caps,
            p.JobInput: self.jobs.handle_job_input,
            p.JobEof: self.jobs.handle_job_eof,
            p.JobCredit: self.jobs.handle_job_credit,
            p.JobWinsize: self.jobs.handle_job_winsize,
            p.JobOutput: self.jobs.handle_job_output,
            p.JobExit: self.jobs.handle_job_exit,
            p.JobEvent: self.jobs.handle_job_event,
            p.JobMigrate: self.jobs.handle_job_migrate,
            p.JobImage: self.jobs.handle_job_image,
            p.JobRestore: self.jobs.handle_job_restore,
            p.JobMoved: self.jobs.handle_job_moved,
            p.AppFreeze: self.apps.handle_freeze,
            p.AppThaw: self.apps.handle_thaw,
            p.AppDump: self.apps.handle_dump,
            p.AppRestore: self.apps.handle_restore,
            p.AppDiscard: self.apps.handle_discard,
        }
        if self.kdfs:
            self.peer_handlers.update(self.kdfs.peer_handlers)

    # -- life cycle -------------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        node_stats()    # primes psutil's cpu_percent
        await self.transport.start()
        await self.jobs.adopt()
        await self.balancing.start()
        if self.kdfs:
            self.kdfs.start()
        await self.local.start()
        if self.kdfs:
            kdfs_mount.ensure(self.home, self.home.state_dir(self.me) / "kdfs-mount.log")
        self.ready.ok()
        if self.member_file.exists():
            # This daemon restarted while its node was in the cluster: go back in by itself.
            loop.create_task(self._rejoin())
        log.info("node %d up (incarnation %x) on %s, session %d",
                 self.me, self.incarnation, self.cfg.node(self.me).endpoint, self.cfg.session)
        beat = loop.create_task(self._heartbeat_loop())
        try:
            await self.stopping.wait()
        finally:
            beat.cancel()
            await asyncio.gather(beat, return_exceptions=True)
            await self.balancing.close()
            if self.kdfs and not any(localcluster.daemon_pid(self.home, n) for n in self.home.local_nodes()
                                     if n != self.me):
                # The last daemon of this machine: the mount flushes through us, then goes.
                await asyncio.get_running_loop().run_in_executor(None, kdfs_mount.stop, self.home)
            await self.local.close()
            if self.kdfs:
                await self.kdfs.close()
            await self.transport.close()
            self.member_file.unlink(missing_ok=True)    # a clean stop leaves; only a crash rejoins
            log.info("node %d %s", self.me, "rebooting" if self.reboot else "stopped")

    async def _heartbeat_loop(self) -> None:
        while True:
            self.stats[self.me] = {**node_stats(), "jobs": len(self.jobs.hosted), **self.balancing.stats()}
            if self.kdfs:
                self.stats[self.me]["kdfs"] = self.kdfs.usage()
            self._broadcast()
            self._apply(self.members.tick(time.monotonic()))
            self.jobs.expire()
            await asyncio.sleep(self.cfg.heartbeat_interval)

    def _broadcast(self) -> None:
        now = time.monotonic()
        hb = p.Heartbeat(node=self.me, incarnation=self.incarnation,
                         view=self.members.view.to_wire(), stats=self.stats.get(self.me) or node_stats(),
                         hears=[n for n in self.cfg.nodes if self.members.is_present(n, now)],
                         scheduler={"version": list(self.scheduler_version), "config": self.scheduler.config.to_dict()},
                         jobs=self.jobs.version)
        for node in self.cfg.nodes:
            if node != self.me:
                self.transport.send(node, hb)

    def _apply(self, actions: list[object]) -> None:
        """Carry out the membership state machine's decisions."""
        for a in actions:
            if isinstance(a, mb.ViewChanged):
                if self.me in a.new.nodes:
                    self.member_file.touch()
                else:
                    self.member_file.unlink(missing_ok=True)
                log.info("view epoch %d by node %d: online %s%s%s", a.new.epoch, a.new.proposer,
                         sorted(a.new.nodes) or "none",
                         f", joined {sorted(a.joined)}" if a.joined else "",
                         f", left {sorted(a.left)}" if a.left else "")
            elif isinstance(a, mb.Broadcast):
                self._broadcast()
            elif isinstance(a, mb.PeerUp):
                log.info("node %d is present", a.node)
            elif isinstance(a, mb.PeerRestarted):
                log.info("node %d's daemon restarted", a.node)
                self.jobs.node_restarted(a.node)
            elif isinstance(a, mb.PeerDown):
                log.info("node %d is no longer present", a.node)
                self.stats.pop(a.node, None)
                self.jobs.node_down(a.node)
                for fut in self._down_waiters.pop(a.node, []):
                    if not fut.done():
                        fut.set_result(a.node)
        if actions:
            self.changed.set()
            if self.kdfs and any(not isinstance(a, mb.Broadcast) for a in actions):
                self.kdfs.membership_changed()

    async def request_unless_down(self, node: int, msg: p.Message, timeout: float | None,
                                  payload: list[bytes] = ()) -> object:
        """A request to `node` that gives up (NodeDown) as soon as the node is seen dead."""
        down = self.node_down_future(node)
        asking = asyncio.ensure_future(self.transport.request(node, msg, timeout=timeout, payload=payload))
        try:
            await asyncio.wait({asking, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            down.cancel()
        if not asking.done():
            asking.cancel()
            raise NodeDown(f"node {node} died before answering {msg.op}")
        return asking.result()

    def node_down_future(self, node: int) -> asyncio.Future:
        """A future resolved when `node` is seen dead (silent past the failure timeout)."""
        fut = asyncio.get_running_loop().create_future()
        if not self.members.is_present(node, time.monotonic()):
            fut.set_result(node)
        else:
            self._down_waiters.setdefault(node, []).append(fut)
        return fut

    def place(self, argv: list[str], uid: int, online: list[int]) -> int:
        """Where a new job goes, by the scheduler's placement policy over the online nodes."""
        loads = []
        for n in online:
            st = self.stats.get(n)
            if st is None:
                continue
            loads.append(NodeLoad(node=n, cpus=st["cpus"], load=st["load"][0], cpu_percent=st["cpu_percent"],
                                  mem_total=st["mem_total"], mem_free=st["mem_free"],
                                  jobs=st.get("jobs", 0) + self._recently_placed(n),
                                  cpu_share=min(1.0, st.get("capacity", st["cpus"]) / st["cpus"])))
        node = self.scheduler.place(JobSpec(argv=tuple(argv), uid=uid, origin=self.me),
                                    ClusterView(nodes=tuple(loads), local=self.me))
        self._placed[node].append(time.monotonic())
        return node

    def _recently_placed(self, node: int) -> int:
        horizon = time.monotonic() - 4 * self.cfg.heartbeat_interval
        self._placed[node] = [t for t in self._placed[node] if t > horizon]
        return len(self._placed[node])

    # -- the scheduler's configuration: cluster-wide, newest (version, proposer) wins -----------------------

    def _load_scheduler(self) -> tuple[tuple[int, int], Scheduler]:
        try:
            saved = json.loads(self.scheduler_file.read_text())
            return tuple(saved["version"]), Scheduler(SchedulerConfig.from_dict(saved["config"]))
        except FileNotFoundError:
            return (0, 0), Scheduler()
        except (ValueError, KeyError, TypeError, KrgError) as e:
            log.warning("ignoring %s: %s", self.scheduler_file, e)
            return (0, 0), Scheduler()

    def _set_scheduler(self, version: tuple[int, int], config: SchedulerConfig) -> None:
        self.scheduler.reconfigure(config)
        self.scheduler_version = version
        atomic_write(self.scheduler_file, json.dumps({"version": list(version), "config": config.to_dict()}).encode(),
                     mode=0o644)
        log.info("scheduler: policy %s, balancer %s (version %d by node %d)", config.policy,
                 config.balancer or "none", *version)

    def _adopt_scheduler(self, node: int, offer: dict) -> None:
        try:
            version = tuple(int(v) for v in offer["version"])
            if len(version) != 2 or version <= self.scheduler_version:
                return
            self._set_scheduler(version, SchedulerConfig.from_dict(offer["config"]))
        except (KeyError, TypeError, ValueError, KrgError) as e:
            log.warning("node %d offered a scheduler configuration we cannot use: %s", node, e)

    async def handle_scheduler_show(self, msg, caller) -> dict:
        return {"version": list(self.scheduler_version), **self.scheduler.describe(),
                "config": self.scheduler.config.to_dict(), "known": known_policies(),
                "known_balancers": known_balancers()}

    async def handle_scheduler_set(self, msg: p.SchedulerSet, caller) -> dict:
        config = SchedulerConfig.from_dict(msg.config)
        config.validate()
        self._set_scheduler((self.scheduler_version[0] + 1, self.me), config)
        self._broadcast()
        log.info("scheduler set by uid %d", caller.uid)
        return await self.handle_scheduler_show(msg, caller)

    async def _rejoin(self) -> None:
        """Back into the cluster after a crash, once we hear it (a view with members)."""
        deadline = time.monotonic() + 10
        while not self.members.view.nodes:
            if time.monotonic() > deadline:
                log.info("no cluster heard since the restart: waiting for 'krgadm nodes add'")
                return
            await self._changed(0.5)
        try:
            await self._change_view(add={self.me})
            log.info("node %d rejoined the cluster after a restart", self.me)
        except KrgError as e:
            log.warning("node %d could not rejoin the cluster: %s", self.me, e)

    async def _changed(self, timeout: float) -> None:
        self.changed.clear()
        try:
            await asyncio.wait_for(self.changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    # -- dispatch ---------------------------------------------------------------------------------

    async def handle_local(self, caller: Caller, msg: p.Message, payload: list[bytes]) -> object:
        if self.kdfs and type(msg) in self.kdfs.local_handlers:
            if type(msg) in self.kdfs.root_only and not caller.is_root:
                raise PermissionDenied(f"{msg.op}: permission denied (KDFS's raw operations are root's; "
                                       "users go through the mount)")
            return await self.kdfs.local_handlers[type(msg)](msg, caller, payload)
        handler = self.local_handlers.get(type(msg))
        if handler is None:
            raise KrgError(f"{msg.op} is not a command of the local socket")
        if type(msg) in self.root_only and not caller.is_root:
            log.warning("refused %s to uid %d (pid %d): root only", msg.op, caller.uid, caller.pid)
            raise PermissionDenied(f"{msg.op}: permission denied (only root may change the cluster)")
        return await handler(msg, caller)

    async def handle_peer(self, node: int, msg: p.Message, payload: list[bytes]) -> p.Message | None:
        handler = self.peer_handlers.get(type(msg))
        if handler is None:
            raise KrgError(f"{msg.op} is not a node-to-node message")
        return await handler(node, msg, payload)

    # -- node to node -----------------------------------------------------------------------------

    async def handle_heartbeat(self, node: int, msg: p.Heartbeat, payload) -> None:
        if msg.node != node:
            log.warning("node %d sent a heartbeat claiming to be node %d; ignored", node, msg.node)
            return None
        try:
            view = mb.View.from_wire(msg.view)
        except ValueError as e:
            log.warning("node %d sent a bad view: %s", node, e)
            return None
        self.stats[node] = msg.stats
        self.jobs.peer_version(node, msg.jobs)
        if msg.scheduler is not None:
            self._adopt_scheduler(node, msg.scheduler)
        self.reports[node] = (view.epoch, frozenset(msg.hears))
        self._apply(self.members.on_heartbeat(time.monotonic(), node, msg.incarnation, view))
        self.changed.set()
        return None

    async def handle_peer_ping(self, node: int, msg: p.PeerPing, payload) -> p.Message:
        return p.Ok(result={"node": self.me})

    async def handle_peer_poweroff(self, node: int, msg: p.PeerPoweroff, payload) -> p.Message:
        log.info("poweroff requested by node %d", node)
        await self.jobs.end_all()
        asyncio.get_running_loop().call_later(0.05, self.stopping.set)
        return p.Ok()

    async def handle_peer_reboot(self, node: int, msg: p.PeerReboot, payload) -> p.Message:
        log.info("reboot requested by node %d", node)
        self.reboot = True
        asyncio.get_running_loop().call_later(0.05, self.stopping.set)
        return p.Ok()

    # -- commands ---------------------------------------------------------------------------------

    def _online(self) -> list[int]:
        return self.members.online(time.monotonic())

    async def handle_cluster_status(self, msg, caller) -> dict:
        online = self._online()
        return {"up": bool(online), "online": online, "epoch": self.members.view.epoch,
                "session": self.cfg.session, "local": self.me, "incarnation": self.incarnation,
                "view": self.members.view.to_wire()}

    async def handle_nodes_status(self, msg, caller) -> dict:
        states = self.members.states(time.monotonic())
        return {"local": self.me, "epoch": self.members.view.epoch,
                "nodes": [{"id": n, "state": s} for n, s in states.items()]}

    async def handle_cluster_info(self, msg, caller) -> dict:
        states = self.members.states(time.monotonic())
        nodes = []
        for n, state in states.items():
            entry = {"id": n, "state": state, "address": self.cfg.nodes[n].address}
            if state != mb.POSSIBLE and n in self.stats:
                entry.update(self.stats[n])
            nodes.append(entry)
        return {"local": self.me, "epoch": self.members.view.epoch, "nodes": nodes}

    async def handle_node_ping(self, msg: p.NodePing, caller) -> dict:
        self.cfg.node(msg.node)
        if msg.node == self.me:
            return {"node": self.me}
        return await self.transport.request(msg.node, p.PeerPing(sent=time.time()))

    async def handle_nodes_add(self, msg: p.NodesAdd, caller) -> dict:
        for n in msg.nodes:
            self.cfg.node(n)
            if not self.members.is_present(n, time.monotonic()):
                raise NodeStateError(f"node {n} is not present; start its daemon first")
        return await self._change_view(add=set(msg.nodes))

    async def handle_nodes_del(self, msg: p.NodesDel, caller) -> dict:
        now = time.monotonic()
        for n in msg.nodes:
            if n == self.me:
                raise NodeStateError("Unable to suppress current node.")
            self.cfg.node(n)
            if not self.members.is_online(n, now):
                raise NodeStateError(f"Unable to suppress node {n} (must be 'online').")
        return await self._change_view(remove=set(msg.nodes))

    async def _change_view(self, add: set[int] = frozenset(), remove: set[int] = frozenset()) -> dict:
        """Propose, then wait until the view holds the change and has settled on every member.

        A concurrent proposal may win over ours; then we propose again on top of it.
        """
        deadline = time.monotonic() + VIEW_CHANGE_TIMEOUT
        while True:
            now = time.monotonic()
            online = set(self.members.online(now))
            missing, extra = add - online, remove & self.members.view.nodes
            if not missing and not extra:
                if self._settled():
                    return {"online": sorted(online), "epoch": self.members.view.epoch}
            elif now < deadline:
                try:
                    self._apply(self.members.propose(now, add=missing, remove=extra))
                except ValueError as e:
                    raise NodeStateError(str(e)) from None
            if now >= deadline:
                raise Timeout("the cluster did not settle on the new membership in time")
            await self._changed(min(0.5, max(0.0, deadline - now)))

    def _settled(self) -> bool:
        """Every member has adopted the current view and hears every other member."""
        view = self.members.view
        for n in view.nodes - {self.me}:
            epoch, hears = self.reports.get(n, (-1, frozenset()))
            if epoch < view.epoch or not view.nodes <= hears | {n}:
                return False
        return True

    async def handle_cluster_poweroff(self, msg, caller) -> dict:
        others = [n for n in self._online() if n != self.me]
        await self._tell_all(others, p.PeerPoweroff())
        await self.jobs.end_all()
        log.info("cluster poweroff requested by uid %d: stopping nodes %s", caller.uid, [self.me, *others])
        asyncio.get_running_loop().call_later(0.05, self.stopping.set)
        return {"nodes": sorted([self.me, *others])}

    async def handle_cluster_reboot(self, msg, caller) -> dict:
        members = self._online()
        others = [n for n in members if n != self.me]
        await self._tell_all(others, p.PeerReboot())
        log.info("cluster reboot requested by uid %d: restarting nodes %s", caller.uid, members)
        self.reboot = True
        asyncio.get_running_loop().call_later(0.05, self.stopping.set)
        return {"nodes": members}

    async def _tell_all(self, nodes: list[int], msg: p.Message) -> None:
        results = await asyncio.gather(*(self.transport.request(n, msg, timeout=15) for n in nodes),
                                       return_exceptions=True)
        for n, r in zip(nodes, results):
            if isinstance(r, Exception):
                log.warning("node %d did not take %s: %s", n, msg.op, r)

    async def handle_list_jobs(self, msg: p.ListJobs, caller) -> dict:
        return {"jobs": await self.jobs.listing(msg.uid, msg.node), "local": self.me}

    async def handle_daemon_stop(self, msg: p.DaemonStop, caller) -> dict:
        log.info("stop requested by uid %d%s", caller.uid, " with its jobs" if msg.jobs else "")
        if msg.jobs:
            await self.jobs.end_all()
        asyncio.get_running_loop().call_later(0.05, self.stopping.set)
        return {"node": self.me}


# -- entry point ------------------------------------------------------------------------------------


def _lock_pidfile(path: Path) -> int:
    """Hold an exclusive lock on the pid file for the daemon's life: one krgd per node."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.read(fd, 32).decode().strip() or "?"
        os.close(fd)
        raise ConfigError(f"krgd for this node is already running (pid {other})") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def setup_logging(log_file: str | None, debug: bool) -> None:
    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="krgd", description="Kerrighed node daemon (one per node).")
    ap.add_argument("--home", help="directory with cluster.toml, keys/ and nodes/ (default $KRG_HOME or /var/lib/kerrighed)")
    ap.add_argument("--node", type=int, required=True, help="this node's id in cluster.toml")
    ap.add_argument("--log-file", help="log here instead of stderr")
    ap.add_argument("--detach", action="store_true", help="go to the background once the daemon answers")
    ap.add_argument("--debug", action="store_true")
    args = ap.parse_args(argv)
    ready = detach(args.log_file) if args.detach else Ready()
    setup_logging(args.log_file, args.debug)
    home = Home.resolve(args.home)
    pid_fd = None
    try:
        state = home.state_dir(args.node)
        state.mkdir(parents=True, exist_ok=True)
        for d in (state.parent, state):
            os.chmod(d, 0o755)      # users reach the socket inside
        pid_fd = _lock_pidfile(home.pidfile(args.node))
        home.run_dir(args.node).mkdir(parents=True, exist_ok=True)
        os.chdir(home.run_dir(args.node))
        daemon = Daemon(home, args.node, ready)
        asyncio.run(daemon.run())
    except KrgError as e:
        log.error("%s", e)
        ready.fail(str(e))
        if not args.detach:
            print(f"krgd: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        if pid_fd is not None:
            home.pidfile(args.node).unlink(missing_ok=True)
            os.close(pid_fd)
    if daemon.reboot:
        logging.shutdown()
        argv = [a for a in sys.argv[1:] if a != "--detach"]    # already in the background
        os.execv(sys.executable, [sys.executable, "-m", "kerrighed.daemon", *argv])
    return 0


if __name__ == "__main__":
    sys.exit(main())
