"""Client batching (``fed.client_batch``): K clients trained in one forward/backward must give
each client exactly the update sequential training gives it (fp32: max abs difference <= 1e-5),
for every batched method, with and without sample-level DP-SGD, with uneven client sizes and
step counts (slots refilled as clients finish). The references are the sequential path itself
(``local_train`` with torch.optim, and Opacus's DPOptimizer for DP) and torch.optim for the
stacked optimizers."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from fedpeft_hpc.config import load_config
from fedpeft_hpc.federated.batched import BatchedClientTrainer, ClientJob
from fedpeft_hpc.federated.client import local_train, make_optimizer
from fedpeft_hpc.peft.state import FlatLayout
from fedpeft_hpc.federated.sampling import Schedule
from fedpeft_hpc.utils.streams import CLIENT_DATA, torch_generator
from fedpeft_hpc.federated.stacked_optim import StackedOptimizer
from fedpeft_hpc.peft import peft_params
from tests.conftest import QUICKSTART, tiny_overrides

TOL = 1e-5
BATCHED = ["head", "bias", "adapter", "prompt", "lora"]
SIZES = [37, 16, 5, 50, 23]  # uneven: 1 to 7 steps per epoch, last batches partial
DP_SIZES = [3, 6, 11, 26, 9]  # with batch 2: Poisson batches of 0 to ~6 samples


@pytest.fixture(autouse=True)
def one_thread():
    """CI has 2 cores shared by everything: one intra-op thread keeps these tests fast and steady."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- the stacked optimizers against torch.optim ------------------------------------------------
OPTIMS = {
    "sgd-nesterov-wd": ["optim.name=sgd", "optim.lr=0.1", "optim.momentum=0.9", "optim.nesterov=true",
                        "optim.weight_decay=0.01"],
    "sgd-momentum": ["optim.name=sgd", "optim.lr=0.1", "optim.momentum=0.5", "optim.nesterov=false",
                     "optim.weight_decay=0"],
    "sgd-plain-wd": ["optim.name=sgd", "optim.lr=0.1", "optim.momentum=0", "optim.weight_decay=0.1"],
    "adamw-wd": ["optim.name=adamw", "optim.lr=0.01", "optim.weight_decay=0.1", "optim.betas=[0.8, 0.95]"],
}


@pytest.mark.parametrize("optim", list(OPTIMS))
def test_stacked_optimizer_is_torch_optim_per_row(optim):
    """Rows step at different times (a slot is refilled mid-way): each row follows its own torch.optim."""
    from fedpeft_hpc.federated.slots import SlotStore

    cfg = load_config(QUICKSTART, OPTIMS[optim]).optim
    g = torch.Generator().manual_seed(0)
    shapes = {"a": (4, 3), "b": (5,)}
    store = SlotStore(FlatLayout({n: torch.zeros(s) for n, s in shapes.items()}), 3, "cpu")
    stacked = store.views()
    opt = StackedOptimizer(store, cfg)
    # which rows step at each step; at step 3 row 1 gets a new client (reset) that then steps on
    plan = [[0, 1, 2], [0, 1, 2], [0, 2], "reset1", [0, 1], [1, 2], [0, 1, 2], [1]]
    clients: dict[int, tuple[dict, torch.optim.Optimizer]] = {}

    def new_client(row: int) -> None:
        init = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
        store.load(row, init)
        ref = {n: torch.nn.Parameter(init[n].clone()) for n in shapes}
        clients[row] = (ref, make_optimizer(ref.values(), cfg))
        store.reset_buffers(row)

    for row in range(3):
        new_client(row)
    init = {n: t.clone() for n, t in stacked.items()}
    for rows in plan:
        if rows == "reset1":
            new_client(1)
            continue
        grads = {n: torch.randn(len(rows), *s, generator=g) for n, s in shapes.items()}
        full = {n: torch.randn(3, *s, generator=torch.Generator().manual_seed(9)) for n, s in shapes.items()}
        for n in shapes:  # the idle rows get a gradient too: it must be ignored
            full[n][rows] = grads[n]
        active = torch.tensor([r in rows for r in range(3)])
        idle = [r for r in range(3) if r not in rows]
        idle_before = {n: stacked[n][idle].clone() for n in shapes}
        opt.step(torch.cat([full[n].reshape(3, -1) for n in store.layout.names], dim=1), active)
        for i, r in enumerate(rows):
            ref, ref_opt = clients[r]
            for n in shapes:
                ref[n].grad = grads[n][i].clone()
            ref_opt.step()
        for n in shapes:  # rows that did not step did not move at all (no momentum or weight-decay drift)
            assert torch.equal(stacked[n][idle], idle_before[n])
        for r, (ref, _) in clients.items():
            for n in shapes:
                torch.testing.assert_close(stacked[n][r], ref[n].detach(), atol=1e-6, rtol=1e-6)
    assert all(float((stacked[n][0] - init[n][0]).abs().min()) > 1e-3 for n in shapes)  # really stepped


