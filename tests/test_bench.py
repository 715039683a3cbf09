"""``fedpeft-hpc bench``: the measurements run end to end on a shrunken profile (seconds), the JSON
carries the CONTRACT keys, BENCHMARKS.md rows carry machine, versions, date and command, and bad
options end with exit status 2."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from fedpeft_hpc.bench import context, report
from fedpeft_hpc.bench.registry import MODULES, Row, measurements
from tests.conftest import run_cli


@pytest.fixture
def tiny_profile(monkeypatch):
    """The quick CPU profile with every size cut down so that a measurement takes seconds."""
    tiny = dataclasses.replace(context.PROFILES[("cpu", "quick")], clients=(3,), methods=("bias", "lora"),
                               all_k=("bias",), headline_clients=3, steps=2, repeats=1, samples_per_client=16,
                               batch=4)
    monkeypatch.setitem(context.PROFILES, ("cpu", "quick"), tiny)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny
    torch.set_num_threads(before)


def test_every_module_registers_and_cuda_skips_nothing_it_needs():
    names = [m.name for m in measurements("quick", "cpu")]
    assert names == ["clients", "rounds", "memory", "ranks", "data"]
    assert len(MODULES) == 5
    assert [m.name for m in measurements("quick", "cuda")] == names
    assert [m.name for m in measurements("full", "cpu")] == ["clients", "clients_dp", "rounds", "memory", "ranks",
                                                             "data"]


def test_clients_and_rounds_measure_ratios_of_this_run(tmp_path, tiny_profile, monkeypatch):
    from fedpeft_hpc.bench.clients import batched_vs_opacus, batched_vs_sequential
    from fedpeft_hpc.bench.rounds import rounds
    from fedpeft_hpc.data import loader
    from fedpeft_hpc.data.sources import DeviceBatches

    read = []  # fl_efficiency's centralized baseline reads the clients' source, not the raw CPU store
    iterate = loader.iterate_batches
    monkeypatch.setattr(loader, "iterate_batches", lambda ds, *a, **kw: read.append(type(ds)) or iterate(ds, *a, **kw))
    ctx = context.BenchContext("quick", torch.device("cpu"), tmp_path)
    rows = batched_vs_sequential(ctx) + rounds(ctx) + batched_vs_opacus(ctx)
    assert read and set(read) == {DeviceBatches}
    by_key = {r.key: r for r in rows if r.key}
    assert set(by_key) == {"batched_speedup", "batching_bound", "fl_efficiency", "aggregation_share", "ops_per_step",
                           "host_syncs_per_step"}
    assert by_key["host_syncs_per_step"].value == 0 and by_key["host_syncs_per_step"].met
    for r in rows:
        if r.key != "host_syncs_per_step":
            assert r.value is not None and math.isfinite(r.value) and r.value > 0, r
    speed = by_key["batched_speedup"].extra
    assert by_key["batched_speedup"].value == pytest.approx(
        speed["batched_samples_per_s"] / speed["sequential_samples_per_s"])
    assert 0 < by_key["aggregation_share"].value < 1
    assert {r.setting.split(",")[0] for r in rows if r.measurement.startswith("batched vs")} == {"bias", "lora"}
    full_bytes = next(r for r in rows if r.measurement.startswith("PEFT / full"))
    assert full_bytes.value < 0.2  # BitFit sends a few percent of the full model


def test_json_and_markdown_carry_the_contract(tmp_path):
    rows = [Row("batched vs sequential clients", "bias, 32 clients", 2.5, key="batched_speedup"),
            Row("aggregation share", "bias", 0.004, "< 0.02", True, "1 of 250 ms", key="aggregation_share"),
            Row("2 ranks", "x | y", None, ">= 1.7", None, "not measured", key="two_rank_speedup")]
    meta = {"date": report.now(), "machine": report.machine(torch.device("cpu")), "versions": report.versions(),
            "command": "fedpeft-hpc bench --suite quick --device cpu", "suite": "quick", "device": "cpu"}
    out = report.as_json(rows, meta)
    for key in report.CONTRACT_KEYS:
        assert key in out
    assert out["batched_speedup"] == 2.5 and out["fl_efficiency"] is None and out["two_rank_speedup"] is None
    json.dumps(out)
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\nsome notes kept as they are\n")
    report.append_markdown(md, rows, meta)
    report.append_markdown(md, rows[:1], meta)
    text = md.read_text()
    assert text.startswith("# Benchmarks\n\nsome notes kept as they are\n")
    lines = [line for line in text.splitlines() if line.startswith("| ") and meta["date"] in line]
    assert len(lines) == 4
    for line in lines:
        assert meta["machine"] in line and meta["versions"] in line and meta["command"] in line
        assert len(line.split(" | ")) == 10  # a '|' inside a value must not add a column
    fresh = tmp_path / "new.md"
    report.append_markdown(fresh, rows, meta)
    assert fresh.read_text().startswith(report.MD_HEADER)
    assert "NO" not in report.table(rows) and "yes" in report.table(rows)


def test_cuda_profile_is_the_paper_model():
    from fedpeft_hpc.config import load_config
    from fedpeft_hpc.counts import method_counts
    from fedpeft_hpc.quickstart import embedded_config

    p = context.PROFILES[("cuda", "quick")]
    assert (p.batch, p.headline_clients, p.precision) == (16, 32, "bf16")
    cfg = load_config(embedded_config(), [*context.BASE, *p.model, "peft.method=bias"])
    assert method_counts(cfg, "full")["total_params"] == 85_875_556  # ViT-B/16, 100 classes
    assert cfg.model.img_size == 224


@pytest.mark.parametrize("args, words", [(("--device", "cuda"), "no CUDA GPU"), (("--only", "clients,nope"), "nope"),
                                         (("--threads", "-1"), "--threads"), (("--method", "nope"), "--method"),
                                         (("--clients", "0"), "--clients"), (("--precision", "fp8"), "--precision"),
                                         (("--model", "resnet"), "--model"), (("--steps", "0"), "--steps")])
def test_bad_options_exit_2(tmp_path, args, words):
    if args[0] == "--device" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    res = run_cli("bench", "--no-markdown", *args, cwd=tmp_path, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert words in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "BENCHMARKS.md").exists()


def test_knobs_narrow_the_profile_and_the_step_counts_are_keys(tmp_path):
    """--method/--clients/--batch-size/--precision/--steps choose what is measured; the JSON carries
    ops_per_step (top-level operators of one batched optimizer step) and host_syncs_per_step (0: nothing in
    a step waits for the host)."""
    res = run_cli("bench", "--only", "clients", "--method", "lora", "--clients", "3", "--batch-size", "4", "--steps",
                  "2", "--precision", "bf16", "--threads", "1", "--json", "--no-markdown", cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert out["host_syncs_per_step"] == 0
    assert 20 < out["ops_per_step"] < 1000
    assert out["batched_speedup"] > 0 and "--method lora" in out["command"]
    settings = {r["setting"] for r in out["rows"]}
    assert settings == {"lora, 3 clients x batch 4"}, settings
    steps = next(r for r in out["rows"] if r.get("key") == "ops_per_step")
    assert "2 steps of 3 clients" in steps["detail"]
    p = context.with_knobs(context.PROFILES[("cpu", "quick")], precision="bf16", model="vit_tiny")
    assert p.precision == "bf16" and p.model == context.MODELS["vit_tiny"] and p.headline_method == "bias"
