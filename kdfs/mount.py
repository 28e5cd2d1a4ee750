"""The KDFS mount of one machine: `python -m kdfs.mount --home H` (started by krgd).

One mount per machine, served by whichever of its daemons answers (a local test cluster has several
daemons and one mount). It holds a lock next to the mountpoint's configuration so a second one does
not start, leaves by itself once no daemon of this machine is left, and on SIGTERM flushes what it
buffers, then unmounts (lazily when files are still open, then aborts the connection, so no stale
mount stays behind).
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import logging
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

from kerrighed.config import Home
from kerrighed.errors import KrgError

log = logging.getLogger(__name__)

FSNAME = "kdfs"
ORPHAN_AFTER = 3.0          # seconds with no local daemon before the mount goes away


def lock_file(home: Home) -> Path:
    return home.path / "kdfs-mount.pid"


def _starting_file(home: Home) -> Path:
    return home.path / "kdfs-mount.starting"


def _is_mount_process(pid: int) -> bool:
    try:
        return b"kdfs.mount" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def mounted(mountpoint: Path) -> bool:
    """Whether a KDFS mount sits at `mountpoint` (/proc/mounts escapes spaces as \\040)."""
    want = str(mountpoint).replace(" ", "\\040")
    try:
        with open("/proc/mounts") as f:
            return any(line.split()[1] == want and line.split()[2] == f"fuse.{FSNAME}" for line in f)
    except OSError:
        return False


def mount_pid(home: Home) -> int | None:
    """The mount process's pid: it holds a lock on its pid file once it runs; before that, the pid
    its starter wrote down (it may be stopped while still starting)."""
    try:
        fd = os.open(lock_file(home), os.O_RDONLY)
    except OSError:
        fd = None
    if fd is not None:
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    return int(os.read(fd, 32).split()[0])
                except (ValueError, IndexError):
                    pass        # locked, pid not written yet: look at the starter's note
        finally:
            os.close(fd)
    try:
        pid = int(_starting_file(home).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if _is_mount_process(pid) else None


def ensure(home: Home, log_file: Path | None = None) -> None:
    """Start this machine's mount process unless one runs or starts (the daemons of a local cluster
    all ask at once: one of them starts it)."""
    with open(home.path / "kdfs-mount.spawn", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        if mount_pid(home):
            return
        with open(log_file or os.devnull, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "kdfs.mount", "--home", str(home.path)],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                                    cwd="/")
        _starting_file(home).write_text(f"{proc.pid}\n")


def wait_mounted(home: Home, timeout: float = 30.0) -> Path:
    mp = home.kdfs_mountpoint(home.load_config())
    deadline = time.monotonic() + timeout
    while not mounted(mp):
        if time.monotonic() > deadline:
            raise TimeoutError(f"KDFS did not appear at {mp} within {timeout:g} s")
        time.sleep(0.05)
    return mp


def stop(home: Home, timeout: float = 30.0) -> None:
    """Stop this machine's mount process and make sure nothing stays mounted."""
    pid = mount_pid(home)
    if pid and pid > 0:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while mount_pid(home) and time.monotonic() < deadline:
            time.sleep(0.05)
        if mount_pid(home):
            log.warning("kdfs mount process %d did not stop; killing it", pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        mp = home.kdfs_mountpoint(home.load_config())
    except Exception:
        return
    if mounted(mp):
        _detach(mp)


def _device(mp: Path) -> str | None:
    """The mount's "major:minor", from mountinfo: a stat() of the mountpoint would ask the file
    system itself, which may be us (not serving yet) or hung."""
    want = str(mp).replace(" ", "\\040")
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if fields[4] == want and f"fuse.{FSNAME}" in fields[fields.index("-") + 1:]:
                    dev = fields[2]
        return dev
    except (OSError, UnboundLocalError, ValueError, IndexError):
        return None


def _detach(mp: Path) -> None:
    """Lazy unmount, then abort the FUSE connection so readers of open files get an error, not a hang."""
    dev = _device(mp)
    subprocess.run(["umount", "-l", str(mp)], capture_output=True)
    if dev is not None:
        conns = Path("/sys/fs/fuse/connections")
        if not any(conns.iterdir()):
            subprocess.run(["mount", "-t", "fusectl", "fusectl", str(conns)], capture_output=True)
        try:
            (conns / dev.split(":")[1] / "abort").write_text("1")
        except OSError:
            pass


def _set_read_ahead(mp: Path, kb: int = 1024) -> None:
    # PLATFORM.md: +54-82 % sequential read on a FUSE mount.
    dev = _device(mp)
    try:
        Path(f"/sys/class/bdi/{dev}/read_ahead_kb").write_text(str(kb))
    except (OSError, TypeError) as e:
        log.info("kdfs: read_ahead_kb not set: %s", e)


def _holder(home: Home) -> str:
    try:
        machine = Path("/etc/machine-id").read_text().strip()
    except OSError:
        machine = os.uname().nodename
    return f"{machine}:{home.path}"


def _daemons_alive(home: Home) -> bool:
    from kerrighed.localcluster import daemon_pid

    return any(daemon_pid(home, n) for n in home.local_nodes())


def serve(home: Home) -> int:
    import pyfuse3
    import trio

    from kdfs.client import KdfsClient
    from kdfs.filesystem import FileSystem
    from kdfs.fuse import KdfsOperations

    cfg = home.load_config()
    mp = home.kdfs_mountpoint(cfg)
    lock = os.open(lock_file(home), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0                # another mount process serves this machine
    os.ftruncate(lock, 0)
    os.write(lock, f"{os.getpid()}\n".encode())
    if mounted(mp):
        _detach(mp)             # left by a mount process that was killed
    mp.mkdir(parents=True, exist_ok=True)

    fs = FileSystem(lambda: KdfsClient(home), cfg.kdfs.chunk_size, holder=_holder(home))

    def release_held() -> None:
        # Files the previous mount of this machine kept open after their last unlink: nothing can
        # have them open now. (In the background: the cluster may not be formed yet.)
        try:
            fs.client.change("release_held", holder=fs.holder)
        except KrgError as e:
            log.warning("kdfs: files unlinked while open under the last mount not released: %s", e)
    ops = KdfsOperations(fs)
    options = set(pyfuse3.default_options) | {f"fsname={FSNAME}", f"subtype={FSNAME}", "allow_other",
                                                "default_permissions"}
    pyfuse3.init(ops, str(mp), options)
    _set_read_ahead(mp)
    log.info("kdfs mounted at %s (pid %d)", mp, os.getpid())

    async def watch(cancel: trio.CancelScope) -> None:
        alone_since = None
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            while True:
                with trio.move_on_after(0.5):
                    async for sig in signals:
                        log.info("kdfs: signal %d: unmounting", sig)
                        cancel.cancel()
                        return
                if _daemons_alive(home):
                    alone_since = None
                elif alone_since is None:
                    alone_since = time.monotonic()
                elif time.monotonic() - alone_since > ORPHAN_AFTER:
                    log.info("kdfs: no daemon left on this machine: unmounting")
                    cancel.cancel()
                    return

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, nursery.cancel_scope)
            nursery.start_soon(pyfuse3.main)
            nursery.start_soon(partial(trio.to_thread.run_sync, release_held, abandon_on_cancel=True))

    clean = False
    try:
        trio.run(main)
        clean = True
    finally:
        try:
            fs.flush_all()
        except Exception:
            log.exception("kdfs: flush at unmount failed")
        try:
            pyfuse3.close(unmount=True)
        except Exception:
            log.exception("kdfs: unmount failed")
        if mounted(mp):
            _detach(mp)
        try:
            fs.close()
        except Exception:
            pass
        log.info("kdfs unmounted from %s%s", mp, "" if clean else " after an error")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kdfs-mount", description="serve this machine's KDFS mount")
    ap.add_argument("--home", help="the cluster's home (default $KRG_HOME or /var/lib/kerrighed)")
    ap.add_argument("--debug", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s kdfs-mount %(levelname)s %(message)s")
    try:
        return serve(Home.resolve(args.home))
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            return 0
        raise


if __name__ == "__main__":
    sys.exit(main())
