import pytest
import yaml

from fedpeft_hpc.config import load_config, to_dict
from fedpeft_hpc.errors import ConfigError, UserError
from tests.conftest import QUICKSTART


def test_yaml_1_1_values_are_coerced_by_declared_type(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 1e-3\nprivacy:\n  delta: 1e-5\nfed:\n  client_batch: off\nrun:\n  progress: no\n")
    cfg = load_config(p, ["optim.weight_decay=5e-4", "fed.rounds=3.0", "model.pretrained=yes"])
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.privacy.delta == pytest.approx(1e-5)
    assert cfg.optim.weight_decay == pytest.approx(5e-4)
    assert cfg.fed.rounds == 3 and isinstance(cfg.fed.rounds, int)
    assert cfg.fed.client_batch == "off"
    assert cfg.run.progress is False and cfg.model.pretrained is True


def test_overrides_reach_nested_and_free_form_keys():
    cfg = load_config(QUICKSTART, ["model.kwargs.depth=2", "peft.lora_targets=qkv,fc1", "model.checkpoint=null",
                                    "model.pretrain_recipe=null"])
    assert cfg.model.kwargs["depth"] == 2 and cfg.model.kwargs["embed_dim"] == 64
    assert cfg.peft.lora_targets == ["qkv", "fc1"]
    assert cfg.model.checkpoint is None


@pytest.mark.parametrize("override, key, words", [
    ("fed.rouds=3", "fed.rouds", "Did you mean 'rounds'"),
    ("fed.clients_per_round=100", "fed.clients_per_round", "more than fed.num_clients"),
    ("data.alpha=0", "data.alpha", "> 0"),
    ("peft.method=lorra", "peft.method", "Did you mean 'lora'"),
    ("optim.lr=fast", "optim.lr", "expected a number"),
    ("fed.rounds=2.5", "fed.rounds", "expected an integer"),
    ("fed.dropout=1.5", "fed.dropout", "<= 1"),
    ("privacy.mode=sample", "privacy.noise_multiplier", "target_epsilon"),
    ("privacy.mode=maybe", "privacy.mode", "none, sample, client"),
    ("data.name=mnist", "data.name", "digits"),
    ("fed.client_batch=many", "fed.client_batch", "valid are off, auto"),
    ("fed.client_batch=-2", "fed.client_batch", "valid are off, auto"),
    ("model.precision=fp16", "model.precision", "fp32, tf32, bf16"),
    ("privacy.delta=1.5", "privacy.delta", "<= 1"),
    ("privacy.noise_multiplier=-1", "privacy.noise_multiplier", ">= 0"),
])
def test_bad_values_name_the_key_and_what_is_valid(override, key, words):
    with pytest.raises(ConfigError) as e:
        load_config(QUICKSTART, [override])
    assert e.value.key == key
    assert words in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("fed: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(QUICKSTART, ["fed.rounds"])


def test_resolved_config_round_trips():
    cfg = load_config(QUICKSTART, ["optim.lr=0.5"])
    text = yaml.safe_dump(to_dict(cfg))
    from fedpeft_hpc.config import from_dict

    assert from_dict(yaml.safe_load(text)) == cfg


def test_every_shipped_config_loads():
    from tests.conftest import REPO

    files = sorted((REPO / "configs").rglob("*.yaml"))
    assert len(files) >= 10
    for f in files:
        load_config(f)
