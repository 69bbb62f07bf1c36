"""Base models per task type: random decoders, name checks, default LoRA targets and modules_to_save."""

from __future__ import annotations

import json

import pytest
import torch

from raysim.models import (DEFAULT_SAVED, DEFAULT_TARGETS, RANDOM_DECODERS, architecture, build_base_model,
                           check_model_name, hidden_size, load_tokenizer, modules_to_save, random_decoder_config,
                           target_modules, vocab_size)
from raysim.schema import ExperimentConfig

TINY = ["random:llama-tiny", "random:gpt2-tiny"]


def _cfg(name: str, task: str = "causal_lm", **lora) -> ExperimentConfig:
    return ExperimentConfig(task={"type": task}, model={"name": name}, lora=lora)


def _write_config(tmp_path, **conf):
    (tmp_path / "config.json").write_text(json.dumps(conf))
    return str(tmp_path)


@pytest.mark.parametrize("name", TINY)
def test_tiny_decoders_are_seeded_untied_causal_models(name):
    model = build_base_model(name, 0, seed=3, task="causal_lm")
    same = build_base_model(name, 0, seed=3, task="causal_lm")
    other = build_base_model(name, 0, seed=4, task="causal_lm")
    assert type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    for (k, p), q in zip(model.state_dict().items(), same.state_dict().values()):
        assert torch.equal(p, q), k
    assert not torch.equal(model.get_input_embeddings().weight, other.get_input_embeddings().weight)
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight   # trainable apart
    assert vocab_size(name) == model.config.vocab_size == 259
    logits = model(input_ids=torch.tensor([[1, 40, 41, 2]])).logits
    assert logits.shape == (1, 4, 259)
    assert 1e4 < sum(p.numel() for p in model.parameters()) < 1e6        # a few hundred thousand


@pytest.mark.parametrize("name,params", [("random:llama-1b", 1_235_814_400), ("random:qwen-0.5b", 494_032_768)])
def test_benchmark_decoders_have_the_published_shapes(name, params):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):                                   # shapes only, no memory
        model = AutoModelForCausalLM.from_config(random_decoder_config(name))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert sum(p.numel() for p in model.parameters()) == params    # the published model sizes
    v = model.get_submodule("model.layers.0.self_attn.v_proj")
    assert v.out_features * model.config.num_attention_heads == v.in_features * model.config.num_key_value_heads


@pytest.mark.parametrize("name,arch", [("random:llama-tiny", "llama"), ("random:gpt2-tiny", "gpt2"),
                                       ("random:llama-1b", "llama"), ("random:qwen-0.5b", "qwen2"),
                                       ("random:bert-tiny", "bert"), ("embedded:minilm-l6", "bert")])
def test_architecture_of_model_names(name, arch):
    assert architecture(name) == arch


def test_architecture_of_a_local_directory(tmp_path):
    assert architecture(_write_config(tmp_path, model_type="mistral")) == "mistral"


@pytest.mark.parametrize("name", TINY)
def test_default_targets_and_saved_modules_exist_in_the_model(name):
    model = build_base_model(name, 0, seed=0, task="causal_lm")
    leaves = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    arch = architecture(name)
    assert set(target_modules(_cfg(name))) == set(DEFAULT_TARGETS[arch]) <= leaves
    assert set(modules_to_save(_cfg(name))) == set(DEFAULT_SAVED[arch]) <= leaves
    names = dict(model.named_modules())
    embed = next(n for n, m in names.items() if m is model.get_input_embeddings())
    head = next(n for n, m in names.items() if m is model.get_output_embeddings())
    assert {embed.rsplit(".", 1)[-1], head} == set(DEFAULT_SAVED[arch])


def test_default_targets_per_family():
    assert target_modules(_cfg("random:llama-tiny")) == ["q_proj", "v_proj"]
    assert target_modules(_cfg("random:qwen-0.5b")) == ["q_proj", "v_proj"]
    assert target_modules(_cfg("random:gpt2-tiny")) == ["c_attn"]
    assert target_modules(_cfg("random:bert-tiny", "seq_cls")) == ["query", "value"]
    assert target_modules(_cfg("random:gpt2-tiny", target_modules=["c_proj"])) == ["c_proj"]


