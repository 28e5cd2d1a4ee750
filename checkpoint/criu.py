"""CRIU through its RPC: `criu swrk`, spoken with pycriu's protobuf messages.

Everything CRIU-specific (and every pycriu quirk) lives here; the rest of the project sees
`check`, `dump`, `pre_dump`, `restore`, `CriuError` and a few image readers. Nothing here parses
CRIU's command-line output: requests and answers are pycriu's `rpc_pb2` messages, statistics,
fd keys and pipe contents come from CRIU's images. docs/criu-notes.md records what was measured.

pycriu quirks, and what is done instead:
- `criu.use_binary()` forks the caller and execs `criu swrk FD` from Python in the child, after
  *closing* fds 0, 1 and 2 (an fd to inherit must not be one of them, and CRIU's own files land
  there); an exec failure raises in the forked copy of the caller; and Python's fds are
  close-on-exec (PEP 446), so an fd reaches CRIU only if made inheritable first. Here `criu swrk`
  is started with subprocess instead: no Python code in the child, stdio on /dev/null, and
  `pass_fds` carrying exactly the RPC socket and the inherit_fds (their flags in the caller are
  left alone). CRIU is still a direct child of the caller, which `sibling=True` relies on.
- `criu.check()` sends no options and CRIU's service refuses a request without an images
  directory, so CHECK always fails through it; its exceptions keep the errno but drop the
  answer's `cr_errmsg`. So requests are built and exchanged here (one send, one recv on the
  SOCK_SEQPACKET socket, as pycriu does), with pycriu's `rpc_pb2` classes.
- `images_dir_fd` (and `work_dir_fd`) are read by CRIU as /proc/<caller>/fd/N (the socket's
  SO_PEERCRED pid): O_DIRECTORY fds open in this process, not inherited. `parent_img` is a path
  relative to the images dir. `log_file` is a bare name, written in the work dir.
- `pycriu.images.load()` fails with protobuf 7 (pb2dict reads FieldDescriptor.label): images are
  read with pycriu's message classes and magic table, but framed here (`_load_image`).
"""
from __future__ import annotations

import dataclasses
import fcntl
import os
import shutil
import socket
import stat
import struct
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from kerrighed.errors import KrgError

DEFAULT_BINARY = "/usr/local/sbin/criu"
LOG_LEVEL = 4  # CRIU's debug level: the log is the only account of what went wrong
LOG_TAIL = 40  # lines of the log kept in CriuError.log


class CriuError(KrgError):
    """A CRIU request failed. The message is one line (CRIU's first error, which names the
    cause); `log` holds the tail of the log CRIU wrote, for the daemon's own log."""

    def __init__(self, message: str, log: str = ""):
        super().__init__(" ".join(message.split()))
        self.log = log


def _pycriu():
    """pycriu, imported on first use: krgd imports this module even on a node without CRIU."""
    try:
        import pycriu
    except ImportError as e:
        raise CriuError(f"CRIU's Python bindings (pycriu) are not installed: {e}") from None
    return pycriu


def criu_binary() -> str:
    """$KRG_CRIU, else `criu` on PATH, else /usr/local/sbin/criu (where the install puts it)."""
    return os.environ.get("KRG_CRIU") or shutil.which("criu") or DEFAULT_BINARY


@dataclasses.dataclass(frozen=True)
class DumpStats:
    """CRIU's `stats-dump` image of one dump or pre-dump. Times in microseconds; None where CRIU
    wrote no statistics. `frozen_time` is how long the tree was stopped: migration's figure."""

    images_dir: str
    freezing_time: int | None = None
    frozen_time: int | None = None
    memdump_time: int | None = None
    memwrite_time: int | None = None
    pages_scanned: int | None = None
    pages_skipped_parent: int | None = None
    pages_written: int | None = None
    pages_lazy: int | None = None


@dataclasses.dataclass(frozen=True)
class RestoreStats:
    """CRIU's `stats-restore` image. Times in microseconds."""

    forking_time: int | None = None
    restore_time: int | None = None
    pages_restored: int | None = None
    pages_compared: int | None = None
    pages_skipped_cow: int | None = None


# ---- running criu swrk --------------------------------------------------------------------


# Errors CRIU logs on every run here and survives (PLATFORM.md): never the cause of a failure.
HARMLESS_ERRORS = ("rlimit: Can't setup RLIMIT_NOFILE",)


