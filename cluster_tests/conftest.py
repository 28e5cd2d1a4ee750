"""Real local clusters for the cluster tests: real krgd daemons on 127.0.0.11.., real sockets.

The `cluster` fixture starts N nodes with the installed `krgadm cluster start --local N` and always
tears them down, checking that no daemon process, socket file or directory is left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import psutil
import pytest

from kdfs import mount as kdfs_mount
from kerrighed import localcluster
from kerrighed import protocol as p
from kerrighed.client import Client
from kerrighed.config import Home

BIN = Path(sys.executable).parent
NOBODY = 65534


def wait_for(predicate, timeout: float = 10.0, what: str = "condition", interval: float = 0.05):
    """Poll `predicate` until it returns a true value (returned) or `timeout` runs out (fail)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class LocalCluster:
    def __init__(self, home: Home):
        self.home = home

    def run(self, command: str, *args: str, node: int | None = None, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess:
        """Run an installed command (krgadm, krg) against this cluster."""
        cmd = [str(BIN / command), "--home", str(self.home.path)]
        if node is not None:
            cmd += ["--node", str(node)]
        proc = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            pytest.fail(f"{command} {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def krgadm(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run("krgadm", *args, **kw)

    def call(self, node: int, msg: p.Message):
        with Client(self.home.socket(node), timeout=30) as c:
            return c.call(msg)

    def states(self, node: int) -> dict[int, str]:
        return {n["id"]: n["state"] for n in self.call(node, p.NodesStatus())["nodes"]}

    def online(self, node: int) -> set[int]:
        return {n for n, s in self.states(node).items() if s == "online"}

    def pid(self, node: int) -> int | None:
        return localcluster.daemon_pid(self.home, node)

    def kill(self, node: int, sig: int = signal.SIGKILL) -> None:
        pid = self.pid(node)
        assert pid, f"node {node} has no running daemon"
        os.kill(pid, sig)
        wait_for(lambda: self.pid(node) is None, what=f"node {node}'s daemon to die")

    def start(self, node: int) -> None:
        localcluster.start_daemons(self.home, [node])

    def app_jobs(self, appid: int) -> dict[int, dict]:
        """The running jobs of application `appid`, by global PID, as `krg ps --json` lists them."""
        return {j["gpid"]: j for j in json.loads(self.run("krg", "ps", "--json").stdout)
                if j["app"] == appid and j["state"] not in ("exited", "lost")}

    def checkpoint_store(self) -> Path:
        """Where `checkpoint` writes: the store lives in KDFS."""
        return self.home.kdfs_mountpoint(self.home.load_config()) / ".kerrighed" / "chkpt"

    def log(self, node: int) -> str:
        return self.home.logfile(node).read_text(errors="replace")

    def stop_all(self) -> None:
        kdfs_mount.stop(self.home)
        for n in localcluster.running_nodes(self.home):
            localcluster.stop_daemon(self.home, n)


def run_as(uid: int, fn) -> tuple[int, bytes]:
    """Run fn() in a forked child with uid and gid `uid`; return (its exit status, its output).

    The venv's interpreter lives under /root here, which other users may not execute, so tests
    fork and call a command's main() rather than exec the installed script."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 99
        try:
            os.close(r)
            os.dup2(w, 1)
            os.dup2(w, 2)
            # pytest captures sys.stdout/stderr in Python objects: point them at the pipe too.
            sys.stdout = sys.stderr = os.fdopen(os.dup(w), "w", buffering=1)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            status = fn()
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            os._exit(status)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out


def leftovers(home: Home) -> list[str]:
    """What a test left of `home` (processes, daemons, sockets, mounts), killed and unmounted."""
    leaks = []
    # Shepherds outlive their daemon on purpose (a restarted daemon adopts them): a test that
    # leaves one behind leaks a process.
    for proc in psutil.process_iter(["cmdline"]):
        if any(a.startswith(f"{home.path}/") or a == str(home.path) for a in proc.info["cmdline"] or ()):
            leaks.append(f"process {proc.pid} {' '.join(proc.info['cmdline'])[:80]}")
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
    for n in home.local_nodes():
        pid = localcluster.daemon_pid(home, n)
        if pid:
            leaks.append(f"node {n} pid {pid}")
            os.kill(pid, signal.SIGKILL)
        if home.socket(n).exists():
            leaks.append(f"socket {home.socket(n)}")
    for line in Path("/proc/mounts").read_text().splitlines():
        if line.split()[1].startswith(f"{home.path}/"):
            leaks.append(f"mount {line.split()[1]} ({line.split()[2]})")
            subprocess.run(["umount", "-l", line.split()[1]], capture_output=True)
    return leaks


def counter(path=None, upto=None, code=0, delay=0.05) -> str:
    """A shell loop printing 0, 1, 2... (to `path` if given; `upto` numbers, then exit `code`)."""
    out = f" >> {path}" if path else ""
    cond = f"[ $i -lt {upto} ]" if upto else ":"
    return f"i=0; while {cond}; do echo $i{out}; i=$((i+1)); sleep {delay}; done; exit {code}"


def read_ints(path: Path) -> list[int]:
    try:
        return [int(x) for x in path.read_text().split()]
    except FileNotFoundError:
        return []


def short_tmpdir(prefix: str) -> Path:
    # Unix socket paths are limited to 107 bytes: keep homes short, not under pytest's tmp_path.
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)       # like /var/lib/kerrighed: every user reaches the daemons' sockets
    return path


@pytest.fixture
def make_home():
    """Fresh homes, removed afterwards; fails the test if a daemon or socket was left behind."""
    homes: list[Home] = []

    def make(prefix: str = "krg-t-") -> Home:
        homes.append(Home(short_tmpdir(prefix)))
        return homes[-1]

    yield make
    leaks = []
    for home in homes:
        leaks += leftovers(home)
        shutil.rmtree(home.path, ignore_errors=True)
    assert not leaks, f"left behind: {leaks}"


@pytest.fixture
def cluster(request, make_home):
    """A running local cluster of `request.param` nodes (default 3), all online."""
    count = getattr(request, "param", 3)
    c = LocalCluster(make_home())
    pids = []
    try:
        port = localcluster.free_port([localcluster.local_address(n) for n in range(1, count + 1)],
                                      prefer_default=False)
        c.krgadm("cluster", "start", "--local", str(count), "--port", str(port))
        pids = [c.pid(n) for n in range(1, count + 1)]
        yield c
    finally:
        c.krgadm("cluster", "stop", check=False)
        c.stop_all()
        for pid in filter(None, pids):
            assert not Path(f"/proc/{pid}/cmdline").exists() or b"kerrighed" not in Path(
                f"/proc/{pid}/cmdline").read_bytes(), f"daemon pid {pid} survived 'krgadm cluster stop'"
