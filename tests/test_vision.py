"""Vision: the MLP-Mixer (timm names), random image models, the image_cls task, adapter reload and runs."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from raysim.aggregators import REGISTRY
from raysim.config import ExperimentConfig, load_config
from raysim.models import build_base_model, modules_to_save, target_modules
from raysim.vision import Mixer, MixerConfig

ROOT = Path(__file__).resolve().parents[1]
VISION = str(ROOT / "experiments" / "vision_digits.yaml")


def timm_mixer_shapes(depth: int, dim: int, tokens: int, channels: int, patch: int, in_chans: int,
                      classes: int) -> dict[str, tuple[int, ...]]:
    """The state-dict keys and shapes of timm's MlpMixer (mlp_ratio (0.5, 4.0)), written out by hand."""
    shapes = {"stem.proj.weight": (dim, in_chans, patch, patch), "stem.proj.bias": (dim,)}
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (dim,), b + "norm1.bias": (dim,),
                       b + "mlp_tokens.fc1.weight": (dim // 2, tokens), b + "mlp_tokens.fc1.bias": (dim // 2,),
                       b + "mlp_tokens.fc2.weight": (tokens, dim // 2), b + "mlp_tokens.fc2.bias": (tokens,),
                       b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
                       b + "mlp_channels.fc1.weight": (4 * dim, dim), b + "mlp_channels.fc1.bias": (4 * dim,),
                       b + "mlp_channels.fc2.weight": (dim, 4 * dim), b + "mlp_channels.fc2.bias": (dim,)})
    shapes.update({"norm.weight": (dim,), "norm.bias": (dim,), "head.weight": (classes, dim), "head.bias": (classes,)})
    return shapes


def test_a_timm_state_dict_loads_strictly_and_drives_the_output():
    cfg = MixerConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_layers=2, num_labels=5)
    model = Mixer(cfg)
    shapes = timm_mixer_shapes(2, 32, 16, 32, 4, 3, 5)
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=gen) * 0.1 for k, s in shapes.items()}
    model.load_state_dict(state, strict=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    x = torch.randn(2, 3, 16, 16, generator=gen)
    before = model(pixel_values=x).logits
    with torch.no_grad():
        model.blocks[1].mlp_tokens.fc1.weight.mul_(2)
    assert before.shape == (2, 5) and not torch.allclose(before, model(pixel_values=x).logits)


def test_mixer_b16_has_timms_shapes_and_parameter_count():
    with torch.device("meta"):
        model = Mixer(MixerConfig(image_size=224, patch_size=16, num_channels=3, hidden_size=768, num_layers=12,
                                  num_labels=1000))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == timm_mixer_shapes(12, 768, 196, 768, 16, 3,
                                                                                           1000)
    assert sum(p.numel() for p in model.parameters()) == 59_880_472           # timm's mixer_b16_224


def test_mixer_loss_is_cross_entropy_of_its_logits():
    model = Mixer(MixerConfig(num_labels=3))
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 2, 1, 2])
    out = model(pixel_values=x, labels=y)
    assert torch.isclose(out.loss, torch.nn.functional.cross_entropy(out.logits, y))
    assert model(pixel_values=x).loss is None


@pytest.mark.parametrize("name,kind", [("random:vit-tiny", "ViTForImageClassification"),
                                       ("random:mixer-tiny", "Mixer")])
def test_random_image_models_are_seeded(name, kind):
    a, b, c = (build_base_model(name, 10, s, task="image_cls") for s in (1, 1, 2))
    assert type(a).__name__ == kind
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), c.state_dict().values()))
    assert a(pixel_values=torch.randn(2, 1, 8, 8)).logits.shape == (2, 10)


def _cfg(**over) -> ExperimentConfig:
    sets = [f"{k}={v}" for k, v in {"federation.num_clients": 4, "federation.clients_per_round": 4,
                                     "federation.rounds": 2, "train.local_steps": 3, "data.max_examples": 240,
                                     "resources.num_workers": 1, **over}.items()]
    return load_config(VISION, sets)


@pytest.mark.parametrize("name,targets,head", [("random:vit-tiny", ["q_proj", "v_proj"], ["classifier"]),
                                               ("random:mixer-tiny", ["fc1", "fc2"], ["head"])])
def test_defaults_target_attention_or_mixer_mlps_and_save_the_head(name, targets, head):
    cfg = _cfg(**{"model.name": name})
    assert target_modules(cfg) == targets and modules_to_save(cfg) == head


def _wrapped(cfg, raw):
    from raysim.lora.peft_io import wrap_lora
    from raysim.tasks import task_for

    task = task_for(cfg)
    model = build_base_model(cfg.model.name, raw.num_labels, cfg.seed, task="image_cls")
    return task, wrap_lora(model, 4, 8, target_modules(cfg), 0.0, cfg.seed, task_type=task.peft_task_type,
                           modules_to_save=modules_to_save(cfg))


