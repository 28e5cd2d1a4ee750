"""Jobs on the node that hosts them: started under krg-init, their stdio streamed with flow control.

A job is a process tree in its own PID namespace. `krg-init` (csrc/) is both its init (PID 1 in the
namespace: reaps orphans, forwards signals) and its *shepherd*: a small process in this node's
namespace that holds the job's stdio and reports its exit status on a control socket. The shepherd
survives this daemon, so a restarted daemon reconnects to it and adopts the job again.

Output flows only as far as the consumer's credit allows (`grant`): a job writing faster than the
user's terminal reads blocks on its pipe, and no daemon buffers more than a window. Input is the
same the other way: the consumer gets credit back as the job's stdin takes the bytes.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import signal
import socket
import struct
import termios
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import msgpack
import psutil

from kerrighed.cgroups import NodeCgroup
from kerrighed.config import atomic_write
from kerrighed.errors import KrgError, PermissionDenied

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
KRG_INIT = Path(os.environ.get("KRG_INIT") or Path(__file__).parent / "libexec" / "krg-init")


@dataclass
class JobRecord:
    """What the process table knows of a job; persisted by its host in jobs/<gpid>/job.msgpack."""

    gpid: int
    argv: list[str]
    uid: int
    gid: int
    cwd: str
    origin: int                      # node whose daemon holds the command's session
    node: int                        # node hosting it now
    start_time: float                # seconds since the epoch
    tty: bool = False
    detach: bool = False
    app: int | None = None
    caps: dict | None = None
    host_pid: int | None = None      # the namespace init, as seen on the hosting node
    status: dict | None = None       # {"code": n} or {"signal": n} once it ended

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> JobRecord:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class Sink(Protocol):
    """Where a hosted job's stdio goes: a local command's session, or the daemon of its origin."""

    def output(self, fd: int, data: bytes) -> None: ...
    def input_credit(self, nbytes: int) -> None: ...
    def exited(self, status: dict) -> None: ...


def exit_status_of(status: dict | None) -> int:
    """The shell's view of a status: the code, or 128 + the signal number."""
    if not status:
        return 255
    return status["code"] if status.get("code") is not None else 128 + status["signal"]


# -- the shepherd -------------------------------------------------------------------------------------


async def spawn(record: JobRecord, env: dict[str, str], groups: list[int], umask: int, ctl: Path,
                rows: int, cols: int, init_cwd: Path, cgroup: NodeCgroup | None = None) -> None:
    """Start krg-init for a job; returns once its control socket listens. With a `cgroup` (the
    node's CPU limit), krg-init goes into it before it forks anything: it waits for its
    environment on stdin first, so the whole job starts inside."""
    args = [str(KRG_INIT), "--ctl", str(ctl), "--uid", str(record.uid), "--gid", str(record.gid),
            "--groups", ",".join(map(str, groups)), "--umask", f"{umask:o}", "--cwd", record.cwd]
    if record.tty:
        args += ["--pty", "--rows", str(rows), "--cols", str(cols)]
    # The job's environment reaches the program through krg-init's stdin, never as krg-init's own:
    # it runs as root, and a user's LD_PRELOAD must not apply to it.
    proc = await asyncio.create_subprocess_exec(
        *args, "--env-stdin", "--", *record.argv, env={}, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, cwd=init_cwd)
    if cgroup is not None:
        try:
            cgroup.add(proc.pid)
        except OSError as e:
            proc.kill()
            await proc.communicate()
            raise KrgError(f"cannot put job {record.gpid} in {cgroup}: {e.strerror}") from None
    blob = b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items() if "=" not in k and "\0" not in k + v)
    _, err = await proc.communicate(blob)
    if proc.returncode != 0:
        raise KrgError(err.decode(errors="replace").strip() or f"krg-init failed with status {proc.returncode}")


