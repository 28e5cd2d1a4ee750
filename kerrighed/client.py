"""The command side of the local socket: light on purpose (no ZeroMQ, no asyncio), since every
command start pays for its imports."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from kerrighed import protocol
from kerrighed.config import Home
from kerrighed.errors import NotRunning, ProtocolError


def find_socket(home: Home, node: int | None = None) -> Path:
    """The local daemon's socket: $KRG_SOCKET, else node `node` (or $KRG_NODE) of the home, else
    the first node of the home whose daemon has a socket."""
    if os.environ.get("KRG_SOCKET"):
        return Path(os.environ["KRG_SOCKET"])
    if node is None and os.environ.get("KRG_NODE"):
        node = int(os.environ["KRG_NODE"])
    if node is not None:
        return home.socket(node)
    for n in home.local_nodes():
        if home.socket(n).exists():
            return home.socket(n)
    raise NotRunning(f"no krgd socket under {home.path / 'nodes'}; start one with 'krgadm cluster start'")


class Client:
    def __init__(self, path: Path, timeout: float | None = 60.0):
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as e:
            self._sock.close()
            raise NotRunning(f"cannot reach krgd at {path}: {e.strerror}") from None
        self._rids = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def call(self, msg: protocol.Message, payload: list[bytes] = ()) -> object:
        """Send a request and return the reply's result, or raise the error it carries."""
        return self.call_bulk(msg, payload).result

    def call_bulk(self, msg: protocol.Message, payload: list[bytes] = ()) -> protocol.Bulk:
        """A request whose reply may carry payload frames (chunk data) beside its result."""
        self._rids += 1
        try:
            self._sock.sendall(protocol.pack_stream(protocol.encode(msg, self._rids, payload)))
            reply, rid, data = protocol.decode(self._read_frames(), max_body=protocol.MAX_FRAME)
        except (ConnectionError, BrokenPipeError) as e:
            raise NotRunning(f"krgd at {self.path} closed the connection ({e.strerror or e})") from None
        except socket.timeout:
            raise NotRunning(f"krgd at {self.path} did not answer {msg.op} in time") from None
        if isinstance(reply, protocol.Error):
            raise reply.exception()
        if not isinstance(reply, protocol.Ok) or rid != self._rids:
            raise ProtocolError(f"unexpected reply {reply.op} to {msg.op}")
        return protocol.Bulk(reply.result, data)

    def _read_frames(self) -> list[bytes]:
        (count,) = protocol.LENGTH.unpack(self._read(4))
        frames = []
        for _ in range(count):
            (size,) = protocol.LENGTH.unpack(self._read(4))
            if size > protocol.MAX_FRAME:
                raise ProtocolError(f"reply frame of {size} bytes")
            frames.append(self._read(size))
        return frames

    def _read(self, n: int) -> bytes:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            k = self._sock.recv_into(view[got:])
            if not k:
                raise ConnectionError("end of stream")
            got += k
        return bytes(buf) if n < 65536 else buf
