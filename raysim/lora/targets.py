"""`lora.target_modules` checked against the model's layer names before Ray starts (without loading torch).

PEFT matches a target `t` to every module whose name is `t` or ends in `.t`, so what must exist is the
last dotted part of each target among the names of the model's linear layers. The names are known per
model family (the `model_type` of its config); for a family not listed here the check is left to the
workers, which report a missing module when they wrap the model.
"""

from __future__ import annotations

_ENCODER = ("query", "key", "value", "dense", "classifier")
_LLAMA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")

LINEAR_NAMES: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "camembert", "electra"), _ENCODER),
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"), _LLAMA),
    "gpt2": ("c_attn", "c_proj", "c_fc", "lm_head"),
    "vit": ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2", "classifier"),
    "mixer": ("fc1", "fc2", "head"),
}


def check_target_modules(targets: list[str], family: str) -> None:
    """Raise ValueError naming lora.target_modules when a target matches no linear layer of `family`."""
    names = LINEAR_NAMES.get(family)
    if names is None:
        return
    missing = [t for t in targets if t.rsplit(".", 1)[-1] not in names]
    if missing:
        raise ValueError(f"lora.target_modules: {', '.join(map(repr, missing))} match no linear layer of this "
                         f"{family} model; its linear layers are named: {', '.join(names)}")
