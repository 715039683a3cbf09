"""Differential privacy: accounting against fresh Opacus accountants, per-sample clipping,
client-level clipping/noise, and user errors. Tiny models; every check is independent of
the code under test (per-sample gradients recomputed one sample at a time, epsilons from a
fresh accountant)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedpeft_hpc.config import load_config
from fedpeft_hpc.errors import ConfigError
from fedpeft_hpc.federated.sampling import Schedule
from fedpeft_hpc.privacy.noise import NoiseKey, fresh_secret
from fedpeft_hpc.utils.files import read_jsonl
from tests.conftest import QUICKSTART, run_cli, tiny_overrides

C_SMALL = 0.05  # small enough that every sample of the tests below gets clipped


def fresh_epsilon(accountant: str, history, delta: float) -> float:
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = [tuple(h) for h in history]
    return acc.get_epsilon(delta=delta)


def small_cfg(*extra: str):
    return load_config(QUICKSTART, ["model.pretrained=false", "fed.num_clients=1", "fed.clients_per_round=1",
                                    "fed.local_epochs=1", "data.batch_size=8", *extra])


def tiny_model(method: str):
    import timm

    from fedpeft_hpc.peft import apply_peft

    cfg = small_cfg(f"peft.method={method}", "peft.prompt_tokens=3", "peft.adapter_dim=4", "peft.lora_rank=2")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=2,
                              num_heads=2, num_classes=10)
    apply_peft(model, cfg.peft)
    if method in ("adapter", "lora"):  # zero-initialised up/B factors: give them a gradient path
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("up.weight") or n.endswith("lora_B.weight"):
                    p.normal_(0, 0.1)
    return model


def sample_dp(method: str, *extra: str, n: int = 60):
    from fedpeft_hpc.privacy.sample_dp import SampleDP

    cfg = small_cfg(f"peft.method={method}", "privacy.mode=sample", f"privacy.max_grad_norm={C_SMALL}",
                    "optim.momentum=0", "optim.weight_decay=0", "privacy.seeded_noise=true", *extra)
    dp = SampleDP(cfg.privacy, cfg.fed, cfg.data, client_sizes=[n], schedule=Schedule(0, 1, 1, 0.0), seed=0,
                  device="cpu")
    dp.use_noise(NoiseKey.seeded(0))
    return cfg, dp


def reference_per_sample_grads(model, params, x, y):
    """Each sample's own gradient, one forward/backward per sample, no Opacus involved."""
    out = []
    for i in range(len(y)):
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        out.append(torch.autograd.grad(loss, params))
    return out


# -- accounting helpers ------------------------------------------------------------------------
def test_accounting_helpers_wrap_opacus():
    from fedpeft_hpc.privacy.accounting import epsilon_of, noise_for

    hist = [(1.1, 0.25, 8), (1.1, 0.25, 8), (2.0, 0.5, 3)]
    assert epsilon_of(hist, 1e-3, "rdp") == pytest.approx(fresh_epsilon("rdp", hist, 1e-3), rel=1e-9)
    assert epsilon_of([], 1e-3, "rdp") == 0.0
    assert epsilon_of([(0.0, 0.5, 1)], 1e-3, "rdp") == math.inf
    sigma = noise_for(4.0, 1e-3, 0.25, 40, "rdp")
    eps = fresh_epsilon("rdp", [(sigma, 0.25, 40)], 1e-3)
    assert 0.95 * 4.0 <= eps <= 4.0
    with pytest.raises(ConfigError) as e:
        noise_for(1e-4, 1e-3, 0.25, 40, "rdp")
    assert e.value.key == "privacy.target_epsilon" and "40 DP steps" in str(e.value)