def _first_error(log: str) -> str | None:
    """The text of CRIU's first `Error (file:line): text` line that is not a harmless one: the
    cause (the later ones are the unwinding). CRIU's own answer carries its first error line
    (cr_errmsg) too, but that is the harmless RLIMIT_NOFILE complaint here."""
    for line in log.splitlines():
        _, sep, rest = line.partition("Error (")
        if sep:
            text = rest.partition("): ")[2].strip() or rest.strip()
            if not text.startswith(HARMLESS_ERRORS):
                return text
    return None


def _error(what: str, log_path: Path | None, detail: str) -> CriuError:
    try:
        log = log_path.read_text(errors="replace") if log_path else ""
    except OSError:
        log = ""
    cause = _first_error(log) or detail
    where = f" (log: {log_path})" if log else ""
    return CriuError(f"criu {what} failed: {cause}{where}", "\n".join(log.splitlines()[-LOG_TAIL:]))


class _Swrk:
    """One `criu swrk` child, for one request.

    `fds` are fds of the caller CRIU must have open (the inherit_fd ones): they reach CRIU under
    the same numbers through pass_fds. A request that gets no answer within `timeout` seconds
    kills criu (as a last resort: a tree CRIU was working on may be left stopped or damaged).
    """

    def __init__(self, fds: Iterable[int] = (), timeout: float | None = None):
        self.rpc = _pycriu().rpc
        binary = criu_binary()
        if not os.access(binary, os.X_OK):
            raise CriuError(f"criu not found or not executable: {binary} (set KRG_CRIU)")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [binary, "swrk", str(theirs.fileno())],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(), *fds), close_fds=True)
        except OSError as e:
            ours.close()
            raise CriuError(f"cannot run {binary}: {e.strerror}") from None
        finally:
            theirs.close()
        ours.settimeout(timeout)
        self.sock = ours

    def request(self, req_type, opts=None, **fields):
        """Send one request, return CRIU's answer (a criu_resp), or None if CRIU gave none
        (it died, or the timeout ran out)."""
        req = self.rpc.criu_req()
        req.type = req_type
        if opts is not None:
            req.opts.MergeFrom(opts)
        for name, value in fields.items():
            getattr(req, name).MergeFrom(value)
        try:
            self.sock.send(req.SerializeToString())
            size = len(self.sock.recv(1, socket.MSG_TRUNC | socket.MSG_PEEK))
            buf = self.sock.recv(size)
        except OSError:  # socket.timeout included
            return None
        if not buf:
            return None
        resp = self.rpc.criu_resp()
        resp.ParseFromString(buf)
        return resp

    def close(self) -> None:
        """Closing our end makes swrk exit; one that does not (a request we gave up on) is
        killed. After a restore, the restored tree is no child of swrk's any more."""
        self.sock.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _opts(rpc, images_fd: int, log_name: str, work_fd: int | None = None):
    """The options every request carries."""
    if not log_name or "/" in log_name:
        raise ValueError(f"log_name must be a plain file name: {log_name!r}")
    o = rpc.criu_opts()
    o.images_dir_fd = images_fd
    o.log_file = log_name
    o.log_level = LOG_LEVEL
    if work_fd is not None:
        o.work_dir_fd = work_fd
    return o


def _run(what: str, req_type: str, opts_of, images_dir, log_name: str, *,
         work_dir=None, fds: Iterable[int] = (), timeout: float | None = None):
    """Open the directories, run criu swrk with the request whose options opts_of(opts) fills in, and
    return the answer; a failure raises CriuError with CRIU's first error and its log."""
    log_path = Path(work_dir if work_dir is not None else images_dir, log_name)
    fd = _open_dir(images_dir)
    wfd = None
    try:
        if work_dir is not None:
            wfd = _open_dir(work_dir)
        with _Swrk(fds=fds, timeout=timeout) as swrk:
            opts = _opts(swrk.rpc, fd, log_name, wfd)
            opts_of(opts)
            resp = swrk.request(getattr(swrk.rpc, req_type), opts)
    finally:
        os.close(fd)
        if wfd is not None:
            os.close(wfd)
    if resp is None:
        raise _error(what, log_path, "criu swrk died or did not answer in time")
    if not resp.success:
        detail = (f"error {resp.cr_errno} ({os.strerror(resp.cr_errno)})" if resp.cr_errno
                  else resp.cr_errmsg or "no reason given")
        raise _error(what, log_path, detail)
    return resp


