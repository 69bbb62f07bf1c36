"""Per-client dropout for the cohort engine's stacked layers (see `raysim.lora.cohort`).

The frozen base runs in train mode with its dropout as configured, as the PEFT engine does. In a
cohort the masks must not couple clients: a client's masks may depend on its own seed and data only,
never on which other clients share its cohort or where its rows sit in the batch. So while the
stacked layers are installed every dropout draws each client's mask from that client's own stream
(`client_noise`):

- every `nn.Dropout` module (embeddings, hidden states, classifier, LoRA dropout, GPT-2's attention
  and residual dropout) is replaced by a `SegmentDropout`;
- attention-probability dropout, which SDPA would do inside its kernel (Llama's `attention_dropout`,
  GPT-2's `attn_pdrop`, BERT's and ViT's `attention_probs_dropout_prob`), runs through `cohort_attention`: the
  attention written out (scores, softmax, dropout, ·V) as one batched computation, the
  probabilities' mask drawn per client.

The streams: on CPU one `torch.Generator` per client seeded with the job seed, drawing over the
client's own (b_k, L_k, ...) slice in forward order with the procedure of torch's CPU dropout; this
reproduces the PEFT engine's masks exactly, so the two engines agree even with dropout on. On CUDA
(with Triton) one counter-based Philox kernel per dropout call serves all clients: row n's numbers
are keyed by (its client's seed, the call number) at offsets of the client's canonical layout, so
the masks are independent per client and deterministic, but not the fused CUDA dropout's masks of
the PEFT engine (statistically, not bitwise, equal). With all dropout probabilities 0 (or in eval
mode) none of this happens and attention keeps its original fused implementation.
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import nn

from raysim.lora.cohort_context import CohortContext, triton_available

COHORT_ATTN_PREFIX = "raysim_cohort+"


class SegmentDropout(nn.Module):
    """Dropout with one generator per client: client k's mask covers only its own (b_k, L_k, ...) slice.

    Reproduces `torch.nn.functional.dropout`'s CPU procedure (bernoulli_(1-p), ÷(1-p), multiply), so a
    client's masks equal those of a solo run seeded the same way. Positions past L_k (padding in the
    cohort batch, absent in a solo batch) are kept unchanged: they are masked keys and never reach
    client k's real positions.
    """

    def __init__(self, p: float, ctx: CohortContext):
        super().__init__()
        self.p = float(p)
        self.ctx = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return x * client_noise(self.ctx, x, self.p, seq_dims=(1,) if x.dim() == 3 else ())

    def extra_repr(self) -> str:
        return f"p={self.p}, per-client generators"


_ACTIVE: list[CohortContext] = []           # the context of the installed cohort (actors are single-threaded)


def client_noise(ctx: CohortContext, x: torch.Tensor, p: float, seq_dims: tuple[int, ...]) -> torch.Tensor:
    """Dropout multipliers (0 or 1/(1-p)) shaped like x, each client's rows from its own generator.

    `seq_dims` are sequence dims of x (counting the batch dim as 0): client k's numbers are drawn for
    its own length L_k there, exactly as a solo batch of length L_k would draw them (positions past
    L_k are padding in the cohort and are kept). On CUDA with Triton one counter-based kernel serves
    all clients (`cuda_noise`); otherwise one `bernoulli_` per client on its torch.Generator, the
    procedure of torch's CPU dropout.
    """
    if ctx.counter_rng and x.is_cuda:
        return cuda_noise(ctx, x, p, seq_dims)
    keep = 1.0 - p
    with torch.no_grad():
        # x's own memory layout, as torch's dropout allocates its noise: bernoulli_ fills in memory order, so
        # a transposed input (the Mixer's token MLP) draws its numbers in the same order as a solo run
        noise = torch.empty_like(x)
        for slot, start, count, length in ctx.segments():
            gen = ctx.generators[slot]
            seg = noise[start:start + count]
            if seq_dims and length < ctx.length:
                index = [slice(None)] * seg.dim()
                for d in seq_dims:
                    index[d] = slice(0, length)
                part = torch.empty_like(seg[tuple(index)]).bernoulli_(keep, generator=gen)
                seg.fill_(keep)
                seg[tuple(index)] = part
            else:
                seg.bernoulli_(keep, generator=gen)
        noise.div_(keep)
    return noise


def cohort_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Attention with per-client dropout on the attention probabilities.

    Without dropout (eval mode, p = 0) this is the original implementation (e.g. SDPA) on the whole
    batch. With dropout the attention is written out — scores, softmax, dropout, ·V, which is what
    SDPA's math kernel does on CPU when it drops out — so the probabilities' dropout can come from
    each client's own generator (`client_noise`), still one batched computation for all clients.
    Grouped-query attention (Llama's fewer key/value heads) repeats the key/value heads; a causal
    module without a mask (SDPA's `is_causal` shortcut) gets the causal triangle.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.bert.modeling_bert import eager_attention_forward

    ctx = _ACTIVE[-1] if _ACTIVE else None
    inner = ALL_ATTENTION_FUNCTIONS.get_interface(ctx.orig_attn if ctx else "sdpa", eager_attention_forward)
    if dropout == 0.0 or ctx is None:
        return inner(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    if key.shape[1] != query.shape[1]:                      # grouped-query attention
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    if attention_mask is None and is_causal and query.shape[2] > 1:
        q_len, k_len = query.shape[2], key.shape[2]
        attention_mask = (torch.arange(q_len, device=query.device)[:, None] + (k_len - q_len)
                          >= torch.arange(k_len, device=query.device)[None, :])
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = F.softmax(scores, dim=-1)
    probs = probs * client_noise(ctx, probs, dropout, seq_dims=(2, 3))
    out = torch.matmul(probs.to(value.dtype), value)
    return out.transpose(1, 2).contiguous(), None


_TRITON: dict[str, object] = {}


def _noise_kernel():
    """Triton kernel: keep-mask ÷ keep for rows (N, d1·d2·d3), Philox keyed by (client seed, call)."""
    if "kernel" in _TRITON:
        return _TRITON["kernel"]
    import triton
    import triton.language as tl

    @triton.jit
    def noise(out_ptr, row_seed_ptr, row_local_ptr, inner, d2, d3, c1, c2, c3, call, p, scale,
              BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        valid = cols < inner
        seed = tl.load(row_seed_ptr + row).to(tl.int64) * 1048576 + call
        local = tl.load(row_local_ptr + row).to(tl.int64)
        c = cols.to(tl.int64)
        i3 = c % d3
        i2 = (c // d3) % d2
        i1 = c // (d3 * d2)
        # offset in the client's canonical layout (sequence dims at full length): independent of the
        # cohort's padded length and of where the client's rows sit in the batch
        off = ((local * c1 + i1) * c2 + i2) * c3 + i3
        r = tl.rand(seed, off.to(tl.uint32))
        val = tl.where(r >= p, scale, 0.0)
        tl.store(out_ptr + row.to(tl.int64) * inner + c, val.to(out_ptr.dtype.element_ty), mask=valid)

    _TRITON["kernel"] = noise
    return noise


def cuda_noise(ctx: CohortContext, x: torch.Tensor, p: float, seq_dims: tuple[int, ...]) -> torch.Tensor:
    """Dropout multipliers (0 or 1/(1-p)) shaped like x, one kernel launch for all clients.

    Row n's numbers come from Philox keyed by (its client's seed, this call's number) at offsets of
    the client's own canonical layout (row within the client's batch; dims in `seq_dims` counted at
    the full sequence length), so a client's masks never depend on the other clients in the cohort.
    """
    ctx.calls += 1
    n = x.shape[0]
    rest = list(x.shape[1:])
    if len(rest) > 3:
        rest, seq_dims = [math.prod(rest[:-2])] + rest[-2:], ()
    shift = 3 - len(rest)
    dims = [1] * shift + rest
    canon = list(dims)
    for d in seq_dims:                  # d counts the dims after the batch dim, from 1
        canon[d - 1 + shift] = max(ctx.full_length, dims[d - 1 + shift])
    inner = dims[0] * dims[1] * dims[2]
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    block = 1024
    grid = (n, (inner + block - 1) // block)
    _noise_kernel()[grid](out, ctx.row_seed, ctx.row_local, inner, dims[1], dims[2], canon[0], canon[1], canon[2],
                          ctx.calls, float(p), 1.0 / (1.0 - p), BLOCK=block)
    return out


def _register_attention(orig: str) -> str:
    """Register `cohort_attention` (and the original's mask builder) under a derived name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    name = COHORT_ATTN_PREFIX + orig
    AttentionInterface.register(name, cohort_attention)
    if orig in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[orig])
    return name
