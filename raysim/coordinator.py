"""The Coordinator actor: the round loop and the server state.

A round, top-down (`run_round`): sample → plan → dispatch → screen → aggregate → evaluate → record. Each kind of
state has one small owner: the aggregator (global adapter, its declared per-client state), `HeadState`
(classifier heads), `BaseDeltaLog` (factored changes of the frozen base), `CommLedger` (who holds which
base version; bytes on the wire), `FaultInjector` (injected faults) and the `WorkerPool`.

Rounds are pipelined: `run_round` returns as soon as the new aggregate exists, with the global
evaluation (on the workers) and the deviation metric (in this actor's metrics thread) still running
(`RoundOutput.pending`); the driver resolves and writes them while this actor already runs the next
round. All randomness comes from (seed, round, client), so the results equal those of a serial loop and
of a resumed run.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import numpy as np
import ray

from raysim.aggregators import resolve_aggregator
from raysim.aggregators.base import AggregateResult, ClientPlan, ClientUpdate
from raysim.base_log import BaseDeltaLog
from raysim.client_store import ClientStore
from raysim.clients import client_index
from raysim.config import ExperimentConfig
from raysim.coordinator_state import coordinator_state, restore_coordinator
from raysim.data.noise import apply_label_noise
from raysim.engines.base import ClientJob
from raysim.faults import FaultInjector
from raysim.heads import HeadState
from raysim.ledger import CommLedger
from raysim.lora.factors import Factors, LoRAFactors, deviation, normalise_weights
from raysim.pool import JobOutcome, WorkerPool, WorkerSpec
from raysim.ranks import (assign_ranks, check_ranks_fit, ranks_by_validation, rerank_due, scale_for,
                          validation_rows, validation_score)
from raysim.round_types import Aggregated, Pending, RoundOutput, RoundPlan
from raysim.records import PERSONAL_METRICS, client_row, frozen_changed, global_tensors, upload_tensors, weighted
from raysim.sampling import ClientSampler
from raysim.seeds import client_seed
from raysim.storage import RunStorage
from raysim.tasks import ROW_METRICS, task_for
from raysim.validation import clip_update, rejection_reason


def blas_threads(cfg: ExperimentConfig) -> int:
    """BLAS threads for the server-side math: the CPUs the workers leave free (Ray would give this num_cpus=0
    actor a single thread)."""
    import os

    taken = cfg.resources.num_workers * cfg.resources.cpus_per_worker
    return max(1, int((os.cpu_count() or 1) - taken))


# The deviation metric runs in this actor's own "metrics" thread (a Ray concurrency group) while the next round
# runs in the main one: off the critical path without a process of its own (a Ray task would start one).
METRICS_GROUP = "metrics"


def _pairs(delta) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """A {module: BaseDelta} as the (u, v) pairs workers fold into their base."""
    return None if not delta else {name: (d.u, d.v) for name, d in delta.items()}


def timed(key: str):
    """Record a phase's wall time in `self.phase_s[key]` (the round's row reports it)."""
    def wrap(method):
        @functools.wraps(method)
        def inner(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return method(self, *args, **kwargs)
            finally:
                self.phase_s[key] = time.perf_counter() - t0
        return inner
    return wrap


class CoordinatorImpl:
    def __init__(self, cfg: ExperimentConfig, raw, partition: dict[str, Any], spec: WorkerSpec, workers: list,
                 run_dir=None):
        from threadpoolctl import threadpool_limits

        threadpool_limits(blas_threads(cfg))             # server math: the CPUs the workers leave free
        self.cfg = cfg
        self.test_idx = np.asarray(partition["test_idx"])
        self.clients = client_index(partition, cfg)           # each client's training and local test rows
        self.base_log = BaseDeltaLog()
        self.pool = WorkerPool(spec, workers, self.base_log)     # workers build their models meanwhile
        self.task = task_for(cfg)
        arrays = self.task.arrays(raw)
        noisy = []
        if cfg.data.label_noise is not None:             # data.label_noise: train labels only (seq_cls)
            arrays["labels"], noisy = apply_label_noise(arrays["labels"], self.clients.train, cfg, spec.num_labels)
        self.noisy = {int(c) for c in noisy}
        self.gen_idx = self.task.generation_subset(self.test_idx, cfg.seed)   # evaluated by generation
        self.pool.attach_data(ray.put(arrays), self.clients.per_client)
        self.sampler = ClientSampler(cfg.federation.num_clients, cfg.federation.clients_per_round, cfg.seed)
        self.ranks = assign_ranks(cfg, self.clients.train_sizes())
        self.aggregator = resolve_aggregator(cfg.aggregator.name, cfg.aggregator.params(), cfg)
        self.aggregator.use_client_store(self._client_store(run_dir, "aggregator"))
        self.faults = FaultInjector(cfg.faults, cfg.seed)
        init_factors, head = self.pool.call_first("initial_state")
        shapes = {k: f.shape for k, f in init_factors.items()}
        check_ranks_fit(cfg, shapes)                              # before any training
        self.aggregator.setup(init_factors, self.ranks, scale_for(cfg), cfg.seed)
        self.heads = HeadState(head, cfg.lora.head_policy, cfg.lora.train_head,
                               store=self._client_store(run_dir, "heads"))
        self.ledger = CommLedger(cfg.federation.num_clients, shapes, self.heads.numel_on_wire())
        self.eval_inputs: dict[int, tuple] = {}               # the last rounds' (factors, head, delta) refs
        self.personal_inputs: dict[int, list] = {}            # the last rounds' personalised evaluation items
        self.started = time.time()
        self.elapsed_before = 0.0
        self.phase_s: dict[str, float] = {}                   # this round's dispatch and aggregation times

    def _client_store(self, run_dir, part: str) -> ClientStore | None:
        """Per-client state in files under <run_dir>/client_state/<part> (None without a run directory: in memory)."""
        if run_dir is None:
            return None
        return ClientStore(RunStorage.of(run_dir), f"client_state/{part}", cache_clients=self.cfg.output.client_state_cache)

    def ready(self) -> dict[str, int]:
        """Answers once the workers hold the data; returns what tokenisation had to cut (causal_lm): examples
        whose response was truncated at model.max_length and examples whose prompt alone filled it (they add
        nothing to the loss)."""
        return {"examples_truncated": getattr(self.task, "truncated", 0),
                "examples_prompt_too_long": getattr(self.task, "prompt_too_long", 0)}

    def reevaluate_personal(self, rnd: int):
        """Round `rnd`'s personalised evaluation again, after a worker holding a part of it was lost."""
        return self.pool.evaluate_clients_now(self.personal_inputs[rnd], self.cfg.federation.round_timeout_s)

    def reevaluate(self, rnd: int):
        """Round `rnd`'s global evaluation again, after a worker holding a shard of it was lost (the driver
        asks; by then the next round may have changed the base, so the workers evaluate at `rnd`'s version)."""
        version = max((v for v, _ in self.base_log.entries if v <= rnd), default=0)
        return self.pool.evaluate_now(*self.eval_inputs[rnd], self.test_idx, self.gen_idx, version,
                                      self.cfg.federation.round_timeout_s)

    # ------------------------------------------------------------------------------------------------ round

    def run_round(self, rnd: int) -> RoundOutput:
        t0 = time.perf_counter()
        sampled = self.sampler.sample(rnd)
        plan = self.plan(rnd, sampled)
        outcomes = self.dispatch(rnd, plan)
        self.screen(plan, outcomes)
        agg = self.aggregate(rnd, plan, outcomes)
        self.rerank(rnd)
        pending = self.evaluate(rnd, agg)
        return self.record(rnd, time.perf_counter() - t0, plan, outcomes, agg, pending)

    # ------------------------------------------------------------------------------------------------ phases

    def plan(self, rnd: int, sampled: list[int]) -> RoundPlan:
        """What each sampled client starts from and trains (the aggregator decides), and what it downloads."""
        plans = {cid: self.aggregator.plan(rnd, cid) for cid in sampled}
        down = sum(self.ledger.download_numel(cid, plans[cid], self.base_log) for cid in sampled)
        self.ledger.mark_synced(sampled, self.base_log.version)
        return RoundPlan(plans, down)

    @timed("dispatch_s")
    def dispatch(self, rnd: int, plan: RoundPlan) -> dict[int, JobOutcome]:
        """Train the clients on the workers (deadline, retries, stragglers)."""
        fed = self.cfg.federation
        deadline = time.time() + fed.round_timeout_s
        jobs = [self._job(rnd, cid, p, deadline) for cid, p in plan.clients.items()]
        return self.pool.run_jobs(jobs, fed.round_timeout_s, fed.max_task_retries,
                                  kill_after_submit=self.faults.kill_worker_in(rnd))

    def screen(self, plan: RoundPlan, outcomes: dict[int, JobOutcome]) -> None:
        """Server-side validation of the uploads: a non-finite, wrongly shaped or over-norm one is `rejected`
        (with its reason) and left out of the aggregate; accepted ones are clipped to
        federation.clip_update_norm when that is set."""
        fed = self.cfg.federation
        for cid, outcome in outcomes.items():
            if outcome.status != "ok":
                continue
            p, got = plan.clients[cid], outcome.result
            reason = rejection_reason(p.start, got.factors, p.train, self.heads.start_for(cid), got.head,
                                      fed.max_update_norm)
            if reason is not None:
                outcomes[cid] = JobOutcome("rejected", got, outcome.worker, f"rejected: {reason}")
            elif fed.clip_update_norm is not None:
                got.factors = clip_update(p.start, got.factors, p.train, fed.clip_update_norm)

    @timed("aggregate_s")
    def aggregate(self, rnd: int, plan: RoundPlan, outcomes: dict[int, JobOutcome]) -> Aggregated:
        """Fold the completed clients into the global adapter, the heads and the base-delta log."""
        old_global = {k: f.copy() for k, f in self.aggregator.global_factors.items()}
        updates = self._updates(plan.clients, outcomes)
        result = AggregateResult()
        if updates:
            result = self.aggregator.aggregate(rnd, updates)
            self.heads.update({u.client_id: outcomes[u.client_id].result.head for u in updates},
                              {u.client_id: u.weight for u in updates})
            if result.base_delta:
                self.base_log.record(rnd, result.base_delta)
                # versions every worker holds, and older than any evaluation that may be re-run: one entry
                self.base_log.compact(min(self.pool.synced_version(), rnd - 2))
        return Aggregated(updates, result, old_global)

    def rerank(self, rnd: int) -> None:
        """lora.rank {scheme: by_validation}: after round `after_round`, score every client's model on its own
        labelled rows (a blocking evaluation on the workers); the best move to the high rank from the next round."""
        if not rerank_due(self.cfg, rnd):
            return
        spec = self.cfg.lora.rank
        rows = validation_rows(spec, self.clients.train, self.cfg.seed)
        items = [(cid, self.aggregator.plan(rnd + 1, cid).start, self.heads.start_for(cid), idx)
                 for cid, idx in rows.items() if len(idx)]
        results = self.pool.evaluate_clients_now(items, self.cfg.federation.round_timeout_s)
        scores = {int(cid): validation_score(res) for cid, res in results}
        self.ranks = ranks_by_validation(spec, scores, self.cfg.federation.num_clients, self.cfg.seed)
        self.aggregator.client_ranks = dict(self.ranks)

    def evaluate(self, rnd: int, agg: Aggregated) -> Pending:
        """Start the global evaluation and the deviation metric; neither blocks the next round."""
        pending = Pending()
        if (rnd % self.cfg.eval.every == 0 or rnd == self.cfg.federation.rounds) and self._personal_eval():
            self._evaluate_personal(rnd, agg, pending)
        if rnd % self.cfg.eval.every == 0 or rnd == self.cfg.federation.rounds:
            inputs = (ray.put(self.aggregator.evaluation_factors()), ray.put(self.heads.global_head),
                      ray.put(_pairs(self.aggregator.evaluation_base_delta())))
            self.eval_inputs = {r: v for r, v in self.eval_inputs.items() if r >= rnd - 1} | {rnd: inputs}
            pending.evaluation = self.pool.submit_evaluation(*inputs, self.test_idx, self.gen_idx)
            if self.faults.kill_worker_in(rnd, "evaluation"):
                self.pool.kill_one()
        due = rnd % self.cfg.eval.deviation_every == 0 or rnd == self.cfg.federation.rounds
        if due and agg.updates and agg.result.deviation_rel is None and not self.aggregator.personalized:
            updates = sorted(agg.updates, key=lambda u: u.client_id)      # order-independent round-off
            per_module = {name: [(u.weight, u.factors[name]) for u in updates] for name in updates[0].factors}
            me = ray.get_runtime_context().current_actor
            pending.deviation = me.deviation_metric.remote(per_module, self.aggregator.global_factors,
                                                           self.base_log.newest(rnd) if agg.result.base_delta else None,
                                                           agg.old_global)
        return pending

    def _evaluate_personal(self, rnd: int, agg: Aggregated, pending: Pending) -> None:
        """Personalised evaluation: each client aggregated this round, on its own local test split, with the
        model it holds after aggregation (what it would start the next round from: for FedSA-LoRA its own B
        with the new shared A, for CE-LoRA its mixed core, under a local head its own head)."""
        items = [(u.client_id, self.aggregator.plan(rnd + 1, u.client_id).start, self.heads.start_for(u.client_id),
                  self.clients.test[u.client_id]) for u in agg.updates if len(self.clients.test[u.client_id])]
        self.personal_inputs = {r: v for r, v in self.personal_inputs.items() if r >= rnd - 1} | {rnd: items}
        pending.personal = self.pool.submit_clients_evaluation(items)
        pending.personal_weights = {u.client_id: u.weight for u in agg.updates}

    def record(self, rnd: int, round_time: float, plan: RoundPlan, outcomes: dict[int, JobOutcome],
               agg: Aggregated, pending: Pending) -> RoundOutput:
        """The round's rows (and, when asked, the wire dump and a checkpoint)."""
        cfg = self.cfg
        out = RoundOutput(row=self._row(rnd, round_time, plan, outcomes, agg), pending=pending,
                          clients=self._client_rows(rnd, plan.clients, outcomes),
                          group_names=getattr(self.task, "group_names", []))
        if cfg.output.save_updates:
            out.uploads = {u.client_id: upload_tensors(u, plan.clients[u.client_id]) for u in agg.updates}
            out.global_tensors = global_tensors(self.aggregator.global_factors, self._model_base_delta())
        every = cfg.output.checkpoint_every
        if every and (rnd % every == 0 or rnd == cfg.federation.rounds):
            out.checkpoint = self.state_dict(rnd)
        return out

    # ------------------------------------------------------------------------------------------------ parts

    def _job(self, rnd: int, cid: int, plan: ClientPlan, deadline: float) -> ClientJob:
        cfg = self.cfg
        train_idx = self.clients.train[cid]
        steps = cfg.train.local_steps
        if cfg.train.local_epochs is not None:
            steps = max(1, int(np.ceil(cfg.train.local_epochs * len(train_idx) / cfg.train.batch_size)))
        return ClientJob(client_id=cid, round=rnd, seed=client_seed(cfg.seed, rnd, cid), train_idx=train_idx,
                         test_idx=None,
                         start=plan.start, head=self.heads.start_for(cid), train=plan.train, steps=steps,
                         lr_scale=dict(plan.lr_scale), fault=self.faults.for_client(rnd, cid),
                         client_hook=plan.client_hook, deadline=deadline)

    def _updates(self, plans: dict[int, ClientPlan], outcomes: dict[int, JobOutcome]) -> list[ClientUpdate]:
        """End-of-round factors (frozen factors are the start ones, bit for bit), weights p_k."""
        completed = [cid for cid in plans if outcomes[cid].status == "ok"]
        if not completed:
            return []
        results = {cid: outcomes[cid].result for cid in completed}
        raw = [results[c].num_samples for c in completed] if self.cfg.federation.weighting == "samples" \
            else [1.0] * len(completed)
        updates = []
        for w, cid in zip(normalise_weights(raw), completed):
            start, train, got = plans[cid].start, plans[cid].train, results[cid].factors
            if self.cfg.output.debug:
                self._check_frozen(cid, start, got, train)
            factors = {name: LoRAFactors(a=got[name].a if "a" in train else s.a,
                                         b=got[name].b if "b" in train else s.b, scale=s.scale,
                                         c=None if s.c is None else (got[name].c if "c" in train else s.c))
                       for name, s in start.items()}
            updates.append(ClientUpdate(cid, float(w), results[cid].num_samples, factors,
                                        hook_output=results[cid].hook_output))
        return updates

    def _check_frozen(self, cid: int, start: Factors, got: Factors, train: frozenset[str]) -> None:
        """output.debug: a client must return the factors the method keeps frozen bit for bit."""
        changed = frozen_changed(start, got, train)
        if changed:
            raise RuntimeError(f"output.debug: client {cid} changed factors that {self.aggregator.name} keeps "
                               f"frozen: {', '.join(changed[:4])}{' …' if len(changed) > 4 else ''} (an engine bug)")

    def _personal_eval(self) -> bool:
        """Per-client evaluation on local test splits: eval.personalized, always on for personalised methods
        and local heads."""
        return self.cfg.eval.personalized or self.aggregator.personalized or self.heads.local

    def _row(self, rnd: int, round_time: float, plan: RoundPlan, outcomes: dict[int, JobOutcome],
             agg: Aggregated) -> dict[str, Any]:
        wire = self.cfg.output.wire_dtype_bytes
        done = [outcomes[u.client_id].result for u in agg.updates]
        sent = [o.result for o in outcomes.values() if o.result is not None]      # accepted and rejected uploads
        up = sum(self.ledger.upload_numel(plan.clients[r.client_id], r.hook_output) for r in sent)
        needed = self.cfg.federation.min_completed_fraction * len(outcomes)
        row = {"round": rnd, "wall_s": self.elapsed_before + (time.time() - self.started),
               "round_time_s": round_time, "dispatch_s": self.phase_s.get("dispatch_s"),
               "aggregate_s": self.phase_s.get("aggregate_s"), **dict.fromkeys(ROW_METRICS),
               **dict.fromkeys(PERSONAL_METRICS),
               "deviation_rel": agg.result.deviation_rel, "deviation_rel_round": agg.result.deviation_rel_round,
               "bytes_up": int(up * wire), "bytes_down": int(plan.download_numel * wire),
               "clients_sampled": len(outcomes), "clients_completed": len(done),
               "workers": len(self.pool.members.usable()),
               "clients_failed": sum(o.status != "ok" for o in outcomes.values()),
               "clients_rejected": sum(o.status == "rejected" for o in outcomes.values()),
               "status": "degraded" if not done or len(done) < needed else "ok",
               "train_loss": weighted([r.train_loss for r in done], [r.num_samples for r in done]),
               "aggregator": self.aggregator.name}
        row.update({f"agg_{k}": float(v) for k, v in agg.result.stats.items()})
        return row

    def _client_rows(self, rnd: int, plans: dict[int, ClientPlan], outcomes: dict[int, JobOutcome]) -> list[dict]:
        wire = self.cfg.output.wire_dtype_bytes
        rows = []
        for cid, plan in plans.items():
            r = outcomes[cid].result
            up = self.ledger.upload_numel(plan, r.hook_output) * wire if r else 0
            rows.append(client_row(rnd, cid, self.ranks[cid], plan, outcomes[cid], int(self.clients.train_sizes()[cid]),
                                   cid in self.noisy, int(up)))
        return rows

    # ------------------------------------------------------------------------------------------------ state

    def state_dict(self, rnd: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The server state after round `rnd` as checkpoint tensors and metadata (raysim.coordinator_state)."""
        return coordinator_state(self, rnd)

    def load_state_dict(self, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> int:
        """Restore a checkpoint; returns the round it was taken after."""
        return restore_coordinator(self, tensors, meta)

    def cohort_calibrations(self) -> dict[int, dict]:
        """Per worker, the cohort size `resources.cohort_size: auto` chose and what it measured."""
        return self.pool.cohort_calibrations()

    def final_adapter(self, base_model_name: str) -> tuple[dict[str, bytes], dict[str, np.ndarray] | None]:
        """(PEFT adapter directory files, cumulative base delta per module or None)."""
        files = self.pool.call_live("export_adapter", self.aggregator.evaluation_factors(),
                                    self.heads.global_head, base_model_name)
        delta = self._model_base_delta()
        return files, None if delta is None else {name: d.astype(np.float32) for name, d in delta.items()}

    def _model_base_delta(self) -> dict[str, np.ndarray] | None:
        """The global model's change of the frozen base, dense per module: what the base log folded in
        (FedEx, FLoRA) plus what only the global model carries (FlexLoRA's part beyond r_max), or None."""
        delta = self.base_log.cumulative() if self.aggregator.changes_base else {}
        for name, d in (self.aggregator.evaluation_base_delta() or {}).items():
            delta[name] = delta.get(name, 0) + d.dense()
        return delta or None

    @ray.method(concurrency_group=METRICS_GROUP)
    def deviation_metric(self, per_module, new_global, base_delta, old_global) -> tuple[float, float, list[dict]]:
        """(deviation_rel, deviation_rel_round, one modules.parquet row per module without its round), in the
        metrics thread; it reads only its arguments (BLAS threads: as set in __init__)."""
        rep = deviation(per_module, new_global, base_delta, old_global)
        modules = [{"module": name, "deviation_rel": rel, "ideal_norm": rep.ideal_norms[name]}
                   for name, rel in rep.per_module.items()]
        return rep.deviation_rel, rep.deviation_rel_round, modules

    def shutdown(self) -> None:
        self.pool.shutdown()


Coordinator = ray.remote(num_cpus=0, max_restarts=0, concurrency_groups={METRICS_GROUP: 1})(CoordinatorImpl)
