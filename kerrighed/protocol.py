"""The wire protocol, defined once for node-to-node links and the local command socket.

A message is an immutable record class registered under its op name. On the wire it is a list of frames:

    [version, op, rid, body, *payload]

`version` is one byte, `op` the ASCII op name, `rid` an 8-byte request id (0 for a one-way
message), `body` the msgpack map of the message's fields, and `payload` raw binary frames for bulk
data that never goes through msgpack. Replies are the `ok` and `error` messages with the request's
rid. Anything that does not decode cleanly raises `ProtocolError`; nothing is ever unpickled.

This module is a leaf: it imports nothing of ours but the errors.
"""

from __future__ import annotations

import functools
import struct
import types
import typing
from typing import Any, ClassVar, Union

import msgpack

from kerrighed.errors import KrgError, ProtocolError

VERSION = 1
MAX_BODY = 1 << 20          # msgpack bodies are small; bulk data goes in payload frames
MAX_FRAME = 64 << 20        # largest frame a peer may send (zmq MAXMSGSIZE and the local socket)
_RID = struct.Struct(">Q")

_registry: dict[str, type[Message]] = {}


_MISSING = object()


class Message:
    """Base of every wire message: an immutable record of the fields its class annotates.

    Not a dataclass on purpose: making ~50 frozen dataclasses costs 50 ms at import, and every
    `krg run` pays its imports. These records need no generated code.
    """

    op: ClassVar[str]
    _fields: ClassVar[tuple[str, ...]] = ()
    _defaults: ClassVar[dict[str, Any]] = {}
    __slots__ = ()

    def __init__(self, *args, **kwargs):
        if len(args) > len(self._fields):
            raise TypeError(f"{type(self).__name__} takes {len(self._fields)} fields, got {len(args)}")
        values = dict(zip(self._fields, args))
        for name, value in kwargs.items():
            if name not in self._fields or name in values:
                raise TypeError(f"{type(self).__name__}: unexpected or repeated field {name!r}")
            values[name] = value
        for name in self._fields:
            value = values.get(name, self._defaults.get(name, _MISSING))
            if value is _MISSING:
                raise TypeError(f"{type(self).__name__}: missing field {name!r}")
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __eq__(self, other):
        return type(other) is type(self) and self.body() == other.body()

    def __hash__(self):
        return hash((type(self), tuple(map(repr, self.body().values()))))

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.body().items())})"

    def body(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._fields}


def message(op: str):
    """Class decorator: register an immutable message class under `op`. Its fields are its
    annotations, in order; a class attribute of the same name is the field's default."""

    def register(cls):
        if op in _registry:
            raise ValueError(f"op {op!r} registered twice")
        fields = tuple(cls.__dict__.get("__annotations__", {}))
        defaults = {f: cls.__dict__[f] for f in fields if f in cls.__dict__}
        namespace = {k: v for k, v in cls.__dict__.items() if k not in fields and k not in ("__dict__", "__weakref__")}
        namespace.update(__slots__=fields, _fields=fields, _defaults=defaults, op=op)
        cls = type(cls.__name__, cls.__bases__, namespace)
        _registry[op] = cls
        return cls

    return register


def known_ops() -> list[str]:
    return sorted(_registry)


# -- encoding -------------------------------------------------------------------------------------


def encode(msg: Message, rid: int = 0, payload: list[bytes] = ()) -> list[bytes]:
    body = msgpack.packb(msg.body(), use_bin_type=True)
    return [bytes([VERSION]), msg.op.encode("ascii"), _RID.pack(rid), body, *payload]


