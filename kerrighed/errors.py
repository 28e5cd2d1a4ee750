"""Every error a user can meet, defined once.

A `KrgError` carries its one-line message and the exit code a command returns for it. Errors cross
the wire by class name (`kind`), so a failure raised in a remote daemon is raised again, as the same
class, in the command that asked.
"""

from __future__ import annotations

import errno
from typing import ClassVar


class KrgError(Exception):
    """Base of the errors shown to users: one line, no traceback."""

    exit_code: ClassVar[int] = 1
    _kinds: ClassVar[dict[str, type[KrgError]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        KrgError._kinds[cls.__name__] = cls

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    @property
    def kind(self) -> str:
        return type(self).__name__

    @classmethod
    def from_wire(cls, kind: str, message: str) -> KrgError:
        """Rebuild an error received in an error reply; an unknown kind stays a plain KrgError."""
        return cls._kinds.get(kind, KrgError)(message)


KrgError._kinds["KrgError"] = KrgError


class ConfigError(KrgError):
    """The cluster configuration, a key file or a command-line value is wrong."""

    exit_code = 2


class UsageError(KrgError):
    """A command was called with arguments it cannot take."""

    exit_code = 2


class NotRunning(KrgError):
    """No daemon answers on the local socket."""

    def __init__(self, reason: str):
        super().__init__(f"Kerrighed is not running: {reason}")


class PermissionDenied(KrgError):
    """The caller's uid may not do this."""

    exit_code = 1


class NodeStateError(KrgError):
    """A node is not in the state the operation needs (not present, not online, the local node)."""


class ProtocolError(KrgError):
    """A message was malformed, truncated, oversized, of an unknown version or op."""


class Unreachable(KrgError):
    """A node did not answer in time."""


class NodeDown(Unreachable):
    """The node died while we waited for its answer."""


class Timeout(KrgError):
    """A wait for a cluster condition ran out."""


class NoSuchJob(KrgError):
    """No job has that global PID (or not on the node asked)."""


class JobLost(KrgError):
    """The node hosting the job died; exit status 255, apart from any program's status."""

    exit_code = 255


class FsError(KrgError):
    """A KDFS operation failed with an errno; the message starts with the errno's name, which is how
    the errno crosses the wire (`ENOENT: no entry 'x' in directory 1`)."""

    def __init__(self, message: str):
        super().__init__(message)
        name = message.split(":", 1)[0]
        self.errno = getattr(errno, name, errno.EIO) if name.startswith("E") else errno.EIO

    @classmethod
    def of(cls, code: int, detail: str) -> FsError:
        return cls(f"{errno.errorcode.get(code, 'EIO')}: {detail}")


class ChunkError(KrgError):
    """A KDFS chunk copy cannot be used."""


class ChunkMissing(ChunkError):
    """The node holds no copy of that chunk."""


class ChunkCorrupt(ChunkError):
    """A block of the chunk copy failed its checksum."""
