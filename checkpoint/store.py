"""Kerrighed's versioned checkpoint store: <root>/<appid>/v<N>/ (root: /var/chkpt by default).

    <root>/<appid>/v<N>.partial/       a checkpoint being written (or abandoned by a crash)
    <root>/<appid>/v<N>/               a committed one: renamed from .partial once complete
        description.txt                Identifier, Version, Description, Date (Kerrighed's lines)
        node<NODE>/job<GPID>/job.json  what restart needs to know of the job besides CRIU's images
        node<NODE>/job<GPID>/images/   CRIU's images of the job's tree (C1 and below)

A version appears under its final name only once every file in it is on disk (fsync) and
description.txt is written: readers never see half a checkpoint. The number of a version is one
more than the highest one present, committed or partial, so that two checkpoints of one
application started at once (or a partial some crash left) never share a directory; a number
whose checkpoint failed is not reused. Only kerrighed.errors is imported from the project.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from kerrighed.errors import KrgError

DEFAULT_ROOT = "/var/chkpt"
DESCRIPTION = "description.txt"
JOB_META = "job.json"
IMAGES = "images"
NO_DESCRIPTION = "No description"
CTIME = "%a %b %d %H:%M:%S %Y"  # C's ctime(3), without its newline; %d pads with a space there

_VERSION = re.compile(r"v([1-9][0-9]*)")
_PARTIAL = re.compile(r"v([1-9][0-9]*)\.partial")
_NODE = re.compile(r"node(0|[1-9][0-9]*)")
_JOB = re.compile(r"job([1-9][0-9]*)")


class CheckpointNotFound(KrgError):
    """No such application or version in the checkpoint store."""


class CheckpointCorrupted(KrgError):
    """A version's files cannot be read (Kerrighed: "invalid checkpoint files")."""


def ctime(when: float | None = None) -> str:
    """C's ctime() without the newline: 'Thu Nov  5 09:03:01 2026' (day padded with a space)."""
    return time.asctime(time.localtime(when))


def format_description(appid: int, version: int, description: str | None, date: str) -> str:
    """The four lines Kerrighed's `checkpoint` prints, and description.txt holds."""
    return (f"Identifier: {appid}\nVersion: {version}\n"
            f"Description: {_one_line(description) or NO_DESCRIPTION}\nDate: {date}\n")


def _one_line(text: str | None) -> str:
    # The file is read back line by line: a description never spans lines.
    return " ".join((text or "").split("\n")).strip() if text else ""


@dataclass(frozen=True)
class VersionMeta:
    """description.txt, parsed."""

    appid: int
    version: int
    description: str | None  # None for "No description"
    date: str                # as written (ctime format)

    @property
    def when(self) -> datetime:
        return datetime.strptime(" ".join(self.date.split()), CTIME)

    def text(self) -> str:
        return format_description(self.appid, self.version, self.description, self.date)


@dataclass
class JobMeta:
    """What restart needs of a job besides its CRIU images (job.json).

    fds: the job's fds whose other end was outside the dump, and CRIU's inherit-fd key of each
    (checkpoint.criu.fd_key), e.g. {0: "pipe:[123]", 1: "pipe:[124]", 2: "pipe:[125]",
    3: "pipe:[126]"} for a pipe job (3 is the status pipe of krg-init), {0: "tty[8800:1a]", ...}
    for a pty job. Restore maps each key to the matching end of a new pipe or pty.
    """

    gpid: int
    argv: list[str]
    uid: int
    gid: int
    cwd: str
    node: int
    app: int | None = None
    caps: Any = None
    tty: bool = False
    fds: dict[int, str] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # room for what later versions add

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["fds"] = {str(k): v for k, v in self.fds.items()}  # JSON keys are strings
        return d

    @classmethod
    def from_dict(cls, d: dict) -> JobMeta:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        known["fds"] = {int(k): v for k, v in (known.get("fds") or {}).items()}
        return cls(**known)