# -- sample-level DP: per-sample gradients and clipping -----------------------------------------
@pytest.mark.parametrize("method", ["bias", "adapter", "prompt", "lora"])
def test_per_sample_gradients_are_exact_and_clipped(method):
    from fedpeft_hpc.peft import peft_params

    torch.manual_seed(1)
    model = tiny_model(method)
    cfg, dp = sample_dp(method, "privacy.noise_multiplier=0")
    wrapped = dp.wrap_model(model)
    assert dp.functorch_modules == []  # every trainable module has an Opacus (or our) grad sampler
    params = list(peft_params(model).values())
    x, y = torch.randn(6, 3, 16, 16) * 3, torch.randint(0, 10, (6,))

    wrapped.disable_hooks()
    ref = reference_per_sample_grads(model, params, x, y)
    wrapped.enable_hooks()

    opt = dp.wrap_optimizer(torch.optim.SGD(params, lr=1.0), client=0, round_idx=1, num_samples=60)
    opt.zero_grad(set_to_none=True)
    wrapped.train()
    loss = F.cross_entropy(wrapped(x), y, reduction="sum") / len(y)
    loss.backward()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert getattr(p, "grad_sample", None) is None, f"frozen {name} got per-sample gradients"
    for j, p in enumerate(params):
        assert p.grad_sample.shape == (6, *p.shape)
        torch.testing.assert_close(p.grad_sample, torch.stack([r[j] for r in ref]), atol=1e-5, rtol=1e-4)

    # clipping: the whole PEFT gradient of each sample is scaled to norm <= C before summing
    norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in r)) for r in ref])
    assert (norms > C_SMALL).all()  # the test really exercises clipping
    factors = (C_SMALL / norms).clamp(max=1.0)
    for i in range(6):
        clipped = torch.sqrt(sum((factors[i] * g).pow(2).sum() for g in ref[i]))
        assert clipped <= C_SMALL + 1e-6
    before = [p.detach().clone() for p in params]
    opt.step()  # noise multiplier 0: the update is exactly -lr * sum(clipped) / expected batch size
    expected_batch = 60 / math.ceil(60 / 8)  # q * n with q = 1 / ceil(n / B), not B
    for j, p in enumerate(params):
        clipped_sum = sum(factors[i] * ref[i][j] for i in range(6))
        torch.testing.assert_close(p.summed_grad, clipped_sum, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(before[j] - p.detach(), clipped_sum / expected_batch, atol=1e-6, rtol=1e-4)
    total = torch.sqrt(sum(p.summed_grad.pow(2).sum() for p in params))
    assert total <= 6 * C_SMALL + 1e-6


def test_full_fine_tuning_works_through_functorch_and_empty_batches():
    from fedpeft_hpc.peft import peft_params

    torch.manual_seed(2)
    model = tiny_model("full")
    cfg, dp = sample_dp("full", "privacy.noise_multiplier=1.0")
    wrapped = dp.wrap_model(model)
    assert dp.functorch_modules == ["<root>"]  # cls_token/pos_embed live on the root module
    params = list(peft_params(model).values())
    x, y = torch.randn(3, 3, 16, 16), torch.randint(0, 10, (3,))
    wrapped.disable_hooks()
    ref = reference_per_sample_grads(model, params, x, y)
    wrapped.enable_hooks()
    opt = dp.wrap_optimizer(torch.optim.SGD(params, lr=0.1), client=0, round_idx=1, num_samples=60)
    wrapped.train()
    for batch in (3, 0, 2):  # an empty Poisson batch is a (noise-only) step, not an error
        opt.zero_grad(set_to_none=True)
        before = [p.detach().clone() for p in params]
        out = wrapped(x[:batch])
        loss = F.cross_entropy(out, y[:batch], reduction="sum") / max(1, batch)
        loss.backward()
        if batch == 3:
            for j in (0, len(params) // 2, len(params) - 1):
                torch.testing.assert_close(params[j].grad_sample, torch.stack([r[j] for r in ref]),
                                           atol=1e-5, rtol=1e-4)
        opt.step()
        moved = sum(float((b - p.detach()).abs().sum()) for b, p in zip(before, params))
        assert math.isfinite(moved) and moved > 0  # noise was added even for the empty batch


def test_poisson_batches_follow_the_accounted_sampling():
    cfg, dp = sample_dp("bias", "privacy.noise_multiplier=1.0", "fed.local_epochs=2", n=50)
    from fedpeft_hpc.data.datasets import TensorImageDataset
    from fedpeft_hpc.utils.streams import torch_generator

    ds = TensorImageDataset(torch.randn(200, 3, 16, 16), torch.arange(200))  # label = index
    idx = np.arange(100, 150)

    def draw(seed):
        return [y.tolist() for _, y in dp.client_batches(ds, idx, 8, 2, torch_generator(seed, 1), 0)]

    batches = draw(3)
    assert len(batches) == 2 * math.ceil(50 / 8) == 2 * dp.steps_per_epoch[0]
    assert dp.sample_rates[0] == 1 / 7
    assert draw(3) == batches and draw(4) != batches
    seen = [t for b in batches for t in b]
    assert len({len(b) for b in batches}) > 1  # Poisson: sizes vary
    assert set(seen) <= set(idx.tolist())
    many = [len(y) for s in range(40) for _, y in dp.client_batches(ds, idx, 8, 2, torch_generator(s, 1), 0)]
    assert abs(np.mean(many) - 50 / 7) < 0.6


def test_noise_from_target_epsilon_is_per_client_and_meets_the_target():
    from fedpeft_hpc.privacy.sample_dp import SampleDP

    cfg = load_config(QUICKSTART, ["privacy.mode=sample", "privacy.target_epsilon=4", "privacy.delta=1e-3",
                                   "fed.num_clients=4", "fed.clients_per_round=2", "fed.rounds=3",
                                   "fed.local_epochs=2", "data.batch_size=16"])
    schedule = Schedule(cfg.seed, 4, 2, 0.0)
    sizes = [40, 40, 70, 16]
    dp = SampleDP(cfg.privacy, cfg.fed, cfg.data, client_sizes=sizes, schedule=schedule, seed=cfg.seed, device="cpu")
    part = schedule.participation(3)
    for r in range(1, 4):
        dp.account(r, schedule.returning(r))
    for k in range(4):
        steps = int(part[k]) * 2 * math.ceil(sizes[k] / 16)
        if steps == 0:
            assert dp.noise[k] is None
            continue
        eps = fresh_epsilon("rdp", [(dp.noise[k], 1 / math.ceil(sizes[k] / 16), steps)], 1e-3)
        assert 0.95 * 4 <= eps <= 4
        assert dp.client_epsilon(k) == pytest.approx(eps, rel=1e-9)
    state = json.loads(json.dumps(dp.state_dict()))
    again = SampleDP(cfg.privacy, cfg.fed, cfg.data, client_sizes=sizes, schedule=schedule, seed=cfg.seed,
                     device="cpu")
    again.load_state_dict(state)
    assert again.report() == dp.report()


# -- end to end: the run's reported epsilon is what a fresh accountant says --------------------
def test_sample_dp_run_reports_the_epsilon_it_spent(tmp_path):
    from fedpeft_hpc.train import train

    import shutil

    from fedpeft_hpc.runs.checkpoint import load_checkpoint

    d = tmp_path / "s"
    cfg = load_config(QUICKSTART, tiny_overrides(d, "peft.method=prompt", "privacy.mode=sample", "fed.rounds=3",
                                                 "privacy.target_epsilon=3", "privacy.delta=1e-3",
                                                 "run.keep_checkpoints=3", "privacy.seeded_noise=true"))
    summary = train(cfg)
    rep = json.loads((d / "privacy.json").read_text())
    rows = read_jsonl(d / "metrics.jsonl")
    sizes = [len(c) for c in json.loads((d / "partition.json").read_text())["clients"]]
    part = Schedule(cfg.seed, cfg.fed.num_clients, cfg.fed.clients_per_round, cfg.fed.dropout).participation(3)
    eps = []
    for k, c in rep["clients"].items():
        k = int(k)
        s = math.ceil(sizes[k] / cfg.data.batch_size)
        assert c["num_samples"] == sizes[k] and c["sample_rate"] == 1 / s and c["rounds"] == part[k]
        assert c["steps"] == part[k] * cfg.fed.local_epochs * s
        e = fresh_epsilon("rdp", [(c["noise_multiplier"], c["sample_rate"], c["steps"])], rep["delta"]) \
            if c["steps"] else 0.0
        assert c["epsilon"] == pytest.approx(e, rel=1e-9)
        eps.append(e)
    assert rep["epsilon"] == pytest.approx(max(eps), rel=1e-9)
    assert rows[-1]["epsilon"] == summary["epsilon"] == rep["epsilon"]
    assert rows[-1]["delta"] == summary["delta"] == 1e-3
    assert rows[0]["epsilon"] <= rows[-1]["epsilon"]
    assert 0.95 * 3 <= rep["epsilon"] <= 3
    assert json.loads((d / "summary.json").read_text())["epsilon"] == rep["epsilon"]

    # killed after round 2 and resumed: the accountant's state comes back from the checkpoint
    final = load_checkpoint(d / "checkpoints" / "latest.safetensors")
    shutil.copy(d / "checkpoints" / "round_00002.safetensors", d / "checkpoints" / "latest.safetensors")
    (d / "summary.json").unlink()
    (d / "privacy.json").unlink()
    assert train(cfg) == summary
    assert json.loads((d / "privacy.json").read_text()) == rep
    again = load_checkpoint(d / "checkpoints" / "latest.safetensors")
    assert all(torch.equal(final.peft[k], again.peft[k]) for k in final.peft)


def wor_epsilon_fresh(accounted_sigma: float, num_clients: int, cohort: int, steps: int, delta: float) -> float:
    """dp-accounting's RDP bound for ``steps`` rounds of ``cohort`` of ``num_clients`` without replacement."""
    import dp_accounting as dpa
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    acc.compose(dpa.SampledWithoutReplacementDpEvent(num_clients, cohort, dpa.GaussianDpEvent(accounted_sigma)), steps)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("sampling,accountant", [("poisson", "prv"), ("fixed", "rdp")])
def test_client_dp_run_reports_the_epsilon_it_spent(tmp_path, sampling, accountant):
    """Recomputed with a fresh accountant: Poisson cohorts are one subsampled-Gaussian step per round
    with the noise multiplier actually used (Opacus); fixed-size cohorts are sampled without replacement
    under replace-one, sensitivity 2C, so dp-accounting's analysis of that sampling must see half that
    noise multiplier."""
    from fedpeft_hpc.train import train

    d = tmp_path / "c"
    cfg = load_config(QUICKSTART, tiny_overrides(d, "peft.method=bias", "privacy.mode=client",
                                                 "privacy.target_epsilon=20", f"privacy.accountant={accountant}",
                                                 f"fed.sampling={sampling}"))
    summary = train(cfg)
    rep = json.loads((d / "privacy.json").read_text())
    rows = read_jsonl(d / "metrics.jsonl")
    n, m = cfg.fed.num_clients, cfg.fed.clients_per_round
    q = m / n
    assert rep["sample_rate"] == q and rep["steps"] == cfg.fed.rounds == 2
    assert rep["cohort_sampling"] == sampling
    sigma = rep["noise_multiplier"]  # noise std / C actually added
    accounted = sigma if sampling == "poisson" else sigma / 2
    assert rep["sampling"].startswith("Poisson cohorts" if sampling == "poisson" else "fixed-size cohorts")
    assert rep["sensitivity"] == ("C" if sampling == "poisson" else "2C")
    if sampling == "poisson":
        e, e1 = (fresh_epsilon("prv", [(accounted, q, s)], cfg.privacy.delta) for s in (2, 1))
    else:
        e, e1 = (wor_epsilon_fresh(accounted, n, m, s, cfg.privacy.delta) for s in (2, 1))
    assert rows[-1]["epsilon"] == summary["epsilon"] == rep["epsilon"] == pytest.approx(e, rel=1e-9)
    assert 0.95 * 20 <= rep["epsilon"] <= 20
    assert rows[0]["epsilon"] == pytest.approx(e1, rel=1e-9)
    # cohorts are drawn from the secret noise key: test_client_dp_cohorts_come_from_the_noise_key


def test_fixed_cohorts_are_accounted_as_sampling_without_replacement():
    """The quickstart's setting (20 rounds of 8 of 16 clients, delta 1e-5): the epsilon reported for fixed
    cohorts is dp-accounting's sampled-without-replacement bound at the noise used, and the calibrated noise
    spends at most the target by that bound (the Poisson analysis at sigma/2 reported 5.0 where it gives 9.6)."""
    from fedpeft_hpc.privacy.client_dp import ClientDP

    over = ["privacy.mode=client", "fed.sampling=fixed", "fed.num_clients=16", "fed.clients_per_round=8",
            "fed.rounds=20", "privacy.delta=1.0e-5"]

    def twenty_rounds(*extra):
        cfg = load_config(QUICKSTART, over + list(extra))
        dp = ClientDP(cfg.privacy, cfg.fed, seed=0, sampling="fixed")
        for r in range(1, 21):
            dp.account(r, [])
        return dp

    fixed = twenty_rounds("privacy.target_epsilon=5")
    sigma = fixed.noise_multiplier
    assert fixed.epsilon() == pytest.approx(wor_epsilon_fresh(sigma / 2, 16, 8, 20, 1e-5), rel=1e-9)
    assert fixed.epsilon() <= 5.0 < wor_epsilon_fresh((sigma - 0.002) / 2, 16, 8, 20, 1e-5)  # tight, from above
    given = twenty_rounds("privacy.noise_multiplier=4.746")
    assert given.epsilon() == pytest.approx(wor_epsilon_fresh(4.746 / 2, 16, 8, 20, 1e-5), rel=1e-9)
    assert given.epsilon() > 9.0
    assert "SampledWithoutReplacementDpEvent" in given.report()["analysis"]
    with pytest.raises(ConfigError) as e:
        load_config(QUICKSTART, over + ["privacy.target_epsilon=5", "privacy.accountant=prv"])
    assert e.value.key == "privacy.accountant"


def test_poisson_cohorts_draw_each_client_with_probability_q():
    s = Schedule(3, 50, 10, 0.0, "poisson")
    sizes = [len(s.cohort(r)) for r in range(1, 401)]
    assert len(set(sizes)) > 5  # the size varies
    assert abs(np.mean(sizes) - 10) < 0.6  # E = q N = 10
    counts = np.bincount(np.concatenate([s.cohort(r) for r in range(1, 401)]), minlength=50)
    assert counts.min() > 40 and counts.max() < 130  # each client about 400 * 0.2 = 80 times
    assert s.cohort(7) == Schedule(3, 50, 10, 0.0, "poisson").cohort(7)  # a pure function of (seed, round)


# -- client-level DP units ---------------------------------------------------------------------
def client_dp(*extra: str):
    from fedpeft_hpc.privacy.client_dp import ClientDP

    cfg = load_config(QUICKSTART, ["privacy.mode=client", "privacy.max_grad_norm=0.5", "fed.num_clients=10",
                                   "fed.clients_per_round=4", "privacy.seeded_noise=true", *extra])
    dp = ClientDP(cfg.privacy, cfg.fed, seed=7, sampling="poisson")
    dp.use_noise(NoiseKey.seeded(7))
    return dp


def test_client_dp_clips_each_update_and_weighs_it_one():
    dp = client_dp("privacy.noise_multiplier=1.0")
    big = torch.full((1000,), 3.0)
    vec, w = dp.client_update(big, 123)
    assert w == 1.0
    assert float(vec.norm()) == pytest.approx(0.5, rel=1e-6)
    torch.testing.assert_close(vec / vec.norm(), big / big.norm())  # direction kept
    small = torch.full((1000,), 1e-3)
    vec, _ = dp.client_update(small, 5)
    torch.testing.assert_close(vec, small)


def test_client_dp_noise_is_once_per_round_deterministic_and_divided_by_the_cohort():
    dp, other = client_dp("privacy.noise_multiplier=2.0"), client_dp("privacy.noise_multiplier=2.0")
    s = torch.zeros(20000, dtype=torch.float64)
    a = dp.finalize(s, 3.0, round_idx=5)
    torch.testing.assert_close(a, other.finalize(s.clone(), 1.0, round_idx=5), rtol=0, atol=0)
    b = dp.finalize(s, 3.0, round_idx=6)
    assert not torch.equal(a, b)
    assert a.dtype == torch.float64
    assert float(a.std()) == pytest.approx(2.0 * 0.5 / 4, rel=0.03)  # sigma * C / m
    clean = client_dp("privacy.noise_multiplier=0")
    upd = torch.randn(50, dtype=torch.float64)
    torch.testing.assert_close(clean.finalize(upd, 2.0, 1), upd / 4)  # m = 4, not the 2 that returned
    for r in range(1, 4):
        dp.account(r, [0, 1] if r != 2 else [])  # every round is a step, whoever trained
    assert dp.report()["steps"] == 3
    state = json.loads(json.dumps(dp.state_dict()))
    other.load_state_dict(state)
    assert other.epsilon() == dp.epsilon() == pytest.approx(
        fresh_epsilon("rdp", [(2.0, 0.4, 3)], dp.delta), rel=1e-9)


# -- user errors -------------------------------------------------------------------------------
@pytest.mark.parametrize("bad,key", [
    ("privacy.target_epsilon=0.0001", "privacy.target_epsilon"),
    ("privacy.delta=1.5", "privacy.delta"),
    ("privacy.noise_multiplier=-1", "privacy.noise_multiplier"),
])
def test_bad_privacy_settings_exit_2_with_a_message(tmp_path, bad, key):
    r = run_cli("train", str(QUICKSTART), *tiny_overrides(tmp_path / "r", "privacy.mode=sample", bad))
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert key in r.stderr


# -- the same noise whatever the number of processes -------------------------------------------
@pytest.mark.multiproc
@pytest.mark.parametrize("mode", ["client", "sample"])
def test_dp_runs_are_identical_on_one_and_two_ranks(tmp_path, mode):
    import subprocess
    import sys

    from fedpeft_hpc.runs.checkpoint import load_checkpoint
    from fedpeft_hpc.train import train
    from tests.conftest import REPO, subprocess_env

    args = ["train", str(QUICKSTART), f"privacy.mode={mode}", "privacy.noise_multiplier=0.7",
            "privacy.seeded_noise=true"]
    train(load_config(QUICKSTART, [*args[2:], *tiny_overrides(tmp_path / "one")]))  # one process, in this one
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "fedpeft_hpc", *args, *tiny_overrides(tmp_path / "two")], capture_output=True,
                         text=True, timeout=300, env=subprocess_env(), cwd=REPO)
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_checkpoint(tmp_path / "one" / "checkpoints" / "latest.safetensors").peft
    b = load_checkpoint(tmp_path / "two" / "checkpoints" / "latest.safetensors").peft
    assert all(torch.equal(a[k], b[k]) for k in a)
    pa, pb = (json.loads((tmp_path / d / "privacy.json").read_text()) for d in ("one", "two"))
    # the release section lists the fields written, and two processes add the all-reduce's own fields
    ra, rb = pa.pop("release"), pb.pop("release")
    assert pa == pb and pa["epsilon"] > 0 and ra["policy"] == rb["policy"] == "covered"
    assert set(rb["metrics_fields_written"]) - set(ra["metrics_fields_written"]) <= {
        "allreduce_bytes", "allreduce_ring_bytes", "allreduce_calls", "allreduce_backend", "world_size"}


