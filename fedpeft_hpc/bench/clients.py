"""1. Batched vs sequential client training, and 2. the bound the hardware sets on it.

A rank trains K clients of ``steps`` local steps at client batch B. Sequential: one after
another, exactly as the engine does with ``fed.client_batch=off`` (a fresh optimizer, the
global state loaded, ``local_train``). Batched: ``BatchedClientTrainer`` with K slots. Their
client-updates/s ratio is ``batched_speedup`` (on CUDA with the batched run's peak memory).
The bound is plain centralized training of
the same model and method (``local_train`` on one optimizer) at batch K*B over batch B,
samples/s: what any way of training K clients at once could gain on this machine
(``batching_bound``). Targets (issue 8): batched >= 0.9 x bound; sequential >= 0.95 x
centralized at B.
"""

from __future__ import annotations

import torch

from fedpeft_hpc.bench.context import BenchContext
from fedpeft_hpc.bench.registry import Row, at_least, register_measurement
from fedpeft_hpc.federated.memory import peak_memory


def _pool(ctx: BenchContext, spec, clients: int):
    """``steps`` batches of B random samples on the device (shared by every client), and the same samples K times
    over as ``steps`` batches of K*B for centralized training."""
    p = ctx.profile
    g = torch.Generator().manual_seed(0)
    shape = (spec.in_chans, spec.img_size, spec.img_size)
    small = [(torch.randn(p.batch, *shape, generator=g).to(ctx.device),
              torch.randint(0, 10, (p.batch,), generator=g).to(ctx.device)) for _ in range(p.steps)]
    big = [(x.repeat(clients, 1, 1, 1), y.repeat(clients)) for x, y in small]
    return small, big


def sequential_clients(ctx, model, layout, start, cfg, batches, clients: int) -> None:
    from fedpeft_hpc.federated.client import local_train, make_optimizer
    from fedpeft_hpc.peft import peft_params

    params = peft_params(model)
    for _ in range(clients):
        opt = make_optimizer(params.values(), cfg.optim)
        local_train(model, params, layout, start, batches, opt, ctx.device, precision=cfg.model.precision)


def batched_clients(ctx, model, layout, start, cfg, batches, clients: int) -> None:
    from fedpeft_hpc.federated.batched import BatchedClientTrainer, ClientJob

    trainer = BatchedClientTrainer(model, layout, cfg.optim, clients, ctx.device, cfg.model.precision)
    for _ in trainer.train(start, [ClientJob(c, lambda: batches) for c in range(clients)]):
        pass


def centralized(ctx, model, layout, start, cfg, batches) -> None:
    sequential_clients(ctx, model, layout, start, cfg, batches, 1)


@register_measurement("clients")
def batched_vs_sequential(ctx: BenchContext) -> list[Row]:
    p = ctx.profile
    rows = []
    for method in p.methods:
        model, layout, start, cfg, spec = ctx.model(method)
        for k in (p.clients if method in p.all_k else (p.headline_clients,)):
            ctx.status(f"clients: {method}, {k} clients")
            small, big = _pool(ctx, spec, k)
            t = ctx.best_times({
                "seq": lambda: sequential_clients(ctx, model, layout, start, cfg, small, k),
                "batched": lambda: batched_clients(ctx, model, layout, start, cfg, small, k),
                "central_b": lambda: centralized(ctx, model, layout, start, cfg, small * k),
                "central_kb": lambda: centralized(ctx, model, layout, start, cfg, big)})
            t_seq, t_bat, t_b, t_kb = t["seq"], t["batched"], t["central_b"], t["central_kb"]
            samples = k * p.steps * p.batch
            speedup, bound = t_seq / t_bat, t_b / t_kb
            headline = method == ctx.profile.headline_method and k == p.headline_clients
            setting = f"{method}, {k} clients x batch {p.batch}"
            peak_bytes, mem = None, ""
            if ctx.device.type == "cuda":  # a CPU process's resident set hides reused memory
                with peak_memory(ctx.device) as peak:
                    batched_clients(ctx, model, layout, start, cfg, small, k)
                peak_bytes, mem = peak.bytes, f", peak +{peak.bytes / 2**20:.0f} MiB"
            rows += [
                Row("batched vs sequential clients", setting, speedup,
                    detail=f"{k / t_seq:.1f} -> {k / t_bat:.1f} client-updates/s "
                           f"({samples / t_seq:.0f} -> {samples / t_bat:.0f} samples/s{mem})",
                    key="batched_speedup" if headline else None,
                    extra={"sequential_samples_per_s": samples / t_seq, "batched_samples_per_s": samples / t_bat,
                           "batched_peak_bytes": peak_bytes}),
                Row("batching bound (centralized K*B / B)", setting, bound,
                    detail=f"{samples / t_b:.0f} -> {samples / t_kb:.0f} samples/s",
                    key="batching_bound" if headline else None,
                    extra={"central_b_samples_per_s": samples / t_b, "central_kb_samples_per_s": samples / t_kb}),
                Row("batched / centralized at K*B", setting, t_kb / t_bat, ">= 0.9", at_least(t_kb / t_bat, 0.9)),
                Row("sequential / centralized at B", setting, t_b / t_seq, ">= 0.95", at_least(t_b / t_seq, 0.95)),
            ]
            if headline:
                rows += _step_rows(ctx, model, layout, start, cfg, small, k, setting)
            if ctx.profile_ops and headline:
                ctx.profiles.append(_op_profile(ctx, model, layout, start, cfg, small, big, k))
        ctx.release()
    return rows


