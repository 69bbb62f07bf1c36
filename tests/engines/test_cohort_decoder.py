"""The cohort engine on decoder LLMs against the PEFT reference engine (float64, CPU).

`random:llama-tiny` (q_proj/v_proj, grouped-query attention, embed_tokens with padding_idx) and
`random:gpt2-tiny` (Conv1D c_attn, fan_in_fan_out), each with its input embeddings and lm_head trained
per client (modules_to_save). Clients differ in rank, data size and number of local steps; AdamW with
weight decay and per-client gradient clipping; causal-LM batches with right padding and labels -100 on
prompt and padding. Every client's factors, embeddings, lm_head, training loss and local evaluation
must equal its solo PEFT-engine result.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from raysim.engines.base import ClientJob, EngineSettings
from raysim.engines.cohort import CohortEngine, UnsupportedModel
from raysim.engines.peft_engine import DataArrays, PeftEngine
from raysim.lora.cohort import CohortContext, SegmentEmbedding, SegmentLinear, SegmentLoRALinear
from raysim.lora.factors import LoRAFactors
from raysim.lora.peft_io import get_factors, get_head, has_tied_embeddings, wrap_lora
from raysim.models import DEFAULT_SAVED, DEFAULT_TARGETS, random_decoder_config
from raysim.tasks.causal_lm import CausalLMTask

from .helpers import assert_updates_same, engine_pair, make_jobs, start_factors

R_MAX, ALPHA, VOCAB, LENGTH = 8, 16, 259, 20
KW = dict(optimizer="adamw", lr=1e-2, weight_decay=0.01, batch_size=8, max_grad_norm=0.5, train_head=True,
          eval_batch_size=16)
# sizes, ranks and steps differ; client 4 has fewer examples than one batch
CLIENTS = [dict(size=20, rank=8, steps=4), dict(size=9, rank=4, steps=2), dict(size=13, rank=8, steps=5),
           dict(size=30, rank=2, steps=3), dict(size=5, rank=8, steps=4)]
DROPOUT = {"llama": dict(attention_dropout=0.1), "gpt2": dict(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)}


def _model(name: str, dropout: float = 0.0, tied: bool = False):
    config = random_decoder_config(name)
    config.tie_word_embeddings = tied
    if dropout:
        for key in DROPOUT[config.model_type]:
            setattr(config, key, dropout)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    arch = config.model_type
    return wrap_lora(base, R_MAX, ALPHA, DEFAULT_TARGETS[arch], dropout, 0, task_type="causal_lm",
                     modules_to_save=DEFAULT_SAVED[arch]).double()


def _data(n=400, seed=0):
    """Prompt + response rows, right-padded with 0; the loss only on the response. Token 0 (Llama's
    padding_idx) also occurs inside real sequences, so its embedding row must get no gradient."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(4, LENGTH + 1, size=n)
    prompt = rng.integers(1, lens - 1)
    pos = np.arange(LENGTH)[None]
    mask = (pos < lens[:, None]).astype(np.int64)
    ids = rng.integers(0, VOCAB, size=(n, LENGTH)) * mask
    labels = np.where((pos >= prompt[:, None]) & (mask == 1), ids, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _engines(name, dropout=0.0, tied=False, **kw):
    model = _model(name, dropout, tied)
    return (model, *engine_pair(model, _data(), EngineSettings(**{**KW, **kw}), CausalLMTask(None)))


def _start(model, rank, seed):
    return start_factors(model, rank, seed, ALPHA / R_MAX)


def _jobs(model, clients=CLIENTS):
    return make_jobs(model, clients, ALPHA / R_MAX, 7)


def _assert_same(solo, cohort, jobs, rtol=1e-5):
    assert_updates_same(solo, cohort, jobs, rtol)
    for s, c, job in zip(solo, cohort, jobs):
        assert set(c.head) == set(s.head) == set(job.head)
        for key in s.head:
            d_solo, d_coh = s.head[key] - job.head[key], c.head[key] - job.head[key]
            assert np.abs(d_solo).max() > 0
            np.testing.assert_allclose(d_coh, d_solo, rtol=0, atol=rtol * np.abs(d_solo).max() + 1e-9,
                                       err_msg=f"client {job.client_id} {key}")
        assert s.local_loss is not None and s.local_accuracy is None
        assert c.local_accuracy is None and c.local_loss == pytest.approx(s.local_loss, rel=1e-6)


@pytest.mark.parametrize("name", ["random:llama-tiny", "random:gpt2-tiny"])
def test_decoder_cohort_matches_peft_per_client(name):
    model, peft, cohort = _engines(name)
    ctx = CohortContext(2, torch.device("cpu"))
    modules = cohort._modules(ctx, *cohort._stack(_jobs(model)[:2], frozenset("ab")))
    kinds = {type(m) for m in modules.values()}
    assert kinds == {SegmentLoRALinear, SegmentLinear, SegmentEmbedding}
    jobs = _jobs(model)
    solo = [peft.train_client(j) for j in jobs]
    _assert_same(solo, cohort.train_cohort(jobs), jobs)


@pytest.mark.parametrize("name", ["random:llama-tiny", "random:gpt2-tiny"])
def test_decoder_cohort_matches_peft_with_dropout_on_cpu(name):
    """Attention dropout (Llama, grouped-query), GPT-2's residual/embedding/attention dropout and LoRA
    dropout at 0.1: each client's masks come from its own generator, equal to the PEFT engine's."""
    model, peft, cohort = _engines(name, dropout=0.1)
    assert cohort.has_dropout
    jobs = _jobs(model)[:3]
    solo = [peft.train_client(j) for j in jobs]
    _assert_same(solo, cohort.train_cohort(jobs), jobs)
    other = cohort.train_cohort([dataclasses.replace(j, seed=7 + j.seed) for j in jobs])
    key = next(iter(solo[0].head))
    assert np.abs(other[0].head[key] - solo[0].head[key]).max() > 1e-6      # dropout is really on


def test_tied_embeddings_train_one_shared_copy_per_client():
    """A tied LM head (as Llama-3.2-1B): one stacked tensor serves the embedding and the LM head."""
    model, peft, cohort = _engines("random:llama-tiny", tied=True)
    assert has_tied_embeddings(model.get_base_model())
    jobs = _jobs(model)[:3]
    assert list(jobs[0].head) == ["model.embed_tokens.weight"]
    solo = [peft.train_client(j) for j in jobs]
    _assert_same(solo, cohort.train_cohort(jobs), jobs)


def test_changing_one_client_does_not_change_the_others():
    model, _, cohort = _engines("random:gpt2-tiny")
    jobs = _jobs(model)
    base = cohort.train_cohort(jobs)
    # client 0: other data, more steps, another rank — the layout (and padded length) of every step changes
    changed = [dataclasses.replace(jobs[0], train_idx=np.arange(200, 240), steps=6, start=_start(model, 4, 99))]
    again = cohort.train_cohort(changed + jobs[1:])
    assert abs(again[0].train_loss - base[0].train_loss) > 1e-4
    for a, b in zip(base[1:], again[1:]):
        for n in a.factors:
            np.testing.assert_allclose(b.factors[n].b, a.factors[n].b, rtol=0, atol=1e-7)
        for key in a.head:
            np.testing.assert_allclose(b.head[key], a.head[key], rtol=0, atol=1e-7)
        assert b.train_loss == pytest.approx(a.train_loss, rel=1e-7)


def test_lora_on_an_embedding_is_refused_so_the_worker_falls_back_to_peft():
    base = AutoModelForCausalLM.from_config(random_decoder_config("random:llama-tiny"))
    model = wrap_lora(base, 4, 8, ["q_proj", "embed_tokens"], 0.0, 0, task_type="causal_lm")
    data = DataArrays(_data(8), torch.device("cpu"))
    with pytest.raises(UnsupportedModel, match="LoRA embedding"):
        CohortEngine(model, data, EngineSettings(**KW), task=CausalLMTask(None))


ARITH = {"task.type": "causal_lm", "data.source": "synthetic:arith", "data.arith.num_examples": 240,
         "data.local_test_fraction": 0.2, "model.max_length": 16, "model.name": "random:gpt2-tiny",
         "data.partition": "{scheme: by_column, column: operator, min_samples: 8}",
         "federation.num_clients": 6, "train.batch_size": 16, "lora.rank": 4, "lora.alpha": 8,
         "lora.target_modules": "null", "resources.engine": "cohort"}


def test_a_worker_trains_a_decoder_cohort_like_its_peft_engine(tiny_config, tmp_path, monkeypatch):
    """The worker of a causal_lm run with resources.engine: cohort really stacks its jobs (no fallback to the
    PEFT engine), on the task's own tokenised arrays, and every client's result is its PEFT result."""
    from raysim.runner import prepare_data
    from raysim.worker import ClientWorkerImpl

    monkeypatch.setenv("RAYSIM_CACHE", str(tmp_path))
    cfg = tiny_config(**ARITH)
    raw, partition = prepare_data(cfg)
    worker = ClientWorkerImpl(cfg, int(raw.num_labels), 0, 0.0)
    torch.set_num_threads(1)
    worker.set_data(worker.task.arrays(raw))
    assert isinstance(worker.cohort, CohortEngine) and worker.cohort.causal
    factors, head = worker.initial_state()
    jobs = [ClientJob(client_id=c, round=1, seed=10 + c, train_idx=partition["client_train"][c],
                      test_idx=partition["client_test"][c], start=factors, head=head, train=frozenset("ab"),
                      steps=2 + c) for c in range(3)]
    calls = []
    real = worker.cohort.train_cohort
    monkeypatch.setattr(worker.cohort, "train_cohort", lambda js: calls.append(len(js)) or real(js))
    together = worker.train(jobs)
    assert calls == [3]
    solo = [worker.engine.train_client(j) for j in jobs]
    for s, c in zip(solo, together):
        assert c.train_loss == pytest.approx(s.train_loss, rel=1e-5)
        assert c.local_loss == pytest.approx(s.local_loss, rel=1e-5) and c.local_accuracy is None
        for name in s.factors:
            np.testing.assert_allclose(c.factors[name].b, s.factors[name].b, rtol=0, atol=1e-5)
        for key in s.head:
            np.testing.assert_allclose(c.head[key], s.head[key], rtol=0, atol=1e-5)
