"""tools/probe_gap.py: per-seed full-minus-method gaps per setting, from a report's results.csv."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

TOOL = REPO / "tools" / "probe_gap.py"


def test_gaps_are_paired_by_seed_per_domain(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("name,data.name,peft.method,seed,state,final_acc\n"
                    "a,far,full,1,finished,0.90\na,far,full,2,finished,0.80\n"
                    "b,far,head,1,finished,0.60\nb,far,head,2,finished,0.70\n"
                    "c,near,full,1,finished,0.97\nc,near,full,2,failed,\n"
                    "d,near,head,1,finished,0.98\nd,near,head,2,finished,0.10\n")
    res = subprocess.run([sys.executable, str(TOOL), str(path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stdout.splitlines() if line.startswith("| ")]
    assert lines[0] == "| data.name | full - head | full - bias | full - adapter | full - prompt | full - lora |"
    # far: seed 1 +30, seed 2 +10 -> +20 ± 14.1; near: only seed 1 has both runs -> -1.0
    assert lines[1] == "| far | +20.0 ± 14.1 | – | – | – | – |"
    assert lines[2] == "| near | -1.0 (n=1/2) | – | – | – | – |"
    out = tmp_path / "gap.png"
    res = subprocess.run([sys.executable, str(TOOL), str(path), "--markdown", str(tmp_path / "gap.md"),
                          "--plot", str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert out.read_bytes()[:4] == b"\x89PNG" and "| far | +20.0 ± 14.1" in (tmp_path / "gap.md").read_text()


def test_missing_column_exit_2(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("name,method,seed,state,final_acc\na,full,1,finished,0.9\n")
    res = subprocess.run([sys.executable, str(TOOL), str(path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "peft.method" in res.stderr and "Traceback" not in res.stderr
