"""The fixed bench workloads: raw config dicts plus how to measure them."""

from __future__ import annotations

import copy
from typing import Any

# tiny: random bert-tiny weights; synthetic text classification (8,000 examples of 32 tokens over a
# 1,000-token vocabulary, 4 labels, 20 % held out) split IID over 100 clients (about 64 examples
# each); 10 clients per round, 4 local AdamW steps of batch 16 at lr 5e-4, LoRA r=8 on query/value
# with the classifier head trained, FedIT, 20 rounds on 2 single-CPU workers, no evaluation until
# the last round, no checkpoints.
WORKLOADS: dict[str, dict[str, Any]] = {
    "tiny": {
        "device": "cpu",
        "ks": [1, 2, 4, 8, 16],
        "engine_clients": 16,
        "min_time_s": 1.0,
        "e2e_rounds": 20,
        "config": {
            "name": "bench-tiny", "seed": 0,
            "model": {"name": "random:bert-tiny", "max_length": 32, "dtype": "float32"},
            "data": {"source": "synthetic:text-cls", "test_fraction": 0.2, "local_test_fraction": 0.0,
                     "synthetic": {"num_examples": 8000, "seq_len": 32, "vocab_size": 1000, "num_labels": 4},
                     "partition": {"scheme": "iid", "min_samples": 4}},
            "federation": {"num_clients": 100, "clients_per_round": 10, "rounds": 20},
            "train": {"local_steps": 4, "batch_size": 16, "lr": 5.0e-4, "optimizer": "adamw"},
            "lora": {"rank": 8, "alpha": 16, "target_modules": ["query", "value"], "train_head": True},
            "aggregator": {"name": "fedit"},
            "resources": {"num_workers": 2, "cpus_per_worker": 1, "gpus_per_worker": 0, "cohort_size": 8},
            "eval": {"every": 1000},
            "output": {"checkpoint_every": 0},
        },
    },
}


# causal-tiny: random llama-tiny (byte vocabulary) on synthetic one-digit arithmetic (8,000 prompt/response
# pairs split IID over 100 clients), 10 clients per round, 4 local AdamW steps of batch 16, LoRA r=8 on
# q_proj/v_proj with the embeddings and LM head trained, FedIT, 20 rounds on 2 single-CPU workers.
WORKLOADS["causal-tiny"] = {
    "device": "cpu", "ks": [1, 2, 4, 8, 16], "engine_clients": 16, "min_time_s": 1.0, "e2e_rounds": 20,
    "config": {
        "name": "bench-causal-tiny", "seed": 0, "task": {"type": "causal_lm"},
        "model": {"name": "random:llama-tiny", "max_length": 16, "dtype": "float32"},
        "data": {"source": "synthetic:arith", "test_fraction": 0.2, "local_test_fraction": 0.0,
                 "arith": {"num_examples": 8000}, "partition": {"scheme": "iid", "min_samples": 4}},
        "federation": {"num_clients": 100, "clients_per_round": 10, "rounds": 20},
        "train": {"local_steps": 4, "batch_size": 16, "lr": 3.0e-3, "optimizer": "adamw"},
        "lora": {"rank": 8, "alpha": 16},
        "aggregator": {"name": "fedit"},
        "resources": {"num_workers": 2, "cpus_per_worker": 1, "gpus_per_worker": 0, "cohort_size": 8},
        "eval": {"every": 1000, "max_examples": 200, "max_new_tokens": 2},
        "output": {"checkpoint_every": 0},
    },
}


def _gpu_workload(arch: str, rounds: int) -> dict[str, Any]:
    """GPU workloads: MiniLM-L6 / BERT-base shapes, random weights, batch 16 × 128 tokens, LoRA r=8 on
    q/v, bf16; 256 synthetic clients × 64 examples, 128 per round, 4 local steps, 2 workers à 0.5 GPU."""
    cfg = copy.deepcopy(WORKLOADS["tiny"]["config"])
    cfg.update(name=f"bench-{arch}", model={"name": f"random:{arch}", "max_length": 128, "dtype": "bfloat16"})
    cfg["data"]["synthetic"] = {"num_examples": 20480, "seq_len": 128, "vocab_size": 30522, "num_labels": 4}
    cfg["federation"] = {"num_clients": 256, "clients_per_round": 128, "rounds": rounds}
    cfg["resources"].update(gpus_per_worker=0.5, cohort_size=64)
    return {"device": "cuda", "ks": [1, 8, 16, 32, 64], "engine_clients": 64, "min_time_s": 3.0,
            "e2e_rounds": rounds, "config": cfg}


