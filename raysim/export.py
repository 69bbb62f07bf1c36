"""Make an exported adapter directory portable: no path of this machine in the files PEFT reads.

PEFT's `save_pretrained` records the base model as the directory the worker loaded it from (for the
embedded model a path inside this virtualenv's site-packages). `portable_adapter_files` rewrites that to
a name another machine can resolve (`raysim.models.portable_base_name`) and adds `raysim.json`, raysim's
record of the run's base: the config's model name, the local path, the task, the number of labels and the
seed. It is a separate file because PEFT warns about (and ignores) unknown keys in adapter_config.json.
How to load the result elsewhere, per task type: docs/adapters.md.
"""

from __future__ import annotations

import json
from typing import Any

from raysim.models import portable_base_name

RAYSIM_FILE = "raysim.json"


def portable_adapter_files(files: dict[str, bytes], cfg: Any, num_labels: int | None = None,
                           base_delta: bool = False) -> dict[str, bytes]:
    """The adapter files (as returned by the worker's export) with a portable base model name.

    adapter_config.json: `base_model_name_or_path` becomes the portable name. README.md (PEFT's model
    card): the local path becomes the portable name. raysim.json: added (see the module docstring);
    `num_labels`: the classes of seq_cls/image_cls (regression records 1, causal_lm none); `base_delta`:
    whether base_delta.safetensors is written next to the adapter (FedEx-LoRA, FLoRA).
    """
    name, extra = portable_base_name(cfg.model.name)
    conf = json.loads(files["adapter_config.json"])
    conf["base_model_name_or_path"] = name
    out = dict(files)
    out["adapter_config.json"] = (json.dumps(conf, indent=2, sort_keys=True) + "\n").encode()
    local = extra.get("raysim_base_model_path")
    if "README.md" in out and local:
        out["README.md"] = out["README.md"].replace(local.encode(), name.encode())
    outputs = {"regression": 1, "causal_lm": None}.get(cfg.task.type, num_labels)   # the head's outputs
    record = {"base_model": name, **extra, "task": cfg.task.type, "num_labels": outputs, "seed": cfg.seed,
              "base_delta": "base_delta.safetensors" if base_delta else None}
    out[RAYSIM_FILE] = (json.dumps(record, indent=2) + "\n").encode()
    return out