def _step_rows(ctx, model, layout, start, cfg, batches, k: int, setting: str) -> list[Row]:
    """Operators launched and host round trips per optimizer step of the batched trainer (``step_counts``)."""
    from fedpeft_hpc.bench.step_counts import step_counts
    from fedpeft_hpc.federated.batched import BatchedClientTrainer, ClientJob

    trainer = BatchedClientTrainer(model, layout, cfg.optim, k, ctx.device, cfg.model.precision)
    c = step_counts(trainer, start, [ClientJob(i, lambda: batches) for i in range(k)])
    how = "set_sync_debug_mode" if ctx.device.type == "cuda" else "value reads and tensors from Python data"
    return [Row("batched step: top-level operators per optimizer step", setting, c["ops_per_step"],
                detail=f"torch.profiler, {c['steps']} steps of {k} clients", key="ops_per_step"),
            Row("batched step: host round trips per optimizer step", setting, c["host_syncs_per_step"], "0",
                c["host_syncs_per_step"] == 0, detail=how, key="host_syncs_per_step")]


def _op_profile(ctx, model, layout, start, cfg, small, big, k: int) -> str:
    """torch.profiler's top operators of the batched step and of centralized training at K*B."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
    sort = "self_cuda_time_total" if ctx.device.type == "cuda" else "self_cpu_time_total"
    out = []
    for name, fn in (("batched", lambda: batched_clients(ctx, model, layout, start, cfg, small, k)),
                     ("centralized K*B", lambda: centralized(ctx, model, layout, start, cfg, big))):
        fn()
        with profile(activities=acts) as prof:
            fn()
            ctx.sync()
        out.append(f"== {name}: {k} clients x batch {ctx.profile.batch}, {ctx.profile.steps} steps ==\n"
                   + prof.key_averages().table(sort_by=sort, row_limit=15))
    return "\n".join(out)


@register_measurement("clients_dp", suites=("full",))
def batched_vs_opacus(ctx: BenchContext) -> list[Row]:
    """Sample-level DP-SGD: batched per-sample gradients vs Opacus's hooks one client after another."""
    from fedpeft_hpc.federated.batched import BatchedClientTrainer, ClientJob
    from fedpeft_hpc.federated.client import local_train, make_optimizer
    from fedpeft_hpc.federated.sampling import Schedule
    from fedpeft_hpc.models import build_model
    from fedpeft_hpc.models.device_fixes import apply_device_fixes
    from fedpeft_hpc.peft import peft_params
    from fedpeft_hpc.privacy.noise import NoiseKey, fresh_secret
    from fedpeft_hpc.privacy.sample_dp import SampleDP

    p = ctx.profile
    k = p.headline_clients
    model, layout, start, cfg, spec = ctx.model(ctx.profile.headline_method)
    dp_cfg = ctx.config(f"peft.method={p.headline_method}", "privacy.mode=sample", "privacy.noise_multiplier=1.0")
    sizes = [p.batch * p.steps] * k
    dp = SampleDP(dp_cfg.privacy, dp_cfg.fed, dp_cfg.data, client_sizes=sizes, schedule=Schedule(0, k, k, 0.0),
                  seed=0, device=ctx.device)
    dp.use_noise(NoiseKey.from_secret(fresh_secret()))  # as a real run: secret noise, Opacus secure_mode
    twin = build_model(dp_cfg.model, dp_cfg.peft, dp_cfg.seed, load_weights=False).model  # Opacus hooks stay on it
    twin.to(ctx.device)
    apply_device_fixes(twin, ctx.device)
    twin_params = peft_params(twin)
    wrapped = dp.wrap_model(twin)
    small, _ = _pool(ctx, spec, k)
    ctx.status(f"clients_dp: {ctx.profile.headline_method}, {k} clients")

    def opacus():
        for c in range(k):
            opt = dp.wrap_optimizer(make_optimizer(twin_params.values(), cfg.optim), c, 1, sizes[c])
            local_train(wrapped, twin_params, layout, start, small, opt, ctx.device, precision=cfg.model.precision)

    def batched():
        trainer = BatchedClientTrainer(model, layout, cfg.optim, k, ctx.device, cfg.model.precision)
        jobs = [ClientJob(c, lambda: small, dp.client_noise(c, 1, sizes[c])) for c in range(k)]
        for _ in trainer.train(start, jobs):
            pass

    t = ctx.best_times({"opacus": opacus, "batched": batched})
    ctx.release()
    return [Row("batched DP-SGD vs Opacus clients one after another", f"{p.headline_method}, {k} clients x batch "
                f"{p.batch}, sample-level DP", t["opacus"] / t["batched"],
                detail=f"{k / t['opacus']:.1f} -> {k / t['batched']:.1f} client-updates/s")]
