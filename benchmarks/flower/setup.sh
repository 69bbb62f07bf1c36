#!/usr/bin/env bash
# Build benchmarks/flower/.venv: Flower's simulation engine + the same torch/transformers/peft as raysim.
#
# A separate virtualenv because flwr[simulation] pins its own Ray (flwr 1.42.0 -> ray 2.55.1) and
# protobuf < 7, which conflict with raysim's lock (ray 2.60.0, protobuf 7). raysim is installed
# without its dependencies, only so that flower_tiny.py can import raysim's synthetic-data
# generator, partitioner and `random:bert-tiny` builder (pure numpy/pydantic/torch code, no Ray).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
FLWR_VERSION=${FLWR_VERSION:-1.42.0}
LOCK=../../requirements-lock.txt
pin() { grep -i "^$1==" "$LOCK"; }   # raysim's locked version of a package

"$PY" -m venv .venv
. .venv/bin/activate
pip install --upgrade pip >/dev/null
pip install "torch==2.13.0+cpu"
pip install "flwr[simulation]==${FLWR_VERSION}" "$(pin transformers)" "$(pin peft)" \
    "$(pin safetensors)" "$(pin tokenizers)" "$(pin pydantic)" "$(pin pydantic_core)"
pip install --no-deps -e ../..
python - <<'PY'
import flwr, peft, ray, torch, transformers
from raysim.data.sources import make_synthetic  # noqa: F401  (raysim's data generator imports)
print(f"flwr {flwr.__version__}, ray {ray.__version__}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, peft {peft.__version__}")
PY
echo "setup done: $(pwd)/.venv"
