"""PEFT import/export of canonical factors, and the one function that writes frozen base weights.

Module names are PEFT module paths without the `base_model.model.` prefix, e.g.
`bert.encoder.layer.0.attention.self.query`. Factors move in and out of a resident PEFT model in
place (`copy_` into existing parameters); a client of rank r_k < r_max uses the first r_k slots
and the surplus slots are zero in both factors, so their gradients are zero and they never move.
"""

from __future__ import annotations

import numpy as np
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils.constants import EMBEDDING_LAYER_NAMES

from raysim.lora.factors import Factors, LoRAFactors
from raysim.lora.tri import get_core, set_core

ADAPTER = "default"
PREFIX = "base_model.model."


def wrap_lora(model: torch.nn.Module, rank: int, alpha: float, target_modules: list[str], dropout: float,
              seed: int, task_type: str = "SEQ_CLS", modules_to_save: list[str] | None = None) -> PeftModel:
    """PEFT-wrap a base model with LoRA of rank `rank` (the maximum client rank).

    task_type: PEFT's `SEQ_CLS` (it adds the classifier to modules_to_save itself) or `CAUSAL_LM`; the
    config's `seq_cls` / `causal_lm` are accepted too. modules_to_save: modules trained in full and shared
    like the classifier (None or []: nothing beyond what the task type adds). Targets that are all GPT-2
    `Conv1D`s get `fan_in_fan_out=True` (their weight is stored (in, out)).

    Tied embeddings (the LM head shares the input embedding matrix, as in Llama-3.2-1B or Qwen2-0.5B):
    naming either module trains ONE full copy that stays shared by both, as in the base model (PEFT's
    `ensure_weight_tying`). `head_parameters` lists it once, under the input embedding's name; PEFT's
    adapter file stores it under both names and re-ties it when the adapter is loaded.
    """
    torch.manual_seed(seed)                        # identical A init on every worker
    targets = list(target_modules)
    saved, tie = _saved_modules(model, modules_to_save)
    cfg = LoraConfig(task_type=TaskType(task_type.upper()) if task_type else None, r=rank, lora_alpha=alpha,
                     lora_dropout=dropout, target_modules=targets, fan_in_fan_out=_targets_are_conv1d(model, targets),
                     modules_to_save=saved, ensure_weight_tying=tie)
    return get_peft_model(model, cfg)


def _matches(module_name: str, pattern: str) -> bool:
    """PEFT's rule for a list of target names: the full name or its dotted suffix."""
    return module_name == pattern or module_name.endswith("." + pattern)


def _targets_are_conv1d(model: torch.nn.Module, targets: list[str]) -> bool:
    hits = [m for name, m in model.named_modules() if any(_matches(name, t) for t in targets)]
    return bool(hits) and all(is_fan_in_fan_out(m) for m in hits)


def has_tied_embeddings(model: torch.nn.Module) -> bool:
    """True when the model's LM head uses the input embedding matrix itself."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return out is not None and out.weight is model.get_input_embeddings().weight


def _module_name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _saved_modules(model: torch.nn.Module, names: list[str] | None) -> tuple[list[str] | None, bool]:
    """modules_to_save for PEFT and whether PEFT must keep the embedding tie (see `wrap_lora`)."""
    if not names:
        return None, False
    names = list(names)
    if not has_tied_embeddings(model):
        return names, False
    embed = _module_name(model, model.get_input_embeddings())
    head = _module_name(model, model.get_output_embeddings())
    if not any(_matches(embed, n) or _matches(head, n) for n in names):
        return names, False
    head_leaf = head.rsplit(".", 1)[-1]
    if head_leaf not in EMBEDDING_LAYER_NAMES:
        raise ValueError(f"lora.modules_to_save: {names} includes the tied embedding/LM head ({embed}, {head}), "
                         f"which this model type cannot keep tied; leave them out")
    if not any(_matches(head, n) for n in names):
        names.append(head_leaf)                  # PEFT recognises the tie by the LM head's name
    return names, True


def module_shape(layer: LoraLayer) -> tuple[int, int]:
    """(m, n) = (out, in) of an adapted module in nn.Linear orientation, also for GPT-2's Conv1D (whose
    weight is stored (in, out)): read from the factors, B (m, r) and A (r, n)."""
    return int(layer.lora_B[ADAPTER].weight.shape[0]), int(layer.lora_A[ADAPTER].weight.shape[1])


def lora_layers(model: PeftModel) -> dict[str, LoraLayer]:
    """Canonical module name -> PEFT LoRA layer, in model order."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            out[name.removeprefix(PREFIX)] = module
    return out


