"""A minimal pyfuse3 passthrough: SOURCE's tree served at MOUNTPOINT, the floor any Python FUSE file
system pays on this machine (bench_kdfs.py measures it beside local disk and KDFS).

Minimal, but with what PLATFORM.md ("FUSE") found makes pyfuse3 fast, so that the floor is the
same one a tuned file system stands on: the kernel's writeback cache, keep_cache on open, non-zero
entry and attribute timeouts (1 s by default, like KDFS), and read_ahead_kb=1024 on the mount's
bdi (/sys/class/bdi/0:<minor>/read_ahead_kb). No max_read option (pyfuse3 3.5 refuses it).

Every request is served in the trio loop with plain blocking system calls on the source (no
thread hand-off: that costs more than a page-cache read or write). FUSE inode numbers are the
source's own (the source's root is FUSE's root). Like libfuse's passthrough_ll, every inode the
kernel knows is held by an O_PATH descriptor until the kernel forgets it: operations reach it by
descriptor, not by path, so they work on renamed and unlinked files, and ext4 cannot reuse its
number while the kernel may still name it. SIGTERM, SIGINT or SIGHUP flush the kernel's dirty pages (syncfs, bounded), end the
loop and unmount; so does `umount MOUNTPOINT`.

Once mounted and tuned, one line goes to stdout: `mounted MOUNTPOINT bdi 0:NN read_ahead_kb 1024`.

    .venv/bin/python bench/passthrough_fs.py SOURCE MOUNTPOINT [--timeout 1] [--debug]
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import functools
import logging
import os
import re
import signal
import stat
import sys
from pathlib import Path

import pyfuse3
import trio
from pyfuse3 import FUSEError

log = logging.getLogger("passthrough_fs")

READ_AHEAD_KB = 1024
AT_SYMLINK_NOFOLLOW, AT_EMPTY_PATH = 0x100, 0x1000
UTIME_OMIT = (1 << 30) - 2
libc = ctypes.CDLL(None, use_errno=True)     # fchownat and utimensat on an O_PATH descriptor (AT_EMPTY_PATH)


class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _timespec(ns: int | None) -> Timespec:
    return Timespec(0, UTIME_OMIT) if ns is None else Timespec(*divmod(ns, 1_000_000_000))


def _check(ret: int) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
FLUSH_TIMEOUT = 30.0        # seconds a signal waits for the dirty pages to reach SOURCE


def oserrors(fn):
    """OSError of the source -> the same errno to the kernel."""
    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except OSError as e:
            raise FUSEError(e.errno or errno.EIO) from None
    return wrapper


class Inode:
    """An inode the kernel knows: an O_PATH descriptor (so it works unlinked, renamed, and its
    number is not reused while the kernel may still name it) and the kernel's lookup count."""
    __slots__ = ("fd", "lookups")

    def __init__(self, fd: int):
        self.fd = fd
        self.lookups = 0


