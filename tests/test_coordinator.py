"""Coordinator decisions that need no Ray: which head a client starts from, and what the head costs."""

from __future__ import annotations

import numpy as np
import pytest

from raysim.coordinator import CoordinatorImpl, frozen_changed
from raysim.lora.factors import LoRAFactors


def _coordinator(tiny_config, policy: str) -> CoordinatorImpl:
    c = CoordinatorImpl.__new__(CoordinatorImpl)            # only the head state, no pool
    c.cfg = tiny_config(**{"lora.head_policy": policy})
    c.initial_head = {"classifier.weight": np.zeros((2, 3))}
    c.head = {"classifier.weight": np.ones((2, 3))}
    c.client_heads = {1: {"classifier.weight": np.full((2, 3), 7.0)}}
    return c


def test_a_local_head_starts_from_the_clients_own_head(tiny_config):
    c = _coordinator(tiny_config, "local")
    assert c._head_for(1) is c.client_heads[1]               # its own head from its last round
    assert c._head_for(2) is c.initial_head                  # never trained: the initial head, not the average
    assert c._head_numel() == 0                              # nothing on the wire


@pytest.mark.parametrize("train_head,numel", [(True, 6), (False, 0)])
def test_a_fedavg_head_is_the_global_one(tiny_config, train_head, numel):
    c = _coordinator(tiny_config, "fedavg")
    c.cfg = tiny_config(**{"lora.train_head": train_head})
    assert c._head_for(1) is c.head and c._head_for(2) is c.head
    assert c._head_numel() == numel


def test_frozen_changed_names_every_frozen_factor_that_moved():
    rng = np.random.default_rng(0)
    start = {m: LoRAFactors(a=rng.standard_normal((2, 5)).astype(np.float32), b=np.zeros((4, 2), np.float32),
                            scale=2.0) for m in ("q", "v")}
    end = {m: LoRAFactors(a=f.a.copy(), b=f.b + 1, scale=f.scale) for m, f in start.items()}
    assert frozen_changed(start, end, frozenset({"b"})) == []            # FFA: B trained, A bitwise equal
    end["v"].a[1, 3] = np.nextafter(end["v"].a[1, 3], np.float32(9))    # one ulp in one entry
    assert frozen_changed(start, end, frozenset({"b"})) == ["v.a"]
    assert frozen_changed(start, end, frozenset({"a"})) == ["q.b", "v.b"]   # RoLoRA A-phase: B must not move
    assert frozen_changed(start, end, frozenset({"a", "b"})) == []
