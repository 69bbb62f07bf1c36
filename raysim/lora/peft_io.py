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

from raysim.lora.factors import Factors, LoRAFactors
from raysim.lora.tri import get_core, set_core

ADAPTER = "default"
PREFIX = "base_model.model."


def wrap_lora(model: torch.nn.Module, rank: int, alpha: float, target_modules: list[str], dropout: float,
              seed: int) -> PeftModel:
    """PEFT-wrap a sequence classifier with LoRA of rank `rank` (the maximum client rank)."""
    torch.manual_seed(seed)                        # identical A init on every worker
    cfg = LoraConfig(task_type=TaskType.SEQ_CLS, r=rank, lora_alpha=alpha, lora_dropout=dropout,
                     target_modules=list(target_modules))
    return get_peft_model(model, cfg)


def lora_layers(model: PeftModel) -> dict[str, LoraLayer]:
    """Canonical module name -> PEFT LoRA layer, in model order."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            out[name.removeprefix(PREFIX)] = module
    return out


def head_parameters(model: PeftModel) -> dict[str, torch.nn.Parameter]:
    """Trainable non-LoRA parameters (the classifier head in modules_to_save), canonical names.

    `classifier.modules_to_save.default.weight` -> `classifier.weight` (the name PEFT saves it under).
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
        a = layer.lora_A[ADAPTER].weight                     # (r_max, n)
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
