"""The cohort engine on image classification (task image_cls) against the PEFT reference engine.

Float64 on CPU, as for BERT (tests/engines/test_cohort.py): a random ViT (transformers'
ViTForImageClassification, LoRA on q_proj/v_proj, the `classifier` trained in full) and the MLP-Mixer
(LoRA on its token and channel MLPs, the `head` trained in full). Clients differ in rank, data size
and number of local steps, with AdamW, weight decay and per-client gradient clipping; with dropout
on (hidden states, attention probabilities, LoRA) the per-client CPU generators reproduce the PEFT
engine's masks. Every client's factors, head, training loss and local evaluation must agree with
its solo run. Then a worker configured with `resources.engine: cohort` must train image jobs with
the cohort engine (no fallback to the PEFT engine).
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

from raysim.engines.base import ClientJob, ClientResult, EngineSettings
from raysim.engines.cohort import CohortEngine
from raysim.engines.peft_engine import DataArrays, PeftEngine
from raysim.lora.factors import LoRAFactors
from raysim.lora.peft_io import get_factors, get_head, wrap_lora
from raysim.models import RANDOM_VISION
from raysim.tasks.image_cls import ImageClsTask
from raysim.vision import Mixer, MixerConfig

from .helpers import assert_updates_same, engine_pair, make_jobs

R_MAX, ALPHA, LABELS = 8, 16, 5
KW = dict(optimizer="adamw", lr=1e-2, weight_decay=0.01, batch_size=8, max_grad_norm=0.5, train_head=True,
          eval_batch_size=16)
# sizes, ranks and steps differ; client 4 has fewer images than one batch
CLIENTS = [dict(size=20, rank=8, steps=4), dict(size=9, rank=4, steps=2), dict(size=13, rank=8, steps=5),
           dict(size=30, rank=2, steps=3), dict(size=5, rank=8, steps=4)]


def _vit(dropout: float):
    spec = {k: v for k, v in RANDOM_VISION["vit-tiny"].items() if k != "model_type"}
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(num_labels=LABELS, hidden_dropout_prob=dropout,
                                                attention_probs_dropout_prob=dropout, **spec))
    return wrap_lora(model, R_MAX, ALPHA, ["q_proj", "v_proj"], dropout, 0, task_type=None,
                     modules_to_save=["classifier"]).double()


def _mixer(dropout: float):
    spec = {k: v for k, v in RANDOM_VISION["mixer-tiny"].items() if k != "model_type"}
    torch.manual_seed(0)
    mixer = Mixer(MixerConfig(num_labels=LABELS, **spec))
    # ViT casts its float32 images to its weights' dtype itself; the Mixer does not, so cast them here
    mixer.register_forward_pre_hook(
        lambda module, args, kw: (args, {**kw, "pixel_values": kw["pixel_values"].double()}), with_kwargs=True)
    return wrap_lora(mixer, R_MAX, ALPHA, ["fc1", "fc2"], dropout, 0, task_type=None,
                     modules_to_save=["head"]).double()


def _data(n=400, seed=0):
    rng = np.random.default_rng(seed)
    return {"pixel_values": rng.normal(size=(n, 1, 8, 8)).astype(np.float32),
            "labels": rng.integers(0, LABELS, size=n)}


def _engines(build=_vit, dropout=0.0, **kw):
    model = build(dropout)
    return (model, *engine_pair(model, _data(), EngineSettings(**{**KW, **kw}), ImageClsTask(None)))


def _jobs(model, clients=CLIENTS):
    return make_jobs(model, clients, ALPHA / R_MAX, 7)


def _assert_same(solo, cohort, jobs, rtol=1e-5):
    assert_updates_same(solo, cohort, jobs, rtol)
    for s, c, job in zip(solo, cohort, jobs):
        for key in s.head:
            assert np.abs(s.head[key] - job.head[key]).max() > 0
            np.testing.assert_allclose(c.head[key], s.head[key], rtol=0, atol=1e-6)
        assert c.local_accuracy == s.local_accuracy
        assert c.local_loss == pytest.approx(s.local_loss, rel=1e-6)


@pytest.mark.parametrize("build,dropout", [(_vit, 0.0), (_vit, 0.1), (_mixer, 0.0), (_mixer, 0.1)],
                         ids=["vit", "vit-dropout", "mixer", "mixer-lora-dropout"])
def test_every_client_matches_its_solo_peft_run(build, dropout):
    model, peft, cohort = _engines(build, dropout)
    jobs = _jobs(model)
    solo = [peft.train_client(j) for j in jobs]
    together = cohort.train_cohort(jobs)
    _assert_same(solo, together, jobs)
    assert all(r.extra["cohort_size"] == len(jobs) for r in together)     # trained as one cohort
    # surplus slots of low-rank clients never appear: results have the client's own rank
    assert {f.rank for f in together[3].factors.values()} == {2}


def test_local_evaluation_is_the_tasks_evaluation():
    """A cohort's local accuracy/loss equal the task's evaluate with each client's trained adapter loaded."""
    model, peft, cohort = _engines(_vit, 0.1)
    jobs = _jobs(model)
    for job, res in zip(jobs, cohort.train_cohort(jobs)):
        ev = peft.evaluate(res.factors, res.head, job.test_idx)
        assert res.local_accuracy == ev.accuracy
        assert res.local_loss == pytest.approx(ev.loss, rel=1e-5)


