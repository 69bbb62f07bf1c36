"""Generic checkpoint encoding of an aggregator's declared state (numpy arrays + JSON metadata).

`Aggregator.state_dict()` encodes every attribute named in `global_state` and `client_state` with
`encode`; `load_state_dict()` rebuilds them with `decode`. A value may be a `LoRAFactors`, a numpy
array, a JSON scalar (None, bool, int, float, str), or a dict (str or int keys), tuple or list of
such values, nested freely: `Factors` (module -> LoRAFactors), client id -> Factors, module ->
(Y, σ, Z), client id -> int, ... Arrays go into the tensors dict under a name built from the path
to them: `<attribute>/<key>/<key>` and, for factors, `.lora_A`, `.lora_B`, `.lora_C`, e.g.
`global_factors/layer.q.lora_A` or `client_c/3/layer.q`. The metadata says how to put them together
again; it keeps int keys (client ids) as ints. Arrays keep their dtype, so a round trip is exact.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raysim.lora.factors import LoRAFactors

JSON_SCALARS = (type(None), bool, int, float, str)
PARTS = {"a": "lora_A", "b": "lora_B", "c": "lora_C"}


def encode(value: Any, path: str, tensors: dict[str, np.ndarray]) -> dict[str, Any]:
    """JSON description of `value`; its arrays are added to `tensors` under names derived from `path`."""
    if isinstance(value, LoRAFactors):
        for part, suffix in PARTS.items():
            if getattr(value, part) is not None:
                tensors[f"{path}.{suffix}"] = np.ascontiguousarray(getattr(value, part))
        return {"factors": float(value.scale)}
    if isinstance(value, np.ndarray):
        tensors[path] = np.ascontiguousarray(value)
        return {"array": None}
    if isinstance(value, dict):
        return {"dict": [[_json_key(k, path), encode(v, f"{path}/{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, (tuple, list)):
        kind = "tuple" if isinstance(value, tuple) else "list"
        return {kind: [encode(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, JSON_SCALARS):
        return {"value": value}
    raise TypeError(f"aggregator state {path!r}: cannot checkpoint a {type(value).__name__}")


def decode(node: dict[str, Any], path: str, tensors: dict[str, np.ndarray]) -> Any:
    """The value `encode` described as `node`, with copies of its arrays from `tensors`."""
    (kind, payload), = node.items()
    if kind == "factors":
        arrays = {part: np.array(tensors[f"{path}.{suffix}"]) for part, suffix in PARTS.items()
                  if f"{path}.{suffix}" in tensors}
        return LoRAFactors(scale=float(payload), **arrays)
    if kind == "array":
        return np.array(tensors[path])
    if kind == "dict":
        return {k: decode(v, f"{path}/{k}", tensors) for k, v in payload}
    if kind in ("tuple", "list"):
        items = [decode(v, f"{path}/{i}", tensors) for i, v in enumerate(payload)]
        return tuple(items) if kind == "tuple" else items
    if kind == "value":
        return payload
    raise ValueError(f"aggregator state {path!r}: unknown entry {kind!r} in the checkpoint")


def _json_key(key: Any, path: str) -> int | str:
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return int(key)
    if isinstance(key, str) and "/" not in key:
        return key
    raise TypeError(f"aggregator state {path!r}: dict keys must be ints or strings without '/' (got {key!r})")