class Passthrough(pyfuse3.Operations):
    enable_writeback_cache = True
    supports_dot_lookup = False         # no NFS export: '.' and '..' are never looked up

    def __init__(self, source: str, timeout: float):
        super().__init__()
        self.timeout = timeout
        fd = os.open(source, os.O_PATH | os.O_DIRECTORY)
        self.root_ino = os.fstat(fd).st_ino
        self.inodes: dict[int, Inode] = {pyfuse3.ROOT_INODE: Inode(fd)}   # FUSE inode -> ours
        self.dirs: dict[int, tuple[int, list | None]] = {}                 # opendir handle -> fd, listing
        self.next_dir = 1

    # -- inodes ----------------------------------------------------------------------------------------

    def fd(self, inode: int) -> int:
        try:
            return self.inodes[inode].fd
        except KeyError:
            raise FUSEError(errno.ESTALE) from None

    def number(self, st: os.stat_result) -> int:
        return pyfuse3.ROOT_INODE if st.st_ino == self.root_ino else st.st_ino

    def entry(self, st: os.stat_result) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = self.number(st)
        e.generation = 0
        e.entry_timeout = e.attr_timeout = self.timeout
        for name in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size", "st_blksize", "st_blocks",
                     "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(e, name, getattr(st, name))
        return e

    def remember(self, parent_fd: int, name: bytes) -> pyfuse3.EntryAttributes:
        """The entry of name in parent, handed to the kernel: one more lookup of its inode."""
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=parent_fd)
        try:
            st = os.fstat(fd)
            e = self.entry(st)
            known = self.inodes.get(e.st_ino)
            if known is None:
                known = self.inodes[e.st_ino] = Inode(fd)
                fd = -1
        finally:
            if fd >= 0:
                os.close(fd)
        known.lookups += 1
        return e

    async def forget(self, inode_list):
        for inode, n in inode_list:
            known = self.inodes.get(inode)
            if known is None:
                continue
            known.lookups -= n
            if known.lookups <= 0 and inode != pyfuse3.ROOT_INODE:
                del self.inodes[inode]
                os.close(known.fd)

    @staticmethod
    def proc(fd: int) -> str:
        return f"/proc/self/fd/{fd}"

    # -- names -----------------------------------------------------------------------------------------

    @oserrors
    async def lookup(self, parent_inode, name, ctx):
        return self.remember(self.fd(parent_inode), name)

    @oserrors
    async def getattr(self, inode, ctx):
        return self.entry(os.fstat(self.fd(inode)))

    @oserrors
    async def setattr(self, inode, attr, fields, fh, ctx):
        fd = self.fd(inode)
        if fields.update_size:
            if fh is not None:
                os.ftruncate(fh, attr.st_size)
            else:
                os.truncate(self.proc(fd), attr.st_size)
        if fields.update_mode:
            os.chmod(self.proc(fd), stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            _check(libc.fchownat(fd, b"", attr.st_uid if fields.update_uid else -1,
                                 attr.st_gid if fields.update_gid else -1, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW))
        if fields.update_atime or fields.update_mtime:
            times = (Timespec * 2)(_timespec(attr.st_atime_ns if fields.update_atime else None),
                                   _timespec(attr.st_mtime_ns if fields.update_mtime else None))
            _check(libc.utimensat(fd, b"", times, AT_EMPTY_PATH))
        return self.entry(os.fstat(fd))

    @oserrors
    async def readlink(self, inode, ctx):
        return os.readlink(b"", dir_fd=self.fd(inode))

    def owned(self, parent_fd: int, name: bytes, ctx) -> None:
        """A new entry belongs to the caller, as on a local disk (we run as root)."""
        if (ctx.uid, ctx.gid) != (os.geteuid(), os.getegid()):
            os.chown(name, ctx.uid, ctx.gid, dir_fd=parent_fd, follow_symlinks=False)

    @oserrors
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        parent = self.fd(parent_inode)
        os.mknod(name, mode, rdev, dir_fd=parent)
        self.owned(parent, name, ctx)
        return self.remember(parent, name)

    @oserrors
    async def mkdir(self, parent_inode, name, mode, ctx):
        parent = self.fd(parent_inode)
        os.mkdir(name, mode, dir_fd=parent)
        self.owned(parent, name, ctx)
        return self.remember(parent, name)

    @oserrors
    async def symlink(self, parent_inode, name, target, ctx):
        parent = self.fd(parent_inode)
        os.symlink(target, name, dir_fd=parent)
        self.owned(parent, name, ctx)
        return self.remember(parent, name)

    @oserrors
    async def link(self, inode, new_parent_inode, new_name, ctx):
        parent = self.fd(new_parent_inode)
        os.link(self.proc(self.fd(inode)), new_name, dst_dir_fd=parent, follow_symlinks=True)
        return self.remember(parent, new_name)

    @oserrors
    async def unlink(self, parent_inode, name, ctx):
        os.unlink(name, dir_fd=self.fd(parent_inode))

    @oserrors
    async def rmdir(self, parent_inode, name, ctx):
        os.rmdir(name, dir_fd=self.fd(parent_inode))

    @oserrors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if flags:
            raise FUSEError(errno.EINVAL)       # RENAME_NOREPLACE/EXCHANGE: callers fall back to rename(2)
        os.rename(name_old, name_new, src_dir_fd=self.fd(parent_inode_old), dst_dir_fd=self.fd(parent_inode_new))

    # -- files -----------------------------------------------------------------------------------------

    @staticmethod
    def open_flags(flags: int) -> int:
        # With the writeback cache the kernel reads pages of files opened write-only, and it handles
        # O_APPEND itself (pwrite on an O_APPEND descriptor would append regardless of the offset).
        if flags & os.O_ACCMODE == os.O_WRONLY:
            flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        return flags & ~os.O_APPEND

    @oserrors
    async def open(self, inode, flags, ctx):
        fd = os.open(self.proc(self.fd(inode)), self.open_flags(flags) & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY))
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    @oserrors
    async def create(self, parent_inode, name, mode, flags, ctx):
        parent = self.fd(parent_inode)
        fd = os.open(name, self.open_flags(flags) | os.O_CREAT, mode, dir_fd=parent)
        try:
            self.owned(parent, name, ctx)
            e = self.remember(parent, name)
        except BaseException:
            os.close(fd)
            raise
        return pyfuse3.FileInfo(fh=fd, keep_cache=True), e

    @oserrors
    async def read(self, fh, off, size):
        return os.pread(fh, size, off)

    @oserrors
    async def write(self, fh, off, buf):
        return os.pwrite(fh, buf, off)

    async def flush(self, fh):
        pass

    @oserrors
    async def release(self, fh):
        os.close(fh)

    @oserrors
    async def fsync(self, fh, datasync):
        (os.fdatasync if datasync else os.fsync)(fh)

    # -- directories -----------------------------------------------------------------------------------

    @oserrors
    async def opendir(self, inode, ctx):
        fd = os.open(self.proc(self.fd(inode)), os.O_RDONLY | os.O_DIRECTORY)
        fh, self.next_dir = self.next_dir, self.next_dir + 1
        self.dirs[fh] = (fd, None)
        return fh

    @oserrors
    async def readdir(self, fh, start_id, token):
        fd, listing = self.dirs[fh]
        if listing is None or start_id == 0:
            # Listed once per opendir (or rewind): next_id is the position in that listing.
            os.lseek(fd, 0, os.SEEK_SET)
            with os.scandir(fd) as it:
                listing = sorted(os.fsencode(e.name) for e in it)
            self.dirs[fh] = (fd, listing)
        for i in range(start_id, len(listing)):
            name = listing[i]
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue                        # removed since the listing
            if not pyfuse3.readdir_reply(token, name, self.entry(st), i + 1):
                break
            self.remember(fd, name)             # readdirplus: the kernel now holds a lookup of it

    async def releasedir(self, fh):
        fd, _ = self.dirs.pop(fh, (None, None))
        if fd is not None:
            os.close(fd)

    @oserrors
    async def fsyncdir(self, fh, datasync):
        os.fsync(self.dirs[fh][0])

    @oserrors
    async def statfs(self, ctx):
        s = os.statvfs(self.proc(self.fd(pyfuse3.ROOT_INODE)))
        out = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail",
                     "f_namemax"):
            setattr(out, name, getattr(s, name))
        return out


