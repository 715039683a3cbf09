"""Logical FL traffic: the bytes an FL deployment would send, from the tensors exchanged.

Down: the global PEFT state to every sampled client (dropped ones too: they received it).
Up: one update of the same tensors from every client that returned one. Also what full
fine-tuning (every model parameter) would have sent for the same schedule.
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

    def record(self, sampled: int, returned: int, up: int | None = None, down: int | None = None) -> dict[str, int]:
        """This round's bytes: ``sampled`` / ``returned`` transfers of ``bytes_per_transfer``, unless ``up`` /
        ``down`` give the sums of each client's own transfers (heterogeneous LoRA ranks)."""
        up = returned * self.bytes_per_transfer if up is None else up
        down = sampled * self.bytes_per_transfer if down is None else down
        self.bytes_up_total += up
        self.bytes_down_total += down
        self.full_ft_bytes_total += (sampled + returned) * self.full_bytes_per_transfer
        return {"bytes_up": up, "bytes_down": down, "bytes_up_total": self.bytes_up_total,
                "bytes_down_total": self.bytes_down_total, "full_ft_bytes_total": self.full_ft_bytes_total}

    @property
    def bytes_total(self) -> int:
        return self.bytes_up_total + self.bytes_down_total

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k in ("bytes_up_total", "bytes_down_total", "full_ft_bytes_total"):
            setattr(self, k, int(state[k]))
