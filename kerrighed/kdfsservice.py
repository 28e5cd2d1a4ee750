"""KDFS in krgd: this node's chunk store, its metadata replica, and the leader's work (docs/kdfs.md).

Every node serves its chunks and keeps a full replica of the metadata. The lowest-id online node is
the leader: it stamps each change (sequence number, term, time), applies it, and answers only once
every other online node applied it too, so any node that takes the lead after a crash has every
acknowledged change. A node applies changes in sequence order; a gap makes it fetch what it missed,
and a replica that diverged (entries of an old leader nobody else got) copies the leader's database.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from kdfs.chunkstore import ChunkStore
from kdfs.metastore import MetaStore
from kerrighed import protocol as p
from kerrighed.errors import ChunkError, FsError, KrgError, NodeDown, PermissionDenied, Unreachable

if TYPE_CHECKING:
    from kerrighed.daemon import Daemon
    from kerrighed.localsock import Caller

log = logging.getLogger(__name__)

APPLY_TIMEOUT = 30.0        # a follower slower than this to apply a change is treated as failed
SNAPSHOT_PIECE = 8 << 20
RECENT = 20000              # change ids remembered, so a retried change is answered, not re-applied
REPAIR_EVERY = 2.0          # seconds between the leader's scans for missing copies
ORPHAN_AGE = 600            # an unreferenced copy older than this is garbage to the background collector
UPLOAD_AGE = 60             # fsck leaves younger unreferenced copies alone: uploads not yet committed


class NotLeader(KrgError):
    """This node is not (or no longer, or not yet) the KDFS leader; ask again."""


class StaleTerm(KrgError):
    """A change from a leader that another one has replaced."""


class KdfsService:
    def __init__(self, daemon: Daemon):
        self.d = daemon
        self.cfg = daemon.cfg.kdfs
        disk = daemon.home.kdfs_disk(daemon.me)
        disk.mkdir(parents=True, exist_ok=True)
        self.disk = disk
        self.store = ChunkStore(disk / "store")
        self.meta = MetaStore(disk / "meta.db", chunk_size=self.cfg.chunk_size)
        self.io = ThreadPoolExecutor(4, thread_name_prefix="kdfs-io")
        self.lock = asyncio.Lock()           # one change applied at a time, in sequence order
        self.promised = self.meta.last_term()  # the newest leader term this node has heard of
        self.term = 0                        # the term this node leads with; 0 = not leading
        self.leading = asyncio.Event()
        self.synced = False                  # this replica has caught up with the leader since it started
        self.recent: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self._snapshots: dict[int, Path] = {}
        self._tasks: set[asyncio.Task] = set()
        self._wake = asyncio.Event()
        self._applied = asyncio.Event()     # set at every change applied here
        self._usage: dict = {}
        self._usage_at = -1e9
        self._view_changed = time.monotonic()

        self.local_handlers = {
            p.KdfsMeta: self.handle_meta,
            p.KdfsQuery: self.handle_query,
            p.KdfsPut: self.handle_put,
            p.KdfsGet: self.handle_get,
            p.KdfsSync: self.handle_sync,
            p.KdfsStatus: self.handle_status,
            p.KdfsFsck: self.handle_fsck,
            p.KdfsRebalance: self.handle_rebalance,
        }
        # Users reach KDFS through the mount (the kernel checks permissions); here they may only ask
        # about their own files (kdfs stat) and the space (kdfs df).
        self.root_only = {p.KdfsMeta, p.KdfsPut, p.KdfsGet, p.KdfsSync, p.KdfsFsck, p.KdfsRebalance}
        self.peer_handlers = {
            p.KdfsPropose: self.handle_propose,
            p.KdfsApply: self.handle_apply,
            p.KdfsState: self.handle_state,
            p.KdfsLog: self.handle_log,
            p.KdfsSnapshot: self.handle_snapshot,
            p.KdfsChunkPut: self.handle_chunk_put,
            p.KdfsChunkGet: self.handle_chunk_get,
            p.KdfsChunkFetch: self.handle_chunk_fetch,
            p.KdfsChunkSync: self.handle_chunk_sync,
            p.KdfsChunkDrop: self.handle_chunk_drop,
            p.KdfsChunkScan: self.handle_chunk_scan,
        }

    # -- life cycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._spawn(self._leader_loop())

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.io.shutdown(wait=True)
        self.meta.close()
        for path in self._snapshots.values():
            path.unlink(missing_ok=True)

    def _spawn(self, coro) -> asyncio.Task:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    def usage(self) -> dict:
        """This node's disk and chunk figures (heartbeats carry them), at most a second old."""
        now = time.monotonic()
        if now - self._usage_at > 1.0:
            u = self.store.usage()
            self._usage = {k: u[k] for k in ("total", "free", "avail", "stored", "chunks")}
            self._usage_at = now
        return self._usage

    def membership_changed(self) -> None:
        """Called by the daemon on every membership event: re-check who leads."""
        self._view_changed = time.monotonic()
        if self.d.me not in self.online():
            self.synced = False     # out of the cluster: changes go on without us; catch up when back
        self._wake.set()

    # -- leadership -------------------------------------------------------------------------------

    def online(self) -> list[int]:
        return self.d._online()

    def leader(self) -> int | None:
        online = self.online()
        return min(online) if online else None

    async def _leader_loop(self) -> None:
        """Take the lead when this node is the lowest online one; catch up when following; on the
        leader, scan for chunks short of copies."""
        last_repair = 0.0
        last_gc = time.monotonic()
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), REPAIR_EVERY / 2)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                leader = self.leader()
                if leader != self.d.me and self.term:
                    log.info("kdfs: node %d no longer leads (term %d)", self.d.me, self.term)
                    self.term = 0
                    self.leading.clear()
                if leader == self.d.me and not self.term:
                    await self._take_lead()
                elif leader is not None and leader != self.d.me and not self.synced:
                    await self._catch_up_with(leader)
                if time.monotonic() - last_gc > ORPHAN_AGE:
                    last_gc = time.monotonic()
                    self._spawn(self._collect_garbage())
                if self.term and self._settled() and time.monotonic() - last_repair > REPAIR_EVERY:
                    last_repair = time.monotonic()
                    await self.repair()
            except asyncio.CancelledError:
                raise
            except KrgError as e:
                log.info("kdfs: %s", e)
            except Exception:
                log.exception("kdfs: leader loop failed")

    async def _take_lead(self) -> None:
        term = max(self.d.members.view.epoch, self.promised + 1)
        self.promised = term
        others = [n for n in self.online() if n != self.d.me]
        states = await asyncio.gather(*(self.d.request_unless_down(n, p.KdfsState(term=term), 10.0) for n in others),
                                      return_exceptions=True)
        best, best_applied = None, self.meta.applied
        for n, st in zip(others, states):
            if isinstance(st, StaleTerm):
                self.promised += 1      # try again with a newer term
                raise NotLeader(f"node {n} already follows a newer leader")
            if isinstance(st, BaseException) and not isinstance(st, NodeDown):
                # A live node we could not ask may hold the newest answered change: ask again later.
                raise NotLeader(f"node {n} did not say where its replica is ({st})")
            if isinstance(st, dict) and st["applied"] > best_applied:
                best, best_applied = n, st["applied"]
        if best is not None:
            log.info("kdfs: node %d is behind node %d (%d < %d): catching up before leading",
                     self.d.me, best, self.meta.applied, best_applied)
            async with self.lock:
                await self._fetch_from(best, best_applied)
        if self.leader() != self.d.me:
            return
        self.term = term
        self.synced = True
        self.leading.set()
        log.info("kdfs: node %d leads, term %d, at change %d", self.d.me, term, self.meta.applied)

    async def _catch_up_with(self, leader: int) -> None:
        async with self.lock:
            await self._fetch_from(leader)
        self.synced = True
        log.info("kdfs: node %d caught up with leader %d at change %d", self.d.me, leader, self.meta.applied)

    async def _fetch_from(self, node: int, upto: int | None = None) -> None:
        """Bring this replica to `node`'s (the lock is held): its log entries when they follow ours,
        else a copy of its database (we hold entries it never had, or it no longer keeps ours)."""
        for _ in range(10000):
            after = self.meta.applied
            got = await self.d.request_unless_down(node, p.KdfsLog(after=after), 30.0)
            diverged = after > got["applied"] or (after and got["term_at_after"] not in (None, self.meta.last_term()))
            if diverged or got["first"] > after + 1:
                await self._install_snapshot(node)
                continue
            for seq, term, change in got["entries"]:
                self._apply_local(seq, term, change)
            if not got["entries"] or self.meta.applied >= (upto or got["applied"]):
                return

    async def _install_snapshot(self, node: int) -> None:
        log.info("kdfs: node %d copies node %d's metadata (its log no longer fits ours)", self.d.me, node)
        tmp = self.disk / "meta.snapshot"
        with open(tmp, "wb") as f:
            offset = 0
            while True:
                got = await self.d.transport.request(node, p.KdfsSnapshot(offset=offset), timeout=60.0, bulk=True)
                data = got.payload[0] if got.payload else b""
                f.write(data)
                offset += len(data)
                if got.result["end"]:
                    break
        self.meta.close()
        self.meta = MetaStore.install_snapshot(self.disk / "meta.db", tmp)
        tmp.unlink(missing_ok=True)
        self.recent.clear()
        self._spawn(self._collect_garbage())

    # -- changes ----------------------------------------------------------------------------------

    async def handle_meta(self, msg: p.KdfsMeta, caller: Caller, payload=()) -> dict:
        return await self.change(msg.change, msg.rid)

    async def change(self, change: dict, rid: str = "") -> dict:
        """A metadata change from this node: to the leader, retried across a change of leader."""
        rid = rid or uuid.uuid4().hex
        deadline = time.monotonic() + 60
        while True:
            leader = self.leader()
            try:
                if leader == self.d.me:
                    return await self.propose(change, rid)
                if leader is None:
                    raise NotLeader("no node is online")
                result = await self.d.request_unless_down(leader, p.KdfsPropose(change=change, rid=rid), 60.0)
                await self._wait_applied(result.get("seq", 0), leader)   # our reads must show it
                return result
            except (NotLeader, StaleTerm, NodeDown, Unreachable) as e:
                if time.monotonic() > deadline:
                    raise FsError.of(errno.EIO, f"no KDFS leader answers ({e})") from None
                await asyncio.sleep(0.1)

    async def _wait_applied(self, seq: int, leader: int) -> None:
        deadline = time.monotonic() + 5
        while self.meta.applied < seq:
            self._applied.clear()
            try:
                await asyncio.wait_for(self._applied.wait(), max(0.01, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                await self._catch_up_with(leader)
                return

    async def handle_propose(self, node: int, msg: p.KdfsPropose, payload) -> p.Message:
        return p.Ok(result=await self.propose(msg.change, msg.rid))

    async def propose(self, change: dict, rid: str) -> dict:
        if self.leader() != self.d.me:
            raise NotLeader(f"node {self.d.me} does not lead KDFS")
        try:
            await asyncio.wait_for(self.leading.wait(), 30)
        except asyncio.TimeoutError:
            raise NotLeader(f"node {self.d.me} has not taken the lead yet") from None
        if rid in self.recent:
            return self.recent[rid]
        async with self.lock:
            if not self.term:
                raise NotLeader(f"node {self.d.me} no longer leads KDFS")
            change = {**change, "now": time.time_ns(), "rid": rid}
            seq, term = self.meta.applied + 1, self.term
            result = self._apply_local(seq, term, change)
        # Answer once a majority of the online nodes applied it (Raft's rule): a new leader collects
        # the most advanced replica before leading, so no single failure loses an answered change.
        # The others apply it in the background; a node asking for the change waits for its own copy.
        others = [n for n in self.online() if n != self.d.me]
        pending = {asyncio.ensure_future(self.d.request_unless_down(
            n, p.KdfsApply(seq=seq, term=term, change=change), APPLY_TIMEOUT)): n for n in others}
        need, acked = (len(others) + 1) // 2, 0
        while acked < need and pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                acked += self._replied(pending.pop(t), seq, t)
        for t, n in pending.items():
            t.add_done_callback(lambda t, n=n: self._replied(n, seq, t))
        if not self.term:
            raise NotLeader(f"a newer leader than node {self.d.me} exists")
        result = {**result, "seq": seq}
        self.recent[rid] = result
        return result

    def _replied(self, node: int, seq: int, t: asyncio.Future) -> bool:
        """A follower's answer to change seq: True if it applied it."""
        if t.cancelled():
            return False
        e = t.exception()
        if e is None:
            return True
        if isinstance(e, StaleTerm):
            if self.term:
                log.info("kdfs: node %d follows a newer leader: node %d steps down", node, self.d.me)
            self.term = 0
            self.leading.clear()
        elif isinstance(e, (NodeDown, Unreachable)):
            log.info("kdfs: node %d missed change %d (%s); it catches up when back", node, seq, e)
        else:
            log.warning("kdfs: node %d failed to apply change %d: %s", node, seq, e)
        return False

    def _apply_local(self, seq: int, term: int, change: dict) -> dict:
        result = self.meta.apply(seq, term, change)
        self._applied.set()
        freed = result.get("freed") or []
        if freed:
            self.io.submit(self._drop, list(freed))
        rid = change.get("rid")
        if rid:
            self.recent[rid] = result
            if len(self.recent) > RECENT:
                self.recent.popitem(last=False)
        if seq % max(1, self.cfg.keep_log // 10) == 0:
            self.meta.trim(self.cfg.keep_log)
        return result

    def _drop(self, ids: list[str]) -> None:
        for i in ids:
            self.store.delete(i)

    async def handle_apply(self, node: int, msg: p.KdfsApply, payload) -> p.Message:
        if msg.term < self.promised:
            raise StaleTerm(f"node {self.d.me} follows term {self.promised}, not {msg.term}")
        self.promised = msg.term
        async with self.lock:
            have = self.meta.term_at(msg.seq) if msg.seq <= self.meta.applied else None
            if msg.seq <= self.meta.applied and have not in (None, msg.term):
                await self._install_snapshot(node)      # we hold entries the cluster never had
            if msg.seq > self.meta.applied + 1:
                await self._fetch_from(node, msg.seq - 1)
            if msg.seq == self.meta.applied + 1:
                try:
                    self._apply_local(msg.seq, msg.term, msg.change)
                except FsError as e:
                    # The leader applied it; a replica that cannot has diverged: copy the leader.
                    log.warning("kdfs: change %d failed here (%s): copying the leader's metadata", msg.seq, e)
                    await self._install_snapshot(node)
        return p.Ok(result={"applied": self.meta.applied})

    async def handle_state(self, node: int, msg: p.KdfsState, payload) -> p.Message:
        if msg.term:
            if msg.term < self.promised:
                raise StaleTerm(f"node {self.d.me} follows term {self.promised}, not {msg.term}")
            self.promised = msg.term
            if self.term and node != self.d.me:
                self.term = 0
                self.leading.clear()
        return p.Ok(result={"applied": self.meta.applied, "term": self.meta.last_term()})

    async def handle_log(self, node: int, msg: p.KdfsLog, payload) -> p.Message:
        entries = self.meta.entries(msg.after, min(msg.limit, 5000))
        return p.Ok(result={"first": self.meta.first_retained(), "term_at_after": self.meta.term_at(msg.after),
                            "applied": self.meta.applied, "entries": entries})

    async def handle_snapshot(self, node: int, msg: p.KdfsSnapshot, payload) -> p.Bulk:
        path = self._snapshots.get(node)
        if msg.offset == 0 or path is None:
            if path is not None:
                path.unlink(missing_ok=True)
            path = self.disk / f"snapshot-for-{node}.db"
            async with self.lock:
                self.meta.snapshot(path)
            self._snapshots[node] = path
        with open(path, "rb") as f:
            f.seek(msg.offset)
            data = f.read(SNAPSHOT_PIECE)
        end = msg.offset + len(data) >= path.stat().st_size
        if end:
            path.unlink(missing_ok=True)
            self._snapshots.pop(node, None)
        return p.Bulk({"end": end}, [data])

    # -- reads ------------------------------------------------------------------------------------

    async def handle_query(self, msg: p.KdfsQuery, caller: Caller, payload=()) -> object:
        if not self.synced and self.leader() not in (None, self.d.me):
            await self._catch_up_with(self.leader())
        a = msg.args
        m = self.meta
        q = msg.query
        if not caller.is_root:
            if q not in ("getattr", "chunks") or m.getattr(a["ino"])["uid"] != caller.uid:
                raise PermissionDenied(f"kdfs: permission denied (uid {caller.uid} may only look at its own files)")
        return m.query(q, a)

    # -- chunk data -------------------------------------------------------------------------------

    def _avail(self, node: int) -> int:
        if node == self.d.me:
            return self.usage()["avail"]
        return (self.d.stats.get(node) or {}).get("kdfs", {}).get("avail", 0)

    def _placement(self, ino: int, idx: int, size_hint: int) -> list[int]:
        """Candidate nodes for a new chunk's copies, in order: the first copy on this node (or, in
        the striped part of a large file, on the next node in turn), then by free space."""
        online = sorted(self.online()) or [self.d.me]
        if self.d.me not in online:
            online.append(self.d.me)
        if idx * self.cfg.chunk_size >= self.cfg.stripe_after or size_hint > self.cfg.stripe_after * 4:
            first = online[(ino + idx) % len(online)]
        else:
            first = self.d.me
        rest = sorted((n for n in online if n != first), key=lambda n: -self._avail(n))
        return [first, *rest]

    async def handle_put(self, msg: p.KdfsPut, caller: Caller, payload: list[bytes]) -> dict:
        data = payload[0] if payload else b""
        want = self.cfg.replicas
        holders: list[int] = []
        errors: list[KrgError | OSError] = []
        candidates = self._placement(msg.ino, msg.idx, msg.size_hint)
        while len(holders) < want and candidates:
            batch, candidates = candidates[:want - len(holders)], candidates[want - len(holders):]
            results = await asyncio.gather(*(self._put_on(n, msg.id, data) for n in batch), return_exceptions=True)
            for n, r in zip(batch, results):
                if isinstance(r, BaseException):
                    log.info("kdfs: chunk %s not stored on node %d: %s", msg.id, n, r)
                    errors.append(r)
                else:
                    holders.append(n)
        if not holders:
            nospace = any(getattr(e, "errno", None) == errno.ENOSPC for e in errors)
            raise FsError.of(errno.ENOSPC if nospace else errno.EIO,
                             f"no node could store chunk {msg.id}: {errors[0] if errors else 'no node'}")
        return {"nodes": holders}

    async def _put_on(self, node: int, chunk_id: str, data: bytes) -> None:
        if node == self.d.me:
            await self._in_io(self.store.put, chunk_id, data)
        else:
            await self.d.request_unless_down(node, p.KdfsChunkPut(id=chunk_id), 30.0, payload=[data])

    async def _in_io(self, fn, *args):
        try:
            return await asyncio.get_running_loop().run_in_executor(self.io, fn, *args)
        except OSError as e:
            raise FsError.of(e.errno or errno.EIO, f"node {self.d.me}: {e.strerror or e}") from None

    async def handle_chunk_put(self, node: int, msg: p.KdfsChunkPut, payload) -> p.Message:
        await self._in_io(self.store.put, msg.id, payload[0] if payload else b"", msg.sync)
        return p.Ok()

    async def handle_chunk_get(self, node: int, msg: p.KdfsChunkGet, payload) -> p.Bulk:
        data = await self._in_io(self.store.read, msg.id, msg.offset, None if msg.length < 0 else msg.length)
        return p.Bulk(None, [data])

    async def handle_get(self, msg: p.KdfsGet, caller: Caller, payload=()) -> p.Bulk:
        return p.Bulk(None, [await self.read_chunk(msg.id, msg.nodes, msg.offset, msg.length)])

    async def read_chunk(self, chunk_id: str, nodes: list[int], offset: int = 0, length: int = -1) -> bytes:
        """A verified read from the first good copy (ours first); a bad copy is rewritten from a good one."""
        online = set(self.online()) | {self.d.me}
        order = sorted((n for n in nodes if n in online), key=lambda n: n != self.d.me)
        bad: list[int] = []
        last: Exception | None = None
        for n in order:
            try:
                if n == self.d.me:
                    data = await self._in_io(self.store.read, chunk_id, offset, None if length < 0 else length)
                else:
                    got = await self.d.transport.request(n, p.KdfsChunkGet(id=chunk_id, offset=offset, length=length),
                                                         timeout=30.0, bulk=True)
                    data = got.payload[0]
            except (ChunkError, FsError, Unreachable) as e:
                log.warning("kdfs: copy of chunk %s on node %d unusable: %s", chunk_id, n, e)
                if isinstance(e, ChunkError):
                    bad.append(n)
                last = e
                continue
            for b in bad:
                self._spawn(self._rewrite(chunk_id, b, n))
            return bytes(data) if not isinstance(data, bytes) else data
        raise FsError.of(errno.EIO, f"no readable copy of chunk {chunk_id} (holders {nodes}): {last}")

    async def _rewrite(self, chunk_id: str, bad: int, good: int) -> None:
        try:
            if bad == self.d.me:
                await self.fetch(chunk_id, good)
            else:
                await self.d.request_unless_down(bad, p.KdfsChunkFetch(id=chunk_id, source=good), 60.0)
            log.info("kdfs: repaired the copy of chunk %s on node %d from node %d", chunk_id, bad, good)
        except KrgError as e:
            log.warning("kdfs: could not repair chunk %s on node %d: %s", chunk_id, bad, e)

    async def fetch(self, chunk_id: str, source: int) -> None:
        got = await self.d.transport.request(source, p.KdfsChunkGet(id=chunk_id), timeout=60.0, bulk=True)
        await self._in_io(self.store.put, chunk_id, got.payload[0])

    async def handle_chunk_fetch(self, node: int, msg: p.KdfsChunkFetch, payload) -> p.Message:
        await self.fetch(msg.id, msg.source)
        return p.Ok()

    async def handle_sync(self, msg: p.KdfsSync, caller: Caller, payload=()) -> dict:
        by_node: dict[int, list[str]] = collections.defaultdict(list)
        online = set(self.online()) | {self.d.me}
        for chunk_id, nodes in msg.chunks:
            for n in nodes:
                if n in online:
                    by_node[n].append(chunk_id)
        await asyncio.gather(*(self._sync_on(n, ids) for n, ids in by_node.items()), return_exceptions=True)
        return {}

    async def _sync_on(self, node: int, ids: list[str]) -> None:
        if node == self.d.me:
            await self._in_io(self.store.sync, ids)
        else:
            await self.d.request_unless_down(node, p.KdfsChunkSync(ids=ids), 30.0)

    async def handle_chunk_sync(self, node: int, msg: p.KdfsChunkSync, payload) -> p.Message:
        await self._in_io(self.store.sync, msg.ids)
        return p.Ok()

    async def handle_chunk_drop(self, node: int, msg: p.KdfsChunkDrop, payload) -> p.Message:
        await self._in_io(self._drop, msg.ids)
        return p.Ok()

    async def handle_chunk_scan(self, node: int, msg: p.KdfsChunkScan, payload) -> p.Message:
        return p.Ok(result=await self._in_io(self._scan, msg.verify))

    def _scan(self, verify: bool) -> dict:
        held, bad, young = [], [], []
        for chunk_id in self.store.ids():
            held.append(chunk_id)
            if _age(self.store.path(chunk_id)) < UPLOAD_AGE:
                young.append(chunk_id)
            if verify:
                try:
                    self.store.verify(chunk_id)
                except ChunkError as e:
                    bad.append([chunk_id, str(e)])
        return {"held": held, "bad": bad, "young": young}

    # -- repair -----------------------------------------------------------------------------------

    def _settled(self) -> bool:
        """Membership has not moved for a while: a node that just (re)started may not hear every
        other one yet, and copies made from its partial view would be wasted."""
        return time.monotonic() - self._view_changed > 2 * self.d.cfg.failure_timeout

    async def repair(self, limit: int = 256) -> dict:
        """On the leader: give every chunk short of live copies new ones, made from a live copy.
        The holders that are away stay listed (their copies count again when they come back;
        `kdfs rebalance` trims the extra ones)."""
        online = set(self.online())
        want = min(self.cfg.replicas, len(online))
        todo = self.meta.under_replicated(online, want, limit)
        done, lost = 0, 0
        sem = asyncio.Semaphore(4)

        async def one(ref: dict) -> None:
            nonlocal done, lost
            live = [n for n in ref["nodes"] if n in online]
            if not live:
                lost += 1
                return
            spare = sorted((n for n in online if n not in ref["nodes"]), key=lambda n: -self._avail(n))
            added = []
            async with sem:
                for target in spare[:want - len(live)]:
                    try:
                        if target == self.d.me:
                            await self.fetch(ref["id"], live[0])
                        else:
                            await self.d.request_unless_down(target, p.KdfsChunkFetch(id=ref["id"], source=live[0]), 60.0)
                        added.append(target)
                    except KrgError as e:
                        log.warning("kdfs: no new copy of chunk %s on node %d: %s", ref["id"], target, e)
                if added:
                    try:
                        await self.change({"op": "replicas", "id": ref["id"], "nodes": ref["nodes"] + added})
                        done += 1
                    except FsError:
                        pass    # the chunk was freed meanwhile; its new copies are garbage now

        if todo:
            await asyncio.gather(*(one(r) for r in todo))
            log.info("kdfs: re-created copies of %d chunks (%d with no live copy)", done, lost)
        return {"repaired": done, "lost": lost, "scanned": len(todo)}

    async def _collect_garbage(self) -> None:
        """Delete copies no chunk map references (freed while this node was away)."""
        try:
            held = await self._in_io(lambda: list(self.store.ids()))
            stale = [c for c in held if self.meta.chunk(c) is None and _age(self.store.path(c)) > ORPHAN_AGE]
            if stale:
                await self._in_io(self._drop, stale)
                log.info("kdfs: dropped %d unreferenced chunk copies", len(stale))
        except Exception:
            log.exception("kdfs: garbage collection failed")

    # -- status, fsck, rebalance ------------------------------------------------------------------

    async def handle_status(self, msg, caller: Caller, payload=()) -> dict:
        nodes = {}
        for n in sorted(self.d.cfg.nodes):
            if n == self.d.me:
                nodes[n] = self.usage()
            elif "kdfs" in (self.d.stats.get(n) or {}):
                nodes[n] = self.d.stats[n]["kdfs"]
        total = {k: sum(u.get(k, 0) for u in nodes.values()) for k in ("total", "free", "avail", "stored", "chunks")}
        return {"nodes": {str(n): u for n, u in nodes.items()}, "total": total, "replicas": self.cfg.replicas,
                "chunk_size": self.cfg.chunk_size, "leader": self.leader(), "applied": self.meta.applied,
                "files": self.meta.stats()}

    async def handle_fsck(self, msg: p.KdfsFsck, caller: Caller, payload=()) -> dict:
        online = sorted(self.online())
        scans = await asyncio.gather(*(self._scan_node(n) for n in online), return_exceptions=True)
        held: dict[int, set[str]] = {}
        young: set[str] = set()
        problems: list[dict] = []
        bad: list[tuple[str, int]] = []
        for n, s in zip(online, scans):
            if isinstance(s, BaseException):
                problems.append({"kind": "node", "node": n, "detail": f"could not scan: {s}"})
                continue
            held[n] = set(s["held"])
            young |= set(s["young"])
            for chunk_id, why in s["bad"]:
                problems.append({"kind": "corrupt", "chunk": chunk_id, "node": n, "detail": why})
                bad.append((chunk_id, n))
        want = min(self.cfg.replicas, len(online))
        referenced = set()
        chunks = 0
        for ref in self.meta.all_chunks():
            chunks += 1
            referenced.add(ref["id"])
            live = [n for n in ref["nodes"] if n in held and ref["id"] in held[n]]
            missing = [n for n in ref["nodes"] if n in held and ref["id"] not in held[n]]
            for n in missing:
                problems.append({"kind": "missing", "chunk": ref["id"], "node": n, "ino": ref["ino"],
                                 "detail": "listed as a holder but has no copy"})
            if len(live) < want:
                problems.append({"kind": "under-replicated", "chunk": ref["id"], "ino": ref["ino"],
                                 "detail": f"{len(live)} live copies of {want}"})
        orphans = {n: sorted(ids - referenced - young) for n, ids in held.items() if ids - referenced - young}
        for n, ids in orphans.items():
            problems.append({"kind": "orphan", "node": n, "count": len(ids),
                             "detail": f"{len(ids)} copies no file references"})
        repaired = {}
        if msg.repair:
            for chunk_id, n in bad:
                ref = self.meta.chunk(chunk_id)
                good = [h for h in (ref or {}).get("nodes", []) if h != n and h in held and chunk_id in held[h]]
                if good:
                    await self._rewrite(chunk_id, n, good[0])
            for ref in self.meta.all_chunks():
                live = [h for h in ref["nodes"] if h in held and ref["id"] in held[h]]
                if live and live != ref["nodes"]:
                    await self.change({"op": "replicas", "id": ref["id"], "nodes": live})
            repaired = await self._ask_leader_repair()
            for n, ids in orphans.items():
                await self._drop_on(n, ids)
        return {"ok": not problems, "chunks": chunks, "nodes": online, "problems": problems,
                "repaired": repaired}

    async def _ask_leader_repair(self) -> dict:
        if self.leader() == self.d.me:
            total = {"repaired": 0, "lost": 0}
            while True:
                r = await self.repair(limit=1000)
                total["repaired"] += r["repaired"]
                total["lost"] += r["lost"]
                if r["scanned"] < 1000 or not r["repaired"]:
                    return total
        return {"detail": f"the leader (node {self.leader()}) re-creates missing copies in the background"}

    async def _scan_node(self, node: int) -> dict:
        if node == self.d.me:
            return await self._in_io(self._scan, True)
        return await self.d.request_unless_down(node, p.KdfsChunkScan(verify=True), 600.0)

    async def handle_rebalance(self, msg, caller: Caller, payload=()) -> dict:
        """Trim copies beyond R and move copies from the fullest nodes to the emptiest ones."""
        online = sorted(self.online())
        want = min(self.cfg.replicas, len(online))
        trimmed = moved = 0
        for ref in list(self.meta.all_chunks()):
            live = [n for n in ref["nodes"] if n in online]
            if len(live) > want:
                keep = sorted(live, key=lambda n: self._avail(n), reverse=True)[:want]
                await self.change({"op": "replicas", "id": ref["id"], "nodes": keep})
                drop = [n for n in live if n not in keep]
                for n in drop:
                    await self._drop_on(n, [ref["id"]])
                trimmed += 1
        # Even out: move copies from the node storing most to the one storing least.
        stored = {n: (self.usage() if n == self.d.me else (self.d.stats.get(n) or {}).get("kdfs", {})).get("stored", 0)
                  for n in online}
        if len(online) > 1:
            for ref in list(self.meta.all_chunks()):
                hi = max(stored, key=stored.get)
                lo = min(stored, key=stored.get)
                if stored[hi] - stored[lo] <= 2 * self.cfg.chunk_size:
                    break
                if hi in ref["nodes"] and lo not in ref["nodes"]:
                    try:
                        await self.d.request_unless_down(lo, p.KdfsChunkFetch(id=ref["id"], source=hi), 60.0) \
                            if lo != self.d.me else await self.fetch(ref["id"], hi)
                        nodes = [lo if n == hi else n for n in ref["nodes"]]
                        await self.change({"op": "replicas", "id": ref["id"], "nodes": nodes})
                        await self._drop_on(hi, [ref["id"]])
                    except KrgError as e:
                        log.warning("kdfs: rebalance of chunk %s failed: %s", ref["id"], e)
                        continue
                    stored[hi] -= ref["length"]
                    stored[lo] += ref["length"]
                    moved += 1
        return {"trimmed": trimmed, "moved": moved}

    async def _drop_on(self, node: int, ids: list[str]) -> None:
        if node == self.d.me:
            await self._in_io(self._drop, ids)
        else:
            await self.d.request_unless_down(node, p.KdfsChunkDrop(ids=ids), 30.0)


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0
