"""fold_into_base orientation (docs/algorithms.md, "Changing the frozen base"), in-place factor and head I/O on a
PEFT model, for the BERT classifiers and the decoders (Llama's nn.Linear, GPT-2's Conv1D, tied embeddings)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers.pytorch_utils import Conv1D

from raysim.lora.factors import LoRAFactors
from raysim.lora.peft_io import (PREFIX, fold_into_base, get_factors, get_head, head_parameters, lora_layers,
                                module_shape, set_factors, set_head, wrap_lora)
from raysim.models import build_base_model


def _forward_matches(module, w0, r, x):
    expected = x @ (w0 + r).T
    if getattr(module, "bias", None) is not None:
        expected = expected + module.bias
    torch.testing.assert_close(module(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("m,n", [(6, 6), (7, 5)])
def test_fold_into_linear_uses_the_linear_orientation(m, n):
    torch.manual_seed(0)
    lin = torch.nn.Linear(n, m).double()
    w0 = lin.weight.detach().clone()
    r = torch.randn(m, n, dtype=torch.float64)
    assert not torch.allclose(r, r.T) if m == n else True     # non-symmetric: a transpose would show
    fold_into_base(lin, r)
    _forward_matches(lin, w0, r, torch.randn(3, n, dtype=torch.float64))


def test_fold_into_conv1d_transposes():
    torch.manual_seed(1)
    conv = Conv1D(nf=7, nx=5).double()                         # weight stored (in=5, out=7)
    w0 = conv.weight.detach().clone().T                        # (7, 5) in Linear orientation
    r = torch.randn(7, 5, dtype=torch.float64)
    fold_into_base(conv, r)
    x = torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(conv(x), x @ (w0 + r).T + conv.bias, rtol=1e-10, atol=1e-10)


def test_fold_rejects_a_wrong_shape():
    with pytest.raises(ValueError, match="does not match"):
        fold_into_base(torch.nn.Linear(5, 7), torch.zeros(5, 7))


def test_set_and_get_factors_round_trip_with_a_smaller_client_rank():
    model = wrap_lora(build_base_model("random:bert-mini", 3, seed=0), rank=4, alpha=8,
                      target_modules=["query", "value"], dropout=0.0, seed=0)
    rng = np.random.default_rng(0)
    start = {name: LoRAFactors(a=rng.normal(size=(2, 64)).astype(np.float32),
                               b=rng.normal(size=(64, 2)).astype(np.float32), scale=3.0)
             for name in lora_layers(model)}
    set_factors(model, start)
    got = get_factors(model, {k: 2 for k in start})
    for name, f in start.items():
        np.testing.assert_array_equal(got[name].a, f.a)
        np.testing.assert_array_equal(got[name].b, f.b)
        assert got[name].scale == 3.0
        layer = lora_layers(model)[name]
        assert not layer.lora_A["default"].weight[2:].any()      # surplus slots zeroed
        assert not layer.lora_B["default"].weight[:, 2:].any()


# ------------------------------------------------------------------------------------ decoders (causal LM)

DECODERS = {"random:llama-tiny": ["q_proj", "v_proj"], "random:gpt2-tiny": ["c_attn"]}
SAVED = {"random:llama-tiny": ["embed_tokens", "lm_head"], "random:gpt2-tiny": ["wte", "lm_head"]}


def _causal(name, seed=0, saved=None, rank=4):
    base = build_base_model(name, 0, seed=seed, task="causal_lm")
    return wrap_lora(base, rank, 8, DECODERS[name], 0.0, seed, task_type="CAUSAL_LM", modules_to_save=saved)


def _random_factors(model, rank, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for name, layer in lora_layers(model).items():
        m, n = module_shape(layer)
        out[name] = LoRAFactors(a=rng.normal(size=(rank, n)).astype(np.float32),
                                b=rng.normal(scale=0.1, size=(m, rank)).astype(np.float32), scale=2.0)
    return out


def _randomize_head(model, seed=0):
    rng = np.random.default_rng(seed)
    head = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in get_head(model).items()}
    set_head(model, head)
    return head


@pytest.mark.parametrize("name", DECODERS)
def test_module_shape_is_the_linear_orientation(name):
    model = _causal(name)
    for layer in lora_layers(model).values():
        base = layer.get_base_layer()
        expected = (base.nf, base.nx) if isinstance(base, Conv1D) else (base.out_features, base.in_features)
        assert module_shape(layer) == expected
    shapes = {module_shape(layer) for layer in lora_layers(model).values()}
    assert shapes == ({(192, 64)} if name.endswith("gpt2-tiny") else {(64, 64), (32, 64)})   # GQA: v is 32×64


def test_gpt2_conv1d_targets_get_fan_in_fan_out_without_a_warning():
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = _causal("random:gpt2-tiny")
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]
    assert all(layer.fan_in_fan_out for layer in lora_layers(model).values())
    assert not any(layer.fan_in_fan_out for layer in lora_layers(_causal("random:llama-tiny")).values())


@pytest.mark.parametrize("name", DECODERS)
def test_fold_into_base_equals_peft_merge(name):
    model = _causal(name)
    factors = _random_factors(model, 3)
    set_factors(model, factors)
    merged = model.merge_and_unload()
    folded = build_base_model(name, 0, seed=0, task="causal_lm")
    for module, f in factors.items():
        fold_into_base(folded.get_submodule(module), f.scale * (f.b.astype(np.float64) @ f.a.astype(np.float64)))
    original = build_base_model(name, 0, seed=0, task="causal_lm").state_dict()
    changed = 0
    for key, w in merged.state_dict().items():
        torch.testing.assert_close(folded.state_dict()[key], w, rtol=1e-6, atol=1e-6)
        changed += not torch.equal(w, original[key])
    assert changed == len(factors)                         # exactly the adapted weights moved


@pytest.mark.parametrize("name", DECODERS)
def test_decoder_factors_round_trip_exactly(name):
    model = _causal(name)
    start = _random_factors(model, 2, seed=1)
    set_factors(model, start)
    got = get_factors(model, {k: 2 for k in start})
    for key, f in start.items():
        np.testing.assert_array_equal(got[key].a, f.a)
        np.testing.assert_array_equal(got[key].b, f.b)


def _saved_keys(model, tmp_path):
    from safetensors.numpy import load_file

    model.save_pretrained(tmp_path)
    keys = load_file(str(tmp_path / "adapter_model.safetensors")).keys()
    return {k.removeprefix(PREFIX) for k in keys if "lora_" not in k}


@pytest.mark.parametrize("name", DECODERS)
def test_head_names_match_what_peft_saves(name, tmp_path):
    model = _causal(name, saved=SAVED[name])
    embed = "model.embed_tokens.weight" if "llama" in name else "transformer.wte.weight"
    assert set(head_parameters(model)) == {embed, "lm_head.weight"} == _saved_keys(model, tmp_path)


@pytest.mark.parametrize("name", DECODERS)
def test_set_head_changes_embeddings_and_lm_head(name):
    model = _causal(name, saved=SAVED[name])
    ids = torch.tensor([[1, 50, 60, 2]])
    before = model(input_ids=ids).logits
    head = _randomize_head(model)
    for key, value in get_head(model).items():
        np.testing.assert_array_equal(value, head[key])
    embed_key = next(k for k in head if "lm_head" not in k)
    torch.testing.assert_close(model.get_input_embeddings()(ids)[0], torch.from_numpy(head[embed_key])[ids[0]])
    assert not torch.allclose(model(input_ids=ids).logits, before)


@pytest.mark.parametrize("name", DECODERS)
def test_exported_causal_adapter_reloads_with_identical_logits(name, tmp_path):
    from peft import PeftModel

    model = _causal(name, seed=2, saved=SAVED[name])
    set_factors(model, _random_factors(model, 4, seed=3))
    _randomize_head(model, seed=4)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    reloaded = PeftModel.from_pretrained(build_base_model(name, 0, seed=2, task="causal_lm"), tmp_path)
    ids = torch.tensor([[1, 33, 44, 55, 66, 2]])
    model.eval()
    torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


# ----------------------------------------------------------------------------------- tied embeddings


def _tied(family):
    from transformers import AutoModelForCausalLM

    from raysim.models import random_decoder_config

    conf = random_decoder_config(f"random:{family}-tiny")
    conf.tie_word_embeddings = True
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(conf)


@pytest.mark.parametrize("family,saved", [("llama", ["embed_tokens", "lm_head"]), ("llama", ["lm_head"]),
                                          ("gpt2", ["wte"]), ("gpt2", ["wte", "lm_head"])])
def test_tied_embeddings_train_one_shared_copy(family, saved, tmp_path):
    import warnings

    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = wrap_lora(_tied(family), 4, 8, DECODERS[f"random:{family}-tiny"], 0.0, 0,
                          task_type="causal_lm", modules_to_save=saved)
    assert not [w for w in caught if "tie_word_embeddings" in str(w.message) or "weight_tying" in str(w.message)]
    head = _randomize_head(model)
    (matrix,) = head.values()
    (embed_name,) = head_parameters(model)                             # exchanged once, as the embedding
    assert _saved_keys(model, tmp_path) == {embed_name, "lm_head.weight"}   # PEFT writes it under both names
    embed = model.get_input_embeddings()(torch.arange(5))
    np.testing.assert_array_equal(embed.detach().numpy(), matrix[:5])
    np.testing.assert_array_equal(model.get_output_embeddings().weight.detach().numpy(), matrix)   # still tied
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(_tied(family), tmp_path)
    ids = torch.tensor([[1, 70, 71, 2]])
    torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_untied_targets_leave_a_tied_model_tied():
    model = wrap_lora(_tied("llama"), 4, 8, ["q_proj"], 0.0, 0, task_type="CAUSAL_LM")
    assert head_parameters(model) == {}
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
