"""Decoding image files into a cache file: the only per-sample Python, and it runs once.

``decode_file`` is exactly what the per-sample reference path does before ``ToTensor``
(``torchvision``'s loader converts to RGB, ``eval_transform`` converts to the model's mode and
resizes with PIL's bilinear filter), so a cache holds the same bytes as decoding the files
directly. ``decode_into`` fills a ``.npy`` file chunk by chunk, in this process or, for a folder
big enough to be worth it, in a pool of ``workers`` processes that live for this build only;
a file that does not decode stops the build with a ``DataError`` naming it (a worker reports
the error instead of crashing).
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Sequence

import numpy as np

from fedpeft_hpc.errors import DataError

log = logging.getLogger(__name__)

CHUNKS_PER_WORKER = 8
MIN_CHUNK = 16
POOL_MIN_S = 2.0  # decode in this process when the whole folder would take less than this


def decode_file(path: str, mode: str, size: int) -> np.ndarray:
    """One image file -> ``[C, size, size]`` uint8 (C = 3 for ``RGB``, 1 for ``L``)."""
    from PIL import Image

    with open(path, "rb") as f:
        img = Image.open(f)
        img = img.convert("RGB")  # torchvision's pil_loader, the reference path's first step
        if mode != "RGB":
            img = img.convert(mode)
        img = img.resize((size, size), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def decode_chunk(npy_path: str, start: int, paths: Sequence[str], mode: str, size: int) -> tuple[str, str] | None:
    """Decode ``paths`` into rows ``start...`` of the ``.npy`` at ``npy_path``; ``(file, error)`` on failure."""
    out = np.load(npy_path, mmap_mode="r+")
    try:
        for i, p in enumerate(paths):
            try:
                out[start + i] = decode_file(p, mode, size)
            except Exception as e:  # noqa: BLE001 - PIL raises many kinds (OSError, SyntaxError, ValueError, ...)
                return p, f"{type(e).__name__}: {e}"
        out.flush()
    finally:
        del out
    return None


def _fail(path: str, why: str) -> DataError:
    return DataError(f"image file {path!r} cannot be decoded ({why}); replace or remove it from data.root")


def _chunks(n: int, workers: int) -> list[tuple[int, int]]:
    size = max(MIN_CHUNK, math.ceil(n / max(1, workers * CHUNKS_PER_WORKER)))
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def _context() -> multiprocessing.context.BaseContext:
    # fork: the workers need nothing but numpy and PIL, and start in milliseconds
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def usable_workers(requested: int) -> int:
    """``requested`` capped by the CPUs this process may run on (more processes than cores only queue)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(0, min(int(requested), cpus))


def decode_into(npy_path: Path, paths: Sequence[str], mode: str, size: int, workers: int) -> None:
    """Fill the ``[len(paths), C, size, size]`` uint8 ``.npy`` at ``npy_path`` from ``paths``.

    The first chunk is always decoded here; from its speed the rest is estimated, and worker
    processes start only when it would take more than ``POOL_MIN_S`` in this process (below
    that, starting them costs more than they save, so ``workers > 0`` is never slower).
    """
    chunks = _chunks(len(paths), workers)
    if not chunks:
        return
    t0 = time.perf_counter()
    a, b = chunks[0]
    err = decode_chunk(str(npy_path), a, paths[a:b], mode, size)
    if err:
        raise _fail(*err)
    rest = chunks[1:]
    estimate_s = (time.perf_counter() - t0) / (b - a) * (len(paths) - b)
    workers = usable_workers(workers)
    if workers <= 1 or not rest or estimate_s < POOL_MIN_S:
        for a, b in rest:
            err = decode_chunk(str(npy_path), a, paths[a:b], mode, size)
            if err:
                raise _fail(*err)
        return
    log.info("decoding the remaining %d images with %d worker processes (about %.0f s in one)",
             len(paths) - chunks[0][1], workers, estimate_s)
    pool = ProcessPoolExecutor(max_workers=min(workers, len(rest)), mp_context=_context())
    try:
        futures = {pool.submit(decode_chunk, str(npy_path), a, paths[a:b], mode, size): (a, b) for a, b in rest}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                a, b = futures[f]
                try:
                    err = f.result()
                except BrokenProcessPool:
                    raise DataError(f"a decode worker died while decoding image files {paths[a]!r} .. "
                                    f"{paths[b - 1]!r}; retry with data.num_workers=0 to find the file") from None
                if err:
                    raise _fail(*err)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
