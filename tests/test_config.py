"""Config validation and the CLI's handling of bad input: one clear message, exit 2, no Ray."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from raysim.cli import main
from raysim.config import ConfigError, ExperimentConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "experiments" / "tiny.yaml"


def test_defaults_and_overrides_are_typed():
    cfg = load_config(TINY, ["lora.rank=16", "aggregator.name=fedex", "data.partition={scheme: iid}",
                             "lora.target_modules=[query, key, value]"])
    assert cfg.lora.rank == 16 and cfg.aggregator.name == "fedex"
    assert cfg.data.partition.scheme == "iid"
    assert cfg.lora.target_modules == ["query", "key", "value"]
    assert load_config(TINY, ["resources.cohort_size=auto"]).resources.cohort_size == "auto"
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
    ("data.partition.scheme=zipf", "data.partition.scheme: unknown scheme 'zipf'; allowed: iid, dirichlet"),
    ("lora.rank={scheme: tiers, ranks: [4, 16], fractions: [0.5, 0.6]}", "sum to 1"),
    ("aggregator.lam=0.1", "aggregator.lam: unknown key"),
    ("lora.head_policy=personal", "lora.head_policy"),
    ("resources.cohort_size=0", "resources.cohort_size: Input should be greater than or equal to 1"),
    ("resources.cohort_size=fast", "resources.cohort_size: Input should be 'auto'"),
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


def _nested_models(ann) -> list[type[BaseModel]]:
    """Every pydantic model inside an annotation (Annotated, unions, Optional, list[...])."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [ann]
    return [m for arg in typing.get_args(ann) for m in _nested_models(arg)]


def test_every_config_field_has_a_description():
    seen, todo, missing = set(), [("", ExperimentConfig)], []
    while todo:
        prefix, model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for key, field in model.model_fields.items():
            if not (field.description or "").strip():
                missing.append(f"{model.__name__}.{key} ({prefix}{key})")
            todo += [(f"{prefix}{key}.", sub) for sub in _nested_models(field.annotation)]
    # the walk reaches the nested sections and every union variant
    names = {m.__name__ for m in seen}
    assert {"DataConfig", "IIDPartition", "QuantitySkewPartition", "RankTiers", "RankByQuality",
            "LabelNoiseConfig"} <= names
    assert not missing, "config fields without a description: " + ", ".join(missing)


def _load(*overrides):
    notes = []
    cfg = load_config(TINY, list(overrides), notify=notes.append)
    return cfg, notes


def test_setting_a_partition_scheme_switches_the_variant():
    raw = yaml.safe_load(TINY.read_text())["data"]["partition"]
    assert raw["scheme"] == "dirichlet" and "alpha" in raw           # the precondition of this test
    cfg, notes = _load("data.partition.scheme=iid")
    assert cfg.data.partition.scheme == "iid"
    assert cfg.data.partition.min_samples == raw["min_samples"]       # a key iid also has is kept
    assert notes == ["data.partition.scheme=iid: dropped alpha (not keys of iid); kept min_samples"]
    cfg, notes = _load("data.partition.scheme=shards", "data.partition.shards_per_client=3")
    assert (cfg.data.partition.scheme, cfg.data.partition.shards_per_client) == ("shards", 3)
    assert len(notes) == 1 and "dropped alpha" in notes[0]
    cfg, notes = _load("data.partition.scheme=dirichlet")            # same tag: nothing replaced
    assert cfg.data.partition.alpha == raw["alpha"] and notes == []


def test_keys_set_before_the_tag_are_kept():
    cfg, notes = _load("data.partition.alpha=0.7", "data.partition.scheme=quantity_skew")
    assert (cfg.data.partition.scheme, cfg.data.partition.alpha) == ("quantity_skew", 0.7)
    with pytest.raises(ConfigError, match="data.partition.shards_per_client: unknown key"):
        _load("data.partition.scheme=shards", "data.partition.shards_per_client=3", "data.partition.scheme=iid")


def test_setting_a_rank_scheme_switches_the_variant():
    tiers = "lora.rank={scheme: tiers, ranks: [4, 16], fractions: [0.5, 0.5]}"
    cfg, notes = _load("aggregator.name=hetlora", tiers, "lora.rank.scheme=by_data_size")
    assert (cfg.lora.rank.scheme, cfg.lora.rank.ranks, cfg.lora.rank.fractions) == ("by_data_size", [4, 16],
                                                                                     [0.5, 0.5])
    assert notes == []
    cfg, notes = _load("aggregator.name=hetlora", tiers, "lora.rank.scheme=by_quality")
    assert (cfg.lora.rank.ranks, cfg.lora.rank.high_fraction) == ([4, 16], 0.1)
    assert notes == ["lora.rank.scheme=by_quality: dropped fractions (not keys of by_quality); kept ranks"]
    cfg, notes = _load("aggregator.name=hetlora", "lora.rank.scheme=by_quality", "lora.rank.ranks=[2, 8]")
    assert (cfg.lora.rank.scheme, cfg.lora.rank.ranks) == ("by_quality", [2, 8])
    assert len(notes) == 1 and "replaced lora.rank=4" in notes[0]


