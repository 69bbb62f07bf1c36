"""Tokenisation of prompt/response data for decoder LLMs (``task.type: causal_lm``).

`tokenize_causal` turns RawData (``prompts``, ``responses``) into numpy arrays for the object store:

- training arrays, right-padded to ``max_length``: the sequence ``[BOS] prompt response EOS`` (BOS and
  EOS when the tokenizer has them) with ``labels`` = the token ids on the response and EOS and -100
  (ignored by the loss) on the prompt and the padding;
- generation arrays, left-padded to the longest prompt (at most ``max_length`` tokens, keeping a long
  prompt's last tokens), so greedy generation appends to every row at the same position; and the
  reference responses as text, for exact-match.

With ``data.chat_template: auto`` and a tokenizer that has a chat template, the prompt part is the
template applied to the user turn with ``add_generation_prompt=True`` and the response part is the
rest of the template applied to the user and assistant turns (the template's own markers, e.g.
BOS text and the end-of-turn token; EOS is appended only when the template did not write it).
Otherwise prompt and response are concatenated as they are. Prompt and response are tokenized
separately, so a prompt tokenizes the same in training and in generation.

Works with a Hugging Face tokenizer and with `raysim.data.tokenize.ByteTokenizer` (both are called
as ``tokenizer(texts, add_special_tokens=False)["input_ids"]``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from raysim.data.sources import RawData
from raysim.data.tokenize import cache_key
from raysim.errors import ConfigError

IGNORE_INDEX = -100
TRAIN_KEYS = ("input_ids", "attention_mask", "labels")
GENERATION_KEYS = ("prompt_ids", "prompt_mask")
COUNT_KEYS = ("num_truncated", "num_prompt_too_long")


class _Encoder:
    """Token ids of prompt/response pairs from any tokenizer with the Hugging Face call interface."""

    def __init__(self, tokenizer, chat_template: str):
        self.tokenizer = tokenizer
        self.bos = getattr(tokenizer, "bos_token_id", None)
        self.eos = getattr(tokenizer, "eos_token_id", None)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad = pad if pad is not None else (self.eos if self.eos is not None else 0)
        self.use_template = chat_template == "auto" and bool(getattr(tokenizer, "chat_template", None))

    def ids(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        rows = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [[int(t) for t in row] for row in rows]

    def pairs(self, prompts: list[str], responses: list[str]) -> tuple[list[list[int]], list[list[int]]]:
        """(prompt ids, response ids ending with the end of sequence) per example."""
        tail = [] if self.eos is None else [self.eos]
        if not self.use_template:
            head = [] if self.bos is None else [self.bos]
            return [head + p for p in self.ids(prompts)], [r + tail for r in self.ids(responses)]
        parts = [self._template(p, r) for p, r in zip(prompts, responses)]
        prompt_ids = self.ids([p for p, _ in parts])
        response_ids = [r if self.eos in r else r + tail for r in self.ids([r for _, r in parts])]
        return prompt_ids, response_ids

    def _template(self, prompt: str, response: str) -> tuple[str, str]:
        """(templated prompt text, the rest of the templated conversation)."""
        user = [{"role": "user", "content": prompt}]
        head = self.tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = self.tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}],
                                                  tokenize=False)
        if not full.startswith(head):
            raise ConfigError("data.chat_template: the tokenizer's chat template does not write the "
                              "conversation as prompt followed by response; use data.chat_template: none")
        return head, full[len(head):]


def tokenize_causal(raw: RawData, tokenizer, max_length: int, chat_template: str = "auto",
                    cache_dir: Path | None = None) -> dict[str, np.ndarray]:
    """Training and generation arrays for N prompt/response pairs.

    Args:
        raw: causal data (``raw.prompts`` and ``raw.responses``).
        tokenizer: a Hugging Face tokenizer or a `ByteTokenizer`.
        max_length: tokens per training sequence (``model.max_length``).
        chat_template: ``data.chat_template`` (``auto`` or ``none``).
        cache_dir: if given, the result is cached there as ``causal-<sha256>.npz``.

    Returns:
        ``input_ids`` (N, L) int32, ``attention_mask`` (N, L) int8 and ``labels`` (N, L) int64
        (right-padded, L = max_length); ``prompt_ids`` (N, P) int32 and ``prompt_mask`` (N, P) int8
        (left-padded, P = longest prompt, at most max_length, at least 1); ``response_text`` (N,)
        object array of str (not fixed-width, so long responses cost no padding; never cached: it is
        ``raw.responses``); ``num_truncated`` (0-d int64: examples whose response or EOS was cut) and
        ``num_prompt_too_long`` (0-d int64: examples whose prompt alone fills max_length, which
        therefore contribute no loss).

    Raises:
        ConfigError: every example's prompt alone is at least ``max_length`` tokens.
    """
    if raw.prompts is None or raw.responses is None:
        raise ValueError("tokenize_causal needs RawData with prompts and responses")
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"causal-{_cache_key(raw, tokenizer, max_length, chat_template)}.npz"
        cached = _read_cache(cache_file, len(raw))
        if cached is not None:
            cached["response_text"] = _texts(raw.responses)
            return cached

    enc = _Encoder(tokenizer, chat_template)
    prompt_ids, response_ids = enc.pairs(raw.prompts, raw.responses)
    out = training_arrays(prompt_ids, response_ids, max_length, enc.pad)
    out.update(generation_arrays(prompt_ids, max_length, enc.pad))
    if cache_file is not None:
        _write_cache(cache_file, out)
    out["response_text"] = _texts(raw.responses)
    return out


def _texts(values: list[str]) -> np.ndarray:
    """(N,) object array of str."""
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


def training_arrays(prompt_ids: list[list[int]], response_ids: list[list[int]], max_length: int,
                    pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded ``prompt + response`` sequences with the loss on the response tokens only."""
    n = len(prompt_ids)
    ids = np.full((n, max_length), pad_id, dtype=np.int32)
    mask = np.zeros((n, max_length), dtype=np.int8)
    labels = np.full((n, max_length), IGNORE_INDEX, dtype=np.int64)
    truncated = too_long = 0
    for row, (prompt, response) in enumerate(zip(prompt_ids, response_ids)):
        seq = (prompt + response)[:max_length]
        start = min(len(prompt), max_length)
        ids[row, :len(seq)] = seq
        mask[row, :len(seq)] = 1
        labels[row, start:len(seq)] = seq[start:]
        truncated += len(prompt) + len(response) > max_length
        too_long += len(prompt) >= max_length
    if n > 0 and too_long == n:
        longest = max(len(p) for p in prompt_ids)
        raise ConfigError(f"model.max_length: {max_length} tokens leave no room for a response: every "
                          f"prompt alone is at least that long (longest {longest} tokens); raise "
                          "model.max_length or shorten the prompts")
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "num_truncated": np.asarray(truncated, dtype=np.int64),
            "num_prompt_too_long": np.asarray(too_long, dtype=np.int64)}


