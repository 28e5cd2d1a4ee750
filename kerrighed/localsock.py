"""The local command socket: a Unix stream socket where commands reach their node's daemon.

Each request and reply is one frame list (see protocol.pack_stream). The daemon takes the caller's
uid, gid and pid from the socket's peer credentials (SO_PEERCRED): no password, no token.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

from kerrighed import protocol
from kerrighed.errors import KrgError, ProtocolError

log = logging.getLogger(__name__)

MAX_FRAMES = 16
_CRED = struct.Struct("3i")


@dataclass(frozen=True)
class Caller:
    pid: int
    uid: int
    gid: int

    @property
    def is_root(self) -> bool:
        return self.uid == 0


# handler(caller, message, payload) -> result (sent back in an `ok` reply)
Handler = Callable[[Caller, protocol.Message, list[bytes]], Awaitable[object]]
# stream handler(caller, message, reader, writer): takes the connection over (a job's stdio)
StreamHandler = Callable[[Caller, protocol.Message, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_frames(reader: asyncio.StreamReader) -> list[bytes] | None:
    """One frame list, or None at a clean end of stream. ProtocolError when framing is broken."""
    try:
        header = await reader.readexactly(4)
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise ProtocolError("truncated frame header") from None
        return None
    (count,) = protocol.LENGTH.unpack(header)
    if not 1 <= count <= MAX_FRAMES:
        raise ProtocolError(f"{count} frames in a message (at most {MAX_FRAMES})")
    frames = []
    try:
        for _ in range(count):
            (size,) = protocol.LENGTH.unpack(await reader.readexactly(4))
            if size > protocol.MAX_FRAME:
                raise ProtocolError(f"frame of {size} bytes exceeds {protocol.MAX_FRAME}")
            frames.append(await reader.readexactly(size))
    except asyncio.IncompleteReadError:
        raise ProtocolError("truncated message") from None
    return frames


class LocalServer:
    def __init__(self, path: Path, handler: Handler, streams: dict[type, StreamHandler]):
        self.path, self.handler, self.streams = path, handler, streams
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        self.path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        os.chmod(self.path, 0o666)      # every user may talk to the daemon; it checks who they are

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self.path.unlink(missing_ok=True)
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            await self._converse(reader, writer)
        finally:
            self._tasks.discard(task)

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        pid, uid, gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
        caller = Caller(pid, uid, gid)
        try:
            while True:
                try:
                    frames = await read_frames(reader)
                except ProtocolError as e:
                    # The stream cannot be resynchronised: answer, then hang up.
                    log.warning("refused a message from pid %d uid %d: %s", pid, uid, e)
                    await self._reply(writer, protocol.Error.of(e), 0)
                    return
                if frames is None:
                    return
                try:
                    msg, rid, payload = protocol.decode(frames)
                except ProtocolError as e:
                    log.warning("refused a message from pid %d uid %d: %s", pid, uid, e)
                    await self._reply(writer, protocol.Error.of(e), _peek_rid(frames))
                    continue
                stream = self.streams.get(type(msg))
                if stream is not None:
                    await stream(caller, msg, reader, writer)
                    return
                reply, out = await self._handle(caller, msg, payload)
                await self._reply(writer, reply, rid, out)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _handle(self, caller: Caller, msg: protocol.Message,
                      payload: list[bytes]) -> tuple[protocol.Message, list[bytes]]:
        try:
            result = await self.handler(caller, msg, payload)
        except KrgError as e:
            return protocol.Error.of(e), []
        except Exception as e:
            log.exception("handler failed for pid %d uid %d", caller.pid, caller.uid)
            return protocol.Error(kind="KrgError", message=f"internal error in krgd: {e!r}"), []
        if isinstance(result, protocol.Bulk):
            return protocol.Ok(result=result.result), result.payload
        return protocol.Ok(result=result), []

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, reply: protocol.Message, rid: int, payload: list[bytes] = ()) -> None:
        writer.write(protocol.pack_stream(protocol.encode(reply, rid, payload)))
        await writer.drain()


def _peek_rid(frames: list[bytes]) -> int:
    return int.from_bytes(frames[2], "big") if len(frames) > 2 and len(frames[2]) == 8 else 0
