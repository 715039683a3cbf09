"""Split PEFT states: local parts (FedSA-LoRA, FedPer), frozen parts (FFA-LoRA), heterogeneous LoRA ranks
(HetLoRA), personalized evaluation, and the client-state store behind them."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fedpeft_hpc
from fedpeft_hpc.comm import LocalCommunicator
from fedpeft_hpc.config import load_config
from fedpeft_hpc.federated.client import local_train, make_optimizer
from fedpeft_hpc.federated.evaluate import accuracy, evaluate_indices
from fedpeft_hpc.models import build_model
from fedpeft_hpc.runs.checkpoint import load_checkpoint
from fedpeft_hpc.runs.client_state import ClientStateStore
from fedpeft_hpc.train import train
from fedpeft_hpc.utils.files import read_jsonl
from fedpeft_hpc.utils.streams import CLIENT_LAYERS, derived_seed
from tests.conftest import (BIN, QUICKSTART, assert_same_stores, kill_after_rounds, run_cli, subprocess_env,
                            tiny_overrides)

# the quickstart model: embed 64, 4 blocks, LoRA rank 4 on qkv (64 -> 192) and proj (64 -> 64), 10 classes
B_FACTORS = 4 * (192 * 4 + 64 * 4)  # LoRA B of qkv and proj in 4 blocks
A_FACTORS = 4 * (4 * 64 + 4 * 64)
HEAD = 64 * 10 + 10


def run(tmp_path, name, *extra):
    cfg = load_config(QUICKSTART, tiny_overrides(tmp_path / name, *extra))
    return cfg, train(cfg)


def store_of(run_dir, num_clients):
    """A run's client-state store, read as of its latest checkpoint (rows of whatever length it holds)."""
    row = os.path.getsize(run_dir / "client_state" / "state.f32") // 4 // num_clients
    round_ = load_checkpoint(run_dir / "checkpoints" / "latest.safetensors").round
    return ClientStateStore(run_dir / "client_state", {"row": torch.zeros(row)}, num_clients, read_only=True,
                            upto_round=round_)


def test_ffa_lora_sends_exactly_the_b_factors_and_the_head(tmp_path):
    cfg, summary = run(tmp_path, "r", "peft.method=lora", "peft.frozen=[lora_a]")
    per = 4 * (B_FACTORS + HEAD)  # fp32, counted by hand
    assert summary["bytes_per_transfer"] == per
    assert summary["frozen_params"] == A_FACTORS and summary["sent_params"] == B_FACTORS + HEAD
    rows = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    for r in rows:
        assert r["bytes_down"] == cfg.fed.clients_per_round * per and r["bytes_up"] == r["clients"] * per
    ckpt = load_checkpoint(tmp_path / "r" / "checkpoints" / "latest.safetensors")
    assert not [k for k in ckpt.peft if "lora_A" in k]
    # frozen parts never change: the trained model's A factors are the seeded initialisation, bit for bit
    fresh = dict(build_model(cfg.model, cfg.peft, cfg.seed, load_weights=False).model.named_parameters())
    trained = dict(fedpeft_hpc.load_run(tmp_path / "r").model.named_parameters())
    a_names = [n for n in fresh if "lora_A" in n]
    assert len(a_names) == 8 and all(torch.equal(fresh[n], trained[n]) for n in a_names)
    assert any(not torch.equal(fresh[n], trained[n]) for n in fresh if "lora_B" in n)  # while B learned


def test_frozen_parts_stay_bit_identical_inside_the_engine(tmp_path):
    from fedpeft_hpc.federated.engine import FederatedTrainer

    cfg = load_config(QUICKSTART, tiny_overrides(tmp_path / "r", "peft.method=adapter", "peft.frozen=[head]"))
    fr = FederatedTrainer(cfg, LocalCommunicator())
    head = {n: p.detach().clone() for n, p in fr.model.named_parameters() if n.startswith("head.")}
    fr.fit()
    assert head and all(torch.equal(head[n], dict(fr.model.named_parameters())[n]) for n in head)
    assert not any(n.startswith("head.") for n in fr.layout.names)