def generation_arrays(prompt_ids: list[list[int]], max_length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Left-padded prompts (the last ``max_length`` tokens of longer ones) for batched generation."""
    width = max(1, min(max_length, max((len(p) for p in prompt_ids), default=1)))
    n = len(prompt_ids)
    ids = np.full((n, width), pad_id, dtype=np.int32)
    mask = np.zeros((n, width), dtype=np.int8)
    for row, prompt in enumerate(prompt_ids):
        kept = prompt[-width:] if prompt else []
        if kept:
            ids[row, width - len(kept):] = kept
            mask[row, width - len(kept):] = 1
    return {"prompt_ids": ids, "prompt_mask": mask}


# ----------------------------------------------------------------------------- cache


def _cache_key(raw: RawData, tokenizer, max_length: int, chat_template: str) -> str:
    """sha256 of the tokenizer, its special tokens and template, the settings, prompts and responses."""
    header = "\0".join(str(v) for v in (
        "causal", chat_template, getattr(tokenizer, "chat_template", None),
        getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None),
        getattr(tokenizer, "pad_token_id", None)))
    return cache_key(tokenizer, max_length, [header, *raw.prompts, *raw.responses])


def _read_cache(path: Path, n: int) -> dict[str, np.ndarray] | None:
    """The cached arrays if ``path`` holds every key with N rows, else None."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as f:
            out = {key: f[key] for key in (*TRAIN_KEYS, *GENERATION_KEYS, *COUNT_KEYS)}
    except (OSError, ValueError, KeyError, EOFError):
        return None
    if any(len(out[key]) != n for key in (*TRAIN_KEYS, *GENERATION_KEYS)):
        return None
    return out


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write atomically (temporary file + rename), so concurrent readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