# -- the mount -----------------------------------------------------------------------------------------


def raise_fd_limit() -> None:
    """One O_PATH descriptor per inode the kernel knows: 10,000 files need more than 1,024."""
    import resource
    want = min(int(Path("/proc/sys/fs/nr_open").read_text()), 1 << 20)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def mount_device(mountpoint: str) -> str | None:
    """The "0:NN" of the mount at mountpoint, from /proc/self/mountinfo (a stat of the mountpoint
    would be a FUSE request, and the loop does not serve yet)."""
    def unescape(s: str) -> str:
        return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)
    found = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if unescape(fields[4]) == mountpoint:
            found = fields[2]           # the last one listed is the one on top
    return found


def tune_read_ahead(mountpoint: str) -> tuple[str | None, str]:
    dev = mount_device(mountpoint)
    if dev is None:
        return None, "?"
    knob = Path(f"/sys/class/bdi/{dev}/read_ahead_kb")
    try:
        knob.write_text(f"{READ_AHEAD_KB}\n")
        return dev, knob.read_text().strip()
    except OSError as e:
        log.warning("cannot set %s: %s", knob, e)
        return dev, f"unset ({e.strerror})"


async def serve(mountpoint: str) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stop_on_signal, mountpoint)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()       # unmounted from outside: no signal will come


async def stop_on_signal(mountpoint: str) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("%s: flushing and unmounting %s", signal.Signals(signum).name, mountpoint)
            # syncfs from a thread: the kernel's write-back comes to this loop, which keeps serving.
            with trio.move_on_after(FLUSH_TIMEOUT) as scope:
                try:
                    await trio.to_thread.run_sync(pyfuse3.syncfs, mountpoint, abandon_on_cancel=True)
                except OSError as e:
                    log.warning("syncfs %s: %s", mountpoint, e)
            if scope.cancelled_caught:
                log.warning("syncfs %s did not end within %g s; unmounting anyway", mountpoint, FLUSH_TIMEOUT)
            pyfuse3.terminate()
            return


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", help="the directory to serve")
    ap.add_argument("mountpoint")
    ap.add_argument("--timeout", type=float, default=1.0, help="entry and attribute timeouts, s (default 1)")
    ap.add_argument("--debug", action="store_true", help="log every pyfuse3 message")
    args = ap.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="passthrough_fs: %(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    source, mountpoint = os.path.realpath(args.source), os.path.realpath(args.mountpoint)
    for path in (source, mountpoint):
        if not os.path.isdir(path):
            print(f"passthrough_fs: {path} is not a directory", file=sys.stderr)
            return 2
    os.umask(0)         # the kernel applied the caller's umask to every mode it sends
    raise_fd_limit()
    ops = Passthrough(source, args.timeout)
    options = {"fsname=passthrough", "subtype=passthrough", "default_permissions"}
    if os.geteuid() == 0:
        options.add("allow_other")
    pyfuse3.init(ops, mountpoint, options)
    try:
        dev, read_ahead = tune_read_ahead(mountpoint)
        print(f"mounted {mountpoint} bdi {dev} read_ahead_kb {read_ahead}", flush=True)
        trio.run(serve, mountpoint)
    except BaseException:
        pyfuse3.close(unmount=True)
        raise
    pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
