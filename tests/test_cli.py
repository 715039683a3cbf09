import json

import pytest

from tests.conftest import QUICKSTART, REPO, run_cli, tiny_overrides


@pytest.mark.parametrize("args, words", [
    (["train", str(QUICKSTART), "fed.rouds=3"], "fed.rouds"),
    (["train", str(QUICKSTART), "fed.clients_per_round=99"], "fed.clients_per_round"),
    (["train", str(QUICKSTART), "data.alpha=-1"], "data.alpha"),
    (["train", str(QUICKSTART), "peft.method=prefix"], "peft.method"),
    (["train", "missing.yaml"], "missing.yaml"),
    (["train", str(QUICKSTART), "model.name=vit_nonexistent", "model.pretrained=false"], "model.name"),
    (["train", str(QUICKSTART), "model.checkpoint=/nope/w.safetensors", "model.pretrain_recipe=null"],
     "/nope/w.safetensors"),
    (["train", str(REPO / "configs/paper/cifar100_vitb16.yaml"), "model.pretrained=false",
      "data.root=/nope/cifar"], "data.root"),
    (["inspect", str(QUICKSTART), "model.kwargs.depth=x"], "model.kwargs"),
])
def test_bad_input_exits_2_with_a_message_and_no_traceback(tmp_path, args, words):
    res = run_cli(*args, f"run.dir={tmp_path / 'r'}", timeout=120)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert words in res.stderr
    assert not (tmp_path / "r").exists()  # nothing written for a run that never started


def test_inspect_json_for_vit_b16():
    res = run_cli("inspect", str(REPO / "configs/paper/cifar100_vitb16.yaml"), "--json", "--all")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["method"] == "bias" and out["trainable_params"] == 179_812
    assert out["total_params"] == 85_875_556 and out["bytes_per_transfer"] == 4 * 179_812
    by = {m["method"]: m["trainable_params"] for m in out["methods"]}
    assert by["full"] == 85_875_556 and by["head"] == 76_900 and by["bias"] == 179_812


def test_train_cli_writes_the_run_and_prints_the_summary(tmp_path):
    res = run_cli("train", str(QUICKSTART), *tiny_overrides(tmp_path / "r", "fed.rounds=1"))
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary == json.loads((tmp_path / "r" / "summary.json").read_text())


def test_help_lists_the_commands():
    res = run_cli("--help")
    assert res.returncode == 0
    for cmd in ("train", "inspect", "pretrain", "quickstart", "submit", "sweep", "report"):
        assert cmd in res.stdout
