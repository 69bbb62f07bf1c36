"""The cohort engine against the PEFT reference engine: same clients, same init, same data order.

Float64 on CPU. Clients differ in rank (masked slots), data size and number of local steps (clients
that finish early must stop moving), with per-client gradient clipping and AdamW weight decay on, so
every independence mechanism of the cohort engine is exercised. Results are float32 by contract, so
"agree" means: the per-client updates (end − start) agree to ~1e-6 of their own size.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from raysim.engines.base import ClientJob, EngineSettings
from raysim.engines.cohort import CohortEngine, UnsupportedJob
from raysim.engines.peft_engine import DataArrays, PeftEngine
from raysim.lora.factors import LoRAFactors
from raysim.lora.peft_io import get_factors, get_head, wrap_lora
from raysim.models import RANDOM_ARCHS

from .helpers import assert_updates_same, make_jobs, start_factors

R_MAX, ALPHA, LABELS = 8, 16, 4


KW = dict(optimizer="adamw", lr=1e-2, weight_decay=0.01, batch_size=8, max_grad_norm=0.5, train_head=True,
          eval_batch_size=16)


def _model(dropout: float):
    torch.manual_seed(0)
    cfg = BertConfig(num_labels=LABELS, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                     **RANDOM_ARCHS["bert-tiny"])
    return wrap_lora(BertForSequenceClassification(cfg), R_MAX, ALPHA, ["query", "value"], dropout, 0).double()


def _data(n=400, length=24, seed=0):
    rng = np.random.default_rng(seed)
    lens = rng.integers(6, length + 1, size=n)                    # right padding of varying length
    mask = (np.arange(length)[None] < lens[:, None]).astype(np.int64)
    ids = rng.integers(5, 1000, size=(n, length)) * mask
    return {"input_ids": ids, "attention_mask": mask, "labels": rng.integers(0, LABELS, size=n)}


def _engines(dropout=0.0, **kw):
    model = _model(dropout)
    data = DataArrays(_data(), torch.device("cpu"))
    settings = EngineSettings(**{**KW, **kw})
    peft = PeftEngine(model, data, settings)
    return model, peft, CohortEngine(model, data, settings, peft=peft)


def _start(model, rank, seed):
    return start_factors(model, rank, seed, ALPHA / R_MAX)


# sizes, ranks and steps differ; client 4 has fewer examples than one batch
CLIENTS = [dict(size=20, rank=8, steps=4), dict(size=9, rank=4, steps=2), dict(size=13, rank=8, steps=5),
           dict(size=30, rank=2, steps=3), dict(size=5, rank=8, steps=4)]


def _jobs(model, clients=CLIENTS, offset=0, **extra):
    return make_jobs(model, clients, ALPHA / R_MAX, 6, offset, **extra)


def _assert_same(solo, cohort, jobs, rtol=1e-5):
    assert_updates_same(solo, cohort, jobs, rtol)
    for s, c in zip(solo, cohort):
        for key in s.head:
            np.testing.assert_allclose(c.head[key], s.head[key], rtol=0, atol=1e-6)
        if s.local_accuracy is not None:
            assert c.local_accuracy == s.local_accuracy
            assert c.local_loss == pytest.approx(s.local_loss, rel=1e-6)


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd"])
def test_cohort_matches_peft_per_client_mixed_ranks_sizes_and_steps(optimizer):
    model, peft, cohort = _engines(optimizer=optimizer)
    jobs = _jobs(model)
    solo = [peft.train_client(j) for j in jobs]
    together = cohort.train_cohort(jobs)
    _assert_same(solo, together, jobs)
    # surplus slots of low-rank clients never appear: results have the client's own rank
    assert together[3].factors["bert.encoder.layer.0.attention.self.query"].a.shape == (2, 128)


def test_cohort_matches_peft_with_dropout_on_cpu():
    """Base and attention dropout 0.1: per-client generators reproduce the PEFT engine's masks on CPU."""
    model, peft, cohort = _engines(dropout=0.1)
    jobs = _jobs(model)
    solo = [peft.train_client(j) for j in jobs]
    _assert_same(solo, cohort.train_cohort(jobs), jobs)
    # and dropout is really on: another seed gives another result
    other = cohort.train_cohort([dataclasses.replace(jobs[0], seed=7)])[0]
    name = "bert.encoder.layer.0.attention.self.value"
    assert np.abs(other.factors[name].b - solo[0].factors[name].b).max() > 1e-6


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_changing_one_client_does_not_change_the_others(dropout):
    model, _, cohort = _engines(dropout=dropout)
    jobs = _jobs(model)
    base = cohort.train_cohort(jobs)
    # client 0 gets other data, more steps and another rank: the batch layout of every step changes
    changed = [dataclasses.replace(jobs[0], train_idx=np.arange(200, 240), steps=6,
                                   start=_start(model, 4, 99))] + jobs[1:]
    again = cohort.train_cohort(changed)
    name = "bert.encoder.layer.1.attention.self.query"
    assert np.abs(again[0].factors[name].b[:, :4] - base[0].factors[name].b[:, :4]).max() > 1e-4
    for a, b in zip(base[1:], again[1:]):
        for n in a.factors:
            np.testing.assert_allclose(b.factors[n].a, a.factors[n].a, rtol=0, atol=1e-7)
            np.testing.assert_allclose(b.factors[n].b, a.factors[n].b, rtol=0, atol=1e-7)
        assert b.train_loss == pytest.approx(a.train_loss, rel=1e-7)


def test_only_b_trains_and_lr_scale_groups_like_peft():
    """FFA-style jobs (A frozen) and per-factor learning rates, in one call with ordinary jobs."""
    model, peft, cohort = _engines()
    jobs = _jobs(model)
    mixed = [dataclasses.replace(j, train=frozenset("b"), lr_scale={"b": 2.0}) if j.client_id % 2 else j
             for j in jobs]
    solo = [peft.train_client(j) for j in mixed]
    together = cohort.train_cohort(mixed)
    _assert_same(solo, together, mixed)
    for j, r in zip(mixed, together):
        if j.train == frozenset("b"):
            for name, f in j.start.items():
                np.testing.assert_array_equal(r.factors[name].a, f.a)


def test_tri_matrix_jobs_are_refused():
    model, _, cohort = _engines()
    job = _jobs(model)[0]
    start = {k: dataclasses.replace(f, c=np.eye(f.rank, dtype=np.float32)) for k, f in job.start.items()}
    with pytest.raises(UnsupportedJob, match="CE-LoRA"):
        cohort.train_cohort([dataclasses.replace(job, start=start)])


def test_cohort_leaves_the_peft_model_intact():
    """After a cohort the resident PEFT model is back: global evaluation is unchanged."""
    model, peft, cohort = _engines(dropout=0.1)
    factors, head = get_factors(model), get_head(model)
    before = peft.evaluate(factors, head, np.arange(300, 400))
    cohort.train_cohort(_jobs(model))
    after = cohort.evaluate(factors, head, np.arange(300, 400))
    assert (after.sums["correct"], after.sums["count"]) == (before.sums["correct"], before.sums["count"])
    assert after.sums["loss_sum"] == pytest.approx(before.sums["loss_sum"], rel=1e-12)
    assert model.config._attn_implementation == "sdpa"
    assert all(type(m).__name__ != "SegmentDropout" for m in model.modules())
