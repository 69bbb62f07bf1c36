"""Turn RawData into fixed-length token id matrices.

- Text data goes through a tokenizer: a Hugging Face fast tokenizer (padding to ``max_length``,
  truncation) or `HashingTokenizer` (word-level hashing, for ``random:*`` models that have no
  vocabulary). With ``cache_dir`` the result is stored as ``.npz`` keyed by the tokenizer, the
  length, the texts and the second sentences, and reused on the next call.
- Sentence pairs (``RawData.text_pairs``, from ``data.text_pair_column``) use the tokenizer's pair
  encoding: ``[CLS] a [SEP] b [SEP]`` with the longer sentence truncated first. No
  ``token_type_ids`` are produced: every token gets segment 0 (the model's default), and the
  ``[SEP]`` between the sentences is what marks the boundary. This keeps the batch layout (ids,
  mask, labels) the same for every text task and engine.
- Synthetic data is already tokenized; it is only padded or truncated to ``max_length``.

`ByteTokenizer` is the decodable byte-level tokenizer of the random decoders (``causal_lm``); the
causal tokenisation itself lives in `raysim.data.causal`.
"""

from __future__ import annotations

import hashlib
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raysim.data.sources import CLS_ID, NUM_SPECIAL_TOKENS, PAD_ID, SEP_ID, RawData

BATCH_SIZE = 1024
_WORD = re.compile(r"[^\W_]+")  # runs of letters/digits (Unicode); everything else separates