def test_setting_the_aggregator_name_drops_the_old_method_parameters(tmp_path):
    raw = yaml.safe_load(TINY.read_text())
    raw["aggregator"] = {"name": "lora_fair", "lam": 0.2, "solver": "ls"}
    path = tmp_path / "fair.yaml"
    path.write_text(yaml.safe_dump(raw))
    notes = []
    cfg = load_config(path, ["aggregator.name=fedex"], notify=notes.append)
    assert cfg.aggregator.name == "fedex" and cfg.aggregator.params() == {}
    assert notes == ["aggregator.name=fedex: dropped lam, solver (not keys of fedex)"]
    with pytest.raises(ConfigError, match="aggregator.name: unknown aggregator 'nope'"):
        load_config(path, ["aggregator.name=nope"], notify=notes.append)
    assert len(notes) == 1                                          # an unknown name replaces nothing


def test_cli_names_the_dropped_keys_on_stderr(tmp_path, capsys, no_ray):
    rc, err = _cli(tmp_path, capsys, "--set", "data.partition.scheme=iid",
                   "--set", "data.source=csv:/no/such/file.csv")
    assert rc == 2 and "data.source: file not found" in err          # stops before Ray, after the notice
    assert "raysim: data.partition.scheme=iid: dropped alpha (not keys of iid)" in err


@pytest.mark.parametrize("override,needle", [
    ("seed=-5", "seed"), ("seed=1.0e+23", "seed"),
    ("federation.round_timeout_s=.inf", "federation.round_timeout_s"), ("train.lr=.nan", "train.lr"),
    ("lora.alpha=.inf", "lora.alpha"), ("name=../../x", "name"),
    ("faults.kill_worker_at_round=9", "faults.kill_worker_at_round"),
])
def test_validation_holes_are_one_clear_error_before_ray(tmp_path, capsys, no_ray, override, needle):
    rc, err = _cli(tmp_path, capsys, "--set", override)
    assert rc == 2 and needle in err and "Traceback" not in err and err.count("raysim: error:") == 1


def test_method_parameters_must_be_finite(tmp_path, capsys, no_ray):
    rc, err = _cli(tmp_path, capsys, "--set", "aggregator.name=lora_fair", "--set", "aggregator.lam=.inf")
    assert rc == 2 and "aggregator.lam" in err


def test_an_empty_config_file_is_refused(tmp_path, capsys, no_ray):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    assert main(["run", str(empty), "--out", str(tmp_path / "run")]) == 2
    assert "empty" in capsys.readouterr().err


def test_a_local_run_never_gets_more_logical_cpus_than_the_machine(tmp_path, capsys, monkeypatch):
    import ray

    import raysim.runner

    monkeypatch.setattr(ray, "is_initialized", lambda: False)                  # as in a fresh process
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started"))
    monkeypatch.setattr(raysim.runner.os, "cpu_count", lambda: 2)
    rc, err = _cli(tmp_path, capsys, "--set", "resources.num_workers=10000")
    assert rc == 2 and "resources.num_workers" in err and "Traceback" not in err


def test_target_modules_are_checked_against_the_models_layers_before_ray(tmp_path, capsys, no_ray):
    rc, err = _cli(tmp_path, capsys, "--set", "lora.target_modules=[query, nonexistent]")
    assert rc == 2 and "lora.target_modules" in err and "'nonexistent'" in err and "query" in err


def test_an_all_empty_text_column_is_refused(tmp_path, capsys, no_ray):
    csv = tmp_path / "d.csv"
    csv.write_text("text,body,label\n" + "".join(f"doc number {i},,{i % 2}\n" for i in range(40)))
    rc, err = _cli(tmp_path, capsys, "--set", f"data.source=csv:{csv}", "--set", "data.text_column=body",
                   "--set", "model.name=random:bert-tiny")
    assert rc == 2 and "data.text_column" in err and "'body'" in err


def test_a_yaml_bomb_is_refused_without_expanding_it(tmp_path, capsys):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]   # 10^9 values expanded
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(["name: bomb", *lines]) + "\n")
    assert main(["run", str(bomb), "--out", str(tmp_path / "run")]) == 2
    assert "aliases" in capsys.readouterr().err
