"""What a DP run releases and what it is charged for: ``privacy.release``, earlier attempts, the stated
assumptions, the delta flag, the noise key's entropy, and an outside recomputation of every mode's epsilon
(dp-accounting's accountants, fed only the numbers privacy.json states)."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch

from fedpeft_hpc.config import load_config
from fedpeft_hpc.utils.files import read_jsonl
from tests.conftest import QUICKSTART, run_cli, tiny_overrides
from tests.test_privacy import wor_epsilon_fresh

UNCOVERED = {"train_loss", "train_acc", "train_s", "aggregate_s", "wall_s", "elapsed_s", "allreduce_ms", "clients",
             "rejected", "dropped", "sampled", "bytes_up", "bytes_down", "bytes_up_total", "bytes_down_total",
             "full_ft_bytes_total"}


def _train(d, *extra):
    from fedpeft_hpc.train import train

    return train(load_config(QUICKSTART, tiny_overrides(d, "peft.method=bias", *extra)))


def _log(d) -> str:
    """``train.log`` (created at its first record: absent when nothing was logged)."""
    return (d / "train.log").read_text() if (d / "train.log").is_file() else ""


# -- privacy.release ---------------------------------------------------------------------------
def test_covered_release_writes_only_what_epsilon_covers_and_logs_name_no_client(tmp_path):
    """Client-level DP, Poisson cohorts, every update rejected (max_update_norm far below any update): with
    covered, no training statistic, timing or count reaches metrics.jsonl, and train.log says nothing about
    the rejections; with all, the rows are today's and privacy.json lists what epsilon does not cover; in
    neither does train.log name a client."""
    dp = ("privacy.mode=client", "fed.sampling=poisson", "privacy.noise_multiplier=1.0", "fed.max_update_norm=1e-9",
          "privacy.max_grad_norm=1.0")
    summary = _train(tmp_path / "covered", *dp)
    rows = read_jsonl(tmp_path / "covered" / "metrics.jsonl")
    assert len(rows) == 2
    for r in rows:
        assert set(r) <= {"round", "test_acc", "test_loss", "epsilon", "delta", "skipped"}, set(r) & UNCOVERED
        assert {"round", "test_acc", "epsilon", "delta"} <= set(r)
    log = _log(tmp_path / "covered")
    assert not re.search(r"client \d", log) and "rejected" not in log
    assert summary["bytes_total"] is None and summary["bytes_up_total"] is None  # the cohort's size is secret
    assert summary["final_acc"] is not None and summary["epsilon"] > 0
    rep = json.loads((tmp_path / "covered" / "privacy.json").read_text())["release"]
    assert rep["policy"] == "covered" and rep["released_not_covered"] == []
    assert {"train_loss", "train_acc", "wall_s", "clients", "rejected", "bytes_up"} <= set(rep["withheld"])

    _train(tmp_path / "all", *dp, "privacy.release=all")
    rows = read_jsonl(tmp_path / "all" / "metrics.jsonl")
    assert all({"train_loss", "wall_s", "clients", "rejected", "bytes_up"} <= set(r) for r in rows)
    assert sum(r["rejected"] for r in rows) > 0  # the rejections did happen
    log = _log(tmp_path / "all")
    assert "rejected an update" in log and not re.search(r"client \d", log)
    rep = json.loads((tmp_path / "all" / "privacy.json").read_text())["release"]
    assert rep["policy"] == "all"
    assert {"train_loss", "train_acc", "wall_s", "clients", "rejected", "bytes_up", "summary.bytes_total"} \
        <= set(rep["released_not_covered"])
    assert not set(rep["released_not_covered"]) & {"round", "test_acc", "epsilon"}


def test_fixed_cohorts_release_the_bytes_of_the_public_schedule_and_sample_dp_its_counts(tmp_path):
    """Fixed cohorts without dropout: the bytes follow from the schedule (covered), the number aggregated
    does not (rejection looks at the updates). Sample-level DP: the cohort is public and updates leave their
    clients noised, so counts and bytes are covered; the training loss never is."""
    _train(tmp_path / "fixed", "privacy.mode=client", "fed.sampling=fixed", "privacy.noise_multiplier=1.0")
    row = read_jsonl(tmp_path / "fixed" / "metrics.jsonl")[-1]
    per = json.loads((tmp_path / "fixed" / "summary.json").read_text())["bytes_per_transfer"]
    assert row["bytes_down"] == row["bytes_up"] == 4 * per and row["sampled"] == 4
    assert not {"clients", "rejected", "train_loss", "wall_s"} & set(row)
    _train(tmp_path / "sample", "privacy.mode=sample", "privacy.noise_multiplier=1.0")
    row = read_jsonl(tmp_path / "sample" / "metrics.jsonl")[-1]
    assert {"clients", "sampled", "bytes_up_total"} <= set(row)
    assert not {"train_loss", "train_acc", "train_s", "wall_s"} & set(row)
    r = run_cli("config", "show", str(QUICKSTART), "privacy.release=some")
    assert r.returncode == 2 and "privacy.release" in r.stderr and "Traceback" not in r.stderr


# -- every attempt charged -----------------------------------------------------------------------
@pytest.mark.multiproc
def test_a_sweep_charges_the_rows_of_a_failed_attempt_it_set_aside(tmp_path):
    """A failed DP run without a checkpoint is set aside (failed-1/) and started afresh: the rounds it had
    released are charged in the new attempt (privacy.json lists the attempt and its charge), so its epsilon
    exceeds an attempt-free run's and equals a fresh accountant fed every released step."""
    import shutil

    spec = tmp_path / "sweep.yaml"
    spec.write_text(f"base: {QUICKSTART}\nname: dp\ngrid:\n  peft.method: [bias]\noverrides:\n"
                    "  run: {progress: false, threads: 1}\n  model.pretrained: false\n"
                    "  fed: {rounds: 2, local_epochs: 1, num_clients: 8, clients_per_round: 4, sampling: poisson}\n"
                    "  data.min_samples: 10\n  privacy: {mode: client, noise_multiplier: 1.5}\nseeds: [1]\n")
    out = tmp_path / "out"

    def sweep():
        r = run_cli("sweep", str(spec), "--out", str(out), "--executor", "debug")
        assert r.returncode == 0, r.stdout + r.stderr[-3000:]

    sweep()
    (run,) = [p for p in out.iterdir() if (p / "config.yaml").is_file()]
    first = json.loads((run / "privacy.json").read_text())
    # the job failed after releasing its rows, before any checkpoint
    shutil.rmtree(run / "checkpoints")
    for name in ("summary.json", "privacy.json"):
        (run / name).unlink()
    sweep()
    assert (run / "failed-1" / "metrics.jsonl").is_file()
    rep = json.loads((run / "privacy.json").read_text())
    assert rep["steps"] == 4 and rep["rounds_charged_again"] == [1, 2]
    assert rep["earlier_attempts"] == [{"attempt": "failed-1", "rounds_released": [1, 2], "rounds_charged": [1, 2]}]
    assert rep["epsilon"] > first["epsilon"]
    assert rep["epsilon"] == pytest.approx(_poisson_epsilon(1.5, 0.5, 4, rep["delta"]), rel=1e-9)
    assert json.loads((run / "summary.json").read_text())["epsilon"] == rep["epsilon"]


