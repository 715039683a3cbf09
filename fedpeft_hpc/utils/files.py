"""Files of a run, written so that a crash or a signal never leaves a torn one.

``atomic_write`` writes a temporary file next to the target, fsyncs it, renames it over the
target and fsyncs the directory, so after a power loss or a SIGKILL the path holds either the
old or the new content. The result gets the mode an ordinary ``open()`` would give under the
caller's umask (``mkstemp`` creates 0600 files, which a colleague in the same group could not
read on a shared cluster file system). Directories are made with ``mkdir`` and thus honour
the umask too.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from fedpeft_hpc.errors import UserError


def expand_path(path: str | os.PathLike) -> Path:
    """``~`` and ``$VARS`` expanded (cluster paths such as ``$SCRATCH/cifar`` or ``/data/rank$LOCAL_RANK``).
    A variable that is not set is named as such (``UserError``), not left in a path that does not exist."""
    import re

    text = os.path.expanduser(str(path))
    unset = [a or b for a, b in re.findall(r"\$\{(\w+)\}|\$(\w+)", text) if (a or b) not in os.environ]
    if unset:
        raise UserError(f"environment variable {unset[0]} is not set (it is used in the path {path}); set it, "
                        "or give the path without it")
    return Path(os.path.expandvars(text))


def current_umask() -> int:
    """The process umask (read without changing it where /proc says it; else set and restore)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """What ``open(path, "w")`` would create: 0666 minus the umask."""
    return 0o666 & ~current_umask()


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, fsync it, give it the umask's mode and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())
        fsync_dir(path.parent)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def append_line(path: Path, line: str) -> None:
    """Append one line (``write`` + ``flush`` + fsync): a killed run loses at most the line in flight."""
    with open(path, "a") as f:
        f.write(line.rstrip("\n") + "\n")
        f.flush()
        os.fsync(f.fileno())


def usable_dir_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be (or become) a directory this process writes into; ``None`` if it can.
    Reads only: a missing directory is judged by its nearest existing parent."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            return f"{path} is a file, not a directory"
        return None if os.access(path, os.W_OK | os.X_OK) else f"{path} is not writable"
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{path} cannot be created: {parent} is a file, not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{path} cannot be created: {parent} is not writable"
    return None


def read_yaml_mapping(path: str | os.PathLike, what: str, expected: str) -> dict:
    """The mapping held by the YAML file ``path`` (an empty file is an empty mapping).

    ``what`` names the file's role in errors ("config file", "sweep file", ...), ``expected``
    says what the mapping should hold. A missing file, bad YAML or anything but a mapping is a
    ``UserError`` that names the file.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{what} {p} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{what} {p} must hold a mapping of {expected}")
    return data


def read_jsonl(path: Path) -> list[dict]:
    """The JSON lines of ``path`` up to the first torn one (a killed run's last line)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows
