"""Tri-matrix LoRA, ΔW = s·B·C·A (docs/algorithms.md, CE-LoRA), inside a resident PEFT model.

PEFT's LoRA forward computes `lora_B(lora_A(dropout(x))) * scaling`. A tri-matrix layer replaces
`lora_B[adapter]` by a `TriLoraB`: an `nn.Linear` that shares the original B parameter (`.weight`,
(m, r)) and adds a dense core `.core` = C (r, r), so that its forward is `B(C(h))` and the layer
computes `x·W0ᵀ + s·x·Aᵀ·Cᵀ·Bᵀ`, i.e. ΔW = s·B·C·A. Everything else that reads
`lora_B[adapter].weight` (factor I/O, engines) keeps working unchanged.

The core is installed only while factors with a `c` are loaded (`set_core(layer, c)`), and removed
again when factors without one are loaded (`set_core(layer, None)`): the model is plain PEFT LoRA for
every other method, and `save_pretrained` never sees a core (export folds C into B instead, see
`raysim.lora.factors.fold_core`). A client of rank r_k < r_max uses the top-left r_k × r_k block of
the core; the rest is zero.

Gradients (G = ∂L/∂W): ∂L/∂C = s·Bᵀ·G·Aᵀ, ∂L/∂B = s·G·Aᵀ·Cᵀ, ∂L/∂A = s·Cᵀ·Bᵀ·G. With PEFT's B = 0,
C would never receive a gradient; CE-LoRA therefore starts from a non-zero shared-seed B and C = 0.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn



class TriLoraB(nn.Linear):
    """`lora_B` with a core: forward(h) = B·(C·h). Shares `weight` (B) with the module it replaces."""

    def __init__(self, plain: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = plain.in_features, plain.out_features
        self.weight = plain.weight                                   # the same Parameter object
        self.bias = plain.bias
        r = plain.in_features
        self.core = nn.Parameter(torch.zeros(r, r, dtype=plain.weight.dtype, device=plain.weight.device),
                                 requires_grad=plain.weight.requires_grad)
        self.plain = [plain]               # the original module, restored by `remove_core` (not a submodule)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(h, self.core.to(h.dtype)), self.weight, self.bias)


def core_of(layer, adapter: str = "default") -> nn.Parameter | None:
    """The layer's C (r_max, r_max), or None when no core is installed."""
    mod = layer.lora_B[adapter]
    return mod.core if isinstance(mod, TriLoraB) else None


def install_core(layer, adapter: str = "default") -> nn.Parameter:
    """Give the layer a zero core (idempotent); returns it."""
    mod = layer.lora_B[adapter]
    if not isinstance(mod, TriLoraB):
        mod = TriLoraB(mod)
        layer.lora_B[adapter] = mod
    return mod.core


def remove_core(layer, adapter: str = "default") -> None:
    """Back to plain LoRA (idempotent): the original lora_B module, with its current B, returns."""
    mod = layer.lora_B[adapter]
    if isinstance(mod, TriLoraB):
        layer.lora_B[adapter] = mod.plain[0]


@torch.no_grad()
def set_core(layer, c: np.ndarray | None, adapter: str = "default") -> None:
    """Load C in place (block [:r, :r], zero elsewhere), installing the core; None removes it."""
    if c is None:
        remove_core(layer, adapter)
        return
    core = install_core(layer, adapter)
    r = c.shape[0]
    if c.shape != (r, r) or r > core.shape[0]:
        raise ValueError(f"core of shape {c.shape} does not fit the layer's LoRA rank {core.shape[0]}")
    core.zero_()
    core[:r, :r].copy_(torch.from_numpy(np.ascontiguousarray(c, dtype=np.float32)))


@torch.no_grad()
def get_core(layer, rank: int, adapter: str = "default") -> np.ndarray | None:
    core = core_of(layer, adapter)
    return None if core is None else core[:rank, :rank].float().cpu().numpy().copy()


def factor_parameters(layer, adapter: str = "default") -> dict[str, nn.Parameter]:
    """{'a': A, 'b': B, 'c': C (only when a core is installed)}: the tensors a plan can train."""
    out = {"a": layer.lora_A[adapter].weight, "b": layer.lora_B[adapter].weight}
    core = core_of(layer, adapter)
    if core is not None:
        out["c"] = core
    return out
