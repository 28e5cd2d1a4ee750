"""KDFS with real daemons and a real FUSE mount: placement, node failures, corruption, full disks,
the mount's life cycle and the `kdfs` command.

Small chunks (256 KiB) and a low striping threshold keep the data small while every file still
spans many chunks.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from conftest import NOBODY, LocalCluster, run_as, wait_for
from kdfs import mount as kdfs_mount
from kdfs.client import KdfsClient
from kerrighed.errors import FsError
from kerrighed import localcluster
from kerrighed.config import KdfsConfig

pytestmark = pytest.mark.root

CHUNK = 256 << 10
STRIPE_AFTER = 1 << 20


def start_cluster(home, count: int = 3, replicas: int = 2, before_start=None, **kdfs) -> LocalCluster:
    port = localcluster.free_port([localcluster.local_address(n) for n in range(1, count + 1)], prefer_default=False)
    localcluster.ensure_config(home, count, port=port, kdfs=KdfsConfig(
        replicas=replicas, chunk_size=CHUNK, stripe_after=STRIPE_AFTER, **kdfs))
    if before_start:
        before_start(home)
    c = LocalCluster(home)
    c.krgadm("cluster", "start", "--local", str(count), "--port", str(port))
    return c


@pytest.fixture
def kdfs3(make_home):
    c = start_cluster(make_home())
    try:
        yield c
    finally:
        c.krgadm("cluster", "stop", check=False)
        c.stop_all()


def mnt(c: LocalCluster) -> Path:
    return c.home.kdfs_mountpoint(c.home.load_config())


def kdfs(c: LocalCluster, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return c.run("kdfs", *args, check=check)


def drop_caches() -> None:
    """Make the next reads go to the file system, not the kernel's page cache."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")


def fsck(c: LocalCluster) -> dict:
    return json.loads(kdfs(c, "fsck", "--json", check=False).stdout)


def chunk_file(c: LocalCluster, node: int, chunk_id: str) -> Path:
    return c.home.kdfs_disk(node) / "store" / "chunks" / chunk_id[:2] / chunk_id


