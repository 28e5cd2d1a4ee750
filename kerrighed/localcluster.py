"""A whole cluster on this one machine: N daemons on 127.0.0.11, 127.0.0.12, ... in one home.

Used by `krgadm cluster start --local N`, the demo, the cluster tests and the benchmarks. The
daemons are the real ones; only the configuration makes it local.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from kerrighed import protocol as p
from kerrighed.client import Client
from kerrighed.config import DEFAULT_PORT, ClusterConfig, Home
from kerrighed.errors import ConfigError, KrgError

FIRST_ADDRESS = 11      # node i listens on 127.0.0.(10 + i)
MAX_LOCAL_NODES = 200


def local_address(node: int) -> str:
    return f"127.0.0.{FIRST_ADDRESS - 1 + node}"


def ensure_config(home: Home, count: int, port: int | None = None, **settings) -> ClusterConfig:
    """Create (or re-create, keeping keys) a configuration for nodes 1..count on loopback."""
    if not 1 <= count <= MAX_LOCAL_NODES:
        raise ConfigError(f"a local cluster has 1..{MAX_LOCAL_NODES} nodes, not {count}")
    wanted = {n: local_address(n) for n in range(1, count + 1)}
    if home.cluster_file.exists():
        cfg = home.load_config()
        same_nodes = {n: c.address for n, c in cfg.nodes.items()} == wanted and port in (None, cfg.nodes[1].port)
        if same_nodes and all(getattr(cfg, k) == v for k, v in settings.items()):
            return cfg
        running = running_nodes(home)
        if running:
            raise ConfigError(f"{home.path} already runs a cluster of {len(cfg.nodes)} nodes "
                              f"(daemons of nodes {running} up); stop it first with 'krgadm cluster stop'")
        if same_nodes:      # only settings change (e.g. --cpu-limit): the rest of the file stays
            cfg = dataclasses.replace(cfg, **settings)
            cfg.save(home.cluster_file)
            return cfg
        return home.init_cluster(wanted, session=cfg.session, port=port or free_port(wanted.values()), **settings)
    return home.init_cluster(wanted, port=port or free_port(wanted.values()), **settings)


def free_port(addresses, prefer_default: bool = True) -> int:
    """The default port if every address has it free, else a random port free on all of them:
    several local clusters (tests, benchmarks, a demo) can then run side by side."""
    candidates = [DEFAULT_PORT] * prefer_default + random.sample(range(20000, 60000), 50)
    for port in candidates:
        if all(_can_bind(a, port) for a in addresses):
            return port
    raise ConfigError(f"no free TCP port on {', '.join(addresses)}")


def _can_bind(address: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((address, port))
            return True
        except OSError:
            return False


def daemon_pid(home: Home, node: int) -> int | None:
    """The pid of node's running krgd, or None. A live daemon holds a lock on its pid file, so a
    stale file left by a killed one does not count, whatever process now has that pid."""
    try:
        fd = os.open(home.pidfile(node), os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None         # nobody holds it
        except BlockingIOError:
            pass
        try:
            return int(os.read(fd, 32).split()[0])
        except (ValueError, IndexError):
            return None         # locked but not yet written: the daemon is starting
    finally:
        os.close(fd)


def running_nodes(home: Home) -> list[int]:
    return [n for n in home.local_nodes() if daemon_pid(home, n)]


def start_daemons(home: Home, nodes: list[int], timeout: float = 30.0) -> list[int]:
    """Start the daemons of `nodes` that are not running, in parallel; return when all answer."""
    todo = [n for n in nodes if not daemon_pid(home, n)]
    procs = {}
    for n in todo:
        home.state_dir(n).mkdir(parents=True, exist_ok=True)
        procs[n] = subprocess.Popen(
            [sys.executable, "-m", "kerrighed.daemon", "--home", str(home.path), "--node", str(n),
             "--detach", "--log-file", str(home.logfile(n))],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    failed = []
    for n, proc in procs.items():
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            failed.append(f"node {n}: no answer within {timeout:g} s")
            continue
        if proc.returncode != 0:
            failed.append(f"node {n}: {err.strip().removeprefix('krgd: ')}")
    if failed:
        raise KrgError("could not start " + "; ".join(failed))
    return todo


def stop_daemon(home: Home, node: int, timeout: float = 10.0) -> None:
    """Stop node's daemon: ask it, then SIGTERM, then SIGKILL; wait until it is gone."""
    pid = daemon_pid(home, node)
    if pid is None:
        home.socket(node).unlink(missing_ok=True)
        return
    try:
        with Client(home.socket(node), timeout=timeout + 5) as c:
            c.call(p.DaemonStop())
    except KrgError:
        _signal(pid, signal.SIGTERM)
    if not _wait_gone(pid, timeout):
        _signal(pid, signal.SIGKILL)
        _wait_gone(pid, 5)
    home.socket(node).unlink(missing_ok=True)
    home.pidfile(node).unlink(missing_ok=True)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            # A child of ours must be reaped to disappear; anything else just vanishes.
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            pass
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True     # exited; its parent has yet to reap it
        except (OSError, IndexError):
            return True
        time.sleep(0.02)
    return False