def _open_dir(path: str | os.PathLike) -> int:
    try:
        return os.open(path, os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise CriuError(f"cannot open the directory {os.fspath(path)}: {e.strerror}") from None


# ---- the requests --------------------------------------------------------------------------


def _ask(req_type: str, timeout: float | None, **fields):
    """A request that needs only a scratch directory (CHECK, FEATURE_CHECK)."""
    with tempfile.TemporaryDirectory(prefix="krg-criu-") as tmp:
        fd = _open_dir(tmp)
        try:
            with _Swrk(timeout=timeout) as swrk:
                kw = {k: v(swrk.rpc) for k, v in fields.items()}
                return swrk.request(getattr(swrk.rpc, req_type),
                                    _opts(swrk.rpc, fd, "check.log"), **kw)
        finally:
            os.close(fd)


def check(*, timeout: float | None = 60) -> bool:
    """Whether CRIU works here: its CHECK request (`criu check`: kernel features it needs)."""
    try:
        resp = _ask("CHECK", timeout)
    except (CriuError, OSError):
        return False
    return bool(resp is not None and resp.success)


def can_track_memory(*, timeout: float | None = 60) -> bool:
    """Whether pre-dumps (memory tracking: the kernel's soft-dirty bits) work here. CRIU's
    FEATURE_CHECK request; a kernel built without CONFIG_MEM_SOFT_DIRTY says no."""
    def features(rpc):
        f = rpc.criu_features()
        f.mem_track = True
        return f
    try:
        resp = _ask("FEATURE_CHECK", timeout, features=features)
    except (CriuError, OSError):
        return False
    return bool(resp is not None and resp.success and resp.features.mem_track)


def _dump_opts(o, pid: int, images_dir, parent_dir) -> None:
    o.pid = pid
    if parent_dir is not None:
        # CRIU opens the parent relative to the images dir, links it there as `parent`, and
        # warns that an absolute path may not work on restore.
        o.parent_img = os.path.relpath(os.path.realpath(parent_dir), os.path.realpath(images_dir))


def _run_dump(what, pid, req_type, fill, images_dir, log_name, timeout) -> None:
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        cwd = None
    try:
        _run(what, req_type, fill, images_dir, log_name, timeout=timeout)
    except CriuError as e:
        # The dump of a PID namespace's init: CRIU's parasite mkdir()s `proc.crtools` in that
        # process's cwd to mount a /proc of the namespace there. Name the place.
        if "Can't create a directory" in str(e) and cwd:
            head, sep, tail = str(e).partition(" (log: ")
            hint = (f": mkdir {os.path.join(cwd, 'proc.crtools')} (the cwd of the tree's root) "
                    "failed: read-only, or used by another dump at the same time")
            raise CriuError(head + hint + sep + tail, e.log) from None
        raise


def dump(pid: int, images_dir: str | os.PathLike, *, leave_running: bool = False,
         parent_dir: str | os.PathLike | None = None, track_mem: bool = False,
         shell_job: bool = False, external: Iterable[str] = (), log_name: str = "dump.log",
         timeout: float | None = None) -> DumpStats:
    """Dump the process tree rooted at pid (for a job: C1, its PID namespace's init) into
    images_dir, which must exist. The tree is killed afterwards unless leave_running.

    parent_dir: the last pre-dump (with track_mem): pages unchanged since are not written again.
    shell_job: allow a terminal whose master is outside the tree (a pty job; see the notes).
    external: CRIU `--external` keys, e.g. "tty[88:3]" for a pty slave to inherit at restore.
    Pipes whose other end is outside the tree need nothing (docs/criu-notes.md).
    """
    images_dir = os.fspath(images_dir)
    external = list(external)

    def fill(o):
        _dump_opts(o, pid, images_dir, parent_dir)
        o.leave_running = leave_running
        if track_mem:
            o.track_mem = True
        if shell_job:
            o.shell_job = True
        o.external.extend(external)

    _run_dump(f"dump of pid {pid}", pid, "DUMP", fill, images_dir, log_name, timeout)
    return dump_stats(images_dir)


def pre_dump(pid: int, images_dir: str | os.PathLike, *,
             parent_dir: str | os.PathLike | None = None, log_name: str = "pre-dump.log",
             timeout: float | None = None) -> DumpStats:
    """A pre-dump (memory only; the tree keeps running) with memory tracking, for iterative
    pre-copy: each pre-dump into its own directory, parent_dir the previous one; the final
    `dump(..., parent_dir=last, track_mem=True)` then writes only the pages dirtied since.
    Needs the kernel's soft-dirty tracking: see can_track_memory()."""
    images_dir = os.fspath(images_dir)

    def fill(o):
        _dump_opts(o, pid, images_dir, parent_dir)
        o.track_mem = True  # CRIU enforces it for a pre-dump anyway

    _run_dump(f"pre-dump of pid {pid}", pid, "PRE_DUMP", fill, images_dir, log_name, timeout)
    return dump_stats(images_dir)


def restore(images_dir: str | os.PathLike, *, inherit_fds: Mapping[str, int] | None = None,
            detached: bool = True, sibling: bool = False, shell_job: bool = False,
            log_name: str = "restore.log", work_dir: str | os.PathLike | None = None,
            timeout: float | None = None) -> int:
    """Restore the tree dumped in images_dir; returns its root's pid in the caller's PID
    namespace. A tree dumped from a PID namespace's init is restored into a new namespace.

    inherit_fds: {CRIU key: fd open in this process}; the restored tree gets a dup of that fd
    wherever it had the dumped file. Keys: "pipe:[INODE]" for a pipe, "tty[RDEV:DEV]" (hex)
    for a terminal; fd_key() computes them before the dump, root_fd_keys() from the images.
    An inherited pipe does not get the data CRIU saved from the old one: see pipe_data().
    sibling: the restored root is created as the caller's child (CLONE_PARENT from criu swrk,
    itself our child), so the caller can waitpid() it. Without it its parent is criu swrk,
    which exits: the root then goes to the caller only if the caller is a child subreaper (it is
    an ancestor of criu), else to init.
    detached: CRIU's RPC always restores detached (cr-service.c forces it); False is refused.
    work_dir: where the log and stats-restore go (default: the images dir).
    """
    if not detached:
        raise ValueError("CRIU's RPC restores detached only: use sibling=True to be the parent")
    images_dir = os.fspath(images_dir)
    inherit_fds = dict(inherit_fds or {})
    for key, fd in inherit_fds.items():
        if fd < 0 or not isinstance(fd, int):
            raise ValueError(f"inherit_fds[{key!r}]: not an fd: {fd!r}")
        try:
            os.fstat(fd)
        except OSError as e:
            raise CriuError(f"inherit fd {fd} for {key}: {e.strerror}") from None

    # fds 0-2 cannot be passed as themselves: criu's stdio is /dev/null. Pass a dup (>= 3).
    low = {fd: fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3) for fd in set(inherit_fds.values()) if fd < 3}

    def fill(o):
        for key, fd in inherit_fds.items():
            entry = o.inherit_fd.add()
            entry.key = key
            entry.fd = low.get(fd, fd)

    def fill_all(o):
        fill(o)
        # The restored tree joins the cgroups of whoever restores it (criu swrk's), not those it
        # was dumped in: CRIU would otherwise put it back into (and re-create) the cgroups of the
        # node that dumped it, e.g. that node's CPU-limited one (kerrighed.cgroups).
        o.manage_cgroups_mode = _pycriu().rpc.IGNORE
        if sibling:
            o.rst_sibling = True
        if shell_job:
            o.shell_job = True

    try:
        resp = _run(f"restore from {images_dir}", "RESTORE", fill_all, images_dir, log_name,
                    work_dir=work_dir, fds={low.get(fd, fd) for fd in inherit_fds.values()},
                    timeout=timeout)
    finally:
        for dup in low.values():
            os.close(dup)
    return int(resp.restore.pid)


