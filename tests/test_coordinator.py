"""Coordinator decisions that need no Ray: which head a client starts from, and what the head costs."""

from __future__ import annotations

import numpy as np
import pytest

from raysim.coordinator import CoordinatorImpl


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