@pytest.mark.parametrize("name", ["random:vit-tiny", "random:mixer-tiny"])
def test_task_arrays_batch_and_evaluate(name):
    from raysim.engines.peft_engine import DataArrays
    from raysim.lora.peft_io import head_parameters
    from raysim.runner import prepare_data

    cfg = _cfg(**{"model.name": name})
    raw, _ = prepare_data(cfg)
    task, model = _wrapped(cfg, raw)
    arrays = task.arrays(raw)
    assert arrays["pixel_values"].shape == (240, 1, 8, 8) and arrays["labels"].dtype == np.int64
    assert task.group_names == ["identity", "invert", "noise", "rotate"]
    data = DataArrays(arrays, torch.device("cpu"))
    idx = np.arange(0, 240, 3)
    batch = task.batch(data, idx)
    assert set(batch) == {"pixel_values", "labels"} and batch["pixel_values"].shape == (80, 1, 8, 8)
    assert set(head_parameters(model)) == {f"{modules_to_save(cfg)[0]}.weight", f"{modules_to_save(cfg)[0]}.bias"}
    model.eval()
    total = task.evaluate(model, data, idx, 32, contextlib.nullcontext)
    with torch.no_grad():
        logits = model(pixel_values=batch["pixel_values"]).logits
    pred = logits.argmax(-1).numpy()
    metrics = total.metrics()
    assert metrics["accuracy"] == pytest.approx(float((pred == arrays["labels"][idx]).mean()))
    loss = torch.nn.functional.cross_entropy(logits, batch["labels"]).item()
    assert metrics["loss"] == pytest.approx(loss, rel=1e-5)
    from sklearn.metrics import f1_score

    assert metrics["macro_f1"] == pytest.approx(f1_score(arrays["labels"][idx], pred, average="macro"))
    groups = arrays["eval_group"][idx]
    assert total.sums["group/1/count"] == np.sum(groups == 1)
    assert total.sums["group/1/correct"] == np.sum((pred == arrays["labels"][idx])[groups == 1])


def test_image_size_must_match_the_model():
    from raysim.config import ConfigError
    from raysim.data.sources import load_source
    from raysim.tasks import task_for

    cfg = _cfg(**{"data.image_size": 16})
    raw = load_source(cfg.data, cfg.seed, task="image_cls")
    with pytest.raises(ConfigError, match="data.image_size: 16 differs from the 8-pixel input"):
        task_for(cfg).arrays(raw)


@pytest.mark.parametrize("override,message", [
    ("data.source=embedded:bbc-news", "data.source: embedded:bbc-news holds text; task.type image_cls needs images"),
    ("model.name=random:bert-tiny", "model.name: random:bert-tiny is a classification/encoder model"),
    ("task.type=seq_cls", "model.name: random:vit-tiny is an image classifier")])
def test_config_mistakes_exit_2_before_ray(override, message, tmp_path, capsys, monkeypatch):
    import ray

    from raysim.cli import main

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started"))
    assert main(["run", VISION, "--out", str(tmp_path / "run"), "--no-progress", "--set", override]) == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- Ray runs


@pytest.mark.ray
def test_run_logs_accuracy_macro_f1_and_domains_and_the_adapter_reloads(ray_local, tmp_path):
    from raysim.evaluation import evaluate_run
    from raysim.runner import run_experiment

    cfg = _cfg(**{"federation.rounds": 2})
    run_experiment(cfg, tmp_path, progress=False)
    rounds = pd.read_parquet(tmp_path / "rounds.parquet")
    assert list(rounds["round"]) == [1, 2]
    assert rounds["accuracy"].between(0, 1).all() and rounds["macro_f1"].between(0, 1).all()
    groups = pd.read_parquet(tmp_path / "groups.parquet")
    acc = groups[(groups["metric"] == "accuracy") & (groups["round"] == 2)]
    assert sorted(acc["group"]) == ["identity", "invert", "noise", "rotate"]
    assert np.isclose((acc["value"] * acc["n"]).sum() / acc["n"].sum(), rounds["accuracy"].iloc[-1])
    again = evaluate_run(tmp_path)
    assert again["accuracy"] == pytest.approx(rounds["accuracy"].iloc[-1])
    assert again["loss"] == pytest.approx(rounds["loss"].iloc[-1], rel=1e-4)


AGGREGATORS = tuple(sorted(REGISTRY))            # every registered method runs on an image task


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    import ray

    from conftest import RAY_LOCAL
    from raysim.cli import main

    if not ray.is_initialized():
        ray.init(**RAY_LOCAL)
    out = {}
    for name in AGGREGATORS:
        path = tmp_path_factory.mktemp(name)
        rc = main(["run", VISION, "--out", str(path), "--no-progress", "--set", f"aggregator.name={name}",
                   "--set", "federation.rounds=2", "--set", "train.local_steps=3", "--set", "federation.num_clients=8",
                   "--set", "federation.clients_per_round=4", "--set", "data.max_examples=400",
                   "--set", "resources.num_workers=1"])
        assert rc == 0
        out[name] = pd.read_parquet(path / "rounds.parquet")
    return out


@pytest.mark.ray
@pytest.mark.parametrize("name", AGGREGATORS)
def test_aggregators_run_on_images_from_the_cli(cli_runs, name):
    rounds = cli_runs[name]
    assert list(rounds["round"]) == [1, 2] and rounds["accuracy"].between(0, 1).all()
    assert rounds["deviation_rel"].notna().all() != REGISTRY[name].personalized   # null: no single global update


@pytest.mark.ray
def test_exact_and_fair_deviation_on_images(cli_runs):
    assert (cli_runs["flora"]["deviation_rel"] < 1e-5).all()
    assert (cli_runs["fedit"]["deviation_rel"] > 1e-4).all()          # domain non-IID clients disagree
    assert (cli_runs["lora_fair"]["deviation_rel"].values <= cli_runs["fedit"]["deviation_rel"].values + 1e-12).all()