# -- noise nobody can regenerate ----------------------------------------------------------------
def test_secret_noise_cannot_be_regenerated_from_the_seed():
    from fedpeft_hpc.privacy.client_dp import ClientDP

    cfg = load_config(QUICKSTART, ["privacy.mode=client", "privacy.noise_multiplier=1.0"])
    assert cfg.privacy.seeded_noise is False  # the default
    draws = []
    for _ in range(2):
        dp = ClientDP(cfg.privacy, cfg.fed, seed=cfg.seed, sampling="poisson")
        dp.use_noise(NoiseKey.from_secret(fresh_secret()))
        draws.append(dp.noise(1000, round_idx=1))
    seeded = load_config(QUICKSTART, ["privacy.mode=client", "privacy.noise_multiplier=1.0",
                                      "privacy.seeded_noise=true"])
    dp = ClientDP(seeded.privacy, seeded.fed, seed=cfg.seed, sampling="poisson")
    dp.use_noise(NoiseKey.seeded(cfg.seed))
    from_seed = dp.noise(1000, round_idx=1)
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], from_seed)
    assert float(draws[0].std()) == pytest.approx(1.0 * cfg.privacy.max_grad_norm, rel=0.1)  # still N(0, (sigma C)^2)
    with pytest.raises(ValueError):
        dp.use_noise(NoiseKey.from_secret(fresh_secret()))  # a secret where the config asked for the seed