# -- batched vs sequential local training ------------------------------------------------------
def _setup(method: str, dp: bool, *extra: str, device: str = "cpu"):
    """Config, a fresh model (same seed every call) and a start state in which every PEFT tensor has a gradient."""
    from fedpeft_hpc.models import build_model

    sizes = DP_SIZES if dp else SIZES
    over = ["model.pretrained=false", f"peft.method={method}", "optim.lr=0.05", "optim.momentum=0.9",
            "optim.nesterov=true", "optim.weight_decay=0.01", "fed.local_epochs=2", f"fed.num_clients={len(sizes)}",
            f"fed.clients_per_round={len(sizes)}", f"data.batch_size={2 if dp else 8}"]
    if dp:  # seeded noise: batched and sequential must draw the same noise to compare
        over += ["privacy.mode=sample", "privacy.noise_multiplier=1.0", "privacy.max_grad_norm=0.05",
                 "privacy.seeded_noise=true"]
    cfg = load_config(QUICKSTART, [*over, *extra])
    model = build_model(cfg.model, cfg.peft, 0).model
    model.to(device)
    params = peft_params(model)
    layout = FlatLayout(params)
    start = layout.flatten(params, torch.float32)
    start += 0.05 * torch.randn(start.shape, generator=torch.Generator().manual_seed(0)).to(device)  # up, B != 0
    return cfg, sizes, model, params, layout, start


def _dataset(sizes):
    from fedpeft_hpc.data.datasets import TensorImageDataset

    g = torch.Generator().manual_seed(1)
    n = sum(sizes)
    ds = TensorImageDataset(torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g))
    offsets = np.cumsum([0, *sizes])
    return ds, [np.arange(offsets[k], offsets[k + 1]) for k in range(len(sizes))]


def _privacy(cfg, sizes, device="cpu"):
    from fedpeft_hpc.privacy import build_privacy

    from fedpeft_hpc.privacy import NoiseKey

    privacy = build_privacy(cfg, client_sizes=sizes, schedule=Schedule(0, len(sizes), len(sizes), 0.0),
                            device=device)
    privacy.use_noise(NoiseKey.seeded(cfg.seed))
    return privacy


def _batches(cfg, privacy, ds, parts, k):
    gen = torch_generator(cfg.seed, CLIENT_DATA, 1, k)
    return privacy.client_batches(ds, parts[k], cfg.data.batch_size, cfg.fed.local_epochs, gen)


def sequential(method, dp, *extra, device="cpu"):
    cfg, sizes, model, params, layout, start = _setup(method, dp, *extra, device=device)
    ds, parts = _dataset(sizes)
    privacy = _privacy(cfg, sizes, device)
    train_model = privacy.wrap_model(model)
    out = {}
    for k in range(len(sizes)):
        opt = privacy.wrap_optimizer(make_optimizer(params.values(), cfg.optim), k, 1, sizes[k])
        out[k] = local_train(train_model, params, layout, start, _batches(cfg, privacy, ds, parts, k), opt,
                             torch.device(device))
    return out


def batched(method, dp, slots, *extra, device="cpu"):
    cfg, sizes, model, params, layout, start = _setup(method, dp, *extra, device=device)
    ds, parts = _dataset(sizes)
    privacy = _privacy(cfg, sizes, device)
    trainer = BatchedClientTrainer(model, layout, cfg.optim, slots, torch.device(device))
    jobs = [ClientJob(k, lambda k=k: _batches(cfg, privacy, ds, parts, k), privacy.client_noise(k, 1, sizes[k]))
            for k in range(len(sizes))]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = dict(trainer.train(start, jobs))
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # the shared model is untouched
    return out


