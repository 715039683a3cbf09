"""Convert PatchCamelyon's HDF5 files into the image-folder layout `data.name=imagefolder` reads.

PCam (github.com/basveeling/pcam; Zenodo record 2546921) ships each split as two HDF5 files,
``camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5`` (gunzip the downloaded ``.h5.gz``
first): ``x`` holds uint8 images ``[N, 96, 96, 3]``, ``y`` labels ``[N, 1, 1, 1]`` (1: the centre
32x32 region holds tumour tissue). This writes lossless PNGs

    DEST/train/normal/*.png   DEST/train/tumor/*.png     (label 0 -> normal, 1 -> tumor)
    DEST/test/normal/*.png    DEST/test/tumor/*.png

so that ``data.root=DEST`` gives label 0 = normal and 1 = tumor (ImageFolder sorts class names).
The paper trains on a 20,000-image subsample of PCam's 262,144 training images; writing only
that subsample (``--train-samples 20000``, drawn without replacement from ``--seed``) keeps the
folder small (a shared filesystem suffers from 262k files), and ``data.max_train_samples=20000``
in configs/paper/pcam_vitb16.yaml then keeps all of it; the low-data sweeps subsample it again
per seed. ``--train-samples 0`` writes every training image. The test split is written whole.
``DEST/pcam_subsample.json`` records the source files and the chosen training indices.

Needs h5py (``pip install h5py``, or the project's ``[pcam]`` extra). Writes into
``DEST.partial`` and renames it to DEST at the end; an existing DEST is never touched.

    python tools/pcam_to_imagefolder.py /data/pcam_h5 $FEDPEFT_DATA/pcam
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

CLASSES = ("normal", "tumor")
CHUNK = 1024


class PcamError(Exception):
    """Bad input: the message names the file or option."""


def _files(src: Path, split: str) -> tuple[Path, Path]:
    x, y = (src / f"camelyonpatch_level_2_split_{split}_{k}.h5" for k in ("x", "y"))
    for p in (x, y):
        if not p.is_file():
            gz = p.with_name(p.name + ".gz")
            hint = f" (found {gz.name}: gunzip it first)" if gz.is_file() else ""
            raise PcamError(f"{p} does not exist{hint}; expected PCam's "
                             f"camelyonpatch_level_2_split_{{train,test}}_{{x,y}}.h5 in {src}")
    return x, y


def _write_split(h5py, src: Path, split: str, dest: Path, keep: int, seed: int) -> dict:
    """Write one split's images (all, or ``keep`` drawn without replacement); returns its record."""
    from PIL import Image

    x_path, y_path = _files(src, split)
    with h5py.File(x_path, "r") as fx, h5py.File(y_path, "r") as fy:
        xs, ys = fx["x"], fy["y"]
        n = xs.shape[0]
        if ys.shape[0] != n or tuple(xs.shape[1:]) != (96, 96, 3):
            raise PcamError(f"{x_path} / {y_path}: expected x [N, 96, 96, 3] and y [N, ...] "
                             f"with one N, got {xs.shape} and {ys.shape}")
        if keep and keep > n:
            raise PcamError(f"--train-samples {keep} but {x_path.name} holds {n} images")
        idx = np.sort(np.random.default_rng(seed).choice(n, size=keep, replace=False)) if keep else np.arange(n)
        for name in CLASSES:
            (dest / split / name).mkdir(parents=True)
        counts = [0, 0]
        for start in range(0, len(idx), CHUNK):
            part = idx[start:start + CHUNK]
            # h5py reads increasing index lists directly; one read per chunk, not per image
            images = xs[part] if keep else xs[int(part[0]):int(part[-1]) + 1]
            labels = np.asarray(ys[part] if keep else ys[int(part[0]):int(part[-1]) + 1]).reshape(len(part), -1)[:, 0]
            for i, img, label in zip(part, images, labels):
                label = int(label)
                if label not in (0, 1):
                    raise PcamError(f"{y_path} image {i}: label {label}, expected 0 or 1")
                Image.fromarray(np.asarray(img, dtype=np.uint8)).save(dest / split / CLASSES[label] /
                                                                       f"pcam_{split}_{int(i):06d}.png")
                counts[label] += 1
    print(f"{split}: {len(idx)} of {n} images ({counts[0]} normal, {counts[1]} tumor)", flush=True)
    return {"x": str(x_path), "y": str(y_path), "available": int(n), "written": int(len(idx)),
            "per_class": dict(zip(CLASSES, counts)), "indices": idx.tolist() if keep else "all"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="folder with camelyonpatch_level_2_split_{train,test}_{x,y}.h5")
    p.add_argument("dest", type=Path, help="the image folder to create (data.root); must not exist")
    p.add_argument("--train-samples", type=int, default=20000,
                   help="training images to keep, drawn without replacement (default 20000, the paper's; 0: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the training subsample (default 0)")
    args = p.parse_args(argv)
    try:
        import h5py
    except ImportError:
        print("pcam_to_imagefolder: needs h5py (pip install h5py)", file=sys.stderr)
        return 2
    dest = args.dest
    if dest.exists():
        print(f"pcam_to_imagefolder: {dest} exists; give a new folder (nothing was changed)", file=sys.stderr)
        return 2
    if args.train_samples < 0:
        print("pcam_to_imagefolder: --train-samples must be >= 0", file=sys.stderr)
        return 2
    partial = dest.with_name(dest.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)  # our own leftover from an interrupted conversion
    try:
        record = {"seed": args.seed, "train": _write_split(h5py, args.src, "train", partial, args.train_samples,
                                                           args.seed),
                  "test": _write_split(h5py, args.src, "test", partial, 0, args.seed)}
    except PcamError as e:
        print(f"pcam_to_imagefolder: {e}", file=sys.stderr)
        return 2
    (partial / "pcam_subsample.json").write_text(json.dumps(record) + "\n")
    partial.rename(dest)
    print(f"wrote {dest} (data.name=imagefolder data.root={dest})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
