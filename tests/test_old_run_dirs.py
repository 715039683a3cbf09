"""Run directories written by an earlier version: a key their config.yaml lacks counts as its default."""

from __future__ import annotations

import yaml

from fedpeft_hpc.config import load_config
from fedpeft_hpc.runs.rundir import RunDir
from tests.conftest import QUICKSTART


def _saved_without(tmp_path, *keys: str):
    from fedpeft_hpc.config.load import dump_yaml

    cfg = load_config(QUICKSTART, [f"run.dir={tmp_path}"])
    saved = yaml.safe_load(dump_yaml(cfg))
    for key in keys:
        section, name = key.split(".")
        del saved[section][name]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    return cfg


def test_a_key_missing_from_an_old_config_counts_as_its_default(tmp_path):
    cfg = _saved_without(tmp_path, "fed.compress_up", "data.client_test_fraction", "privacy.release")
    assert RunDir(tmp_path, is_main=False).config_differences(cfg) == []


def test_a_missing_key_set_to_another_value_is_still_a_difference(tmp_path):
    _saved_without(tmp_path, "fed.compress_up")
    changed = load_config(QUICKSTART, [f"run.dir={tmp_path}", "fed.compress_up=int8"])
    diff = RunDir(tmp_path, is_main=False).config_differences(changed)
    assert [(k, new) for k, _, new in diff] == [("fed.compress_up", "int8")]
