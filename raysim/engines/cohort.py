"""The cohort engine: K clients trained at once, one frozen-base pass over their concatenated batches.

Same surface as `PeftEngine` (`train_client`, `evaluate`) plus `train_cohort(jobs)`. It works on the
worker's resident PEFT model: for the duration of a cohort the PEFT LoRA layers and the classifier
head are swapped for stacked modules (`raysim.lora.cohort`), and swapped back afterwards, so the base
weights (and every base delta folded into them) are shared with the PEFT engine, which still serves
global evaluation and the jobs the cohort engine does not take.

Per-client independence — every client's result equals its solo (PEFT engine) result:

- Loss: the SUM over clients of each client's mean cross-entropy, so d(loss)/d(θ_k) is exactly
  client k's own solo gradient (no 1/K, no cross terms: θ_k only touches client k's rows).
- Optimiser: one torch optimiser (AdamW/Adam/SGD as configured, same hyper-parameters as the PEFT
  engine) over the stacked tensors. These optimisers are elementwise, so slot k's moments and
  update depend on slot k's gradients only. Clients that run out of local steps (smaller data sets,
  fewer steps) stop updating: they have no rows in later batches (zero gradient) and their slots —
  parameters and optimiser moments — are saved before and restored after every later optimiser step,
  so neither momentum nor weight decay moves them. All clients start together, so every still-active
  slot has taken the same number of steps and the optimiser's shared step count (bias correction)
  is each active client's own.
- Gradient clipping (`train.max_grad_norm`) is per client: client k's norm over its own slices.
- Dropout: the frozen base in train mode as in the PEFT engine, every mask drawn from the client's
  own stream (see `raysim.lora.cohort`). On CPU the masks equal the PEFT engine's for the same seed;
  on CUDA they come from a counter-based generator (independent per client, not bitwise PEFT's).
- Clients with different ranks share r_max slots; the surplus slots are masked to zero.
- Batch order: `batch_schedule(train_idx, steps, batch_size, seed)`, exactly as the PEFT engine.

Jobs with tri-matrix factors (CE-LoRA, `LoRAFactors.c`) are refused with `UnsupportedJob`; the
worker trains those with the PEFT engine. Jobs with different trainable sets ("a", "b") or different
per-factor learning-rate multipliers (`ClientJob.lr_scale`) are trained as separate sub-cohorts.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from raysim.engines.base import ClientJob, ClientResult, EngineSettings, EvalResult, batch_schedule
from raysim.engines.peft_engine import DataArrays, PeftEngine, make_optimizer
from raysim.lora.cohort import CohortContext, SegmentLinear, SegmentLoRALinear, _triton_ok, installed
from raysim.lora.factors import LoRAFactors
from raysim.lora.peft_io import ADAPTER, PREFIX

DEVICE_DATA_LIMIT = 1 << 30      # keep the tokenised arrays on the GPU when they take at most this many bytes


class UnsupportedJob(ValueError):
    """A job the cohort engine cannot train (e.g. CE-LoRA's tri-matrix factors); use the PEFT engine."""


@dataclass
class _Step:
    slots: list[int]
    counts: list[int]
    lengths: list[int]
    rows: slice                 # into the uploaded row buffer
    slot_index: slice | None    # into the uploaded slot buffer (None: all slots active)
    row_pos: slice | None       # into the uploaded row-position buffer (None: uniform counts)
    idle: slice | None          # finished slots (restored after the optimiser step)
    row_seed: slice | None = None   # per row: its client's seed (counter-based dropout on CUDA)
    row_local: slice | None = None  # per row: its index within the client's batch


class CohortEngine:
    def __init__(self, model, data: DataArrays, settings: EngineSettings, peft: PeftEngine | None = None):
        self.model = model
        self.data = data
        self.device = data.device
        self.peft = peft or PeftEngine(model, data, settings)
        # the hyper-parameters are the PEFT engine's, so both engines always train alike
        for key in ("optimizer_name", "lr", "weight_decay", "batch_size", "max_grad_norm", "train_head",
                    "eval_batch_size", "bf16"):
            setattr(self, key, getattr(self.peft, key))
        from peft.tuners.lora import LoraLayer

        self.lora: dict[str, tuple[str, LoraLayer]] = {}           # canonical name -> (module path, layer)
        self.heads: dict[str, tuple[str, nn.Linear]] = {}          # canonical prefix -> (module path, linear)
        for path, module in model.named_modules():
            if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
                if not isinstance(module.get_base_layer(), nn.Linear):
                    raise NotImplementedError(f"cohort engine: {path} adapts a {type(module.get_base_layer()).__name__}; "
                                              "only nn.Linear is supported (use resources.engine: peft)")
                self.lora[path.removeprefix(PREFIX)] = (path, module)
            elif isinstance(module, ModulesToSaveWrapper):
                inner = module.modules_to_save[ADAPTER]
                if not isinstance(inner, nn.Linear):
                    raise NotImplementedError(f"cohort engine: trainable module {path} is a {type(inner).__name__}; "
                                              "only Linear heads are supported (use resources.engine: peft)")
                self.heads[path.removeprefix(PREFIX)] = (path, inner)
        self.dtype = next(model.parameters()).dtype
        self.has_dropout = any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())
        self.lengths = np.maximum(1, np.asarray(data.attention_mask.sum(dim=1)))
        self._dev_arrays = None

    # -- the PeftEngine surface ---------------------------------------------------------------------------

    def train_client(self, job: ClientJob) -> ClientResult:
        return self.train_cohort([job])[0]

    def evaluate(self, factors, head, idx: np.ndarray) -> EvalResult:
        return self.peft.evaluate(factors, head, idx)

    def _autocast(self):
        if self.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- cohorts ------------------------------------------------------------------------------------------

    def train_cohort(self, jobs: list[ClientJob]) -> list[ClientResult]:
        """Train the jobs together; results in the order of `jobs`."""
        for job in jobs:
            if any(f.c is not None for f in job.start.values()):
                raise UnsupportedJob(f"client {job.client_id}: the cohort engine does not train tri-matrix "
                                     "(CE-LoRA) factors; train this job with the PEFT engine")
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            scale = tuple(sorted((k, float(v)) for k, v in (job.lr_scale or {}).items()))
            groups[(frozenset(job.train), scale)].append(i)
        results: list[ClientResult | None] = [None] * len(jobs)
        for idxs in groups.values():
            if len(idxs) == 1 and self.device.type == "cpu":
                # one client gains nothing from stacking; on CPU the PEFT path is the same computation
                # (same dropout masks), minus the stacking overhead
                results[idxs[0]] = self.peft.train_client(jobs[idxs[0]])
                continue
            for i, res in zip(idxs, self._train_group([jobs[i] for i in idxs])):
                results[i] = res
        return results

    def _arrays(self):
        """(input_ids, attention_mask, labels) on the engine's device (cached there if small enough)."""
        d = self.data
        if self.device.type == "cpu":
            return d.input_ids, d.attention_mask, d.labels
        if self._dev_arrays is None:
            nbytes = sum(t.numel() * t.element_size() for t in (d.input_ids, d.attention_mask, d.labels))
            if nbytes <= DEVICE_DATA_LIMIT:
                self._dev_arrays = tuple(t.to(self.device) for t in (d.input_ids, d.attention_mask, d.labels))
            else:
                self._dev_arrays = (d.input_ids, d.attention_mask, d.labels)
        return self._dev_arrays

    def _upload(self, arr: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.int64))
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def _plan(self, schedules: list[list[np.ndarray]], seeds: list[int] | None = None) -> list[_Step]:
        """Per step: active slots, rows, lengths; index buffers uploaded to the device in one copy.

        With `seeds` (counter-based dropout on CUDA) also each row's client seed and its row number
        within the client's batch.
        """
        K = len(schedules)
        T = max(len(s) for s in schedules)
        rows, slots_buf, pos_buf, rng_buf, plan = [], [], [], [], []
        n_rows = n_slots = n_pos = 0
        for t in range(T):
            active = [k for k in range(K) if t < len(schedules[k])]
            batches = [np.asarray(schedules[k][t], dtype=np.int64) for k in active]
            counts = [len(b) for b in batches]
            lengths = [int(self.lengths[b].max()) for b in batches]
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
            plan.append(_Step(active, counts, lengths, step_rows, slot_sl, pos_sl, idle_sl))
            if seeds is not None:
                rng_buf.append(np.repeat(np.asarray([seeds[k] for k in active], dtype=np.int64), counts))
                rng_buf.append(np.concatenate([np.arange(c) for c in counts]))
        self._upload_plan(plan, [rows, slots_buf, pos_buf, rng_buf], n_rows, n_slots, seeds is not None)
        return plan

    def _upload_plan(self, plan: list[_Step], buffers, n_rows: int, n_slots: int, with_rng: bool) -> None:
        """Upload the plan's index buffers in one copy and point every step at its slices."""
        rows, slots_buf, pos_buf, rng_buf = buffers
        n_rng = sum(len(x) for x in rng_buf)
        flat = np.concatenate(rows + slots_buf + pos_buf + rng_buf)
        buf = self._upload(flat)
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

    def _stack(self, jobs: list[ClientJob], train: frozenset[str]):
        """Stacked factors (K, r_max, n) / (K, m, r_max), scales, rank masks and heads on the device."""
        K = len(jobs)
        dev, dtype = self.device, self.dtype
        lora = {}
        for name, (_, layer) in self.lora.items():
            a0 = layer.lora_A[ADAPTER].weight
            b0 = layer.lora_B[ADAPTER].weight
            r_max, n = a0.shape
            m = b0.shape[0]
            a = np.zeros((K, r_max, n), dtype=np.float32)
            b = np.zeros((K, m, r_max), dtype=np.float32)
            scale = np.empty(K, dtype=np.float64)
            ranks = np.empty(K, dtype=np.int64)
            for k, job in enumerate(jobs):
                if name not in job.start:
                    raise KeyError(f"client {job.client_id}: no factors for module {name}")
                f = job.start[name]
                r = f.rank
                if r > r_max:
                    raise ValueError(f"{name}: client rank {r} exceeds the model's LoRA rank {r_max}")
                a[k, :r] = f.a
                b[k, :, :r] = f.b
                scale[k] = f.scale
                ranks[k] = r
            ta = torch.from_numpy(a).to(dev, dtype).requires_grad_("a" in train)
            tb = torch.from_numpy(b).to(dev, dtype).requires_grad_("b" in train)
            mask = None
            if (ranks < r_max).any():
                mask = torch.from_numpy((np.arange(r_max)[None, :] < ranks[:, None])).to(dev, dtype)
            lora[name] = (ta, tb, torch.from_numpy(scale).to(dev, dtype), mask, ranks)
        heads = {}
        for prefix, (_, linear) in self.heads.items():
            tensors = {}
            for pname in ("weight", "bias"):
                if getattr(linear, pname) is None:
                    tensors[pname] = None
                    continue
                key = f"{prefix}.{pname}"
                stacked = np.stack([np.asarray(job.head[key]) for job in jobs])
                tensors[pname] = torch.from_numpy(stacked).to(dev, dtype).requires_grad_(self.train_head)
            heads[prefix] = tensors
        return lora, heads

    def _modules(self, ctx: CohortContext, lora, heads) -> dict[str, nn.Module]:
        out = {}
        for name, (path, layer) in self.lora.items():
            a, b, scale, mask, _ = lora[name]
            drop = layer.lora_dropout[ADAPTER]
            p = drop.p if isinstance(drop, nn.Dropout) else 0.0
            out[path] = SegmentLoRALinear(layer.get_base_layer(), ctx, a, b, scale, mask, p)
        for prefix, (path, _) in self.heads.items():
            out[path] = SegmentLinear(ctx, heads[prefix]["weight"], heads[prefix]["bias"])
        return out

    def _forward(self, ctx: CohortContext, step: _Step, arrays):
        """Logits and per-row cross-entropy of one concatenated batch."""
        ids, mask, labels = arrays
        ctx.set_layout(step.slots, step.counts, step.lengths, step.slot_index, step.row_pos, step.row_seed,
                       step.row_local)
        rows = step.rows if ids.device == step.rows.device else step.rows.to(ids.device)
        length = ctx.length
        batch_ids = ids.index_select(0, rows)[:, :length]
        batch_mask = mask.index_select(0, rows)[:, :length]
        batch_labels = labels.index_select(0, rows)
        if batch_ids.device != self.device:
            batch_ids, batch_mask, batch_labels = (t.to(self.device, non_blocking=True)
                                                   for t in (batch_ids, batch_mask, batch_labels))
        with self._autocast():
            logits = self.model(input_ids=batch_ids, attention_mask=batch_mask).logits
            ce = F.cross_entropy(logits, batch_labels, reduction="none")
        return logits, ce, batch_labels

    def _per_client(self, ctx: CohortContext, values: torch.Tensor, counts: torch.Tensor | None, mean: bool):
        """Per active client sum (or mean) of per-row values."""
        k = len(ctx.slots)
        if ctx.uniform:
            v = values.view(k, -1)
            return v.mean(dim=1) if mean else v.sum(dim=1)
        sums = torch.zeros(k, dtype=values.dtype, device=values.device).index_add_(0, ctx.row_pos, values)
        return sums / counts if mean else sums

    def _clip(self, params: list[torch.Tensor]) -> None:
        """Per-client clip_grad_norm_: client k's total norm over its slices of every trainable tensor."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        norms = torch.stack([torch.linalg.vector_norm(g.reshape(g.shape[0], -1), 2, dim=1) for g in grads])
        total = torch.linalg.vector_norm(norms, 2, dim=0)                       # (K,)
        coef = torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))

    def _train_group(self, jobs: list[ClientJob]) -> list[ClientResult]:
        t0 = time.perf_counter()
        K = len(jobs)
        train = frozenset(jobs[0].train)
        schedules = [batch_schedule(j.train_idx, j.steps, self.batch_size, j.seed) for j in jobs]
        counter_rng = self.has_dropout and self.device.type == "cuda" and _triton_ok()
        plan = self._plan(schedules, [int(j.seed) for j in jobs] if counter_rng else None)
        arrays = self._arrays()
        lora, heads = self._stack(jobs, train)
        opt, params = self._optimizer(jobs[0].lr_scale or {}, lora, heads)
        ctx = CohortContext(K, self.device, full_length=int(self.data.input_ids.shape[1]))
        if self.has_dropout and not counter_rng:
            ctx.generators = [torch.Generator(device=self.device).manual_seed(int(j.seed)) for j in jobs]
        loss_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        losses = torch.zeros(len(plan), K, dtype=loss_dtype, device=self.device)
        count_t = {}
        with installed(self.model, ctx, self._modules(ctx, lora, heads), train=True,
                       per_client_dropout=self.has_dropout):
            for t, step in enumerate(plan):
                counts = None
                if len(set(step.counts)) > 1:
                    key = tuple(step.counts)
                    if key not in count_t:
                        count_t[key] = torch.tensor(step.counts, dtype=loss_dtype).to(self.device, non_blocking=True)
                    counts = count_t[key]
                _, ce, _ = self._forward(ctx, step, arrays)
                per_client = self._per_client(ctx, ce.to(loss_dtype), counts, mean=True)
                if opt is not None:
                    self._optimizer_step(opt, params, per_client.sum(), step.idle)
                pos = torch.arange(K, device=self.device) if step.slot_index is None else step.slot_index
                losses[t].index_copy_(0, pos, per_client.detach())
        del opt
        return self._finish(jobs, lora, heads, losses, [len(s) for s in schedules], t0)

    def _optimizer(self, scale: dict[str, float], lora, heads):
        """(optimiser or None, trainable tensors): param groups as in the PEFT engine — one per trained factor
        at lr × lr_scale[factor], the head at lr."""
        groups = {"a": [t[0] for t in lora.values() if t[0].requires_grad],
                  "b": [t[1] for t in lora.values() if t[1].requires_grad],
                  "head": [t for h in heads.values() for t in h.values() if t is not None and t.requires_grad]}
        groups = [{"params": ps, "lr": self.lr * float(scale.get(name, 1.0))} for name, ps in groups.items() if ps]
        params = [p for g in groups for p in g["params"]]
        return (make_optimizer(self.optimizer_name, groups, self.lr, self.weight_decay) if params else None), params

    def _optimizer_step(self, opt, params: list[torch.Tensor], loss: torch.Tensor, idle) -> None:
        """Backward, per-client clipping, step; the slots of clients that already finished (`idle`) keep their
        parameters and optimiser moments."""
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.max_grad_norm:
            self._clip(params)
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

    def _finish(self, jobs, lora, heads, losses, steps: list[int], t0: float) -> list[ClientResult]:
        """Per-client results, local evaluation, and each client's share of the cohort's time (since `t0`)."""
        results = self._results(jobs, lora, heads, losses, steps)
        evals = self._evaluate_stacked(jobs, lora, heads)
        elapsed = time.perf_counter() - t0
        total_steps = sum(steps)
        for res, ev, s in zip(results, evals, steps):
            if ev is not None:
                res.local_accuracy, res.local_loss = ev.accuracy, ev.loss
            res.train_time_s = elapsed * s / total_steps      # the client's share of the cohort's time
            res.extra = {"cohort_size": float(len(jobs)), "cohort_time_s": elapsed}
        return results

    @torch.no_grad()
    def _results(self, jobs, lora, heads, losses, steps) -> list[ClientResult]:
        host = {name: (a.detach().float().cpu().numpy(), b.detach().float().cpu().numpy(), ranks)
                for name, (a, b, _, _, ranks) in lora.items()}
        head_host = {f"{prefix}.{pname}": t.detach().float().cpu().numpy()
                     for prefix, h in heads.items() for pname, t in h.items() if t is not None}
        loss_host = losses.cpu().numpy()
        out = []
        for k, job in enumerate(jobs):
            factors = {}
            for name, (a, b, ranks) in host.items():
                r = int(ranks[k])
                factors[name] = LoRAFactors(a=a[k, :r].copy(), b=b[k, :, :r].copy(),
                                            scale=float(job.start[name].scale))
            out.append(ClientResult(client_id=job.client_id, factors=factors,
                                    head={key: v[k].copy() for key, v in head_host.items()},
                                    num_samples=len(job.train_idx),
                                    train_loss=float(loss_host[:steps[k], k].mean()),
                                    train_time_s=0.0, steps=steps[k]))
        return out

    @torch.no_grad()
    def _evaluate_stacked(self, jobs, lora, heads) -> list[EvalResult | None]:
        """Each client's local test split with its own trained adapter, all clients in shared batches."""
        with_test = [k for k, j in enumerate(jobs) if j.test_idx is not None and len(j.test_idx)]
        if not with_test:
            return [None] * len(jobs)
        K = len(jobs)
        bs = self.eval_batch_size
        chunks = [[np.asarray(jobs[k].test_idx)[i:i + bs] for i in range(0, len(jobs[k].test_idx), bs)]
                  if k in with_test else [] for k in range(K)]
        plan = self._plan([c if c else [] for c in chunks]) if any(chunks) else []
        arrays = self._arrays()
        dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        loss_sum = torch.zeros(K, dtype=dtype, device=self.device)
        correct = torch.zeros(K, dtype=torch.long, device=self.device)
        ctx = CohortContext(K, self.device)
        with installed(self.model, ctx, self._modules(ctx, lora, heads), train=False, per_client_dropout=False):
            for step in plan:
                logits, ce, labels = self._forward(ctx, step, arrays)
                pos = (torch.arange(K, device=self.device) if step.slot_index is None else step.slot_index)
                hit = (logits.argmax(dim=-1) == labels)
                loss_sum.index_add_(0, pos, self._per_client(ctx, ce.to(dtype), None, mean=False))
                correct.index_add_(0, pos, self._per_client(ctx, hit.long(), None, mean=False))
        loss_host, correct_host = loss_sum.cpu().numpy(), correct.cpu().numpy()
        return [EvalResult.classification(float(loss_host[k]), int(correct_host[k]), len(jobs[k].test_idx))
                if k in with_test
                else None for k in range(K)]