def test_a_dp_run_refuses_an_earlier_attempt_with_another_config(tmp_path):
    from fedpeft_hpc.errors import ConfigError
    from fedpeft_hpc.runs.rundir import RunDir

    d = tmp_path / "r"
    (d / "failed-1").mkdir(parents=True)
    (d / "failed-1" / "metrics.jsonl").write_text('{"round": 1}\n')
    old = load_config(QUICKSTART, tiny_overrides(d, "privacy.mode=client", "privacy.noise_multiplier=0.5"))
    from fedpeft_hpc.config.load import dump_yaml

    (d / "failed-1" / "config.yaml").write_text(dump_yaml(old))
    new = load_config(QUICKSTART, tiny_overrides(d, "privacy.mode=client", "privacy.noise_multiplier=2.0"))
    with pytest.raises(ConfigError) as e:
        RunDir(d).check(new)
    assert e.value.key == "run.dir" and "privacy.noise_multiplier" in str(e.value)
    assert RunDir(d).earlier_attempts() == [("failed-1", [1])]
    RunDir(d).check(old)  # the same config: its rows are charged, not refused


# -- assumptions written down, and an outside recomputation of epsilon ----------------------------
def _opacus_orders():
    from opacus.accountants import RDPAccountant

    return list(RDPAccountant.DEFAULT_ALPHAS)


def _poisson_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """A fresh Opacus RDP accountant, checked against dp-accounting on the same orders: the two agree where the
    best order is an integer; at fractional orders dp-accounting (0.6) bounds the RDP slightly from above (at
    q=0.2, sigma=0.547, order 1.9: 0.62298 against 0.62172, which numerical integration confirms exact), so
    it must lie within 1% above."""
    import dp_accounting as dpa
    from dp_accounting.rdp import RdpAccountant
    from opacus.accountants import RDPAccountant

    opacus = RDPAccountant()
    opacus.history = [(sigma, q, steps)]
    eps = opacus.get_epsilon(delta)
    acc = RdpAccountant(orders=_opacus_orders())
    acc.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)
    assert eps * (1 - 1e-9) <= acc.get_epsilon(delta) <= eps * 1.01
    return eps


