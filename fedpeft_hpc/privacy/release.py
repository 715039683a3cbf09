"""What a DP run writes: ``privacy.release`` = ``covered`` (default) or ``all``.

Epsilon bounds what can be learnt from the noised global states the server releases, and from
whatever is computed from them alone. A metrics row holds more than that: the training loss and
accuracy over the cohort's private batches (no noise), timings (they depend on the private data
sizes, and under sample-level DP on the secret Poisson batches), and counts of who was sampled,
dropped or rejected. Which of those counts are covered depends on the mode:

* every mode: ``round``, the test metrics of the noised global state on the server's test set
  (treated as public), ``epsilon``/``delta`` (a function of the public schedule), and the
  all-reduce's size, call count, backend and world size (fixed by the config);
* sample level: the cohort is a public function of the seed, and each update leaves its client
  already noised by DP-SGD, so whether it was rejected and everything counted from that
  (``clients``, ``sampled``, ``dropped``, ``rejected``, ``skipped``, every byte count) is
  post-processing of covered outputs;
* client level, Poisson cohorts: the cohort's size is secret (the accountant credits it), so no
  count and no byte count is covered; ``skipped`` is always false;
* client level, fixed cohorts: ``sampled`` (= clients_per_round) and the bytes sent down follow
  from the schedule; the bytes sent up and the dropouts only when ``fed.dropout`` is 0 (dropouts
  are drawn from the secret key); ``clients`` and ``rejected`` never (rejection looks at the
  individual updates).

With ``covered`` a row keeps only those fields (a field this module does not know is dropped:
the safe default), ``summary.json`` writes ``null`` for what is not covered, and no log line
names a client or, under client-level DP, reports rejected updates. With ``all`` rows are
written in full and ``privacy.json`` lists every written field that epsilon does not cover.
Without DP everything is written as is.
"""

from __future__ import annotations

from typing import Iterable

ALWAYS = frozenset({"round", "test_acc", "test_loss", "epsilon", "delta", "epsilon_unbounded", "allreduce_bytes",
                    "allreduce_ring_bytes", "allreduce_calls", "allreduce_backend", "world_size"})
COUNTS = frozenset({"clients", "sampled", "dropped", "rejected", "skipped"})
BYTES = frozenset({"bytes_up", "bytes_down", "bytes_up_total", "bytes_down_total", "full_ft_bytes_total"})
#: summary.json fields that never depend on private data (configuration, counts of parameters, the guarantee)
SUMMARY_PUBLIC = frozenset({"final_acc", "best_acc", "rounds", "method", "model", "dataset", "trainable_params",
                            "total_params", "bytes_per_transfer", "world_size", "seed", "epsilon", "delta",
                            "epsilon_unbounded", "seeded_noise", "rounds_charged_again", "compress_up",
                            "compress_down", "bytes_up_per_transfer", "bytes_down_per_transfer"})
POLICIES = ("covered", "all")


def covered_fields(mode: str, sampling: str, dropout: float) -> frozenset[str]:
    """The metrics fields epsilon covers in ``mode`` with cohorts drawn by ``sampling`` (see the module doc);
    ``compression_ratio`` is computed from the bytes up and down: covered where both are."""
    fields = _covered_fields(mode, sampling, dropout)
    return fields | {"compression_ratio"} if {"bytes_up", "bytes_down"} <= fields else fields


def _covered_fields(mode: str, sampling: str, dropout: float) -> frozenset[str]:
    if mode == "sample":
        return ALWAYS | COUNTS | BYTES
    if mode == "client" and sampling == "fixed":
        fixed = {"skipped", "sampled", "bytes_down", "bytes_down_total"}
        if dropout <= 0.0:
            fixed |= {"dropped", "bytes_up", "bytes_up_total", "full_ft_bytes_total"}
        return ALWAYS | fixed
    if mode == "client":
        return ALWAYS | {"skipped"}
    raise ValueError(f"no release policy for privacy.mode={mode!r}")


class ReleasePolicy:
    """Filters what a run writes (rows, summary, log lines) by ``privacy.release``; ``dp=False``: no filter."""

    def __init__(self, mode: str, release: str, sampling: str, dropout: float):
        if release not in POLICIES:
            raise ValueError(f"privacy.release={release!r} is not one of {POLICIES}")
        self.mode = mode
        self.release = release
        self.dp = mode != "none"
        self.covered = covered_fields(mode, sampling, dropout) if self.dp else frozenset()
        self.withheld: set[str] = set()  # fields dropped (or nulled) under covered in this attempt

    @property
    def filters(self) -> bool:
        return self.dp and self.release == "covered"

    def row(self, row: dict) -> dict:
        """The metrics row as written."""
        if not self.filters:
            return row
        self.withheld.update(k for k in row if k not in self.covered)
        return {k: v for k, v in row.items() if k in self.covered}

    def summary_covered(self, key: str) -> bool:
        if key in ("bytes_total", "compression_ratio"):
            return {"bytes_up_total", "bytes_down_total"} <= self.covered
        return key in SUMMARY_PUBLIC or key in self.covered

    def summary(self, summary: dict) -> dict:
        """``summary.json`` as written: uncovered values ``null`` under covered (keys stay, so readers find them)."""
        if not self.filters:
            return summary
        out = {}
        for k, v in summary.items():
            if self.summary_covered(k):
                out[k] = v
            else:
                out[k] = None
                self.withheld.add(k)
        return out

    def names_clients(self) -> bool:
        """Whether a log line may name a client: never under DP (under client-level DP the cohort is secret;
        under sample-level DP a name ties a client to an event of its private training)."""
        return not self.dp

    def logs_rejections(self) -> bool:
        """Whether rejected updates are logged round by round: not under client-level DP with ``covered``
        (their number is not covered there)."""
        return not (self.filters and self.mode == "client")

    def report(self, metrics_fields: Iterable[str], summary_fields: Iterable[str]) -> dict:
        """``privacy.json``'s ``release`` section; ``*_fields``: the fields written (non-null) in each file."""
        metrics_fields, summary_fields = sorted(set(metrics_fields)), sorted(set(summary_fields))
        out = {"policy": self.release, "covered_metrics_fields": sorted(self.covered),
               "metrics_fields_written": metrics_fields,
               "released_not_covered": sorted({f for f in metrics_fields if f not in self.covered}
                                              | {f"summary.{f}" for f in summary_fields
                                                 if not self.summary_covered(f)})}
        if self.filters:
            out["withheld"] = sorted(self.withheld)
        return out
