"""Logical FL traffic: the bytes an FL deployment would send, from the tensors exchanged.

Down: the global PEFT state to every sampled client (dropped ones too: they received it).
Up: one update of the same tensors from every client that returned one. Also what full
fine-tuning (every model parameter) would have sent for the same schedule. With compressed
transfers (``fed.compress_up`` / ``compress_down``) the bytes are the encoded payloads and
``compression_ratio`` is the fp32 bytes of the same transfers over the encoded ones.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class ByteLedger:
    bytes_per_transfer: int
    full_bytes_per_transfer: int
    bytes_up_total: int = 0
    bytes_down_total: int = 0
    full_ft_bytes_total: int = 0
    raw_bytes_total: int = 0  # the same transfers unencoded (fp32)

    def record(self, sampled: int, returned: int, up: int | None = None, down: int | None = None,
               raw: int | None = None) -> dict:
        """This round's bytes: ``sampled`` / ``returned`` transfers of ``bytes_per_transfer``, unless ``up`` /
        ``down`` give the sums of each client's own transfers (heterogeneous LoRA ranks, encoded transfers);
        ``raw``: what those transfers take unencoded (default: ``up + down``)."""
        up = returned * self.bytes_per_transfer if up is None else up
        down = sampled * self.bytes_per_transfer if down is None else down
        raw = up + down if raw is None else raw
        self.bytes_up_total += up
        self.bytes_down_total += down
        self.raw_bytes_total += raw
        self.full_ft_bytes_total += (sampled + returned) * self.full_bytes_per_transfer
        return {"bytes_up": up, "bytes_down": down, "bytes_up_total": self.bytes_up_total,
                "bytes_down_total": self.bytes_down_total, "full_ft_bytes_total": self.full_ft_bytes_total,
                "compression_ratio": raw / (up + down) if up + down else None}

    @property
    def bytes_total(self) -> int:
        return self.bytes_up_total + self.bytes_down_total

    @property
    def compression_ratio(self) -> float | None:
        """The whole run's unencoded bytes over its encoded ones."""
        return self.raw_bytes_total / self.bytes_total if self.bytes_total else None

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k in ("bytes_up_total", "bytes_down_total", "full_ft_bytes_total"):
            setattr(self, k, int(state[k]))
        # checkpoints from before encoded transfers: nothing was encoded
        self.raw_bytes_total = int(state.get("raw_bytes_total", self.bytes_up_total + self.bytes_down_total))
