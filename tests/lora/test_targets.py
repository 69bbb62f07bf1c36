"""lora.target_modules checks (raysim.lora.targets): the table of layer names matches the real models."""

from __future__ import annotations

import pytest
import torch

from raysim.lora.targets import LINEAR_NAMES, check_target_modules
from raysim.models import architecture, build_base_model

MODELS = [("random:bert-tiny", "seq_cls"), ("random:llama-tiny", "causal_lm"), ("random:gpt2-tiny", "causal_lm"),
          ("random:vit-tiny", "image_cls"), ("random:mixer-tiny", "image_cls")]


@pytest.mark.parametrize("name, task", MODELS)
def test_the_table_lists_exactly_the_linear_layers_of_each_family(name, task):
    model = build_base_model(name, 3, 0, task=task)
    leaves = {k.rsplit(".", 1)[-1] for k, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"}
    assert leaves == set(LINEAR_NAMES[architecture(name)])


def test_full_and_short_names_pass_unknown_names_fail():
    check_target_modules(["query", "attention.self.value"], "bert")
    check_target_modules(["anything"], "some-unlisted-family")         # left to the workers
    with pytest.raises(ValueError, match="lora.target_modules: 'q_proj'"):
        check_target_modules(["q_proj"], "bert")
