"""The cohort engine: K clients trained at once, one frozen-base pass over their concatenated batches.

Same surface as `PeftEngine` (`train_client`, `evaluate`) plus `train_cohort(jobs)`. It works on the
worker's resident PEFT model: for the duration of a cohort the PEFT LoRA layers and the modules trained
in full (`modules_to_save`: a classifier head; a decoder's input embeddings and LM head) are swapped
for stacked modules (`raysim.lora.cohort`), and swapped back afterwards, so the base weights (and
every base delta folded into them) are shared with the PEFT engine, which still serves global
evaluation and the jobs the cohort engine does not take.

Tasks: sequence classification (one label per example), image classification (`pixel_values`, one
label per image: a ViT, whose self-attention is BERT's, or the MLP-Mixer) and causal language modelling
(token labels, -100 where no loss is taken; Llama-style decoders and GPT-2, whose Conv1D layers hold
LoRA factors in nn.Linear orientation like every other layer). Every row of the concatenated batch is
its own sequence (an image: all its patches), trimmed to the longest real sequence of the step's rows
and right-padded, so a decoder's causal mask works unchanged. A model whose LM head is tied to its
input embeddings (Llama-3.2-1B, Qwen2-0.5B) trains one shared copy per client, as the PEFT model does.
Dropout is supported for all of them (ViT's hidden and attention-probability dropout as BERT's).

Per-client independence — every client's result equals its solo (PEFT engine) result:

- Loss: the SUM over clients of each client's own mean loss (cross-entropy per example or image; for a causal
  LM the next-token cross-entropy per labelled token of the client's batch, as `model(**batch).loss`),
  so d(loss)/d(θ_k) is exactly client k's own solo gradient (no 1/K, no cross terms: θ_k only touches
  client k's rows).
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
  own stream (see `raysim.lora.cohort_dropout`). On CPU the masks equal the PEFT engine's for the same
  seed; on CUDA they come from a counter-based generator (independent per client, not bitwise PEFT's).
- Clients with different ranks share r_max slots; the surplus slots are masked to zero.
- Batch order: `batch_schedule(train_idx, steps, batch_size, seed)`, exactly as the PEFT engine.
- Local evaluation (a job's test split): the task's sums (loss and accuracy; token NLL and token count
  for a causal LM), computed as the task's evaluation computes them, all clients in shared batches.

Jobs with tri-matrix factors (CE-LoRA, `LoRAFactors.c`) are refused with `UnsupportedJob`; the
worker trains those with the PEFT engine. Jobs with different trainable sets ("a", "b") or different
per-factor learning-rate multipliers (`ClientJob.lr_scale`) are trained as separate sub-cohorts.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import numpy as np
import torch
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from raysim.engines.base import ClientJob, ClientResult, EngineSettings, EvalResult, batch_schedule
from raysim.engines.cohort_steps import Step, eval_rows, optimizer_step, per_client_sum, plan_steps, row_losses
from raysim.engines.peft_engine import DataArrays, PeftEngine, make_optimizer, widen
from raysim.lora.cohort import CohortContext, SegmentEmbedding, SegmentLinear, SegmentLoRALinear, installed
from raysim.lora.cohort_context import triton_available
from raysim.lora.factors import LoRAFactors
from raysim.lora.peft_io import ADAPTER, PREFIX, head_parameters, is_fan_in_fan_out

DEVICE_DATA_LIMIT = 1 << 30      # keep the tokenised arrays on the GPU when they take at most this many bytes
TASKS = ("seq_cls", "causal_lm", "image_cls")


class UnsupportedJob(ValueError):
    """A job the cohort engine cannot train (e.g. CE-LoRA's tri-matrix factors); use the PEFT engine."""


class UnsupportedModel(ValueError):
    """A model or task the stacked layers cannot hold (the worker then trains with the PEFT engine)."""


def _check_saved(path: str, inner: nn.Module) -> None:
    """A module trained in full must be a Linear or a plain nn.Embedding (what the stacked modules hold)."""
    if type(inner) is nn.Embedding:
        if inner.max_norm is not None or inner.scale_grad_by_freq or inner.sparse:
            raise UnsupportedModel(f"cohort engine: embedding {path} uses max_norm/scale_grad_by_freq/sparse "
                                      "(use resources.engine: peft)")
    elif not isinstance(inner, nn.Linear):
        raise UnsupportedModel(f"cohort engine: trainable module {path} is a {type(inner).__name__}; only "
                                  "Linear heads and nn.Embedding are supported (use resources.engine: peft)")


def _has_dropout(model) -> bool:
    """Any dropout module with p > 0, or attention dropout given by the config (Llama's attention_dropout)."""
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        return True
    config = getattr(model, "config", None)
    return float(getattr(config, "attention_dropout", 0.0) or 0.0) > 0


class CohortEngine:
    def __init__(self, model, data: DataArrays, settings: EngineSettings, peft: PeftEngine | None = None,
                 task=None):
        self.model = model
        self.data = data
        self.device = data.device
        self.peft = peft or PeftEngine(model, data, settings, task)
        if self.peft.task.name not in TASKS:
            raise UnsupportedModel(f"cohort engine: task {self.peft.task.name!r} is not supported "
                                      "(use resources.engine: peft)")
        # token labels (N, L) mean a causal LM even when no task was given (the PEFT engine's default task
        # batches them alike, and `model(**batch).loss` is then the causal-LM loss)
        self.causal = self.peft.task.name == "causal_lm" or data.labels.dim() == 2
        self.image = data.pixel_values is not None       # images (N, C, H, W) instead of token rows
        # the hyper-parameters are the PEFT engine's, so both engines always train alike
        for key in ("optimizer_name", "lr", "weight_decay", "batch_size", "max_grad_norm", "train_head",
                    "eval_batch_size", "bf16"):
            setattr(self, key, getattr(self.peft, key))
        self._find_modules(model)
        self.dtype = next(model.parameters()).dtype
        self.has_dropout = _has_dropout(model)
        self.use_data(data)

    def use_data(self, data: DataArrays) -> None:
        """Train on `data` from now on (a worker with per-client data switches tables between calls)."""
        self.data = data
        # real sequence lengths; every image has all its patches (one length for all, never trimmed)
        self.lengths = (np.ones(len(data.labels), dtype=np.int64) if self.image
                        else np.maximum(1, np.asarray(data.attention_mask.sum(dim=1))))
        self._dev_arrays = None

    def _find_modules(self, model) -> None:
        """The adapted layers and the modules trained in full, with the canonical names of their tensors."""
        from peft.tuners.lora import LoraLayer

        self.lora: dict[str, tuple[str, LoraLayer]] = {}          # canonical name -> (module path, layer)
        # module path -> (module, {"weight"/"bias": canonical tensor name}); a tied LM head names the
        # embedding's tensor, so both stacked modules share one stacked tensor
        self.heads: dict[str, tuple[nn.Module, dict[str, str]]] = {}
        self.head_keys = list(head_parameters(model))
        key_of = {id(p): key for key, p in head_parameters(model).items()}
        for path, module in model.named_modules():
            if isinstance(module, LoraLayer) and ADAPTER in getattr(module, "lora_embedding_A", {}):
                raise UnsupportedModel(f"cohort engine: {path} is a LoRA embedding; only nn.Linear and Conv1D "
                                          "layers are supported (use resources.engine: peft)")
            if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
                base = module.get_base_layer()
                if not (isinstance(base, nn.Linear) or is_fan_in_fan_out(base)):
                    raise UnsupportedModel(f"cohort engine: {path} adapts a {type(base).__name__}; only "
                                              "nn.Linear and Conv1D are supported (use resources.engine: peft)")
                self.lora[path.removeprefix(PREFIX)] = (path, module)
            elif isinstance(module, ModulesToSaveWrapper):
                inner = module.modules_to_save[ADAPTER]
                _check_saved(path, inner)
                keys = {pname: key_of[id(getattr(inner, pname))] for pname in ("weight", "bias")
                        if getattr(inner, pname, None) is not None}
                self.heads[path] = (inner, keys)

    # -- the PeftEngine surface ---------------------------------------------------------------------------

    def train_client(self, job: ClientJob) -> ClientResult:
        return self.train_cohort([job])[0]

    def evaluate(self, factors, head, idx: np.ndarray, gen_idx: np.ndarray | None = None) -> EvalResult:
        return self.peft.evaluate(factors, head, idx, gen_idx)

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
        """(input_ids, attention_mask, labels), or for images (pixel_values, None, labels), on the engine's
        device (cached there if small enough)."""
        d = self.data
        host = (d.pixel_values, None, d.labels) if self.image else (d.input_ids, d.attention_mask, d.labels)
        if self.device.type == "cpu":
            return host
        if self._dev_arrays is None:
            nbytes = sum(t.numel() * t.element_size() for t in host if t is not None)
            if nbytes <= DEVICE_DATA_LIMIT:
                self._dev_arrays = tuple(None if t is None else t.to(self.device) for t in host)
            else:
                self._dev_arrays = host
        return self._dev_arrays

    def _upload(self, arr: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.int64))
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def _plan(self, schedules: list[list[np.ndarray]], seeds: list[int] | None = None) -> list[Step]:
        return plan_steps(schedules, self.lengths, self._upload, seeds)

    def _stack(self, jobs: list[ClientJob], train: frozenset[str]):
        """Stacked factors (K, r_max, n) / (K, m, r_max), scales, rank masks; stacked heads (K, ...) by
        canonical tensor name; all on the device."""
        K = len(jobs)
        dev, dtype = self.device, self.dtype
        lora = {}
        for name, (_, layer) in self.lora.items():
            r_max, n = layer.lora_A[ADAPTER].weight.shape
            m = layer.lora_B[ADAPTER].weight.shape[0]
            a = np.zeros((K, r_max, n), dtype=np.float32)
            b = np.zeros((K, m, r_max), dtype=np.float32)
            scale = np.empty(K, dtype=np.float64)
            ranks = np.empty(K, dtype=np.int64)
            for k, job in enumerate(jobs):
                if name not in job.start:
                    raise KeyError(f"client {job.client_id}: no factors for module {name}")
                f = job.start[name]
                if f.rank > r_max:
                    raise ValueError(f"{name}: client rank {f.rank} exceeds the model's LoRA rank {r_max}")
                a[k, :f.rank], b[k, :, :f.rank], scale[k], ranks[k] = f.a, f.b, f.scale, f.rank
            ta = torch.from_numpy(a).to(dev, dtype).requires_grad_("a" in train)
            tb = torch.from_numpy(b).to(dev, dtype).requires_grad_("b" in train)
            mask = None
            if (ranks < r_max).any():
                mask = torch.from_numpy((np.arange(r_max)[None, :] < ranks[:, None])).to(dev, dtype)
            lora[name] = (ta, tb, torch.from_numpy(scale).to(dev, dtype), mask, ranks)
        heads = {key: torch.from_numpy(np.stack([np.asarray(job.head[key]) for job in jobs])).to(dev, dtype)
                 .requires_grad_(self.train_head) for key in self.head_keys}
        return lora, heads

    def _modules(self, ctx: CohortContext, lora, heads) -> dict[str, nn.Module]:
        out = {}
        for name, (path, layer) in self.lora.items():
            a, b, scale, mask, _ = lora[name]
            drop = layer.lora_dropout[ADAPTER]
            p = drop.p if isinstance(drop, nn.Dropout) else 0.0
            out[path] = SegmentLoRALinear(layer.get_base_layer(), ctx, a, b, scale, mask, p)
        for path, (inner, keys) in self.heads.items():
            weight = heads[keys["weight"]]
            if isinstance(inner, nn.Embedding):
                out[path] = SegmentEmbedding(ctx, weight, inner.padding_idx)
            else:
                out[path] = SegmentLinear(ctx, weight, heads[keys["bias"]] if "bias" in keys else None)
        return out

    def _forward(self, ctx: CohortContext, step: Step, arrays, evaluate: bool = False):
        """Per-row losses of one concatenated batch: (loss sums, weights), or with `evaluate` the per-row
        evaluation values (`eval_rows`)."""
        inputs, mask, labels = arrays
        ctx.set_layout(step.slots, step.counts, step.lengths, step.slot_index, step.row_pos, step.row_seed,
                       step.row_local)
        rows = step.rows if inputs.device == step.rows.device else step.rows.to(inputs.device)
        batch_labels = widen(labels.index_select(0, rows))
        if self.image:              # the images as the task's batch gives them (the model casts them itself)
            batch = {"pixel_values": inputs.index_select(0, rows)}
        else:                       # the table keeps compact dtypes: widen the selected rows
            batch = {"input_ids": inputs.index_select(0, rows)[:, :ctx.length].long(),
                     "attention_mask": mask.index_select(0, rows)[:, :ctx.length].long()}
            if self.causal:
                batch_labels = batch_labels[:, :ctx.length]
        if batch_labels.device != self.device:
            batch = {key: t.to(self.device, non_blocking=True) for key, t in batch.items()}
            batch_labels = batch_labels.to(self.device, non_blocking=True)
        with self._autocast():
            logits = self.model(**batch).logits
            if evaluate:
                return eval_rows(logits, batch_labels, self.causal)
            return row_losses(logits, batch_labels, self.causal)

    def _train_group(self, jobs: list[ClientJob]) -> list[ClientResult]:
        t0 = time.perf_counter()
        K = len(jobs)
        schedules = [batch_schedule(j.train_idx, j.steps, self.batch_size, j.seed) for j in jobs]
        counter_rng = self.has_dropout and self.device.type == "cuda" and triton_available()
        plan = self._plan(schedules, [int(j.seed) for j in jobs] if counter_rng else None)
        arrays = self._arrays()
        lora, heads = self._stack(jobs, frozenset(jobs[0].train))
        opt, params = self._optimizer(jobs[0].lr_scale or {}, lora, heads)
        ctx = CohortContext(K, self.device, full_length=0 if self.image else int(self.data.input_ids.shape[1]))
        if self.has_dropout and not counter_rng:
            ctx.generators = [torch.Generator(device=self.device).manual_seed(int(j.seed)) for j in jobs]
        loss_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        losses = torch.zeros(len(plan), K, dtype=loss_dtype, device=self.device)
        with installed(self.model, ctx, self._modules(ctx, lora, heads), train=True,
                       per_client_dropout=self.has_dropout):
            for t, step in enumerate(plan):
                values, weights = self._forward(ctx, step, arrays)
                per_client = (per_client_sum(ctx, values.to(loss_dtype))
                              / per_client_sum(ctx, weights.to(loss_dtype)))      # each client's own mean
                if opt is not None:
                    optimizer_step(opt, params, per_client.sum(), step.idle, self.max_grad_norm)
                pos = torch.arange(K, device=self.device) if step.slot_index is None else step.slot_index
                losses[t].index_copy_(0, pos, per_client.detach())
        del opt
        return self._finish(jobs, lora, heads, losses, [len(s) for s in schedules], t0)

    def _optimizer(self, scale: dict[str, float], lora, heads):
        """(optimiser or None, trainable tensors): param groups as in the PEFT engine — one per trained factor
        at lr × lr_scale[factor], the heads at lr."""
        groups = {"a": [t[0] for t in lora.values() if t[0].requires_grad],
                  "b": [t[1] for t in lora.values() if t[1].requires_grad],
                  "head": [t for t in heads.values() if t.requires_grad]}
        groups = [{"params": ps, "lr": self.lr * float(scale.get(name, 1.0))} for name, ps in groups.items() if ps]
        params = [p for g in groups for p in g["params"]]
        return (make_optimizer(self.optimizer_name, groups, self.lr, self.weight_decay) if params else None), params

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
        head_host = {key: t.detach().float().cpu().numpy() for key, t in heads.items()}
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
        K, bs = len(jobs), self.eval_batch_size
        chunks = [[np.asarray(jobs[k].test_idx)[i:i + bs] for i in range(0, len(jobs[k].test_idx), bs)]
                  if k in with_test else [] for k in range(K)]
        arrays = self._arrays()
        sums: dict[str, torch.Tensor] = {}
        ctx = CohortContext(K, self.device)
        with installed(self.model, ctx, self._modules(ctx, lora, heads), train=False, per_client_dropout=False):
            for step in self._plan(chunks):
                pos = torch.arange(K, device=self.device) if step.slot_index is None else step.slot_index
                for key, values in self._forward(ctx, step, arrays, evaluate=True).items():
                    total = sums.setdefault(key, torch.zeros(K, dtype=torch.float64, device=self.device))
                    total.index_add_(0, pos, per_client_sum(ctx, values))
        host = {key: t.cpu().numpy() for key, t in sums.items()}
        ints = ("correct", "count", "tokens")
        return [EvalResult({key: int(v[k]) if key in ints else float(v[k]) for key, v in host.items()})
                if k in with_test else None for k in range(K)]
