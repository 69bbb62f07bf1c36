"""The cohort engine's step plan and per-row losses (see `raysim.engines.cohort`).

A plan lists, for every local step of a cohort, which clients still train, their rows in the
concatenated batch and their real sequence lengths; all index tensors are uploaded in one copy.
The losses are per row (a loss sum and its weight: 1 per example for classification, the number of
predicted tokens for a causal LM), reduced per client, so every client's loss is its own mean,
exactly as the PEFT engine's batch loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from raysim.lora.cohort import CohortContext

IGNORE = -100          # label of the tokens without a loss (prompt, padding)


@dataclass
class Step:
    slots: list[int]
    counts: list[int]
    lengths: list[int]
    rows: slice | torch.Tensor          # into the uploaded row buffer (a tensor once uploaded)
    slot_index: slice | None            # into the uploaded slot buffer (None: all slots active)
    row_pos: slice | None               # into the uploaded row-position buffer (None: uniform counts)
    idle: slice | None                  # finished slots (restored after the optimiser step)
    row_seed: slice | None = None       # per row: its client's seed (counter-based dropout on CUDA)
    row_local: slice | None = None      # per row: its index within the client's batch


def plan_steps(schedules: list[list[np.ndarray]], lengths: np.ndarray, upload: Callable[[np.ndarray], torch.Tensor],
               seeds: list[int] | None = None) -> list[Step]:
    """Per step: active slots, rows, real lengths (`lengths` per example); index buffers uploaded in one copy.

    With `seeds` (counter-based dropout on CUDA) also each row's client seed and its row number within the
    client's batch.
    """
    K = len(schedules)
    T = max((len(s) for s in schedules), default=0)
    rows, slots_buf, pos_buf, rng_buf, plan = [], [], [], [], []
    n_rows = n_slots = n_pos = 0
    for t in range(T):
        active = [k for k in range(K) if t < len(schedules[k])]
        batches = [np.asarray(schedules[k][t], dtype=np.int64) for k in active]
        counts = [len(b) for b in batches]
        step_lengths = [int(lengths[b].max()) for b in batches]
        rows.extend(batches)
        step_rows = slice(n_rows, n_rows + sum(counts))
        n_rows += sum(counts)
        slot_sl = idle_sl = pos_sl = None
        if len(active) < K:
            idle = [k for k in range(K) if k not in set(active)]
            slots_buf.append(np.asarray(active + idle, dtype=np.int64))
            slot_sl = slice(n_slots, n_slots + len(active))
            idle_sl = slice(n_slots + len(active), n_slots + K)
            n_slots += K
        if len(set(counts)) > 1:
            pos_buf.append(np.repeat(np.arange(len(active)), counts))
            pos_sl = slice(n_pos, n_pos + sum(counts))
            n_pos += sum(counts)
        plan.append(Step(active, counts, step_lengths, step_rows, slot_sl, pos_sl, idle_sl))
        if seeds is not None:
            rng_buf.append(np.repeat(np.asarray([seeds[k] for k in active], dtype=np.int64), counts))
            rng_buf.append(np.concatenate([np.arange(c) for c in counts]))
    if plan:
        _upload_plan(plan, [rows, slots_buf, pos_buf, rng_buf], n_rows, n_slots, seeds is not None, upload)
    return plan


def _upload_plan(plan: list[Step], buffers, n_rows: int, n_slots: int, with_rng: bool, upload) -> None:
    """Upload the plan's index buffers in one copy and point every step at its slices."""
    rows, slots_buf, pos_buf, rng_buf = buffers
    n_rng = sum(len(x) for x in rng_buf)
    flat = np.concatenate(rows + slots_buf + pos_buf + rng_buf)
    buf = upload(flat)
    row_buf = buf[:n_rows]
    slot_buf = buf[n_rows:n_rows + n_slots]
    pos_buf_t = buf[n_rows + n_slots:len(flat) - n_rng]
    rng_t = buf[len(flat) - n_rng:]
    at = 0
    for step in plan:
        if with_rng:
            n = step.rows.stop - step.rows.start
            step.row_seed, step.row_local = rng_t[at:at + n], rng_t[at + n:at + 2 * n]
            at += 2 * n
        step.rows = row_buf[step.rows]
        if step.slot_index is not None:
            step.slot_index, step.idle = slot_buf[step.slot_index], slot_buf[step.idle]
        if step.row_pos is not None:
            step.row_pos = pos_buf_t[step.row_pos]


