"""krg run: run an unmodified program on the node the scheduler picks, as if it ran here.

The command talks to its own node's daemon only (a Unix socket, no ZeroMQ: its start-up is on the
path of every launch). stdin, stdout and stderr stream both ways with flow control: the job gets more
output credit only as fast as we write its output, and we send input only as fast as it reads.
With a terminal on both ends the job gets a pseudo-terminal (like `ssh -t`) and our terminal goes
raw, so Ctrl-C and Ctrl-Z travel as keys; otherwise the signals we receive are forwarded.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
import sys
import termios
import time
import tty

from kerrighed import protocol as p
from kerrighed.errors import JobLost, NotRunning, ProtocolError

WINDOW = 1 << 20
CHUNK = 64 * 1024
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
             signal.SIGALRM, signal.SIGWINCH, signal.SIGTSTP, signal.SIGCONT)


class Connection:
    """The local socket, read without blocking: frames are parsed as they complete."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()
        self.writable = True
        self.early: list[tuple[p.Message, list[bytes]]] = []   # received along with the launch reply

    def send(self, msg: p.Message, payload=()) -> None:
        """Send; once the daemon has hung up, drop what we would say: the job's end (or loss) is
        already on its way to us, and that is what we must read."""
        if not self.writable:
            return
        try:
            if self.sock.getblocking():
                self.sock.sendall(p.pack_stream(p.encode(msg, 0, payload)))
            else:
                _send_all(self.sock, p.pack_stream(p.encode(msg, 0, payload)))
        except (BrokenPipeError, ConnectionResetError):
            self.writable = False

    def receive(self) -> list[tuple[p.Message, list[bytes]]]:
        """Messages complete so far; raises NotRunning when the daemon hangs up."""
        try:
            data = self.sock.recv(1 << 20)
        except BlockingIOError:
            return []
        except ConnectionError as e:
            raise NotRunning(f"lost the connection to krgd ({e.strerror})") from None
        if not data:
            raise NotRunning("krgd closed the connection")
        self.buf += data
        out = []
        while True:
            frames, used = _parse(self.buf)
            if frames is None:
                return out
            del self.buf[:used]
            msg, _, payload = p.decode(frames, max_body=p.MAX_FRAME)
            out.append((msg, payload))

    def wait_reply(self) -> object:
        while True:
            select.select([self.sock], [], [])
            received = self.receive()
            for i, (msg, _) in enumerate(received):
                if isinstance(msg, p.Error):
                    raise msg.exception()
                if isinstance(msg, p.Ok):
                    self.early = received[i + 1:]
                    return msg.result
                raise ProtocolError(f"unexpected {msg.op} before the launch reply")


def _send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except BlockingIOError:
            select.select([], [sock], [])


def _parse(buf: bytearray) -> tuple[list[bytes] | None, int]:
    if len(buf) < 4:
        return None, 0
    (count,) = p.LENGTH.unpack_from(buf, 0)
    off, frames = 4, []
    for _ in range(count):
        if len(buf) < off + 4:
            return None, 0
        (size,) = p.LENGTH.unpack_from(buf, off)
        if len(buf) < off + 4 + size:
            return None, 0
        frames.append(bytes(buf[off + 4: off + 4 + size]))
        off += 4 + size
    return frames, off


def _connect(path) -> Connection:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError) as e:
        sock.close()
        raise NotRunning(f"cannot reach krgd at {path}: {e.strerror}") from None
    return Connection(sock)


def launch(path, argv: list[str], node: int | None, detach: bool, use_tty: bool, new_app: bool = False,
           join_app: int | None = None) -> tuple[Connection, dict]:
    conn = _connect(path)
    umask = os.umask(0)
    os.umask(umask)
    rows, cols = _winsize() if use_tty else (24, 80)
    app = os.environ.get("KRG_APP", "")      # set in every job: its children join its application
    conn.send(p.RunJob(argv=argv, env=dict(os.environ), cwd=os.getcwd(), umask=umask, node=node,
                       tty=use_tty, rows=rows, cols=cols, detach=detach, window=WINDOW,
                       app=int(app) if app.isdigit() else None, new_app=new_app, join_app=join_app))
    return conn, conn.wait_reply()


def attach(path, gpid: int) -> Connection:
    """Take a running job's stdio (restart -f): its output comes to us from now on."""
    conn = _connect(path)
    try:
        conn.send(p.AttachJob(gpid=gpid, window=WINDOW))
        conn.wait_reply()
    except BaseException:
        conn.sock.close()
        raise
    return conn


REATTACH_TIMEOUT = 30.0


