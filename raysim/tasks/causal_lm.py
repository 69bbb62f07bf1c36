"""Causal language modelling: a decoder trained on prompt/response pairs (loss on the response tokens) or
on plain text; evaluated by loss, perplexity and exact match of greedy generations."""

from __future__ import annotations

import re

import numpy as np

from raysim.tasks.base import Task, add_examples

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def matches(generated: str, reference: str, mode: str) -> bool:
    """`exact`: equal after stripping whitespace; `number`: the last number of each is equal."""
    if mode == "number":
        got, want = _NUMBER.findall(generated), _NUMBER.findall(reference)
        return bool(got and want) and float(got[-1]) == float(want[-1])
    return generated.strip() == reference.strip()


class CausalLMTask(Task):
    name = "causal_lm"
    peft_task_type = "CAUSAL_LM"
    metrics = ("loss", "perplexity", "exact_match")
    default_metrics = ()

    def __init__(self, cfg):
        super().__init__(cfg)
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from raysim.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.cfg.model.name)
        return self._tokenizer

    def arrays(self, raw) -> dict[str, np.ndarray]:
        from raysim.data.causal import tokenize_causal
        from raysim.models import token_cache_dir

        arrays = tokenize_causal(raw, self.tokenizer, self.cfg.model.max_length, self.cfg.data.chat_template,
                                 cache_dir=token_cache_dir() if self.disk_cache else None)
        self.truncated = int(arrays.pop("num_truncated"))            # reported in the summary
        self.prompt_too_long = int(arrays.pop("num_prompt_too_long"))
        arrays["example_labels"] = np.asarray(raw.labels, dtype=np.int64)     # group codes, for client hooks
        return self.with_groups(arrays, raw)

    def batch(self, data, idx: np.ndarray):
        return data.batch(idx, ("input_ids", "attention_mask", "labels"))

    def generation_subset(self, idx: np.ndarray, seed: int) -> np.ndarray:
        from raysim.seeds import EVAL_SUBSET

        limit = self.cfg.eval.max_examples
        if limit is None or limit >= len(idx):
            return np.asarray(idx)
        pick = np.random.default_rng([seed, EVAL_SUBSET]).choice(len(idx), size=limit, replace=False)
        return np.sort(np.asarray(idx)[pick])

    def evaluate(self, model, data, idx: np.ndarray, batch_size: int, autocast, gen_idx=None):
        from raysim.engines.base import EvalResult

        total = EvalResult.zero()
        for start in range(0, len(idx), batch_size):
            rows = idx[start:start + batch_size]
            total = add_examples(total, self._nll(model, self.batch(data, rows), autocast), data.groups(rows))
        if gen_idx is not None:
            for start in range(0, len(gen_idx), batch_size):
                rows = gen_idx[start:start + batch_size]
                total = add_examples(total, self._exact(model, data, rows, autocast), data.groups(rows))
        return total

    @staticmethod
    def _nll(model, batch, autocast) -> dict[str, np.ndarray]:
        """Per example: summed next-token cross-entropy over the response tokens, and their count."""
        import torch

        with autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels,
                                                ignore_index=-100, reduction="none")        # (B, L-1)
        return {"nll_sum": nll.double().sum(dim=1).cpu().numpy(),
                "tokens": (labels != -100).sum(dim=1).cpu().numpy(), "count": np.ones(len(labels))}

    def _exact(self, model, data, idx: np.ndarray, autocast) -> dict[str, np.ndarray]:
        """Greedy generation from the left-padded prompts: per example, whether it matches its reference."""
        prompts, mask = data.prompts(idx)
        tok = self.tokenizer
        with autocast():
            out = model.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=self.cfg.eval.max_new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        new = out[:, prompts.shape[1]:].tolist()
        hits = [matches(self._decode(ids), ref, self.cfg.eval.match) for ids, ref in zip(new, data.responses(idx))]
        return {"exact": np.asarray(hits, dtype=np.float64), "generated": np.ones(len(hits))}

    def _decode(self, ids: list[int]) -> str:
        eos = self.tokenizer.eos_token_id
        if eos is not None and eos in ids:
            ids = ids[:ids.index(eos)]
        return self.tokenizer.decode(ids, skip_special_tokens=True)