def test_vit_dropout_is_per_client_and_leaves_the_model_intact():
    model, peft, cohort = _engines(_vit, 0.1)
    factors, head = get_factors(model), get_head(model)
    before = peft.evaluate(factors, head, np.arange(300, 400))
    jobs = _jobs(model)
    base = cohort.train_cohort(jobs)
    # another seed for client 0 only: its result changes (dropout is on), the others' do not
    again = cohort.train_cohort([dataclasses.replace(jobs[0], seed=7)] + jobs[1:])
    name = "vit.layers.0.attention.v_proj"
    assert np.abs(again[0].factors[name].b - base[0].factors[name].b).max() > 1e-6
    for a, b in zip(base[1:], again[1:]):
        for n in a.factors:
            np.testing.assert_allclose(b.factors[n].b, a.factors[n].b, rtol=0, atol=1e-9)
    after = peft.evaluate(factors, head, np.arange(300, 400))
    assert after.sums["correct"] == before.sums["correct"]
    assert after.sums["loss_sum"] == pytest.approx(before.sums["loss_sum"], rel=1e-12)
    assert model.config._attn_implementation == "sdpa"
    assert all(type(m).__name__ != "SegmentDropout" for m in model.modules())


@pytest.mark.parametrize("name", ["random:vit-tiny", "random:mixer-tiny"])
def test_worker_trains_image_jobs_with_the_cohort_engine(name, tmp_path, monkeypatch):
    from pathlib import Path

    from raysim.config import load_config
    from raysim.runner import prepare_data
    from raysim.tasks import task_for
    from raysim.worker import ClientWorkerImpl

    monkeypatch.setenv("RAYSIM_CACHE", str(tmp_path))
    root = Path(__file__).resolve().parents[2]
    sets = {"model.name": name, "resources.engine": "cohort", "federation.num_clients": 4,
            "federation.clients_per_round": 4, "data.max_examples": 240, "train.local_steps": 2}
    cfg = load_config(root / "experiments" / "vision_digits.yaml", [f"{k}={v}" for k, v in sets.items()])
    raw, partition = prepare_data(cfg)
    worker = ClientWorkerImpl(cfg, int(raw.num_labels), 0, 0.0)
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="resources.engine: cohort unavailable")     # the fallback
        worker.set_data(task_for(cfg).arrays(raw))
    assert isinstance(worker.cohort, CohortEngine) and worker.cohort.image
    factors, head = worker.initial_state()
    jobs = [ClientJob(client_id=c, round=1, seed=10 + c, train_idx=partition["client_train"][c], test_idx=None,
                      start=factors, head=head, train=frozenset("ab"), steps=2) for c in range(4)]
    calls = []
    real = worker.cohort.train_cohort
    worker.cohort.train_cohort = lambda batch: calls.append(len(batch)) or real(batch)
    try:
        results = worker.train(jobs)
    finally:
        worker.cohort.train_cohort = real
    assert calls == [4] and all(isinstance(r, ClientResult) and r.extra["cohort_size"] == 4 for r in results)
    for job, got in zip(jobs, results):                     # float32: agree with the PEFT engine closely
        want = worker.engine.train_client(job)
        assert got.train_loss == pytest.approx(want.train_loss, rel=1e-4)
        for n in got.factors:
            np.testing.assert_allclose(got.factors[n].b, want.factors[n].b, rtol=0, atol=1e-4)
