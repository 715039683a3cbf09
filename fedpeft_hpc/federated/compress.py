"""Compressed transfers in a round: every client's update goes through encode and decode before it is
aggregated, and the clients train from the decoded global state (``fed.compress_up`` / ``compress_down``).

Uplink: client ``k``'s update ``d`` (plus, with ``fed.error_feedback``, the residual ``e_k`` its last
encoding left) is encoded with stochastic rounding drawn from ``(seed, COMPRESS_UP, round, k)``; the
server aggregates ``decode(encode(d + e_k))`` and the client keeps ``e_k <- d + e_k - decode(...)``.
The residuals live in a client-state store (``run.dir/client_state_residual``): one row per client
that ever sent, journaled per round and compacted after each checkpoint like the local parts of
``peft.local``, so a resumed run and any number of ranks see exactly the same residuals.

Downlink: the server sends the global state's difference from the initial PEFT state (which every
client builds from the seed and the backbone), encoded once per round with rounding drawn from
``(seed, COMPRESS_DOWN, round)``; every sampled client trains from ``init + decode(...)``, exactly
what it would decode. The server keeps its own state exact.

Bytes: each codec's size depends on the vector's length alone (``Codec.size``); every encoding is
checked against it, so the ledger's ``size x transfers`` is what the encoders produced.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fedpeft_hpc.config.schema import Config
from fedpeft_hpc.federated.codecs import Codec, build_codec
from fedpeft_hpc.runs.client_state import ClientStateStore, StoreRounds, open_recovered
from fedpeft_hpc.utils.streams import COMPRESS_DOWN, COMPRESS_UP, torch_generator

RESIDUAL_DIR = "client_state_residual"


class Compression(StoreRounds):
    def __init__(self, cfg: Config, init_vec: torch.Tensor, run_dir: Path):
        fed = cfg.fed
        self.seed = cfg.seed
        self.n = init_vec.numel()
        self.up: Codec = build_codec(fed.compress_up, fed.compress_block, fed.topk_fraction)
        self.down: Codec = build_codec(fed.compress_down, fed.compress_block, fed.topk_fraction)
        self.up_name, self.down_name = fed.compress_up, fed.compress_down
        self.error_feedback = fed.error_feedback
        self.up_bytes = self.up.size(self.n)
        self.down_bytes = self.down.size(self.n)
        self.init_vec = init_vec.detach().clone()
        self.num_clients = fed.num_clients
        self.store_dir = Path(run_dir) / RESIDUAL_DIR
        self.store: ClientStateStore | None = None
        self._sent: tuple[int, torch.Tensor] | None = None  # (round, what the clients decode)

    @property
    def active(self) -> bool:
        return self.up_name != "none" or self.down_name != "none"

    def describe(self) -> dict:
        """What privacy.json and the log say about the encoding."""
        return {"up": self.up_name, "down": self.down_name, "error_feedback": self.error_feedback,
                "bytes_up_per_transfer": self.up_bytes, "bytes_down_per_transfer": self.down_bytes}

    # -- the residual store (same life cycle as the local parts' store; StoreRounds: the round hooks) -----
    def _init(self) -> dict[str, torch.Tensor]:
        return {"residual": torch.zeros(self.n, dtype=torch.float32)}

    def open_store(self, is_main: bool, resume_round: int | None) -> None:
        """Rank 0, before the ranks agree on the start: the residuals as of the checkpoint (none: fresh)."""
        if self.error_feedback and is_main:
            open_recovered(self.store_dir, self._init(), self.num_clients, resume_round)

    def attach_store(self) -> None:
        if self.error_feedback:
            self.store = ClientStateStore(self.store_dir, self._init(), self.num_clients)

    def residual(self, client: int) -> torch.Tensor:
        """Client ``client``'s error-feedback residual (zeros before its first encoding)."""
        if self.store is None:
            return torch.zeros(self.n, dtype=torch.float32)
        return self.store.get_vec(client)

    # -- transfers ------------------------------------------------------------------------------------
    def downlink(self, round_idx: int, global_vec: torch.Tensor) -> torch.Tensor:
        """The global state as every client of ``round_idx`` decodes it (``global_vec`` itself without
        downlink compression)."""
        if self.down_name == "none":
            return global_vec
        if self._sent is None or self._sent[0] != round_idx:
            ref = self.init_vec.to(global_vec.device)
            gen = torch_generator(self.seed, COMPRESS_DOWN, round_idx)
            enc = self.down.encode(global_vec - ref, gen)
            self._check(enc.nbytes, self.down_bytes, "down")
            self._sent = (round_idx, ref + self.down.decode(enc).to(global_vec.device))
        return self._sent[1]

    def uplink(self, round_idx: int, client: int, delta: torch.Tensor) -> torch.Tensor:
        """What the server decodes of ``client``'s update (error feedback: its residual added, the new one kept)."""
        if self.up_name == "none":
            return delta
        x = delta.to(torch.float32)
        if self.store is not None:
            x = x + self.residual(client).to(x.device)
        enc = self.up.encode(x, torch_generator(self.seed, COMPRESS_UP, round_idx, client))
        self._check(enc.nbytes, self.up_bytes, "up")
        decoded = self.up.decode(enc).to(x.device)
        if self.store is not None:
            self.store.put_vec(client, x - decoded)
        return decoded

    def _check(self, produced: int, expected: int, way: str) -> None:
        if produced != expected:  # a codec whose size depends on the values would make the ledger wrong
            raise RuntimeError(f"the {way}link encoding took {produced} bytes, the ledger counts {expected}")


def compression_order(mode: str) -> dict:
    """privacy.json: in which order a DP run clips, encodes and noises, and why epsilon still holds."""
    if mode == "client":
        return {"order": ["local training", "add the error-feedback residual (fed.error_feedback)",
                          "encode (client)", "decode (server)", "clip to privacy.max_grad_norm", "sum",
                          "Gaussian noise", "divide by the cohort size"],
                "why": "clipping comes after decoding, so every aggregated update is within max_grad_norm whatever "
                       "the encoding did; the residual stays on its client and reaches the server only through "
                       "later clipped updates; the rounding noise is drawn from the seed, independent of the data"}
    return {"order": ["DP-SGD (per-sample clipping and noise) during local training",
                      "add the error-feedback residual (fed.error_feedback)", "encode (client)", "decode (server)",
                      "sum"],
            "why": "the encoding, the residual and the aggregate are computed from each client's privatised update "
                   "and seeded rounding alone: post-processing, epsilon is unchanged"}
