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
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedpeft_hpc.comm.collective import Communicator
from fedpeft_hpc.config.schema import Config
from fedpeft_hpc.data import BatchSources, partition_stats, save_partition
from fedpeft_hpc.errors import ConfigError
from fedpeft_hpc.federated.aggregate import RoundBuffer, RoundStats, update_is_valid
from fedpeft_hpc.federated.agreement import (backbone_fingerprint, check_agreement, check_resume, config_fingerprint,
                                             data_fingerprint, labels_fingerprint, partition_fingerprint,
                                             state_fingerprint)
from fedpeft_hpc.federated.batched import BatchedClientTrainer, ClientJob
from fedpeft_hpc.federated.client import local_train, make_optimizer
from fedpeft_hpc.federated.client_batch import plan_client_batch
from fedpeft_hpc.federated.client_parts import ClientParts
from fedpeft_hpc.federated.compress import Compression, compression_order
from fedpeft_hpc.federated.evaluate import evaluate_shard
from fedpeft_hpc.federated.federation import Federation, build_federation
from fedpeft_hpc.federated.ledger import ByteLedger
from fedpeft_hpc.federated.memory import synchronize
from fedpeft_hpc.federated.personal import personal_counts, personal_metrics
from fedpeft_hpc.federated.sampling import assign_to_ranks
from fedpeft_hpc.federated.server_opt import build_server_optimizer
from fedpeft_hpc.models.device_fixes import apply_device_fixes
from fedpeft_hpc.peft import FlatLayout, load_vector, peft_params
from fedpeft_hpc.privacy.noise import SECRET_WORDS, NoiseKey, fresh_secret, secret_as_words, words_as_secret
from fedpeft_hpc.privacy.release import ReleasePolicy
from fedpeft_hpc.runs.checkpoint import Checkpoint
from fedpeft_hpc.runs.rundir import RunDir
from fedpeft_hpc.runs.sinks import JsonlSink, MetricsSinks, TensorBoardSink
from fedpeft_hpc.utils.files import read_jsonl
from fedpeft_hpc.utils.logs import log_to_file
from fedpeft_hpc.utils.streams import AUGMENT, CLIENT_LAYERS, derived_seed, torch_generator

log = logging.getLogger(__name__)


@dataclass
class RoundResult:
    """What one round did; ``row()`` turns it into the ``metrics.jsonl`` record."""

    round: int
    sampled: int
    returning: int
    stats: RoundStats
    applied: bool
    bytes: dict  # the ledger's record of this round
    test: tuple[float, float] | None  # (accuracy, loss) in evaluation rounds
    personal: dict  # personal_acc and its percentiles in evaluation rounds (data.client_test_fraction)
    privacy: dict  # epsilon spent so far (DP runs)
    collective: dict  # all-reduce record (several processes)
    train_s: float  # local training of this rank's clients (in-rank accumulation excluded)
    aggregate_s: float  # in-rank sums, the all-reduce and the server step
    wall_s: float

    def row(self) -> dict[str, Any]:
        row: dict[str, Any] = {"round": self.round, "clients": self.stats.returned if self.applied else 0,
                               "sampled": self.sampled, "dropped": self.sampled - self.returning,
                               "rejected": self.stats.rejected, "skipped": not self.applied}
        row.update(self.bytes)
        row["train_loss"] = self.stats.train_loss
        row["train_acc"] = self.stats.train_acc
        if self.test is not None:
            row["test_acc"], row["test_loss"] = self.test
        row.update(self.personal)
        row.update(self.privacy)
        row.update(self.collective)
        row["train_s"], row["aggregate_s"] = self.train_s, self.aggregate_s
        row["wall_s"] = self.wall_s
        return row