# ---- reading images ------------------------------------------------------------------------


def _load_image(path: Path) -> list | None:
    """The entries of a CRIU protobuf image as protobuf messages (None if there is no such
    file); a pipes-data entry comes as (entry, its bytes).

    pycriu.images.load() cannot be used: its pb2dict reads FieldDescriptor.label, which the
    protobuf releases this project installs (7.x) no longer have. So only pycriu's tables are
    used here (magic numbers, the message class of each image) and the framing is read here:
    magic (after an IMG_COMMON/IMG_SERVICE magic), then (u32 size, message) pairs."""
    images = _pycriu().images
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    magic = images.magic
    pos = 4
    (m,) = struct.unpack_from("i", data, 0)
    if m in (magic.by_name["IMG_COMMON"], magic.by_name["IMG_SERVICE"]):
        (m,) = struct.unpack_from("i", data, 4)
        pos = 8
    name = magic.by_val.get(m)
    handler = images.images.handlers.get(name)
    if handler is None or not hasattr(handler, "payload"):
        raise CriuError(f"{path}: not a CRIU image this module reads (magic {m:#x})")
    entries = []
    while pos < len(data):
        (size,) = struct.unpack_from("i", data, pos)
        msg = handler.payload()
        msg.ParseFromString(data[pos + 4:pos + 4 + size])
        pos += 4 + size
        if name == "PIPES_DATA":
            entries.append((msg, data[pos:pos + msg.bytes]))
            pos += msg.bytes
        elif handler.extra_handler is not None:
            raise CriuError(f"{path}: image {name} has payloads this module does not read")
        else:
            entries.append(msg)
    return entries