async def spawn_restore(record: JobRecord, images: Path, ctl: Path, rows: int = 24, cols: int = 80) -> None:
    """Start krg-init in restore mode: a new shepherd that restores the job from CRIU images
    (through checkpoint.restorer) and owns it as if it had started it."""
    import sys

    args = [str(KRG_INIT), "--ctl", str(ctl)]
    if record.tty:
        args += ["--pty", "--rows", str(rows), "--cols", str(cols)]
    proc = await asyncio.create_subprocess_exec(
        *args, "--restore", "--", sys.executable, "-m", "checkpoint.restorer", "--images", str(images),
        *(["--pty"] if record.tty else []),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise KrgError(err.decode(errors="replace").strip() or f"krg-init failed with status {proc.returncode}")


class Shepherd:
    """The control connection to one job's krg-init shepherd."""

    def __init__(self, sock: socket.socket, host_pid: int, fds: list[int]):
        self.sock, self.host_pid, self.fds = sock, host_pid, fds
        self._buf = b""

    @classmethod
    def connect(cls, path: Path, timeout: float = 5.0) -> Shepherd:
        """Blocking (run it in a thread): connect and take the hello with the job's stdio fds."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            msg, fds, _, _ = socket.recv_fds(sock, 256, 4)
            words = msg.split(b"\n", 1)[0].split()
            if len(words) != 3 or words[0] != b"hello" or int(words[2]) != len(fds):
                for fd in fds:
                    os.close(fd)
                raise KrgError(f"unexpected greeting from the shepherd at {path}: {msg[:80]!r}")
            shepherd = cls(sock, int(words[1]), fds)
            shepherd._buf = msg.split(b"\n", 1)[1] if b"\n" in msg else b""
            sock.setblocking(False)
            return shepherd
        except BaseException:
            sock.close()
            raise

    def lines(self) -> list[str]:
        """Complete lines received so far (call when the socket is readable)."""
        try:
            data = self.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError:
            data = b""
        if not data:
            raise EOFError
        self._buf += data
        *done, self._buf = self._buf.split(b"\n")
        return [line.decode(errors="replace") for line in done]

    def say(self, line: str) -> None:
        try:
            self.sock.send(line.encode() + b"\n")
        except OSError:
            pass        # the shepherd is gone; nothing to tell it

    def close(self) -> None:
        self.sock.close()


def parse_exit(line: str) -> dict | None:
    words = line.split()
    if len(words) == 3 and words[0] == "exit" and words[2].lstrip("-").isdigit():
        if words[1] == "code":
            return {"code": int(words[2])}
        if words[1] == "signal":
            return {"signal": int(words[2])}
    return None


# -- a job hosted here ----------------------------------------------------------------------------------


@dataclass
class HostedJob:
    record: JobRecord
    shepherd: Shepherd
    job_dir: Path
    on_done: Callable[[HostedJob], None]
    sink: Sink | None = None
    credit: int = 0
    outputs: dict[int, int] = field(default_factory=dict)     # stream (1, 2) -> our fd
    stdin: int | None = None
    pending: bytearray = field(default_factory=bytearray)
    eof_asked: bool = False
    waiters: list[asyncio.Future] = field(default_factory=list)
    held: list[bytes] | None = None      # stdin held while the job migrates

    def __post_init__(self):
        fds = self.shepherd.fds
        if self.record.tty:
            self.stdin, self.outputs = os.dup(fds[0]), {1: fds[0]}
        else:
            self.stdin, self.outputs = fds[0], {1: fds[1], 2: fds[2]}
        for fd in [self.stdin, *self.outputs.values()]:
            os.set_blocking(fd, False)
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.shepherd.sock.fileno(), self._control)
        self._drain = None if self.sink else self._open_log()
        self._reading = False
        self._update_readers()

    @property
    def gpid(self) -> int:
        return self.record.gpid

    # -- output -----------------------------------------------------------------------------------------

    def attach(self, sink: Sink | None, window: int) -> None:
        """Send output to `sink` from now on (None: to the job's log file, unthrottled)."""
        self.sink, self.credit = sink, window
        if sink is None and self._drain is None:
            self._drain = self._open_log()
        self._update_readers()

    def grant(self, nbytes: int) -> None:
        self.credit += nbytes
        self._update_readers()

    def _open_log(self):
        return open(self.job_dir / "output.log", "ab", buffering=0)

    def _update_readers(self) -> None:
        want = bool(self.outputs) and (self.sink is None or self.credit > 0)
        if want and not self._reading:
            for stream, fd in self.outputs.items():
                self.loop.add_reader(fd, self._readable, stream)
        elif not want and self._reading:
            for fd in self.outputs.values():
                self.loop.remove_reader(fd)
        self._reading = want

    def _readable(self, stream: int) -> None:
        fd = self.outputs.get(stream)
        if fd is None:
            return
        size = CHUNK if self.sink is None else min(CHUNK, self.credit)
        try:
            data = os.read(fd, size)
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno != errno.EIO:        # EIO: the pty's slave side is closed
                log.warning("job %d: reading stream %d: %s", self.gpid, stream, e)
            data = b""
        if not data:
            self.loop.remove_reader(fd)
            os.close(fd)
            del self.outputs[stream]
            self._maybe_done()
            return
        if self.sink is None:
            self._drain.write(data)
            return
        self.credit -= len(data)
        self.sink.output(stream, data)
        if self.credit <= 0:
            self._update_readers()

    # -- input ------------------------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        if self.held is not None:
            self.held.append(data)
            return
        if self.stdin is None:
            return                      # stdin already closed: the bytes have nowhere to go
        self.pending += data
        self._write_stdin()

    def eof(self) -> None:
        self.eof_asked = True
        self._write_stdin()

    def _write_stdin(self) -> None:
        written = 0
        while self.pending and self.stdin is not None:
            try:
                n = os.write(self.stdin, self.pending[:CHUNK])
            except BlockingIOError:
                self.loop.add_writer(self.stdin, self._write_stdin)
                break
            except OSError:             # EPIPE: nobody reads stdin any more
                self.pending.clear()
                self._close_stdin()
                break
            del self.pending[:n]
            written += n
        else:
            if self.stdin is not None:
                self.loop.remove_writer(self.stdin)
                if self.eof_asked and not self.record.tty:
                    self._close_stdin()
        if written and self.sink is not None:
            self.sink.input_credit(written)

    def _close_stdin(self) -> None:
        if self.stdin is not None:
            self.loop.remove_writer(self.stdin)
            os.close(self.stdin)
            self.stdin = None
            self.shepherd.say("eof")

    # -- migration ---------------------------------------------------------------------------------------

    def hold(self) -> None:
        """Before the dump: stop watching the job here, and hold its input."""
        self.held = []
        for fd in self.outputs.values():
            self.loop.remove_reader(fd)
        self._reading = False
        self.loop.remove_reader(self.shepherd.sock.fileno())
        if self.stdin is not None:
            self.loop.remove_writer(self.stdin)

    def resume(self) -> None:
        """The dump failed and CRIU left the job running: watch it again, let the input through."""
        held, self.held = self.held or [], None
        self.loop.add_reader(self.shepherd.sock.fileno(), self._control)
        self._update_readers()
        for data in held:
            self.feed(data)

    def drain(self) -> list[tuple[int, bytes]]:
        """After the dump killed the job: what it wrote and nobody read yet (CRIU leaves it in the
        old pipes, so it is neither lost nor repeated by the restored job)."""
        out = []
        for stream, fd in list(self.outputs.items()):
            os.set_blocking(fd, True)
            while True:
                try:
                    data = os.read(fd, CHUNK)
                except OSError:
                    data = b""
                if not data:
                    break
                out.append((stream, data))
            os.close(fd)
        self.outputs.clear()
        return out

    def forget(self) -> None:
        """The job lives elsewhere now: let the old shepherd go (it takes an ack only once it has
        told us of the dumped tree's end) and close what we held."""
        self.shepherd.sock.settimeout(5)
        try:
            while not any(parse_exit(line) for line in self.shepherd.lines()):
                pass
            self.shepherd.say("ack")
        except (EOFError, OSError):
            pass            # gone already
        self.shepherd.close()
        if self.stdin is not None:
            os.close(self.stdin)
            self.stdin = None
        if self._drain is not None:
            self._drain.close()

    def resize(self, rows: int, cols: int) -> None:
        if self.record.tty and 1 in self.outputs:
            fcntl.ioctl(self.outputs[1], termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    # -- signals ------------------------------------------------------------------------------------------

    def signal(self, sig: int, uid: int) -> None:
        if uid != 0 and uid != self.record.uid:
            raise PermissionDenied(f"job {self.gpid} belongs to uid {self.record.uid}: permission denied")
        if self.record.status is not None:
            return
        if sig in (signal.SIGSTOP, signal.SIGCONT):
            # The namespace init would only stop itself: stop or continue the job's processes.
            for p in self.processes()[1:]:
                _kill(p.pid, sig)
            if sig == signal.SIGCONT:
                _kill(self.record.host_pid, sig)
        else:
            _kill(self.record.host_pid, sig)     # SIGKILL ends the namespace; others are forwarded

    def processes(self) -> list[psutil.Process]:
        try:
            init = psutil.Process(self.record.host_pid)
            return [init, *init.children(recursive=True)]
        except psutil.Error:
            return []

    # -- exit ---------------------------------------------------------------------------------------------

    def _control(self) -> None:
        try:
            lines = self.shepherd.lines()
        except EOFError:
            self.loop.remove_reader(self.shepherd.sock.fileno())
            if self.record.status is None:
                log.warning("job %d: its shepherd went away without a status", self.gpid)
                self.record.status = {"code": 255}
                self._maybe_done()
            return
        for line in lines:
            status = parse_exit(line)
            if status is not None and self.record.status is None:
                self.record.status = status
                self._maybe_done()

    def _maybe_done(self) -> None:
        """The job is over once its exit is known and its output has all been read."""
        if self.record.status is None or self.outputs:
            return
        self.loop.remove_reader(self.shepherd.sock.fileno())
        if self.stdin is not None:
            self.loop.remove_writer(self.stdin)
            os.close(self.stdin)
            self.stdin = None
        self.save()                      # persisted before the shepherd may forget it
        self.shepherd.say("ack")
        self.shepherd.close()
        if self._drain is not None:
            self._drain.close()
        log.info("job %d (%s) ended: %s", self.gpid, self.record.argv[0], self.record.status)
        if self.sink is not None:
            self.sink.exited(self.record.status)
        for w in self.waiters:
            if not w.done():
                w.set_result(self.record.status)
        self.on_done(self)

    def save(self) -> None:
        atomic_write(self.job_dir / "job.msgpack", msgpack.packb(self.record.to_dict()), mode=0o600)



_STATES = {"R": "running", "S": "sleeping", "D": "disk-sleep", "T": "stopped", "t": "tracing-stop",
           "Z": "zombie", "X": "dead", "I": "idle"}
_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _proc_table() -> dict[int, tuple[int, str, float, int]]:
    """pid -> (ppid, state letter, CPU seconds, RSS bytes), one read of /proc/PID/stat each."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue        # gone meanwhile
        # after the command: state ppid ... utime(12) stime(13) ... rss(22), counted from state
        table[int(name)] = (int(fields[1]), fields[0].decode(), (int(fields[11]) + int(fields[12])) / _TICK,
                            int(fields[21]) * _PAGE)
    return table


def tree_stats(inits: list[int]) -> dict[int, dict]:
    """Figures for `krg ps`, for many jobs in one pass over /proc (not one pass per job, and one
    read per process): each job's CPU time and RSS summed over its tree, and its program's state.
    Keyed by init pid."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_rest) in table.items():
        children.setdefault(ppid, []).append(pid)
    out = {}
    for init in inits:
        cpu = rss = 0.0
        tree, todo = [], list(children.get(init, ()))
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo += children.get(pid, ())
        for pid in tree:
            cpu += table[pid][2]
            rss += table[pid][3]
        program = min(children.get(init, ()), default=None)      # the init's first child
        state = _STATES.get(table[program][1], "unknown") if program is not None else "exited"
        out[init] = {"cpu_time": cpu, "rss": int(rss), "state": state, "nprocs": len(tree)}
    return out


def _kill(pid: int | None, sig: int) -> None:
    if pid:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def load_record(job_dir: Path) -> JobRecord | None:
    try:
        return JobRecord.from_dict(msgpack.unpackb((job_dir / "job.msgpack").read_bytes()))
    except (OSError, ValueError, TypeError, msgpack.UnpackException) as e:
        log.warning("unreadable job record in %s: %s", job_dir, e)
        return None


def now() -> float:
    return time.time()
