"""KDFS through its real FUSE mount: the POSIX behaviour unmodified programs rely on (issue 5, item 2).

One 3-node cluster serves the module (the `kdfs` fixture, with the `cluster` fixture's leak checks);
each test works in a directory of its own in the mount and, where a comparison makes sense, runs the
same scenario in a directory on the local disk (ext4 here) and asserts the same outcome: the local
kernel file system is the oracle. The last test restarts a cluster of its own to check that data
and metadata survive `krgadm cluster stop` + `start`.

Figures (create rate, listing time, workload seconds) are printed; run with `-s` to see them.
"""

from __future__ import annotations

import ast
import ctypes
import errno
import hashlib
import json
import mmap
import os
import random
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kdfs import mount as kdfs_mount
from kdfs.client import KdfsClient
from kerrighed import localcluster
from kerrighed.config import Home

from conftest import NOBODY, LocalCluster, leftovers, run_as, short_tmpdir, wait_for

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="the mount uses allow_other; tests chown and switch to uid 65534"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="KDFS is a FUSE file system: no /dev/fuse"),
]

MiB = 1 << 20
GiB = 1 << 30
CHUNK = 4 * MiB                 # the default chunk size: data tests cross chunk boundaries
# The issue asks for 100,000; creating them through the replicated metadata log costs minutes on a
# 2-core CI machine, so the default is what CI affords (KRG_KDFS_READDIR_ENTRIES raises it).
READDIR_ENTRIES = int(os.environ.get("KRG_KDFS_READDIR_ENTRIES", "20000"))
FIGURES: dict[str, float] = {}


# -- the cluster and the directories ------------------------------------------------------------


class Kdfs:
    def __init__(self, cluster: LocalCluster, mp: Path, local: Path):
        self.cluster, self.mp, self.local = cluster, mp, local

    def client(self) -> KdfsClient:
        return KdfsClient(self.cluster.home)

    def logs(self) -> str:
        """The daemons' and the mount's logs, for failure messages."""
        out = []
        for n in self.cluster.home.local_nodes():
            for name in ("krgd.log", "kdfs-mount.log"):
                f = self.cluster.home.state_dir(n) / name
                if f.exists():
                    out.append(f"--- node {n} {name} (tail)\n" + "\n".join(f.read_text(errors="replace")
                                                                          .splitlines()[-30:]))
        return "\n".join(out)


@pytest.fixture(scope="module")
def kdfs():
    """A 3-node cluster for the whole module, its mount, and a local-disk directory beside it."""
    home = Home(short_tmpdir("krg-kp-"))
    local = short_tmpdir("krg-kp-local-")
    c = LocalCluster(home)
    pids = []
    try:
        port = localcluster.free_port([localcluster.local_address(n) for n in (1, 2, 3)], prefer_default=False)
        c.krgadm("cluster", "start", "--local", "3", "--port", str(port))
        pids = [c.pid(n) for n in (1, 2, 3)]
        mp = home.kdfs_mountpoint(home.load_config())
        assert kdfs_mount.mounted(mp)
        yield Kdfs(c, mp, local)
    finally:
        c.krgadm("cluster", "stop", check=False)
        c.stop_all()
        leaks = leftovers(home)
        for pid in filter(None, pids):
            if Path(f"/proc/{pid}/cmdline").exists() and b"kerrighed" in Path(f"/proc/{pid}/cmdline").read_bytes():
                leaks.append(f"daemon pid {pid} survived 'krgadm cluster stop'")
        shutil.rmtree(home.path, ignore_errors=True)
        shutil.rmtree(local, ignore_errors=True)
        if FIGURES:
            print("\nKDFS figures:", json.dumps(FIGURES, sort_keys=True))
        assert not leaks, f"left behind: {leaks}"


@pytest.fixture
def dirs(kdfs, request):
    """(a fresh directory in KDFS, a fresh directory on the local disk) for this test; the logs of
    the daemons and the mount are shown when it fails."""
    name = request.node.name.replace("[", "-").replace("]", "")
    kd, ld = kdfs.mp / name, kdfs.local / name
    kd.mkdir()
    ld.mkdir()
    failed = request.session.testsfailed
    yield kd, ld
    if request.session.testsfailed > failed:
        print(kdfs.logs())


# -- helpers ------------------------------------------------------------------------------------


def outcome(fn, *args, **kw):
    """fn's value, or the name of the errno it failed with: transcripts compare errors too."""
    try:
        return fn(*args, **kw)
    except OSError as e:
        return errno.errorcode.get(e.errno, e.errno)


def same_on_both(scenario, kd: Path, ld: Path):
    """Run scenario(base) on KDFS and on the local disk; they must give the same transcript."""
    want = scenario(ld)
    got = scenario(kd)
    assert got == want, f"KDFS and the local disk differ:\nKDFS:  {got}\nlocal: {want}"
    return got


def sh(*cmd: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 120, **kw) -> str:
    if "input" not in kw:
        kw["stdin"] = subprocess.DEVNULL
    # Run as from a shell: not as a sub-make of the `make test` that may be running the tests.
    base = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                       env={**base, **(env or {})}, **kw)
    assert r.returncode == 0, f"{' '.join(cmd)} (in {cwd}) exited {r.returncode}: {r.stderr.strip()[-2000:]}"
    return r.stdout


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write(path, data: bytes, mode: str = "wb") -> None:
    with open(path, mode) as f:
        f.write(data)