def assert_same_updates(seq, bat):
    assert seq.keys() == bat.keys()
    diff = max(float((seq[k].delta - bat[k].delta).abs().max()) for k in seq)
    assert diff <= TOL, diff
    assert max(float(r.delta.abs().max()) for r in seq.values()) > 1e-2  # the updates are not trivially equal
    for k in seq:
        assert (bat[k].seen, bat[k].steps) == (seq[k].seen, seq[k].steps)
        assert int(bat[k].correct) == int(seq[k].correct)
        assert float(bat[k].loss_sum) == pytest.approx(float(seq[k].loss_sum), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("method", BATCHED)
def test_batched_clients_equal_sequential(method):
    from fedpeft_hpc.federated.batched import classifier_only

    _, _, model, _, layout, _ = _setup(method, False)
    assert (classifier_only(model, layout) is not None) == (method == "head")  # head: backbone once, unbatched
    seq = sequential(method, False)
    assert len({r.steps for r in seq.values()}) > 2  # uneven step counts
    assert_same_updates(seq, batched(method, False, slots=3))  # 5 clients in 3 slots: slots are refilled


@pytest.mark.parametrize("method", BATCHED)
def test_batched_dp_sgd_equals_opacus(method):
    """Per-sample clipping, each client's own noise, Poisson batches (empty ones included) as Opacus does them."""
    cfg, sizes, *_ = _setup(method, True)
    ds, parts = _dataset(sizes)
    privacy = _privacy(cfg, sizes)
    lens = [len(y) for k in range(len(sizes)) for _, y in _batches(cfg, privacy, ds, parts, k)]
    assert 0 in lens and max(lens) > cfg.data.batch_size  # empty and larger-than-expected batches occur
    seq = sequential(method, True)
    assert_same_updates(seq, batched(method, True, slots=2))


def test_batched_dp_clipping_without_noise():
    """noise 0 isolates the per-sample gradients and clipping (every sample is clipped at C = 0.05)."""
    seq = sequential("lora", True, "privacy.noise_multiplier=0")
    assert_same_updates(seq, batched("lora", True, 4, "privacy.noise_multiplier=0"))


@pytest.mark.parametrize("method, extra", [("head", ()), ("prompt", ()),
                                           ("lora", ("peft.lora_targets=[proj, fc1]",))])
def test_batched_adamw_equals_sequential(method, extra):
    """AdamW end to end, clients at different step counts in one stacked optimizer.

    Only where sequential AdamW training is itself reproducible to 1e-5: AdamW's m / sqrt(v) turns
    fp32 rounding in a near-zero gradient into lr-sized steps. Measured here, sequential training
    alone moves by more than 1e-5 when only the kernels change: ``bias`` (the key part of
    ``qkv.bias`` has an exactly zero gradient) 4e-4 between 1 and 2 threads, ``adapter`` 2.3e-4
    between timm's fused and plain attention. The optimizer itself is checked row by row against
    torch.optim on identical gradients in ``test_stacked_optimizer_is_torch_optim_per_row``."""
    over = ("optim.name=adamw", "optim.lr=0.01", "optim.weight_decay=0.05", *extra)
    assert_same_updates(sequential(method, False, *over), batched(method, False, 2, *over))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method, dp", [("bias", False), ("lora", False), ("prompt", True), ("adapter", True)])
def test_batched_equals_sequential_on_cuda(method, dp):
    """The same equivalence with CUDA kernels (TF32 off: fp32 both ways) and CUDA noise generators."""
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        assert_same_updates(sequential(method, dp, device="cuda"), batched(method, dp, 2, device="cuda"))
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


# -- planning: off | K | auto, full falls back -------------------------------------------------
def test_client_batch_values():
    from fedpeft_hpc.config.load import parse_client_batch

    assert [parse_client_batch(v) for v in ("off", "0", "1", "auto", "4", " 16 ")] == [None, None, None, "auto", 4, 16]
    cfg = load_config(QUICKSTART, ["fed.client_batch=off"])
    assert cfg.fed.client_batch == "off"


def _plan(tmp_path, *extra):
    from fedpeft_hpc.comm import LocalCommunicator
    from fedpeft_hpc.federated.engine import FederatedTrainer

    cfg = load_config(QUICKSTART, tiny_overrides(tmp_path / "r", *extra))
    trainer = FederatedTrainer(cfg, LocalCommunicator())
    trainer.close()
    return trainer


def test_full_is_trained_sequentially_with_a_log_line(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="fedpeft_hpc.federated.client_batch"):
        fr = _plan(tmp_path, "peft.method=full", "fed.client_batch=4")
    assert fr.client_batch is None
    assert "peft.method=full trains its clients one after another" in caplog.text
    fr = _plan(tmp_path, "peft.method=bias", "fed.client_batch=16", "run.dir=" + str(tmp_path / "b"))
    assert fr.client_batch == 4  # never more than the clients a rank gets in a round


def test_auto_measures_memory_and_leaves_the_model_alone(tmp_path, caplog):
    from fedpeft_hpc.federated.client_batch import client_bytes_estimate

    with caplog.at_level(logging.INFO, logger="fedpeft_hpc.federated.client_batch"):
        fr = _plan(tmp_path, "peft.method=adapter", "fed.client_batch=auto", "privacy.mode=sample",
                   "privacy.noise_multiplier=1")
    assert "one more client costs" in caplog.text
    assert 2 <= fr.client_batch <= fr.cfg.fed.clients_per_round  # this tiny model fits many clients
    assert torch.equal(fr.layout.flatten(fr.params, torch.float32), fr.global_vec)
    # the CPU probe counts activations (they grow with the batch) and DP's per-sample tensors; it draws nothing
    # from the global RNG and leaves every tensor of the model as it was
    before = {n: p.detach().clone() for n, p in fr.model.named_parameters()}
    rng = torch.get_rng_state()
    args = (fr.model, fr.layout, fr.cfg.optim, torch.device("cpu"), "fp32", (3, 16, 16))
    b16, b64, b64_dp = (client_bytes_estimate(*args, 16, False), client_bytes_estimate(*args, 64, False),
                        client_bytes_estimate(*args, 64, True))
    state = fr.layout.size * 4
    assert 3.5 < (b64 - 3 * state) / (b16 - 3 * state) < 4.5  # activations: linear in the batch
    assert b64_dp - b64 == 3 * 64 * state
    assert b16 - 3 * state > 16 * 3 * 16 * 16 * 4  # at least the input of the first trainable layer per sample
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[n], p) for n, p in fr.model.named_parameters())