@pytest.mark.parametrize("mode", ["client", "sample"])
def test_dp_runs_use_secret_noise_by_default_and_say_which_noise(tmp_path, mode):
    from fedpeft_hpc.train import train

    def go(name, *extra):
        cfg = load_config(QUICKSTART, tiny_overrides(tmp_path / name, "peft.method=bias", f"privacy.mode={mode}",
                                                     "privacy.noise_multiplier=1.0", "fed.rounds=1", *extra))
        summary = train(cfg)
        from fedpeft_hpc.runs.checkpoint import load_checkpoint

        state = load_checkpoint(tmp_path / name / "checkpoints" / "latest.safetensors").peft
        return summary, json.loads((tmp_path / name / "privacy.json").read_text()), state

    s1, p1, a = go("secret1")
    s2, _, b = go("secret2")
    assert s1["seeded_noise"] is False and p1["seeded_noise"] is False and "secret" in p1["noise_source"]
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the same config and seed, other noise
    s3, p3, c = go("seeded1", "privacy.seeded_noise=true")
    _, _, d = go("seeded2", "privacy.seeded_noise=true")
    assert s3["seeded_noise"] is True and p3["seeded_noise"] is True
    assert all(torch.equal(c[k], d[k]) for k in c)
    assert "privacy.seeded_noise=true" in (tmp_path / "seeded1" / "train.log").read_text()
    assert "epsilon_covers" in p1 and "train_loss" in p1["release"]["withheld"]