def test_local_parts_are_never_sent_and_never_reach_another_client(tmp_path):
    """FedSA-LoRA: B stays on each client. The bytes are those of A and the head; and every client's B after
    round 2 is what it gets by training from ITS OWN B of round 1 (nobody else's)."""
    from fedpeft_hpc.federated.engine import FederatedTrainer

    cfg = load_config(QUICKSTART, tiny_overrides(tmp_path / "r", "peft.method=lora", "peft.local=[lora_b]",
                                                 "fed.clients_per_round=6"))
    fr = FederatedTrainer(cfg, LocalCommunicator())
    assert fr.layout.size == A_FACTORS + HEAD and fr.ledger.bytes_per_transfer == 4 * (A_FACTORS + HEAD)
    assert not [n for n in fr.layout.names if "lora_B" in n]
    row1 = fr.train_round(1).row()
    assert row1["bytes_up"] == row1["clients"] * 4 * (A_FACTORS + HEAD)
    store = fr.client_parts.store
    g1 = fr.global_vec.clone()
    after1 = {c: store.get(c) for c in range(cfg.fed.num_clients)}
    trained1 = [c for c in range(cfg.fed.num_clients) if store.written(c)]
    init = fr.client_parts.init_local
    for c in range(cfg.fed.num_clients):  # each trained client holds its own B; the others the initial one
        same = all(torch.equal(after1[c][n], init[n]) for n in init)
        assert same == (c not in trained1)
    fr.train_round(2)
    again = [c for c in fr.fed.schedule.returning(2) if c in trained1]
    assert again, "the test needs a client trained in both rounds"
    for c in again:
        with torch.no_grad():
            for n, p in fr.client_parts.local.items():
                p.copy_(after1[c][n])
        opt = make_optimizer(fr.params.values(), cfg.optim)
        local_train(fr.model, fr.params, fr.layout, g1, fr._client_batches(2, c), opt, fr.comm.device,
                    layers_seed=derived_seed(cfg.seed, CLIENT_LAYERS, 2, c))
        got = store.get(c)
        # (batched training by default: equal to sequential training within fp32 rounding)
        assert all(float((got[n] - fr.client_parts.local[n].detach()).abs().max()) <= 1e-5 for n in got), c
    fr.close()


def test_heterogeneous_ranks_aggregate_zero_padded_hand_computed(tmp_path):
    """Three clients of ranks 1, 2 and 4 with weights 1, 2, 3 (HetLoRA): row i of A (column i of B) is
    averaged over every client, zero where i is beyond a client's rank."""
    from fedpeft_hpc.federated.aggregate import RoundBuffer
    from fedpeft_hpc.federated.engine import FederatedTrainer

    cfg = load_config(QUICKSTART, tiny_overrides(tmp_path / "r", "peft.method=lora", "peft.lora_ranks=[1,2,4]",
                                                 "fed.num_clients=3", "fed.clients_per_round=3",
                                                 "data.min_samples=5"))
    fr = FederatedTrainer(cfg, LocalCommunicator())
    parts = fr.client_parts
    parts.lora_ranks = np.array([1, 2, 4])
    a_name = next(n for n in fr.layout.names if "lora_A" in n)
    b_name = next(n for n in fr.layout.names if "lora_B" in n)
    g = torch.ones(fr.layout.size)  # the global state: every entry 1
    buf = RoundBuffer(fr.layout.size, torch.device("cpu"))
    for client, (weight, value) in enumerate([(1, 1.0), (2, 2.0), (3, 4.0)]):
        start = parts.start(client, g)
        local = fr.layout.unflatten(start.clone())
        rank = int(parts.lora_ranks[client])
        assert torch.all(local[a_name][rank:] == 0) and torch.all(local[a_name][:rank] == 1)
        local[a_name][:rank] = value  # what the client trained, inside its rank
        local[b_name][:, :rank] = value
        delta = parts.finish(client, fr.layout.flatten(local, torch.float32) - start, g)
        buf.add(delta, weight, 0.0, 1, 0)
    update, stats = buf.split()
    new = fr.layout.unflatten(g + (update / stats.weight_sum).float())
    expected_rows = torch.tensor([(1 * 1 + 2 * 2 + 3 * 4) / 6, (2 * 2 + 3 * 4) / 6, 3 * 4 / 6, 3 * 4 / 6])
    assert torch.allclose(new[a_name], expected_rows[:, None].expand_as(new[a_name]), atol=1e-6)
    assert torch.allclose(new[b_name], expected_rows[None, :].expand_as(new[b_name]), atol=1e-6)
    # every client exchanges its own tensors: rank r sends r rows of A and r columns of B, plus the head
    for rank in (1, 2, 4):
        client = [1, 2, 4].index(rank)
        assert parts.client_bytes(client, 0) == 4 * (4 * (rank * 64 + 192 * rank + rank * 64 + 64 * rank) + HEAD)
    fr.close()


