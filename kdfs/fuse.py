"""The FUSE adapter: pyfuse3 requests onto the file system core (kdfs/filesystem.py).

Nothing here decides anything: it turns attributes into pyfuse3's types and errors into errnos, and
runs the core's blocking calls on worker threads so that one slow request never holds the others.
"""

from __future__ import annotations

import errno
import logging
import os
import stat

import pyfuse3
import trio

from kdfs.filesystem import FileSystem
from kerrighed.errors import FsError, KrgError

log = logging.getLogger(__name__)

TIMEOUT = 1.0           # seconds the kernel may trust an entry or attributes (PLATFORM.md: it pays)


def entry(attr: dict) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino = attr["ino"]
    e.generation = 0
    e.entry_timeout = e.attr_timeout = TIMEOUT
    e.st_mode = attr["mode"]
    e.st_nlink = attr["nlink"]
    e.st_uid, e.st_gid = attr["uid"], attr["gid"]
    e.st_rdev = attr["rdev"]
    e.st_size = attr["size"]
    e.st_blksize = 1 << 20
    e.st_blocks = -(-attr.get("stored", attr["size"]) // 512)    # holes take no room: du, cp --sparse
    e.st_atime_ns, e.st_mtime_ns, e.st_ctime_ns = attr["atime_ns"], attr["mtime_ns"], attr["ctime_ns"]
    return e


class KdfsOperations(pyfuse3.Operations):
    enable_writeback_cache = True

    def __init__(self, fs: FileSystem, threads: int = 16):
        super().__init__()
        self.fs = fs
        self._limiter = trio.CapacityLimiter(threads)
        self._dirs: dict[int, list] = {}    # fh -> [inode, listing, served since opendir or rewind]
        self._next_dir = 1

    async def _run(self, fn, *args):
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        except FsError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        except KrgError as e:
            log.warning("kdfs: %s", e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None

    # -- names ------------------------------------------------------------------------------------

    async def lookup(self, parent, name, ctx=None):
        try:
            return entry(await self._run(self.fs.lookup, parent, bytes(name)))
        except pyfuse3.FUSEError as e:
            if e.errno != errno.ENOENT:
                raise
            # A negative entry the kernel may keep as long as a positive one: a build or a shell's
            # PATH search asks for absent names again and again. Our own creates replace it.
            miss = pyfuse3.EntryAttributes()
            miss.st_ino = 0
            miss.entry_timeout = TIMEOUT
            return miss

    async def forget(self, inode_list):
        try:
            await self._run(self.fs.forget, list(inode_list))
        except pyfuse3.FUSEError:
            pass        # forget has no reply; the orphan is found again by fsck

    async def getattr(self, inode, ctx=None):
        return entry(await self._run(self.fs.getattr, inode))

    async def setattr(self, inode, attr, fields, fh, ctx):
        change = {}
        if fields.update_mode:
            change["mode"] = stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            change["uid"] = attr.st_uid
        if fields.update_gid:
            change["gid"] = attr.st_gid
        if fields.update_size:
            change["size"] = attr.st_size
        if fields.update_atime:
            change["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            change["mtime_ns"] = attr.st_mtime_ns
        if not change:
            return await self.getattr(inode)
        return entry(await self._run(self.fs.setattr, inode, change))

    async def readlink(self, inode, ctx):
        return await self._run(self.fs.readlink, inode)

    async def mknod(self, parent, name, mode, rdev, ctx):
        return entry(await self._run(self.fs.mknod, parent, bytes(name), mode, rdev, ctx.uid, ctx.gid))

    async def mkdir(self, parent, name, mode, ctx):
        return entry(await self._run(self.fs.mkdir, parent, bytes(name), mode, ctx.uid, ctx.gid))

    async def symlink(self, parent, name, target, ctx):
        return entry(await self._run(self.fs.symlink, parent, bytes(name), bytes(target), ctx.uid, ctx.gid))

    async def link(self, inode, new_parent, new_name, ctx):
        return entry(await self._run(self.fs.link, inode, new_parent, bytes(new_name)))

    async def unlink(self, parent, name, ctx):
        await self._run(self.fs.unlink, parent, bytes(name))

    async def rmdir(self, parent, name, ctx):
        await self._run(self.fs.rmdir, parent, bytes(name))

    async def rename(self, parent_old, name_old, parent_new, name_new, flags, ctx):
        await self._run(self.fs.rename, parent_old, bytes(name_old), parent_new, bytes(name_new), flags)

    # -- directories ------------------------------------------------------------------------------

    def _listing(self, inode: int) -> list[tuple[bytes, dict]]:
        return self.fs.dots(inode) + self.fs.readdir(inode)

    async def opendir(self, inode, ctx):
        listing = await self._run(self._listing, inode)
        fh, self._next_dir = self._next_dir, self._next_dir + 1
        self._dirs[fh] = [inode, listing, False]
        return fh

    async def readdir(self, fh, start_id, token):
        d = self._dirs.get(fh)
        if d is None:
            return
        if start_id == 0 and d[2]:
            # rewinddir: the stream shows the directory as it is now, as a new opendir would.
            d[1] = await self._run(self._listing, d[0])
        d[2] = True
        listing = d[1]
        for i in range(start_id, len(listing)):
            name, attr = listing[i]
            if not pyfuse3.readdir_reply(token, name, entry(attr), i + 1):
                return
            if i >= 2:      # readdirplus: the kernel now knows the inode (not for "." and "..")
                self.fs._known(attr)

    async def releasedir(self, fh):
        self._dirs.pop(fh, None)

    async def fsyncdir(self, fh, datasync):
        pass            # a metadata change is on every online node before it returns

    # -- files ------------------------------------------------------------------------------------

    async def open(self, inode, flags, ctx):
        await self._run(self.fs.open, inode)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def create(self, parent, name, mode, flags, ctx):
        attr = await self._run(self.fs.create, parent, bytes(name), mode, ctx.uid, ctx.gid)
        return pyfuse3.FileInfo(fh=attr["ino"], keep_cache=True), entry(attr)

    async def read(self, fh, off, size):
        return await self._run(self.fs.read, fh, off, size)

    async def write(self, fh, off, buf):
        return await self._run(self.fs.write, fh, off, bytes(buf))

    async def flush(self, fh):
        if not self.fs.idle(fh):            # a file only read: no thread, no request
            await self._run(self.fs.flush, fh)

    async def fsync(self, fh, datasync):
        await self._run(self.fs.fsync, fh)

    async def release(self, fh):
        if self.fs.release_idle(fh):
            return
        try:
            await self._run(self.fs.release, fh)
        except pyfuse3.FUSEError as e:
            log.warning("kdfs: data of inode %d not stored at release: %s", fh, os.strerror(e.errno))

    async def statfs(self, ctx):
        st = await self._run(self.fs.statfs)
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        total = st["total"]
        s.f_blocks = total["total"] // 4096
        s.f_bfree = total["free"] // 4096
        s.f_bavail = total["avail"] // 4096
        s.f_files = max(1 << 32, st["files"].get("inodes", 0) * 2)
        s.f_ffree = s.f_favail = s.f_files - st["files"].get("inodes", 0)
        s.f_namemax = 255
        return s
