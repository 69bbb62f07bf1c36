"""CE-LoRA end to end on the tiny config (session Ray, 2 workers): personalised accuracy and C-only
communication measured in rounds.parquet and updates/. (The client-local state's checkpoint round trip
is tested on the aggregator, tests/aggregators/test_celora.py; resume itself in test_simulation.py.)"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file

from raysim.runner import run_experiment

pytestmark = pytest.mark.ray

CELORA = {"aggregator.name": "celora"}
MODULES, RANK, HIDDEN, LABELS = 4, 4, 128, 4          # tiny.yaml: bert-tiny (2 layers × query, value), r = 4
HEAD = HIDDEN * LABELS + LABELS                         # classifier weight + bias, averaged in every method


@pytest.fixture(scope="module")
def _runs():
    return {}


@pytest.fixture
def celora_run(_runs, ray_local, tmp_path_factory, tiny_config):
    """The 3-round celora run, run once for this module."""
    if "celora" not in _runs:
        out = tmp_path_factory.mktemp("celora")
        run_experiment(tiny_config(**CELORA, **{"output.save_updates": "true"}), out, progress=False)
        _runs["celora"] = out
    return _runs["celora"]


def test_celora_run_is_personalised_and_sends_only_c(celora_run):
    df = pd.read_parquet(celora_run / "rounds.parquet")
    clients = pd.read_parquet(celora_run / "clients.parquet")
    assert list(df["round"]) == [1, 2, 3]
    assert df["personalized_accuracy"].notna().all()             # on by default for this method
    assert df["deviation_rel"].isna().all()                      # personalised: no single applied update
    assert df["accuracy"].notna().all()                          # global model: shared frame with C̄
    assert (df["clients_completed"] == df["clients_sampled"]).all()
    assert df["agg_self_weight_mean"].between(0, 1).all()

    # bytes per client: r² per module + head up (+ the descriptor, num_labels scalars, on a client's first
    # upload); r² per module + head down (+ 1 scalar, the frame's shared seed, on its first download)
    first_up = clients[clients["status"] == "ok"].groupby("client_id")["round"].min()
    for rnd, group in clients[clients["status"] == "ok"].groupby("round"):
        news = int((first_up == rnd).sum())
        row = df[df["round"] == rnd].iloc[0]
        assert row["bytes_up"] == 4 * (len(group) * (MODULES * RANK ** 2 + HEAD) + news * LABELS)
        assert row["agg_descriptors_received"] == news
        assert set(group["bytes_up"]) <= {4 * (MODULES * RANK ** 2 + HEAD), 4 * (MODULES * RANK ** 2 + HEAD + LABELS)}
    assert df["bytes_down"].iloc[0] == 4 * df["clients_sampled"].iloc[0] * (MODULES * RANK ** 2 + HEAD + 1)

    # what crossed the wire: C (r × r) per module, and the descriptor only in a client's first upload
    for rnd in (1, 2, 3):
        for path in sorted((celora_run / "updates" / f"round-{rnd:04d}").glob("client-*.safetensors")):
            tensors = load_file(str(path))
            first = first_up[int(path.stem.split("-")[1])] == rnd
            assert {k.rsplit(".", 1)[-1] for k in tensors} == ({"lora_C", "descriptor"} if first else {"lora_C"})
            assert sum(v.shape == (RANK, RANK) for k, v in tensors.items() if k.endswith("lora_C")) == MODULES
            if first:
                assert tensors["descriptor"].sum() == pytest.approx(1.0)
    glob = load_file(str(celora_run / "updates" / "round-0003" / "global.safetensors"))
    assert sum(k.endswith("lora_C") for k in glob) == MODULES
    adapter = load_file(str(celora_run / "adapter" / "adapter_model.safetensors"))
    assert not any("core" in k or "lora_C" in k for k in adapter)          # exported with C folded into B


def test_celora_uploads_r_over_m_plus_n_of_fedit(celora_run):
    """docs/algorithms.md, "Communication accounting": fedit sends r(m+n) per module and client (+ head), celora r² (+ head, + d_k once);
    the LoRA part of celora's measured upload is r/(m+n) of fedit's (m = n = 128 here)."""
    df = pd.read_parquet(celora_run / "rounds.parquet")
    for _, row in df.iterrows():
        k = int(row["clients_completed"])
        fedit = 4 * k * (MODULES * RANK * (2 * HIDDEN) + HEAD)
        head, descriptors = 4 * k * HEAD, 4 * int(row["agg_descriptors_received"]) * LABELS
        assert row["bytes_up"] - head - descriptors == RANK / (2 * HIDDEN) * (fedit - head)
        assert row["bytes_up"] <= RANK / (2 * HIDDEN) * fedit + head + descriptors
        assert row["bytes_up"] < fedit / 4