# -- end to end ---------------------------------------------------------------------------------
def _state(fr):
    return fr.global_vec.clone()


def _rounds(fr, n: int):
    start = _state(fr)
    rows = [fr.train_round(r).row() for r in range(1, n + 1)]
    return rows, _state(fr) - start


@pytest.mark.parametrize("extra", [("peft.method=lora", "fed.dropout=0.3", "seed=3"),
                                   ("peft.method=bias", "data.augment=crop_flip"),  # one gather for every slot
                                   ("peft.method=prompt", "privacy.mode=sample", "privacy.noise_multiplier=0.7",
                                    "privacy.seeded_noise=true"),
                                   ("peft.method=bias", "privacy.mode=client", "privacy.noise_multiplier=0.5",
                                    "privacy.seeded_noise=true")])
def test_run_with_client_batch_equals_off(tmp_path, extra):
    runs = {}
    for cb in ("off", "4"):
        fr = _plan(tmp_path / cb, f"fed.client_batch={cb}", "fed.num_clients=10", "fed.clients_per_round=7", *extra)
        runs[cb] = (fr, *_rounds(fr, 2))
    (off, rows_off, moved_off), (four, rows_four, moved_four) = runs["off"], runs["4"]
    assert off.client_batch is None and four.client_batch == 4
    assert float((moved_off - moved_four).abs().max()) <= TOL
    assert float(moved_off.abs().max()) > 1e-3
    for a, b in zip(rows_off, rows_four):
        for key in ("clients", "sampled", "dropped", "bytes_up", "bytes_down", "rejected"):
            assert a[key] == b[key], key
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a["test_acc"] == b["test_acc"]
        assert a.get("epsilon") == b.get("epsilon")
        assert b["train_s"] > 0 and b["aggregate_s"] > 0


def test_bf16_precision_trains_in_bf16_and_keeps_the_state_fp32(tmp_path):
    states = {}
    for precision in ("fp32", "tf32", "bf16"):
        for cb in ("off", "4"):
            fr = _plan(tmp_path / f"{precision}{cb}", f"model.precision={precision}", f"fed.client_batch={cb}",
                       "peft.method=lora")
            (row,), states[precision, cb] = _rounds(fr, 1)
            assert fr.global_vec.dtype == torch.float32 and row["test_acc"] is not None
    step = float(states["fp32", "off"].abs().max())
    assert torch.equal(states["tf32", "off"], states["fp32", "off"])  # TF32 changes nothing on a CPU
    bf16_err = float((states["bf16", "off"] - states["fp32", "off"]).abs().max())
    assert 0 < bf16_err < 0.1 * step  # bf16 arithmetic: close to fp32, not equal
    assert float((states["bf16", "4"] - states["bf16", "off"]).abs().max()) < 0.1 * step


