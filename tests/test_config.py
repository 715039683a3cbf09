import pytest
import yaml

from fedpeft_hpc.config import dotted, load_config, to_dict
from fedpeft_hpc.errors import ConfigError, UserError
from fedpeft_hpc.preflight import check_names
from tests.conftest import QUICKSTART, REPO, run_cli


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
    ("privacy.delta=1.5", "privacy.delta", "< 1"),
    ("privacy.noise_multiplier=-1", "privacy.noise_multiplier", ">= 0"),
    ("peft.lora_targets=qkv,mlp", "peft.lora_targets", "qkv, proj, fc1, fc2"),
    ("optim.name=adam", "optim.name", "Did you mean 'adamw'"),
])
def test_bad_values_name_the_key_and_what_is_valid(override, key, words):
    with pytest.raises(ConfigError) as e:
        check_names(load_config(QUICKSTART, [override]))
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
    """Training configs load; sweep files (any file below a ``sweeps/`` folder) load as sweeps."""
    from fedpeft_hpc.launchers.sweep_spec import load_sweep

    files = sorted((REPO / "configs").rglob("*.yaml"))
    configs = [f for f in files if "sweeps" not in f.relative_to(REPO).parts]
    sweeps = [f for f in files if "sweeps" in f.relative_to(REPO).parts]
    assert len(configs) >= 5 and len(sweeps) >= 9
    for f in configs:
        load_config(f)
    for f in sweeps:
        load_sweep(f)


def test_base_files_are_loaded_first_and_overridden(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text("seed: 1\nfed:\n  rounds: 7\n  num_clients: 20\nmodel:\n"
                                        "  kwargs: {depth: 2, embed_dim: 32}\n")
    (tmp_path / "sub" / "mid.yaml").write_text("base: ../base.yaml\nfed:\n  rounds: 5\n")
    (tmp_path / "sub" / "top.yaml").write_text("base: mid.yaml\nmodel:\n  kwargs: {depth: 3}\n")
    cfg = load_config(tmp_path / "sub" / "top.yaml", ["fed.clients_per_round=4"])
    assert (cfg.seed, cfg.fed.rounds, cfg.fed.num_clients, cfg.fed.clients_per_round) == (1, 5, 20, 4)
    assert cfg.model.kwargs == {"depth": 3}  # kwargs describe one architecture: replaced whole, not merged


def test_a_sweep_file_given_as_a_config_says_so(tmp_path):
    sweep = REPO / "configs" / "sweeps" / "quickstart_methods.yaml"
    with pytest.raises(UserError, match="is a sweep file .*fedpeft-hpc sweep"):
        load_config(sweep)


def test_base_errors_name_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(UserError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(UserError, match="missing.yaml does not exist"):
        load_config(tmp_path / "c.yaml")


def test_config_show_prints_the_resolved_config_and_runs_nothing(tmp_path):
    res = run_cli("config", "show", str(QUICKSTART), "fed.rounds=3", f"run.dir={tmp_path / 'r'}")
    assert res.returncode == 0, res.stderr
    shown = yaml.safe_load(res.stdout)
    assert shown == to_dict(load_config(QUICKSTART, ["fed.rounds=3", f"run.dir={tmp_path / 'r'}"]))
    assert not (tmp_path / "r").exists()
    bad = run_cli("config", "show", str(QUICKSTART), "peft.method=lorra")
    assert bad.returncode == 2 and "peft.method" in bad.stderr and "Traceback" not in bad.stderr


def test_config_keys_lists_every_key_with_its_help():
    from fedpeft_hpc.config.describe import config_keys
    from fedpeft_hpc.preflight import registry_choices

    keys = {k.key: k for k in config_keys(registry_choices())}
    flat = set(dotted(to_dict(load_config(None))))
    assert set(keys) == flat
    assert all(k.help for k in keys.values())
    assert keys["peft.method"].choices == ("adapter", "bias", "full", "head", "lora", "prompt")
    assert keys["privacy.mode"].choices == ("none", "sample", "client")
    assert keys["fed.dropout"].bounds == ">= 0, <= 1"
    res = run_cli("config", "keys")
    assert res.returncode == 0 and "privacy.delta" in res.stdout


def test_readme_key_table_is_generated_from_the_schema():
    """README's table between the markers is exactly `fedpeft-hpc config keys --markdown`."""
    from fedpeft_hpc.config.describe import config_keys, keys_markdown
    from fedpeft_hpc.preflight import registry_choices

    readme = (REPO / "README.md").read_text()
    start, end = "<!-- config-keys:start -->", "<!-- config-keys:end -->"
    assert start in readme and end in readme
    table = readme.split(start, 1)[1].split(end, 1)[0].strip()
    assert table == keys_markdown(config_keys(registry_choices())), \
        "README's key table is stale: regenerate it with `fedpeft-hpc config keys --markdown`"

