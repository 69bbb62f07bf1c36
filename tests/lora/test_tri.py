"""Tri-matrix adapters in a resident PEFT model (raysim/lora/tri.py, docs/algorithms.md, CE-LoRA)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from raysim.aggregators.base import build_aggregator
from raysim.lora.factors import LoRAFactors, fold_core
from raysim.lora.peft_io import get_factors, lora_layers, set_factors
from raysim.lora.tri import TriLoraB, core_of, factor_parameters

M, N, R, ALPHA = 6, 5, 3, 6.0


class Toy(nn.Module):
    """One non-square Linear (m=6, n=5) and a square one, so shapes and orientation are both checked."""

    def __init__(self):
        super().__init__()
        self.query = nn.Linear(N, M)
        self.value = nn.Linear(M, M)

    def forward(self, x):
        return self.value(self.query(x))


def toy_model(rank: int = R):
    torch.manual_seed(0)
    return get_peft_model(Toy(), LoraConfig(r=rank, lora_alpha=ALPHA, target_modules=["query", "value"]))


def random_tri(rng, rank: int = R) -> dict[str, LoRAFactors]:
    shapes = {"query": (M, N), "value": (M, M)}
    return {name: LoRAFactors(a=rng.normal(size=(rank, n)).astype(np.float32),
                              b=rng.normal(size=(m, rank)).astype(np.float32), scale=ALPHA / R,
                              c=rng.normal(size=(rank, rank)).astype(np.float32))
            for name, (m, n) in shapes.items()}


def celora_start(b_zero: bool = False) -> dict[str, LoRAFactors]:
    """Client 0's round-1 start under `celora` (shared-seed frame, C = 0); optionally with PEFT's B = 0."""
    init = {n: LoRAFactors(a=np.zeros((R, k), np.float32), b=np.zeros((M, R), np.float32), scale=ALPHA / R)
            for n, k in (("query", N), ("value", M))}
    agg = build_aggregator("celora", {})
    agg.setup(init, {0: R, 1: R}, lambda r: ALPHA / r, seed=0)
    start = agg.plan(1, 0).start
    if b_zero:
        for f in start.values():
            f.b = np.zeros_like(f.b)
    return start


def test_forward_is_x_w0_plus_s_bca():
    model = toy_model()
    rng = np.random.default_rng(0)
    factors = random_tri(rng)
    set_factors(model, factors)
    x = torch.from_numpy(rng.normal(size=(4, N)).astype(np.float32))
    layers = lora_layers(model)
    q = layers["query"]
    w0 = q.get_base_layer().weight.detach().numpy().astype(np.float64)
    bias = q.get_base_layer().bias.detach().numpy()
    f = factors["query"]
    expected = x.numpy() @ (w0 + f.scale * f.b.astype(np.float64) @ f.c @ f.a).T + bias
    np.testing.assert_allclose(q(x).detach().numpy(), expected, rtol=1e-5, atol=1e-5)
    assert isinstance(q.lora_B["default"], TriLoraB)


def test_get_set_round_trip_and_core_removal():
    model = toy_model()
    rng = np.random.default_rng(1)
    factors = random_tri(rng)
    set_factors(model, factors)
    got = get_factors(model)
    for name, f in factors.items():
        for part in ("a", "b", "c"):
            np.testing.assert_array_equal(getattr(got[name], part), getattr(f, part))
    b_param = lora_layers(model)["query"].lora_B["default"].weight
    x = torch.from_numpy(rng.normal(size=(3, N)).astype(np.float32))
    tri_out = model(x).detach()
    # plain factors with the same ΔW: the core is removed, the forward output is unchanged
    set_factors(model, fold_core(factors))
    assert all(core_of(layer) is None for layer in lora_layers(model).values())
    assert not any("core" in k for k in model.state_dict())          # nothing extra for save_pretrained
    assert get_factors(model)["query"].c is None
    assert lora_layers(model)["query"].lora_B["default"].weight is b_param   # same B parameter throughout
    np.testing.assert_allclose(model(x).detach().numpy(), tri_out.numpy(), rtol=1e-5, atol=1e-5)


def test_lower_rank_client_uses_the_top_left_block():
    model = toy_model(rank=4)
    rng = np.random.default_rng(2)
    factors = random_tri(rng, rank=2)
    set_factors(model, factors)
    core = core_of(lora_layers(model)["value"])
    assert core.shape == (4, 4)
    np.testing.assert_array_equal(core[:2, :2].detach().numpy(), factors["value"].c)
    assert not core[2:].any() and not core[:, 2:].any()
    np.testing.assert_array_equal(get_factors(model, {"query": 2, "value": 2})["value"].c, factors["value"].c)


def _core_grads(start) -> dict[str, float]:
    model = toy_model()
    set_factors(model, start)
    layers = lora_layers(model)
    for layer in layers.values():
        for p in factor_parameters(layer).values():
            p.requires_grad_(True)
    x = torch.from_numpy(np.random.default_rng(3).normal(size=(8, N)).astype(np.float32))
    model(x).pow(2).sum().backward()
    return {name: float(core_of(layer).grad.norm()) for name, layer in layers.items()}


def test_core_has_a_gradient_at_step_zero_with_the_celora_init():
    start = celora_start()
    for f in start.values():
        assert not f.c.any() and f.b.any()                # ΔW = 0 at the start, B ≠ 0
    assert all(g > 1e-6 for g in _core_grads(start).values())


def test_core_has_no_gradient_with_b_zero():
    """Regression test for the init pitfall: PEFT's B = 0 gives ∂L/∂C = s·Bᵀ·G·Aᵀ = 0."""
    assert all(g == 0.0 for g in _core_grads(celora_start(b_zero=True)).values())


