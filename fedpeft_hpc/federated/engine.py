"""The server round loop. One frozen backbone per process; clients are PEFT states.

Every round, on every rank: the same cohort is drawn; this rank trains the cohort
members assigned to it (balanced by sample count) on the shared backbone, one after
another or K at a time (``fed.client_batch``, ``federated.batched``), sums their weighted
updates in fp64, and ONE all-reduce (through the
communicator handed in; this module never touches torch.distributed) aggregates
updates, weights and metric sums. The server rule then runs identically on every rank,
so no broadcast is needed and every rank holds the same global state.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedpeft_hpc.config.schema import Config
from fedpeft_hpc.data import build_datasets, make_partition, partition_stats, save_partition
from fedpeft_hpc.errors import ConfigError
from fedpeft_hpc.federated.aggregate import RoundBuffer, update_is_valid
from fedpeft_hpc.federated.batched import BatchedClientTrainer, ClientJob
from fedpeft_hpc.federated.client_batch import plan_client_batch
from fedpeft_hpc.federated.client import load_flat, local_train, make_optimizer
from fedpeft_hpc.federated.evaluate import evaluate_shard
from fedpeft_hpc.federated.flat import FlatLayout
from fedpeft_hpc.federated.ledger import ByteLedger
from fedpeft_hpc.federated.sampling import CLIENT_DATA, Schedule, assign_to_ranks, torch_generator
from fedpeft_hpc.federated.server_opt import build_server_optimizer
from fedpeft_hpc.models import build_model
from fedpeft_hpc.peft import count_params, peft_params
from fedpeft_hpc.privacy import build_privacy
from fedpeft_hpc.runs.checkpoint import Checkpoint
from fedpeft_hpc.runs.rundir import RunDir

log = logging.getLogger(__name__)


@dataclass
class Env:
    """What the engine needs from the process layout (see ``comm.Runtime``)."""

    rank: int
    world_size: int
    device: torch.device
    comm: Any  # has allreduce_sum_(tensor, tag) and .last[tag]
    backend: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class FederatedRun:
    def __init__(self, cfg: Config, env: Env):
        self.cfg = cfg
        self.env = env
        self.rundir = RunDir(cfg.run.dir, is_main=env.is_main)
        self.model, self.image_spec = build_model(cfg.model, cfg.peft, cfg.seed)
        self.counts = count_params(self.model)
        self.data = build_datasets(cfg.data, self.image_spec, cfg.seed)
        if self.data.num_classes > cfg.model.num_classes:
            raise ConfigError("model.num_classes", f"{cfg.model.num_classes} is fewer than the "
                                                   f"{self.data.num_classes} classes of data.name={cfg.data.name}")
        self.parts = make_partition(cfg.data, self.data.train_targets, cfg.fed.num_clients, cfg.seed)
        self.sizes = np.array([len(p) for p in self.parts], dtype=np.int64)
        self.schedule = Schedule(cfg.seed, cfg.fed.num_clients, cfg.fed.clients_per_round, cfg.fed.dropout)
        self.privacy = build_privacy(cfg, client_sizes=self.sizes, schedule=self.schedule, seed=cfg.seed,
                                     device=env.device)
        resume = self.rundir.open(cfg)  # only now that model, data and privacy are known to be fine
        if env.is_main and not cfg.data.partition_file:
            save_partition(self.rundir.path / "partition.json", self.parts,
                           {"seed": cfg.seed, "partition": cfg.data.partition, "alpha": cfg.data.alpha,
                            "dataset": cfg.data.name})

        self.model.to(env.device)
        self.params = peft_params(self.model)
        self.layout = FlatLayout(self.params)
        self.global_vec = self.layout.flatten(self.params, torch.float32)
        spec = self.image_spec
        self.client_batch = plan_client_batch(cfg, self.model, self.layout, env.device,
                                              (spec.in_chans, spec.img_size, spec.img_size), env.world_size,
                                              dp=cfg.privacy.mode == "sample")
        # batched clients compute their own per-sample gradients: no Opacus hooks on the shared model
        self.train_model = self.model if self.client_batch else self.privacy.wrap_model(self.model)
        self.accumulate_s = 0.0
        self.server_opt = build_server_optimizer(cfg.server, self.layout.size, env.device)
        self.ledger = ByteLedger(self.counts["bytes_per_transfer"], self.model.fedpeft_full_bytes)
        self.start_round = 1
        self.best_acc: float | None = None
        self.last_acc: float | None = None
        if resume is not None:
            self._restore(resume)

    # -- state ---------------------------------------------------------------------------
    def _checkpoint(self, round_idx: int) -> Checkpoint:
        return Checkpoint(
            round=round_idx, peft=dict(self.layout.unflatten(self.global_vec)),
            server=self.server_opt.state_dict(),
            state={"ledger": self.ledger.state_dict(), "best_acc": self.best_acc, "last_acc": self.last_acc,
                   "server_steps": self.server_opt.steps, "privacy": self.privacy.state_dict()})

    def _restore(self, ckpt: Checkpoint) -> None:
        missing = set(self.layout.names) ^ set(ckpt.peft)
        if missing:
            raise ConfigError("run.dir", f"checkpoint does not match peft.method={self.cfg.peft.method}: "
                                         f"differs in {sorted(missing)[:4]}")
        vec = self.layout.flatten(ckpt.peft, torch.float32).to(self.env.device)
        self.global_vec.copy_(vec)
        self.server_opt.load_state_dict(ckpt.server, ckpt.state.get("server_steps", 0))
        self.ledger.load_state_dict(ckpt.state["ledger"])
        self.best_acc = ckpt.state.get("best_acc")
        self.last_acc = ckpt.state.get("last_acc")
        self.privacy.load_state_dict(ckpt.state.get("privacy", {}))
        self.start_round = ckpt.round + 1
        log.info("resuming %s after round %d", self.rundir.path, ckpt.round)

    # -- one round -----------------------------------------------------------------------
    def _train_clients(self, round_idx: int, trained: list[int]) -> RoundBuffer:
        cfg, env = self.cfg, self.env
        mine = assign_to_ranks(trained, self.sizes, env.world_size)[env.rank]
        buf = RoundBuffer(self.layout.size, env.device)
        self.accumulate_s = 0.0
        for client, res in self._local_results(round_idx, mine):
            t0 = time.perf_counter()
            vec, weight = self.privacy.client_update(res.delta, int(self.sizes[client]))
            if update_is_valid(vec, cfg.fed.max_update_norm):
                buf.add(vec, weight, res.loss_sum, res.seen, res.correct)
            else:
                log.warning("round %d: rejected the update of client %d (non-finite or too large)", round_idx,
                            client)
                buf.reject()
            self.accumulate_s += time.perf_counter() - t0
        return buf

    def _client_batches(self, round_idx: int, client: int):
        cfg = self.cfg
        gen = torch_generator(cfg.seed, CLIENT_DATA, round_idx, client)
        return self.privacy.client_batches(self.data.train, self.parts[client], cfg.data.batch_size,
                                           cfg.fed.local_epochs, gen, cfg.data.num_workers)

    def _local_results(self, round_idx: int, clients: list[int]):
        """``(client, LocalResult)`` for each of this rank's clients: K at a time, or one after another."""
        cfg, env = self.cfg, self.env
        if self.client_batch and clients:
            # longest first: the slots of clients that finish are refilled, so the short ones fill the tail
            order = sorted(clients, key=lambda c: (-int(self.sizes[c]), c))
            jobs = [ClientJob(c, functools.partial(self._client_batches, round_idx, c),
                              self.privacy.client_noise(c, round_idx, int(self.sizes[c]))) for c in order]
            trainer = BatchedClientTrainer(self.model, self.layout, cfg.optim, min(self.client_batch, len(clients)),
                                           env.device, cfg.model.precision)
            yield from trainer.train(self.global_vec, jobs)
            return
        for client in clients:
            opt = make_optimizer(self.params.values(), cfg.optim)
            opt = self.privacy.wrap_optimizer(opt, client, round_idx, int(self.sizes[client]))
            yield client, local_train(self.train_model, self.params, self.layout, self.global_vec,
                                      self._client_batches(round_idx, client), opt, env.device, cfg.model.precision)

    def _evaluate(self) -> tuple[float, float]:
        env = self.env
        load_flat(self.params, self.layout, self.global_vec)
        sums = evaluate_shard(self.model, self.data.test, self.cfg.data.eval_batch_size, env.device, env.rank,
                              env.world_size, self.cfg.data.num_workers, precision=self.cfg.model.precision)
        env.comm.allreduce_sum_(sums, tag="eval")
        loss_sum, correct, count = sums.tolist()
        return correct / count, loss_sum / count

    def run_round(self, round_idx: int) -> dict:
        cfg, env = self.cfg, self.env
        t0 = time.perf_counter()
        cohort = self.schedule.cohort(round_idx)
        trained = self.schedule.trained(round_idx)
        buf = self._train_clients(round_idx, trained)
        t_train = _synced(env.device)
        calls_before = env.comm.call_count("aggregate")
        env.comm.allreduce_sum_(buf.buf, tag="aggregate")  # the ONE aggregation collective
        update_sum, stats = buf.split()
        applied = stats.returned >= cfg.fed.min_clients and stats.weight_sum > 0
        if applied:
            delta = self.privacy.finalize(update_sum, stats.weight_sum, round_idx)
            self.server_opt.step(self.global_vec, delta.to(torch.float32))
        t_aggregated = _synced(env.device)
        self.privacy.account(round_idx, trained)
        row: dict[str, Any] = {"round": round_idx, "clients": stats.returned if applied else 0,
                               "sampled": len(cohort), "dropped": len(cohort) - len(trained),
                               "rejected": stats.rejected, "skipped": not applied}
        row.update(self.ledger.record(sampled=len(cohort), returned=stats.returned + stats.rejected))
        row["train_loss"] = stats.train_loss
        row["train_acc"] = stats.train_acc
        if round_idx % cfg.eval.every == 0 or round_idx == cfg.fed.rounds:
            acc, loss = self._evaluate()
            row["test_acc"], row["test_loss"] = acc, loss
            self.last_acc = acc
            self.best_acc = acc if self.best_acc is None else max(self.best_acc, acc)
        row.update(self._privacy_fields())
        if env.world_size > 1:
            rec = env.comm.last["aggregate"]
            row.update({"allreduce_bytes": rec.bytes, "allreduce_ring_bytes": rec.ring_bytes,
                        "allreduce_ms": rec.ms, "allreduce_backend": rec.backend,
                        "allreduce_calls": env.comm.call_count("aggregate") - calls_before,
                        "world_size": env.world_size})
        # local training (in-rank accumulation excluded) and aggregation (in-rank sums, all-reduce, server step)
        row["train_s"] = t_train - t0 - self.accumulate_s
        row["aggregate_s"] = t_aggregated - t_train + self.accumulate_s
        row["wall_s"] = time.perf_counter() - t0
        return row

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        if self.env.is_main:
            stats = partition_stats(self.parts, self.data.train_targets, self.data.num_classes)
            log.info("%s: %d clients, sizes min/median/max %d/%d/%d; %s trainable %s of %s params, "
                     "%.3f MB per transfer", cfg.data.name, cfg.fed.num_clients, min(stats["sizes"]),
                     int(np.median(stats["sizes"])), max(stats["sizes"]), cfg.peft.method,
                     f"{self.counts['trainable_params']:,}", f"{self.counts['total_params']:,}",
                     self.counts["bytes_per_transfer"] / 1e6)
        bar = _progress(cfg, self.env.is_main, self.start_round)
        t_start = time.perf_counter()
        try:
            for r in range(self.start_round, cfg.fed.rounds + 1):
                row = self.run_round(r)
                row["elapsed_s"] = time.perf_counter() - t_start
                self.rundir.append_metrics(row)
                if r % cfg.run.checkpoint_every == 0 or r == cfg.fed.rounds:
                    self.rundir.save(self._checkpoint(r), cfg.run.keep_checkpoints)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(_postfix(row, self.last_acc))
        finally:
            if bar is not None:
                bar.close()
        summary = self.summary()
        self.rundir.write_summary(summary)
        self.rundir.write_json("privacy.json", self.privacy.report())
        return summary

    def summary(self) -> dict:
        s = {"final_acc": self.last_acc, "best_acc": self.best_acc, "rounds": self.cfg.fed.rounds,
             "method": self.cfg.peft.method, "model": self.cfg.model.name, "dataset": self.cfg.data.name,
             "trainable_params": self.counts["trainable_params"], "total_params": self.counts["total_params"],
             "bytes_per_transfer": self.counts["bytes_per_transfer"],
             "bytes_up_total": self.ledger.bytes_up_total, "bytes_down_total": self.ledger.bytes_down_total,
             "bytes_total": self.ledger.bytes_total, "full_ft_bytes_total": self.ledger.full_ft_bytes_total,
             "world_size": self.env.world_size, "seed": self.cfg.seed}
        s.update(self._privacy_fields())
        return s

    def _privacy_fields(self) -> dict:
        """``epsilon`` spent so far (largest over clients) at ``delta``; no noise means no bound:
        ``epsilon`` null and ``epsilon_unbounded`` true (strict JSON has no infinity)."""
        eps = self.privacy.epsilon()
        if eps is None:
            return {}
        if math.isinf(eps):
            return {"epsilon": None, "epsilon_unbounded": True, "delta": self.cfg.privacy.delta}
        return {"epsilon": eps, "delta": self.cfg.privacy.delta}


def _synced(device: torch.device) -> float:
    """``time.perf_counter()`` after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _progress(cfg: Config, is_main: bool, start: int):
    if not (is_main and cfg.run.progress):
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.fed.rounds, initial=start - 1, desc=f"{cfg.peft.method}", unit="round",
                dynamic_ncols=True, leave=True)


def _postfix(row: dict, acc: float | None) -> str:
    mb = (row["bytes_up_total"] + row["bytes_down_total"]) / 1e6
    acc_s = "-" if acc is None or math.isnan(acc) else f"{acc:.3f}"
    return f"acc={acc_s} comm={mb:.1f}MB"