def test_mounted_with_its_type_and_unmounted_at_stop_even_with_a_file_open(kdfs3):
    mp = mnt(kdfs3)
    line = next(l for l in Path("/proc/mounts").read_text().splitlines() if l.split()[1] == str(mp))
    assert line.split()[2] == "fuse.kdfs"
    (mp / "f").write_bytes(b"x" * 1000)
    with subprocess.Popen([sys.executable, "-c", "import sys; f = open(sys.argv[1], 'rb'); "
                           "print('open', flush=True); sys.stdin.read()", str(mp / "f")],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as holder:
        try:
            assert holder.stdout.readline().strip() == "open"
            kdfs3.krgadm("cluster", "stop")
            assert not kdfs_mount.mounted(mp)
            assert kdfs_mount.mount_pid(kdfs3.home) is None
        finally:
            holder.kill()


def test_copies_on_distinct_nodes_first_on_the_writers_node_then_striped(kdfs3):
    data = os.urandom(4 * STRIPE_AFTER)
    (mnt(kdfs3) / "big").write_bytes(data)
    st = json.loads(kdfs(kdfs3, "stat", "--json", str(mnt(kdfs3) / "big")).stdout)
    assert st["size"] == len(data)
    chunks = st["chunks"]
    assert len(chunks) == len(data) // CHUNK
    assert all(len(set(ch["nodes"])) == 2 for ch in chunks), chunks
    local = [ch for ch in chunks if ch["idx"] * CHUNK < STRIPE_AFTER]
    striped = [ch for ch in chunks if ch["idx"] * CHUNK >= STRIPE_AFTER]
    writer = 1                              # the node whose daemon serves the mount
    assert all(ch["nodes"][0] == writer for ch in local)
    assert {ch["nodes"][0] for ch in striped} == {1, 2, 3}
    drop_caches()
    assert (mnt(kdfs3) / "big").read_bytes() == data


def write_tree(root: Path) -> dict[str, bytes]:
    files = {}
    for i in range(12):
        d = root / f"d{i % 3}" / f"e{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        files[str((d / f"f{i}").relative_to(root))] = os.urandom(1000 + i * 97_000)
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    return files


def check_tree(root: Path, files: dict[str, bytes]) -> None:
    drop_caches()
    for rel, data in files.items():
        assert (root / rel).read_bytes() == data, rel


def test_kill_9_of_any_daemon_loses_nothing_and_copies_come_back(kdfs3):
    mp = mnt(kdfs3)
    files = write_tree(mp)
    kdfs3.kill(1)          # the leader, and the daemon the mount talks to
    check_tree(mp, files)
    files["after-kill"] = os.urandom(700_000)
    (mp / "after-kill").write_bytes(files["after-kill"])
    (mp / "d0" / "e0" / "f0").rename(mp / "moved")
    files["moved"] = files.pop("d0/e0/f0")
    check_tree(mp, files)
    kdfs3.start(1)         # comes back by itself, catches up with the new leader
    wait_for(lambda: kdfs3.online(2) == {1, 2, 3}, 20, "node 1 to rejoin")
    wait_for(lambda: fsck(kdfs3)["ok"], 60, "kdfs fsck to be clean after node 1's return")
    kdfs3.kill(2)          # another one: every chunk still has a live copy
    check_tree(mp, files)
    assert sorted(os.listdir(mp)) == sorted({"after-kill", "moved", "d0", "d1", "d2"})


def test_a_corrupt_copy_is_read_from_another_and_rewritten(kdfs3):
    mp = mnt(kdfs3)
    data = os.urandom(3 * CHUNK)
    (mp / "f").write_bytes(data)
    ch = json.loads(kdfs(kdfs3, "stat", "--json", str(mp / "f")).stdout)["chunks"][1]
    bad = chunk_file(kdfs3, ch["nodes"][0], ch["id"])      # the copy a reader tries first
    raw = bytearray(bad.read_bytes())
    raw[-5000] ^= 0xFF
    bad.write_bytes(raw)
    report = fsck(kdfs3)
    assert not report["ok"]
    assert [(p["kind"], p["chunk"]) for p in report["problems"]] == [("corrupt", ch["id"])]
    drop_caches()
    assert (mp / "f").read_bytes() == data
    wait_for(lambda: bad.read_bytes() != bytes(raw), 20, "the bad copy to be rewritten")
    assert fsck(kdfs3)["ok"]


RECORD = 64 << 10
WRITER = r"""
import os, struct, sys, zlib
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
for i in range(int(sys.argv[2])):
    body = os.urandom(%d - 8)
    os.write(fd, struct.pack("<II", i, zlib.crc32(body)) + body)
    os.fsync(fd)
    print(i, flush=True)
os.close(fd)
""" % RECORD


def test_a_daemon_killed_mid_write_keeps_every_fsynced_record(kdfs3):
    path = mnt(kdfs3) / "journal"
    with subprocess.Popen([sys.executable, "-c", WRITER, str(path), "120"], stdout=subprocess.PIPE, text=True) as w:
        synced = -1
        while synced < 30:
            synced = int(w.stdout.readline())
        kdfs3.kill(1)
        for line in w.stdout:
            synced = int(line)
        assert w.wait(120) == 0
    drop_caches()
    raw = path.read_bytes()
    assert len(raw) % RECORD == 0 and len(raw) // RECORD >= synced + 1
    for i in range(len(raw) // RECORD):
        rec = raw[i * RECORD:(i + 1) * RECORD]
        seq, crc = struct.unpack("<II", rec[:8])
        assert (seq, crc) == (i, zlib.crc32(rec[8:])), f"record {i} is damaged"
    kdfs3.start(1)
    wait_for(lambda: fsck(kdfs3)["ok"], 60, "kdfs fsck to be clean")


def test_a_node_back_after_the_log_moved_on_copies_the_metadata(make_home):
    c = start_cluster(make_home(), keep_log=20)
    try:
        mp = mnt(c)
        (mp / "before").write_bytes(b"b" * 1000)
        c.kill(3)
        wait_for(lambda: c.online(1) == {1, 2}, 10, "node 3 to be out")
        for i in range(60):
            (mp / f"dir{i}").mkdir()
        (mp / "before").unlink()
        c.start(3)
        wait_for(lambda: "copies node" in c.log(3), 30, "node 3 to copy the leader's metadata")
        with KdfsClient(c.home, node=3) as k:
            wait_for(lambda: _has(k, b"dir59"), 30, "node 3's replica to list the new directories")
            assert not _has(k, b"before")
        wait_for(lambda: fsck(c)["ok"], 60, "kdfs fsck to be clean")
    finally:
        c.krgadm("cluster", "stop", check=False)
        c.stop_all()


def _has(k: KdfsClient, name: bytes) -> bool:
    try:
        k.query("lookup", parent=1, name=name)
        return True
    except FsError:
        return False


def small_disks(size_mb: int):
    def mount_tmpfs(home):
        for n in home.local_nodes() or (1, 2, 3):
            store = home.kdfs_disk(n) / "store"
            store.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "kdfs-test", str(store)], check=True)
    return mount_tmpfs


def unmount_small_disks(home) -> None:
    for n in (1, 2, 3):
        subprocess.run(["umount", "-l", str(home.kdfs_disk(n) / "store")], capture_output=True)