# -- membership (DP-SGD batches, client-level cohorts) hidden by the noise key -------------------
def _trainer(tmp_path, name, *extra):
    from fedpeft_hpc.comm import LocalCommunicator
    from fedpeft_hpc.federated.engine import FederatedTrainer

    cfg = load_config(QUICKSTART, tiny_overrides(tmp_path / name, "fed.num_clients=16", *extra))
    trainer = FederatedTrainer(cfg, LocalCommunicator())
    trainer.close()
    return trainer


def _batch_labels(trainer, rounds=(1, 2)):
    return [[y.tolist() for _, y in trainer._client_batches(r, c)]
            for r in rounds for c in range(trainer.cfg.fed.num_clients)]


def _cohorts(trainer, rounds=range(1, 21)):
    return [(trainer.fed.schedule.cohort(r), trainer.fed.schedule.returning(r)) for r in rounds]


@pytest.mark.parametrize("client_batch", ["off", "2"])
def test_dp_sgd_batch_membership_comes_from_the_noise_key(tmp_path, client_batch):
    """Sample-level DP: with secret noise two runs of one seed draw other Poisson batches (the
    subsampling the accountant credits is hidden); with seeded noise exactly the seed's batches,
    as plain FedAvg draws them. The cohort stays public (the seed's) in this mode."""
    extra = ("privacy.mode=sample", "privacy.noise_multiplier=1.0", f"fed.client_batch={client_batch}")
    a, b = _trainer(tmp_path, "a", *extra), _trainer(tmp_path, "b", *extra)
    assert _batch_labels(a) != _batch_labels(b)
    assert _cohorts(a) == _cohorts(b) == [(Schedule(a.cfg.seed, 16, 4, 0.0).cohort(r),) * 2 for r in range(1, 21)]
    s1, s2 = (_trainer(tmp_path, n, *extra, "privacy.seeded_noise=true") for n in ("s1", "s2"))
    assert _batch_labels(s1) == _batch_labels(s2)
    from fedpeft_hpc.utils.streams import CLIENT_DATA, torch_generator

    gen, ref = s1.fed.privacy.batch_generator(s1.cfg.seed, 3, 5), torch_generator(s1.cfg.seed, CLIENT_DATA, 3, 5)
    assert torch.equal(torch.rand(20, generator=gen), torch.rand(20, generator=ref))  # today's seeded draws


