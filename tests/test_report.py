"""`fedpeft-hpc report`: rows per run, mean +- std per setting, unfinished runs kept, plots with log MB."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedpeft_hpc.cli import main
from fedpeft_hpc.report import FILES, write_report
from fedpeft_hpc.report.collect import collect
from fedpeft_hpc.report.plots import curves, plot_accuracy_vs_bytes, plot_accuracy_vs_round

B = 1000  # bytes per client transfer per round, up and down alike


def make_run(d: Path, *, seed: int, accs: list[float], rounds: int, method: str = "bias", finished: bool = True,
             epsilon: float | None = None, trainable: int = 3082) -> None:
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "run": {"dir": str(d)}, "fed": {"rounds": rounds},
                                                   "peft": {"method": method}}))
    rows = [{"round": k, "test_acc": a, "bytes_up_total": k * B, "bytes_down_total": k * B, "wall_s": 0.25,
             **({"epsilon": epsilon * k / len(accs)} if epsilon else {})} for k, a in enumerate(accs, 1)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "checkpoints").mkdir()
    (d / "checkpoints" / "latest.safetensors").write_bytes(b"not read by the report")
    if finished:
        (d / "summary.json").write_text(json.dumps({
            "final_acc": accs[-1], "best_acc": max(accs), "trainable_params": trainable,
            "bytes_total": 2 * len(accs) * B, "rounds": rounds, **({"epsilon": epsilon} if epsilon else {})}))


@pytest.fixture
def sweep_dir(tmp_path) -> Path:
    """bias: 2 finished seeds; lora: 1 finished, 1 interrupted after 2 of 3 rounds, 1 never started."""
    out = tmp_path / "demo"
    runs = {}
    for method, seed, accs, finished in [("bias", 1, [0.4, 0.6, 0.5], True), ("bias", 2, [0.5, 0.6, 0.7], True),
                                         ("lora", 1, [0.3, 0.8, 0.8], True), ("lora", 2, [0.2, 0.4], False),
                                         ("lora", 3, None, False)]:
        name = f"method={method}_seed={seed}"
        if accs is not None:
            make_run(out / name, seed=seed, accs=accs, rounds=3, method=method, finished=finished,
                     trainable=3082 if method == "bias" else 6794)
        runs[name] = {"dir": name, "setting": {"peft.method": method}, "setting_name": f"method={method}",
                      "seed": seed, "overrides": {"peft.method": method, "seed": seed}, "state": "x", "rounds": 3,
                      "job": None}
    (out / "sweep.json").write_text(json.dumps({
        "format": "fedpeft-hpc-sweep/1", "name": "demo", "swept": ["peft.method"],
        "short_names": {"peft.method": "method"}, "runs": runs}))
    return out


def test_csv_has_one_row_per_run_whatever_its_state(sweep_dir):
    write_report(sweep_dir)
    with open(sweep_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["method=bias_seed=1", "method=bias_seed=2", "method=lora_seed=1",
                                         "method=lora_seed=2", "method=lora_seed=3"]
    assert [r["state"] for r in rows] == ["finished", "finished", "finished", "interrupted", "new"]
    assert list(rows[0])[:4] == ["name", "peft.method", "seed", "state"]
    assert rows[1]["final_acc"] == "0.7" and rows[1]["best_acc"] == "0.7" and rows[1]["trainable_params"] == "3082"
    assert float(rows[1]["mb_sent"]) == 6 * B / 1e6 and float(rows[1]["wall_s"]) == 0.75
    interrupted = rows[3]
    assert interrupted["final_acc"] == "" and interrupted["rounds_done"] == "2" and interrupted["rounds"] == "3"
    assert float(interrupted["mb_sent"]) == 4 * B / 1e6  # traffic so far, from metrics.jsonl
    assert rows[4]["rounds_done"] == "0" and rows[4]["mb_sent"] == ""


def test_markdown_has_mean_std_over_seeds_and_lists_unfinished_runs(sweep_dir):
    _, md = write_report(sweep_dir)
    assert md == (sweep_dir / "results.md").read_text()
    assert md.startswith("# demo: results")
    assert "5 runs: 3 finished, 1 interrupted, 1 new." in md
    assert "| method | rounds | n | final acc | best acc (test-chosen) | trainable params | MB sent | wall s |" in md
    # bias: final 0.5, 0.7 -> 0.6 +- 0.1414 (sample std); best 0.6, 0.7 -> 0.65 +- 0.0707
    assert "| bias | 3 | 2/2 | 0.6000 ± 0.1414 | 0.6500 ± 0.0707 | 3,082 | 0.01 | 0.8 |" in md
    assert "| lora | 3 | 1/3 | 0.8000 | 0.8000 | 6,794 | 0.01 | 0.8 |" in md
    assert "- `method=lora_seed=2`: interrupted, 2 round(s) of 3 done" in md
    assert "- `method=lora_seed=3`: new, 0 round(s) of 3 done" in md
    assert "epsilon" not in md


def test_curves_average_over_seeds_per_round_and_keep_unfinished_runs(sweep_dir):
    bias, lora = curves(collect(sweep_dir))
    assert bias.label == "method=bias (n=2)" and lora.label == "method=lora (1/3 finished)"
    assert list(bias.rounds) == [1, 2, 3] and np.allclose(bias.acc_mean, [0.45, 0.6, 0.6])
    assert np.allclose(bias.acc_std, [np.std([0.4, 0.5], ddof=1), 0.0, np.std([0.5, 0.7], ddof=1)])
    assert np.allclose(bias.mb_mean, [2 * B / 1e6, 4 * B / 1e6, 6 * B / 1e6])
    assert np.allclose(lora.acc_mean, [0.25, 0.6, 0.8]) and lora.acc_std[2] == 0.0


def test_plots_are_labelled_and_bytes_are_on_a_log_axis(sweep_dir, tmp_path):
    coll = collect(sweep_dir)
    fig = plot_accuracy_vs_bytes(coll, tmp_path / "b.png")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and "MB" in ax.get_xlabel() and "accuracy" in ax.get_ylabel()
    assert "demo" in ax.get_title()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["method=bias (n=2)", "method=lora (1/3 finished)", "Pareto front (last rounds)"]
    front = next(line for line in ax.get_lines() if line.get_label() == "Pareto front (last rounds)")
    assert list(front.get_ydata()) == [0.8]  # lora beats bias at the same MB: bias is not on the front
    fig = plot_accuracy_vs_round(coll, tmp_path / "r.png")
    assert fig.axes[0].get_xscale() == "linear" and "round" in fig.axes[0].get_xlabel()
    for p in (tmp_path / "b.png", tmp_path / "r.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000


def test_report_command_writes_the_four_files(sweep_dir, capsys):
    assert main(["report", str(sweep_dir)]) == 0
    assert "| bias | 3 | 2/2 |" in capsys.readouterr().out
    assert all((sweep_dir / f).is_file() for f in FILES)


def test_a_single_run_directory_and_dp_epsilon(tmp_path):
    run = tmp_path / "run"
    make_run(run, seed=42, accs=[0.5, 0.9], rounds=2, epsilon=3.0)
    _, md = write_report(run)
    with open(run / "results.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["name"] == "run" and row["seed"] == "42" and float(row["epsilon"]) == 3.0
    assert "| run | 2 | 1/1 | 0.9000 | 0.9000 | 3,082 | 0.00 | 0.5 | 3.000 |" in md and "epsilon" in md


def test_zero_noise_epsilon_is_reported_as_unbounded(tmp_path):
    run = tmp_path / "run"
    make_run(run, seed=1, accs=[0.5], rounds=1)
    s = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**s, "epsilon": None, "epsilon_unbounded": True}))
    _, md = write_report(run)
    with open(run / "results.csv") as f:
        assert math.isinf(float(next(csv.DictReader(f))["epsilon"]))
    assert md.splitlines()[6].endswith("| inf |")


def test_a_folder_of_runs_is_grouped_by_the_keys_that_differ(tmp_path):
    for method in ("bias", "lora"):
        for seed in (1, 2):
            make_run(tmp_path / "qs" / f"{method}{seed}", seed=seed, accs=[0.5 + seed / 10], rounds=1,
                     method=method)
    coll = collect(tmp_path / "qs")
    assert coll.swept == ["peft.method"] and [rs[0].setting_name for rs in coll.settings().values()] == [
        "method=bias", "method=lora"]
    _, md = write_report(tmp_path / "qs")
    assert "| bias | 1 | 2/2 | 0.6500 ± 0.0707 |" in md


def test_a_directory_without_runs_is_a_user_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a sweep directory" in capsys.readouterr().err


@pytest.fixture
def grid_dir(tmp_path) -> Path:
    """partition x method, one seed each: four settings."""
    out = tmp_path / "grid"
    runs = {}
    for part in ("iid", "dirichlet"):
        for method, acc in (("bias", 0.6), ("full", 0.7)):
            name = f"partition={part}_method={method}_seed=1"
            make_run(out / name, seed=1, accs=[acc - 0.1, acc], rounds=2, method=method)
            runs[name] = {"dir": name, "setting": {"data.partition": part, "peft.method": method},
                          "setting_name": name.rsplit("_seed", 1)[0], "seed": 1, "rounds": 2, "job": None}
    (out / "sweep.json").write_text(json.dumps({
        "format": "fedpeft-hpc-sweep/1", "name": "grid", "swept": ["data.partition", "peft.method"],
        "short_names": {"data.partition": "partition", "peft.method": "method"}, "runs": runs}))
    return out


def test_panels_split_the_plots_by_a_swept_key(grid_dir, tmp_path):
    coll = collect(grid_dir)
    for plot in (plot_accuracy_vs_bytes, plot_accuracy_vs_round):
        fig = plot(coll, tmp_path / "p.png", ["partition"])  # short names work
        axes = [ax for ax in fig.axes if ax.get_visible()]
        assert [ax.get_title() for ax in axes] == ["partition=iid", "partition=dirichlet"]
        for ax in axes:  # inside a panel only the method differs
            legend = [t.get_text() for t in ax.get_legend().get_texts()]  # (the bytes plot: + its Pareto front)
            assert legend[:2] == ["method=bias (n=1)", "method=full (n=1)"]
        assert "grid" in fig.get_suptitle()
        assert axes[0].get_shared_y_axes().joined(axes[0], axes[1])
    fig = plot_accuracy_vs_bytes(coll, tmp_path / "p.png", ["data.partition", "peft.method"])
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 4
    fig = plot_accuracy_vs_bytes(coll, tmp_path / "p.png")  # no panels: one plot, every setting
    assert len(fig.axes) == 1 and len(fig.axes[0].get_legend().get_texts()) == 4 + 1  # + the Pareto front


def test_an_unknown_panel_key_exits_2_naming_the_swept_keys_and_writes_nothing(grid_dir, capsys):
    assert main(["report", str(grid_dir), "--panels", "optim.lr"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr" in err and "data.partition, peft.method" in err and "Traceback" not in err
    assert not any((grid_dir / f).exists() for f in FILES)
    assert main(["report", str(grid_dir), "--panels", "partition"]) == 0
    assert all((grid_dir / f).exists() for f in FILES)


def test_epsilon_is_the_largest_per_setting_and_seeded_noise_and_recharged_rounds_are_flagged(tmp_path):
    for seed, eps in ((1, 3.0), (2, 5.0)):
        make_run(tmp_path / "qs" / f"bias{seed}", seed=seed, accs=[0.5], rounds=1, epsilon=eps)
    s = json.loads((tmp_path / "qs" / "bias2" / "summary.json").read_text())
    (tmp_path / "qs" / "bias2" / "summary.json").write_text(json.dumps({**s, "seeded_noise": True,
                                                                         "rounds_charged_again": [1]}))
    _, md = write_report(tmp_path / "qs")
    assert "| 5.000 (seeded noise in 1; rounds charged again in 1) |" in md
    assert "4.000" not in md and "the largest over the setting's finished runs" in md
