"""The paper's recipes (configs/paper/): every sweep expands to the runs the protocol needs, each
run's config passes the preflight that `fedpeft-hpc sweep --dry-run` runs, and one small run of
every recipe family completes a round on synthetic stand-in data.

CI has neither the ViT-B/16 weights nor CIFAR-100, Resisc45 or PCam, so the dry run here sees
stand-ins for exactly those two things and nothing else: the weights file is not read (the path
the config names is recorded instead), the backbone is built on the meta device (no memory, same
architecture, same parameter counts), and each dataset is replaced by labels of its real size
and class balance (CIFAR-100: 50,000 in 100 classes; Resisc45 after its 20% test hold-out: 25,200
in 45; PCam as tools/pcam_to_imagefolder.py writes it: 20,000 in 2). Everything else is the real
preflight: config loading and validation, registries, the Dirichlet/IID partition of those labels
over the clients, subsampling, cohort schedules, the DP noise calibration of every client, the
Opacus wrap, and the run-directory checks.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import Dataset

from fedpeft_hpc.cli import main
from fedpeft_hpc.config import load_config
from fedpeft_hpc.data import DataBundle
from fedpeft_hpc.data.datasets import DATASETS
from fedpeft_hpc.launchers.sweep import run_overrides
from fedpeft_hpc.launchers.sweep_spec import load_sweep, override_items
from fedpeft_hpc.utils.files import expand_path
from tests.conftest import REPO

PAPER = REPO / "configs" / "paper"
SWEEPS = PAPER / "sweeps"
WEIGHTS = "vit_base_patch16_224.augreg_in21k.safetensors"
METHODS = ["full", "head", "bias", "adapter", "prompt", "lora"]
LR = {"full": 1e-3, "head": 5e-3, "bias": 1e-2, "adapter": 5e-3, "prompt": 1e-2, "lora": 5e-3}

# sweep file -> runs it must expand to, from the protocol (docs/REPRODUCE.md)
EXPECTED_RUNS = {
    "cifar100_methods.yaml": (6 + 3) * 2 * 2,  # 6 methods + full FT at 4/2/1 clients; dirichlet, iid; 2 seeds
    "resisc45_methods.yaml": (6 + 3) * 2 * 2,
    "pcam_methods.yaml": (6 + 3) * 2 * 2,
    "cifar100_dp.yaml": 6 * 2 * 2,  # epsilon 5, 10
    "cifar100_clients16.yaml": 6 * 2,
    "cifar100_full_participation.yaml": 6 * 2,
    "cifar100_dropout.yaml": 6 * 2,
    "pcam_lowdata.yaml": 6 * 3 * 2,  # 2,000 / 1,500 / 1,000 samples
}

# dataset (by data.root's last part) -> (training samples, classes)
STAND_IN = {"cifar100": (50_000, 100), "resisc45": (25_200, 45), "pcam": (20_000, 2)}


class _Labels(Dataset):
    """A dataset of the right length whose images are never looked at by the preflight."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        raise AssertionError("the preflight must not read images")


