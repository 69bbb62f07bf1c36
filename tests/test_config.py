"""Config validation and the CLI's handling of bad input: one clear message, exit 2, no Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raysim.cli import main
from raysim.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "experiments" / "tiny.yaml"


def test_defaults_and_overrides_are_typed():
    cfg = load_config(TINY, ["lora.rank=16", "aggregator.name=fedex", "data.partition={scheme: iid}",
                             "lora.target_modules=[query, key, value]"])
    assert cfg.lora.rank == 16 and cfg.aggregator.name == "fedex"
    assert cfg.data.partition.scheme == "iid"
    assert cfg.lora.target_modules == ["query", "key", "value"]
    tiers = load_config(TINY, ["aggregator.name=flora",
                               "lora.rank={scheme: tiers, ranks: [4, 16], fractions: [0.5, 0.5]}"])
    assert tiers.lora.max_rank() == 16


def test_resolved_config_round_trips():
    cfg = load_config(TINY, ["seed=3"])
    again = load_config(None, [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}"
                               for k, v in cfg.to_yaml_dict().items()])
    assert again == cfg


@pytest.mark.parametrize("override,key", [
    ("bogus=1", "bogus: unknown key"),
    ("train.lr_typo=0.1", "train.lr_typo: unknown key"),
    ("aggregator.name=nope", "aggregator.name: unknown aggregator 'nope'"),
    ("federation.clients_per_round=99", "federation.clients_per_round (99) must be <="),
    ("lora.rank=0", "lora.rank"),
    ("data.partition={scheme: zipf}", "data.partition"),
    ("lora.rank={scheme: tiers, ranks: [4, 16], fractions: [0.5, 0.6]}", "sum to 1"),
    ("aggregator.lam=0.1", "aggregator.lam: unknown key"),
    ("lora.head_policy=personal", "lora.head_policy"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_config(TINY, [override])


def test_a_local_head_needs_a_trained_head():
    with pytest.raises(ConfigError, match=r"lora.head_policy: 'local' needs lora.train_head: true"):
        load_config(TINY, ["lora.head_policy=local", "lora.train_head=false"])
    assert load_config(TINY, ["lora.head_policy=local"]).lora.head_policy == "local"


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if the CLI gets as far as starting (or joining) Ray."""
    import raysim.runner

    def refuse(*args, **kwargs):
        raise AssertionError("a config error must be caught before Ray starts")

    monkeypatch.setattr(raysim.runner, "start_ray", refuse)


def _cli(tmp_path, capsys, *extra):
    out = tmp_path / "run"
    rc = main(["run", str(TINY), "--out", str(out), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert not (out / "summary.json").exists()
    return rc, err


@pytest.mark.parametrize("extra,needle", [
    (["--set", "bogus_key=1"], "bogus_key: unknown key"),
    (["--set", "aggregator.name=fedavgx"], "aggregator.name: unknown aggregator"),
    (["--set", "federation.clients_per_round=9"], "federation.clients_per_round"),
    (["--set", "data.source=csv:/no/such/file.csv"], "data.source: file not found"),
    (["--set", "model.name=/no/such/model"], "model.name"),
])
def test_cli_exits_2_with_one_clear_message(tmp_path, capsys, no_ray, extra, needle):
    rc, err = _cli(tmp_path, capsys, *extra)
    assert rc == 2
    assert needle in err
    assert "Traceback" not in err
    assert err.count("raysim: error:") == 1


def test_cli_rejects_a_missing_label_column(tmp_path, capsys, no_ray):
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\n" + "".join(f"doc number {i},{i % 2}\n" for i in range(40)))
    rc, err = _cli(tmp_path, capsys, "--set", f"data.source=csv:{csv}", "--set", "data.label_column=topic",
                   "--set", "model.name=random:bert-tiny")
    assert rc == 2 and "data.label_column" in err and "topic" in err


def test_cli_rejects_more_clients_than_samples(tmp_path, capsys, no_ray):
    rc, err = _cli(tmp_path, capsys, "--set", "data.synthetic.num_examples=40", "--set",
                   "federation.num_clients=30", "--set", "federation.clients_per_round=3")
    assert rc == 2 and "federation.num_clients" in err


def test_missing_config_file(tmp_path, capsys):
    assert main(["run", str(tmp_path / "none.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