@dataclass
class TokenizedData:
    """Model inputs for N examples of length L.

    Attributes:
        input_ids: (N, L) int32 token ids, padded with 0 on the right.
        attention_mask: (N, L) int8, 1 on real tokens, 0 on padding.
        labels: (N,) int64 class ids.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


class HashingTokenizer:
    """Vocabulary-free word-level tokenizer for randomly initialised models.

    Lowercases, splits on non-alphanumerics and maps word w to ``4 + crc32(w) % (vocab_size - 4)``;
    sequences are ``[CLS]=1 ... [SEP]=2`` padded with 0. Ids 0-3 are pad, cls, sep, unk.
    """

    def __init__(self, vocab_size: int):
        if vocab_size <= NUM_SPECIAL_TOKENS:
            raise ValueError(f"HashingTokenizer needs vocab_size > {NUM_SPECIAL_TOKENS} (got {vocab_size})")
        self.vocab_size = vocab_size
        self.name_or_path = f"hashing-tokenizer-{vocab_size}"

    def __len__(self) -> int:
        return self.vocab_size

    def word_id(self, word: str) -> int:
        """Token id of one lowercase word."""
        return NUM_SPECIAL_TOKENS + zlib.crc32(word.encode("utf-8")) % (self.vocab_size - NUM_SPECIAL_TOKENS)

    def __call__(self, texts: list[str], max_length: int,
                 pairs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Encode ``texts`` (with ``pairs``: the sentence pairs ``[CLS] a [SEP] b [SEP]``, the longer
        sentence truncated first) to ``{"input_ids": (N, max_length) int32, "attention_mask": (N,
        max_length) int8}``."""
        specials = 2 if pairs is None else 3
        if max_length < specials:
            raise ValueError(f"max_length must be >= {specials} (got {max_length})")
        ids = np.full((len(texts), max_length), PAD_ID, dtype=np.int32)
        mask = np.zeros((len(texts), max_length), dtype=np.int8)
        for row, text in enumerate(texts):
            first = [self.word_id(w) for w in _WORD.findall(text.lower())]
            if pairs is None:
                tokens = [CLS_ID, *first[: max_length - 2], SEP_ID]
            else:
                second = [self.word_id(w) for w in _WORD.findall(pairs[row].lower())]
                keep_a, keep_b = pair_lengths(len(first), len(second), max_length - 3)
                tokens = [CLS_ID, *first[:keep_a], SEP_ID, *second[:keep_b], SEP_ID]
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def pair_lengths(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
    """How many tokens of each sentence fit ``budget`` when the longer one is truncated first (as
    Hugging Face's ``longest_first``): the shorter keeps all of its tokens up to half the budget."""
    if len_a + len_b <= budget:
        return len_a, len_b
    keep_b = min(len_b, max(budget - len_a, budget // 2))
    return budget - keep_b, keep_b


class ByteTokenizer:
    """Byte-level tokenizer for randomly initialised decoders: every text is decodable.

    Ids: pad 0, bos 1, eos 2, byte b -> b + 3 (UTF-8), so ``vocab_size`` is 259. It answers the
    subset of the Hugging Face tokenizer interface that raysim uses: ``tok(text or texts,
    add_special_tokens=False)["input_ids"]``, ``decode``/``batch_decode`` and the special-token ids.
    """

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    chat_template = None
    name_or_path = "byte-tokenizer"
    OFFSET = 3
    vocab_size = 256 + OFFSET

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (one per UTF-8 byte), without special tokens."""
        return [b + self.OFFSET for b in text.encode("utf-8")]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens (and ids outside the vocabulary) are always skipped."""
        data = bytes(int(i) - self.OFFSET for i in ids if self.OFFSET <= int(i) < self.vocab_size)
        return data.decode("utf-8", errors="replace")

    def batch_decode(self, rows, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(row) for row in rows]

    def __call__(self, text: str | list[str], add_special_tokens: bool = True) -> dict[str, list]:
        """``{"input_ids": ids}`` for one text, or a list of id lists for a list of texts."""
        prefix = [self.bos_token_id] if add_special_tokens else []
        if isinstance(text, str):
            return {"input_ids": prefix + self.encode(text)}
        return {"input_ids": [prefix + self.encode(t) for t in text]}


def tokenize(raw: RawData, tokenizer, max_length: int, cache_dir: Path | None = None) -> TokenizedData:
    """Tokenize ``raw`` to (N, max_length) arrays.

    Args:
        raw: text data (``raw.texts``, with ``raw.text_pairs`` for sentence pairs) or synthetic data
            (``raw.input_ids``).
        tokenizer: a Hugging Face tokenizer or a `HashingTokenizer`; ignored for synthetic data.
        max_length: tokens per example (truncation and padding).
        cache_dir: if given, text results are cached there as ``tok-<sha256>.npz``.

    Returns:
        TokenizedData with ``input_ids`` (N, max_length) int32, ``attention_mask`` int8 and
        ``labels`` (N,) int64.
    """
    labels = np.asarray(raw.labels, dtype=np.int64)
    if raw.input_ids is not None:
        ids, mask = _pad_or_truncate(np.asarray(raw.input_ids), max_length)
        return TokenizedData(input_ids=ids, attention_mask=mask, labels=labels)
    if raw.texts is None:
        raise ValueError("RawData has neither texts nor input_ids")

    cache_file = None
    if cache_dir is not None:
        key = cache_key(tokenizer, max_length, raw.texts, raw.text_pairs)
        cache_file = Path(cache_dir) / f"tok-{key}.npz"
        cached = _read_cache(cache_file, len(raw.texts), max_length)
        if cached is not None:
            return TokenizedData(input_ids=cached[0], attention_mask=cached[1], labels=labels)

    ids, mask = _encode_texts(raw.texts, tokenizer, max_length, raw.text_pairs)
    if cache_file is not None:
        _write_cache(cache_file, ids, mask)
    return TokenizedData(input_ids=ids, attention_mask=mask, labels=labels)


def cache_key(tokenizer, max_length: int, texts: list[str], pairs: list[str] | None = None) -> str:
    """sha256 hex of (tokenizer name_or_path, vocabulary size, max_length, all texts, all second
    sentences of pairs when there are any)."""
    name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
    vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else getattr(tokenizer, "vocab_size", 0)
    h = hashlib.sha256()
    h.update(f"{type(tokenizer).__name__}\0{name}\0{vocab}\0{max_length}\0{len(texts)}\0".encode())
    _hash_strings(h, texts)
    if pairs is not None:
        h.update(f"pairs\0{len(pairs)}\0".encode())
        _hash_strings(h, pairs)
    return h.hexdigest()


def _hash_strings(h, strings: list[str]) -> None:
    for text in strings:
        data = text.encode("utf-8", errors="surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)


# ----------------------------------------------------------------------------- helpers


def _encode_texts(texts: list[str], tokenizer, max_length: int,
                  pairs: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Run the tokenizer in batches (with ``pairs``: its pair encoding, ``longest_first``
    truncation): ((N, max_length) int32 ids, (N, max_length) int8 mask)."""
    if isinstance(tokenizer, HashingTokenizer):
        out = tokenizer(texts, max_length, pairs)
        return out["input_ids"], out["attention_mask"]
    ids = np.zeros((len(texts), max_length), dtype=np.int32)
    mask = np.zeros((len(texts), max_length), dtype=np.int8)
    for start in range(0, len(texts), BATCH_SIZE):
        batch = texts[start:start + BATCH_SIZE]
        second = None if pairs is None else pairs[start:start + BATCH_SIZE]
        enc = tokenizer(batch, second, padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="np", return_attention_mask=True, return_token_type_ids=False)
        ids[start:start + len(batch)] = enc["input_ids"]
        mask[start:start + len(batch)] = enc["attention_mask"]
    return ids, mask


def _pad_or_truncate(input_ids: np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, L) unpadded ids -> (N, max_length) int32 ids and int8 mask (pad 0 on the right)."""
    n, length = input_ids.shape
    keep = min(length, max_length)
    ids = np.full((n, max_length), PAD_ID, dtype=np.int32)
    ids[:, :keep] = input_ids[:, :keep]
    mask = np.zeros((n, max_length), dtype=np.int8)
    mask[:, :keep] = 1
    return ids, mask


def _read_cache(path: Path, n: int, max_length: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Cached (ids, mask) if ``path`` holds arrays of the expected shape, else None."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as f:
            ids, mask = f["input_ids"], f["attention_mask"]
    except (OSError, ValueError, KeyError, EOFError):
        return None
    if ids.shape != (n, max_length) or mask.shape != (n, max_length):
        return None
    return ids.astype(np.int32, copy=False), mask.astype(np.int8, copy=False)


def _write_cache(path: Path, ids: np.ndarray, mask: np.ndarray) -> None:
    """Write atomically (temporary file + rename), so concurrent readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, input_ids=ids, attention_mask=mask)
    os.replace(tmp, path)