@pytest.fixture(scope="module")
def engine():
    from raysim.engines.base import EngineSettings
    from raysim.engines.peft_engine import DataArrays, PeftEngine
    from raysim.lora.peft_io import wrap_lora
    from raysim.models import build_base_model

    model = wrap_lora(build_base_model("random:bert-tiny", 4, 0), 4, 8, ["query", "value"], 0.0, 0)
    rng = np.random.default_rng(0)
    arrays = {"input_ids": rng.integers(1, 1000, size=(8, 8)), "attention_mask": np.ones((8, 8), np.int64),
              "labels": rng.integers(0, 4, size=8)}
    settings = EngineSettings(optimizer="adam", lr=1e-2, weight_decay=0.0, batch_size=8, max_grad_norm=None,
                              train_head=True, eval_batch_size=8)
    return PeftEngine(model, DataArrays(arrays, torch.device("cpu")), settings)


def _one_step(engine, train, lr_scale=None):
    """One Adam step from a start with C ≠ 0: every tensor with a gradient moves by exactly its group's lr."""
    from raysim.engines.base import ClientJob
    from raysim.lora.peft_io import get_head

    rng = np.random.default_rng(4)
    start = {name: LoRAFactors(a=rng.uniform(-0.1, 0.1, size=f.a.shape).astype(np.float32),
                               b=rng.uniform(-0.5, 0.5, size=f.b.shape).astype(np.float32), scale=2.0,
                               c=rng.uniform(-0.5, 0.5, size=(4, 4)).astype(np.float32))
             for name, f in get_factors(engine.model).items()}
    job = ClientJob(client_id=0, round=1, seed=0, train_idx=np.arange(8), test_idx=None, start=start,
                    head=get_head(engine.model), train=frozenset(train), steps=1, lr_scale=lr_scale or {})
    result = engine.train_client(job)
    return {part: max(float(np.abs(getattr(f, part) - getattr(start[n], part)).max()) for n, f in
                      result.factors.items()) for part in ("a", "b", "c")}


def test_engine_trains_only_c_when_asked(engine):
    moved = _one_step(engine, {"c"})
    assert moved["a"] == moved["b"] == 0.0                      # bitwise unchanged
    assert moved["c"] == pytest.approx(1e-2, rel=1e-3)


def test_engine_learning_rate_groups_scale_a_and_b(engine):
    """ab_lr_scale-style multipliers: A and B step at 0.1·lr, C at lr (Adam's first step has size lr)."""
    moved = _one_step(engine, {"a", "b", "c"}, {"a": 0.1, "b": 0.1})
    assert moved["a"] == pytest.approx(1e-3, rel=1e-3) and moved["b"] == pytest.approx(1e-3, rel=1e-3)
    assert moved["c"] == pytest.approx(1e-2, rel=1e-3)