@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
def test_client_dp_cohorts_come_from_the_noise_key(tmp_path, sampling):
    extra = ("privacy.mode=client", "privacy.noise_multiplier=1.0", f"fed.sampling={sampling}", "fed.dropout=0.3")
    a, b = _trainer(tmp_path, "a", *extra), _trainer(tmp_path, "b", *extra)
    assert _cohorts(a) != _cohorts(b)
    public = Schedule(a.cfg.seed, 16, 4, 0.3, sampling)
    assert _cohorts(a) != [(public.cohort(r), public.returning(r)) for r in range(1, 21)]
    if sampling == "fixed":
        assert all(len(c) == 4 for c, _ in _cohorts(a))
    s1, s2 = (_trainer(tmp_path, n, *extra, "privacy.seeded_noise=true") for n in ("s1", "s2"))
    assert _cohorts(s1) == _cohorts(s2) == [(public.cohort(r), public.returning(r)) for r in range(1, 21)]


def test_poisson_cohorts_from_a_secret_key_keep_the_sampling_rate():
    s = Schedule(3, 50, 10, 0.0, "poisson")
    s.use_key(NoiseKey.from_secret(fresh_secret()))
    sizes = [len(s.cohort(r)) for r in range(1, 401)]
    assert abs(np.mean(sizes) - 10) < 1.0 and np.std(sizes) > 1.0
    assert s.cohort(7) == s.cohort(7)  # the same on every call (and every rank holding the key)