def test_full_disks_give_enospc_and_never_lose_a_closed_file(make_home):
    home = make_home()
    home.path.joinpath("nodes").mkdir()
    c = start_cluster(home, before_start=small_disks(8))
    try:
        mp = mnt(c)
        kept: dict[str, bytes] = {}
        error = None
        for i in range(30):
            data = os.urandom(2 << 20)
            try:
                with open(mp / f"f{i}", "wb") as f:
                    f.write(data)
            except OSError as e:
                error = e
                break
            kept[f"f{i}"] = data
        assert error is not None and error.errno == errno.ENOSPC, error
        # 3 x 8 MiB of disks: 2 copies of each chunk while two nodes have room, then one
        assert 5 <= len(kept) <= 11
        drop_caches()
        for name, data in kept.items():
            assert (mp / name).read_bytes() == data
        assert {p["kind"] for p in fsck(c)["problems"]} <= {"under-replicated"}
    finally:
        c.krgadm("cluster", "stop", check=False)
        c.stop_all()
        unmount_small_disks(home)


def test_kdfs_df_stat_and_fsck_for_root_and_users(kdfs3):
    mp = mnt(kdfs3)
    (mp / "root-file").write_bytes(b"r" * 300_000)
    shared = mp / "shared"
    shared.mkdir(mode=0o1777)
    shared.chmod(0o1777)
    # Figures travel with heartbeats: wait for the new chunks to show.
    df = wait_for(lambda: (d := json.loads(kdfs(kdfs3, "df", "--json").stdout))["total"]["chunks"] >= 4 and d,
                  10, "kdfs df to count the new chunks")
    assert set(df["nodes"]) == {"1", "2", "3"}
    assert df["total"]["total"] == sum(u["total"] for u in df["nodes"].values())
    assert df["total"]["chunks"] == sum(u["chunks"] for u in df["nodes"].values())
    assert df["replicas"] == 2 and df["leader"] == 1
    assert "root-file" not in kdfs(kdfs3, "df").stdout and "TOTAL" in kdfs(kdfs3, "df").stdout.upper()

    from kerrighed.cli import kdfs as kdfs_cli

    def as_user() -> int:
        (shared / "mine").write_bytes(b"u" * 1000)
        args = ["--home", str(kdfs3.home.path)]
        assert kdfs_cli.main([*args, "stat", "--json", str(shared / "mine")]) == 0
        assert kdfs_cli.main([*args, "stat", str(mp / "root-file")]) == 1
        assert kdfs_cli.main([*args, "fsck"]) == 1
        return 0

    status, out = run_as(NOBODY, as_user)
    assert status == 0, out.decode()
    text = out.decode()
    assert '"size": 1000' in text
    assert text.count("permission denied") == 2
    r = kdfs(kdfs3, "stat", str(mp.parent / "elsewhere"), check=False)
    assert r.returncode == 2 and "is not in KDFS" in r.stderr and len(r.stderr.splitlines()) == 1
    assert kdfs(kdfs3, "fsck").stdout.strip().endswith("clean")


def test_the_python_api_and_the_mount_see_the_same_files(kdfs3):
    from kdfs.files import Kdfs

    mp = mnt(kdfs3)
    data = os.urandom(3 * CHUNK + 12345)
    with Kdfs(kdfs3.home) as fs:
        fs.makedirs("/store/app/v1")
        fs.write_bytes("/store/app/v1/image.tmp", data)
        fs.rename("/store/app/v1/image.tmp", "/store/app/v1/image")
        assert fs.listdir("/store/app/v1") == ["image"]
        (mp / "store" / "from-mount").write_bytes(b"m" * 5000)
        assert fs.read_bytes("/store/from-mount") == b"m" * 5000
        assert fs.stat("/store/app/v1/image")["size"] == len(data)
        assert not fs.exists("/store/nothing") and not fs.exists("/store/from-mount/x")
        with pytest.raises(FsError) as e:
            fs.read_bytes("/store/app")
        assert e.value.errno == errno.EISDIR
        fs.write_bytes("/store/app/v1/image", b"short")      # replaces the content
        fs.remove("/store/from-mount")
    drop_caches()
    assert (mp / "store" / "app" / "v1" / "image").read_bytes() == b"short"
    assert sorted(os.listdir(mp / "store")) == ["app"]


def test_a_file_unlinked_while_open_goes_at_the_next_mount_if_the_mount_went_first(kdfs3):
    mp = mnt(kdfs3)
    f = open(mp / "doomed", "wb")
    try:
        f.write(os.urandom(100_000))
        f.flush()
        os.fsync(f.fileno())
        (mp / "doomed").unlink()
        orphans = lambda: json.loads(kdfs(kdfs3, "df", "--json").stdout)["files"]["orphans"]
        assert orphans() == 1
        kdfs3.krgadm("cluster", "stop")
    finally:
        try:
            f.close()
        except OSError:
            pass        # its mount is gone
    kdfs3.krgadm("cluster", "start", "--local", "3")
    wait_for(lambda: orphans() == 0, 30, "the new mount to release the old one's orphan")
    wait_for(lambda: json.loads(kdfs(kdfs3, "df", "--json").stdout)["total"]["chunks"] == 0, 10,
             "its chunks to be freed")