@pytest.mark.multiproc
def test_two_processes_with_client_batch_equal_one_process_without(tmp_path):
    import sys

    from tests.test_distributed import final_state, max_diff, run, torchrun

    def cmd(launcher, d, cb):
        return [*launcher, "-m", "fedpeft_hpc", "train", str(QUICKSTART),
                *tiny_overrides(d, "peft.method=lora", "fed.dropout=0.2", "fed.num_clients=12",
                                "fed.clients_per_round=7", f"fed.client_batch={cb}", "comm.timeout_s=60")]

    run(cmd([sys.executable], tmp_path / "one", "off"))
    run(cmd(torchrun(2), tmp_path / "two", "4"))
    assert max_diff(final_state(tmp_path / "one"), final_state(tmp_path / "two")) <= TOL
    from fedpeft_hpc.utils.files import read_jsonl

    rows = read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert all(r["world_size"] == 2 and r["allreduce_calls"] == 1 for r in rows)
    assert [r["clients"] for r in rows] == [r["clients"] for r in read_jsonl(tmp_path / "one" / "metrics.jsonl")]


def test_one_client_at_once_is_sequential(tmp_path, caplog, monkeypatch):
    """K <= 1 (a rank gets one client per round, or auto finds room for one) trains one after another:
    a one-slot batched step is slower than sequential training and needs more memory."""
    from fedpeft_hpc.federated import client_batch as cb

    fr = _plan(tmp_path, "peft.method=lora", "fed.client_batch=4", "fed.clients_per_round=2")
    args = (fr.model, fr.layout, torch.device("cpu"), (3, 16, 16))
    with caplog.at_level(logging.INFO, logger="fedpeft_hpc.federated.client_batch"):
        assert cb.plan_client_batch(fr.cfg, *args, world_size=1, dp=False) == 2
        assert cb.plan_client_batch(fr.cfg, *args, world_size=2, dp=False) is None
    assert "at most 1 client at once per rank" in caplog.text and "one after another" in caplog.text
    caplog.clear()
    auto = load_config(QUICKSTART, tiny_overrides(tmp_path / "a", "peft.method=lora", "fed.client_batch=auto"))
    monkeypatch.setattr(cb, "available_bytes", lambda device: 1)  # no room for a second client
    with caplog.at_level(logging.INFO, logger="fedpeft_hpc.federated.client_batch"):
        assert cb.plan_client_batch(auto, *args, world_size=1, dp=False) is None
    assert "K=1" in caplog.text and "memory budget fits one" in caplog.text and "one after another" in caplog.text


def test_patch_dropout_trains_sequentially_with_its_own_stream(tmp_path, caplog):
    """timm's PatchDropout (rate ``prob``) draws its patches like dropout: a model with it is trained one
    after another under any fed.client_batch, each client drawing from its own (seed, round, client)
    stream, so the result does not depend on fed.client_batch nor on the global random state."""
    runs = {}
    for cb in ("off", "4"):
        with caplog.at_level(logging.INFO, logger="fedpeft_hpc.federated.client_batch"):
            fr = _plan(tmp_path / cb, f"fed.client_batch={cb}", "peft.method=lora",
                       "model.kwargs.patch_drop_rate=0.5")
        assert fr.client_batch is None
        torch.manual_seed(len(cb))  # a different global state: must not matter
        runs[cb] = _rounds(fr, 1)
    assert "patch_drop" in caplog.text and "one after another" in caplog.text
    (rows_off, moved_off), (rows_four, moved_four) = runs["off"], runs["4"]
    assert torch.equal(moved_off, moved_four) and float(moved_off.abs().max()) > 1e-3
    assert rows_off[0]["train_loss"] == rows_four[0]["train_loss"]