class JobDir:
    """node<NODE>/job<GPID>/ inside a version."""

    def __init__(self, path: Path, node: int, gpid: int):
        self.path, self.node, self.gpid = path, node, gpid

    @property
    def images(self) -> Path:
        """CRIU's images directory for this job (dump into it, restore from it)."""
        return self.path / IMAGES

    def write_meta(self, meta: JobMeta) -> None:
        if (meta.node, meta.gpid) != (self.node, self.gpid):
            raise ValueError(f"job.json of job {meta.gpid} on node {meta.node} "
                             f"written in {self.path}")
        tmp = self.path / (JOB_META + ".tmp")
        tmp.write_text(json.dumps(meta.to_dict(), indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.path / JOB_META)

    def meta(self) -> JobMeta:
        try:
            return JobMeta.from_dict(json.loads((self.path / JOB_META).read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise CheckpointCorrupted(f"invalid checkpoint files: {self.path / JOB_META}: {e}") from None

    def __repr__(self) -> str:
        return f"JobDir({str(self.path)!r})"


class Version:
    """One checkpoint of an application: committed (v<N>) or being written (v<N>.partial)."""

    def __init__(self, store: Store, appid: int, n: int, partial: bool):
        self.store, self.appid, self.n, self.partial = store, appid, n, partial
        self.aborted = False

    @property
    def path(self) -> Path:
        return self.store.app_dir(self.appid) / (f"v{self.n}.partial" if self.partial else f"v{self.n}")

    @property
    def final_path(self) -> Path:
        return self.store.app_dir(self.appid) / f"v{self.n}"

    def job(self, node: int, gpid: int, *, create: bool | None = None) -> JobDir:
        """node<NODE>/job<GPID>/ (with images/), created while the version is partial."""
        path = self.path / f"node{int(node)}" / f"job{int(gpid)}"
        if create is None:
            create = self.partial
        if create:
            self._check_partial("add a job to")
            (path / IMAGES).mkdir(parents=True, exist_ok=True)
        elif not path.is_dir():
            raise CheckpointNotFound(f"no job {gpid} of node {node} in checkpoint v{self.n} "
                                     f"of application {self.appid}")
        return JobDir(path, int(node), int(gpid))

    def jobs(self) -> list[JobDir]:
        """Every node<N>/job<GPID>/ of the version, by node then gpid."""
        out = []
        for node_dir in _subdirs(self.path, _NODE):
            for job_dir in _subdirs(node_dir[1], _JOB):
                out.append(JobDir(job_dir[1], node_dir[0], job_dir[0]))
        return out

    def commit(self, description: str | None = None, *, date: float | None = None,
               sync: bool = True) -> VersionMeta:
        """Write description.txt and rename v<N>.partial to v<N>. With sync (the default),
        every file and directory of the version reaches the disk first (CRIU does not fsync
        its images), then the rename, then the application's directory."""
        self._check_partial("commit")
        meta = VersionMeta(self.appid, self.n, _one_line(description) or None, ctime(date))
        desc = self.path / DESCRIPTION
        with open(desc, "w") as f:
            f.write(meta.text())
            if sync:
                f.flush()
                os.fsync(f.fileno())
        if sync:
            _fsync_tree(self.path)
        final = self.final_path
        if final.exists():  # rename() would replace an empty directory silently
            raise KrgError(f"checkpoint v{self.n} of application {self.appid} already exists")
        os.rename(self.path, final)
        self.partial = False
        if sync:
            _fsync_dir(final.parent)
        return meta

    def abort(self) -> None:
        """Remove the partial directory (a failed checkpoint leaves nothing behind)."""
        self._check_partial("abort")
        shutil.rmtree(self.path, ignore_errors=True)
        self.partial = False
        self.aborted = True

    def meta(self) -> VersionMeta:
        """description.txt, parsed; CheckpointCorrupted if it is missing or malformed."""
        path = self.path / DESCRIPTION
        try:
            return parse_description(path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointCorrupted(f"invalid checkpoint files: {path}: {e}") from None

    def _check_partial(self, what: str) -> None:
        if self.aborted:
            raise KrgError(f"cannot {what} checkpoint v{self.n} of application {self.appid}: "
                           "it was aborted")
        if not self.partial:
            raise KrgError(f"cannot {what} checkpoint v{self.n} of application {self.appid}: "
                           "it is not being written")

    def __repr__(self) -> str:
        return f"Version({str(self.path)!r})"


def parse_description(text: str) -> VersionMeta:
    """The lines of description.txt (or of `checkpoint`'s output) as a VersionMeta."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if sep and key in ("Identifier", "Version", "Description", "Date"):
            fields[key] = value.strip()
    missing = {"Identifier", "Version", "Description", "Date"} - fields.keys()
    if missing:
        raise ValueError(f"missing {', '.join(sorted(missing))}")
    desc = fields["Description"]
    return VersionMeta(int(fields["Identifier"]), int(fields["Version"]),
                       None if desc in ("", NO_DESCRIPTION) else desc, fields["Date"])


class Store:
    """The checkpoint store rooted at root (a directory every node can read)."""

    def __init__(self, root: str | os.PathLike = DEFAULT_ROOT):
        self.root = Path(root)

    def app_dir(self, appid: int) -> Path:
        if isinstance(appid, bool) or not isinstance(appid, int) or appid <= 0:
            raise ValueError(f"not an application id: {appid!r}")
        return self.root / str(appid)

    def new_version(self, appid: int) -> Version:
        """Create <root>/<appid>/v<N>.partial/, N one more than any version there (committed or
        partial). mkdir() is the lock: a number taken concurrently makes us try the next."""
        app = self.app_dir(appid)
        app.mkdir(parents=True, exist_ok=True)
        n = max(self._numbers(appid, partial=True) + self._numbers(appid), default=0) + 1
        while True:
            v = Version(self, appid, n, partial=True)
            try:
                if v.final_path.exists():
                    raise FileExistsError
                v.path.mkdir()
                return v
            except FileExistsError:
                n += 1

    def versions(self, appid: int) -> list[Version]:
        """The committed versions, oldest first; partial ones are not checkpoints."""
        return [Version(self, appid, n, partial=False) for n in self._numbers(appid)]

    def get(self, appid: int, n: int) -> Version:
        v = Version(self, appid, int(n), partial=False)
        if not v.path.is_dir():
            raise CheckpointNotFound(f"no checkpoint v{n} of application {appid}")
        return v

    def latest(self, appid: int) -> Version:
        vs = self.versions(appid)
        if not vs:
            raise CheckpointNotFound(f"no checkpoint of application {appid}")
        return vs[-1]

    def partials(self, appid: int) -> list[Version]:
        return [Version(self, appid, n, partial=True) for n in self._numbers(appid, partial=True)]

    def clean_partials(self, appid: int) -> list[int]:
        """Remove what checkpoints interrupted by a crash left (v<N>.partial); returns their
        numbers. Only for when no checkpoint of appid is in progress anywhere."""
        removed = []
        for v in self.partials(appid):
            shutil.rmtree(v.path, ignore_errors=True)
            removed.append(v.n)
        return removed

    def appids(self) -> list[int]:
        return [n for n, _ in _subdirs(self.root, re.compile(r"([1-9][0-9]*)"))]

    def _numbers(self, appid: int, partial: bool = False) -> list[int]:
        return [n for n, _ in _subdirs(self.app_dir(appid), _PARTIAL if partial else _VERSION)]


def _subdirs(path: Path, pattern: re.Pattern) -> list[tuple[int, Path]]:
    """(number, path) of the subdirectories of path whose whole name matches pattern, sorted."""
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return []
    out = []
    for e in entries:
        m = pattern.fullmatch(e.name)
        if m and e.is_dir(follow_symlinks=False):
            out.append((int(m.group(1)), Path(e.path)))
    return sorted(out, key=lambda t: t[0])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """fsync every regular file and directory under path, directories after their content."""
    for dirpath, _, filenames in os.walk(path, topdown=False):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p) or not os.path.isfile(p):
                continue  # CRIU's `parent` link of an incremental dump, sockets...
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))