def digest(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(MiB):
            h.update(block)
    return h.hexdigest()


def manifest(root: Path, inodes: bool = False) -> dict:
    """Everything a program could see of a tree: type, mode, owner, size, mtime, content, links."""
    out = {}
    first_path: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in [*dirnames, *sorted(filenames)]:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            e = {"mode": oct(st.st_mode), "uid": st.st_uid, "gid": st.st_gid, "mtime": st.st_mtime_ns}
            if stat.S_ISREG(st.st_mode):
                e |= {"size": st.st_size, "sha256": digest(p), "nlink": st.st_nlink,
                      "same_as": first_path.setdefault(st.st_ino, rel)}
            elif stat.S_ISLNK(st.st_mode):
                e["target"] = os.readlink(p)
            elif stat.S_ISDIR(st.st_mode):
                e["nlink"] = st.st_nlink
            if inodes:
                e["ino"] = st.st_ino
            out[rel] = e
    return out


def stored(kdfs: Kdfs, path: Path) -> bytes:
    """A file's content as the daemons hold it (what a restart would find), not the page cache's."""
    with kdfs.client() as c:
        attr = c.query("getattr", ino=os.stat(path).st_ino)
        out = bytearray(attr["size"])
        for ch in c.query("chunks", ino=attr["ino"]):
            data = c.get(ch["id"], ch["nodes"], 0, ch["length"])[:ch["length"]]
            out[ch["idx"] * CHUNK:ch["idx"] * CHUNK + len(data)] = data
        return bytes(out[:attr["size"]])


def pattern(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


# -- files, directories, links ------------------------------------------------------------------


def test_regular_files_and_directories(dirs, kdfs):
    data = pattern(10 * MiB + 123)                  # three chunks, the last one partial

    def scenario(base: Path):
        t = []
        a = base / "a"
        write(a, b"hello")
        write(a, b" world", "ab")
        t.append(read(a))
        with open(a, "r+b") as f:
            f.seek(2)
            f.write(b"XY")
        t.append((read(a), a.stat().st_size))
        big = base / "big"
        write(big, data)
        t.append((big.stat().st_size, digest(big) == hashlib.sha256(data).hexdigest()))
        with open(big, "rb") as f:                  # reads across chunk boundaries
            for off in (0, CHUNK - 3, 2 * CHUNK - 1, len(data) - 5, len(data), len(data) + 10):
                f.seek(off)
                t.append(f.read(7) == data[off:off + 7])
        with open(big, "r+b") as f:                 # a write across a chunk boundary, in place
            f.seek(CHUNK - 2)
            f.write(b"ABCD")
        t.append(read(big)[CHUNK - 4:CHUNK + 4])
        t.append(outcome(os.open, a, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        t.append(outcome(os.open, base / "missing", os.O_RDONLY))
        (base / "d").mkdir()
        (base / "d" / "sub").mkdir()
        write(base / "d" / "f", b"x")
        t.append(outcome(os.mkdir, base / "d"))
        t.append(outcome(os.open, base / "d", os.O_WRONLY))
        t.append(outcome(os.rmdir, base / "d"))
        t.append(outcome(os.unlink, base / "d"))
        t.append(outcome(os.rmdir, a))
        t.append(outcome(os.open, base / "a" / "x", os.O_RDONLY))
        t.append(outcome(os.listdir, a))
        t.append((sorted(os.listdir(base)), sorted(os.listdir(base / "d")), (base / "d").stat().st_nlink,
                  base.stat().st_nlink))
        os.rmdir(base / "d" / "sub")
        t.append((base / "d").stat().st_nlink)
        os.unlink(base / "d" / "f")
        os.rmdir(base / "d")
        os.mkfifo(base / "fifo")
        os.mknod(base / "node", 0o640 | stat.S_IFREG)
        t.append((stat.S_ISFIFO((base / "fifo").stat().st_mode), oct((base / "node").stat().st_mode)))
        os.unlink(a)
        t.append((outcome(os.stat, a), sorted(os.listdir(base)), base.stat().st_nlink))
        return t

    same_on_both(scenario, *dirs)
    kd, _ = dirs
    assert stored(kdfs, kd / "big") == read(kd / "big")


def test_a_file_unlinked_while_open_lives_until_closed(dirs, kdfs):
    def scenario(base: Path):
        t = []
        fd = os.open(base / "tmp", os.O_CREAT | os.O_RDWR, 0o600)
        os.write(fd, b"before")
        os.unlink(base / "tmp")
        os.write(fd, b" after" * 1000)
        os.fsync(fd)
        t.append((os.pread(fd, 12, 0), os.fstat(fd).st_nlink, os.fstat(fd).st_size, os.listdir(base)))
        os.close(fd)
        # Replaced by a rename while open: the reader goes on reading the old version.
        write(base / "conf", b"old version")
        with open(base / "conf", "rb") as old:
            write(base / "conf.new", b"new")
            os.rename(base / "conf.new", base / "conf")
            t.append((old.read(), read(base / "conf"), os.fstat(old.fileno()).st_nlink))
        return t

    same_on_both(scenario, *dirs)
    with kdfs.client() as c:                        # closed: the orphan went with its chunks
        wait_for(lambda: c.query("stats")["orphans"] == 0, what="the unlinked inode to be forgotten")


def test_symlinks(dirs):
    def scenario(base: Path):
        t = []
        write(base / "target", b"content")
        os.symlink("target", base / "l")
        os.symlink("missing", base / "dangling")
        os.symlink(".", base / "self-dir")
        os.symlink("loop", base / "loop")
        os.mkdir(base / "d")
        write(base / "d" / "in", b"in d")
        os.symlink("../d", base / "d" / "up")
        long_target = "x/" * 2000 + "end"
        os.symlink(long_target, base / "long")
        t.append((os.readlink(base / "l"), read(base / "l"), (base / "l").stat().st_size,
                  (base / "l").lstat().st_size, oct((base / "l").lstat().st_mode)))
        t.append((os.path.exists(base / "dangling"), os.path.lexists(base / "dangling"),
                  outcome(os.open, base / "dangling", os.O_RDONLY)))
        t.append(outcome(os.open, base / "loop", os.O_RDONLY))
        t.append(outcome(os.symlink, "x", base / "l"))
        t.append(sorted(os.listdir(base / "d" / "up")))
        t.append(read(base / "d" / "up" / "up" / "in"))
        t.append(os.path.realpath(base / "self-dir" / "d" / "up" / "in") == str(base / "d" / "in"))
        t.append(os.readlink(base / "long") == long_target)
        t.append(outcome(os.symlink, "y" * 4096, base / "too-long"))
        t.append(outcome(os.readlink, base / "target"))
        write(base / "dangling", b"created through the link")       # open(O_CREAT) follows it
        t.append((read(base / "missing"), os.readlink(base / "dangling")))
        os.unlink(base / "l")
        t.append((read(base / "target"), sorted(os.listdir(base))))
        return t

    same_on_both(scenario, *dirs)


def test_hard_links(dirs):
    def scenario(base: Path):
        t = []
        a, b, c = base / "a", base / "b", base / "sub" / "c"
        write(a, b"one")
        (base / "sub").mkdir()
        os.link(a, b)
        os.link(b, c)
        sa, sb, sc = a.stat(), b.stat(), c.stat()
        t.append((sa.st_nlink, sb.st_nlink, sc.st_nlink, sa.st_ino == sb.st_ino == sc.st_ino))
        write(b, b"two, longer", "r+b")
        t.append((read(a), read(c), a.stat().st_size))
        os.unlink(a)
        t.append((b.stat().st_nlink, read(c), outcome(os.stat, a)))
        t.append(outcome(os.link, base / "sub", base / "dirlink"))
        t.append(outcome(os.link, b, c))
        t.append(outcome(os.link, base / "missing", base / "x"))
        os.symlink("b", base / "sym")
        os.link(base / "sym", base / "sym2", follow_symlinks=False)   # a hard link to the symlink itself
        t.append((os.readlink(base / "sym2"), (base / "sym").lstat().st_nlink))
        os.unlink(b)
        os.unlink(c)
        t.append(sorted(os.listdir(base)))
        return t

    same_on_both(scenario, *dirs)


# -- rename ---------------------------------------------------------------------------------------

AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(old, new, flags: int) -> None:
    """renameat2(2): Python has no binding, and coreutils here (9.1) has no `mv --exchange`."""
    if _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(old))


def test_rename(dirs):
    def scenario(base: Path):
        t = []
        write(base / "a", b"A")
        write(base / "b", b"B")
        os.link(base / "b", base / "b2")
        os.rename(base / "a", base / "b")                   # over an existing file
        t.append((read(base / "b"), outcome(os.stat, base / "a"), (base / "b2").stat().st_nlink, read(base / "b2")))
        os.rename(base / "b", base / "b")                   # onto itself: nothing
        os.link(base / "b", base / "b3")
        os.rename(base / "b", base / "b3")                  # two links of one file: POSIX says nothing happens
        t.append(sorted(os.listdir(base)))
        for d in ("d1", "d2", "full", "d1/inner"):
            (base / d).mkdir()
        write(base / "full" / "f", b"f")
        write(base / "d1" / "inner" / "deep", b"deep")
        t.append(outcome(os.rename, base / "d1", base / "full"))            # non-empty target
        t.append(outcome(os.rename, base / "b3", base / "d2"))              # file over a directory
        t.append(outcome(os.rename, base / "d2", base / "b3"))              # directory over a file
        t.append(outcome(os.rename, base / "d1", base / "d1" / "inner" / "x"))   # into itself
        t.append(outcome(os.rename, base / "missing", base / "x"))
        os.rename(base / "d1", base / "d2")                 # over an empty directory
        t.append((sorted(os.listdir(base)), read(base / "d2" / "inner" / "deep"), base.stat().st_nlink))
        os.rename(base / "d2" / "inner", base / "full" / "moved")             # across directories
        t.append(((base / "d2").stat().st_nlink, (base / "full").stat().st_nlink,
                  read(base / "full" / "moved" / "deep"), os.path.exists(base / "full" / "moved" / "..")))
        write(base / "n1", b"n1")
        write(base / "n2", b"n2")
        t.append(outcome(renameat2, base / "n1", base / "n2", RENAME_NOREPLACE))
        t.append(outcome(renameat2, base / "n1", base / "n3", RENAME_NOREPLACE))
        t.append((outcome(read, base / "n1"), read(base / "n3")))
        renameat2(base / "n2", base / "n3", RENAME_EXCHANGE)
        t.append((read(base / "n2"), read(base / "n3")))
        renameat2(base / "n2", base / "full", RENAME_EXCHANGE)              # a file and a directory
        t.append((read(base / "full"), sorted(os.listdir(base / "n2")), base.stat().st_nlink))
        t.append(outcome(renameat2, base / "n3", base / "nothing", RENAME_EXCHANGE))
        t.append(outcome(renameat2, base / "n3", base / "x", RENAME_EXCHANGE | RENAME_NOREPLACE))
        sh("mv", "-T", "n3", "moved-by-mv", cwd=base)
        sh("mv", "--no-clobber", "moved-by-mv", "full", cwd=base)            # renameat2(NOREPLACE) in coreutils 9
        t.append((sorted(os.listdir(base)), read(base / "full")))
        return t

    same_on_both(scenario, *dirs)


READER = textwrap.dedent("""
    import json, os, sys
    path, stop = sys.argv[1], sys.argv[2]
    opens = misses = torn = 0
    seen = set()
    while not os.path.exists(stop):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            misses += 1
            continue
        opens += 1
        lines = data.splitlines()
        if not lines or len(set(lines)) != 1 or len(lines) != 64:
            torn += 1
        else:
            seen.add(lines[0].decode())
        if opens == 1:
            open(stop + ".ready", "w").close()
    print(json.dumps({"opens": opens, "misses": misses, "torn": torn, "versions": len(seen)}))
""")


def test_rename_over_a_file_is_atomic_for_a_reader(dirs):
    """A program that replaces a file by writing a temporary and renaming it over never leaves a
    moment without the file, nor a half-written one, for another process that keeps opening it."""
    kd, _ = dirs
    target, stop = kd / "config", kd / "stop"
    write(target, b"version 0\n" * 64)
    reader = subprocess.Popen([sys.executable, "-c", READER, str(target), str(stop)], stdout=subprocess.PIPE,
                              text=True)
    try:
        wait_for(lambda: os.path.exists(str(stop) + ".ready") or reader.poll() is not None, 30,
                 what="the reader's first open")
        renames = 100
        for i in range(1, renames + 1):
            tmp = kd / f".config.{i}"
            write(tmp, f"version {i}\n".encode() * 64)
            os.rename(tmp, target)
        write(stop, b"")
        out, _ = reader.communicate(timeout=60)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    r = json.loads(out)
    assert r["misses"] == 0 and r["torn"] == 0, r
    assert r["opens"] > renames and r["versions"] > 1, r
    assert read(target) == f"version {renames}\n".encode() * 64
    assert sorted(os.listdir(kd)) == ["config", "stop", "stop.ready"]


# -- sizes: truncate, holes, large offsets ---------------------------------------------------------


def test_truncate_and_holes(dirs):
    data = pattern(9 * MiB)

    def scenario(base: Path):
        t = []
        f = base / "f"
        write(f, bytes(range(100)))
        os.truncate(f, 10)
        t.append(read(f))
        os.truncate(f, 50)                                  # grows with zeros, not the old bytes
        t.append(read(f))
        with open(f, "r+b") as fh:
            fh.seek(5 * MiB)
            fh.write(b"Z")
        b = read(f)
        t.append((len(b), b[:10], b[10:5 * MiB] == bytes(5 * MiB - 10), b[-1:]))
        fd = os.open(base / "g", os.O_CREAT | os.O_RDWR, 0o644)    # ftruncate over unflushed writes
        os.write(fd, b"abcdef")
        os.ftruncate(fd, 3)
        os.pwrite(fd, b"g", 6)
        t.append((os.pread(fd, 100, 0), os.fstat(fd).st_size))
        os.close(fd)
        t.append(read(base / "g"))
        big = base / "big"
        write(big, data)
        os.truncate(big, CHUNK + 10)                       # cuts inside the second chunk, frees the third
        os.truncate(big, 9 * MiB)
        b = read(big)
        t.append((len(b), b[:CHUNK + 10] == data[:CHUNK + 10], b[CHUNK + 10:] == bytes(9 * MiB - CHUNK - 10)))
        write(big, b"small")                               # O_TRUNC of a multi-chunk file
        t.append((read(big), big.stat().st_size))
        os.truncate(big, 0)
        t.append((read(big), big.stat().st_size))
        t.append(outcome(os.truncate, base, 0))
        t.append(outcome(os.truncate, f, -1))
        sh("truncate", "-s", "+1M", "g", cwd=base)
        sh("truncate", "-s", "-1", "f", cwd=base)
        t.append((os.stat(base / "g").st_size, os.stat(f).st_size, read(f)[-2:]))
        return t

    same_on_both(scenario, *dirs)


def test_sparse_file_past_4_gib(dirs):
    def scenario(base: Path):
        f = base / "sparse"
        fd = os.open(f, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            os.pwrite(fd, b"start", 0)
            os.pwrite(fd, b"[4G]", 4 * GiB - 2)            # straddles the 32-bit boundary
            os.pwrite(fd, b"END", 5 * GiB)
        finally:
            os.close(fd)
        t = [f.stat().st_size]
        with open(f, "rb") as fh:
            for off, n in ((0, 8), (GiB, 4096), (4 * GiB - 6, 12), (4 * GiB + 2, 64 << 10), (5 * GiB - 16, 32)):
                fh.seek(off)
                t.append((off, fh.read(n)))
        t.append(sh("tail", "-c", "7", str(f)))            # another program, seeking from the end
        t.append(sh("dd", f"if={f}", "bs=1", f"skip={4 * GiB - 2}", "count=4", "status=none"))
        os.truncate(f, 4 * GiB + 1)
        t.append((f.stat().st_size, sh("tail", "-c", "3", str(f))))
        return t

    got = same_on_both(scenario, *dirs)
    assert got[0] == 5 * GiB + 3 and got[-1] == (4 * GiB + 1, "[4G")


# -- permissions and ownership ---------------------------------------------------------------------


def _as_nobody(base: Path) -> list:
    """What uid 65534 may do in a tree root made (see test_permissions_for_a_non_root_user)."""
    t = []
    t.append(read(base / "public"))
    t.append(outcome(open, base / "public", "ab"))
    t.append(outcome(os.truncate, base / "public", 0))
    t.append(outcome(read, base / "private"))
    t.append(outcome(os.chmod, base / "public", 0o666))
    t.append(outcome(os.chown, base / "public", NOBODY, NOBODY))
    t.append(outcome(os.utime, base / "public", (1, 1)))            # explicit times: the owner only
    t.append(outcome(os.utime, base / "public"))                    # "now": needs write permission
    t.append(outcome(os.utime, base / "shared"))                    # ...which a 0666 file gives
    t.append(outcome(os.unlink, base / "public"))                   # root's 0755 directory
    t.append(outcome(open, base / "mine", "w"))
    t.append(outcome(os.listdir, base / "closed"))
    t.append(outcome(os.stat, base / "closed" / "x"))
    tmp = base / "tmp"
    write(tmp / "mine", b"nobody's")
    st = (tmp / "mine").stat()
    t.append((st.st_uid, st.st_gid, oct(st.st_mode)))
    os.mkdir(tmp / "mydir", 0o700)
    st = (tmp / "mydir").stat()
    t.append((st.st_uid, st.st_gid, oct(st.st_mode)))
    os.chmod(tmp / "mine", 0o600)
    t.append(oct((tmp / "mine").stat().st_mode))
    t.append(outcome(os.chown, tmp / "mine", 0, 0))                 # giving a file away
    t.append(outcome(os.chown, tmp / "mine", NOBODY, 0))            # to a group one is not in
    t.append(outcome(os.unlink, tmp / "roots"))                     # sticky: another's file
    t.append(outcome(os.rename, tmp / "roots", tmp / "taken"))
    t.append(outcome(os.rename, tmp / "mine", tmp / "roots"))       # nor replace it
    t.append(outcome(read, tmp / "roots"))
    os.rename(tmp / "mine", tmp / "mine2")
    os.utime(tmp / "mine2", (1, 2))
    t.append(((tmp / "mine2").stat().st_mtime, sorted(os.listdir(tmp))))
    os.unlink(tmp / "mine2")
    with open(base / "setid", "ab") as f:                           # writing drops set-user/group-ID
        f.write(b"more")
    t.append(oct((base / "setid").stat().st_mode))
    return t


def test_permissions_for_a_non_root_user(dirs):
    def scenario(base: Path):
        base.chmod(0o755)
        write(base / "public", b"root's")
        (base / "public").chmod(0o644)
        write(base / "private", b"secret")
        (base / "private").chmod(0o600)
        write(base / "shared", b"anyone may write")
        (base / "shared").chmod(0o666)
        (base / "closed").mkdir(mode=0o700)
        (base / "tmp").mkdir()
        (base / "tmp").chmod(0o1777)
        write(base / "tmp" / "roots", b"root's, in /tmp")
        (base / "tmp" / "roots").chmod(0o666)                       # writable, yet not removable
        write(base / "setid", b"")
        (base / "setid").chmod(0o6777)
        write(base / "suid", b"")
        (base / "suid").chmod(0o4755)
        status, out = run_as(NOBODY, lambda: print(repr(_as_nobody(base))) or 0)
        assert status == 0, out.decode(errors="replace")
        t = ast.literal_eval(out.decode())
        # Root still may: remove the user's directory from the sticky one, change any owner.
        os.rmdir(base / "tmp" / "mydir")
        os.chown(base / "public", NOBODY, NOBODY)
        os.chown(base / "suid", NOBODY, NOBODY)                     # a new owner: no set-user-ID
        t.append(((base / "public").stat().st_uid, sorted(os.listdir(base / "tmp")),
                  oct((base / "suid").stat().st_mode)))
        return t

    got = same_on_both(scenario, *dirs)
    assert got[1] == "EACCES" and got[4] == "EPERM" and got[13] == (NOBODY, NOBODY, "0o100644")


def test_a_set_group_id_directory_passes_its_group_on(dirs):
    def scenario(base: Path):
        d = base / "proj"
        d.mkdir()
        os.chown(d, 0, 4242)
        d.chmod(0o2777)
        status, out = run_as(NOBODY, lambda: (write(d / "f", b"x"), os.mkdir(d / "sub"), 0)[-1])
        assert status == 0, out
        f, sub = (d / "f").stat(), (d / "sub").stat()
        return [(f.st_uid, f.st_gid), (sub.st_uid, sub.st_gid, oct(sub.st_mode))]

    assert same_on_both(scenario, *dirs) == [(NOBODY, 4242), (NOBODY, 4242, "0o42755")]


# -- times, fsync, mmap, O_APPEND ------------------------------------------------------------------


def _after(ns: int) -> None:
    """Wait until the clock is past `ns` by more than ext4's timestamp granularity (a jiffy)."""
    wait_for(lambda: time.time_ns() > ns + 20_000_000, 2, what="the clock to move on")


def test_timestamps(dirs, kdfs):
    def scenario(base: Path):
        t = []
        f = base / "f"
        write(f, b"one")
        st0 = f.stat()
        _after(st0.st_mtime_ns)
        write(f, b"two", "ab")
        st1 = f.stat()
        t.append(("write moves mtime and ctime", st1.st_mtime_ns > st0.st_mtime_ns,
                  st1.st_ctime_ns > st0.st_ctime_ns))
        _after(st1.st_ctime_ns)
        f.chmod(0o600)
        st2 = f.stat()
        t.append(("chmod moves ctime only", st2.st_mtime_ns == st1.st_mtime_ns, st2.st_ctime_ns > st1.st_ctime_ns))
        os.utime(f, ns=(1_000_000_123, 2_000_000_456))
        st = f.stat()
        t.append((st.st_atime_ns, st.st_mtime_ns))
        sh("touch", "-d", "2001-02-03 04:05:06.5 UTC", str(f))
        t.append(f.stat().st_mtime_ns)
        sh("touch", "-a", "-d", "1999-01-01 00:00 UTC", str(f))
        st = f.stat()
        t.append((st.st_atime_ns, st.st_mtime_ns))
        before = time.time_ns()
        sh("touch", str(f))                                  # UTIME_NOW
        t.append(f.stat().st_mtime_ns >= before - 20_000_000)
        # Times set on an open file after writing it (cp -p, tar, rsync) stay once it is closed.
        fd = os.open(base / "g", os.O_CREAT | os.O_WRONLY, 0o644)
        os.write(fd, b"data" * 1000)
        os.utime(fd, ns=(3_000_000_000, 4_000_000_000))
        os.close(fd)
        t.append((base / "g").stat().st_mtime_ns)
        write(base / "src", b"copied")
        os.utime(base / "src", (5, 6))
        sh("cp", "-p", "src", "dst", cwd=base)
        t.append((base / "dst").stat().st_mtime_ns)
        d0 = base.stat()
        _after(d0.st_mtime_ns)
        write(base / "new", b"")
        d1 = base.stat()
        _after(d1.st_mtime_ns)
        os.unlink(base / "new")
        d2 = base.stat()
        t.append(("entries move the directory's mtime", d1.st_mtime_ns > d0.st_mtime_ns,
                  d2.st_mtime_ns > d1.st_mtime_ns))
        t.append(sh("stat", "-c", "%Y", "g", "dst", cwd=base))  # a fresh process sees the same
        return t

    kd, _ = dirs
    same_on_both(scenario, *dirs)
    # The daemons hold the same times as the kernel shows (not only its attribute cache).
    with kdfs.client() as c:
        d = c.query("lookup", parent=1, name=kd.name.encode())["ino"]
        for name, want in (("g", 4_000_000_000), ("dst", 6_000_000_000), ("f", os.stat(kd / "f").st_mtime_ns)):
            assert c.query("lookup", parent=d, name=name.encode())["mtime_ns"] == want, name


def test_fsync(dirs, kdfs):
    kd, _ = dirs
    data = pattern(6 * MiB, 7)
    fd = os.open(kd / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
        # Acknowledged: the daemons already hold the size and the chunk map, every chunk on R nodes,
        # while the file is still open.
        with kdfs.client() as c:
            ino = os.fstat(fd).st_ino
            assert c.query("getattr", ino=ino)["size"] == len(data)
            chunks = c.query("chunks", ino=ino)
            assert [ch["length"] for ch in chunks] == [CHUNK, len(data) - CHUNK]
            assert all(len(ch["nodes"]) == 2 for ch in chunks), chunks
        os.write(fd, b"tail")
        os.fdatasync(fd)
    finally:
        os.close(fd)
    assert read(kd / "f") == data + b"tail"
    dfd = os.open(kd, os.O_RDONLY | os.O_DIRECTORY)     # fsync of a directory, as careful programs do
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    sh("sync", str(kd / "f"))


def test_mmap_reads_and_writes(dirs, kdfs):
    def scenario(base: Path):
        t = []
        f = base / "m"
        write(f, pattern(CHUNK + 8192, 3))
        with open(f, "r+b") as fh:
            m = mmap.mmap(fh.fileno(), 0)
            t.append((m[:4] == pattern(4, 3), len(m)))
            m[0:5] = b"HELLO"
            m[CHUNK - 2:CHUNK + 3] = b"12345"                # across a chunk boundary
            m[-3:] = b"end"
            m.flush()
            m.close()
        t.append(read(f)[:5] + read(f)[CHUNK - 2:CHUNK + 3] + read(f)[-3:])
        # A fresh process (its own open) sees the mapped writes.
        t.append(sh(sys.executable, "-c", "import sys; d=open(sys.argv[1],'rb').read(); "
                    "print(d[:5], d[-3:], len(d))", str(f)))
        fd = os.open(f, os.O_RDWR)                           # a mapping that is not msync'ed
        m = mmap.mmap(fd, 4096)
        m[100:104] = b"MMAP"
        m.close()
        os.close(fd)
        t.append(read(f)[100:104])
        # A shared mapping read by another process while this one writes into it.
        with open(f, "r+b") as fh:
            m = mmap.mmap(fh.fileno(), 0)
            m[8:12] = b"SHRD"
            t.append(sh(sys.executable, "-c", "import mmap,sys; f=open(sys.argv[1],'rb'); "
                        "m=mmap.mmap(f.fileno(),0,prot=mmap.PROT_READ); print(m[8:12])", str(f)))
            m.close()
        return t

    same_on_both(scenario, *dirs)
    kd, _ = dirs
    assert stored(kdfs, kd / "m") == read(kd / "m")


APPENDER = textwrap.dedent("""
    import os, sys
    fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    for i in range(int(sys.argv[3])):
        os.write(fd, f"{sys.argv[2]} {i:06d}\\n".encode())
    os.close(fd)
""")


def test_o_append_from_two_processes(dirs, kdfs):
    def scenario(base: Path):
        log = base / "log"
        write(log, b"first line\n")
        procs = [subprocess.Popen([sys.executable, "-c", APPENDER, str(log), tag, "2000"]) for tag in "AB"]
        assert [p.wait(timeout=120) for p in procs] == [0, 0]
        sh("sh", "-c", "echo from-shell >> log", cwd=base)
        lines = read(log).decode().splitlines()
        return [len(lines), lines[0], lines[-1], len(set(lines)),
                [line for line in lines if line.startswith("A")] == [f"A {i:06d}" for i in range(2000)],
                [line for line in lines if line.startswith("B")] == [f"B {i:06d}" for i in range(2000)]]

    assert same_on_both(scenario, *dirs)[:4] == [4002, "first line", "from-shell", 4002]
    kd, _ = dirs
    assert stored(kdfs, kd / "log") == read(kd / "log")


# -- names, big directories, deep trees ------------------------------------------------------------


def test_names_with_any_byte_but_slash_and_nul(dirs):
    every = bytes(b for b in range(1, 256) if b != ord("/"))
    names = [every[i:i + 16] for i in range(0, len(every), 16)] + [           # every byte, in some name
        bytes([b]) for b in b"\x01\n\t -*?\\'\"~\x7f\x80\xff"] + [
        b"...", b".hidden", b"with space", b"new\nline", b"\xff\xfe not utf-8 \x80", "é日本語🙂".encode(),
        b"-starts-with-dash", b"*?[glob]", b"x" * 255, every[:255], every[-255:]]

    def scenario(base: Path):
        b = os.fsencode(base)
        t = []
        for n in names:
            write(b + b"/" + n, n)
        t.append(sorted(os.listdir(b)) == sorted(names))
        t.append(all(read(b + b"/" + n) == n for n in names))
        os.mkdir(b + b"/" + b"d" * 255)
        os.symlink(b"x" * 255, b + b"/" + b"s" * 255)
        t.append(read(b + b"/" + b"s" * 255) == b"x" * 255)
        os.rename(b + b"/" + every[:255], b + b"/" + every[-255:][::-1])
        t.append(read(b + b"/" + every[-255:][::-1]) == every[:255])
        long = b + b"/" + b"y" * 256
        t.append([outcome(fn) for fn in (
            lambda: os.open(long, os.O_CREAT | os.O_WRONLY),
            lambda: os.mkdir(long),
            lambda: os.symlink(b"x", long),
            lambda: os.link(b + b"/" + b"x" * 255, long),
            lambda: os.rename(b + b"/" + b"x" * 255, long),
            lambda: os.stat(long),
            lambda: os.stat(b + b"/" + b"d" * 255 + b"/" + b"z" * 256),
        )])
        # Real programs list and remove them by name.
        found = subprocess.run(["find", ".", "-mindepth", "1", "-maxdepth", "1", "-print0"], cwd=b,
                               capture_output=True, check=True).stdout.split(b"\0")
        t.append(sorted(f[2:] for f in found if f) == sorted(os.listdir(b)))
        subprocess.run(["find", ".", "-mindepth", "1", "-maxdepth", "1", "-type", "f", "-delete"], cwd=b, check=True)
        t.append(sorted(os.listdir(b)))
        return t

    same_on_both(scenario, *dirs)


def test_deep_tree(dirs):
    depth = 100

    def scenario(base: Path):
        path = base
        for i in range(depth):
            path = path / f"level{i:03d}"
        path.mkdir(parents=True)
        write(path / "leaf", b"at the bottom")
        os.symlink("../" * depth + "top", path / "to-top")
        write(base / "top", b"top")
        t = [read(path / "leaf"), read(path / "to-top"), len(str(path.relative_to(base)))]
        t.append(sh("find", ".", "-name", "leaf", cwd=base).count("/"))
        t.append(sum(len(d) for _, d, _ in os.walk(base)))
        # cwd deep inside and relative paths up the tree.
        t.append(sh("sh", "-c", "cat leaf ../" + "../" * (depth - 1) + "top", cwd=path))
        os.mkdir(base / "other")
        sh("mv", "level000", "other/", cwd=base)              # the whole tree, one rename
        t.append(read(base / "other" / path.relative_to(base) / "leaf"))
        t.append(outcome(os.rename, base / "other", path.parent.parent))    # into itself, 100 levels down
        sh("rm", "-r", "other", cwd=base)
        t.append(sorted(os.listdir(base)))
        return t

    same_on_both(scenario, *dirs)


def test_readdir_of_many_entries(dirs, kdfs):
    kd, _ = dirs
    n = READDIR_ENTRIES
    names = [f"entry-{i:06d}" for i in range(n)]
    through_mount = min(n, 1000)

    # The first thousand through the mount, as a program would make them; the rest, to keep CI's
    # time, through the client API with sixteen creators (the same metadata change, without FUSE).
    t0 = time.monotonic()
    for name in names[:through_mount]:
        os.mknod(kd / name, 0o644 | stat.S_IFREG)
    FIGURES["mount_creates_per_s"] = round(through_mount / (time.monotonic() - t0), 1)
    ino = os.stat(kd).st_ino

    def create(part: list[str]) -> None:
        with kdfs.client() as c:
            for name in part:
                c.change("mknod", parent=ino, name=name.encode(), mode=stat.S_IFREG | 0o644, uid=0, gid=0, rdev=0)

    rest = names[through_mount:]
    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as ex:
        list(ex.map(create, [rest[i::16] for i in range(16)]))
    if rest:
        FIGURES["api_creates_per_s"] = round(len(rest) / (time.monotonic() - t0), 1)
    FIGURES["readdir_entries"] = n

    t0 = time.monotonic()
    listed = os.listdir(kd)
    FIGURES["listdir_s"] = round(time.monotonic() - t0, 2)
    assert len(listed) == n and sorted(listed) == names
    t0 = time.monotonic()
    with os.scandir(kd) as it:                          # readdirplus: every entry with its inode
        entries = {e.name: e.inode() for e in it}
    FIGURES["scandir_s"] = round(time.monotonic() - t0, 2)
    assert len(entries) == n and len(set(entries.values())) == n
    assert os.stat(kd / names[n // 2]).st_ino == entries[names[n // 2]]
    # Real programs: ls (sorts everything, "." and ".." too), find (streams getdents).
    t0 = time.monotonic()
    ls = sh("ls", "-a", cwd=kd, env={"LC_ALL": "C"}).split()
    FIGURES["ls_a_s"] = round(time.monotonic() - t0, 2)
    assert ls == [".", "..", *names]
    assert int(sh("sh", "-c", "find . -type f | wc -l", cwd=kd)) == n
    # rewinddir shows the directory as it is now.
    fd = os.open(kd, os.O_RDONLY | os.O_DIRECTORY)
    try:
        first = os.listdir(fd)
        os.mknod(kd / "zz-late", 0o644 | stat.S_IFREG)
        os.lseek(fd, 0, os.SEEK_SET)
        assert sorted(os.listdir(fd)) == sorted([*first, "zz-late"])
    finally:
        os.close(fd)
    # Entries removed while listing: none is listed twice, none of those left is missed.
    with os.scandir(kd) as it:
        seen = []
        for i, e in enumerate(it):
            if i < 100:
                os.unlink(kd / names[3 * i])
            seen.append(e.name)
    assert len(seen) == len(set(seen))
    assert set(names) - {names[3 * i] for i in range(100)} <= set(seen)
    assert len(os.listdir(kd)) == n + 1 - 100


# -- space ----------------------------------------------------------------------------------------


def test_statfs_reports_the_cluster(kdfs):
    df = json.loads(kdfs.cluster.run("kdfs", "df", "--json").stdout)
    st = os.statvfs(kdfs.mp)
    nodes = df["nodes"]
    assert sorted(nodes) == ["1", "2", "3"]
    total = df["total"]
    for k in ("total", "free", "avail"):
        assert total[k] == sum(u[k] for u in nodes.values()), k
    # Each node contributes its own disk (here all three share the machine's one).
    disk = os.statvfs(kdfs.cluster.home.kdfs_disk(1))
    for u in nodes.values():
        assert u["total"] == disk.f_blocks * disk.f_frsize
    assert st.f_frsize == 4096 and st.f_namemax == 255
    assert st.f_blocks == total["total"] // 4096
    # Free space moves with what the machine's other programs write: compare with some slack.
    slack = 0.02 * total["total"]
    assert abs(st.f_bfree * 4096 - total["free"]) < slack
    assert abs(st.f_bavail * 4096 - total["avail"]) < slack
    assert st.f_bavail <= st.f_bfree <= st.f_blocks and st.f_ffree > 0
    out = sh("df", "-B1", "--output=fstype,size,avail,target", str(kdfs.mp)).splitlines()[1].split()
    assert out[0] == "fuse.kdfs" and int(out[1]) == st.f_blocks * 4096 and out[3] == str(kdfs.mp)
    assert abs(int(out[2]) - total["avail"]) < slack


# -- real workloads, each against the same run on the local disk -----------------------------------


@pytest.fixture(scope="module")
def source_tarball(kdfs):
    """A tarball of this project's C and Python sources, plus a symlink, a hard link, a script
    and an empty directory."""
    stage = kdfs.local / "tarball-stage" / "src"
    files = sh("git", "ls-files", "-z", "csrc", "kerrighed", "kdfs", "scheduler", "checkpoint",
               cwd=Path(__file__).parent.parent).split("\0")
    for f in filter(None, files):
        src = Path(__file__).parent.parent / f
        if src.is_file():
            (stage / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, stage / f)
    (stage / "empty").mkdir()
    os.symlink("csrc/crc32c.c", stage / "link-to-c")
    os.link(stage / "csrc" / "crc32c.c", stage / "hardlink.c")
    write(stage / "run.sh", b"#!/bin/sh\necho ran\n")
    (stage / "run.sh").chmod(0o755)
    os.chown(stage / "run.sh", 1000, 1000)
    tarball = kdfs.local / "src.tar.gz"
    sh("tar", "-czf", str(tarball), "-C", str(stage.parent), "src")
    shutil.rmtree(stage.parent)
    return tarball


def test_untar_a_source_tree(dirs, source_tarball):
    timings = {}

    def scenario(base: Path):
        t0 = time.monotonic()
        sh("tar", "-xzf", str(source_tarball), "-C", str(base))
        timings[base] = time.monotonic() - t0
        m = manifest(base / "src")
        # Archiving it again gives the same bytes (names sorted: readdir orders differ).
        again = hashlib.sha256(subprocess.run(["tar", "--sort=name", "-cf", "-", "src"], cwd=base,
                                              capture_output=True, check=True).stdout).hexdigest()
        run = sh("./src/run.sh", cwd=base)
        return [m, again, run]

    kd, ld = dirs
    m, _, _ = same_on_both(scenario, kd, ld)
    assert len(m) > 40 and m["csrc/crc32c.c"]["same_as"] == "hardlink.c" and m["run.sh"]["uid"] == 1000
    FIGURES["untar_s"] = round(timings[kd], 2)
    FIGURES["untar_local_s"] = round(timings[ld], 3)


def _c_project(base: Path, modules: int = 8) -> None:
    (base / "proj").mkdir()
    p = base / "proj"
    decls = "".join(f"int f{i}(int);\n" for i in range(modules))
    write(p / "p.h", decls.encode())
    for i in range(modules):
        write(p / f"f{i}.c", f'#include "p.h"\nint f{i}(int x) {{ return x * {i + 2} + {i}; }}\n'.encode())
    calls = " + ".join(f"f{i}({i})" for i in range(modules))
    write(p / "main.c", f'#include <stdio.h>\n#include "p.h"\nint main(void) {{ printf("%d\\n", {calls}); '
                        f'return 0; }}\n'.encode())
    objs = " ".join(["main.o", *(f"f{i}.o" for i in range(modules))])
    write(p / "Makefile", textwrap.dedent(f"""\
        OBJS = {objs}
        prog: $(OBJS)
        \t$(CC) -o $@ $(OBJS)
        %.o: %.c p.h
        \t$(CC) -O2 -c $< -o $@
        clean:
        \trm -f prog $(OBJS)
        """).encode())


def test_build_a_c_project_with_make(dirs):
    timings = {}

    def scenario(base: Path):
        _c_project(base)
        p = base / "proj"
        t0 = time.monotonic()
        built = sh("make", "-j2", cwd=p)
        timings[base] = time.monotonic() - t0
        t = [sorted(built.splitlines()), sh("./prog", cwd=p)]
        t.append(sh("make", cwd=p))                      # nothing to do: the times are right
        _after(max(f.stat().st_mtime_ns for f in p.iterdir()))
        sh("touch", "f3.c", cwd=p)
        t.append(sh("make", cwd=p))                      # one object, then the link
        write(p / "f3.c", b'#include "p.h"\nint f3(int x) { return -x; }\n')
        sh("make", cwd=p)
        t.append(sh("./prog", cwd=p))
        sh("make", "clean", cwd=p)
        t.append(sorted(os.listdir(p)))
        return t

    got = same_on_both(scenario, *dirs)
    assert got[2] == "make: 'prog' is up to date.\n" and len(got[3].splitlines()) == 2
    kd, ld = dirs
    FIGURES["make_s"] = round(timings[kd], 2)
    FIGURES["make_local_s"] = round(timings[ld], 2)


def test_git(dirs):
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.org", "GIT_AUTHOR_DATE": "2020-01-01T00:00:00Z",
           "GIT_COMMITTER_DATE": "2020-01-01T00:00:00Z", "GIT_CONFIG_NOSYSTEM": "1", "HOME": "/nonexistent"}
    timings = {}

    def git(*args, cwd):
        return sh("git", "-c", "init.defaultBranch=main", *args, cwd=cwd, env=env)

    def scenario(base: Path):
        t0 = time.monotonic()
        _c_project(base)
        repo = base / "proj"
        git("init", "-q", "--template=", cwd=repo)
        git("add", "-A", cwd=repo)
        git("commit", "-q", "-m", "first", cwd=repo)
        write(repo / "f1.c", b"int f1(int x) { return x; }\n")
        os.unlink(repo / "f2.c")
        write(repo / "README", b"a file added later\n")
        git("add", "-A", cwd=repo)
        git("commit", "-q", "-m", "second", cwd=repo)
        # Identical objects on both: the same commit ids.
        t = [git("log", "--format=%H %s", cwd=repo), git("status", "--porcelain", cwd=repo),
             git("diff", "--stat", "HEAD~1", cwd=repo)]
        git("fsck", "--full", "--strict", cwd=repo)
        git("gc", "-q", cwd=repo)                            # packs: written then mmap'ed
        git("fsck", "--full", "--strict", cwd=repo)
        git("clone", "-q", str(repo), str(base / "clone"), cwd=base)    # a local clone hard-links objects
        git("fsck", "--full", cwd=base / "clone")
        t.append(git("log", "--format=%H", cwd=base / "clone"))
        t.append(sh("git", "show", "HEAD:f1.c", cwd=base / "clone"))
        timings[base] = time.monotonic() - t0
        return t

    got = same_on_both(scenario, *dirs)
    assert got[0].count("\n") == 2 and got[1] == ""
    kd, ld = dirs
    FIGURES["git_s"] = round(timings[kd], 2)
    FIGURES["git_local_s"] = round(timings[ld], 2)


def test_sqlite3(dirs, kdfs):
    sql = ["CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, n INTEGER);", "CREATE INDEX t_n ON t(n);"]
    for b in range(10):                                     # 10,000 rows in ten transactions
        sql.append("BEGIN;")
        sql += [f"INSERT INTO t(v, n) VALUES ('row{b * 1000 + i}', {(b * 1000 + i) * 7 % 1000});"
                for i in range(1000)]
        sql.append("COMMIT;")
    sql += ["UPDATE t SET n = n + 1 WHERE id % 10 = 0;", "DELETE FROM t WHERE id % 100 = 1;",
            "SELECT count(*), sum(n), max(v) FROM t;", "SELECT n, count(*) FROM t GROUP BY n ORDER BY n LIMIT 3;",
            "PRAGMA integrity_check;"]
    script = "\n".join(sql)
    timings = {}

    def scenario(base: Path):
        t = []
        for journal in ("delete", "wal"):
            db = base / f"{journal}.db"
            t0 = time.monotonic()
            t.append(sh("sqlite3", "-bail", "-cmd", f"PRAGMA journal_mode={journal};", str(db), input=script))
            timings[(base, journal)] = time.monotonic() - t0
            # Another process, later: the same data, a sound file, the same dump.
            t.append(sh("sqlite3", str(db), "PRAGMA integrity_check; SELECT count(*), sum(n) FROM t;"))
            t.append(hashlib.sha256(sh("sqlite3", str(db), ".dump").encode()).hexdigest())
        return t

    got = same_on_both(scenario, *dirs)
    assert got[0].endswith("ok\n") and got[1].startswith("ok\n9900|"), got
    kd, ld = dirs
    assert stored(kdfs, kd / "delete.db") == read(kd / "delete.db")
    FIGURES["sqlite_delete_s"] = round(timings[(kd, "delete")], 2)
    FIGURES["sqlite_wal_s"] = round(timings[(kd, "wal")], 2)
    FIGURES["sqlite_delete_local_s"] = round(timings[(ld, "delete")], 2)


def test_fsck_is_clean_and_no_copy_is_left_behind(kdfs):
    r = kdfs.cluster.run("kdfs", "fsck", "--json", check=False)
    report = json.loads(r.stdout)
    assert r.returncode == 0 and report["ok"], report["problems"][:10]
    # fsck leaves copies younger than a minute alone (uploads in flight); with every file closed
    # there is none in flight, so every copy on every node's disk belongs to some file.
    home = kdfs.cluster.home

    def unreferenced() -> dict[int, list[str]]:
        out = {}
        with kdfs.client() as c:
            for n in (1, 2, 3):
                held = [p.name for p in (home.kdfs_disk(n) / "store" / "chunks").glob("*/*")]
                out[n] = [i for i in held if c.query("chunk", id=i) is None]
        return out if any(out.values()) else None

    for _ in range(100):                    # freed copies are deleted in the background
        left = unreferenced()
        if left is None:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"copies no file references: {left}")


# -- persistence ----------------------------------------------------------------------------------


def test_data_and_metadata_survive_a_full_restart(cluster):
    home = cluster.home
    mp = home.kdfs_mountpoint(home.load_config())
    port = home.load_config().nodes[1].port
    root = mp / "keep"
    root.mkdir()
    write(root / "small", b"small file\n")
    write(root / "big", pattern(9 * MiB + 17, 11))
    fd = os.open(root / "synced", os.O_CREAT | os.O_WRONLY, 0o640)
    os.write(fd, b"fsync'ed")
    os.fsync(fd)
    os.close(fd)
    write(root / "empty", b"")
    (root / "a" / "b" / "c").mkdir(parents=True)
    write(root / "a" / "b" / "c" / "deep", b"deep")
    os.symlink("a/b/c/deep", root / "link")
    os.link(root / "small", root / "a" / "hard")
    os.chown(root / "a", NOBODY, NOBODY)
    (root / "a").chmod(0o2750)
    os.utime(root / "small", ns=(1_000_000_000, 2_000_000_000))
    fd = os.open(mp / "sparse", os.O_CREAT | os.O_WRONLY, 0o644)      # outside the manifest: 5 GiB to hash
    os.pwrite(fd, b"far", 5 * GiB)
    os.close(fd)
    write(root / "renamed-from", b"renamed")
    os.rename(root / "renamed-from", root / "renamed")
    write(root / "gone", b"deleted")
    os.unlink(root / "gone")
    before = manifest(root, inodes=True)

    cluster.krgadm("cluster", "stop")
    assert not kdfs_mount.mounted(mp)
    assert not localcluster.running_nodes(home)
    cluster.krgadm("cluster", "start", "--local", "3", "--port", str(port))
    assert kdfs_mount.mounted(mp)

    after = manifest(root, inodes=True)
    assert after == before
    assert read(root / "a" / "hard") == b"small file\n" and (root / "small").stat().st_nlink == 2
    assert (mp / "sparse").stat().st_size == 5 * GiB + 3
    with open(mp / "sparse", "rb") as f:
        f.seek(5 * GiB - 3)
        assert f.read() == b"\0\0\0far"
    # And it goes on: new writes, a clean fsck.
    write(root / "after-restart", b"new")
    assert read(root / "after-restart") == b"new"
    r = cluster.run("kdfs", "fsck", "--json", check=False)
    assert r.returncode == 0 and json.loads(r.stdout)["ok"], r.stdout[-2000:]
