"""The KDFS client: a local krgd's `kdfs.*` requests, for the mount process, tools and the
checkpoint store (no mount needed).

Raw operations are root's (the daemon checks the caller's uid); users reach KDFS through the mount,
where the kernel enforces permissions. A client talks to one of this machine's daemons and moves to
another one of them when its daemon dies: every metadata change carries an id, so a change retried
after such a move is answered, not applied twice.
"""

from __future__ import annotations

import uuid

from kerrighed import protocol as p
from kerrighed.client import Client
from kerrighed.config import Home
from kerrighed.errors import NotRunning


class KdfsClient:
    def __init__(self, home: Home, node: int | None = None, timeout: float | None = 120.0):
        self.home, self.timeout = home, timeout
        self.nodes = [node] if node is not None else home.local_nodes()
        self._conn: Client | None = None
        self.node: int | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> KdfsClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _connect(self) -> Client:
        if self._conn is not None:
            return self._conn
        reasons = []
        # Start with the daemon we used last: its caches are warm.
        order = sorted(self.nodes, key=lambda n: n != self.node)
        for n in order:
            sock = self.home.socket(n)
            if not sock.exists():
                continue
            try:
                self._conn, self.node = Client(sock, timeout=self.timeout), n
                return self._conn
            except NotRunning as e:
                reasons.append(str(e))
        raise NotRunning("no KDFS node daemon answers on this machine" + (f" ({reasons[-1]})" if reasons else ""))

    def _call(self, msg: p.Message, payload: list[bytes] = ()) -> p.Bulk:
        for attempt in range(len(self.nodes) + 1):
            try:
                return self._connect().call_bulk(msg, payload)
            except NotRunning:
                self.close()
                self.nodes = [n for n in self.nodes if n != self.node] + [self.node]   # that one last
                if attempt == len(self.nodes):
                    raise
        raise NotRunning("no KDFS node daemon answers on this machine")

    # -- metadata ---------------------------------------------------------------------------------

    def change(self, op: str, **fields) -> dict:
        """A metadata change (kdfs/metastore.py's ops), replicated before it returns."""
        return self._call(p.KdfsMeta(change={"op": op, **fields}, rid=uuid.uuid4().hex)).result

    def query(self, query: str, **args) -> object:
        return self._call(p.KdfsQuery(query=query, args=args)).result

    # -- chunks -----------------------------------------------------------------------------------

    def put(self, chunk_id: str, data: bytes, ino: int, idx: int, size_hint: int = 0) -> list[int]:
        """Store a new chunk on R nodes; returns the nodes that hold it."""
        return self._call(p.KdfsPut(id=chunk_id, ino=ino, idx=idx, size_hint=size_hint), [data]).result["nodes"]

    def get(self, chunk_id: str, nodes: list[int], offset: int = 0, length: int = -1) -> bytes:
        return self._call(p.KdfsGet(id=chunk_id, nodes=nodes, offset=offset, length=length)).payload[0]

    def sync(self, chunks: list[tuple[str, list[int]]]) -> None:
        self._call(p.KdfsSync(chunks=[[c, n] for c, n in chunks]))

    # -- administration ---------------------------------------------------------------------------

    def status(self) -> dict:
        return self._call(p.KdfsStatus()).result

    def fsck(self, repair: bool = False) -> dict:
        return self._call(p.KdfsFsck(repair=repair)).result

    def rebalance(self) -> dict:
        return self._call(p.KdfsRebalance()).result


def new_chunk_id() -> str:
    return uuid.uuid4().hex
