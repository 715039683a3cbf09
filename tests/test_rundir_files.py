"""Run directories a group can share: modes that honour the umask, and the run's own log."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fedpeft_hpc.utils.files import atomic_write_text, default_file_mode
from tests.conftest import QUICKSTART, REPO, subprocess_env, tiny_overrides


def _train(run_dir: Path, umask: int, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fedpeft_hpc", "train", str(QUICKSTART), *tiny_overrides(run_dir, *extra)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env(), cwd=REPO,
                          preexec_fn=lambda: os.umask(umask))


def _modes(root: Path) -> tuple[set[int], set[int]]:
    files, dirs = set(), set()
    for p in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        (dirs if p.is_dir() else files).add(mode)
    return files, dirs


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_every_file_of_a_run_honours_the_umask(tmp_path, umask, file_mode, dir_mode):
    run_dir = tmp_path / "shared" / "run"
    res = _train(run_dir, umask, "privacy.mode=client", "privacy.noise_multiplier=1.0", "run.keep_checkpoints=1")
    assert res.returncode == 0, res.stderr[-2000:]
    names = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}
    assert {"config.yaml", "summary.json", "partition.json", "privacy.json", "metrics.jsonl", "train.log",
            "checkpoints/latest.safetensors", "checkpoints/round_00002.safetensors"} <= names
    files, dirs = _modes(tmp_path / "shared")
    assert files == {file_mode}
    assert dirs == {dir_mode}


def test_atomic_write_gives_the_mode_open_would(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "x.txt", "hello")
        with open(tmp_path / "y.txt", "w") as f:
            f.write("hello")
        assert default_file_mode() == 0o640
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.txt").stat().st_mode) == stat.S_IMODE((tmp_path / "y.txt").stat().st_mode)
    assert (tmp_path / "x.txt").read_text() == "hello"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_the_run_log_holds_every_session_and_the_warnings(tmp_path):
    run_dir = tmp_path / "r"
    bad = ("peft.method=head", "optim.lr=1e30", "optim.momentum=0")  # updates so large they are rejected
    res = _train(run_dir, 0o022, *bad)
    assert res.returncode == 0, res.stderr[-2000:]
    # as if the job had been killed after round 1: the round-1 checkpoint is the latest, no summary
    ckpts = run_dir / "checkpoints"
    os.replace(ckpts / "round_00001.safetensors", ckpts / "latest.safetensors")
    (run_dir / "summary.json").unlink()
    res = _train(run_dir, 0o022, *bad)
    assert res.returncode == 0, res.stderr[-2000:]
    log = (run_dir / "train.log").read_text()
    assert log.count("digits: 8 clients") == 2  # one line per session
    assert "after round 1" in log and "resuming" in log
    assert log.count("round 1: rejected the update of client") >= 1  # first session
    assert log.count("round 2: rejected the update of client") >= 2  # both sessions trained round 2
    lines = [ln for ln in log.splitlines() if ln.strip()]
    assert lines and all(ln[:4].isdigit() and ln[4] == "-" for ln in lines)  # dated lines


def test_a_run_that_never_started_writes_no_log(tmp_path):
    run_dir = tmp_path / "never"
    res = _train(run_dir, 0o022, "data.alpha=-1")
    assert res.returncode == 2
    assert not run_dir.exists()


def test_a_checkpoint_is_fsynced_before_and_its_directory_after_the_rename(tmp_path, monkeypatch):
    import torch

    from fedpeft_hpc.runs.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        target = Path(os.readlink(f"/proc/self/fd/{fd}"))
        events.append(("fsync-dir" if target.is_dir() else "fsync-file", target.name))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / "checkpoints" / "latest.safetensors"
    save_checkpoint(path, Checkpoint(round=3, peft={"w": torch.arange(4.0)}))
    kinds = [kind for kind, _ in events]
    # the new content is on disk before it takes the name, and the new name is on disk after
    assert kinds.index("fsync-file") < kinds.index("replace") < len(kinds) - 1 - kinds[::-1].index("fsync-dir")
    assert ("replace", "latest.safetensors") in events and events[-1] == ("fsync-dir", "checkpoints")
    assert load_checkpoint(path).round == 3