def dump_stats(images_dir: str | os.PathLike) -> DumpStats:
    """The `stats-dump` image of a dump or pre-dump (all None if CRIU wrote none)."""
    entries = _load_image(Path(images_dir, "stats-dump"))
    d = entries[0].dump if entries and entries[0].HasField("dump") else None
    fields = [f.name for f in dataclasses.fields(DumpStats) if f.name != "images_dir"]
    return DumpStats(os.fspath(images_dir), **{k: _field(d, k) for k in fields})


def restore_stats(work_dir: str | os.PathLike) -> RestoreStats:
    """The `stats-restore` image CRIU leaves in the restore's work dir."""
    entries = _load_image(Path(work_dir, "stats-restore"))
    d = entries[0].restore if entries and entries[0].HasField("restore") else None
    return RestoreStats(**{f.name: _field(d, f.name) for f in dataclasses.fields(RestoreStats)})


def _field(msg, name: str) -> int | None:
    if msg is None or not msg.HasField(name):
        return None
    return int(getattr(msg, name))


def fd_key(pid: int, fd: int) -> str:
    """CRIU's inherit-fd key for fd of a live process: "pipe:[INODE]" for a pipe (what
    /proc/PID/fd/FD says), "tty[RDEV:DEV]" in hex for a terminal. Take them before the dump."""
    link = os.readlink(f"/proc/{pid}/fd/{fd}")
    if link.startswith("pipe:["):
        return link
    st = os.stat(f"/proc/{pid}/fd/{fd}")
    if stat.S_ISCHR(st.st_mode):
        return f"tty[{st.st_rdev:x}:{st.st_dev:x}]"
    raise ValueError(f"fd {fd} of {pid} is neither a pipe nor a terminal: {link}")


def root_fd_keys(images_dir: str | os.PathLike) -> dict[int, str]:
    """{fd: inherit-fd key} of the dumped tree's root, for its pipes and terminals, read from
    the images (pstree, ids, fdinfo, files, tty-info): what a restorer must supply."""
    d = Path(images_dir)
    pstree = _load_image(d / "pstree.img")
    if not pstree:
        raise CriuError(f"no pstree.img in {images_dir}: not a CRIU dump")
    root = pstree[0].pid
    ids = _load_image(d / f"ids-{root}.img")
    files_id = ids[0].files_id if ids else root
    fdinfo = _load_image(d / f"fdinfo-{files_id}.img") or []
    files = {f.id: f for f in _load_image(d / "files.img") or []}
    ttys = {t.id: t for t in _load_image(d / "tty-info.img") or []}
    keys = {}
    for e in fdinfo:
        f = files.get(e.id)
        if f is None:
            continue
        if f.HasField("pipe"):
            keys[e.fd] = f"pipe:[{f.pipe.pipe_id}]"
        elif f.HasField("tty") and f.tty.tty_info_id in ttys:
            t = ttys[f.tty.tty_info_id]
            keys[e.fd] = f"tty[{t.rdev:x}:{t.dev:x}]"
    return keys


def pipe_data(images_dir: str | os.PathLike) -> dict[str, bytes]:
    """{"pipe:[INODE]": bytes} of the pipes whose read end was in the dumped tree and held
    unread data (pipes-data.img). CRIU copies it at dump (tee: the pipe keeps it) and writes it
    into the pipes it creates at restore, but NOT into an inherited pipe: a restorer that
    inherits a job's stdin must write these bytes into the new pipe itself, or they are lost."""
    return {f"pipe:[{e.pipe_id}]": data
            for e, data in _load_image(Path(images_dir, "pipes-data.img")) or []}


__all__ = [
    "CriuError", "DumpStats", "RestoreStats", "check", "criu_binary", "dump", "dump_stats",
    "fd_key", "pipe_data", "pre_dump", "restore", "restore_stats", "root_fd_keys",
]