def decode(frames: list[bytes], max_body: int = MAX_BODY) -> tuple[Message, int, list[bytes]]:
    """Frames -> (message, rid, payload). Raises ProtocolError on anything malformed.

    Requests from others are held to MAX_BODY; a reply we asked for (a listing of 100,000 jobs)
    may be as large as a frame."""
    if len(frames) < 4:
        raise ProtocolError(f"truncated message: {len(frames)} frames, need at least 4")
    version, op_raw, rid_raw, body_raw, *payload = (bytes(f) for f in frames)
    if len(version) != 1:
        raise ProtocolError("malformed version frame")
    if version[0] != VERSION:
        raise ProtocolError(f"unsupported protocol version {version[0]} (this node speaks {VERSION})")
    try:
        op = op_raw.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("op name is not ASCII") from None
    cls = _registry.get(op)
    if cls is None:
        raise ProtocolError(f"unknown op {op[:64]!r}")
    if len(rid_raw) != _RID.size:
        raise ProtocolError("malformed request id")
    (rid,) = _RID.unpack(rid_raw)
    if len(body_raw) > max_body:
        raise ProtocolError(f"{op} body of {len(body_raw)} bytes exceeds {max_body}")
    try:
        body = msgpack.unpackb(body_raw, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises a zoo of types for bad input
        raise ProtocolError(f"{op} body is not valid msgpack ({type(e).__name__})") from None
    return _build(cls, body), rid, payload


@functools.cache
def _schema(cls: type[Message]) -> dict[str, Any]:
    # Resolving annotations is slow (they are strings here): once per class, not per message.
    hints = typing.get_type_hints(cls)
    return {name: hints[name] for name in cls._fields}


def _build(cls: type[Message], body: Any) -> Message:
    if not isinstance(body, dict):
        raise ProtocolError(f"{cls.op} body is not a map")
    hints = _schema(cls)
    unknown = set(body) - set(hints)
    if unknown:
        raise ProtocolError(f"{cls.op}: unknown fields {sorted(map(str, unknown))}")
    for name in hints:
        if name not in body:
            if name not in cls._defaults:
                raise ProtocolError(f"{cls.op}: missing field {name!r}")
            continue
        if not _conforms(body[name], hints[name]):
            raise ProtocolError(f"{cls.op}: field {name!r} has the wrong type")
    return cls(**body)


def _conforms(value: Any, hint: Any) -> bool:
    """A shallow type check of msgpack values against the field annotations we use."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_conforms(value, h) for h in typing.get_args(hint))
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            return False
        return not args or all(_conforms(v, args[0]) for v in value)
    if origin is dict:
        key, val = typing.get_args(hint) or (Any, Any)
        return isinstance(value, dict) and all(
            _conforms(k, key) and _conforms(v, val) for k, v in value.items()
        )
    return isinstance(value, hint)


# -- replies ----------------------------------------------------------------------------------------


@message("ok")
class Ok(Message):
    result: Any = None


class Bulk:
    """What a handler returns to answer with binary payload frames (chunk data) beside its result."""

    __slots__ = ("result", "payload")

    def __init__(self, result: Any, payload: list[bytes]):
        self.result, self.payload = result, payload


@message("error")
class Error(Message):
    kind: str
    message: str

    @classmethod
    def of(cls, exc: KrgError) -> Error:
        return cls(kind=exc.kind, message=exc.message)

    def exception(self) -> KrgError:
        return KrgError.from_wire(self.kind, self.message)


# -- node to node -----------------------------------------------------------------------------------


@message("peer.heartbeat")
class Heartbeat(Message):
    """Sent by every daemon to every configured node a few times a second."""

    node: int
    incarnation: int            # changes at every daemon start: tells a restart from a slow node
    view: dict[str, Any]        # membership.View.to_wire()
    stats: dict[str, Any]       # this node's figures (stats.node_stats)
    hears: list[int] = ()                       # the nodes it sees present
    scheduler: dict[str, Any] | None = None     # {"version", "proposer", "config"}: newest wins
    jobs: int = 0                               # version of its job list: peers re-read it on change


@message("peer.ping")
class PeerPing(Message):
    sent: float = 0.0


@message("peer.poweroff")
class PeerPoweroff(Message):
    pass


@message("peer.reboot")
class PeerReboot(Message):
    pass


# -- command to local daemon --------------------------------------------------------------------------


@message("cluster.status")
class ClusterStatus(Message):
    pass


@message("cluster.info")
class ClusterInfo(Message):
    pass


@message("cluster.poweroff")
class ClusterPoweroff(Message):
    pass


@message("cluster.reboot")
class ClusterReboot(Message):
    pass


@message("nodes.status")
class NodesStatus(Message):
    pass


@message("nodes.add")
class NodesAdd(Message):
    nodes: list[int]


@message("nodes.del")
class NodesDel(Message):
    nodes: list[int]


@message("scheduler.show")
class SchedulerShow(Message):
    pass


@message("scheduler.set")
class SchedulerSet(Message):
    """A new cluster-wide scheduler configuration (scheduler.SchedulerConfig.to_dict())."""

    config: dict[str, Any]


@message("node.ping")
class NodePing(Message):
    """Round trip from a command through the local daemon to `node` and back."""

    node: int


@message("daemon.stop")
class DaemonStop(Message):
    """Stops this node's daemon only (the local-cluster tooling uses it)."""

    jobs: bool = True       # end the jobs it hosts too (else they wait to be adopted again)


# -- jobs: command to local daemon ---------------------------------------------------------------------


@message("proc.run")
class RunJob(Message):
    """Launch a job. Unless detached, the connection then carries its stdio (the io.* messages)."""

    argv: list[str]
    env: dict[str, str]
    cwd: str
    umask: int
    node: int | None = None           # None: the scheduler decides
    tty: bool = False
    rows: int = 24
    cols: int = 80
    detach: bool = False
    window: int = 1 << 20             # output bytes the command accepts before it grants more
    app: int | None = None            # the application to join ($KRG_APP inside a job)
    new_app: bool = False             # krg run --app: the root of a new (checkpointable) application
    join_app: int | None = None       # krg run --app APPID: join this application of the caller's, or fail


@message("proc.attach")
class AttachJob(Message):
    """Take over the stdio of a running job (after the launching daemon restarted)."""

    gpid: int
    window: int = 1 << 20


@message("proc.list")
class ListJobs(Message):
    uid: int | None = None
    node: int | None = None


@message("proc.kill")
class KillJobs(Message):
    gpids: list[int]
    signal: int


@message("proc.wait")
class WaitJob(Message):
    gpid: int


@message("proc.migrate")
class MigrateJob(Message):
    gpid: int
    node: int


@message("proc.checkpoint")
class CheckpointApp(Message):
    """Kerrighed's `checkpoint`: `id` is a job's gpid, or an application id with `app`."""

    id: int
    app: bool = False
    description: str | None = None
    mode: str = "checkpoint"          # checkpoint | freeze | unfreeze | ckpt-only | kill
    signal: int = 0                   # for unfreeze (0: none) and kill (default SIGTERM)


@message("proc.restart")
class RestartApp(Message):
    """Restore every job of a checkpoint: each on the node that dumped it when that node is online,
    else where the scheduler places it; `node` puts them all on one node, `spread` places every
    one through the scheduler."""

    appid: int
    version: int
    frozen: bool = False              # -U (and restart -f, which attaches before it thaws)
    node: int | None = None
    spread: bool = False


@message("caps.get")
class CapsGet(Message):
    """Kerrighed capabilities of a job (gpid) or of a local process (pid)."""

    pid: int | None = None
    gpid: int | None = None


@message("caps.set")
class CapsSet(Message):
    changes: list[list[str]]          # [[set name, krgcapset spec], ...], applied together
    pid: int | None = None
    gpid: int | None = None


# -- a job's stdio between the command and its daemon (one session per connection) -----------------


@message("io.output")
class Output(Message):
    fd: int                           # 1 or 2; the data is the payload


@message("io.input")
class Input(Message):
    """The data is the payload."""


@message("io.eof")
class InputEof(Message):
    pass


@message("io.credit")
class Credit(Message):
    """Flow control: the receiver may send `nbytes` more bytes of stream data."""

    nbytes: int


@message("io.signal")
class Signal(Message):
    signal: int


@message("io.winsize")
class Winsize(Message):
    rows: int
    cols: int


@message("io.exit")
class Exit(Message):
    code: int | None = None
    signal: int | None = None


@message("io.lost")
class Lost(Message):
    reason: str


@message("io.detach")
class Detach(Message):
    """The command lets go of the job without hanging up on it: its output goes to its log."""


# -- jobs: node to node ---------------------------------------------------------------------------------


@message("job.start")
class JobStart(Message):
    gpid: int
    argv: list[str]
    env: dict[str, str]
    cwd: str
    umask: int
    uid: int
    gid: int
    groups: list[int]
    origin: int                       # the node whose daemon holds the command's session
    tty: bool = False
    rows: int = 24
    cols: int = 80
    detach: bool = False
    caps: dict[str, int] | None = None
    app: int | None = None
    window: int = 1 << 20


@message("job.attach")
class JobAttach(Message):
    """Send the job's stdio to `origin` from now on, with a fresh output window."""

    gpid: int
    origin: int
    window: int


@message("job.output")
class JobOutput(Message):
    gpid: int
    fd: int


@message("job.input")
class JobInput(Message):
    gpid: int


@message("job.eof")
class JobEof(Message):
    gpid: int


@message("job.credit")
class JobCredit(Message):
    gpid: int
    nbytes: int


@message("job.winsize")
class JobWinsize(Message):
    gpid: int
    rows: int
    cols: int


@message("job.exit")
class JobExit(Message):
    gpid: int
    code: int | None = None
    signal: int | None = None


@message("job.signal")
class JobSignal(Message):
    gpid: int
    signal: int
    uid: int                          # who asks: the hosting node checks ownership


@message("job.list")
class JobList(Message):
    uid: int | None = None


@message("job.caps")
class JobCaps(Message):
    gpid: int
    uid: int                          # who asks: the hosting node checks ownership
    changes: list[list[str]] | None = None


@message("job.migrate")
class JobMigrate(Message):
    """To the job's host: move it to `target`."""

    gpid: int
    target: int
    uid: int


@message("job.image")
class JobImage(Message):
    """To the migration's target: a piece of one CRIU image file (the payload), at `offset`."""

    gpid: int
    name: str
    offset: int


@message("job.restore")
class JobRestore(Message):
    """To the migration's target, once every image file is there: restore the job."""

    record: dict[str, Any]
    files: list[str]
    window: int = 1 << 20


@message("job.moved")
class JobMoved(Message):
    """To the job's origin: its session's job now runs on `node`."""

    gpid: int
    node: int


@message("app.freeze")
class AppFreeze(Message):
    app: int
    uid: int


@message("app.dump")
class AppDump(Message):
    """Dump this node's (frozen) jobs of `app` into version `version` of the store, being written."""

    app: int
    version: int


@message("app.thaw")
class AppThaw(Message):
    app: int
    uid: int                          # who asks: the hosting node checks ownership
    signal: int = 0                   # 0: continue; else end the jobs with this signal


@message("app.restore")
class AppRestore(Message):
    """Restore these jobs here, stopped (the coordinator thaws them once every node has its own);
    with `check`, only make sure this node can read their images and take their global PIDs."""

    appid: int
    version: int
    jobs: list[list[int]]             # [[node it was dumped on, gpid], ...] to restore here
    check: bool = False


@message("app.discard")
class AppDiscard(Message):
    """Of these jobs of `appid`: kill those running here and forget the statuses of those that
    ended here (a restart that failed is undone; one that worked leaves no stale status)."""

    appid: int
    gpids: list[int]


@message("job.event")
class JobEvent(Message):
    """A job started or ended on the sending node; `entry` is its listing entry, None once gone."""

    version: int
    gpid: int
    entry: dict[str, Any] | None = None


@message("job.wait")
class JobWait(Message):
    gpid: int


# -- KDFS (docs/kdfs.md) ------------------------------------------------------------------------------
# Local socket, from the mount process or the Python client (root only, except kdfs.status).


@message("kdfs.meta")
class KdfsMeta(Message):
    change: dict             # a metadata change (kdfs/metastore.py); the leader stamps and replicates it
    rid: str = ""            # the caller's id for this change: a retry after a leader change is not applied twice


@message("kdfs.query")
class KdfsQuery(Message):
    query: str               # getattr, lookup, readdir, readlink, chunks, chunk, stats
    args: dict


@message("kdfs.put")
class KdfsPut(Message):
    id: str                  # a new chunk; payload: its data
    ino: int                 # the file and the chunk's index in it decide where copies go
    idx: int
    size_hint: int = 0       # the file's size: past stripe_after, first copies rotate over the nodes


@message("kdfs.get")
class KdfsGet(Message):
    id: str
    nodes: list[int]
    offset: int = 0
    length: int = -1


@message("kdfs.sync")
class KdfsSync(Message):
    chunks: list             # [[id, [nodes]], ...]: fsync these copies where they are


@message("kdfs.status")
class KdfsStatus(Message):
    pass


@message("kdfs.fsck")
class KdfsFsck(Message):
    repair: bool = False


@message("kdfs.rebalance")
class KdfsRebalance(Message):
    pass


# Node to node.


@message("kdfs.propose")
class KdfsPropose(Message):
    change: dict
    rid: str = ""


@message("kdfs.apply")
class KdfsApply(Message):
    seq: int
    term: int
    change: dict


@message("kdfs.state")
class KdfsState(Message):
    term: int                # a node taking the lead with this term: refuse older leaders from now


@message("kdfs.log")
class KdfsLog(Message):
    after: int
    limit: int = 2000


@message("kdfs.snapshot")
class KdfsSnapshot(Message):
    offset: int              # payload: the leader's database from offset, in pieces


@message("kdfs.chunk.put")
class KdfsChunkPut(Message):
    id: str
    sync: bool = False


@message("kdfs.chunk.get")
class KdfsChunkGet(Message):
    id: str
    offset: int = 0
    length: int = -1


@message("kdfs.chunk.fetch")
class KdfsChunkFetch(Message):
    id: str                  # copy this chunk from `source` into the local store
    source: int


@message("kdfs.chunk.sync")
class KdfsChunkSync(Message):
    ids: list[str]


@message("kdfs.chunk.drop")
class KdfsChunkDrop(Message):
    ids: list[str]


@message("kdfs.chunk.scan")
class KdfsChunkScan(Message):
    verify: bool = False     # list the copies held here; with verify, check every block


# -- the local socket's framing ---------------------------------------------------------------------
# A stream socket has no message boundaries: each frame is a 4-byte big-endian length, then bytes.

LENGTH = struct.Struct(">I")


def pack_stream(frames: list[bytes]) -> bytes:
    out = [LENGTH.pack(len(frames))]
    for f in frames:
        out.append(LENGTH.pack(len(f)))
        out.append(f)
    return b"".join(out)