def _stand_in(cfg, spec, seed) -> DataBundle:
    n, k = STAND_IN[Path(cfg.root).name]
    targets = np.arange(n, dtype=np.int64) % k  # balanced, as the three datasets are
    return DataBundle(_Labels(n), _Labels(n // 5), targets, k, cfg.name)


@pytest.fixture
def stand_ins(monkeypatch):
    """Stand-ins for the weights file and the datasets only; the paths the configs name are recorded."""
    import fedpeft_hpc.models.backbone as backbone
    import fedpeft_hpc.preflight as preflight

    seen = {"weights": set(), "data": set()}
    monkeypatch.setenv("FEDPEFT_WEIGHTS", "/cluster/weights")
    monkeypatch.setenv("FEDPEFT_DATA", "/cluster/data")
    monkeypatch.setattr(backbone, "load_backbone_weights", lambda model, path: seen["weights"].add(str(path)))
    real_build = preflight.build_model

    def build_on_meta(*args, **kwargs):
        with torch.device("meta"):
            return real_build(*args, **kwargs)

    monkeypatch.setattr(preflight, "build_model", build_on_meta)

    def data(cfg, spec, seed):
        seen["data"].add(f"{cfg.name}:{expand_path(cfg.root)}")
        return _stand_in(cfg, spec, seed)

    for name in ("cifar100", "imagefolder"):
        monkeypatch.setitem(DATASETS, name, data)
    return seen


def test_every_paper_sweep_is_counted():
    assert sorted(p.name for p in SWEEPS.glob("*.yaml")) == sorted(EXPECTED_RUNS)


# The DP sweep's preflight calibrates every client's noise: 64 clients x 2 seeds x 2 epsilons,
# about 70 s on a 2-core CI machine. Its dry run here covers one seed and one epsilon (every
# method, 64 calibrations); the other runs differ only in those two values, and all 24 configs
# are loaded and checked by `test_the_recipes_hold_the_paper_protocol`.
TRIMMED = {"cifar100_dp.yaml": {"seeds": [42], "grid": {"privacy.target_epsilon": [5.0]}}}


def _sweep_file(name: str, tmp_path: Path) -> Path:
    if name not in TRIMMED:
        return SWEEPS / name
    data = yaml.safe_load((SWEEPS / name).read_text())
    data.update(TRIMMED[name], base=str((SWEEPS / data["base"]).resolve()))
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("name", sorted(EXPECTED_RUNS))
def test_paper_sweep_dry_run_lists_the_expected_runs_with_valid_configs(name, tmp_path, capsys, stand_ins):
    assert len(load_sweep(SWEEPS / name).runs(default_seed=42)) == EXPECTED_RUNS[name]
    path = _sweep_file(name, tmp_path)
    out = tmp_path / "out"
    rc = main(["sweep", str(path), "--dry-run", "--out", str(out), "--executor", "local"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    spec = load_sweep(path)
    runs = spec.runs(default_seed=42)
    assert f"{len(runs)} runs in" in cap.out and f"({len(runs)} new); {len(runs)} to run" in cap.out
    listed = [line.split()[0] for line in cap.out.splitlines() if line.split() and line.split()[0] in
              {r.name for r in runs}]
    assert listed == [r.name for r in runs]
    assert not out.exists()  # a dry run writes nothing
    assert stand_ins["weights"] == {f"/cluster/weights/{WEIGHTS}"}
    dataset = Path(str(spec.base)).stem.split("_")[0]
    assert len(stand_ins["data"]) == 1 and stand_ins["data"].pop().endswith(f"/cluster/data/{dataset}")


def _configs(name: str) -> list:
    spec = load_sweep(SWEEPS / name)
    return [load_config(spec.base, override_items({**run_overrides(spec, r), "run.dir": f"runs/{r.name}"}))
            for r in spec.runs(default_seed=42)]


def test_the_recipes_hold_the_paper_protocol():
    for name in EXPECTED_RUNS:
        for cfg in _configs(name):
            assert (cfg.model.name, cfg.model.img_size, cfg.model.pretrained) == ("vit_base_patch16_224", None, True)
            assert (cfg.fed.rounds, cfg.fed.local_epochs, cfg.data.batch_size) == (50, 10, 64)
            o = cfg.optim
            assert (o.name, o.momentum, o.nesterov, o.weight_decay) == ("sgd", 0.9, True, 1e-4)
            assert o.lr == LR[cfg.peft.method], (name, cfg.peft.method)
            assert cfg.seed in (42, 3407)
            assert cfg.data.alpha == (0.5 if name.startswith("pcam") else 0.1)
            assert cfg.privacy.seeded_noise is False  # recipes for real use: secret noise
    main_rows = [(c.peft.method, c.fed.clients_per_round, c.data.partition) for c in _configs("cifar100_methods.yaml")]
    assert {(m, 8) for m in METHODS} | {("full", k) for k in (4, 2, 1)} == {r[:2] for r in main_rows}
    dp = _configs("cifar100_dp.yaml")
    assert {(c.privacy.mode, c.privacy.delta, c.privacy.max_grad_norm) for c in dp} == {("sample", 1e-3, 1.0)}
    assert sorted({c.privacy.target_epsilon for c in dp}) == [5.0, 10.0]
    assert {(c.fed.num_clients, c.fed.clients_per_round) for c in _configs("cifar100_clients16.yaml")} == {(16, 8)}
    assert {c.fed.clients_per_round for c in _configs("cifar100_full_participation.yaml")} == {64}
    assert sorted({c.data.max_train_samples for c in _configs("pcam_lowdata.yaml")}) == [1000, 1500, 2000]
    assert {c.data.max_train_samples for c in _configs("pcam_methods.yaml")} == {20_000}


# -- one small run of every recipe family on synthetic stand-in data --------------------------
# The run's config exactly as the sweep makes it, then: synthetic images instead of the dataset
# (10 classes, 16 px), a two-block ViT without pre-trained weights instead of ViT-B/16, one round
# of one local epoch. Everything the family is about (method, clients, cohort size, dropout,
# subsample size, DP) stays as the recipe sets it.
TINY_MODEL = ["model.pretrained=false", "model.num_classes=10", "model.img_size=16",
              "model.kwargs={patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2, mlp_ratio: 2.0}"]
STAND_IN_RUN = ["data.name=synthetic", "data.synthetic_samples=6400", "data.synthetic_test_samples=256",
                "data.num_workers=0", "data.eval_batch_size=256", "fed.rounds=1",
                "fed.local_epochs=1", "run.threads=1", "run.progress=false", *TINY_MODEL]

FAMILIES = [  # (sweep file, run name without the seed)
    ("cifar100_methods.yaml", "partition=dirichlet_clients_per_round=8_lr=0.005_method=lora"),
    ("pcam_methods.yaml", "partition=iid_clients_per_round=1_lr=0.001_method=full"),  # communication-matched
    ("cifar100_dp.yaml", "lr=0.01_method=prompt_target_epsilon=5.0"),
    ("cifar100_clients16.yaml", "lr=0.01_method=bias"),
    ("cifar100_full_participation.yaml", "lr=0.005_method=head"),
    ("cifar100_dropout.yaml", "lr=0.005_method=adapter"),
    ("pcam_lowdata.yaml", "max_train_samples=1000_lr=0.01_method=bias"),
]


def stand_in_config(name: str, setting_name: str, run_dir: Path):
    spec = load_sweep(SWEEPS / name)
    run = next(r for r in spec.runs(default_seed=42) if r.setting_name == setting_name and r.seed == 42)
    recipe = load_config(spec.base, override_items(run_overrides(spec, run)))
    extra = [f"run.dir={run_dir}"]
    if (recipe.data.max_train_samples or 0) > recipe.data.synthetic_samples:
        extra.append("data.max_train_samples=null")  # the 20,000 of PCam's base; the low-data sizes stay
    cfg = load_config(spec.base, override_items(run_overrides(spec, run)) + STAND_IN_RUN + extra)
    return recipe, cfg


@pytest.mark.parametrize("name, setting_name", FAMILIES)
def test_one_run_of_every_recipe_family_completes_a_round_on_stand_in_data(name, setting_name, tmp_path):
    from fedpeft_hpc.train import train

    recipe, cfg = stand_in_config(name, setting_name, tmp_path / "run")
    summary = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["rounds"] == 1 and [r["round"] for r in rows] == [1] and "test_acc" in rows[0]
    row = rows[0]
    fed = recipe.fed
    assert row["sampled"] == fed.clients_per_round
    assert row["clients"] == fed.clients_per_round - row["dropped"] >= 1
    assert row["bytes_up"] == row["clients"] * summary["bytes_per_transfer"]
    assert row["bytes_down"] == fed.clients_per_round * summary["bytes_per_transfer"]
    parts = json.loads((tmp_path / "run" / "partition.json").read_text())
    sizes = [len(p) for p in parts["clients"]]
    assert len(sizes) == fed.num_clients
    assert sum(sizes) == (recipe.data.max_train_samples if recipe.data.max_train_samples
                          and recipe.data.max_train_samples <= cfg.data.synthetic_samples
                          else cfg.data.synthetic_samples)
    if recipe.privacy.mode != "none":
        assert 0 < summary["epsilon"] <= recipe.privacy.target_epsilon
    else:
        assert "epsilon" not in row


# -- the GPU-hours estimate (tools/gpu_hours.py) ------------------------------------------------
def _gpu_hours_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_hours", REPO / "tools" / "gpu_hours.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_hours_count_the_images_every_run_trains_and_evaluates():
    tool = _gpu_hours_tool()
    work = {w["run"]: w for w in tool.sweep_workload(SWEEPS / "cifar100_methods.yaml")}
    main_run = work["partition=iid_clients_per_round=8_lr=0.01_method=bias_seed=42"]
    # 50 rounds x 8 clients x 10 epochs x 50,000 / 64 images; 50 evaluations of 10,000 test images
    assert (main_run["trained"], main_run["evaluated"], main_run["dp"]) == (3_125_000, 500_000, False)
    assert work["partition=iid_clients_per_round=1_lr=0.001_method=full_seed=42"]["trained"] == 3_125_000 / 8
    dropout = tool.sweep_workload(SWEEPS / "cifar100_dropout.yaml")
    assert {w["trained"] for w in dropout} == {3_125_000 / 2}  # half of the sampled clients return
    low = {w["run"]: w for w in tool.sweep_workload(SWEEPS / "pcam_lowdata.yaml")}
    assert low["max_train_samples=1000_lr=0.005_method=lora_seed=3407"]["trained"] == 50 * 8 * 10 * 1000 / 64
    assert all(w["dp"] for w in tool.sweep_workload(SWEEPS / "cifar100_dp.yaml"))
    seconds = {m: {"train_image_s": 1e-3, "eval_image_s": 1e-4} for m in METHODS}
    runs = [main_run, work["partition=iid_clients_per_round=4_lr=0.001_method=full_seed=42"]]
    assert tool.gpu_hours(runs, seconds) == pytest.approx((3_125_000 * 1.5 * 1e-3 + 2 * 500_000 * 1e-4) / 3600)
    assert tool.gpu_hours(runs + [{**main_run, "dp": True}], seconds) is None  # DP not measured: no number


def test_pivot_of_results_csv_averages_finished_seeds_per_cell(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("name,peft.method,data.partition,seed,state,final_acc,mb_sent\n"
                    "a,bias,iid,1,finished,0.5,1.0\na,bias,iid,2,finished,0.7,1.0\n"
                    "b,bias,dirichlet,1,finished,0.4,1.0\nb,bias,dirichlet,2,failed,,\n"
                    "c,full,iid,1,finished,0.9,50.0\nc,full,iid,2,finished,0.9,50.0\n")
    res = subprocess.run([sys.executable, str(REPO / "tools" / "pivot_results.py"), str(path), "--rows",
                          "peft.method", "--cols", "data.partition", "--value", "final_acc"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[2:6] == ["| peft.method | iid | dirichlet |", "|---|---|---|",
                                           "| bias | 0.600 ± 0.141 | 0.400 (n=1/2) |", "| full | 0.900 ± 0.000 |  |"]
    bad = subprocess.run([sys.executable, str(REPO / "tools" / "pivot_results.py"), str(path), "--rows", "method",
                          "--cols", "data.partition", "--value", "final_acc"], capture_output=True, text=True)
    assert bad.returncode == 2 and "method" in bad.stderr and "peft.method" in bad.stderr