class FederatedTrainer:
    """One rank's side of a federated training: built once, then ``fit()``."""

    def __init__(self, cfg: Config, comm: Communicator, federation: Federation | None = None):
        self.cfg = cfg
        self.comm = comm
        self.fed = federation if federation is not None else build_federation(cfg, comm.device)
        self.rundir = RunDir(cfg.run.dir, is_main=comm.is_main)
        resume = self.rundir.resume_point(cfg)
        # rounds whose outputs were released but that this start runs again (read before rank 0 moves them)
        self.rerun_rounds = self.rundir.rerun_rounds(resume.round if resume is not None else 0)
        self.resumed_after = resume.round if resume is not None else 0
        # what the run directory may hold under DP (privacy.release)
        self.release = ReleasePolicy(cfg.privacy.mode, cfg.privacy.release, self.fed.schedule.sampling,
                                     cfg.fed.dropout)
        self.fingerprints = {"backbone": backbone_fingerprint(self.fed.built.model),
                             "data": data_fingerprint(self.fed.data.train_targets, self.fed.data.train,
                                                      self.fed.data.test)}
        # batches come out on the rank's device, prepared (and augmented for training) there
        self.sources = BatchSources(self.fed.data.train, self.fed.data.test, comm.device, cfg.data.augment,
                                    cfg.data.gpu_store_mb, name=f"data.name={cfg.data.name}")
        self.model = self.fed.built.model.to(comm.device)
        apply_device_fixes(self.model, comm.device)
        self.params = peft_params(self.model)  # everything trained: the sent and the local parts
        # the global state is the SENT tensors; local parts and LoRA ranks are per client (ClientParts)
        self.client_parts = ClientParts(cfg, self.model, self.params, self.fed.lora_ranks, self.rundir.path,
                                        comm.device)
        self.layout = FlatLayout(self.client_parts.sent)
        self.global_vec = self.layout.flatten(self.client_parts.sent, torch.float32)
        self.server_opt = build_server_optimizer(cfg.server, self.layout.size, comm.device)
        # encoded transfers (fed.compress_up/down) and the clients' error-feedback residuals
        self.compression = Compression(cfg, self.global_vec, self.rundir.path)
        self.ledger = ByteLedger(self.fed.counts["bytes_per_transfer"], self.fed.built.full_bytes_per_transfer)
        self.start_round = 1
        self.best_acc: float | None = None
        self.last_acc: float | None = None
        self.last_personal: dict = {}
        if resume is not None:
            self._restore(resume)
        # rank 0 puts the client-state store back to the checkpoint's round (the agreement below waits for it)
        self.client_parts.open_store(comm.is_main, resume.round if resume is not None else None)
        self.compression.open_store(comm.is_main, resume.round if resume is not None else None)
        # every rank must start from the same place: checked before anything is written
        check_agreement(comm, {**self.fingerprints, "config": config_fingerprint(cfg),
                               "start_round": self.start_round, "rerun_rounds": len(self.rerun_rounds),
                               "global_state": state_fingerprint(self.global_vec),
                               "partition": partition_fingerprint(self.fed.client_indices)})
        self.client_parts.attach_store()
        self.compression.attach_store()
        self.noise_key = self._noise_key()
        image = self.fed.built.image
        # a batched slot holds every trained tensor of a client: the sent and the local ones
        self.client_batch = plan_client_batch(cfg, self.model, self.client_parts.full_layout, comm.device,
                                              (image.in_chans, image.img_size, image.img_size),
                                              comm.world_size, dp=cfg.privacy.mode == "sample")
        # batched clients compute their own per-sample gradients: no Opacus hooks on the shared model
        self.train_model = (self.model if self.client_batch
                            else self.fed.privacy.wrap_model(self.model))  # may still refuse the model
        self.accumulate_s = 0.0
        self.rundir.start(cfg, resume)
        data = self.fed.data
        self.rundir.write_identity(cfg, labels_fingerprint(data.train_targets, len(data.train), len(data.test)))
        # from here on this process's log also goes to the run directory (until fit() ends or close())
        self._detach_log = log_to_file(self.rundir.log_path(comm.rank), comm.rank, comm.world_size)
        self.fed.privacy.use_noise(self.noise_key)
        if self.fed.privacy.secret_cohorts:
            # client-level DP takes credit for cohort sampling: who is sampled comes from the noise key
            # (the secret every rank holds; a seeded key draws exactly the seed's cohorts)
            self.fed.schedule.use_key(self.noise_key)
        self._charge_earlier_releases()
        if comm.is_main and not cfg.data.partition_file:
            self._save_partition()

    def _save_partition(self) -> None:
        """partition.json: every client's samples, and where set its held-out samples and its LoRA rank."""
        cfg, fed = self.cfg, self.fed
        parts, extra = fed.client_indices, {}
        if fed.client_test_indices is not None:
            parts = [np.sort(np.concatenate([a, b])) for a, b in zip(fed.client_indices, fed.client_test_indices)]
            extra["client_test"] = [[int(i) for i in t] for t in fed.client_test_indices]
            extra["client_test_fraction"] = cfg.data.client_test_fraction
        if fed.lora_ranks is not None:
            extra["lora_rank"] = [int(r) for r in fed.lora_ranks]
        save_partition(self.rundir.path / "partition.json", parts,
                       {"seed": cfg.seed, "partition": cfg.data.partition, "alpha": cfg.data.alpha,
                        "dataset": cfg.data.name}, extra)

    def _noise_key(self) -> NoiseKey:
        """The seed (``privacy.seeded_noise``), or a secret from rank 0 that every rank holds in memory."""
        if self.cfg.privacy.seeded_noise or self.cfg.privacy.mode == "none":
            return NoiseKey.seeded(self.cfg.seed)
        words = secret_as_words(fresh_secret()) if self.comm.is_main else torch.zeros(SECRET_WORDS,
                                                                                    dtype=torch.int64)
        self.comm.allreduce_sum_(words, tag="noise_key")  # rank 0's words plus zeros
        return NoiseKey.from_secret(words_as_secret(words))

    def _charge_earlier_releases(self) -> None:
        """Under DP with secret noise, every released row that this run's accountant does not hold yet is charged
        once more: rounds run past the checkpoint before an interruption (run again now, with noise nobody can
        redraw), and the rows of earlier attempts set aside in ``failed-N/`` (started afresh by a sweep; not yet
        charged by the checkpoint this run resumes from). With seeded noise (or without DP) a re-run computes the
        same values: nothing new is released, nothing is charged."""
        if not self.noise_key.secure:  # seeded, or no DP (a seeded key then too)
            return
        privacy = self.fed.privacy
        # sample-level DP: the clients of those rounds, re-derived from the public cohorts (from the seed);
        # client-level DP counts one step per round whoever was sampled
        if self.rerun_rounds:
            privacy.charge_again(self.rerun_rounds, self.fed.schedule.returning,
                                 source=f"rows re-run on resume after round {self.resumed_after}")
            log.warning("resume: rounds %s had already run with secret DP noise that cannot be drawn again; their "
                        "released outputs are charged to the accountant a second time (rounds_charged_again in "
                        "privacy.json and summary.json)", ", ".join(map(str, self.rerun_rounds)))
        done = privacy.charged_sources()
        for name, rounds in self.rundir.earlier_attempts():
            source = f"{name}/metrics.jsonl"
            if rounds and source not in done:
                privacy.charge_again(rounds, self.fed.schedule.returning, source=source)
                log.warning("earlier attempt %s released rounds %s with secret DP noise; they are charged to this "
                            "run's accountant (charges in privacy.json)", name, ", ".join(map(str, rounds)))

    # -- state ---------------------------------------------------------------------------
    def _checkpoint(self, round_idx: int) -> Checkpoint:
        return Checkpoint(
            round=round_idx, peft=dict(self.layout.unflatten(self.global_vec)),
            server=self.server_opt.state_dict(),
            state={"ledger": self.ledger.state_dict(), "best_acc": self.best_acc, "last_acc": self.last_acc,
                   "last_personal": self.last_personal,
                   "server_steps": self.server_opt.steps, "privacy": self.fed.privacy.state_dict(),
                   "fingerprints": {k: f"{v:016x}" for k, v in self.fingerprints.items()}})

    def _restore(self, ckpt: Checkpoint) -> None:
        diff = self.layout.mismatch(ckpt.peft)
        if diff:
            raise ConfigError("run.dir", f"checkpoint does not match peft.method={self.cfg.peft.method}: "
                                         f"differs in {diff[:4]}")
        check_resume(ckpt.state.get("fingerprints", {}), self.fingerprints)
        self.global_vec.copy_(self.layout.flatten(ckpt.peft, torch.float32).to(self.comm.device))
        self.server_opt.load_state_dict(ckpt.server, ckpt.state.get("server_steps", 0))
        self.ledger.load_state_dict(ckpt.state["ledger"])
        self.best_acc = ckpt.state.get("best_acc")
        self.last_acc = ckpt.state.get("last_acc")
        self.last_personal = ckpt.state.get("last_personal", {})
        self.fed.privacy.load_state_dict(ckpt.state.get("privacy", {}))
        self.start_round = ckpt.round + 1

    # -- one round -----------------------------------------------------------------------
    def _train_clients(self, round_idx: int, clients: list[int]) -> RoundBuffer:
        """Train ``clients`` (this rank's share); their weighted updates, summed."""
        cfg, fed = self.cfg, self.fed
        buf = RoundBuffer(self.layout.size, self.comm.device)
        self.accumulate_s = 0.0
        for client, res in self._local_results(round_idx, clients):
            t0 = time.perf_counter()
            # what the server decodes (error feedback: the client's residual added, the new one kept), then
            # clipped by client-level DP: the clipping bound holds for what is aggregated
            delta = self.compression.uplink(round_idx, client, res.delta)
            vec, weight = fed.privacy.client_update(delta, int(fed.sizes[client]))
            if update_is_valid(vec, cfg.fed.max_update_norm):
                buf.add(vec, weight, res.loss_sum, res.seen, res.correct)
            else:
                self._log_rejection(round_idx, client)
                buf.reject()
            self.accumulate_s += time.perf_counter() - t0
        return buf

    def _log_rejection(self, round_idx: int, client: int) -> None:
        """Under DP no log line names the client (under client-level DP with privacy.release=covered nothing is
        logged: the number of rejected updates is not covered)."""
        if self.release.names_clients():
            log.warning("round %d: rejected the update of client %d (non-finite or too large)", round_idx, client)
        elif self.release.logs_rejections():
            log.warning("round %d: rejected an update (non-finite or too large; under DP the client is not named)",
                        round_idx)

    def _client_batches(self, round_idx: int, client: int, deferred: bool = False):
        """Client ``client``'s local-training batches in ``round_idx``: augmentation drawn from (seed, round,
        client), data order (DP-SGD: batch membership) from the privacy mechanism's generator (the seed's
        stream, or the secret noise key under sample-level DP), on the rank's device; the same for the
        sequential and batched paths (``deferred``: index lists that the batched trainer makes for all its
        slots in one gather, ``data.sources.prepare_batches``)."""
        cfg, fed = self.cfg, self.fed
        gen = fed.privacy.batch_generator(cfg.seed, round_idx, client)
        source = self.sources.client(torch_generator(cfg.seed, AUGMENT, round_idx, client), deferred)
        return fed.privacy.client_batches(source, fed.client_indices[client], cfg.data.batch_size,
                                          cfg.fed.local_epochs, gen, cfg.data.num_workers)

    def _local_results(self, round_idx: int, clients: list[int]):
        """``(client, LocalResult)`` for each of this rank's clients: K at a time, or one after another."""
        cfg, fed, device = self.cfg, self.fed, self.comm.device
        sent = self.compression.downlink(round_idx, self.global_vec)  # what the clients decode
        if self.client_batch and clients:
            # longest first: the slots of clients that finish are refilled, so the short ones fill the tail
            order = sorted(clients, key=lambda c: (-int(fed.sizes[c]), c))
            jobs = [ClientJob(c, functools.partial(self._client_batches, round_idx, c, deferred=True),
                              fed.privacy.client_noise(c, round_idx, int(fed.sizes[c])), **self._slot_hooks(c, sent))
                    for c in order]
            trainer = BatchedClientTrainer(self.model, self.client_parts.full_layout, cfg.optim,
                                           min(self.client_batch, len(clients)), device, cfg.model.precision,
                                           compile=cfg.run.compile, batch_size=cfg.data.batch_size)
            yield from trainer.train(sent, jobs)
            return
        parts = self.client_parts
        for client in clients:
            opt = make_optimizer(self.params.values(), cfg.optim)
            opt = fed.privacy.wrap_optimizer(opt, client, round_idx, int(fed.sizes[client]))
            start = parts.start(client, sent)  # its local parts and rank loaded
            res = local_train(self.train_model, self.params, self.layout, start,
                              self._client_batches(round_idx, client), opt, device,
                              layers_seed=derived_seed(cfg.seed, CLIENT_LAYERS, round_idx, client),
                              precision=cfg.model.precision)
            res.delta = parts.finish(client, res.delta, self.global_vec)  # its local parts stored
            yield client, res

    def _slot_hooks(self, client: int, sent: torch.Tensor) -> dict:
        """A batched client's own slot row (from ``sent``, the state it decodes), update and rank (``ClientJob``)
        where it has local parts or a rank."""
        parts = self.client_parts
        if not parts.per_client:
            return {}
        return {"start": functools.partial(parts.slot_start, client, sent),
                "finish": functools.partial(parts.slot_finish, client, global_vec=self.global_vec),
                "rank": parts.rank_of(client)}

    def _evaluate(self) -> tuple[float, float]:
        comm = self.comm
        self.client_parts.as_global()
        load_vector(self.params, self.layout, self.global_vec)
        sums = evaluate_shard(self.model, self.sources.test, self.cfg.data.eval_batch_size, comm.device,
                              comm.rank, comm.world_size, self.cfg.data.num_workers)  # fp32: what load_run gets
        comm.allreduce_sum_(sums, tag="eval")
        loss_sum, correct, count = sums.tolist()
        return correct / count, loss_sum / count

    def _evaluate_personal(self) -> dict[str, float]:
        """personal_acc (and percentiles across clients): each client's model on its held-out samples."""
        if self.fed.client_test_indices is None:
            return {}
        comm = self.comm
        counts = personal_counts(self.model, self.client_parts,
                                 lambda: load_vector(self.params, self.layout, self.global_vec),
                                 self.sources.train_eval, self.fed.client_test_indices, comm.rank, comm.world_size,
                                 self.cfg.data.eval_batch_size, comm.device)
        comm.allreduce_sum_(counts, tag="eval")
        return personal_metrics(counts)

    def train_round(self, round_idx: int) -> RoundResult:
        cfg, comm, fed = self.cfg, self.comm, self.fed
        t0 = time.perf_counter()
        # 1. the cohort and who returns: the same on every rank, drawn from (seed, round, client)
        cohort = fed.schedule.cohort(round_idx)
        returning = fed.schedule.returning(round_idx)
        # 2. this rank trains its share of the returning clients and sums their weighted updates
        share = assign_to_ranks(returning, fed.sizes, comm.world_size)[comm.rank]
        buf = self._train_clients(round_idx, share)
        self.client_parts.end_round(round_idx, comm.rank)  # this rank's clients' local parts, journaled
        self.compression.end_round(round_idx, comm.rank)  # and their error-feedback residuals
        t_trained = _synced(comm.device)
        # 3. ONE all-reduce aggregates updates, weights and metric sums of every rank
        calls_before = comm.call_count("aggregate")
        comm.allreduce_sum_(buf.values, tag="aggregate")
        self.client_parts.after_aggregate(round_idx)  # every rank's journal of this round now exists
        self.compression.after_aggregate(round_idx)
        update_sum, stats = buf.split()
        # 4. the server rule (and DP noise), identically on every rank
        # client-level DP always releases the noised, divided sum (noise alone for an empty cohort), as
        # DP-FedAvg does: skipping a round for too few updates would release the cohort's size unnoised
        applied = (fed.privacy.applies_every_round
                   or (stats.returned >= cfg.fed.min_clients and stats.weight_sum > 0))
        if applied:
            delta = fed.privacy.finalize(update_sum, stats.weight_sum, round_idx)
            self.server_opt.step(self.global_vec, delta.to(torch.float32))
        t_aggregated = _synced(comm.device)
        fed.privacy.account(round_idx, returning)
        # 5. bytes, evaluation, privacy spent
        bytes_row = self.ledger.record(sampled=len(cohort), returned=stats.returned + stats.rejected,
                                       **self._client_bytes(cohort, returning))
        test, personal = None, {}
        if round_idx % cfg.eval.every == 0 or round_idx == cfg.fed.rounds:
            test = self._evaluate()
            personal = self.last_personal = self._evaluate_personal()
            self.last_acc = test[0]
            self.best_acc = test[0] if self.best_acc is None else max(self.best_acc, test[0])
        collective = {}
        if comm.world_size > 1:
            rec = comm.last["aggregate"]
            collective = {"allreduce_bytes": rec.bytes, "allreduce_ring_bytes": rec.ring_bytes,
                          "allreduce_ms": rec.ms, "allreduce_backend": rec.backend,
                          "allreduce_calls": comm.call_count("aggregate") - calls_before,
                          "world_size": comm.world_size}
        return RoundResult(round=round_idx, sampled=len(cohort), returning=len(returning), stats=stats,
                           applied=applied, bytes=bytes_row, test=test, personal=personal,
                           privacy=self._privacy_fields(),
                           collective=collective, train_s=t_trained - t0 - self.accumulate_s,
                           aggregate_s=t_aggregated - t_trained + self.accumulate_s,
                           wall_s=time.perf_counter() - t0)

    def _client_bytes(self, cohort, returning) -> dict[str, int]:
        """With heterogeneous ranks each client receives and sends its own tensors: their bytes summed; encoded
        transfers count the encoded payloads."""
        comp = self.compression
        if comp.active:
            n_up = len(returning)
            return {"down": len(cohort) * comp.down_bytes, "up": n_up * comp.up_bytes,
                    "raw": (len(cohort) + n_up) * self.ledger.bytes_per_transfer}
        if self.fed.lora_ranks is None:
            return {}
        per = self.ledger.bytes_per_transfer
        return {"down": sum(self.client_parts.client_bytes(c, per) for c in cohort),
                "up": sum(self.client_parts.client_bytes(c, per) for c in returning)}

    # -- the loop ------------------------------------------------------------------------
    def _sinks(self) -> MetricsSinks:
        if not self.comm.is_main:
            return MetricsSinks()
        sinks = [JsonlSink(self.rundir.metrics_path)]
        if self.cfg.run.tensorboard:
            sinks.append(TensorBoardSink(self.rundir.path / "tensorboard"))
        return MetricsSinks(sinks)

    def close(self) -> None:
        """Free the run directory (its lease) and stop writing this process's log to it. Safe to call twice."""
        self.client_parts.close()
        self.compression.close()
        self.rundir.release_lease()
        if self._detach_log is not None:
            self._detach_log()
            self._detach_log = None

    def fit(self) -> dict:
        """Train rounds ``start_round..fed.rounds``, checkpointing as configured; returns the summary."""
        cfg, fed = self.cfg, self.fed
        if self.start_round > 1:
            log.info("resuming %s after round %d", self.rundir.path, self.start_round - 1)
        if self.comm.is_main:
            stats = partition_stats(fed.client_indices, fed.data.train_targets, fed.data.num_classes)
            log.info("%s: %d clients, sizes min/median/max %d/%d/%d; %s trainable %s of %s params, "
                     "%.3f MB per transfer", cfg.data.name, cfg.fed.num_clients, min(stats["sizes"]),
                     int(np.median(stats["sizes"])), max(stats["sizes"]), cfg.peft.method,
                     f"{fed.counts['trainable_params']:,}", f"{fed.counts['total_params']:,}",
                     fed.counts["bytes_per_transfer"] / 1e6)
            if self.client_parts.active:
                log.info("split state (%s): %s params sent, %s kept by each client, %s frozen", self.client_parts.why(),
                         f"{fed.counts['sent_params']:,}", f"{fed.counts['local_params']:,}",
                         f"{fed.counts['frozen_params']:,}")
        sinks = self._sinks()
        bar = _progress(cfg, self.comm.is_main, self.start_round)
        t_start = time.perf_counter()
        try:
            for r in range(self.start_round, cfg.fed.rounds + 1):
                row = self.train_round(r).row()
                row["elapsed_s"] = time.perf_counter() - t_start
                row = self.release.row(row)  # under DP with privacy.release=covered: only what epsilon covers
                sinks.write(row)
                if r % cfg.run.checkpoint_every == 0 or r == cfg.fed.rounds:
                    self.rundir.save(self._checkpoint(r), cfg.run.keep_checkpoints)
                    if self.client_parts.store is not None or self.compression.store is not None:
                        self.comm.barrier(tag="client_state")  # the checkpoint exists before journals go
                        self.client_parts.after_checkpoint(r, self.comm.rank)
                        self.compression.after_checkpoint(r, self.comm.rank)
                self.rundir.refresh_lease()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(_postfix(row, self.last_acc))
            summary = self.release.summary(self.summary())
            self.rundir.write_summary(summary)
            self.rundir.write_json("privacy.json", self._privacy_report(summary))
        finally:
            sinks.close()
            if bar is not None:
                bar.close()
            self.close()
        return summary

    def _privacy_report(self, summary: dict) -> dict:
        """``privacy.json``: the mechanism's report, and under DP what the run directory releases (rank 0 reads
        back the fields metrics.jsonl holds)."""
        report = self._state_parts_report(self.fed.privacy.report())
        if self.cfg.privacy.mode != "none" and self.compression.active:
            report["compression"] = {**self.compression.describe(), **compression_order(self.cfg.privacy.mode)}
        if self.cfg.privacy.mode == "none" or not self.comm.is_main:
            return report
        fields = set().union(*(r.keys() for r in read_jsonl(self.rundir.metrics_path)))
        release = self.release.report(fields, [k for k, v in summary.items() if v is not None])
        release["log"] = ("train.log names no client; rejected updates are "
                          + ("logged per round without the client" if self.release.logs_rejections()
                             else "not logged (their number is not covered)"))
        return {**report, "release": release, "earlier_attempts": self._attempts()}

    def _attempts(self) -> list[dict]:
        """Every earlier attempt set aside in ``failed-N/``: the rounds it released and what was charged for them."""
        charged = {c["source"]: c["rounds"] for c in self.fed.privacy.charges}
        return [{"attempt": name, "rounds_released": rounds,
                 "rounds_charged": charged.get(f"{name}/metrics.jsonl", []),
                 **({} if self.noise_key.secure else
                    {"not_charged": "seeded noise: the same config and seed computes the same values"})}
                for name, rounds in self.rundir.earlier_attempts()]

    def summary(self) -> dict:
        counts = self.fed.counts
        s = {"final_acc": self.last_acc, "best_acc": self.best_acc, "rounds": self.cfg.fed.rounds,
             "method": self.cfg.peft.method, "model": self.cfg.model.name, "dataset": self.cfg.data.name,
             "trainable_params": counts["trainable_params"], "total_params": counts["total_params"],
             "bytes_per_transfer": counts["bytes_per_transfer"],
             "bytes_up_total": self.ledger.bytes_up_total, "bytes_down_total": self.ledger.bytes_down_total,
             "bytes_total": self.ledger.bytes_total, "full_ft_bytes_total": self.ledger.full_ft_bytes_total,
             "compress_up": self.cfg.fed.compress_up, "compress_down": self.cfg.fed.compress_down,
             "bytes_up_per_transfer": self.compression.up_bytes,
             "bytes_down_per_transfer": self.compression.down_bytes,
             "compression_ratio": self.ledger.compression_ratio,
             "world_size": self.comm.world_size, "seed": self.cfg.seed,
             "sent_params": counts["sent_params"], "local_params": counts["local_params"],
             "frozen_params": counts["frozen_params"]}
        if self.fed.client_test_indices is not None:
            s.update(self.last_personal)
        s.update(self._privacy_fields())
        if self.cfg.privacy.mode != "none":
            s["seeded_noise"] = self.cfg.privacy.seeded_noise
            s["rounds_charged_again"] = list(self.fed.privacy.rounds_charged_again)
        return s

    def _state_parts_report(self, report: dict) -> dict:
        """With split states, what the mechanism's epsilon is about (added to ``report``)."""
        parts = self.client_parts.parts
        if self.cfg.privacy.mode != "none" and (parts.local or parts.frozen or self.fed.lora_ranks is not None):
            mode = self.cfg.privacy.mode
            report["state_parts"] = {
                "sent": self.cfg.peft.method + " minus " + (", ".join(self.cfg.peft.local + self.cfg.peft.frozen)
                                                            or "nothing"),
                "local": list(self.cfg.peft.local), "frozen": list(self.cfg.peft.frozen),
                "sent_params": self.fed.counts["sent_params"], "local_params": self.fed.counts["local_params"],
                "frozen_params": self.fed.counts["frozen_params"],
                "covers": ("the sent parts only: each client's update of them is clipped and the aggregate noised; "
                           "local parts never leave their client (run.dir/client_state simulates the clients' own "
                           "storage) and frozen parts are the seeded initialisation, trained by no one"
                           if mode == "client" else
                           "DP-SGD clips and noises the per-sample gradients of every trained tensor, the local parts "
                           "included (later sent updates depend on them, so leaving them unnoised would void the "
                           "guarantee of the sent ones); epsilon covers what a client sends, and its local parts "
                           "too; frozen parts are the seeded initialisation, trained by no one")}
        if self.cfg.privacy.mode != "none" and self.fed.client_test_indices is not None:
            report["personal_acc"] = ("personal_acc and its percentiles are measured on each client's held-out "
                                      "samples (data.client_test_fraction, never trained on) without noise: "
                                      "epsilon does not cover them")
        return report

    def _privacy_fields(self) -> dict:
        """``epsilon`` spent so far (largest over clients) at ``delta``; no noise means no bound:
        ``epsilon`` null and ``epsilon_unbounded`` true (strict JSON has no infinity)."""
        eps = self.fed.privacy.epsilon()
        if eps is None:
            return {}
        if math.isinf(eps):
            return {"epsilon": None, "epsilon_unbounded": True, "delta": self.cfg.privacy.delta}
        return {"epsilon": eps, "delta": self.cfg.privacy.delta}


def _synced(device: torch.device) -> float:
    """``time.perf_counter()`` after the device has finished its queued work."""
    synchronize(device)
    return time.perf_counter()


def _progress(cfg: Config, is_main: bool, start: int):
    """tqdm's bar on a terminal only: redirected into a log file, its carriage returns are noise."""
    if not (is_main and cfg.run.progress and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.fed.rounds, initial=start - 1, desc=f"{cfg.peft.method}", unit="round",
                dynamic_ncols=True, leave=True)


def _postfix(row: dict, acc: float | None) -> str:
    """The progress bar's text, from the row as written (a count withheld under DP is not shown)."""
    acc_s = "-" if acc is None or math.isnan(acc) else f"{acc:.3f}"
    if "bytes_up_total" not in row or "bytes_down_total" not in row:
        return f"acc={acc_s}"
    mb = (row["bytes_up_total"] + row["bytes_down_total"]) / 1e6
    return f"acc={acc_s} comm={mb:.1f}MB"
