"""3. FL efficiency, 4. aggregation share, 7. PEFT vs full fine-tuning: whole engine rounds.

One process runs real rounds (``FederatedTrainer.train_round``: cohort, per-client data order,
local training, in-rank sums, the all-reduce path, the server step) of K clients with
``fed.client_batch=K`` on in-memory synthetic data split evenly. The first round warms up
and is not counted.

- FL efficiency: local-training samples/s of a round (``train_s``) over centralized
  training of the same model on the same data at the same total batch K*B. Target >= 0.9.
- Aggregation share: ``aggregate_s`` (in-rank sums, all-reduce, server step) over the
  round's wall time. Target < 2%.
- PEFT vs full: the same rounds with ``peft.method=full`` (trained one client after another):
  round time and bytes (up + down) of full fine-tuning over those of BitFit.
"""

from __future__ import annotations

import numpy as np

from fedpeft_hpc.bench.context import BenchContext
from fedpeft_hpc.bench.registry import Row, at_least, at_most, register_measurement

ROUNDS = 3  # round 1 warms up


def _rounds(fr) -> list[dict]:
    return [fr.train_round(r).row() for r in range(1, ROUNDS + 1)][1:]


def _samples(fr) -> int:
    return int(fr.fed.sizes.sum()) * fr.cfg.fed.local_epochs  # every client of the population trains each round


@register_measurement("rounds")
def rounds(ctx: BenchContext) -> list[Row]:
    from fedpeft_hpc.data.loader import iterate_batches
    from fedpeft_hpc.federated.client import local_train, make_optimizer
    from fedpeft_hpc.utils.streams import AUGMENT, torch_generator

    p = ctx.profile
    k = p.headline_clients
    common = (f"fed.num_clients={k}", f"fed.clients_per_round={k}",
              f"data.synthetic_samples={k * p.samples_per_client}")
    out = {}
    for name, extra in (("batched", (f"peft.method={ctx.profile.headline_method}", f"fed.client_batch={k}")),
                        ("sequential", (f"peft.method={ctx.profile.headline_method}", "fed.client_batch=off")),
                        ("full", ("peft.method=full", "optim.lr=0.001"))):
        ctx.status(f"rounds: {name}")
        fr = ctx.engine(*common, *extra)
        out[name] = (fr, _rounds(fr))
    fr, rows = out["batched"]
    # centralized training of the same model on the same data at batch K*B, read from the same source the
    # rounds' clients read (fr.sources: with data.gpu_store_mb the decoded images already on the GPU, resized
    # and normalised there), not the raw store fr.fed.data.train (gathered, resized and normalised on the CPU,
    # then copied): a baseline slowed by a data path the rounds do not take would inflate fl_efficiency
    source = fr.sources.client(torch_generator(fr.cfg.seed, AUGMENT, 0, 0))
    idx = np.arange(len(source))
    ctx.status("rounds: centralized")

    def central():
        batches = iterate_batches(source, idx, k * p.batch, None, shuffle=False, epochs=fr.cfg.fed.local_epochs,
                                  num_workers=fr.cfg.data.num_workers)
        local_train(fr.model, fr.params, fr.layout, fr.global_vec, batches, make_optimizer(fr.params.values(),
                    fr.cfg.optim), ctx.device, precision=fr.cfg.model.precision)

    t_central = ctx.best_time(central)
    n = _samples(fr)
    central_sps = n / t_central

    def sps(rs):
        return n / min(r["train_s"] for r in rs)

    eff = sps(rows) / central_sps
    eff_seq = sps(out["sequential"][1]) / central_sps
    share = float(np.mean([r["aggregate_s"] / r["wall_s"] for r in rows]))
    setting = f"{ctx.profile.headline_method}, {k} clients x {p.samples_per_client} samples, batch {p.batch}"
    full_rows = out["full"][1]
    t_full = float(np.mean([r["wall_s"] for r in full_rows]))
    t_peft = float(np.mean([r["wall_s"] for r in rows]))
    bytes_full = full_rows[-1]["bytes_up"] + full_rows[-1]["bytes_down"]
    bytes_peft = rows[-1]["bytes_up"] + rows[-1]["bytes_down"]
    ctx.release()
    return [
        Row("FL efficiency (round / centralized at K*B)", f"{setting}, fed.client_batch={k}", eff, ">= 0.9",
            at_least(eff, 0.9), detail=f"{sps(rows):.0f} vs {central_sps:.0f} samples/s", key="fl_efficiency",
            extra={"round_samples_per_s": sps(rows), "central_samples_per_s": central_sps}),
        Row("FL efficiency, clients one after another", f"{setting}, fed.client_batch=off", eff_seq,
            detail=f"{sps(out['sequential'][1]):.0f} vs {central_sps:.0f} samples/s"),
        Row("aggregation share of round time", setting, share, "< 0.02", at_most(share, 0.02),
            detail=f"{np.mean([r['aggregate_s'] for r in rows]) * 1e3:.2f} of {t_peft * 1e3:.0f} ms",
            key="aggregation_share"),
        Row("full fine-tuning / PEFT round time", f"full vs {setting}", t_full / t_peft,
            detail=f"{t_full:.2f} s vs {t_peft:.2f} s per round"),
        Row("PEFT / full fine-tuning bytes per round", f"{ctx.profile.headline_method} vs full, {k} clients",
            bytes_peft / bytes_full,
            detail=f"{bytes_peft / 1e6:.3f} MB vs {bytes_full / 1e6:.1f} MB"),
    ]
