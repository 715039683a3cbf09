"""Shared helpers: the repo root, a fast tiny config, and a CLI runner for subprocess tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
BIN = Path(sys.executable).parent


def tiny_overrides(run_dir: Path, *extra: str) -> list[str]:
    """The quickstart model and data, shrunk to seconds: random-init backbone, 2 short rounds."""
    return [f"run.dir={run_dir}", "run.progress=false", "run.threads=1", "model.pretrained=false",
            "fed.rounds=2", "fed.local_epochs=1", "fed.num_clients=8", "fed.clients_per_round=4",
            "data.min_samples=10", *extra]


def subprocess_env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def assert_same_stores(sa, sb, num_clients: int, tol: float) -> None:
    """Two client-state stores wrote the same clients, at least one, with rows equal within ``tol``; closes both."""
    assert [sa.written(c) for c in range(num_clients)] == [sb.written(c) for c in range(num_clients)]
    assert any(sa.written(c) for c in range(num_clients))
    assert max(float((sa.get_vec(c) - sb.get_vec(c)).abs().max()) for c in range(num_clients)) <= tol
    sa.close(), sb.close()


def kill_after_rounds(cmd: list[str], run_dir: Path, rounds: int, timeout: float = 240) -> None:
    """Start ``cmd`` and SIGKILL it once ``run_dir/metrics.jsonl`` holds ``rounds`` rows."""
    import signal
    import time

    from fedpeft_hpc.utils.files import read_jsonl

    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").is_file() and len(read_jsonl(run_dir / "metrics.jsonl")) >= rounds:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def run_cli(*args: str, timeout: float = 300, cwd: Path | None = None, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedpeft_hpc", *args], capture_output=True, text=True,
                          timeout=timeout, env=subprocess_env(**env), cwd=cwd or REPO)


@pytest.fixture(scope="session")
def pretrained_ckpt(tmp_path_factory) -> Path:
    """The quickstart backbone, pre-trained once per test session by the built-in recipe."""
    from fedpeft_hpc.config import load_config
    from fedpeft_hpc.models.pretrain import ensure_pretrained

    path = tmp_path_factory.mktemp("pretrained") / "vit_digits.safetensors"
    cfg = load_config(QUICKSTART, [f"model.checkpoint={path}"])
    ensure_pretrained(cfg.model)
    return path


@pytest.fixture(scope="session")
def slurm():
    """A ready single-node SLURM for the tests marked with ``tests.slurm_support.SLURM_MARKS``."""
    from tests.slurm_support import local_slurm

    yield from local_slurm()