@pytest.mark.parametrize("mode,sampling", [("client", "poisson"), ("client", "fixed"), ("sample", "fixed")])
def test_privacy_json_states_its_assumptions_and_an_outside_accountant_agrees(tmp_path, mode, sampling):
    d = tmp_path / "r"
    _train(d, f"privacy.mode={mode}", f"fed.sampling={sampling}", "privacy.target_epsilon=15",
           "privacy.delta=1.0e-4")
    rep = json.loads((d / "privacy.json").read_text())
    for key in ("adjacency", "trust_model", "sampling", "analysis", "accountant", "epsilon_covers", "release"):
        assert rep[key], key
    assert "secure aggregation" in rep["trust_model"]
    if mode == "client":
        assert "central DP" in rep["trust_model"] and "client level" in rep["adjacency"]
        assert ("add/remove" if sampling == "poisson" else "replace-one") in rep["adjacency"]
        n, m, steps = rep["num_clients"], rep["clients_per_round"], rep["steps"]
        if sampling == "poisson":
            assert "Opacus" in rep["analysis"] and "Poisson" in rep["analysis"]
            outside = _poisson_epsilon(rep["noise_multiplier"], m / n, steps, rep["delta"])
        else:
            assert "SampledWithoutReplacementDpEvent" in rep["analysis"] and "REPLACE_ONE" in rep["analysis"]
            outside = wor_epsilon_fresh(rep["noise_multiplier"] / 2, n, m, steps, rep["delta"])
    else:
        assert "record level" in rep["adjacency"] and "sizes are treated as public" in rep["adjacency"]
        assert rep["cohort_sampling"] == "fixed"
        outside = max(_poisson_epsilon(c["noise_multiplier"], c["sample_rate"], c["steps"], rep["delta"])
                      for c in rep["clients"].values() if c["steps"])
    assert rep["epsilon"] == pytest.approx(outside, rel=1e-9)
    assert rep["epsilon"] <= 15.0


# -- delta against 1/n ---------------------------------------------------------------------------
def test_delta_at_or_above_one_over_n_warns_and_is_flagged(caplog):
    from fedpeft_hpc.federated.sampling import Schedule
    from fedpeft_hpc.privacy.client_dp import ClientDP
    from fedpeft_hpc.privacy.sample_dp import SampleDP

    def client(delta):
        cfg = load_config(QUICKSTART, ["privacy.mode=client", "privacy.noise_multiplier=1.0", f"privacy.delta={delta}"])
        return ClientDP(cfg.privacy, cfg.fed, seed=0, sampling="poisson")

    with caplog.at_level(logging.WARNING, logger="fedpeft_hpc.privacy"):
        flagged = client(0.1)  # 16 clients: 1/n = 0.0625
    assert flagged.report()["delta_at_least_1_over_n"] is True
    assert flagged.report()["delta_units"] == {"n": 16, "unit": "clients"}
    assert "privacy.delta=0.1 is at least 1/n" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedpeft_hpc.privacy"):
        fine = client(0.01)
    assert fine.report()["delta_at_least_1_over_n"] is False and "1/n" not in caplog.text

    cfg = load_config(QUICKSTART, ["privacy.mode=sample", "privacy.noise_multiplier=1.0", "privacy.delta=0.02",
                                   "fed.num_clients=2", "fed.clients_per_round=1"])
    with caplog.at_level(logging.WARNING, logger="fedpeft_hpc.privacy"):
        dp = SampleDP(cfg.privacy, cfg.fed, cfg.data, client_sizes=[30, 40], schedule=Schedule(0, 2, 1, 0.0),
                      seed=0, device="cpu")
    assert dp.report()["delta_at_least_1_over_n"] is True and dp.report()["delta_units"]["n"] == 70
    assert "1/n" in caplog.text


# -- streams from the full key --------------------------------------------------------------------
def test_secret_streams_use_the_full_entropy_the_generators_take():
    from fedpeft_hpc.privacy.noise import NoiseKey, fresh_secret

    key = NoiseKey.from_secret(fresh_secret())
    assert key.rng(11, 1).bit_generator.seed_seq.entropy.bit_length() > 128  # NumPy: all 256 bits of the digest
    seeds = [key.generator(14, r).initial_seed() for r in range(64)]  # torch: 64 bits, the top one too
    assert len(set(seeds)) == 64 and any(s >= 2**63 for s in seeds)
    a, b = key.generator(14, 1), key.generator(14, 1)
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))


def test_the_quickstart_table_shows_withheld_bytes_and_no_wall_time():
    from fedpeft_hpc.quickstart import results_table

    row = {"method": "bias", "final_acc": 0.5, "best_acc": 0.6, "trainable_params": 3082, "bytes_total": None,
           "wall_s": None, "epsilon": 4.9, "delta": 1e-5}
    line = results_table([row]).splitlines()[-1]
    assert "withheld" in line and "4.900" in line and line.count("|") == 9