# -- resume under DP: rounds run again are charged again -----------------------------------------
def _interrupt_after(d, round_idx):
    """A kill after ``round_idx``'s checkpoint but after later rounds' metrics rows were written."""
    import shutil

    shutil.copy(d / "checkpoints" / f"round_{round_idx:05d}.safetensors", d / "checkpoints" / "latest.safetensors")
    (d / "summary.json").unlink()


@pytest.mark.parametrize("seeded", [False, True])
def test_client_dp_resume_charges_the_rounds_it_runs_again(tmp_path, seeded):
    from fedpeft_hpc.train import train

    d = tmp_path / "r"
    cfg = load_config(QUICKSTART, tiny_overrides(d, "peft.method=bias", "privacy.mode=client", "fed.rounds=3",
                                                 "privacy.noise_multiplier=1.5", "run.keep_checkpoints=3",
                                                 f"privacy.seeded_noise={str(seeded).lower()}"))
    first = train(cfg)
    _interrupt_after(d, 1)
    again = train(cfg)
    rep = json.loads((d / "privacy.json").read_text())
    q = cfg.fed.clients_per_round / cfg.fed.num_clients
    assert [r["round"] for r in read_jsonl(d / "metrics.jsonl")] == [1, 2, 3]
    moved = read_jsonl(d / "metrics.superseded.jsonl")
    assert [(r["round"], r["superseded_at_resume_from"]) for r in moved] == [(2, 1), (3, 1)]
    if seeded:  # the re-run is identical: nothing new released, nothing charged
        assert rep["rounds_charged_again"] == again["rounds_charged_again"] == [] and rep["steps"] == 3
        assert again == first
    else:
        assert rep["rounds_charged_again"] == again["rounds_charged_again"] == [2, 3] and rep["steps"] == 5
        assert again["epsilon"] == rep["epsilon"] == pytest.approx(
            fresh_epsilon("rdp", [(1.5, q, 5)], cfg.privacy.delta), rel=1e-9)
        assert "charged to the accountant a second time" in (d / "train.log").read_text()


def test_sample_dp_resume_charges_the_clients_of_the_rounds_it_runs_again(tmp_path):
    from fedpeft_hpc.train import train

    d = tmp_path / "r"
    cfg = load_config(QUICKSTART, tiny_overrides(d, "peft.method=bias", "privacy.mode=sample", "fed.rounds=3",
                                                 "privacy.noise_multiplier=1.5", "run.keep_checkpoints=3"))
    train(cfg)
    _interrupt_after(d, 2)
    train(cfg)
    rep = json.loads((d / "privacy.json").read_text())
    assert rep["rounds_charged_again"] == [3]
    sched = Schedule(cfg.seed, cfg.fed.num_clients, cfg.fed.clients_per_round, cfg.fed.dropout)
    rounds = sched.participation(3) + np.bincount(sched.returning(3), minlength=cfg.fed.num_clients)
    for k, c in rep["clients"].items():
        assert c["rounds"] == rounds[int(k)]
        assert c["steps"] == rounds[int(k)] * c["steps_per_round"]


def test_rerun_rounds_count_earlier_resumes_not_yet_in_a_checkpoint(tmp_path):
    from fedpeft_hpc.runs.rundir import RunDir

    rd = RunDir(tmp_path)
    rows = lambda rs, **kw: "".join(json.dumps({"round": r, **kw}) + "\n" for r in rs)  # noqa: E731
    (tmp_path / "metrics.jsonl").write_text(rows([1, 2, 3, 4, 5, 6, 7]))
    # a resume from round 4 had moved rounds 5; one from round 2 had moved rounds 3, 4 (both since a new checkpoint)
    (tmp_path / "metrics.superseded.jsonl").write_text(rows([3, 4], superseded_at_resume_from=2)
                                                      + rows([5], superseded_at_resume_from=4))
    assert rd.rerun_rounds(4) == [5, 5, 6, 7]  # round 5 ran twice before; the resume from 2 is in checkpoint 4
    assert rd.rerun_rounds(6) == [7]


