"""The image-folder cache: a folder of image files decoded once into one memory-mapped uint8 file.

A cache file ``<data.cache_dir>/<folder>-<S>px-<mode>-<key>.npy`` holds every image of one
class-folder tree as ``[N, C, S, S]`` uint8 (a plain ``.npy``, so ``numpy.load`` opens it
anywhere). ``key`` hashes the format version, the mode and size, and for every image file its
path relative to the folder, its size in bytes and its modification time: a changed, added,
removed or renamed file gives a new key, so a changed folder is decoded again (old cache files
stay until removed by hand; nothing here deletes files it did not write).

Several ranks or nodes may start at once: the first to take an exclusive lock on
``<cache>.lock`` (``fcntl.lockf``, POSIX record locks, which NFS and most cluster file systems
honour) decodes into a private temporary file, flushes it to disk and renames it into place;
the others wait on the lock and then open the finished file. Even where the lock does not
hold, the rename is atomic: readers only ever see complete cache files.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from fedpeft_hpc.data.decode import decode_into
from fedpeft_hpc.errors import DataError
from fedpeft_hpc.utils.files import atomic_write, expand_path

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
LAYOUT = "ROOT/train/CLASS/*.jpg + ROOT/test/CLASS/*.jpg (or ROOT/val/...), or ROOT/CLASS/*.jpg"


@dataclass(frozen=True)
class FolderScan:
    """The image files of a class-folder tree (``torchvision``'s ``ImageFolder`` rules), sorted."""

    root: Path
    classes: list[str]
    paths: list[str]
    targets: np.ndarray
    stats: list[tuple[str, int, int]]  # (path relative to root, bytes, mtime_ns)


def scan_folder(path: Path) -> FolderScan:
    """List ``path/CLASS/**/*.<image extension>``; DataError naming ``data.root`` when unusable."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    try:
        classes, class_to_idx = find_classes(str(path))
        samples = make_dataset(str(path), class_to_idx, extensions=IMG_EXTENSIONS)
        stats = []
        for p, _ in samples:
            st = os.stat(p)
            stats.append((os.path.relpath(p, path), int(st.st_size), int(st.st_mtime_ns)))
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"data.root: no usable images in {str(path)!r} ({e}); expected layout {LAYOUT}") from None
    return FolderScan(Path(path), classes, [p for p, _ in samples],
                      np.asarray([t for _, t in samples], dtype=np.int64), stats)


def cache_key(scan: FolderScan, mode: str, size: int) -> str:
    doc = {"format": CACHE_FORMAT, "mode": mode, "size": int(size), "resize": "PIL bilinear",
           "files": scan.stats}
    return hashlib.sha256(json.dumps(doc, separators=(",", ":")).encode()).hexdigest()


def cache_path(scan: FolderScan, mode: str, size: int, cache_dir: Path) -> Path:
    parts = [p for p in scan.root.resolve().parts[-2:] if p not in ("/", "")]
    slug = re.sub(r"[^A-Za-z0-9_.]+", "_", "-".join(parts)) or "images"
    return cache_dir / f"{slug}-{int(size)}px-{mode}-{cache_key(scan, mode, size)[:20]}.npy"


def _open(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The cache at ``path`` memory-mapped (copy-on-write: never written back), or None if absent/unfit."""
    try:
        arr = np.load(path, mmap_mode="c")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:  # truncated or not a .npy: decode again
        log.warning("cache file %s is unreadable (%s); decoding again", path, e)
        return None
    if arr.shape != shape or arr.dtype != np.uint8:
        log.warning("cache file %s holds %s %s, expected %s uint8; decoding again", path, arr.shape, arr.dtype,
                    shape)
        return None
    return arr


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    locked = False
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            locked = True
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            log.warning("cannot lock %s (%s): ranks may decode the same cache twice (still safe)", path, e)
        yield
    finally:
        if locked:
            fcntl.lockf(fd, fcntl.LOCK_UN)
        os.close(fd)


def _build(scan: FolderScan, mode: str, size: int, path: Path, workers: int) -> None:
    n, c = len(scan.paths), (3 if mode == "RGB" else 1)
    log.info("decoding %d images from %s into %s (%d px, %s, %s)", n, scan.root, path, size, mode,
             f"{workers} worker processes" if workers > 0 else "in this process")
    t0 = time.perf_counter()

    def write(tmp: str) -> None:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, c, size, size))
        del out
        decode_into(Path(tmp), scan.paths, mode, size, workers)

    atomic_write(path, write)  # readers only ever see a complete cache
    log.info("decoded %d images in %.1f s (%.0f images/s)", n, time.perf_counter() - t0,
             n / max(1e-9, time.perf_counter() - t0))


def cached_images(scan: FolderScan, mode: str, size: int, cache_dir: str | os.PathLike,
                  workers: int = 0) -> torch.Tensor:
    """``[N, C, size, size]`` uint8 of ``scan``'s files, from the cache (decoded first if needed).

    The tensor is memory-mapped from the cache file (read-only in effect: pages are shared
    between the processes of a node through the page cache).
    """
    if mode not in ("RGB", "L"):
        raise ValueError(f"cache mode must be RGB or L, got {mode!r}")
    cache_dir = expand_path(cache_dir)
    shape = (len(scan.paths), 3 if mode == "RGB" else 1, int(size), int(size))
    path = cache_path(scan, mode, size, cache_dir)
    arr = _open(path, shape)
    if arr is None:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            with _locked(path.with_name(path.name + ".lock")):
                arr = _open(path, shape)  # another rank may have built it while we waited
                if arr is None:
                    _build(scan, mode, size, path, workers)
                    arr = _open(path, shape)
        except OSError as e:  # not writable, read-only file system, disk full, ...
            raise DataError(f"data.cache_dir={str(cache_dir)!r}: cannot write the image cache there ({e}); set "
                            "data.cache_dir to a writable directory with room for it (shared by all nodes of a "
                            "job, e.g. on the cluster file system)") from None
        if arr is None:  # pragma: no cover - just written and renamed into place
            raise DataError(f"cache file {path} could not be read back after decoding")
    return torch.from_numpy(arr)
