"""The cluster configuration and the files of a node's home.

Like Kerrighed's `/etc/kerrighed_nodes`, `cluster.toml` lists every possible node: its id, its
address and its CURVE public key. It is the same file on every node. A node's home holds:

    cluster.toml                  the configuration (copied to every node)
    keys/node<N>.key_secret       node N's CURVE key pair, mode 0600 (on node N's machine only)
    nodes/<N>/                    node N's state: krgd.sock, krgd.pid, krgd.log

A local test cluster keeps all its nodes in one home; a real machine's home has one node.
Precedence: flags, then `KRG_HOME`, then the default `/var/lib/kerrighed`.
"""

from __future__ import annotations

import ipaddress
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from kerrighed.errors import ConfigError
from kerrighed.ids import MAX_NODE_ID

DEFAULT_HOME = "/var/lib/kerrighed"
DEFAULT_PORT = 7531


@dataclass(frozen=True)
class NodeConfig:
    id: int
    address: str
    port: int
    public_key: str          # Z85, 40 characters
    cpu_limit: float | None = None   # CPUs this node's jobs may use (overrides [cluster] cpu_limit)

    @property
    def endpoint(self) -> str:
        return f"tcp://{self.address}:{self.port}"


@dataclass(frozen=True)
class KdfsConfig:
    """The `[kdfs]` table: the cluster file system (docs/kdfs.md)."""

    enabled: bool = True
    mountpoint: str = ""                   # "" = <home>/kdfs
    replicas: int = 2                      # copies of every chunk
    chunk_size: int = 4 << 20
    stripe_after: int = 64 << 20           # past this, a file's first copies rotate over the nodes
    keep_log: int = 200000                 # metadata changes kept for nodes that were away; older: a snapshot

    @classmethod
    def from_toml(cls, t: dict) -> KdfsConfig:
        k = cls(enabled=bool(t.get("enabled", True)), mountpoint=str(t.get("mountpoint", "")),
                replicas=int(t.get("replicas", 2)), chunk_size=int(t.get("chunk_size", 4 << 20)),
                stripe_after=int(t.get("stripe_after", 64 << 20)), keep_log=int(t.get("keep_log", 200000)))
        if not 1 <= k.replicas <= 8:
            raise ConfigError(f"[kdfs] replicas = {k.replicas}: must be 1..8")
        if k.keep_log < 10:
            raise ConfigError(f"[kdfs] keep_log = {k.keep_log}: keep at least 10 changes")
        if k.chunk_size < 64 << 10 or k.chunk_size > 32 << 20 or k.chunk_size % (64 << 10):
            raise ConfigError(f"[kdfs] chunk_size = {k.chunk_size}: a multiple of 64 KiB up to 32 MiB")
        return k

    def to_toml(self) -> dict:
        return {"enabled": self.enabled, "mountpoint": self.mountpoint, "replicas": self.replicas,
                "chunk_size": self.chunk_size, "stripe_after": self.stripe_after, "keep_log": self.keep_log}


@dataclass(frozen=True)
class ClusterConfig:
    session: int                           # Kerrighed's session id: keeps two clusters apart
    nodes: dict[int, NodeConfig]
    heartbeat_interval: float = 0.25       # seconds between heartbeats
    failure_timeout: float = 1.5           # silence after which a node is no longer present
    cpu_limit: float | None = None         # CPUs each node's jobs may use (a cgroup quota); None: all
    kdfs: KdfsConfig = field(default_factory=KdfsConfig)
    extra: dict = field(default_factory=dict, compare=False)

    def node(self, node_id: int) -> NodeConfig:
        try:
            return self.nodes[node_id]
        except KeyError:
            known = ",".join(map(str, sorted(self.nodes)))
            raise ConfigError(f"node {node_id} is not in the cluster configuration (nodes: {known})") from None

    def cpu_limit_of(self, node_id: int) -> float | None:
        """The CPUs node `node_id`'s jobs may use: its own cpu_limit, else the cluster's, else None."""
        own = self.node(node_id).cpu_limit
        return own if own is not None else self.cpu_limit

    def node_by_key(self, public_key: str) -> NodeConfig | None:
        for n in self.nodes.values():
            if n.public_key == public_key:
                return n
        return None

    @classmethod
    def load(cls, path: Path) -> ClusterConfig:
        import tomllib

        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"no cluster configuration at {path}; create one with 'krgadm cluster init'") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
        try:
            c = data.get("cluster", {})
            port = int(c.get("port", DEFAULT_PORT))
            nodes = {}
            for n in data.get("nodes", []):
                nc = NodeConfig(int(n["id"]), str(n["address"]), int(n.get("port", port)), str(n["public_key"]),
                                _cpu_limit(n, f"{path}: node {n.get('id')}"))
                _check_node(nc)
                if nc.id in nodes:
                    raise ConfigError(f"{path}: node {nc.id} is listed twice")
                nodes[nc.id] = nc
            if not nodes:
                raise ConfigError(f"{path}: no [[nodes]] listed")
            cfg = cls(
                session=int(c.get("session", 1)),
                nodes=nodes,
                heartbeat_interval=float(c.get("heartbeat_interval", 0.25)),
                failure_timeout=float(c.get("failure_timeout", 1.5)),
                cpu_limit=_cpu_limit(c, f"{path}: [cluster]"),
                kdfs=KdfsConfig.from_toml(data.get("kdfs", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{path}: invalid configuration: {e!r}") from None
        if not 1 <= cfg.session <= 9999:
            raise ConfigError(f"{path}: session {cfg.session} must be 1..9999")
        if cfg.failure_timeout <= 2 * cfg.heartbeat_interval:
            raise ConfigError(f"{path}: failure_timeout must exceed two heartbeat intervals")
        return cfg

    def save(self, path: Path) -> None:
        import tomli_w

        doc = {
            "cluster": {
                "session": self.session,
                "heartbeat_interval": self.heartbeat_interval,
                "failure_timeout": self.failure_timeout,
                **({"cpu_limit": self.cpu_limit} if self.cpu_limit is not None else {}),
            },
            "kdfs": self.kdfs.to_toml(),
            "nodes": [
                {"id": n.id, "address": n.address, "port": n.port, "public_key": n.public_key,
                 **({"cpu_limit": n.cpu_limit} if n.cpu_limit is not None else {})}
                for n in sorted(self.nodes.values(), key=lambda n: n.id)
            ],
        }
        atomic_write(Path(path), tomli_w.dumps(doc).encode(), mode=0o644)


def _cpu_limit(table: dict, where: str) -> float | None:
    value = table.get("cpu_limit")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{where}: cpu_limit = {value!r}: must be a positive number of CPUs (e.g. 0.5)")
    return float(value)


def _check_node(n: NodeConfig) -> None:
    if not 0 <= n.id <= MAX_NODE_ID:
        raise ConfigError(f"node id {n.id} must be 0..{MAX_NODE_ID}")
    try:
        ipaddress.ip_address(n.address)
    except ValueError:
        raise ConfigError(f"node {n.id}: address {n.address!r} is not an IP address") from None
    if len(n.public_key) != 40:
        raise ConfigError(f"node {n.id}: public_key must be 40 Z85 characters")


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write a whole file or nothing: a crash leaves the old file, never half a new one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


@dataclass(frozen=True)
class Home:
    path: Path

    @classmethod
    def resolve(cls, flag: str | None = None) -> Home:
        return cls(Path(flag or os.environ.get("KRG_HOME") or DEFAULT_HOME).absolute())

    def run_dir(self, node: int) -> Path:
        """Node N's daemon works here."""
        return self.path / "run" / f"node{node}"

    def job_run_dir(self, gpid: int) -> Path:
        """A job's init works here: CRIU writes into it while dumping (so one per job: two dumps
        in one directory collide), and a restored init needs it back at the same path on
        whichever node restores it (so every node creates it on demand)."""
        return self.path / "run" / f"job{gpid}"

    @property
    def cluster_file(self) -> Path:
        return self.path / "cluster.toml"

    def key_file(self, node: int) -> Path:
        return self.path / "keys" / f"node{node}.key_secret"

    def state_dir(self, node: int) -> Path:
        return self.path / "nodes" / str(node)

    def socket(self, node: int) -> Path:
        return self.state_dir(node) / "krgd.sock"

    def pidfile(self, node: int) -> Path:
        return self.state_dir(node) / "krgd.pid"

    def logfile(self, node: int) -> Path:
        return self.state_dir(node) / "krgd.log"

    def kdfs_disk(self, node: int) -> Path:
        """Node N's share of KDFS: its chunks and its metadata replica."""
        return self.state_dir(node) / "kdfs"

    def kdfs_mountpoint(self, cfg: ClusterConfig) -> Path:
        return Path(cfg.kdfs.mountpoint) if cfg.kdfs.mountpoint else self.path / "kdfs"

    def load_config(self) -> ClusterConfig:
        return ClusterConfig.load(self.cluster_file)

    def local_nodes(self) -> list[int]:
        """Nodes whose state directory lives in this home (one on a real machine)."""
        d = self.path / "nodes"
        return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []

    def load_keypair(self, node: int) -> tuple[bytes, bytes]:
        import zmq.auth

        path = self.key_file(node)
        if not path.exists():
            raise ConfigError(f"no key pair for node {node} at {path}")
        if path.stat().st_mode & 0o077:
            raise ConfigError(f"{path} is readable by others; chmod 600 it")
        public, secret = zmq.auth.load_certificate(path)
        if secret is None:
            raise ConfigError(f"{path} holds no secret key")
        return public, secret

    def init_cluster(self, addresses: dict[int, str], session: int | None = None, port: int = DEFAULT_PORT,
                     **settings) -> ClusterConfig:
        """Create the configuration and one key pair per node (keys that exist are kept)."""
        nodes = {}
        for node, address in sorted(addresses.items()):
            public = self.make_keypair(node)
            nodes[node] = NodeConfig(node, address, port, public.decode())
            _check_node(nodes[node])
        cfg = ClusterConfig(session=session or random.randint(1, 9999), nodes=nodes, **settings)
        self.path.mkdir(parents=True, exist_ok=True)
        cfg.save(self.cluster_file)
        return cfg

    def make_keypair(self, node: int) -> bytes:
        import zmq
        import zmq.auth

        path = self.key_file(node)
        if path.exists():
            return self.load_keypair(node)[0]
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        public, secret = zmq.curve_keypair()
        body = f'curve\n    public-key = "{public.decode()}"\n    secret-key = "{secret.decode()}"\n'
        atomic_write(path, ("#   ZeroMQ CURVE key pair of a Kerrighed node\nmetadata\n" + body).encode(), mode=0o600)
        return public
