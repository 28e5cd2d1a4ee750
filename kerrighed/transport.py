"""Node-to-node links: ZeroMQ over TCP, encrypted and authenticated with CURVE.

Each daemon binds one ROUTER socket (the CURVE server) and holds one DEALER per other node (a CURVE
client that knows that node's public key). Every incoming connection is checked by our own ZAP
handler against the cluster configuration: a key that is not a configured node's is refused, and
the refusal logged. The ZAP reply names the node, so every received message carries the id of the
node that sent it (`User-Id` frame metadata) and a peer cannot speak for another.

One-way messages (heartbeats) are dropped rather than queued when a peer is not connected, so a dead
node never piles up stale messages; requests carry a request id and await their reply.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Awaitable, Callable

import zmq
import zmq.asyncio

from kerrighed import protocol
from kerrighed.config import ClusterConfig
from kerrighed.errors import ConfigError, KrgError, ProtocolError, Unreachable

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"

# handler(node, message, payload) -> reply message (requests) or None (one-way messages)
Handler = Callable[[int, protocol.Message, list[bytes]], Awaitable[protocol.Message | None]]


class Transport:
    def __init__(self, cfg: ClusterConfig, me: int, public: bytes, secret: bytes, handler: Handler):
        self.cfg, self.me, self.handler = cfg, me, handler
        self._public, self._secret = public, secret
        self._ctx = zmq.asyncio.Context()
        self._zap: zmq.asyncio.Socket | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._dealers: dict[int, zmq.asyncio.Socket] = {}
        self._pending: dict[int, asyncio.Future] = {}
        self._rids = itertools.count(1)
        self._tasks: set[asyncio.Task] = set()
        self._domain = f"krg-{cfg.session}".encode()

    async def start(self) -> None:
        # The ZAP handler must exist before the server socket binds: without one, libzmq lets
        # every CURVE client in.
        self._zap = self._socket(zmq.ROUTER)
        self._zap.bind(ZAP_ENDPOINT)
        self._spawn(self._serve_zap())

        node = self.cfg.node(self.me)
        self._router = self._socket(zmq.ROUTER)
        self._router.curve_server = True
        self._router.curve_secretkey = self._secret
        self._router.zap_domain = self._domain
        self._router.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_FRAME)
        self._router.setsockopt(zmq.ROUTER_HANDOVER, 1)   # a restarted peer takes over its routing id
        try:
            self._router.bind(node.endpoint)
        except zmq.ZMQError as e:
            raise ConfigError(f"cannot listen on {node.endpoint}: {e.strerror}; "
                              "is another daemon or cluster using that address and port?") from None
        self._spawn(self._serve_router())

        for peer in self.cfg.nodes.values():
            if peer.id == self.me:
                continue
            d = self._socket(zmq.DEALER)
            d.curve_serverkey = peer.public_key.encode()
            d.curve_publickey = self._public
            d.curve_secretkey = self._secret
            d.setsockopt(zmq.IMMEDIATE, 1)        # never queue for a peer that is not connected
            d.setsockopt(zmq.SNDHWM, 1000)
            d.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_FRAME)
            d.setsockopt(zmq.RECONNECT_IVL, 100)
            d.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
            d.setsockopt(zmq.HANDSHAKE_IVL, 2000)
            # Leave from our own address: each simulated node on one machine is then told apart.
            d.connect(f"tcp://{node.address}:0;{peer.address}:{peer.port}")
            self._dealers[peer.id] = d
            self._spawn(self._serve_dealer(peer.id, d))

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for fut in self._pending.values():
            fut.cancel()
        self._ctx.destroy(linger=0)

    def _socket(self, kind: int) -> zmq.asyncio.Socket:
        s = self._ctx.socket(kind)
        s.linger = 0
        return s

    def _spawn(self, coro) -> asyncio.Task:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._done)
        return t

    def _done(self, t: asyncio.Task) -> None:
        self._tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            log.error("transport task failed", exc_info=t.exception())

    # -- sending ----------------------------------------------------------------------------------

    def send(self, node: int, msg: protocol.Message, payload: list[bytes] = ()) -> bool:
        """One-way message; False when the peer is not connected (the message is dropped)."""
        return _send_now(self._dealers[node], protocol.encode(msg, 0, payload))

    async def request(self, node: int, msg: protocol.Message, timeout: float = 2.0,
                      payload: list[bytes] = (), bulk: bool = False) -> object:
        """Send a request and return the reply's result (with bulk, a Bulk with the reply's
        payload frames too); raise the remote error, or Unreachable."""
        if node not in self._dealers:
            raise Unreachable(f"node {node} is not a peer of node {self.me}")
        rid = next(self._rids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            if not _send_now(self._dealers[node], protocol.encode(msg, rid, payload)):
                raise Unreachable(f"node {node} is not connected")
            try:
                reply, data = await asyncio.wait_for(fut, timeout)
            except asyncio.TimeoutError:
                raise Unreachable(f"node {node} did not answer {msg.op} within {timeout:g} s") from None
        finally:
            self._pending.pop(rid, None)
        if isinstance(reply, protocol.Error):
            raise reply.exception()
        return protocol.Bulk(reply.result, data) if bulk else reply.result

    # -- receiving --------------------------------------------------------------------------------

    async def _serve_dealer(self, node: int, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart()
            try:
                reply, rid, data = protocol.decode(frames, max_body=protocol.MAX_FRAME)
            except ProtocolError as e:
                log.warning("bad reply from node %d: %s", node, e)
                continue
            fut = self._pending.get(rid)
            if fut is not None and not fut.done() and isinstance(reply, (protocol.Ok, protocol.Error)):
                fut.set_result((reply, data))

    async def _serve_router(self) -> None:
        while True:
            frames = await self._router.recv_multipart(copy=False)
            ident, body = frames[0].bytes, frames[1:]
            try:
                node = int(body[0].get("User-Id")) if body else None
            except (ValueError, TypeError, zmq.ZMQError):
                node = None
            if node is None:
                log.warning("dropped a message without an authenticated sender")
                continue
            frames = [f.bytes for f in body]
            if _peek_rid(frames) == 0:
                # One-way messages (heartbeats, stream data) are handled inline, in arrival
                # order; their handlers must not block.
                await self._dispatch(ident, node, frames)
            else:
                self._spawn(self._dispatch(ident, node, frames))

    async def _dispatch(self, ident: bytes, node: int, frames: list[bytes]) -> None:
        rid = 0
        try:
            msg, rid, payload = protocol.decode(frames)
            reply = await self.handler(node, msg, payload)
        except ProtocolError as e:
            log.warning("refused a message from node %d: %s", node, e)
            rid = _peek_rid(frames)
            reply = protocol.Error.of(e)
        except KrgError as e:
            reply = protocol.Error.of(e)
        except Exception as e:
            log.exception("handler failed on a message from node %d", node)
            reply = protocol.Error(kind="KrgError", message=f"internal error on node {self.me}: {e!r}")
        out: list[bytes] = []
        if isinstance(reply, protocol.Bulk):
            reply, out = protocol.Ok(result=reply.result), reply.payload
        if rid and reply is not None:
            _send_now(self._router, [ident, *protocol.encode(reply, rid, out)])   # if the peer left, it times out

    async def _serve_zap(self) -> None:
        """ZAP (RFC 27): accept CURVE clients whose key is a configured node's; log the others."""
        while True:
            frames = await self._zap.recv_multipart()
            try:
                sep = frames.index(b"")
                envelope, (version, request_id, domain, address, _identity, mechanism, *creds) = (
                    frames[: sep + 1], frames[sep + 1:])
            except ValueError:
                log.warning("malformed ZAP request ignored")
                continue
            status, text, user = b"400", b"refused", b""
            if mechanism == b"CURVE" and creds and domain == self._domain:
                key = zmq.utils.z85.encode(creds[0]).decode()
                peer = self.cfg.node_by_key(key)
                if peer is not None and peer.id != self.me:
                    status, text, user = b"200", b"OK", str(peer.id).encode()
                else:
                    log.warning("refused a connection from %s: its CURVE key %s is not a node of this cluster",
                                address.decode(errors="replace"), key)
            else:
                log.warning("refused a connection from %s: mechanism %s, domain %s",
                            address.decode(errors="replace"), mechanism.decode(errors="replace"),
                            domain.decode(errors="replace"))
            await self._zap.send_multipart(envelope + [version, request_id, status, text, user, b""])


def _send_now(sock: zmq.asyncio.Socket, frames: list[bytes]) -> bool:
    """Send without waiting; False if it could not go now. (pyzmq's asyncio sockets report a
    non-blocking send's failure in the returned future, not by raising.)"""
    fut = sock.send_multipart(frames, flags=zmq.NOBLOCK)
    exc = fut.exception() if fut.done() else None
    if exc is not None and not isinstance(exc, zmq.Again):
        log.warning("send failed: %s", exc)
    return exc is None


def _peek_rid(frames: list[bytes]) -> int:
    if len(frames) > 2 and len(frames[2]) == 8:
        return int.from_bytes(frames[2], "big")
    return 0