# llama-1b (GPU): random Llama-3.2-1B shapes in bf16, plain language modelling on the embedded BBC News
# texts cut to 256 byte tokens, batch 4, LoRA r=16 on q/k/v/o only (the tied 128k-token embedding is not
# trained: per-client copies would cost gigabytes), 64 clients, 32 per round, 4 local steps.
WORKLOADS["llama-1b"] = {
    "device": "cuda", "ks": [1, 4, 8, 16], "engine_clients": 16, "min_time_s": 3.0, "e2e_rounds": 4,
    "config": {
        "name": "bench-llama-1b", "seed": 0, "task": {"type": "causal_lm"},
        "model": {"name": "random:llama-1b", "max_length": 256, "dtype": "bfloat16"},
        "data": {"source": "embedded:bbc-news", "test_fraction": 0.05, "local_test_fraction": 0.0,
                 "partition": {"scheme": "iid", "min_samples": 4}},
        "federation": {"num_clients": 64, "clients_per_round": 32, "rounds": 4},
        "train": {"local_steps": 4, "batch_size": 4, "lr": 2.0e-4, "optimizer": "adamw"},
        "lora": {"rank": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                 "modules_to_save": []},
        "aggregator": {"name": "fedit"},
        "resources": {"num_workers": 2, "cpus_per_worker": 1, "gpus_per_worker": 0.5, "cohort_size": 16},
        "eval": {"every": 1000, "max_examples": 32, "max_new_tokens": 8},
        "output": {"checkpoint_every": 0},
    },
}

WORKLOADS["minilm"] = _gpu_workload("minilm", 10)
WORKLOADS["bert-base"] = _gpu_workload("bert-base", 6)


def scale_config() -> dict[str, Any]:
    """The tiny workload stretched to 10,000 clients of ~8 examples, 100 per round, one local step."""
    cfg = copy.deepcopy(WORKLOADS["tiny"]["config"])
    cfg["name"] = "bench-scale-10k"
    cfg["data"].update(test_fraction=0.02)
    cfg["data"]["synthetic"]["num_examples"] = 82000
    cfg["federation"] = {"num_clients": 10000, "clients_per_round": 100, "rounds": 5}
    cfg["train"].update(local_steps=1, batch_size=8)
    cfg["resources"]["cohort_size"] = 25
    return cfg


def scale_1m_config(aggregator: str = "fedit") -> dict[str, Any]:
    """1,000,000 registered clients of the per-client synthetic source (about 8 examples of 16 tokens each,
    generated by the worker that trains them), 1,000 per round, one local step of batch 4, 20 rounds;
    checkpoints every 5 rounds, global and personalised evaluation every 5 rounds."""
    cfg = copy.deepcopy(WORKLOADS["tiny"]["config"])
    cfg["name"] = f"bench-scale-1m-{aggregator}"
    cfg["model"]["max_length"] = 16
    cfg["data"] = {"source": "synthetic:text-cls", "local_test_fraction": 0.2, "test_clients": 100,
                   "synthetic": {"examples_per_client": 8, "size_sigma": 0.5, "seq_len": 16, "vocab_size": 1000,
                                 "num_labels": 4},
                   "partition": {"scheme": "dirichlet", "alpha": 0.5, "min_samples": 4}}
    cfg["federation"] = {"num_clients": 1_000_000, "clients_per_round": 1000, "rounds": 20}
    cfg["train"].update(local_steps=1, batch_size=4)
    cfg["aggregator"] = {"name": aggregator}
    cfg["resources"]["cohort_size"] = 100
    cfg["eval"] = {"every": 5}
    cfg["output"] = {"checkpoint_every": 5}
    return cfg