def test_heterogeneous_ranks_in_a_run_bytes_and_partition(tmp_path):
    cfg, summary = run(tmp_path, "r", "peft.method=lora", "peft.lora_ranks=[1,4]")
    doc = json.loads((tmp_path / "r" / "partition.json").read_text())
    ranks = doc["lora_rank"]
    assert sorted(ranks) == [1] * 4 + [4] * 4  # equal tiers
    from fedpeft_hpc.federated.sampling import Schedule, cohort_sampling

    sched = Schedule(cfg.seed, 8, 4, 0.0, cohort_sampling("auto", "none"))
    per = {r: 4 * (4 * 384 * r + HEAD) for r in (1, 4)}
    for row in read_jsonl(tmp_path / "r" / "metrics.jsonl"):
        assert row["bytes_down"] == sum(per[ranks[c]] for c in sched.cohort(row["round"]))


def test_personal_acc_is_recomputed_exactly_from_load_run(tmp_path, pretrained_ckpt):
    cfg, summary = run(tmp_path, "r", f"model.checkpoint={pretrained_ckpt}", "model.pretrained=true",
                       "peft.method=lora", "peft.local=[head]", "peft.lora_ranks=[2,4]",
                       "data.client_test_fraction=0.25")
    r = fedpeft_hpc.load_run(tmp_path / "r")
    correct = count = 0
    per_client = []
    for c in range(cfg.fed.num_clients):
        ds = r.client_test_dataset(c)
        _, k, n = evaluate_indices(r.client_model(c), ds, np.arange(len(ds)), 256, torch.device("cpu")).tolist()
        correct, count = correct + k, count + n
        per_client.append(k / n)
    assert count > 0 and summary["personal_acc"] == correct / count
    assert summary["personal_acc_p50"] == pytest.approx(float(np.percentile(per_client, 50)), abs=1e-12)
    assert accuracy(r.model, r.test_dataset()) == summary["final_acc"]  # the global model: local head at init
    held = json.loads((tmp_path / "r" / "partition.json").read_text())["client_test"]
    assert [len(h) for h in held] == [len(r.client_test_dataset(c)) for c in range(cfg.fed.num_clients)]
    rows = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert all({"personal_acc", "personal_acc_p10", "personal_acc_p90"} <= set(x) for x in rows)
    # a personalized model differs from the global one (its own head)
    assert summary["personal_acc"] != summary["final_acc"]


def _cmd(run_dir, *extra, launcher=(sys.executable, "-m", "fedpeft_hpc")):
    return [*launcher, "train", str(QUICKSTART), *tiny_overrides(run_dir, *SPLIT, *extra)]


SPLIT = ("peft.method=lora", "peft.local=[lora_b,head]", "peft.lora_ranks=[2,4]", "fed.dropout=0.2",
         "data.client_test_fraction=0.2", "run.checkpoint_every=2", "fed.rounds=4")


def _same_runs(a, b, num_clients, tol):
    ca = load_checkpoint(a / "checkpoints" / "latest.safetensors")
    cb = load_checkpoint(b / "checkpoints" / "latest.safetensors")
    assert ca.peft.keys() == cb.peft.keys()
    assert max(float((ca.peft[k] - cb.peft[k]).abs().max()) for k in ca.peft) <= tol
    sa, sb = store_of(a, num_clients), store_of(b, num_clients)
    assert_same_stores(sa, sb, num_clients, tol)


