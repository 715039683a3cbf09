import numpy as np
import pytest
import torch

from fedpeft_hpc.config import ServerConfig
from fedpeft_hpc.federated.aggregate import RoundBuffer, update_is_valid
from fedpeft_hpc.federated.ledger import ByteLedger
from fedpeft_hpc.federated.sampling import Schedule, assign_to_ranks, sample_cohort
from fedpeft_hpc.utils.streams import torch_generator
from fedpeft_hpc.federated.server_opt import build_server_optimizer


def test_cohort_is_a_function_of_seed_and_round_only():
    a = sample_cohort(42, 3, 64, 8)
    assert np.array_equal(a, sample_cohort(42, 3, 64, 8))
    assert len(set(a.tolist())) == 8 and a.min() >= 0 and a.max() < 64
    assert not np.array_equal(a, sample_cohort(42, 4, 64, 8))
    assert not np.array_equal(a, sample_cohort(43, 3, 64, 8))


def test_client_streams_differ_by_client_and_round():
    x = torch.rand(4, generator=torch_generator(1, 13, 2, 5))
    assert torch.equal(x, torch.rand(4, generator=torch_generator(1, 13, 2, 5)))
    assert not torch.equal(x, torch.rand(4, generator=torch_generator(1, 13, 2, 6)))
    assert not torch.equal(x, torch.rand(4, generator=torch_generator(1, 13, 3, 5)))


def test_dropout_rate_and_determinism():
    s = Schedule(seed=7, num_clients=100, clients_per_round=50, dropout=0.3)
    dropped = sum(len(s.dropped(r)) for r in range(1, 41))
    assert 0.25 < dropped / (40 * 50) < 0.35
    assert s.dropped(5) == Schedule(7, 100, 50, 0.3).dropped(5)
    assert sorted(s.dropped(5) + s.returning(5)) == s.cohort(5)
    assert s.participation(3).sum() == sum(len(s.returning(r)) for r in range(1, 4))


def test_assignment_balances_samples_and_covers_each_client_once():
    sizes = np.array([100, 90, 10, 10, 10, 80, 5, 5])
    parts = assign_to_ranks(list(range(8)), sizes, 2)
    assert sorted(sum(parts, [])) == list(range(8))
    loads = [sizes[p].sum() for p in parts]
    assert sorted(loads) == [140, 170]  # the optimum: 90 + 80 cannot be split further
    even = assign_to_ranks(list(range(6)), np.array([5, 5, 5, 5, 5, 5]), 3)
    assert [len(p) for p in even] == [2, 2, 2]
    assert parts == assign_to_ranks(list(range(8)), sizes, 2)
    assert assign_to_ranks([3, 1], sizes, 4)[2:] == [[], []]


def test_ledger_arithmetic_is_exact():
    led = ByteLedger(bytes_per_transfer=1000, full_bytes_per_transfer=50_000)
    r1 = led.record(sampled=8, returned=6)
    assert (r1["bytes_down"], r1["bytes_up"]) == (8000, 6000)
    r2 = led.record(sampled=8, returned=8)
    assert (r2["bytes_down_total"], r2["bytes_up_total"]) == (16_000, 14_000)
    assert led.bytes_total == 30_000
    assert led.full_ft_bytes_total == (8 + 6 + 8 + 8) * 50_000
    other = ByteLedger(1000, 50_000)
    other.load_state_dict(led.state_dict())
    assert other == led


def test_round_buffer_weights_and_metric_sums():
    buf = RoundBuffer(3, torch.device("cpu"))
    buf.add(torch.tensor([1.0, 2.0, 3.0]), weight=10, loss_sum=5.0, seen=20, correct=15)
    buf.add(torch.tensor([3.0, 2.0, 1.0]), weight=30, loss_sum=3.0, seen=60, correct=30)
    buf.reject()
    vec, stats = buf.split()
    assert torch.allclose(vec / stats.weight_sum, torch.tensor([2.5, 2.0, 1.5], dtype=torch.float64))
    assert (stats.returned, stats.rejected, stats.seen, stats.correct) == (2, 1, 80, 45)
    assert stats.train_loss == pytest.approx(0.1)


def test_invalid_updates_are_detected():
    assert update_is_valid(torch.ones(4), None)
    assert not update_is_valid(torch.tensor([1.0, float("nan")]), None)
    assert not update_is_valid(torch.tensor([1.0, float("inf")]), None)
    assert not update_is_valid(torch.full((4,), 10.0), max_norm=5.0)


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedadam"])
def test_server_optimizers(name):
    cfg = ServerConfig(optimizer=name, lr=0.5)
    opt = build_server_optimizer(cfg, 3, torch.device("cpu"))
    x = torch.zeros(3)
    d = torch.tensor([1.0, -2.0, 0.0])
    opt.step(x, d)
    if name == "fedavg":
        assert torch.allclose(x, 0.5 * d)
    if name == "fedavgm":
        opt.step(x, d)  # v = d, then 0.9 d + d
        assert torch.allclose(x, 0.5 * d + 0.5 * 1.9 * d)
    if name == "fedadam":
        m, v = 0.1 * d, 0.99 * cfg.eps ** 2 + 0.01 * d * d  # v_0 = tau^2 (Reddi et al., Algorithm 2)
        assert torch.allclose(x, 0.5 * m / (v.sqrt() + cfg.eps))
    # exact resume of the optimizer state
    clone = build_server_optimizer(cfg, 3, torch.device("cpu"))
    clone.load_state_dict(opt.state_dict(), opt.steps)
    y1, y2 = x.clone(), x.clone()
    opt.step(y1, d)
    clone.step(y2, d)
    assert torch.equal(y1, y2)