# -- client-level DP applies every round --------------------------------------------------------
def test_client_dp_applies_a_round_without_updates_as_noise_alone(tmp_path):
    """No update arrives (every client drops): the round still releases the noised sum (noise alone,
    divided by the cohort size), so whether a round was applied says nothing about the cohort."""
    from fedpeft_hpc.models import build_model
    from fedpeft_hpc.peft import peft_params
    from fedpeft_hpc.runs.checkpoint import load_checkpoint
    from fedpeft_hpc.train import train

    d = tmp_path / "r"
    cfg = load_config(QUICKSTART, tiny_overrides(d, "peft.method=bias", "privacy.mode=client", "fed.dropout=1.0",
                                                 "privacy.noise_multiplier=1.0", "privacy.seeded_noise=true",
                                                 "privacy.release=all"))
    train(cfg)
    rows = read_jsonl(d / "metrics.jsonl")
    assert all(not r["skipped"] and r["clients"] == 0 for r in rows)
    init = peft_params(build_model(cfg.model, cfg.peft, cfg.seed).model)
    ckpt = load_checkpoint(d / "checkpoints" / "latest.safetensors")
    moved = torch.cat([(ckpt.peft[k] - init[k].detach()).flatten() for k in init])
    std = cfg.privacy.noise_multiplier * cfg.privacy.max_grad_norm / cfg.fed.clients_per_round
    assert float(moved.norm()) > 0 and float(moved.std()) == pytest.approx(std * math.sqrt(cfg.fed.rounds), rel=0.5)


def test_client_dp_refuses_min_clients_above_one(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(QUICKSTART, ["privacy.mode=client", "privacy.noise_multiplier=1", "fed.min_clients=2"])
    assert e.value.key == "fed.min_clients"
    load_config(QUICKSTART, ["privacy.mode=sample", "privacy.noise_multiplier=1", "fed.min_clients=2"])
    r = run_cli("train", str(QUICKSTART), *tiny_overrides(tmp_path / "r", "privacy.mode=client",
                                                          "privacy.noise_multiplier=1", "fed.min_clients=2"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "fed.min_clients" in r.stderr
    assert not (tmp_path / "r").exists()


# -- delta ---------------------------------------------------------------------------------------
def test_delta_must_be_below_one_and_accountant_failures_name_it():
    from fedpeft_hpc.privacy.accounting import epsilon_of, noise_for

    for bad in ("1", "1.0"):
        with pytest.raises(ConfigError) as e:
            load_config(QUICKSTART, [f"privacy.delta={bad}"])
        assert e.value.key == "privacy.delta" and "< 1" in str(e.value)
    with pytest.raises(ConfigError) as e:
        epsilon_of([(1.0, 0.1, 10)], 0.999999, "prv")  # Opacus: RuntimeError "Cannot compute epsilon"
    assert e.value.key == "privacy.delta"
    with pytest.raises(ConfigError) as e:
        noise_for(5.0, 0.99, 0.1, 10, "prv")
    assert e.value.key == "privacy.delta"
    assert epsilon_of([(1.0, 0.1, 10)], 0.5, "rdp") == 0.0  # the accountant's negative value is no guarantee


# -- bf16 ----------------------------------------------------------------------------------------
def test_bf16_per_sample_clipping_bounds_each_sample_by_c():
    """Under bf16 autocast Opacus' per-sample gradients are bf16; the clipping norm must be computed
    after the cast to fp32, or a norm rounded down lets a clipped gradient exceed C."""
    from fedpeft_hpc.models.precision import compute_precision
    from fedpeft_hpc.peft import peft_params

    torch.manual_seed(3)
    model = tiny_model("lora")
    cfg, dp = sample_dp("lora", "privacy.noise_multiplier=0", "model.precision=bf16")
    wrapped = dp.wrap_model(model)
    params = list(peft_params(model).values())
    opt = dp.wrap_optimizer(torch.optim.SGD(params, lr=0.0), client=0, round_idx=1, num_samples=60)
    wrapped.train()
    worst = 0.0
    for i in range(40):  # one sample per step: summed_grad is that sample's clipped gradient
        x, y = torch.randn(1, 3, 16, 16) * 3, torch.randint(0, 10, (1,))
        opt.zero_grad(set_to_none=True)
        with compute_precision("bf16", torch.device("cpu")):
            loss = F.cross_entropy(wrapped(x).float(), y)
        loss.backward()
        assert any(p.grad_sample.dtype == torch.bfloat16 for p in params)  # the case under test
        opt.step()
        worst = max(worst, float(torch.sqrt(sum(p.summed_grad.double().pow(2).sum() for p in params))))
    assert C_SMALL * 0.99 < worst <= C_SMALL * (1 + 1e-5)
