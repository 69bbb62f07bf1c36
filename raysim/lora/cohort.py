"""Stacked ("cohort") LoRA layers: K clients' adapters in one tensor, one frozen base for all of them.

A cohort step feeds the concatenation of K clients' batches through the frozen base once. Every
adapted `nn.Linear` is temporarily replaced by a `SegmentLoRALinear` that holds the K clients'
factors stacked, A (K, r_max, n) and B (K, m, r_max), and adds client k's update only to client
k's rows with batched matmuls:

    y[rows_k] = W0 x[rows_k] + s_k · (x[rows_k] A_kᵀ) B_kᵀ

Per-slot rank masks zero the surplus slots of clients with r_k < r_max, and s_k is a per-client,
per-module scale. The classifier head (a Linear kept by PEFT in `modules_to_save`) becomes a
`SegmentLinear` with one weight per client.

Row layout. `CohortContext` describes the current concatenated batch: which stack slots are active
(clients that finished their local steps have no rows), how many rows each has and each client's
own real sequence length L_k (the batch is padded to L = max_k L_k; positions past L_k are masked
keys, so they never influence client k's real positions). When all active clients have the same
number of rows the layers reshape to (K, b·L, n) and use one `bmm`; otherwise every row gathers its
client's factors (N, r, n) and the `bmm` runs per row. Either way each client's gradient only ever
reaches its own slot.

Dropout (the choice both engines share). The frozen base runs in train mode with its dropout as
configured, as the PEFT engine does. In a cohort the masks must not couple clients: a client's masks
may depend on its own seed and data only, never on which other clients share its cohort or where
its rows sit in the batch. So while the stacked layers are installed every dropout draws each
client's mask from that client's own stream (`client_noise`):

- every `nn.Dropout` module (embeddings, hidden states, classifier, LoRA dropout) is replaced by a
  `SegmentDropout`;
- attention-probability dropout, which SDPA would do inside its kernel, runs through
  `cohort_attention`: the attention written out (scores, softmax, dropout, ·V) as one batched
  computation, the probabilities' mask drawn per client.

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

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

COHORT_ATTN_PREFIX = "raysim_cohort+"


@dataclass
class CohortContext:
    """Layout of the concatenated batch that the stacked layers are about to see."""

    num_slots: int
    device: torch.device
    generators: list[torch.Generator | None] = field(default_factory=list)   # per slot
    # set per step by `set_layout`
    slots: list[int] = field(default_factory=list)          # active slots, in row order
    counts: list[int] = field(default_factory=list)         # rows per active slot
    lengths: list[int] = field(default_factory=list)        # each active client's real sequence length
    length: int = 0                                         # padded length L of the batch
    uniform: bool = True                                    # all active slots have the same row count
    all_slots: bool = True                                  # slots == 0..K-1
    slot_index: torch.Tensor | None = None                  # (K_act,) device, when not all_slots
    row_pos: torch.Tensor | None = None                     # (N,) device: active position of each row
    orig_attn: str = "sdpa"
    # counter-based dropout on CUDA (see `cuda_noise`): per row its client's seed and its row number
    # within the client's batch; `full_length` is the canonical sequence length of the offsets
    row_seed: torch.Tensor | None = None
    row_local: torch.Tensor | None = None
    full_length: int = 0
    calls: int = 0                                          # dropout calls so far in this cohort

    def set_layout(self, slots: list[int], counts: list[int], lengths: list[int],
                   slot_index: torch.Tensor | None = None, row_pos: torch.Tensor | None = None,
                   row_seed: torch.Tensor | None = None, row_local: torch.Tensor | None = None) -> None:
        """Describe the next batch: active `slots` in row order with `counts` rows and real `lengths`.

        `slot_index` / `row_pos` may be given precomputed on the device (the engine uploads all steps'
        index tensors at once); they are built here otherwise.
        """
        self.slots, self.counts, self.lengths = list(slots), list(counts), list(lengths)
        self.length = max(lengths)
        self.uniform = len(set(counts)) == 1
        self.all_slots = list(slots) == list(range(self.num_slots))
        if not self.all_slots and slot_index is None:
            slot_index = torch.tensor(slots, dtype=torch.long, device=self.device)
        self.slot_index = None if self.all_slots else slot_index
        if not self.uniform and row_pos is None:
            row_pos = torch.repeat_interleave(torch.arange(len(slots), device=self.device),
                                              torch.tensor(counts, device=self.device))
        self.row_pos = None if self.uniform else row_pos
        self.row_seed, self.row_local = row_seed, row_local

    @property
    def counter_rng(self) -> bool:
        """Dropout from the one-launch counter-based generator (CUDA with Triton and row seeds given)."""
        return self.row_seed is not None and self.device.type == "cuda" and _triton_ok()

    def segments(self):
        """(slot, row start, row count, real length) for every active client."""
        start = 0
        for slot, count, length in zip(self.slots, self.counts, self.lengths):
            yield slot, start, count, length
            start += count

    def select(self, t: torch.Tensor) -> torch.Tensor:
        """Rows of a stacked (K, ...) tensor for the active slots, in row order."""
        return t if self.all_slots else t.index_select(0, self.slot_index)


# ----------------------------------------------------------------------------------------- dropout


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
        noise = torch.empty_like(x, memory_format=torch.contiguous_format)
        for slot, start, count, length in ctx.segments():
            gen = ctx.generators[slot]
            seg = noise[start:start + count]
            if seq_dims and length < ctx.length:
                shape = list(seg.shape)
                index = [slice(None)] * seg.dim()
                for d in seq_dims:
                    shape[d], index[d] = length, slice(0, length)
                part = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep, generator=gen)
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
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.bert.modeling_bert import eager_attention_forward

    ctx = _ACTIVE[-1] if _ACTIVE else None
    inner = ALL_ATTENTION_FUNCTIONS.get_interface(ctx.orig_attn if ctx else "sdpa", eager_attention_forward)
    if dropout == 0.0 or ctx is None:
        return inner(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
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


def _triton_ok() -> bool:
    if "ok" not in _TRITON:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _TRITON["ok"] = True
        except ImportError:
            _TRITON["ok"] = False
    return bool(_TRITON["ok"])


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


# ----------------------------------------------------------------------------------------- layers


class SegmentLoRALinear(nn.Module):
    """A frozen nn.Linear plus K clients' LoRA factors, each applied to its own rows only.

    a: (K, r, n), b: (K, m, r) (PEFT layout per slot), scale: (K,), optional rank mask (K, r).
    """

    def __init__(self, base: nn.Linear, ctx: CohortContext, a: torch.Tensor, b: torch.Tensor,
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
    """K clients' own copies of a Linear layer (the classifier head): weight (K, out, in), bias (K, out)."""

    def __init__(self, ctx: CohortContext, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.ctx = ctx
        self.weight = weight
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise NotImplementedError("the cohort engine supports sequence-level heads (input (batch, hidden))")
        ctx = self.ctx
        w = ctx.select(self.weight)
        bias = None if self.bias is None else ctx.select(self.bias)
        if ctx.uniform:
            out = torch.bmm(x.reshape(len(ctx.slots), -1, x.shape[-1]), w.transpose(1, 2))   # (K, b, out)
            if bias is not None:
                out = out + bias[:, None, :].to(out.dtype)
            return out.reshape(x.shape[0], -1)
        rows = ctx.row_pos
        out = torch.bmm(w[rows], x.unsqueeze(-1)).squeeze(-1)                                # (N, out)
        if bias is not None:
            out = out + bias[rows].to(out.dtype)
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
    runs through `cohort_attention` (see the module docstring). The model's train/eval mode is set
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