def _token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, L-1) next-token cross-entropy in float32, 0 where ignored; laid out (tokens, vocab) as transformers'
    causal-LM loss lays it out, so every token's loss and gradient are computed exactly as there."""
    n, length, vocab = logits.shape
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, vocab), labels[:, 1:].reshape(-1),
                          ignore_index=IGNORE, reduction="none")
    return nll.view(n, length - 1)


def row_losses(logits: torch.Tensor, labels: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (loss sum, weight); a client's loss is Σ sums / Σ weights over its rows.

    Classification: cross-entropy, weight 1 (the batch mean). Causal LM: summed next-token cross-entropy
    over the labelled tokens and their number (the mean over the batch's tokens, as `model(**batch).loss`).
    """
    if not causal:
        ce = F.cross_entropy(logits, labels, reduction="none")
        return ce, torch.ones_like(ce)
    nll = _token_nll(logits, labels).sum(dim=1)
    return nll, (labels[:, 1:] != IGNORE).sum(dim=1).to(nll.dtype)


def eval_rows(logits: torch.Tensor, labels: torch.Tensor, causal: bool) -> dict[str, torch.Tensor]:
    """Per-row evaluation values, computed as the task's evaluation computes them (float32 losses summed
    in float64): loss_sum and correct (classification); nll_sum, tokens and count (causal LM)."""
    if not causal:
        loss = F.cross_entropy(logits.float(), labels, reduction="none")
        hit = (logits.argmax(dim=-1) == labels).double()
        return {"loss_sum": loss.double(), "correct": hit, "count": torch.ones_like(hit)}
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=IGNORE,
                          reduction="none").double().sum(dim=1)       # as the task's `_nll`
    return {"nll_sum": nll, "tokens": (labels[:, 1:] != IGNORE).sum(dim=1).double(), "count": torch.ones_like(nll)}


def per_client_sum(ctx: CohortContext, values: torch.Tensor) -> torch.Tensor:
    """(K_active,) sums of per-row values over each active client's rows."""
    k = len(ctx.slots)
    if ctx.uniform:
        return values.view(k, -1).sum(dim=1)
    return torch.zeros(k, dtype=values.dtype, device=values.device).index_add_(0, ctx.row_pos, values)


def clip_per_client(params: list[torch.Tensor], max_norm: float) -> None:
    """Per-client clip_grad_norm_: client k's total norm over its slices (dim 0) of every trainable tensor."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch.stack([torch.linalg.vector_norm(g.reshape(g.shape[0], -1), 2, dim=1) for g in grads])
    total = torch.linalg.vector_norm(norms, 2, dim=0)                       # (K,)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))


def optimizer_step(opt, params: list[torch.Tensor], loss: torch.Tensor, idle: torch.Tensor | None,
                   max_grad_norm: float | None) -> None:
    """Backward, per-client clipping, step; the slots of clients that already finished (`idle`) keep their
    parameters and optimiser moments."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm:
        clip_per_client(params, max_grad_norm)
    saved = []
    if idle is not None:
        for p in params:
            saved.append((p, p.detach().index_select(0, idle)))
            for v in opt.state.get(p, {}).values():
                if torch.is_tensor(v) and v.shape == p.shape:
                    saved.append((v, v.index_select(0, idle)))
    opt.step()
    with torch.no_grad():
        for tensor, old in saved:
            tensor.index_copy_(0, idle, old)
