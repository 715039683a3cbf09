"""One ``fedpeft-hpc sweep`` command per sweep directory at a time (a second would plan from states the
first is changing, and start the same runs again): ``flock`` on ``DIR/.sweep.lock``; on a file system
without ``flock`` (some NFS and Lustre mounts) a directory ``DIR/.sweep.lock.d`` made atomically by
``mkdir`` and naming its holder, taken over when that process is gone.
"""

from __future__ import annotations

import fcntl
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from fedpeft_hpc.errors import UserError

log = logging.getLogger(__name__)


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """One sweep command per directory at a time (a second would start the same runs again). A
    directory this call created is removed again if the body fails before writing anything else."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory; give the sweep directory")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        f = open(out / ".sweep.lock", "w")
    except OSError as e:
        raise UserError(f"--out {out}: cannot create the sweep directory ({e.strerror or e})") from None
    with f:
        release = _lock(out, f)
        ok = False
        try:
            yield
            ok = True
        finally:
            release()
            if not ok and created and [p.name for p in out.iterdir()] == [".sweep.lock"]:
                (out / ".sweep.lock").unlink()
                out.rmdir()


BUSY = "another `fedpeft-hpc sweep` is working on {out} right now; nothing was planned or submitted, run it " \
       "again when that one is done"


def _lock(out: Path, f) -> Callable[[], None]:
    """``flock`` on ``DIR/.sweep.lock``; on a file system without it (some NFS and Lustre mounts), a
    directory ``DIR/.sweep.lock.d`` made atomically by ``mkdir`` and naming its holder. Returns the release."""
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return lambda: fcntl.flock(f, fcntl.LOCK_UN)
    except BlockingIOError:
        raise UserError(BUSY.format(out=out)) from None
    except OSError:  # ENOLCK, EOPNOTSUPP, ENOSYS: no flock here
        return _mkdir_lock(out)


def _mkdir_lock(out: Path) -> Callable[[], None]:
    import os
    import socket

    d, me = out / ".sweep.lock.d", f"{socket.gethostname()} {os.getpid()}"
    try:
        d.mkdir()
    except FileExistsError:
        try:
            host, pid = (d / "holder").read_text().split()
        except (OSError, ValueError):
            host, pid = "?", "?"
        gone = host == socket.gethostname() and pid.isdigit() and not Path(f"/proc/{pid}").exists()
        if not gone:
            raise UserError(BUSY.format(out=out) + f" (process {pid} on {host}; this file system has no flock: "
                            f"if that command is gone, remove {d})") from None
        log.warning("%s: taking over the sweep lock of process %s (gone)", out, pid)
    except OSError as e:
        raise UserError(f"--out {out}: cannot lock the sweep directory ({e.strerror or e})") from None
    (d / "holder").write_text(me)

    def release() -> None:
        (d / "holder").unlink(missing_ok=True)
        d.rmdir()

    return release
