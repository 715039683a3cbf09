"""Sweeps: expansion, names, validation before anything runs, the local executor, states on a re-run."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest

from fedpeft_hpc.cli import main
from fedpeft_hpc.config import load_config
from fedpeft_hpc.errors import UserError
from fedpeft_hpc.preflight import Preflight
from fedpeft_hpc.launchers.sweep import plan
from fedpeft_hpc.launchers.sweep_spec import (load_sweep, override_items, short_names, value_token)
from tests.conftest import QUICKSTART, run_cli, subprocess_env

TINY = """\
  run: {progress: false, threads: 1}
  model.pretrained: false
  fed: {rounds: 2, local_epochs: 1, num_clients: 8, clients_per_round: 4}
  data.min_samples: 10
"""


def write(tmp_path: Path, text: str, name: str = "sweep.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def grid_file(tmp_path: Path, lrs: str = "[0.05, 0.1]", seeds: str = "[1, 2]") -> Path:
    return write(tmp_path, f"base: {QUICKSTART}\nname: g\ngrid:\n  peft.method: [bias, lora]\n  optim.lr: {lrs}\n"
                           f"overrides:\n{TINY}seeds: {seeds}\n")


# -- expansion and names --------------------------------------------------------------------
def test_grid_zip_seeds_expand_in_file_order_with_readable_sorted_names(tmp_path):
    spec = load_sweep(write(tmp_path, f"base: {QUICKSTART}\ngrid:\n  data.alpha: [0.1, 0.5]\n"
                                      "zip:\n  peft.method: [bias, lora]\n  optim.lr: [0.05, 0.02]\n"
                                      "overrides: {fed.rounds: 3}\nseeds: [7, 3]\n"))
    runs = spec.runs(default_seed=42)
    assert [r.name for r in runs] == [
        f"alpha={a}_lr={lr}_method={m}_seed={s}"
        for a in ("0.1", "0.5") for m, lr in (("bias", "0.05"), ("lora", "0.02")) for s in (7, 3)]
    assert runs[2].setting == {"data.alpha": 0.1, "optim.lr": 0.02, "peft.method": "lora"}
    assert runs[2].setting_name == "alpha=0.1_lr=0.02_method=lora" and runs[2].seed == 7
    assert spec.name == "sweep" and spec.overrides == {"fed.rounds": 3}
    assert spec.runs(default_seed=42) == runs  # deterministic


def test_without_seeds_the_base_seed_is_used(tmp_path):
    spec = load_sweep(write(tmp_path, f"base: {QUICKSTART}\ngrid: {{peft.method: [head]}}\n"))
    assert [r.name for r in spec.runs(default_seed=42)] == ["seed=42"]  # a one-value axis is not in names


def test_names_do_not_depend_on_key_order_one_value_axes_or_how_a_number_is_written(tmp_path):
    a = load_sweep(write(tmp_path, f"base: {QUICKSTART}\ngrid:\n  peft.method: [bias, lora]\n"
                                   "  optim.lr: [0.05, 1]\nseeds: [1, 2]\n", "a.yaml"))
    b = load_sweep(write(tmp_path, f"base: {QUICKSTART}\ngrid:\n  optim.momentum: [0.9]\n  optim.lr: [0.05, 1.0]\n"
                                   "  peft.method: [bias, lora]\nseeds: [1, 2]\n", "b.yaml"))
    assert sorted(r.name for r in a.runs(1)) == sorted(r.name for r in b.runs(1))
    assert "lr=1.0_method=lora_seed=2" in [r.name for r in a.runs(1)]  # 1 and 1.0 of a float key: one value
    assert b.swept_keys == ["optim.lr", "peft.method"]
    assert all(r.values["optim.momentum"] == 0.9 for r in b.runs(1))  # the one-value axis still reaches the run


def test_short_names_keep_just_enough_of_the_key():
    assert short_names(["optim.lr", "server.lr", "data.alpha", "peft.method"]) == {
        "optim.lr": "optim.lr", "server.lr": "server.lr", "data.alpha": "alpha", "peft.method": "method"}


@pytest.mark.parametrize("value, token", [
    (0.001, "0.001"), ("1e-3", "1e-3"), (-1, "-1"), (1e-05, "1e-05"), (True, "true"), (None, "null"),
    (["qkv", "fc1"], "qkv+fc1"), ("a/b c", "a-b-c"), ({"depth": 2}, "depth-2"),
])
def test_value_tokens_are_file_name_safe(value, token):
    assert value_token(value) == token


def test_long_values_are_cut_with_a_hash():
    a, b = value_token("x" * 60), value_token("x" * 59 + "y")
    assert len(a) == 40 and a != b and a.startswith("x" * 33 + "~")


def test_names_that_collide_after_sanitising_get_distinct_hashes(tmp_path):
    spec = load_sweep(write(tmp_path, f"base: {QUICKSTART}\ngrid: {{data.root: ['a/b', 'a-b']}}\nseeds: [1]\n"))
    names = [r.name for r in spec.runs(default_seed=1)]
    assert len(set(names)) == 2 and all(re.fullmatch(r"root=a-b~[0-9a-f]{6}_seed=1", n) for n in names)
    assert names == [r.name for r in spec.runs(default_seed=1)]


def test_overrides_reach_the_config_with_their_types(tmp_path):
    items = override_items({"optim.lr": "1e-3", "peft.lora_targets": ["qkv", "fc1"], "run.progress": False,
                            "model.kwargs": {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2},
                            "data.name": "digits", "privacy.target_epsilon": None})
    cfg = load_config(QUICKSTART, items)
    assert cfg.optim.lr == 0.001 and cfg.peft.lora_targets == ["qkv", "fc1"] and cfg.run.progress is False
    assert cfg.model.kwargs == {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
    assert cfg.privacy.target_epsilon is None


def test_nested_overrides_mean_their_dotted_keys(tmp_path):
    spec = load_sweep(write(tmp_path, f"base: {QUICKSTART}\noverrides:\n  fed: {{rounds: 3}}\n"
                                      "  model.kwargs: {depth: 2}\n"))
    assert spec.overrides == {"fed.rounds": 3, "model.kwargs": {"depth": 2}}


@pytest.mark.parametrize("body, words", [
    ("grid: {peft.method: [bias]}\nzip: {optim.lr: [0.1, 0.2], data.alpha: [0.5]}",
     "zip: all lists must have one length"),
    ("grid: {optim.lr: [0.1]}\noverrides: {optim.lr: 0.2}", "overrides.optim.lr: also given under grid"),
    ("grid: {seed: [1, 2]}", "grid.seed: not allowed in a sweep: list the seeds under seeds:"),
    ("overrides: {run.dir: x}", "overrides.run.dir: not allowed"),
    ("grids: {optim.lr: [0.1]}", "grids: unknown sweep key"),
    ("grid: {optim.lr: 0.1}", "grid.optim.lr: expected a non-empty list"),
    ("grid: {fed: [1, 2]}", "grid.fed: is a config section"),
    ("seeds: [1, 1]", "seeds: [1, 1]: a seed is listed twice"),
    ("seeds: 3", "seeds: expected a non-empty list of integers"),
])
def test_malformed_sweep_files_name_the_key(tmp_path, body, words):
    with pytest.raises(UserError, match=re.escape(words)):
        load_sweep(write(tmp_path, f"base: {QUICKSTART}\n{body}\n"))


def test_base_is_relative_to_the_sweep_file(tmp_path):
    (tmp_path / "cfg").mkdir()
    shutil.copy(QUICKSTART, tmp_path / "cfg" / "base.yaml")
    (tmp_path / "sweeps").mkdir()
    spec = load_sweep(write(tmp_path / "sweeps", "base: ../cfg/base.yaml\n"))
    assert spec.base.resolve() == (tmp_path / "cfg" / "base.yaml").resolve()
    with pytest.raises(UserError, match="base: .*missing.yaml does not exist"):
        load_sweep(write(tmp_path / "sweeps", "base: missing.yaml\n", "other.yaml"))


# -- validation before anything runs ------------------------------------------------------------
def test_every_run_is_checked_with_one_build_per_model_and_data(tmp_path):
    spec = load_sweep(grid_file(tmp_path))
    pre = Preflight()
    planned = plan(spec, tmp_path / "out", pre)
    assert len(planned) == 8 and {p.status.state for p in planned} == {"new"}
    assert pre.builds == {"model": 2, "data": 2}  # bias/lora x seeds 1/2: learning rates build nothing
    assert planned[0].cfg.run.dir == str(tmp_path / "out" / "lr=0.05_method=bias_seed=1")
    assert not (tmp_path / "out").exists()


def test_an_invalid_value_exits_2_naming_run_and_key_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["sweep", str(grid_file(tmp_path, lrs="[0.05, -1]")), "--out", str(out), "--executor", "local"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "4 of 8 runs are invalid, nothing was submitted" in err
    assert ("runs lr=-1.0_method=bias_seed=1, lr=-1.0_method=bias_seed=2, lr=-1.0_method=lora_seed=1 and 1 more: "
            "optim.lr: must be > 0.0, got -1.0") in err  # one problem, said once
    assert not out.exists()


def test_a_missing_dataset_is_caught_before_submission(tmp_path, capsys):
    spec = write(tmp_path, f"base: {QUICKSTART}\ngrid: {{data.name: [digits, cifar10]}}\n"
                           f"overrides:\n{TINY}  data.root: {tmp_path / 'nope'}\nseeds: [1]\n")
    rc = main(["sweep", str(spec), "--out", str(tmp_path / "out"), "--executor", "local"])
    err = capsys.readouterr().err
    assert rc == 2 and "run name=cifar10_seed=1:" in err and "nope" in err
    assert "run name=digits" not in err and not (tmp_path / "out").exists()


# -- the local executor, end to end ---------------------------------------------------------------
@pytest.fixture
def job_env(monkeypatch):
    """What jobs started from this process inherit: this checkout first on the path, one thread each."""
    for k, v in subprocess_env().items():
        if k in ("PYTHONPATH", "OMP_NUM_THREADS"):
            monkeypatch.setenv(k, v)


def cli_main(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.multiproc
def test_local_sweep_runs_skips_resumes_and_reruns(tmp_path, capsys, job_env):
    spec, out = grid_file(tmp_path), tmp_path / "out"
    rc, stdout, stderr = cli_main(capsys, "sweep", str(spec), "--out", str(out), "--executor", "local",
                                  "--max-parallel", "2")
    assert rc == 0, stdout + stderr[-3000:]
    manifest = json.loads((out / "sweep.json").read_text())
    runs = manifest["runs"]
    assert list(runs) == [f"lr={lr}_method={m}_seed={s}" for m in ("bias", "lora") for lr in ("0.05", "0.1")
                          for s in (1, 2)]
    assert all(r["state"] == "finished" and r["job"]["executor"] == "local" for r in runs.values())
    assert all((out / name / "summary.json").is_file() for name in runs)
    assert re.search(r"\[8/8\] finished", stdout)

    assert cli_main(capsys, "report", str(out))[0] == 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == list(runs) and {r["state"] for r in rows} == {"finished"}
    md = (out / "results.md").read_text()
    assert len(re.findall(r"^\| 0\.(05|1) \| (bias|lora) \| 2 \| 2/2 \|", md, flags=re.M)) == 4, md

    # the same sweep again: nothing to run, nothing started
    logs = sorted(p.name for p in (out / "slurm").iterdir())
    rc, stdout, _ = cli_main(capsys, "sweep", str(spec), "--out", str(out), "--executor", "local")
    assert rc == 0 and "nothing to run" in stdout
    assert sorted(p.name for p in (out / "slurm").iterdir()) == logs

    # one run interrupted (checkpoint, no summary), one failed (metrics, no checkpoint), one never started
    names = list(runs)
    acc = json.loads((out / names[0] / "summary.json").read_text())["final_acc"]
    (out / names[0] / "summary.json").unlink()
    (out / names[0] / "checkpoints" / "latest.safetensors").replace(
        out / names[0] / "checkpoints" / "keep.safetensors")
    shutil.copy(out / names[0] / "checkpoints" / "round_00001.safetensors",
                out / names[0] / "checkpoints" / "latest.safetensors")
    metrics = (out / names[0] / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / names[0] / "metrics.jsonl").write_text(metrics[0])  # killed during round 2
    (out / names[1] / "summary.json").unlink()
    shutil.rmtree(out / names[1] / "checkpoints")
    shutil.rmtree(out / names[2])
    rc, stdout, stderr = cli_main(capsys, "sweep", str(spec), "--out", str(out), "--dry-run")
    assert rc == 0, stderr
    states = dict(re.findall(r"^(lr=\S+)\s+(\w+)", stdout, flags=re.M))
    assert states == {**{n: "finished" for n in names}, names[0]: "interrupted", names[1]: "failed",
                      names[2]: "new"}
    assert "(1 interrupted, 1 failed, 1 new, 5 finished); 3 to run" in stdout
    assert cli_main(capsys, "report", str(out))[0] == 0
    assert f"`{names[0]}`: interrupted, 1 round(s) of 2 done" in (out / "results.md").read_text()

    res = run_cli("sweep", str(spec), "--out", str(out), "--executor", "debug", timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert re.search(rf"resuming \S+{re.escape(names[0])} after round 1", res.stderr)
    assert json.loads((out / names[0] / "summary.json").read_text())["final_acc"] == acc
    assert (out / names[1] / "failed-1" / "metrics.jsonl").is_file()  # set aside, not deleted
    assert len(json.loads((out / "sweep.json").read_text())["runs"]) == 8
    assert all((out / n / "summary.json").is_file() for n in names)