def test_cpu_estimate_bounds_the_tensors_a_batched_step_saves(tmp_path):
    """auto's CPU estimate of one more client comes from a forward with the attention the batched step runs
    (plain, saving the attention matrices; the fused kernel saves less): it covers what autograd saves for
    one more client in the real batched step, within 10%."""
    from fedpeft_hpc.federated.client_batch import _named, client_bytes_estimate

    fr = _plan(tmp_path, "peft.method=lora", "model.img_size=32")  # 64 tokens: attention matters
    model, layout, shape, batch = fr.model, fr.layout, (3, 32, 32), 4
    shared = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}

    def saved_by_step(clients: int) -> int:
        seen: set = set()
        total = 0

        def pack(t):
            nonlocal total
            key = t.untyped_storage().data_ptr()
            if key not in shared and key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
            return t

        x, y = torch.zeros((batch, *shape)), torch.zeros(batch, dtype=torch.int64)
        trainer = BatchedClientTrainer(model, layout, fr.cfg.optim, clients, torch.device("cpu"))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            for _ in trainer.train(layout.flatten(dict(_named(model, layout)), torch.float32),
                                   [ClientJob(c, lambda: [(x, y)]) for c in range(clients)]):
                pass
        return total

    one, two, three = saved_by_step(1), saved_by_step(2), saved_by_step(3)
    per_client = two - one
    assert three - two == per_client > 0
    estimate = client_bytes_estimate(model, layout, fr.cfg.optim, torch.device("cpu"), "fp32", shape, batch, False)
    assert per_client <= estimate <= 1.1 * per_client


def _fake_fs(root, meminfo_kib: int, cgroup: str, files: dict):
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/meminfo").write_text(f"MemTotal:       99999999 kB\nMemAvailable:   {meminfo_kib} kB\n")
    (root / "proc/self/cgroup").write_text(cgroup)
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_available_ram_respects_cgroup_limits(tmp_path):
    """auto sizes K from the RAM this job may use: a cgroup memory limit (SLURM --mem, a container) below the
    host's MemAvailable wins; limit minus usage (inactive page cache counts as free), the tightest ancestor."""
    from fedpeft_hpc.federated.memory import available_bytes

    gib = 2**30
    host = 64 * gib // 1024  # kB
    job = "sys/fs/cgroup/system.slice/slurmstepd.scope/job_7"
    v2 = _fake_fs(tmp_path / "v2", host, "0::/system.slice/slurmstepd.scope/job_7/step_0\n", {
        f"{job}/memory.max": f"{8 * gib}\n", f"{job}/memory.current": f"{3 * gib}\n",
        f"{job}/memory.stat": f"anon 1\ninactive_file {gib}\nactive_file 5\n",
        f"{job}/step_0/memory.max": "max\n", f"{job}/step_0/memory.current": f"{3 * gib}\n",
        "sys/fs/cgroup/memory.max": "max\n"})
    assert available_bytes("cpu", fs_root=v2) == 8 * gib - (3 * gib - gib)
    (v2 / f"{job}/step_0/memory.max").write_text(f"{4 * gib}\n")  # a tighter child
    assert available_bytes("cpu", fs_root=v2) == gib
    (v2 / f"{job}/memory.max").write_text(f"{200 * gib}\n")
    (v2 / f"{job}/step_0/memory.max").write_text("max\n")
    assert available_bytes("cpu", fs_root=v2) == 64 * gib  # the host has less than the limit leaves
    # a container: cgroup namespace, the process's cgroup is the mount's root; cgroup v1
    v1 = _fake_fs(tmp_path / "v1", host, "4:memory:/\n0::/\n", {
        "sys/fs/cgroup/memory/memory.limit_in_bytes": f"{6 * gib}\n",
        "sys/fs/cgroup/memory/memory.usage_in_bytes": f"{gib}\n"})
    assert available_bytes("cpu", fs_root=v1) == 5 * gib
    (v1 / "sys/fs/cgroup/memory/memory.limit_in_bytes").write_text("9223372036854771712\n")  # no limit
    assert available_bytes("cpu", fs_root=v1) == 64 * gib
    assert available_bytes("cpu", fs_root=_fake_fs(tmp_path / "none", host, "", {})) == 64 * gib


@pytest.mark.parametrize("precision,allowed", [("fp32", False), ("tf32", True)])
def test_precision_sets_both_tf32_switches_on_cuda_and_restores_them(precision, allowed):
    """fp32 on CUDA is plain fp32: cuDNN's TF32 (on by default) is off inside the block as well as cuBLAS's;
    tf32 turns both on; both come back afterwards, also after an error. The switches are process flags that
    need no GPU to set, so this runs on a CPU."""
    from fedpeft_hpc.models.precision import compute_precision

    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        for before in ((True, True), (False, True), (True, False), (not allowed, not allowed)):
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
            with compute_precision(precision, torch.device("cuda")):
                assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (allowed, allowed)
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
            with pytest.raises(KeyError), compute_precision(precision, "cuda:0"):
                raise KeyError("boom")
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
            with compute_precision(precision, "cpu"):  # no effect on a CPU
                assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
