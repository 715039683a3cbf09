"""End-to-end single-process runs on the quickstart model (random init, seconds)."""

import json
import shutil

import pytest
import torch

from fedpeft_hpc.comm import LocalCommunicator
from fedpeft_hpc.config import load_config
from fedpeft_hpc.federated.evaluate import accuracy
from fedpeft_hpc.federated.sampling import Schedule
from fedpeft_hpc.runs.checkpoint import load_checkpoint
from fedpeft_hpc.utils.files import read_jsonl
from fedpeft_hpc.train import train
from tests.conftest import QUICKSTART, tiny_overrides


def run(tmp_path, name, *extra):
    cfg = load_config(QUICKSTART, tiny_overrides(tmp_path / name, *extra))
    return cfg, train(cfg)


def test_run_directory_follows_the_contract(tmp_path):
    cfg, summary = run(tmp_path, "r", "peft.method=bias")
    d = tmp_path / "r"
    for f in ("config.yaml", "metrics.jsonl", "summary.json", "partition.json", "checkpoints/latest.safetensors"):
        assert (d / f).is_file(), f
    rows = read_jsonl(d / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("round", "clients", "bytes_up", "bytes_down", "bytes_up_total", "bytes_down_total",
                    "train_loss", "wall_s", "test_acc"):
            assert key in r, key
        assert "allreduce_bytes" not in r  # one process: no collective
    on_disk = json.loads((d / "summary.json").read_text())
    assert on_disk == summary
    for key in ("final_acc", "best_acc", "rounds", "trainable_params", "total_params", "bytes_total"):
        assert key in summary
    assert summary["final_acc"] == rows[-1]["test_acc"]
    assert summary["best_acc"] == max(r["test_acc"] for r in rows)
    assert load_config(d / "config.yaml") == cfg


def test_bytes_are_the_tensors_exchanged(tmp_path):
    from fedpeft_hpc.counts import method_counts

    cfg, summary = run(tmp_path, "r", "peft.method=adapter")
    counts = method_counts(cfg)
    ckpt = load_checkpoint(tmp_path / "r" / "checkpoints" / "latest.safetensors")
    assert sum(t.numel() for t in ckpt.peft.values()) == counts["trainable_params"] == summary["trainable_params"]
    per = sum(t.numel() * t.element_size() for t in ckpt.peft.values())
    assert per == counts["bytes_per_transfer"]
    rows = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    for r in rows:
        assert r["bytes_down"] == cfg.fed.clients_per_round * per
        assert r["bytes_up"] == r["clients"] * per
    assert summary["bytes_total"] == sum(r["bytes_up"] + r["bytes_down"] for r in rows)
    assert summary["bytes_up_total"] == rows[-1]["bytes_up_total"]


@pytest.mark.parametrize("method", ["head", "bias", "adapter", "prompt", "lora"])
def test_frozen_backbone_stays_bit_identical(tmp_path, method):
    from fedpeft_hpc.federated.engine import FederatedTrainer
    from fedpeft_hpc.peft import frozen_params

    cfg = load_config(QUICKSTART, tiny_overrides(tmp_path / "r", f"peft.method={method}"))
    fr = FederatedTrainer(cfg, LocalCommunicator())
    before = {n: p.detach().clone() for n, p in frozen_params(fr.model).items()}
    start = fr.global_vec.clone()
    fr.fit()
    after = frozen_params(fr.model)
    assert before.keys() == after.keys() and len(before) > 0
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert not torch.equal(start, fr.global_vec)  # while the PEFT state did move


def test_resume_after_interruption_is_exact(tmp_path):
    extra = ("peft.method=lora", "fed.rounds=3", "server.optimizer=fedavgm", "run.keep_checkpoints=3")
    _, full = run(tmp_path, "a", *extra)
    a = tmp_path / "a"
    final = load_checkpoint(a / "checkpoints" / "latest.safetensors")
    # simulate a kill after round 2: the newest checkpoint is round 2, summary not yet written
    shutil.copy(a / "checkpoints" / "round_00002.safetensors", a / "checkpoints" / "latest.safetensors")
    (a / "summary.json").unlink()
    _, resumed = run(tmp_path, "a", *extra)
    again = load_checkpoint(a / "checkpoints" / "latest.safetensors")
    assert all(torch.equal(final.peft[k], again.peft[k]) for k in final.peft)
    assert all(torch.equal(final.server[k], again.server[k]) for k in final.server)
    assert resumed == full
    assert [r["round"] for r in read_jsonl(a / "metrics.jsonl")] == [1, 2, 3]


def test_a_requeue_before_the_first_checkpoint_restarts_from_round_0(tmp_path):
    """Round 1's metrics were written, then the job died before any checkpoint (run.checkpoint_every > 1):
    the requeued run starts again from round 0, its old row moved aside, and ends as a fresh run does."""
    from fedpeft_hpc.errors import ConfigError

    extra = ("peft.method=lora", "fed.rounds=3", "run.checkpoint_every=5")
    _, fresh = run(tmp_path, "fresh", *extra)
    _, _ = run(tmp_path, "a", *extra)
    a = tmp_path / "a"
    rows = read_jsonl(a / "metrics.jsonl")
    shutil.rmtree(a / "checkpoints")
    (a / "summary.json").unlink()
    (a / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(ConfigError, match="different config"):
        run(tmp_path, "a", *extra, "optim.lr=0.5")
    with pytest.raises(ConfigError, match="run.resume=must"):
        run(tmp_path, "a", *extra, "run.resume=must")
    _, resumed = run(tmp_path, "a", *extra)
    assert resumed == fresh
    final = load_checkpoint(tmp_path / "fresh" / "checkpoints" / "latest.safetensors")
    again = load_checkpoint(a / "checkpoints" / "latest.safetensors")
    assert all(torch.equal(final.peft[k], again.peft[k]) for k in final.peft)
    assert [r["round"] for r in read_jsonl(a / "metrics.jsonl")] == [1, 2, 3]
    assert [(r["round"], r["superseded_at_resume_from"]) for r in read_jsonl(a / "metrics.superseded.jsonl")] \
        == [(1, 0)]


def test_a_different_config_does_not_resume_into_the_same_dir(tmp_path):
    from fedpeft_hpc.errors import ConfigError

    run(tmp_path, "a")
    before = (tmp_path / "a" / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="different config"):
        run(tmp_path, "a", "optim.lr=0.5")
    with pytest.raises(ConfigError, match="already holds a run"):
        run(tmp_path, "a", "run.resume=never")
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == before


def test_load_run_reproduces_final_acc(tmp_path):
    import fedpeft_hpc

    _, summary = run(tmp_path, "r", "peft.method=prompt")
    r = fedpeft_hpc.load_run(tmp_path / "r")
    assert not r.model.training
    assert next(r.model.parameters()).device.type == "cpu"
    ds = r.test_dataset()
    x, y = ds[0]
    assert isinstance(x, torch.Tensor) and isinstance(y, int)
    assert accuracy(r.model, ds, batch_size=100) == summary["final_acc"]


def test_dropout_gives_the_scheduled_clients_and_bytes(tmp_path):
    cfg, summary = run(tmp_path, "r", "fed.dropout=0.5", "fed.rounds=4", "seed=3")
    sched = Schedule(3, cfg.fed.num_clients, cfg.fed.clients_per_round, 0.5)
    per = summary["bytes_per_transfer"]
    rows = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    expected = [len(sched.returning(r)) for r in range(1, 5)]
    assert 0 < sum(expected) < 4 * cfg.fed.clients_per_round  # this seed does drop some
    for r, n in zip(rows, expected):
        # a round is skipped exactly when fewer than fed.min_clients (1) updates arrived; then none counts
        assert r["skipped"] == (n < cfg.fed.min_clients)
        assert r["clients"] == (0 if r["skipped"] else n)
        assert r["dropped"] == cfg.fed.clients_per_round - n
        assert r["bytes_up"] == n * per and r["bytes_down"] == cfg.fed.clients_per_round * per


def test_all_dropped_round_keeps_the_state(tmp_path):
    from fedpeft_hpc.models import build_model
    from fedpeft_hpc.peft import peft_params

    cfg, summary = run(tmp_path, "r", "fed.dropout=1.0")
    rows = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert all(r["skipped"] and r["clients"] == 0 and r["bytes_up"] == 0 for r in rows)
    init = peft_params(build_model(cfg.model, cfg.peft, cfg.seed).model)
    ckpt = load_checkpoint(tmp_path / "r" / "checkpoints" / "latest.safetensors")
    assert all(torch.equal(init[k].detach(), ckpt.peft[k]) for k in init)


def test_non_finite_updates_are_rejected_and_never_reach_the_state(tmp_path):
    cfg, summary = run(tmp_path, "r", "optim.lr=1e30", "optim.momentum=0", "peft.method=head")
    rows = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert all(r["rejected"] == cfg.fed.clients_per_round and r["clients"] == 0 for r in rows)
    ckpt = load_checkpoint(tmp_path / "r" / "checkpoints" / "latest.safetensors")
    assert all(torch.isfinite(t).all() for t in ckpt.peft.values())


def test_weighting_uses_exact_sample_counts(tmp_path):
    """One local step of plain SGD on the head: the aggregate is the sample-weighted mean."""
    from fedpeft_hpc.federated.engine import FederatedTrainer

    cfg = load_config(QUICKSTART, tiny_overrides(tmp_path / "r", "peft.method=head", "fed.rounds=1",
                                                 "optim.momentum=0", "optim.weight_decay=0", "data.batch_size=1000"))
    fr = FederatedTrainer(cfg, LocalCommunicator())
    start = fr.global_vec.clone()
    trained = fr.fed.schedule.returning(1)
    deltas = []
    for c in trained:  # each client alone
        buf = fr._train_clients(1, [c])
        vec, stats = buf.split()
        deltas.append(vec.clone() / stats.weight_sum)
    fr.global_vec.copy_(start)
    fr.train_round(1)
    fr.close()
    sizes = torch.tensor([float(fr.fed.sizes[c]) for c in trained], dtype=torch.float64)
    expected = start.double() + sum(w * d for w, d in zip(sizes, deltas)) / sizes.sum()
    assert torch.allclose(fr.global_vec.double(), expected, atol=1e-6)
    assert len(set(sizes.tolist())) > 1  # the clients do differ in size


def test_zero_noise_reports_no_epsilon_bound_in_strict_json(tmp_path):
    run(tmp_path, "r", "privacy.mode=client", "privacy.noise_multiplier=0", "fed.rounds=1")
    text = (tmp_path / "r" / "metrics.jsonl").read_text() + (tmp_path / "r" / "summary.json").read_text()
    assert "Infinity" not in text
    row = read_jsonl(tmp_path / "r" / "metrics.jsonl")[-1]
    assert row["epsilon"] is None and row["epsilon_unbounded"] is True


def test_adamw_clients_and_fedadam_server_learn(tmp_path, pretrained_ckpt):
    cfg, summary = run(tmp_path, "r", "optim.name=adamw", "optim.lr=3e-3", "server.optimizer=fedadam",
                       "server.lr=0.03", "peft.method=lora", "fed.rounds=3", "model.pretrained=true",
                       f"model.checkpoint={pretrained_ckpt}")
    rows = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert summary["final_acc"] > 0.5  # a new head on a pre-trained backbone, 3 rounds; chance is 0.1


def test_full_ft_comparison_counts_the_backbone_without_peft_modules(tmp_path):
    from fedpeft_hpc.counts import method_counts

    cfg, summary = run(tmp_path, "r", "peft.method=adapter", "fed.rounds=1")
    full = method_counts(cfg, "full")
    row = read_jsonl(tmp_path / "r" / "metrics.jsonl")[0]
    transfers = row["sampled"] + row["clients"] + row["rejected"]
    assert summary["full_ft_bytes_total"] == transfers * full["bytes_per_transfer"]
    assert method_counts(cfg)["total_params"] > full["total_params"]  # the adapters are not counted


def test_tensorboard_scalars_mirror_the_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(tmp_path, "r", "run.tensorboard=true", "peft.method=head")
    rows = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    acc = EventAccumulator(str(tmp_path / "r" / "tensorboard"))
    acc.Reload()
    events = acc.Scalars("fedpeft/test_acc")
    assert [e.step for e in events] == [r["round"] for r in rows]
    assert [e.value for e in events] == pytest.approx([r["test_acc"] for r in rows])
    assert "fedpeft/bytes_up_total" in acc.Tags()["scalars"]


def test_bf16_run_reports_what_load_run_gets_in_fp32(tmp_path):
    """model.precision=bf16 applies to client training only: evaluation runs in fp32, so summary.json's
    final_acc is the accuracy of load_run's (fp32, CPU) model and the last test_loss is its loss."""
    import fedpeft_hpc
    from fedpeft_hpc.federated.evaluate import evaluate_shard

    cfg, summary = run(tmp_path, "r", "peft.method=lora", "model.precision=bf16")
    r = fedpeft_hpc.load_run(tmp_path / "r")
    ds = r.test_dataset()
    assert accuracy(r.model, ds, batch_size=100) == summary["final_acc"]
    loss_sum, correct, count = evaluate_shard(r.model, ds, cfg.data.eval_batch_size, torch.device("cpu")).tolist()
    last = read_jsonl(tmp_path / "r" / "metrics.jsonl")[-1]
    assert last["test_acc"] == correct / count == summary["final_acc"]
    assert last["test_loss"] == pytest.approx(loss_sum / count, rel=1e-9, abs=0)


def test_a_resume_drops_a_torn_last_metrics_line(tmp_path):
    extra = ("fed.rounds=2", "run.keep_checkpoints=2")
    _, full = run(tmp_path, "a", *extra)
    a = tmp_path / "a"
    rows = read_jsonl(a / "metrics.jsonl")
    shutil.copy(a / "checkpoints" / "round_00001.safetensors", a / "checkpoints" / "latest.safetensors")
    (a / "summary.json").unlink()
    # killed while writing round 2's row: only a fragment of it is there
    (a / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1])[:20])
    _, resumed = run(tmp_path, "a", *extra)
    assert resumed == full
    assert [r["round"] for r in read_jsonl(a / "metrics.jsonl")] == [1, 2]