def test_local_parts_are_the_same_for_1_and_2_processes(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(_cmd(one), check=True, env=subprocess_env(), capture_output=True, timeout=300)
    torchrun = (str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "fedpeft_hpc")
    subprocess.run(_cmd(two, launcher=torchrun), check=True, env=subprocess_env(), capture_output=True, timeout=300)
    _same_runs(one, two, 8, 1e-6)
    ra, rb = read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl")
    for key in ("test_acc", "personal_acc", "bytes_up_total"):
        assert [r[key] for r in ra] == [r[key] for r in rb], key


def test_a_killed_run_resumes_to_the_same_bits(tmp_path):
    """SIGKILL after round 3 (round 2 checkpointed, round 3's local parts journaled), then a resume: the
    global state, every client's local parts and the summary equal those of a run never interrupted."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    slow = "fed.local_epochs=3"  # rounds long enough to land the kill inside the run
    subprocess.run(_cmd(full, slow), check=True, env=subprocess_env(), capture_output=True, timeout=300)
    kill_after_rounds(_cmd(cut, slow), cut, 3)
    assert not (cut / "summary.json").exists(), "killed too late: the run had finished"
    subprocess.run(_cmd(cut, slow), check=True, env=subprocess_env(), capture_output=True, timeout=300)
    _same_runs(full, cut, 8, 0.0)
    assert json.loads((cut / "summary.json").read_text()) == json.loads((full / "summary.json").read_text())
    assert not list((cut / "client_state" / "journal").iterdir())


def test_a_population_many_times_larger_touches_no_more_of_the_store(tmp_path):
    """Local heads for 50 and for 5,000 clients, 5 per round: the store's disk blocks (what was written) and
    what the store holds in memory follow the clients trained, not the population."""
    used = {}
    for n in (50, 5000):
        d = tmp_path / f"n{n}"
        cfg, _ = run(tmp_path, f"n{n}", "peft.method=bias", "peft.local=[head]", "data.name=synthetic",
                     "data.synthetic_samples=5000", "data.partition=iid", f"fed.num_clients={n}",
                     "fed.clients_per_round=5", "data.min_samples=1", "eval.every=2")
        st = os.stat(d / "client_state" / "state.f32")
        assert st.st_size == n * HEAD * 4  # the logical size is the population's
        store = store_of(d, n)
        written = sum(store.written(c) for c in range(n))
        assert 0 < written <= 10 and not store._newest  # everything compacted at the last checkpoint
        store.close()
        # disk blocks: the written rows (each may straddle pages, plus a file-system block of slack)
        assert st.st_blocks * 512 <= written * (HEAD * 4 + 2 * 4096) + 8192, (n, st.st_blocks)
        used[n] = st.st_blocks * 512
    assert used[5000] * 100 < 5000 * HEAD * 4


@pytest.mark.parametrize("extra, key", [(("peft.method=bias", "peft.local=[lora_b]"), "peft.local"),
                                        (("peft.method=lora", "peft.frozen=[adapter]"), "peft.frozen"),
                                        (("peft.method=lora", "peft.local=[head]", "peft.frozen=[head]"), "peft.frozen"),
                                        (("peft.method=head", "peft.frozen=[head]"), "peft.frozen"),
                                        (("peft.method=bias", "peft.lora_ranks=[2,4]"), "peft.lora_ranks"),
                                        (("peft.method=lora", "peft.local=[nope]"), "peft.local")])
def test_impossible_parts_exit_2(tmp_path, extra, key):
    res = run_cli("inspect", str(QUICKSTART), *extra)
    assert res.returncode == 2 and res.stderr.startswith(f"fedpeft-hpc: error: {key}:"), res.stderr
    assert "Traceback" not in res.stderr


def test_inspect_counts_local_frozen_and_sent(tmp_path):
    res = run_cli("inspect", str(QUICKSTART), "peft.method=lora", "peft.local=[head]", "peft.frozen=[lora_a]",
                  "--json")
    out = json.loads(res.stdout)
    assert (out["sent_params"], out["local_params"], out["frozen_params"]) == (B_FACTORS, HEAD, A_FACTORS)
    assert out["bytes_per_transfer"] == 4 * B_FACTORS and out["trainable_params"] == B_FACTORS + HEAD
    text = run_cli("inspect", str(QUICKSTART), "peft.method=lora", "peft.local=[head]").stdout
    assert f"local {HEAD:,}" in text


def test_client_level_dp_noises_and_clips_the_sent_parts_only(tmp_path):
    _, summary = run(tmp_path, "r", "peft.method=lora", "peft.local=[lora_b]", "privacy.mode=client",
                     "privacy.noise_multiplier=0.5", "privacy.seeded_noise=true")
    doc = json.loads((tmp_path / "r" / "privacy.json").read_text())
    assert doc["state_parts"]["local"] == ["lora_b"] and doc["state_parts"]["sent_params"] == A_FACTORS + HEAD
    assert "sent parts only" in doc["state_parts"]["covers"]
    assert summary["epsilon"] > 0
    ckpt = load_checkpoint(tmp_path / "r" / "checkpoints" / "latest.safetensors")
    assert sum(t.numel() for t in ckpt.peft.values()) == A_FACTORS + HEAD


def test_sample_level_dp_trains_local_parts_under_dp_sgd(tmp_path):
    _, summary = run(tmp_path, "r", "peft.method=bias", "peft.local=[head]", "privacy.mode=sample",
                     "privacy.noise_multiplier=1.0", "privacy.seeded_noise=true")
    doc = json.loads((tmp_path / "r" / "privacy.json").read_text())
    assert "local parts included" in doc["state_parts"]["covers"] and summary["epsilon"] > 0
    store = store_of(tmp_path / "r", 8)
    assert any(store.written(c) for c in range(8))
    store.close()


def _split_rounds(tmp_path, client_batch, extra):
    """Two rounds of a split-state run: the moved global state, every client's local parts, the rows."""
    from fedpeft_hpc.federated.engine import FederatedTrainer

    cfg = load_config(QUICKSTART, tiny_overrides(tmp_path / client_batch, f"fed.client_batch={client_batch}",
                                                 "fed.num_clients=10", "fed.clients_per_round=7", *extra))
    fr = FederatedTrainer(cfg, LocalCommunicator())
    start = fr.global_vec.clone()
    rows = [fr.train_round(r).row() for r in (1, 2)]
    store = fr.client_parts.store
    local = [store.get_vec(c) for c in range(10)] if store is not None else []
    written = [store.written(c) for c in range(10)] if store is not None else []
    batched = fr.client_batch
    fr.close()
    return batched, fr.global_vec - start, local, written, rows


@pytest.mark.parametrize("extra", [("peft.method=lora", "peft.local=[lora_b]"),  # FedSA-LoRA
                                   ("peft.method=bias", "peft.local=[head]"),  # FedPer
                                   ("peft.method=lora", "peft.frozen=[lora_a]"),  # FFA-LoRA
                                   ("peft.method=lora", "peft.lora_ranks=[1,2,4]", "seed=3"),  # HetLoRA
                                   ("peft.method=lora", "peft.local=[lora_b]", "peft.lora_ranks=[2,4]",
                                    "privacy.mode=sample", "privacy.noise_multiplier=0.7",
                                    "privacy.seeded_noise=true")],
                         ids=["fedsa-lora", "local-head", "ffa-lora", "het-ranks", "local-ranks-dpsgd"])
def test_batched_equals_sequential_with_split_states(tmp_path, extra):
    """Clients trained 4 at once (their local parts and rank masks in their slots) give the global state, every
    client's local parts and the round rows of clients trained one after another (<= 1e-5)."""
    off = _split_rounds(tmp_path, "off", extra)
    four = _split_rounds(tmp_path, "4", extra)
    assert off[0] is None and four[0] == 4
    assert float((off[1] - four[1]).abs().max()) <= 1e-5 and float(off[1].abs().max()) > 1e-3
    assert off[3] == four[3]
    assert all(float((a - b).abs().max()) <= 1e-5 for a, b in zip(off[2], four[2]))
    if off[2]:
        assert any(float((v - off[2][0]).abs().max()) > 1e-3 for v in off[2])  # local parts really differ
    for a, b in zip(off[4], four[4]):
        for key in ("clients", "bytes_up", "bytes_down"):
            assert a[key] == b[key], key
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)


def test_client_batch_plan_counts_local_parts_in_a_slot(tmp_path, monkeypatch):
    """fed.client_batch=auto sizes a slot by every tensor it holds: the sent and the local ones."""
    import fedpeft_hpc.federated.engine as engine

    seen = []
    plan = engine.plan_client_batch
    monkeypatch.setattr(engine, "plan_client_batch", lambda cfg, model, layout, *a, **k: seen.append(layout.size)
                        or plan(cfg, model, layout, *a, **k))
    cfg = load_config(QUICKSTART, tiny_overrides(tmp_path / "r", "peft.method=lora", "peft.local=[lora_b,head]"))
    fr = engine.FederatedTrainer(cfg, LocalCommunicator())
    fr.close()
    assert seen == [A_FACTORS + B_FACTORS + HEAD] and fr.layout.size == A_FACTORS
    assert fr.client_batch is not None and fr.client_batch > 1
