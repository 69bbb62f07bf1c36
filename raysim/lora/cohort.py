"""Stacked ("cohort") LoRA layers: K clients' adapters in one tensor, one frozen base for all of them.

A cohort step feeds the concatenation of K clients' batches through the frozen base once. Every
adapted layer (an `nn.Linear`, or GPT-2's `Conv1D`, whose weight is stored (in, out)) is temporarily
replaced by a `SegmentLoRALinear` that holds the K clients' factors stacked, A (K, r_max, n) and
B (K, m, r_max) in nn.Linear orientation (PEFT keeps its LoRA factors so for Conv1D too), and adds
client k's update only to client k's rows with batched matmuls:

    y[rows_k] = base(x[rows_k]) + s_k · (x[rows_k] A_kᵀ) B_kᵀ

Per-slot rank masks zero the surplus slots of clients with r_k < r_max, and s_k is a per-client,
per-module scale. Modules trained in full (PEFT's `modules_to_save`) get one copy per client: a
Linear (the classifier head, a decoder's LM head) becomes a `SegmentLinear`, an `nn.Embedding` (a
decoder's input embeddings) a `SegmentEmbedding` that looks every row up in its client's table.
When a model ties its LM head to its input embeddings, both stacked modules hold the same stacked
tensor, as the PEFT model holds one shared copy.

Row layout. `CohortContext` describes the current concatenated batch: which stack slots are active
(clients that finished their local steps have no rows), how many rows each has and each client's
own real sequence length L_k (the batch is padded to L = max_k L_k on the right; positions past L_k
are masked keys that come after the real ones, so neither bidirectional nor causal attention lets
them influence client k's real positions, and their labels are ignored). Every row is its own
sequence in the batch dimension, so a decoder's causal mask applies unchanged. When all active
clients have the same number of rows the layers reshape to (K, b·L, n) and use one `bmm`; otherwise
every row gathers its client's factors (N, r, n) and the `bmm` runs per row. Either way each
client's gradient only ever reaches its own slot.

Dropout: every mask is drawn from the client's own stream (`raysim.lora.cohort_dropout`).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from raysim.lora.cohort_context import CohortContext
from raysim.lora.cohort_dropout import _ACTIVE, COHORT_ATTN_PREFIX, SegmentDropout, _register_attention


# ----------------------------------------------------------------------------------------- layers


class SegmentLoRALinear(nn.Module):
    """A frozen base (nn.Linear or GPT-2's Conv1D) plus K clients' LoRA factors, each on its own rows only.

    a: (K, r, n), b: (K, m, r) (PEFT layout per slot, nn.Linear orientation for Conv1D too), scale: (K,),
    optional rank mask (K, r). The base is only called, so its weight layout does not matter here.
    """

    def __init__(self, base: nn.Module, ctx: CohortContext, a: torch.Tensor, b: torch.Tensor,
                 scale: torch.Tensor, rank_mask: torch.Tensor | None, dropout: float):
        super().__init__()
        self.base = base
        self.ctx = ctx
        self.a = a
        self.b = b
        self.scale = scale
        self.rank_mask = rank_mask
        self.dropout = SegmentDropout(dropout, ctx) if dropout > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx
        y = self.base(x)
        if self.dropout is not None:
            x = self.dropout(x)
        a, b = self.a, self.b
        if self.rank_mask is not None:
            a = a * self.rank_mask[:, :, None]
            b = b * self.rank_mask[:, None, :]
        a, b, s = ctx.select(a), ctx.select(b), ctx.select(self.scale)
        n = x.shape[-1]
        if ctx.uniform:
            xs = x.reshape(len(ctx.slots), -1, n)                         # (K, b·L, n)
            u = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2))
            u = u * s.view(-1, 1, 1).to(u.dtype)
        else:
            rows = ctx.row_pos
            xs = x.reshape(x.shape[0], -1, n)                             # (N, L, n)
            u = torch.bmm(torch.bmm(xs, a[rows].transpose(1, 2)), b[rows].transpose(1, 2))
            u = u * s[rows].view(-1, 1, 1).to(u.dtype)
        return y + u.reshape(y.shape)


class SegmentLinear(nn.Module):
    """K clients' own copies of a Linear layer (a classifier or LM head): weight (K, out, in), bias (K, out).

    Input (N, in) (sequence-level heads) or (N, L, in) (token-level heads such as a decoder's lm_head).
    """

    def __init__(self, ctx: CohortContext, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.ctx = ctx
        self.weight = weight
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx
        w = ctx.select(self.weight)
        bias = None if self.bias is None else ctx.select(self.bias)
        if ctx.uniform:
            out = torch.bmm(x.reshape(len(ctx.slots), -1, x.shape[-1]), w.transpose(1, 2))   # (K, b·L, out)
            if bias is not None:
                out = out + bias[:, None, :].to(out.dtype)
            return out.reshape(*x.shape[:-1], -1)
        if x.dim() == 2:
            rows = ctx.row_pos
            out = torch.bmm(w[rows], x.unsqueeze(-1)).squeeze(-1)                            # (N, out)
            return out if bias is None else out + bias[rows].to(out.dtype)
        # token-level: one matmul per client (gathering (N, out, in) would copy an LM head per row)
        parts, start = [], 0
        for pos, count in enumerate(ctx.counts):
            parts.append(F.linear(x[start:start + count], w[pos], None if bias is None else bias[pos]))
            start += count
        return torch.cat(parts)


class SegmentEmbedding(nn.Module):
    """K clients' own copies of an nn.Embedding (a decoder's trainable input embeddings): weight (K, V, H).

    Row n looks its tokens up in its client's table (one gather in the flattened (K·V, H) table). As in
    nn.Embedding, the `padding_idx` entry receives no gradient.
    """

    def __init__(self, ctx: CohortContext, weight: torch.Tensor, padding_idx: int | None):
        super().__init__()
        self.ctx = ctx
        self.weight = weight
        self.padding_idx = padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        k, vocab, hidden = self.weight.shape
        slots = self.ctx.row_slots().view(-1, *([1] * (ids.dim() - 1)))
        out = F.embedding(ids + slots * vocab, self.weight.reshape(k * vocab, hidden))
        if self.padding_idx is not None:
            out = torch.where((ids == self.padding_idx).unsqueeze(-1), out.detach(), out)
        return out


# ----------------------------------------------------------------------------------------- install


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> nn.Module:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old


@contextlib.contextmanager
def installed(model: nn.Module, ctx: CohortContext, replacements: dict[str, nn.Module], *, train: bool,
              per_client_dropout: bool):
    """Swap the stacked modules in (full module path -> module) and restore the originals on exit.

    With `per_client_dropout`, every nn.Dropout with p > 0 becomes a SegmentDropout and attention
    runs through `cohort_attention` (see `raysim.lora.cohort_dropout`). The model's train/eval mode is set
    to `train` inside and restored afterwards.
    """
    originals: dict[str, nn.Module] = {}
    config = getattr(model, "config", None)
    orig_attn = getattr(config, "_attn_implementation", None) if config is not None else None
    was_training = model.training
    try:
        for path, module in replacements.items():
            originals[path] = _set_submodule(model, path, module)
        if per_client_dropout and train:
            for path, module in list(model.named_modules()):
                if isinstance(module, nn.Dropout) and module.p > 0:
                    originals[path] = _set_submodule(model, path, SegmentDropout(module.p, ctx))
            if orig_attn is not None and not orig_attn.startswith(COHORT_ATTN_PREFIX):
                ctx.orig_attn = orig_attn
                config._attn_implementation = _register_attention(orig_attn)
        _ACTIVE.append(ctx)
        model.train(train)
        yield model
    finally:
        if _ACTIVE and _ACTIVE[-1] is ctx:
            _ACTIVE.pop()
        if config is not None and orig_attn is not None and config._attn_implementation != orig_attn:
            config._attn_implementation = orig_attn
        # restore in reverse order (dropout modules inside replaced layers were never touched)
        for path in reversed(list(originals)):
            _set_submodule(model, path, originals[path])
        model.train(was_training)
