"""The data row of ``fedpeft-hpc bench``: is the data path fast enough to keep the device busy?

``data_path_row(device, suite)`` measures, on one device, in one process:

- per shape (``quickstart``: digits in memory, the quickstart ViT, bias, batch 32;
  ``vit_b16_224``: ViT-B/16 at 224 px, bias, batch 32, on an image folder of 256 px JPEGs the
  bench writes itself, cached at 224 px), for 4 clients' local epochs trained together on the
  batched path (``BatchedClientTrainer``) at the bench's ``model.precision``:
  ``data_images_per_s`` (the data path alone: gather, move, augment, prepare, synchronised),
  ``model_images_per_s`` (batched training on batches made beforehand, already on the device),
  ``round_images_per_s`` (batched training fed by the real data path) and ``data_share``
  (1 - model time / round time: the part of the round the data path adds);
- ``issue``: the measurement of issue 13 (2-block ViT at 32 px, embed 64, bias, 10 clients x
  100 images x 2 epochs per round, batch 32, every client each round): seconds per round for
  an image folder of PNGs against the same images held as prepared tensors, with
  ``data.num_workers`` 0 and 2, rounds interleaved so that load from other processes hits all
  variants alike; plus the seconds of the first decode into the cache with 0 and 2 workers
  (and whether the pool started at all: a folder this small decodes in-process either way).

Every ratio is measured in this call; nothing is hard-coded. Timings take the median over
repeats. The image folders and caches live in a temporary directory removed at the end.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from fedpeft_hpc.bench.registry import Row, at_most, register_measurement
from fedpeft_hpc.federated.memory import synchronize

log = logging.getLogger(__name__)

ISSUE_MODEL = ["model.name=vit_tiny_patch16_224", "model.img_size=32", "model.num_classes=10",
               "model.kwargs={patch_size: 4, depth: 2, embed_dim: 64, num_heads: 4, mlp_ratio: 2.0}"]
VIT_B16 = ["model.name=vit_base_patch16_224", "model.num_classes=8", "model.kwargs={}", "model.img_size=224"]


def write_image_folder(root: Path, n_train: int, n_test: int, classes: int, px: int, suffix: str = "png",
                       seed: int = 0) -> Path:
    """``root/{train,test}/c<k>/<i>.<suffix>``: RGB images, a class tint plus noise (learnable, not trivial)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    tints = rng.integers(0, 128, size=(classes, 1, 1, 3))
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            k = i % classes
            d = root / split / f"c{k}"
            d.mkdir(parents=True, exist_ok=True)
            arr = np.clip(tints[k] + rng.integers(0, 128, size=(px, px, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(d / f"{i:05d}.{suffix}")
    return root


def _seconds(fn: Callable[[], Any], device: torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def _federated_run(overrides: list[str], run_dir: Path, device: torch.device):
    from fedpeft_hpc.comm.collective import LocalCommunicator
    from fedpeft_hpc.config import load_config
    from fedpeft_hpc.federated.engine import FederatedTrainer

    cfg = load_config(None, [f"run.dir={run_dir}", "run.progress=false", "model.pretrained=false",
                             "fed.rounds=1000000", "eval.every=1000000", "comm.device=" + device.type, *overrides])
    trainer = FederatedTrainer(cfg, LocalCommunicator(device))
    trainer.close()  # the bench's own rounds are not a run's log
    return cfg, trainer


def shape_row(overrides: list[str], work: Path, device: torch.device, epochs: int, repeats: int,
              clients: int = 4) -> dict:
    """Images/s of the data path alone, the model step alone and both, for ``clients`` clients trained together
    on the batched path (``BatchedClientTrainer``, one slot each) at the config's ``model.precision``."""
    from fedpeft_hpc.federated.batched import BatchedClientTrainer, ClientJob

    cfg, run = _federated_run([f"fed.num_clients={clients}", f"fed.clients_per_round={clients}",
                               "data.partition=iid", f"fed.local_epochs={epochs}", *overrides], work / "run", device)
    parts = [run.fed.client_indices[c] for c in range(clients)]
    n_images = sum(len(idx) for idx in parts) * epochs

    def batches(c: int):
        gen = torch.Generator().manual_seed(c)
        source = run.sources.client(torch.Generator().manual_seed(100 + c))
        return run.fed.privacy.client_batches(source, parts[c], cfg.data.batch_size, epochs, gen,
                                              cfg.data.num_workers)

    def data_only():
        for c in range(clients):
            for x, _ in batches(c):
                x.sum()  # touch: the batch really exists on the device

    made = [list(batches(c)) for c in range(clients)]

    def train(source):
        trainer = BatchedClientTrainer(run.model, run.layout, cfg.optim, clients, device, cfg.model.precision,
                                       batch_size=cfg.data.batch_size)
        for _ in trainer.train(run.global_vec, [ClientJob(c, lambda c=c: source(c)) for c in range(clients)]):
            pass

    train(lambda c: made[c])  # warm-up (kernels, allocator)
    data_s, model_s, round_s = [], [], []
    for _ in range(repeats):  # the three back to back per repeat: load from elsewhere hits them alike
        data_s.append(_seconds(data_only, device))
        model_s.append(_seconds(lambda: train(lambda c: made[c]), device))
        round_s.append(_seconds(lambda: train(batches), device))
    med = statistics.median
    return {"images": n_images, "batch_size": cfg.data.batch_size, "augment": cfg.data.augment,
            "clients": clients, "precision": cfg.model.precision,
            "repeats": repeats, "data_images_per_s": n_images / med(data_s),
            "model_images_per_s": n_images / med(model_s), "round_images_per_s": n_images / med(round_s),
            "data_alone_share": med([d / r for d, r in zip(data_s, round_s)]),
            "data_share": max(0.0, med([1.0 - m / r for m, r in zip(model_s, round_s)]))}


class _PoolSeen(logging.Handler):
    """Notes whether a cache build started worker processes (small folders decode in-process)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.seen = False

    def emit(self, record: logging.LogRecord) -> None:
        self.seen = self.seen or "worker processes" in record.getMessage()


def _as_tensors(run) -> None:
    """Swap a run's training data for the same images held as prepared tensors (the in-memory path)."""
    from fedpeft_hpc.data import BatchSources, TensorImageDataset

    store = run.fed.data.train
    x, y = store.batch(np.arange(len(store)))
    run.fed.data.train = TensorImageDataset(x, y)
    run.sources = BatchSources(run.fed.data.train, run.fed.data.test, run.comm.device)


def issue_row(work: Path, device: torch.device, rounds: int) -> dict:
    """Issue 13's round: image folder of PNGs vs tensors, workers 0 vs 2 (interleaved rounds)."""
    from fedpeft_hpc.data.cache import cached_images, scan_folder

    folder = write_image_folder(work / "png32", 1000, 100, 10, 32)
    scan = scan_folder(folder / "train")
    builds, pooled = {}, _PoolSeen()
    dec_log = logging.getLogger("fedpeft_hpc.data.decode")
    level = dec_log.level
    dec_log.addHandler(pooled)
    dec_log.setLevel(logging.INFO)
    try:
        for w in (0, 2):
            t0 = time.perf_counter()
            cached_images(scan, "RGB", 32, work / f"build_w{w}", workers=w)
            builds[w] = time.perf_counter() - t0
    finally:
        dec_log.removeHandler(pooled)
        dec_log.setLevel(level)
    common = [*ISSUE_MODEL, "peft.method=bias", "data.name=imagefolder", f"data.root={folder}",
              f"data.cache_dir={work / 'cache'}", "data.partition=iid", "data.batch_size=32",
              "fed.num_clients=10", "fed.clients_per_round=10", "fed.local_epochs=2", "optim.lr=0.01"]
    runs = {}
    for name, workers in (("tensors", 0), ("folder", 0), ("folder_workers2", 2)):
        _, runs[name] = _federated_run([*common, f"data.num_workers={workers}"], work / name, device)
    _as_tensors(runs["tensors"])
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(1, rounds + 2):
        for name, run in runs.items():
            seconds = _seconds(lambda: run.train_round(r), device)
            if r > 1:  # round 1 warms up
                times[name].append(seconds)
    med = {k: statistics.median(v) for k, v in times.items()}

    def ratio(a: str, b: str) -> float:  # per round, then the median: robust to load that drifts
        return statistics.median([x / y for x, y in zip(times[a], times[b])])

    return {"rounds": rounds, "tensors_round_s": med["tensors"], "folder_round_s": med["folder"],
            "folder_workers2_round_s": med["folder_workers2"],
            "min_round_s": {k: min(v) for k, v in times.items()},
            "folder_vs_tensors": ratio("folder", "tensors"),
            "workers2_vs_0": ratio("folder_workers2", "folder"),
            "cache_build_s": builds[0], "cache_build_workers2_s": builds[2],
            "cache_build_workers2_vs_0": builds[2] / builds[0],
            "cache_build_workers2_pool_started": pooled.seen}


def data_path_row(device: str = "cpu", suite: str = "quick", precision: str | None = None) -> dict:
    """The bench's data row (see the module docstring); ``suite`` full adds ViT-B/16 on CPU too; ``precision``:
    ``model.precision`` of the shape rows (default: bf16 on CUDA, fp32 on CPU)."""
    from fedpeft_hpc.config import load_config
    from fedpeft_hpc.quickstart import embedded_config

    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    quick = suite == "quick"
    precision = precision or ("bf16" if dev.type == "cuda" else "fp32")
    out: dict[str, Any] = {"device": str(dev), "torch_threads": torch.get_num_threads(), "suite": suite,
                           "precision": precision}
    with tempfile.TemporaryDirectory(prefix="fedpeft-bench-data-") as tmp:
        work = Path(tmp)
        qs = load_config(embedded_config())
        qs_model = [f"model.name={qs.model.name}", f"model.img_size={qs.model.img_size}",
                    "model.kwargs={" + ", ".join(f"{k}: {v}" for k, v in qs.model.kwargs.items()) + "}",
                    "model.num_classes=10", "data.name=digits", "data.batch_size=32", "peft.method=bias",
                    f"model.precision={precision}"]
        (work / "qs").mkdir()
        out["quickstart"] = shape_row(qs_model, work / "qs", dev, epochs=2, repeats=5 if quick else 11)
        if dev.type == "cuda" or not quick:
            folder = write_image_folder(work / "jpg256", 128, 16, 8, 256, suffix="jpg")
            (work / "vitb").mkdir()
            out["vit_b16_224"] = shape_row([*VIT_B16, "peft.method=bias", "data.name=imagefolder",
                                            f"data.root={folder}", f"data.cache_dir={work / 'cache224'}",
                                            "data.batch_size=32", "data.augment=crop_flip",
                                            f"model.precision={precision}"],
                                           work / "vitb", dev, epochs=4 if dev.type == "cuda" else 1,
                                           repeats=5 if dev.type == "cuda" else 1)
        out["issue"] = issue_row(work, dev, rounds=5 if quick else 11)
    main = out.get("vit_b16_224", out["quickstart"])
    out.update({"data_share": main["data_share"], "data_images_per_s": main["data_images_per_s"],
                "model_images_per_s": main["model_images_per_s"],
                "folder_vs_tensors": out["issue"]["folder_vs_tensors"],
                "workers_vs_no_workers": out["issue"]["workers2_vs_0"]})
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m fedpeft_hpc.bench.data_path [--device cpu|cuda] [--suite quick|full]``: the row as JSON."""
    import argparse
    import json

    p = argparse.ArgumentParser(description="The data-path row of fedpeft-hpc bench, as JSON")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--suite", choices=("quick", "full"), default="quick")
    args = p.parse_args(argv)
    print(json.dumps(data_path_row(args.device, args.suite), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


@register_measurement("data")
def data_rows(ctx) -> list[Row]:
    """The data row of ``fedpeft-hpc bench``: ``data_path_row`` as table rows with their targets."""
    ctx.status("data: data path vs model step, image folder vs tensors, workers")
    d = data_path_row(ctx.device.type, ctx.suite, ctx.profile.precision)
    main = (f"ViT-B/16 224 px, bias, batch 32, crop_flip, 4 clients batched, {d['precision']}" if "vit_b16_224" in d
            else f"quickstart shape, bias, 4 clients batched, {d['precision']}")
    ctx.release()
    return [
        Row("data path share of round time", main, d["data_share"], "< 0.05", at_most(d["data_share"], 0.05),
            detail=f"data alone {d['data_images_per_s']:.0f} img/s, model step alone "
                   f"{d['model_images_per_s']:.0f} img/s", extra={k: d[k] for k in ("data_images_per_s",
                                                                                    "model_images_per_s")}),
        Row("image-folder round / same shape as tensors", "2-block ViT 32 px, bias, 10 clients x 100 PNGs x 2 "
            "epochs", d["folder_vs_tensors"], "<= 1.1", at_most(d["folder_vs_tensors"], 1.1),
            detail=f"{d['issue']['folder_round_s']:.2f} s vs {d['issue']['tensors_round_s']:.2f} s per round"),
        Row("data.num_workers=2 / 0 round time", "the same image-folder rounds", d["workers_vs_no_workers"],
            "<= 1.05 (never slower, within timing noise)", at_most(d["workers_vs_no_workers"], 1.05),
            detail=f"{d['issue']['folder_workers2_round_s']:.2f} s vs {d['issue']['folder_round_s']:.2f} s per round "
                   "(5% timing noise allowed)"),
    ]