def test_modules_to_save_defaults_per_task():
    assert modules_to_save(_cfg("random:bert-tiny", "seq_cls")) is None      # PEFT adds the classifier
    assert modules_to_save(_cfg("random:llama-tiny")) == ["embed_tokens", "lm_head"]
    assert modules_to_save(_cfg("random:gpt2-tiny")) == ["wte", "lm_head"]
    assert modules_to_save(_cfg("random:llama-tiny", modules_to_save=["lm_head"])) == ["lm_head"]
    assert modules_to_save(_cfg("random:llama-tiny", modules_to_save=[])) == []
    assert modules_to_save(_cfg("random:llama-tiny", train_head=False)) == []


def test_modules_to_save_without_a_default_names_the_key(tmp_path):
    cfg = _cfg(_write_config(tmp_path, model_type="falcon", architectures=["FalconForCausalLM"]))
    with pytest.raises(ValueError, match="lora.modules_to_save"):
        modules_to_save(cfg)


@pytest.mark.parametrize("name", list(f"random:{a}" for a in RANDOM_DECODERS))
def test_random_decoders_use_the_byte_tokenizer_with_their_special_ids(name):
    tok, conf = load_tokenizer(name), random_decoder_config(name)
    assert type(tok).__name__ == "ByteTokenizer"
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (conf.pad_token_id, conf.bos_token_id,
                                                                      conf.eos_token_id)
    assert max(tok("héllo ~", add_special_tokens=False)["input_ids"]) < conf.vocab_size
    assert type(load_tokenizer("random:bert-tiny")).__name__ == "HashingTokenizer"


def test_hidden_size_of_random_models():
    assert hidden_size("random:gpt2-tiny") == 64
    assert hidden_size("random:qwen-0.5b") == 896
    assert hidden_size("random:bert-tiny") == 128
    assert hidden_size("embedded:minilm-l6") is None


# ----------------------------------------------------------------------------------------- name checks


def test_old_call_signatures_still_mean_classification():
    check_model_name("random:bert-tiny", 64)
    model = build_base_model("random:bert-mini", 3, 0)
    assert type(model).__name__ == "BertForSequenceClassification"


@pytest.mark.parametrize("name", TINY + ["random:llama-1b", "random:qwen-0.5b"])
def test_random_decoders_pass_for_causal_and_fail_for_classification(name):
    check_model_name(name, 128, task="causal_lm")
    with pytest.raises(ValueError, match="task.type seq_cls needs an encoder"):
        check_model_name(name, 128)


@pytest.mark.parametrize("name", ["random:bert-tiny", "embedded:minilm-l6"])
def test_encoders_fail_for_causal(name):
    with pytest.raises(ValueError, match=r"classification/encoder model.*causal_lm needs a decoder"):
        check_model_name(name, 64, task="causal_lm")


@pytest.mark.parametrize("conf", [dict(model_type="bert", architectures=["BertModel"]),
                                  dict(model_type="roberta"),
                                  dict(model_type="llama", architectures=["LlamaForSequenceClassification"])])
def test_classification_directories_fail_for_causal(tmp_path, conf):
    path = _write_config(tmp_path, **conf)
    check_model_name(path, 64)                                   # fine for classification
    with pytest.raises(ValueError, match=r"model.name: .* is a classification/encoder model"):
        check_model_name(path, 64, task="causal_lm")


def test_decoder_directory_passes_and_its_positions_bound_max_length(tmp_path):
    path = _write_config(tmp_path, model_type="gpt2", architectures=["GPT2LMHeadModel"], n_positions=128)
    check_model_name(path, 128, task="causal_lm")
    with pytest.raises(ValueError, match="model.max_length: 256 exceeds .* 128 positions"):
        check_model_name(path, 256, task="causal_lm")


def test_max_length_beyond_a_random_decoder_positions():
    with pytest.raises(ValueError, match="model.max_length: 512 exceeds random:gpt2-tiny's 256 positions"):
        check_model_name("random:gpt2-tiny", 512, task="causal_lm")


