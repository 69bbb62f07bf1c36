"""Decoder LLMs end to end (task.type: causal_lm): metrics, groups.parquet, adapter reload, FedEx-LoRA
exactness on GPT-2's Conv1D layers with the saved updates re-checked offline, and config errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from raysim.aggregators import REGISTRY
from raysim.cli import main
from raysim.runner import run_experiment

ARITH = {"task.type": "causal_lm", "data.source": "synthetic:arith", "data.arith.num_examples": 480,
         "data.local_test_fraction": 0.0, "model.max_length": 16,
         "data.partition": "{scheme: by_column, column: operator, min_samples: 8}",
         "federation.num_clients": 6, "federation.clients_per_round": 3, "federation.rounds": 2,
         "train.batch_size": 32, "train.lr": 3.0e-3, "lora.rank": 4, "lora.alpha": 8, "lora.target_modules": "null",
         "eval.max_new_tokens": 2, "eval.max_examples": 24, "eval.group_by": "operator"}


@pytest.fixture(scope="module")
def llama_run(tiny_config, tmp_path_factory):
    return tiny_config(**ARITH, **{"model.name": "random:llama-tiny"}), tmp_path_factory.mktemp("llama")


def test_a_decoder_run_logs_loss_perplexity_and_exact_match(ray_local, llama_run):
    from raysim.evaluation import evaluate_run

    cfg, out = llama_run
    run_experiment(cfg, out, progress=False)
    df = pd.read_parquet(out / "rounds.parquet")
    assert df["accuracy"].isna().all()                               # no classification accuracy
    assert df["exact_match"].between(0, 1).all()
    np.testing.assert_allclose(df["perplexity"], np.exp(df["loss"]), rtol=1e-9)
    groups = pd.read_parquet(out / "groups.parquet")
    last = groups[(groups["round"] == 2) & (groups["metric"] == "exact_match")]
    assert sorted(last["group"]) == ["*", "+", "-"] and last["n"].sum() == 24
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"] == {"examples_truncated": 0, "examples_prompt_too_long": 0}
    assert summary["final"]["exact_match"] == df["exact_match"].iloc[-1]
    got = evaluate_run(out)                                          # AutoModelForCausalLM + PeftModel
    final = df.iloc[-1]
    assert got["loss"] == pytest.approx(final["loss"], rel=1e-5)
    assert got["exact_match"] == pytest.approx(final["exact_match"], abs=1e-12)


def test_fedex_is_exact_on_gpt2_conv1d_and_the_saved_updates_recheck(ray_local, tiny_config, tmp_path):
    cfg = tiny_config(**{**ARITH, "model.name": "random:gpt2-tiny", "aggregator.name": "fedex",
                         "output.save_updates": "true", "eval.group_by": "null"})
    run_experiment(cfg, tmp_path, progress=False)
    df = pd.read_parquet(tmp_path / "rounds.parquet")
    assert (df["deviation_rel"] < 1e-6).all()
    rnd = tmp_path / "updates" / "round-0002"
    glob = load_file(str(rnd / "global.safetensors"))
    with safe_open(str(rnd / "global.safetensors"), "np") as f:
        s_global = float(f.metadata()["scale"])
    module = next(k.rsplit(".", 1)[0] for k in glob if k.endswith(".base_delta"))
    assert module.endswith("attn.c_attn")                             # a Conv1D layer
    ideal = 0
    for path in sorted(rnd.glob("client-*.safetensors")):
        with safe_open(str(path), "np") as f:
            w, s = float(f.metadata()["weight"]), float(f.metadata()["scale"])
            ideal = ideal + w * s * f.get_tensor(f"{module}.lora_B").astype(np.float64) @ f.get_tensor(
                f"{module}.lora_A").astype(np.float64)
    # the cumulative base delta holds round 1's aggregate too: compare the round-2 increment
    prev = load_file(str(tmp_path / "updates" / "round-0001" / "global.safetensors"))
    applied = (glob[f"{module}.base_delta"] - prev[f"{module}.base_delta"]
               + s_global * glob[f"{module}.lora_B"] @ glob[f"{module}.lora_A"])
    assert applied.shape == (192, 64)                                 # nn.Linear orientation (out, in)
    assert np.linalg.norm(applied - ideal) <= 1e-5 * np.linalg.norm(ideal)


def test_personalised_evaluation_reports_local_token_loss(ray_local, tiny_config, tmp_path):
    cfg = tiny_config(**{**ARITH, "model.name": "random:llama-tiny", "federation.rounds": 1,
                         "data.local_test_fraction": 0.2, "eval.personalized": "true", "eval.group_by": "null"})
    run_experiment(cfg, tmp_path, progress=False)
    row = pd.read_parquet(tmp_path / "rounds.parquet").iloc[-1]
    clients = pd.read_parquet(tmp_path / "clients.parquet")
    done = clients[clients["status"] == "ok"]
    assert done["local_loss"].notna().all() and done["local_accuracy"].isna().all()
    assert row["personalized_loss"] == pytest.approx(np.average(done["local_loss"], weights=done["num_samples"]))
    assert np.isnan(row["personalized_accuracy"])                      # no accuracy for a causal LM


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_aggregator_runs_on_a_decoder(ray_local, tiny_config, tmp_path, name):
    """One round of each method on random:llama-tiny, frozen factors checked bit for bit (output.debug)."""
    cfg = tiny_config(**{**ARITH, "model.name": "random:llama-tiny", "aggregator.name": name,
                         "federation.rounds": 1, "train.local_steps": 2, "eval.group_by": "null",
                         "eval.max_examples": 6, "output.debug": "true", "resources.num_workers": 1})
    run_experiment(cfg, tmp_path, progress=False)
    row = pd.read_parquet(tmp_path / "rounds.parquet").iloc[-1]
    assert row["clients_completed"] == 3 and np.isfinite(row["loss"]) and 0 <= row["exact_match"] <= 1
    assert (tmp_path / "summary.json").exists()


@pytest.mark.parametrize("extra,needle", [
    (["--set", "task.type=causal_lm"], "model.name"),                              # an encoder for a decoder task
    (["--set", "model.name=random:llama-tiny"], "model.name"),                     # a decoder for classification
    (["--set", "task.type=causal_lm", "--set", "model.name=random:llama-tiny", "--set", "lora.target_modules=null",
      "--set", "eval.group_by=topic", "--set", "data.source=synthetic:arith"], "eval.group_by"),
])
def test_wrong_task_combinations_exit_2_before_ray(tmp_path, capsys, monkeypatch, extra, needle):
    import raysim.runner

    monkeypatch.setattr(raysim.runner, "start_ray", lambda *a, **k: pytest.fail("Ray started"))
    rc = main(["run", "experiments/tiny.yaml", "--out", str(tmp_path / "run"), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "Traceback" not in err


def test_prompts_that_fill_max_length_exit_2_before_ray(tmp_path, capsys, monkeypatch):
    import raysim.runner

    monkeypatch.setattr(raysim.runner, "start_ray", lambda *a, **k: pytest.fail("Ray started"))
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"q": f"question number {i} is long", "a": str(i % 10)}) + "\n"
                            for i in range(200)))
    rc = main(["run", "experiments/causal_arith.yaml", "--out", str(tmp_path / "run"), "--no-progress",
               "--set", f"data.source=jsonl:{data}", "--set", "data.prompt_column=q", "--set", "data.response_column=a",
               "--set", "data.partition={scheme: iid}", "--set", "eval.group_by=null", "--set", "model.max_length=16"])
    err = capsys.readouterr().err
    assert rc == 2 and "model.max_length" in err and "Traceback" not in err
