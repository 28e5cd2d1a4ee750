"""The RESTORER of `krg-init --restore`: restores a dumped krg-init job onto the new shepherd's fds.

    krg-init --ctl SOCK [--pty] --restore -- python -m checkpoint.restorer --images DIR [--pty]

krg-init runs this with the job's new ends at fixed fds: pipes: 3 stdin's read end, 4 stdout's
and 5 stderr's write ends, 6 the status pipe's write end, 7 stdin's write end; pty: 3 the slave,
6 the status pipe. They replace the dumped init's fds 0, 1, 2 and 3 (CRIU inherit-fd keys read
from the images). The unread stdin CRIU saved is written into the new stdin first (CRIU does not
put it into an inherited pipe). The answer is one line on stdout, `restored PID` (the restored
init, in our PID namespace, our child until we exit: krg-init, a child subreaper, then owns it)
or `error MESSAGE` with exit status 1. docs/criu-notes.md has the background.
"""
import argparse
import fcntl
import os
import shutil
import stat
import sys
import tempfile

from checkpoint import criu

STDIN, STDOUT, STDERR, STATUS, STDIN_W = 3, 4, 5, 6, 7


class Refused(Exception):
    """Images or fds this restorer cannot use."""


def inherit_map(images, pty: bool) -> tuple[str, dict[str, int]]:
    """The dumped stdin's key, and {CRIU key: our fd} for the dumped init's fds 0-3."""
    keys = criu.root_fd_keys(images)
    missing = [fd for fd in range(4) if fd not in keys]
    if missing:
        raise Refused(f"the dumped init has no pipe or terminal on fd {missing[0]}: "
                      "not a krg-init job's images")
    if not keys[3].startswith("pipe:"):
        raise Refused(f"the dumped init's fd 3 is {keys[3]}, not its status pipe")
    is_tty = keys[0].startswith("tty[")
    if is_tty != pty:
        raise Refused(f"the images are of a {'pty' if is_tty else 'pipes'} job: "
                      f"{'--pty is needed' if is_tty else 'drop --pty'}")
    if pty:
        if keys[1] != keys[0] or keys[2] != keys[0]:
            raise Refused(f"the dumped init's fds 0-2 are not one terminal: {keys}")
        want = {keys[0]: STDIN, keys[3]: STATUS}
    else:
        if len({keys[fd] for fd in range(4)}) != 4:
            raise Refused(f"the dumped init's fds 0-3 are not four pipes: {keys}")
        want = {keys[0]: STDIN, keys[1]: STDOUT, keys[2]: STDERR, keys[3]: STATUS}
    for key, fd in want.items():
        try:
            mode = os.fstat(fd).st_mode
        except OSError as e:
            raise Refused(f"fd {fd} (for {key}): {e.strerror}: run by krg-init --restore?") from None
        if not (stat.S_ISCHR(mode) if key.startswith("tty[") else stat.S_ISFIFO(mode)):
            raise Refused(f"fd {fd} (for {key}) is not a {'terminal' if pty else 'pipe'}")
    return keys[0], want


def reinject_stdin(data: bytes) -> None:
    """Write the saved unread stdin into the new pipe. Nobody reads it before the restore, so it
    must fit in the pipe: it fitted in the old one (64 KiB unless the job grew it)."""
    if data:
        if len(data) > fcntl.fcntl(STDIN_W, fcntl.F_GETPIPE_SZ):
            fcntl.fcntl(STDIN_W, fcntl.F_SETPIPE_SZ, len(data))  # OSError if too big for us
        view = memoryview(data)
        while view:
            view = view[os.write(STDIN_W, view):]
    os.close(STDIN_W)  # the shepherd keeps its own copy


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="checkpoint.restorer", description=__doc__.split("\n")[0])
    p.add_argument("--images", required=True, help="the dumped job's CRIU images")
    p.add_argument("--pty", action="store_true", help="the job had a pty (krg-init --pty)")
    p.add_argument("--work-dir", help="where CRIU's restore.log goes (default: a temp dir, kept "
                   "only on failure)")
    p.add_argument("--timeout", type=float, default=120.0, help="give CRIU that long (seconds)")
    args = p.parse_args(argv)
    work = args.work_dir
    try:
        work = work or tempfile.mkdtemp(prefix="krg-restore-")
        stdin_key, want = inherit_map(args.images, args.pty)
        if not args.pty:
            reinject_stdin(criu.pipe_data(args.images).get(stdin_key, b""))
        pid = criu.restore(args.images, inherit_fds=want, sibling=True, work_dir=work,
                           timeout=args.timeout)
    except Exception as e:  # anything at all: one line for krg-init
        if not isinstance(e, (Refused, criu.CriuError)):  # a damaged image, an OSError...
            e = f"{type(e).__name__}: {e}"
        print("error " + " ".join(str(e).split()), flush=True)
        if work and not args.work_dir and not os.listdir(work):  # a log CRIU wrote stays
            os.rmdir(work)
        return 1
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    print(f"restored {pid}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