def test_unknown_names_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown random architecture"):
        check_model_name("random:llama-huge", 64, task="causal_lm")
    with pytest.raises(ValueError, match="local Hugging Face model directory"):
        check_model_name(str(tmp_path / "missing"), 64, task="causal_lm")
    with pytest.raises(ValueError, match="task.type: unknown task"):
        check_model_name("random:llama-tiny", 64, task="token_cls")


def test_causal_model_from_a_local_directory(tmp_path):
    saved = build_base_model("random:llama-tiny", 0, seed=5, task="causal_lm")
    saved.save_pretrained(tmp_path)
    check_model_name(str(tmp_path), 128, task="causal_lm")
    loaded = build_base_model(str(tmp_path), 0, seed=9, task="causal_lm")
    assert architecture(str(tmp_path)) == "llama"
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    ids = torch.tensor([[1, 70, 80, 90]])
    torch.testing.assert_close(loaded(input_ids=ids).logits, saved(input_ids=ids).logits, rtol=0, atol=0)


def test_random_decoder_table_covers_the_families_with_defaults():
    for spec in RANDOM_DECODERS.values():
        assert spec["model_type"] in DEFAULT_TARGETS and spec["model_type"] in DEFAULT_SAVED


# ----------------------------------------------------------------------------------------- image models


@pytest.mark.parametrize("name", ["random:vit-tiny", "random:mixer-tiny"])
def test_random_image_models_pass_for_images_and_fail_for_text(name):
    check_model_name(name, 128, task="image_cls")
    for task, need in (("seq_cls", "needs an encoder"), ("causal_lm", "needs a decoder")):
        with pytest.raises(ValueError, match=f"is an image classifier; task.type {task} {need}"):
            check_model_name(name, 128, task=task)


@pytest.mark.parametrize("name", ["random:bert-tiny", "random:llama-tiny", "embedded:minilm-l6"])
def test_text_models_fail_for_images(name):
    with pytest.raises(ValueError, match="task.type image_cls needs an image classifier"):
        check_model_name(name, 64, task="image_cls")


def test_image_directories_are_told_apart_from_text_ones(tmp_path):
    vit = _write_config(tmp_path, model_type="vit", architectures=["ViTForImageClassification"], image_size=32,
                        num_channels=3)
    check_model_name(vit, 128, task="image_cls")
    with pytest.raises(ValueError, match="is an image classifier .*task.type seq_cls"):
        check_model_name(vit, 128)


def test_image_spec_and_architecture_of_image_models(tmp_path):
    from raysim.models import image_spec

    assert image_spec("random:vit-tiny") == {"image_size": 8, "num_channels": 1, "mean": None, "std": None}
    assert (architecture("random:vit-tiny"), architecture("random:mixer-tiny")) == ("vit", "mixer")
    assert hidden_size("random:vit-tiny") == 64 and vocab_size("random:mixer-tiny") is None
    path = _write_config(tmp_path, model_type="vit", image_size=[32, 32], num_channels=3)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.2] * 3}))
    assert image_spec(path) == {"image_size": 32, "num_channels": 3, "mean": [0.5] * 3, "std": [0.2] * 3}


def test_vit_default_targets_exist_in_the_installed_transformers():
    model = build_base_model("random:vit-tiny", 10, 0, task="image_cls")
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(DEFAULT_TARGETS["vit"]) <= names and "classifier" in names
    mixer = build_base_model("random:mixer-tiny", 10, 0, task="image_cls")
    adapted = [n for n, m in mixer.named_modules() if n.endswith(tuple(DEFAULT_TARGETS["mixer"]))]
    assert len(adapted) == 8                   # 2 blocks × (token MLP, channel MLP) × (fc1, fc2)


def test_local_vit_directory_builds_with_a_new_head(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    ViTForImageClassification(ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                        num_labels=3)).save_pretrained(tmp_path)
    check_model_name(str(tmp_path), 128, task="image_cls")
    model = build_base_model(str(tmp_path), 5, 0, task="image_cls")
    assert model.classifier.out_features == 5
    assert model(pixel_values=torch.randn(2, 1, 8, 8)).logits.shape == (2, 5)
