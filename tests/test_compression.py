"""Compressed transfers (fed.compress_up / compress_down, fed.error_feedback): exact sizes, error bounds,
unbiased rounding, error feedback, world-size invariance, resume, DP and batched clients."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from fedpeft_hpc.config import load_config
from fedpeft_hpc.federated import engine
from fedpeft_hpc.federated.codecs import CODECS, build_codec
from fedpeft_hpc.federated.compress import RESIDUAL_DIR, Compression
from fedpeft_hpc.privacy.release import covered_fields
from fedpeft_hpc.runs.checkpoint import load_checkpoint
from fedpeft_hpc.runs.client_state import ClientStateStore
from fedpeft_hpc.train import train
from fedpeft_hpc.utils.files import read_jsonl
from fedpeft_hpc.utils.streams import torch_generator
from tests.conftest import (BIN, QUICKSTART, assert_same_stores, kill_after_rounds, run_cli, subprocess_env,
                            tiny_overrides)

BIAS = 3082  # bias terms + head of the quickstart model (fedpeft-hpc inspect)


def hand_bytes(codec: str, n: int, fraction: float = 0.1, block: int = 256) -> int:
    """Encoded bytes, counted by hand from the format (codecs module docstring)."""
    if codec == "none":
        return 4 * n
    if codec in ("fp16", "bf16"):
        return 2 * n  # half of fp32
    scales = 4 * math.ceil(n / block)
    if codec == "int8":
        return n + scales  # one byte a value plus the scales
    if codec == "int4":
        return (n + 1) // 2 + scales
    k = math.ceil(fraction * n)
    return 8 + 4 * k + (2 if n <= 32768 else 4) * k  # header + k fp32 values + k indices


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("n", [1, 255, 3082, 40001])
def test_encoded_bytes_equal_the_hand_count(codec, n):
    c = build_codec(codec, 256, 0.1)
    enc = c.encode(torch.randn(n), torch.Generator().manual_seed(0))
    assert enc.nbytes == c.size(n) == hand_bytes(codec, n)
    if codec == "int8" and n == 3082:
        assert enc.nbytes == 3082 + 4 * 13 == 3134


@pytest.mark.parametrize("codec", CODECS)
def test_decode_encode_within_the_stated_bound(codec):
    c = build_codec(codec, 64, 0.05)
    gen = torch.Generator().manual_seed(1)
    cases = [torch.randn(5000), torch.randn(1000) * 1e-6, torch.zeros(300),
             torch.cat([torch.zeros(64), torch.randn(100) * 100]), torch.tensor([3.0, -3.0, 0.5]),
             torch.tensor([1e5, -7e4, 65504.0, 1.0])]
    for x in cases:
        y = c.decode(c.encode(x, gen))
        err, bound = (y - x).abs(), c.error_bound(x)
        assert y.shape == x.shape and bool((err <= bound).all()), (codec, float((err - bound).max()))
    if codec in ("int8", "int4"):  # strictly inside one step: |e| < max|block| / L
        x = torch.randn(4096)
        assert float(((c.decode(c.encode(x, gen)) - x).abs() - c.error_bound(x)).max()) < 0


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_stochastic_rounding_is_unbiased(codec):
    c = build_codec(codec, 256, 0.1)
    x = torch.randn(512) * torch.linspace(0.01, 2.0, 512)
    draws = 4000
    mean = sum(c.decode(c.encode(x, torch_generator(7, 22, 1, d))) for d in range(draws)) / draws
    step = c.error_bound(x)  # one quantization step per element
    # each draw's error has mean 0 and |e| < step: the mean of N draws lies within a few step / (2 sqrt N)
    assert bool(((mean - x).abs() <= 6 * step / (2 * math.sqrt(draws))).all())
    nearest = torch.round(x / step) * step  # deterministic rounding would be biased far beyond that
    assert float((nearest - x).abs().max()) > 10 * float((6 * step / (2 * math.sqrt(draws))).max())


def test_rounding_is_a_function_of_seed_round_and_client():
    c = build_codec("int8", 256, 0.1)
    x = torch.randn(1000)
    a = c.decode(c.encode(x, torch_generator(5, 22, 3, 9)))
    assert torch.equal(a, c.decode(c.encode(x, torch_generator(5, 22, 3, 9))))
    assert not torch.equal(a, c.decode(c.encode(x, torch_generator(5, 22, 3, 8))))


def test_error_feedback_carries_exactly_the_residual(tmp_path):
    cfg = load_config(QUICKSTART, tiny_overrides(tmp_path / "r", "fed.compress_up=topk", "fed.topk_fraction=0.05",
                                                 "fed.error_feedback=true"))
    n = 1000
    comp = Compression(cfg, torch.zeros(n), tmp_path / "r")
    comp.open_store(True, None)
    comp.attach_store()
    codec = build_codec("topk", 256, 0.05)
    deltas = [torch.randn(n) for _ in range(4)]
    residual, sent = torch.zeros(n), torch.zeros(n)
    for rnd, d in enumerate(deltas, start=1):
        got = comp.uplink(rnd, 3, d)
        x = d + residual  # the update plus what the last encoding left out
        expect = codec.decode(codec.encode(x))
        assert torch.equal(got, expect)
        residual = x - expect
        assert torch.equal(comp.residual(3), residual)
        sent += got
        comp.end_round(rnd, 0)
        comp.after_aggregate(rnd)
    # nothing is lost: what was sent plus what is still owed is the sum of the updates
    assert torch.allclose(sent + residual, sum(deltas), atol=1e-5)
    assert torch.equal(comp.residual(4), torch.zeros(n))  # a client that never sent owes nothing
    comp.close()


def _run(tmp_path, name, *extra):
    cfg = load_config(QUICKSTART, tiny_overrides(tmp_path / name, *extra))
    return cfg, train(cfg)


@pytest.mark.parametrize("up, down", [("int8", "topk"), ("fp16", "none"), ("bf16", "int4"), ("int4", "fp16"),
                                      ("topk", "int8")])
def test_ledger_counts_the_encoded_payloads(tmp_path, up, down):
    _, s = _run(tmp_path, "r", "peft.method=bias", f"fed.compress_up={up}", f"fed.compress_down={down}",
                "fed.dropout=0.3", "fed.rounds=3")
    n = s["trainable_params"]
    assert n == BIAS and s["bytes_per_transfer"] == 4 * n
    rows = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    for r in rows:
        returned = r["clients"] + r["rejected"]
        assert r["bytes_up"] == returned * hand_bytes(up, n)
        assert r["bytes_down"] == r["sampled"] * hand_bytes(down, n)
        raw = (r["sampled"] + returned) * 4 * n
        assert r["compression_ratio"] == pytest.approx(raw / (r["bytes_up"] + r["bytes_down"]))
    assert any(r["dropped"] for r in rows)
    assert s["bytes_up_total"] == sum(r["bytes_up"] for r in rows)
    assert s["bytes_up_per_transfer"] == hand_bytes(up, n) and s["compress_up"] == up
    # the report: MB up and the ratio in the table, accuracy against the uplink's bytes
    from fedpeft_hpc.report import write_report

    out, md = write_report(tmp_path / "r")
    assert out["accuracy_vs_bytes_up.png"].is_file()
    assert "MB up" in md and f"{s['bytes_up_total'] / 1e6:,.3f}" in md


def test_inspect_shows_bytes_per_transfer_per_encoding():
    out = json.loads(run_cli("inspect", str(QUICKSTART), "--json").stdout)["bytes_per_transfer_encoded"]
    assert out == {c: hand_bytes(c, BIAS) for c in CODECS}
    text = run_cli("inspect", str(QUICKSTART), "fed.topk_fraction=0.2").stdout
    assert f"int8 {hand_bytes('int8', BIAS):,}" in text and f"topk {hand_bytes('topk', BIAS, 0.2):,}" in text


def test_client_level_dp_with_int8_keeps_every_aggregated_update_within_the_clip(tmp_path, monkeypatch):
    added = []
    real_add = engine.RoundBuffer.add

    def spy(self, vec, weight, *rest):
        added.append(float(vec.double().norm()))
        return real_add(self, vec, weight, *rest)

    monkeypatch.setattr(engine.RoundBuffer, "add", spy)
    clip = 0.05  # far below the updates' norms: every update is clipped
    _, s = _run(tmp_path, "r", "peft.method=lora", "fed.compress_up=int8", "fed.error_feedback=true",
                "privacy.mode=client", "privacy.noise_multiplier=0.5", "privacy.seeded_noise=true",
                f"privacy.max_grad_norm={clip}", "fed.sampling=fixed")
    assert len(added) == 4 * 2 and max(added) <= clip * (1 + 1e-6) and min(added) > clip * 0.99
    doc = json.loads((tmp_path / "r" / "privacy.json").read_text())
    order = doc["compression"]["order"]
    assert order.index("decode (server)") < order.index("clip to privacy.max_grad_norm") < order.index(
        "Gaussian noise")
    assert doc["compression"]["up"] == "int8" and s["epsilon"] > 0
    # fixed cohorts without dropout: the bytes both ways follow from the schedule, so does the ratio
    assert "compression_ratio" in read_jsonl(tmp_path / "r" / "metrics.jsonl")[0]


def test_release_covers_the_ratio_only_where_it_covers_the_bytes():
    assert "compression_ratio" in covered_fields("sample", "fixed", 0.2)
    assert "compression_ratio" in covered_fields("client", "fixed", 0.0)
    assert "compression_ratio" not in covered_fields("client", "fixed", 0.2)
    assert "compression_ratio" not in covered_fields("client", "poisson", 0.0)


def test_sample_level_dp_compresses_the_privatised_update(tmp_path):
    _, s = _run(tmp_path, "r", "peft.method=bias", "fed.compress_up=int4", "privacy.mode=sample",
                "privacy.noise_multiplier=1.0", "privacy.seeded_noise=true")
    doc = json.loads((tmp_path / "r" / "privacy.json").read_text())
    assert "post-processing" in doc["compression"]["why"] and s["epsilon"] > 0
    assert s["bytes_up_per_transfer"] == hand_bytes("int4", BIAS)


def test_batched_clients_with_an_encoder(tmp_path, caplog):
    caplog.set_level("INFO", logger="fedpeft_hpc")
    cfg, s = _run(tmp_path, "r", "peft.method=lora", "fed.client_batch=4", "fed.compress_up=int4",
                  "fed.error_feedback=true", "fed.compress_down=bf16")
    assert "training up to 4 clients at once" in caplog.text
    n = s["trainable_params"]
    rows = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert all(r["bytes_up"] == r["clients"] * hand_bytes("int4", n) for r in rows)
    assert all(r["bytes_down"] == r["sampled"] * hand_bytes("bf16", n) for r in rows)
    assert math.isfinite(s["final_acc"])
    store = ClientStateStore(tmp_path / "r" / RESIDUAL_DIR, {"r": torch.zeros(n)}, 8, read_only=True)
    assert sum(store.written(c) for c in range(8)) >= 4  # every trained client keeps a residual
    assert all(float(store.get_vec(c).abs().max()) > 0 for c in range(8) if store.written(c))
    store.close()


EF = ("peft.method=lora", "fed.compress_up=topk", "fed.topk_fraction=0.05", "fed.error_feedback=true",
      "fed.compress_down=int8", "fed.dropout=0.2", "run.checkpoint_every=2", "fed.rounds=4")


def _cmd(run_dir, *extra, launcher=(sys.executable, "-m", "fedpeft_hpc")):
    return [*launcher, "train", str(QUICKSTART), *tiny_overrides(run_dir, *EF, *extra)]


def _same_runs(a, b, tol):
    ca = load_checkpoint(a / "checkpoints" / "latest.safetensors")
    cb = load_checkpoint(b / "checkpoints" / "latest.safetensors")
    assert max(float((ca.peft[k] - cb.peft[k]).abs().max()) for k in ca.peft) <= tol
    n = sum(t.numel() for t in ca.peft.values())
    sa, sb = (ClientStateStore(d / RESIDUAL_DIR, {"r": torch.zeros(n)}, 8, read_only=True, upto_round=ca.round)
              for d in (a, b))
    assert_same_stores(sa, sb, 8, tol)


def test_error_feedback_is_the_same_for_1_and_2_processes(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(_cmd(one), check=True, env=subprocess_env(), capture_output=True, timeout=300)
    torchrun = (str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "fedpeft_hpc")
    subprocess.run(_cmd(two, launcher=torchrun), check=True, env=subprocess_env(), capture_output=True, timeout=300)
    _same_runs(one, two, 1e-6)
    ra, rb = read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl")
    for key in ("test_acc", "bytes_up_total", "bytes_down_total", "compression_ratio"):
        assert [r[key] for r in ra] == [r[key] for r in rb], key


def test_a_killed_run_with_error_feedback_resumes_to_the_same_bits(tmp_path):
    """SIGKILL after round 3 (round 2 checkpointed, round 3's residuals journaled), then a resume: the global
    state, every client's residual and the summary equal those of a run never interrupted."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    slow = "fed.local_epochs=3"
    subprocess.run(_cmd(full, slow), check=True, env=subprocess_env(), capture_output=True, timeout=300)
    kill_after_rounds(_cmd(cut, slow), cut, 3)
    assert not (cut / "summary.json").exists(), "killed too late: the run had finished"
    subprocess.run(_cmd(cut, slow), check=True, env=subprocess_env(), capture_output=True, timeout=300)
    _same_runs(full, cut, 0.0)
    assert json.loads((cut / "summary.json").read_text()) == json.loads((full / "summary.json").read_text())
    assert not list((cut / RESIDUAL_DIR / "journal").iterdir())


@pytest.mark.parametrize("extra, key", [(("fed.error_feedback=true",), "fed.error_feedback"),
                                        (("fed.compress_up=int9",), "fed.compress_up"),
                                        (("fed.compress_down=zip",), "fed.compress_down"),
                                        (("fed.topk_fraction=0",), "fed.topk_fraction"),
                                        (("fed.compress_block=0",), "fed.compress_block"),
                                        (("peft.method=lora", "peft.lora_ranks=[2,4]", "fed.compress_up=int8"),
                                         "fed.compress_up")])
def test_bad_compression_settings_exit_2(extra, key):
    res = run_cli("inspect", str(QUICKSTART), *extra)
    assert res.returncode == 2 and res.stderr.startswith(f"fedpeft-hpc: error: {key}"), res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("batch", ["off", "4"])
def test_clients_train_from_exactly_the_decoded_global_state(tmp_path, monkeypatch, batch):
    from fedpeft_hpc.federated.compress import Compression as Comp
    from fedpeft_hpc.utils.streams import COMPRESS_DOWN

    sent, starts = [], []
    real_down, real_train = Comp.downlink, engine.local_train

    def down(self, round_idx, global_vec):
        out = real_down(self, round_idx, global_vec)
        sent.append((round_idx, global_vec.clone(), self.init_vec.clone(), out))
        return out

    def train_spy(model, params, layout, start, *args, **kwargs):
        starts.append(start)
        return real_train(model, params, layout, start, *args, **kwargs)

    real_batched = engine.BatchedClientTrainer.train

    def batched_spy(self, start, jobs):
        jobs = list(jobs)
        starts.extend([start] * len(jobs))
        return real_batched(self, start, jobs)

    monkeypatch.setattr(Comp, "downlink", down)
    monkeypatch.setattr(engine, "local_train", train_spy)
    monkeypatch.setattr(engine.BatchedClientTrainer, "train", batched_spy)
    cfg, s = _run(tmp_path, "r", "peft.method=bias", "fed.compress_down=int4", f"fed.client_batch={batch}")
    codec = build_codec("int4", 256, 0.1)
    for round_idx, global_vec, init, out in sent:
        enc = codec.encode(global_vec - init, torch_generator(cfg.seed, COMPRESS_DOWN, round_idx))
        assert torch.equal(out, init + codec.decode(enc))
    assert not torch.equal(sent[-1][3], sent[-1][1])  # lossy: not the server's exact state
    assert len(starts) == 2 * 4 and all(any(st is o for *_, o in sent) for st in starts)
    assert s["bytes_down_total"] == 2 * 4 * hand_bytes("int4", BIAS)