def reattach(home, node: int | None, gpid: int, why: Exception) -> Connection:
    """Connect again to our node's daemon and take job `gpid`'s stdio back (bounded wait)."""
    from kerrighed.client import find_socket     # only on this rare path

    deadline = time.monotonic() + REATTACH_TIMEOUT
    while True:
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(find_socket(home, node)))
            conn = Connection(sock)
            conn.send(p.AttachJob(gpid=gpid, window=WINDOW))
            conn.wait_reply()
            return conn
        except (OSError, NotRunning):
            sock.close()
            if time.monotonic() > deadline:
                raise NotRunning(f"{why}; job {gpid} may still run (see 'krg ps')") from None
            time.sleep(0.2)


def _winsize() -> tuple[int, int]:
    try:
        size = os.get_terminal_size(sys.stdin.fileno())
        return size.lines, size.columns
    except OSError:
        return 24, 80


def stream(conn: Connection, use_tty: bool, others: list[Connection] = ()) -> int:
    """Relay stdio and signals until the job ends; its exit status, as a shell would give it.

    `others` (restart -f: the rest of an application) only send output here and get the signals
    we forward; when `conn`'s job ends, we let go of them (they run on, their output to their log)."""
    sig_r, sig_w = os.pipe()
    os.set_blocking(sig_w, False)
    signal.set_wakeup_fd(sig_w, warn_on_full_buffer=False)
    old_handlers = {s: signal.signal(s, lambda *_: None) for s in FORWARDED}
    saved_tty = termios.tcgetattr(0) if use_tty else None
    if use_tty:
        tty.setraw(0)
    attached = [conn, *others]
    for c in attached:
        c.sock.setblocking(False)
    if use_tty:
        rows, cols = _winsize()         # a job attached to (restart -f, re-attach) takes our size
        conn.send(p.Winsize(rows=rows, cols=cols))
    stdin_open, input_credit = True, WINDOW
    try:
        while True:
            want = [c.sock for c in attached] + [sig_r]
            if stdin_open and input_credit > 0:
                want.append(0)
            try:
                ready, _, _ = select.select(want, [], [], 0 if any(c.early for c in attached) else None)
            except InterruptedError:
                continue
            if sig_r in ready:
                for sig in os.read(sig_r, 64):
                    _on_signal(attached, sig, use_tty)
            if 0 in ready:
                try:
                    data = os.read(0, min(CHUNK, input_credit))
                except OSError:
                    data = b""
                if data:
                    input_credit -= len(data)
                    conn.send(p.Input(), [data])
                elif not use_tty:
                    stdin_open = False
                    conn.send(p.InputEof())
                else:
                    stdin_open = False
            for c in list(attached):
                if c.sock not in ready and not c.early:
                    continue
                # What came with the launch reply first: it may hold the job's end, and the
                # socket then only has the daemon's hang-up left to say.
                received, c.early = c.early, []
                if not received:
                    try:
                        received = c.receive()
                    except NotRunning:
                        if c is conn:
                            raise
                        attached.remove(c)      # one of the others: its job ended or was lost
                        continue
                for msg, payload in received:
                    if isinstance(msg, p.Output):
                        for data in payload:
                            _write_all(1 if use_tty else msg.fd, data)
                            c.send(p.Credit(nbytes=len(data)))
                    elif isinstance(msg, p.Credit):
                        if c is conn:
                            input_credit += msg.nbytes
                    elif isinstance(msg, (p.Exit, p.Lost)) and c is not conn:
                        attached.remove(c)
                        break
                    elif isinstance(msg, p.Exit):
                        return msg.code if msg.code is not None else 128 + msg.signal
                    elif isinstance(msg, p.Lost):
                        raise JobLost(f"job lost: {msg.reason}")
    finally:
        for c in others:
            c.send(p.Detach())
            c.sock.close()
        if saved_tty is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved_tty)
        signal.set_wakeup_fd(-1)
        for s, h in old_handlers.items():
            signal.signal(s, h)
        os.close(sig_r)
        os.close(sig_w)


def _on_signal(attached: list[Connection], sig: int, use_tty: bool) -> None:
    if sig == signal.SIGWINCH:
        if use_tty:
            rows, cols = _winsize()
            attached[0].send(p.Winsize(rows=rows, cols=cols))
        return
    for c in attached:
        c.send(p.Signal(signal=sig))
    if sig == signal.SIGTSTP and not use_tty:
        # Stop the job, then ourselves, as a local program would; SIGCONT resumes both. SIGSTOP,
        # since the kernel discards SIGTSTP in an orphaned process group (scripts, CI).
        os.kill(os.getpid(), signal.SIGSTOP)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        except OSError as e:
            if e.errno == errno.EPIPE:
                return          # our reader went away; the job finds out through its own pipe
            raise
        view = view[n:]
