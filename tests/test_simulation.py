"""End-to-end simulations of the tiny config on a session-scoped local Ray with 2 workers.

Checked from the files a user gets: rounds.parquet (deviation, bytes), clients.parquet, the saved
adapter (reloaded with PeftModel.from_pretrained), updates/ (the aggregation re-checked in numpy),
checkpoints (resume == uninterrupted run), and fault handling.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from raysim.checkpoint import load_checkpoint
from raysim.client_store import ClientStore
from raysim.runner import run_experiment

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def runs(tiny_config):
    """Run directories shared by the tests of this module (each config runs once)."""
    return {"_config": tiny_config}


def _run(ray_local, runs, tmp_path_factory, key, **overrides):
    if key not in runs:
        cfg = runs["_config"](**overrides)
        out = tmp_path_factory.mktemp(key)
        run_experiment(cfg, out, progress=False)
        runs[key] = out
    return runs[key]


def rounds(run_dir) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "rounds.parquet")


def test_fedex_is_exact_every_round_and_fedit_is_not(ray_local, runs, tmp_path_factory):
    fedex = rounds(_run(ray_local, runs, tmp_path_factory, "fedex", **{"aggregator.name": "fedex",
                                                                      "output.save_updates": "true"}))
    fedit = rounds(_run(ray_local, runs, tmp_path_factory, "fedit", **{"output.save_updates": "true"}))
    assert list(fedex["round"]) == [1, 2, 3]
    assert (fedex["deviation_rel"] < 1e-5).all()
    assert (fedit["deviation_rel"] > 1e-4).all()                  # non-IID clients (Dirichlet 0.3)
    for df in (fedex, fedit):
        assert df["accuracy"].between(0, 1).all() and df["loss"].notna().all()
        assert (df["clients_completed"] == 4).all() and (df["clients_failed"] == 0).all()


def test_modules_parquet_holds_each_modules_deviation(ray_local, runs, tmp_path_factory):
    """modules.parquet: one row per module and round, each equal to a dense float64 recomputation from the saved
    uploads (FedIT: ‖Σ p_k s B_k A_k − s B_g A_g‖ / ‖Σ p_k s B_k A_k‖), and together they give the round's
    deviation_rel."""
    from safetensors.numpy import load_file
    from safetensors import safe_open

    run = _run(ray_local, runs, tmp_path_factory, "fedit", **{"output.save_updates": "true"})
    mods, by_round = pd.read_parquet(run / "modules.parquet"), rounds(run).set_index("round")
    assert sorted(mods["round"].unique()) == [1, 2, 3] and mods.groupby("round").size().eq(4).all()
    for rnd, part in mods.groupby("round"):
        folder = run / "updates" / f"round-{rnd:04d}"
        glob = load_file(folder / "global.safetensors")
        clients = []
        for path in sorted(folder.glob("client-*.safetensors")):
            with safe_open(str(path), "np") as f:
                meta = f.metadata()
            clients.append((float(meta["weight"]), float(meta["scale"]), load_file(path)))
        scale = clients[0][1]
        for _, row in part.iterrows():
            name = row["module"]
            ideal = sum(p * s * c[f"{name}.lora_B"].astype(np.float64) @ c[f"{name}.lora_A"].astype(np.float64)
                        for p, s, c in clients)
            applied = scale * glob[f"{name}.lora_B"].astype(np.float64) @ glob[f"{name}.lora_A"].astype(np.float64)
            assert row["ideal_norm"] == pytest.approx(np.linalg.norm(ideal), rel=1e-5)
            assert row["deviation_rel"] == pytest.approx(np.linalg.norm(ideal - applied) / np.linalg.norm(ideal),
                                                         rel=1e-4)
        total = np.sqrt(((part["deviation_rel"] * part["ideal_norm"]) ** 2).sum() / (part["ideal_norm"] ** 2).sum())
        assert total == pytest.approx(by_round.loc[rnd, "deviation_rel"], rel=1e-9)


def test_bytes_match_the_communication_formulas(ray_local, runs, tmp_path_factory):
    fedit = rounds(_run(ray_local, runs, tmp_path_factory, "fedit", **{"output.save_updates": "true"}))
    fedex = rounds(_run(ray_local, runs, tmp_path_factory, "fedex", **{"aggregator.name": "fedex",
                                                                      "output.save_updates": "true"}))
    r, m, n, modules, k = 4, 128, 128, 4, 4              # bert-tiny: 2 layers × {query, value}, 128×128
    head = 4 * 128 + 4
    per_client = (r * (m + n) * modules + head) * 4      # float32 on the wire
    assert (fedit["bytes_up"] == k * per_client).all()
    assert (fedit["bytes_down"] == k * per_client).all()
    assert (fedex["bytes_up"] == k * per_client).all()
    # FedEx: round 1 nothing to catch up; later rounds add min(mn, missed factored residuals)
    assert fedex["bytes_down"][0] == k * per_client
    assert (fedex["bytes_down"][1:] > k * per_client).all()
    clients = pd.read_parquet(runs["fedit"] / "clients.parquet")
    assert (clients["bytes_up"] == per_client).all() and set(clients["status"]) == {"ok"}


def test_saved_updates_recheck_the_aggregation_offline(ray_local, runs, tmp_path_factory):
    run_dir = _run(ray_local, runs, tmp_path_factory, "fedex", **{"aggregator.name": "fedex",
                                                                 "output.save_updates": "true"})
    rnd = run_dir / "updates" / "round-0001"
    clients = sorted(rnd.glob("client-*.safetensors"))
    assert len(clients) == 4
    glob = load_file(str(rnd / "global.safetensors"))
    with safe_open(str(rnd / "global.safetensors"), "np") as f:
        s_global = float(f.metadata()["scale"])
    modules = sorted({k.rsplit(".", 1)[0] for k in glob})
    for module in modules:
        ideal = 0
        total_w = 0
        for path in clients:
            with safe_open(str(path), "np") as f:
                meta = f.metadata()
                a, b = f.get_tensor(f"{module}.lora_A"), f.get_tensor(f"{module}.lora_B")
            w, s = float(meta["weight"]), float(meta["scale"])
            total_w += w
            ideal = ideal + w * s * b.astype(np.float64) @ a.astype(np.float64)
        applied = glob[f"{module}.base_delta"] + s_global * glob[f"{module}.lora_B"] @ glob[f"{module}.lora_A"]
        assert abs(total_w - 1) < 1e-9
        assert np.linalg.norm(applied - ideal) <= 1e-5 * np.linalg.norm(ideal)
        assert module.startswith("bert.encoder.layer.")


def test_same_seed_gives_identical_metrics(ray_local, runs, tmp_path_factory):
    first = rounds(_run(ray_local, runs, tmp_path_factory, "fedit", **{"output.save_updates": "true"}))
    again = rounds(_run(ray_local, runs, tmp_path_factory, "fedit-again", **{"output.save_updates": "true"}))
    other = rounds(_run(ray_local, runs, tmp_path_factory, "fedit-seed1", **{"seed": 1}))
    pd.testing.assert_series_equal(first["accuracy"], again["accuracy"])
    pd.testing.assert_series_equal(first["loss"], again["loss"])
    assert not np.allclose(first["loss"], other["loss"])


@pytest.mark.parametrize("key", ["fedit", "fedex"])
def test_saved_adapter_reproduces_the_final_accuracy(ray_local, runs, tmp_path_factory, key):
    from raysim.evaluation import evaluate_run

    overrides = {"output.save_updates": "true"}
    if key == "fedex":
        overrides["aggregator.name"] = "fedex"
    run_dir = _run(ray_local, runs, tmp_path_factory, key, **overrides)
    assert (run_dir / "adapter" / "adapter_config.json").exists()
    assert (run_dir / "adapter" / "base_delta.safetensors").exists() == (key == "fedex")
    final = rounds(run_dir).iloc[-1]
    got = evaluate_run(run_dir)
    assert got["accuracy"] == pytest.approx(final["accuracy"], abs=1e-9)
    assert got["loss"] == pytest.approx(final["loss"], rel=1e-4)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["final"]["accuracy"] == final["accuracy"]


def test_resume_repeats_an_uninterrupted_run(ray_local, runs, tmp_path_factory, tiny_config):
    full = rounds(_run(ray_local, runs, tmp_path_factory, "fedex", **{"aggregator.name": "fedex",
                                                                     "output.save_updates": "true"}))
    cfg = tiny_config(**{"aggregator.name": "fedex"})
    out = tmp_path_factory.mktemp("interrupted")

    class Stop(Exception):
        pass

    def stop_after_two(row, ckpt):
        if row["round"] == 2:
            raise Stop

    with pytest.raises(Stop):
        run_experiment(cfg, out, progress=False, on_round=stop_after_two)
    assert not (out / "summary.json").exists()                    # an interrupted run never looks complete
    assert (out / "checkpoints" / "round-0002").is_dir()
    run_experiment(cfg, out, progress=False, resume=True)
    resumed = rounds(out)
    assert list(resumed["round"]) == [1, 2, 3]
    for col in ("accuracy", "loss", "deviation_rel", "bytes_up", "bytes_down"):
        np.testing.assert_array_equal(resumed[col].to_numpy(), full[col].to_numpy())


def test_a_killed_worker_and_dropped_clients_do_not_stop_the_run(ray_local, tmp_path, tiny_config):
    cfg = tiny_config(**{"faults.kill_worker_at_round": 2, "faults.drop_rate": 0.25, "federation.rounds": 3})
    run_experiment(cfg, tmp_path, progress=False)
    df = rounds(tmp_path)
    clients = pd.read_parquet(tmp_path / "clients.parquet")
    assert len(df) == 3 and df["accuracy"].notna().all()
    failed = clients[clients["status"] == "failed"]
    assert len(failed) == df["clients_failed"].sum() > 0          # drop-outs are recorded per client
    assert (df["clients_completed"] + df["clients_failed"] == df["clients_sampled"]).all()
    # the killed worker's jobs were retried: round 2 lost nobody who did not drop out (failures are the
    # simulated drop-outs only); worker 0 (killed) trained nothing from round 2 on
    r2 = clients[clients["round"] == 2]
    assert set(r2[r2["status"] != "ok"]["error"].str.contains("faults.drop_rate")) <= {True}
    later = clients[(clients["round"] >= 2) & (clients["status"] == "ok")]
    assert len(later) > 0 and (later["worker"] != 0).all()
    assert df["workers"].iloc[0] == 2 and df["workers"].iloc[1] >= 1


def test_local_heads_stay_on_their_clients_and_survive_resume(ray_local, tmp_path_factory, tiny_config):
    """lora.head_policy: local — no head on the wire, each client trains its own head from where it left it,
    personalised evaluation on, the heads are checkpointed; the global head only evaluates the adapter."""
    cfg = tiny_config(**{"lora.head_policy": "local", "output.checkpoint_every": 1})
    out = tmp_path_factory.mktemp("local-head")
    run_experiment(cfg, out, progress=False)
    df, clients = rounds(out), pd.read_parquet(out / "clients.parquet")
    r, m, n, modules = 4, 128, 128, 4
    assert (clients["bytes_up"] == r * (m + n) * modules * 4).all()        # factors only, no head
    assert df["personalized_accuracy"].between(0, 1).all()

    def heads(rnd):
        tensors, meta = load_checkpoint(out / "checkpoints" / f"round-{rnd:04d}")
        store = ClientStore(out, meta["client_store"]["root"])         # the heads live in the client store
        store.load_state_dict(meta["client_store"])
        return tensors, {cid: store.get("head", cid)["classifier.weight"] for cid in store.client_ids()}

    t2, h2 = heads(2)
    t3, h3 = heads(3)
    assert set(h3) == set(clients["client_id"])                             # one head per client that trained
    in_3 = clients[clients["round"] == 3]
    for cid in h3:
        changed = not np.array_equal(h2.get(cid), h3[cid]) if cid in h2 else True
        assert changed == (cid in set(in_3["client_id"]))                   # only round 3's clients moved
    assert len({h.tobytes() for h in h3.values()}) == len(h3)               # personal, not shared
    p = in_3["num_samples"].to_numpy() / in_3["num_samples"].sum()
    np.testing.assert_allclose(t3["head/classifier.weight"],                # evaluation head = FedAvg of round 3
                               sum(w * h3[c] for w, c in zip(p, in_3["client_id"])), rtol=1e-5, atol=1e-7)

    class Stop(Exception):
        pass

    def stop_after_two(row, ckpt):
        if row["round"] == 2:
            raise Stop

    again = tmp_path_factory.mktemp("local-head-resumed")
    with pytest.raises(Stop):
        run_experiment(cfg, again, progress=False, on_round=stop_after_two)
    run_experiment(cfg, again, progress=False, resume=True)
    for col in ("accuracy", "personalized_accuracy", "bytes_up"):
        np.testing.assert_array_equal(rounds(again)[col].to_numpy(), df[col].to_numpy())


def test_personalised_accuracy_is_measured_on_the_model_a_client_holds_after_aggregation(ray_local, tmp_path,
                                                                                         tiny_config):
    """FedIT with eval.personalized: after the last round every aggregated client holds the final global
    model, so its local accuracy is that model (the exported adapter) on its own local test split — not the
    accuracy of its own factors right after local training."""
    from raysim.evaluation import evaluate_run

    cfg = tiny_config(**{"eval.personalized": "true", "data.local_test_fraction": 0.3, "federation.rounds": 2})
    run_experiment(cfg, tmp_path, progress=False)
    row, clients = rounds(tmp_path).iloc[-1], pd.read_parquet(tmp_path / "clients.parquet")
    last = clients[(clients["round"] == 2) & (clients["status"] == "ok")]
    assert len(last) > 0 and last["local_accuracy"].notna().all()
    for cid, acc in zip(last["client_id"], last["local_accuracy"]):
        assert acc == pytest.approx(evaluate_run(tmp_path, client=int(cid))["accuracy"], abs=1e-9)
    accs = last["local_accuracy"].to_numpy()
    assert row["personalized_accuracy"] == pytest.approx(np.average(accs, weights=last["num_samples"]))
    assert row["personalized_accuracy_mean"] == pytest.approx(accs.mean())
    assert row["personalized_accuracy_p10"] == pytest.approx(np.percentile(accs, 10))


def test_deviation_every_skips_the_metric_in_between(ray_local, tmp_path, tiny_config):
    run_experiment(tiny_config(**{"eval.deviation_every": 2, "federation.rounds": 3, "train.local_steps": 1}),
                   tmp_path, progress=False)
    dev = rounds(tmp_path)["deviation_rel"]
    assert dev.isna().tolist() == [True, False, False]          # round 2, and the last round


def test_fedex_base_log_stays_compact_and_a_resume_from_it_is_exact(ray_local, runs, tmp_path_factory, tiny_config):
    """FedEx-LoRA changes the base every round; the coordinator merges the versions every worker holds into one
    entry, so the log (and each checkpoint) stays small. Fresh workers of a resumed run catch up from the merged
    entry, and the result equals the straight run."""
    from raysim.cli import main

    sets = {"aggregator.name": "fedex", "federation.rounds": 6, "output.checkpoint_every": 1}
    straight = _run(ray_local, runs, tmp_path_factory, "fedex6", **sets)
    _, meta = load_checkpoint(straight / "checkpoints" / "round-0006")
    assert len(meta["base_versions"]["entries"]) <= 3                 # merged ≤ 4, then 5 and 6
    resumed = tmp_path_factory.mktemp("fedex6-resumed")
    run_experiment(tiny_config(**{**sets, "federation.rounds": 4}), resumed, progress=False)
    assert main(["run", "--resume", str(resumed), "--set", "federation.rounds=6", "--no-progress"]) == 0
    timing = ["wall_s", "round_time_s", "dispatch_s", "aggregate_s"]
    pd.testing.assert_frame_equal(rounds(resumed).drop(columns=timing), rounds(straight).drop(columns=timing))
