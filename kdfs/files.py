"""KDFS by path, without the mount: the Python client API for tools and the checkpoint store.

    with Kdfs(home) as fs:
        fs.makedirs("/chkpt/42/v1")
        fs.write_bytes("/chkpt/42/v1/description.txt", b"...")
        fs.read_bytes("/chkpt/42/v1/description.txt")

It runs the same file system core as the mount (kdfs/filesystem.py), so a file written here is
committed, replicated and checksummed exactly like one written through the mount, and the mount sees
it. Raw KDFS operations are root's: this API is for daemons and administrators; users go through the
mount, where the kernel checks permissions.
"""

from __future__ import annotations

import errno
import os
import stat as st

from kdfs.client import KdfsClient
from kdfs.filesystem import ROOT, FileSystem
from kerrighed.config import Home
from kerrighed.errors import FsError


class Kdfs:
    def __init__(self, home: Home, node: int | None = None):
        cfg = home.load_config()
        self.fs = FileSystem(lambda: KdfsClient(home, node), cfg.kdfs.chunk_size, max_uploads=4)

    def close(self) -> None:
        self.fs.close()

    def __enter__(self) -> Kdfs:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- names ------------------------------------------------------------------------------------

    @staticmethod
    def _parts(path: str) -> list[bytes]:
        if not path.startswith("/"):
            raise FsError.of(errno.EINVAL, f"{path!r}: KDFS paths start at its root, '/'")
        return [os.fsencode(p) for p in path.split("/") if p]

    def _walk(self, path: str) -> dict:
        attr = self.fs.getattr(ROOT)
        for part in self._parts(path):
            if not st.S_ISDIR(attr["mode"]):
                raise FsError.of(errno.ENOTDIR, f"{path}: a component is not a directory")
            attr = self.fs.client.query("lookup", parent=attr["ino"], name=part)
        return attr

    def _parent(self, path: str) -> tuple[dict, bytes]:
        parts = self._parts(path)
        if not parts:
            raise FsError.of(errno.EINVAL, "the root has no parent")
        return self._walk("/" + "/".join(os.fsdecode(p) for p in parts[:-1])), parts[-1]

    def stat(self, path: str) -> dict:
        return self._walk(path)

    def exists(self, path: str) -> bool:
        try:
            self._walk(path)
            return True
        except FsError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                return False
            raise

    def listdir(self, path: str = "/") -> list[str]:
        return [os.fsdecode(name) for name, _ in self.fs.readdir(self._walk(path)["ino"])]

    def mkdir(self, path: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> None:
        parent, name = self._parent(path)
        self.fs.client.change("mkdir", parent=parent["ino"], name=name, mode=mode, uid=uid, gid=gid)

    def makedirs(self, path: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> None:
        done = ""
        for part in self._parts(path):
            done += "/" + os.fsdecode(part)
            try:
                self.mkdir(done, mode, uid, gid)
            except FsError as e:
                if e.errno != errno.EEXIST:
                    raise

    def remove(self, path: str) -> None:
        parent, name = self._parent(path)
        self.fs.unlink(parent["ino"], name)

    def rmdir(self, path: str) -> None:
        parent, name = self._parent(path)
        self.fs.rmdir(parent["ino"], name)

    def rename(self, src: str, dst: str) -> None:
        """Atomic, also over an existing file (a reader sees the old file or the new one)."""
        sp, sn = self._parent(src)
        dp, dn = self._parent(dst)
        self.fs.rename(sp["ino"], sn, dp["ino"], dn, 0)

    # -- data -------------------------------------------------------------------------------------

    def write_bytes(self, path: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> None:
        """Create or replace the file's content; it is replicated when this returns."""
        parent, name = self._parent(path)
        try:
            ino = self.fs.client.query("lookup", parent=parent["ino"], name=name)["ino"]
            self.fs.open(ino)
            self.fs.setattr(ino, {"size": 0})
        except FsError as e:
            if e.errno != errno.ENOENT:
                raise
            ino = self.fs.create(parent["ino"], name, st.S_IFREG | mode, uid, gid)["ino"]
        try:
            view = memoryview(data)
            for off in range(0, len(view), 1 << 20):
                self.fs.write(ino, off, bytes(view[off:off + (1 << 20)]))
        finally:
            self.fs.release(ino)

    def read_bytes(self, path: str) -> bytes:
        attr = self._walk(path)
        if st.S_ISDIR(attr["mode"]):
            raise FsError.of(errno.EISDIR, f"{path} is a directory")
        self.fs.open(attr["ino"])
        try:
            out = bytearray()
            while True:
                piece = self.fs.read(attr["ino"], len(out), 4 << 20)
                if not piece:
                    return bytes(out)
                out += piece
        finally:
            self.fs.release(attr["ino"])