def head_parameters(model: PeftModel) -> dict[str, torch.nn.Parameter]:
    """Trainable non-LoRA parameters (modules_to_save: the classifier head; a decoder's input embeddings and
    LM head), canonical names: `classifier.modules_to_save.default.weight` -> `classifier.weight`,
    `model.embed_tokens.modules_to_save.default.weight` -> `model.embed_tokens.weight` (the names PEFT
    saves them under). A tied embedding/LM-head copy is one parameter, listed once (as the embedding).
    """
    out = {}
    for name, p in model.named_parameters():
        if "modules_to_save" in name:
            canonical = name.removeprefix(PREFIX).replace(f"modules_to_save.{ADAPTER}.", "")
            out[canonical] = p
    return out


@torch.no_grad()
def get_factors(model: PeftModel, ranks: dict[str, int] | None = None) -> Factors:
    """Current factors as float32 numpy copies; `ranks` limits each module to its first r slots."""
    out = {}
    for name, layer in lora_layers(model).items():
        a = layer.lora_A[ADAPTER].weight                     # (r_max, n), nn.Linear orientation (Conv1D too)
        b = layer.lora_B[ADAPTER].weight                     # (m, r_max)
        r = a.shape[0] if ranks is None else ranks[name]
        out[name] = LoRAFactors(a=a[:r].float().cpu().numpy().copy(), b=b[:, :r].float().cpu().numpy().copy(),
                                scale=float(layer.scaling[ADAPTER]), c=get_core(layer, r, ADAPTER))
    return out


@torch.no_grad()
def set_factors(model: PeftModel, factors: Factors) -> None:
    """Load factors in place: slots [:r_k] from `factors`, surplus slots zero, scaling set per module."""
    layers = lora_layers(model)
    for name, f in factors.items():
        layer = layers[name]
        a = layer.lora_A[ADAPTER].weight
        b = layer.lora_B[ADAPTER].weight
        r = f.rank
        if r > a.shape[0]:
            raise ValueError(f"{name}: client rank {r} exceeds the model's LoRA rank {a.shape[0]}")
        a.zero_()
        b.zero_()
        a[:r].copy_(torch.from_numpy(np.ascontiguousarray(f.a, dtype=np.float32)))
        b[:, :r].copy_(torch.from_numpy(np.ascontiguousarray(f.b, dtype=np.float32)))
        set_core(layer, f.c, ADAPTER)                # tri-matrix core C (CE-LoRA), removed when f.c is None
        layer.scaling[ADAPTER] = float(f.scale)


def get_head(model: PeftModel) -> dict[str, np.ndarray]:
    return {k: p.detach().float().cpu().numpy().copy() for k, p in head_parameters(model).items()}


@torch.no_grad()
def set_head(model: PeftModel, head: dict[str, np.ndarray]) -> None:
    params = head_parameters(model)
    for k, v in head.items():
        params[k].copy_(torch.from_numpy(np.ascontiguousarray(v)))


def is_fan_in_fan_out(module: torch.nn.Module) -> bool:
    """True for layers that store their weight as (in, out), e.g. GPT-2's Conv1D."""
    return type(module).__name__ == "Conv1D"


@torch.no_grad()
def fold_into_base(module: torch.nn.Module, delta: torch.Tensor | np.ndarray) -> None:
    """W_base += R for R in nn.Linear orientation (m, n) = (out, in). The only writer of base weights.

    Transposes iff the module stores (in, out) (fan_in_fan_out, Conv1D); asserts the shape after
    that, so a square nn.Linear never silently receives Rᵀ (docs/algorithms.md, "Changing the frozen base").
    """
    base = module.get_base_layer() if isinstance(module, LoraLayer) else module
    r = torch.as_tensor(np.asarray(delta)) if isinstance(delta, np.ndarray) else delta
    if is_fan_in_fan_out(base):
        r = r.T
    w = base.weight
    if tuple(r.shape) != tuple(w.shape):
        raise ValueError(f"base delta of shape {tuple(r.shape)} does not match weight {tuple(w.shape)}")
    # accumulate in float32 at least (a bf16 base would round small residuals away)
    acc = torch.promote_types(w.dtype, torch.float32)
    w.copy_((w.to(acc) + r.to(device=w.device, dtype=acc)).to(w.dtype))
