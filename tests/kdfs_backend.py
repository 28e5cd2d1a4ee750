"""An in-process KDFS node for the file system core's tests: KdfsClient's requests served by a real
MetaStore and a real ChunkStore, the way one krgd serves its local clients (kerrighed/kdfsservice.py),
with no daemon and no socket.

Only the network is faked: requests and replies go through msgpack as on the wire, changes are
stamped (`now`, `rid`) and applied in sequence like the leader does, the chunks a change frees are
deleted when it is applied, a get that meets a bad copy answers EIO like `read_chunk`. Hooks let a
test fail a put, hold puts in flight, and count requests.

    backend = LocalKdfs(tmp_path / "node", chunk_size=256 << 10)
    fs = FileSystem(lambda: backend, 256 << 10)
"""

from __future__ import annotations

import collections
import errno
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

import msgpack

from kdfs.chunkstore import ChunkStore
from kdfs.metastore import MetaStore
from kerrighed.errors import ChunkError, FsError, KrgError


def wire(obj):
    """What the other side of a socket gets (kerrighed/protocol.py's msgpack settings)."""
    return msgpack.unpackb(msgpack.packb(obj, use_bin_type=True), raw=False, strict_map_key=True)


class LocalKdfs:
    """One node (id 1, R = 1) offering KdfsClient's methods. Thread-safe: the metadata replica is used
    under one lock (the daemon's event loop serialises it); the chunk store is thread-safe itself."""

    node = 1

    def __init__(self, root: Path, chunk_size: int):
        self.root, self.chunk_size = Path(root), chunk_size
        self.lock = threading.Lock()
        self.term = 1
        self.calls: collections.Counter[str] = collections.Counter()   # requests by name; "put done"
        self.changes: list[dict] = []             # every applied change, as stamped
        self.on_put: Callable[[int, int], None] | None = None   # (ino, idx): may raise to fail a put
        self.raw_chunk_errors = False             # get lets ChunkError through instead of EIO
        self.gate = threading.Event()             # puts wait here while it is clear
        self.gate.set()
        self.in_flight = threading.Event()        # a put is waiting at the gate
        self._open()

    def _open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.meta = MetaStore(self.root / "meta.db", chunk_size=self.chunk_size)
        self.store = ChunkStore(self.root / "store")

    def reopen(self) -> None:
        """Close both stores and open them again from disk (a daemon restart)."""
        with self.lock:
            self.meta.close()
            self._open()

    def shutdown(self) -> None:
        with self.lock:
            self.meta.close()

    # -- KdfsClient's methods ---------------------------------------------------------------------

    def close(self) -> None:
        """A client connection closes: nothing to do (the FileSystem closes every client it made)."""
        self.calls["close"] += 1

    def change(self, op: str, **fields) -> dict:
        change = wire({"op": op, **fields})
        with self.lock:
            self.calls["change"] += 1
            change = {**change, "now": time.time_ns(), "rid": uuid.uuid4().hex}
            result = self.meta.apply(self.meta.applied + 1, self.term, change)
            self.changes.append(change)
            for chunk_id in result.get("freed") or []:
                self.store.delete(chunk_id)
            return wire(result)

    def query(self, query: str, **args) -> object:
        a = wire(args)
        with self.lock:
            self.calls["query"] += 1
            m = self.meta
            r = m.query(query, a)
            return wire(r)

    def put(self, chunk_id: str, data: bytes, ino: int, idx: int, size_hint: int = 0) -> list[int]:
        with self.lock:
            self.calls["put"] += 1
            hook = self.on_put
        if not self.gate.is_set():
            self.in_flight.set()
            assert self.gate.wait(10), "a put was held at the gate for 10 s"
        if hook is not None:
            hook(ino, idx)
        try:
            self.store.put(chunk_id, bytes(data))
        except OSError as e:
            raise FsError.of(e.errno or errno.EIO, f"node {self.node}: {e.strerror or e}") from None
        with self.lock:
            self.calls["put done"] += 1
        return [self.node]

    def get(self, chunk_id: str, nodes: list[int], offset: int = 0, length: int = -1) -> bytes:
        with self.lock:
            self.calls["get"] += 1
        try:
            if self.node not in nodes:
                raise ChunkError(f"chunk {chunk_id} has no copy on node {self.node}")
            return self.store.read(chunk_id, offset, None if length < 0 else length)
        except ChunkError as e:
            if self.raw_chunk_errors:
                raise
            raise FsError.of(errno.EIO, f"no readable copy of chunk {chunk_id} (holders {nodes}): {e}") from None

    def sync(self, chunks: list[tuple[str, list[int]]]) -> None:
        with self.lock:
            self.calls["sync"] += 1
        self.store.sync([c for c, nodes in chunks if self.node in nodes])

    def status(self) -> dict:
        u = self.store.usage()
        usage = {k: u[k] for k in ("total", "free", "avail", "stored", "chunks")}
        with self.lock:
            self.calls["status"] += 1
            return wire({"nodes": {str(self.node): usage}, "total": usage, "replicas": 1,
                         "chunk_size": self.chunk_size, "leader": self.node, "applied": self.meta.applied,
                         "files": self.meta.stats()})

    # -- what the tests look at -------------------------------------------------------------------

    def chunks(self, ino: int) -> list[dict]:
        with self.lock:
            return self.meta.chunks(ino)

    def committed(self, ino: int) -> bytes:
        """The file's content as the metadata and the store hold it, read without the core."""
        with self.lock:
            size = self.meta.getattr(ino)["size"]
            refs = self.meta.chunks(ino)
        out = bytearray(size)
        for r in refs:
            start = r["idx"] * self.chunk_size
            data = self.store.read(r["id"], 0, r["length"])[:max(0, size - start)]
            out[start:start + len(data)] = data
        return bytes(out)
