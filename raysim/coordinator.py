"""The Coordinator actor: owns the round loop and every piece of server state.

State: the aggregator (global adapter, method state, client-local state such as FedSA's B_k), the
averaged classifier head, the log of factored base deltas (FedEx-LoRA residuals, FLoRA merges),
each client's last base synchronisation (for catch-up download accounting) and the worker pool.
All randomness is derived from (seed, round, client), so a resumed run repeats an uninterrupted one.
`run_round` returns plain data; the driver (raysim.runner) writes files and draws progress.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from raysim.aggregators import resolve_aggregator
from raysim.aggregators.base import AggregateResult, ClientPlan, ClientUpdate, weighted_mean
from raysim.config import ExperimentConfig
from raysim.engines.base import ClientJob
from raysim.lora.factors import BaseDelta, Factors, LoRAFactors, deviation, normalise_weights
from raysim.pool import JobOutcome, WorkerPool
from raysim.data.noise import apply_label_noise
from raysim.ranks import assign_ranks, check_ranks_fit, scale_for
from raysim.sampling import ClientSampler, derive_seed


def tokenize_for_model(raw, cfg: ExperimentConfig) -> dict[str, np.ndarray]:
    """Token ids, masks and labels as numpy arrays for the object store (cached on disk)."""
    import os
    from pathlib import Path

    from raysim.data.tokenize import tokenize
    from raysim.models import load_tokenizer

    tokenizer = None if raw.texts is None else load_tokenizer(cfg.model.name)
    cache = Path(os.environ.get("RAYSIM_CACHE", Path.home() / ".cache" / "raysim")) / "tokens"
    data = tokenize(raw, tokenizer, cfg.model.max_length, cache_dir=cache)
    return {"input_ids": data.input_ids, "attention_mask": data.attention_mask, "labels": data.labels}


@dataclass
class RoundOutput:
    row: dict[str, Any]                                     # one rounds.parquet row
    clients: list[dict[str, Any]]                           # clients.parquet rows
    uploads: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)   # save_updates only
    upload_meta: dict[int, dict[str, str]] = field(default_factory=dict)
    global_tensors: dict[str, np.ndarray] | None = None     # save_updates only
    checkpoint: tuple[dict[str, np.ndarray], dict[str, Any]] | None = None


def frozen_changed(start: Factors, end: Factors, train: frozenset[str]) -> list[str]:
    """`module.factor` names whose frozen factor (not in `train`) differs bit for bit between the factors
    a client was sent (`start`) and those it returned (`end`): FFA-LoRA and RoLoRA are exact only if
    every client's frozen factor is the broadcast one (ALGORITHMS.md §2.3, §2.10)."""
    changed = []
    for name, f in start.items():
        for key in ("a", "b", "c"):
            if key in train or getattr(f, key) is None:
                continue
            if not np.array_equal(np.asarray(getattr(f, key)), np.asarray(getattr(end[name], key))):
                changed.append(f"{name}.{key}")
    return changed


class CoordinatorImpl:
    def __init__(self, cfg_dict: dict, raw, partition: dict[str, Any], gpus_per_worker: float):
        self.cfg = ExperimentConfig.model_validate(cfg_dict)
        cfg = self.cfg
        self.test_idx = np.asarray(partition["test_idx"])
        self.client_train = [np.asarray(x) for x in partition["client_train"]]
        self.client_test = [np.asarray(x) for x in partition["client_test"]]
        self.num_labels = int(raw.num_labels)
        # workers start building their models now; tokenisation runs meanwhile, here
        self.pool = WorkerPool(cfg_dict, self.num_labels, cfg.resources.num_workers,
                               cfg.resources.cpus_per_worker, gpus_per_worker)
        arrays = tokenize_for_model(raw, cfg)
        # data.label_noise: noisy training labels of some clients (test rows keep their true labels)
        arrays["labels"], noisy = apply_label_noise(arrays["labels"], self.client_train, cfg, self.num_labels)
        self.noisy = {int(c) for c in noisy}
        self.pool.attach_data(ray.put(arrays))
        self.sampler = ClientSampler(cfg.federation.num_clients, cfg.federation.clients_per_round, cfg.seed)
        self.ranks = assign_ranks(cfg, [len(t) for t in self.client_train])
        self.scale_of_rank = scale_for(cfg)
        self.aggregator = resolve_aggregator(cfg.aggregator.name, cfg.aggregator.params(), cfg)
        init_factors, self.head = self.pool.call_first("initial_state")
        # lora.head_policy: local — each client's own head (absent: the initial head); never sent
        self.client_heads: dict[int, dict[str, np.ndarray]] = {}
        self.initial_head = {k: v.copy() for k, v in self.head.items()}
        self.module_shapes = {k: f.shape for k, f in init_factors.items()}
        check_ranks_fit(cfg, self.module_shapes)              # before any training
        self.aggregator.setup(init_factors, self.ranks, self.scale_of_rank, cfg.seed)
        self.last_sync = {c: 0 for c in range(cfg.federation.num_clients)}   # base version each client holds
        self.base_sizes: list[tuple[int, dict[str, int]]] = []               # (version, numel per module)
        self.started = time.time()
        self.elapsed_before = 0.0

    # ------------------------------------------------------------------------------------------------ round

    def run_round(self, rnd: int) -> RoundOutput:
        cfg = self.cfg
        t0 = time.perf_counter()

        # 1. who trains, and what each client starts from
        sampled = self.sampler.sample(rnd)
        plans = {cid: self.aggregator.plan(rnd, cid) for cid in sampled}
        bytes_down = sum(self._download_numel(cid, plans[cid]) for cid in sampled)

        # 2. train them on the workers (deadline, retries, stragglers)
        jobs = [self._job(rnd, cid, plans[cid]) for cid in sampled]
        outcomes = self.pool.run_jobs(jobs, cfg.federation.round_timeout_s, cfg.federation.max_task_retries,
                                      kill_after_submit=cfg.faults.kill_worker_at_round == rnd)
        completed = [cid for cid in sampled if outcomes[cid].status == "ok"]

        # 3. aggregate (pure math) and apply: head FedAvg, base delta to the log
        old_global = {k: f.copy() for k, f in self.aggregator.global_factors.items()}
        updates = self._updates(completed, plans, outcomes)
        result, dev = AggregateResult(), None
        if updates:
            result = self.aggregator.aggregate(rnd, updates)
            self.head = self._average_head(updates, outcomes)
            if self._local_head():
                self.client_heads.update({u.client_id: outcomes[u.client_id].result.head for u in updates})
            if result.base_delta:
                self._log_base_delta(rnd, result.base_delta)
            dev = self._deviation(updates, result, old_global)
        bytes_up = sum(self._upload_numel(plans[cid], outcomes[cid].result) for cid in completed)

        # 4. evaluate the global model
        accuracy = loss = float("nan")
        if rnd % cfg.eval.every == 0 or rnd == cfg.federation.rounds:
            ev = self.pool.evaluate(ray.put(self.aggregator.evaluation_factors()), ray.put(self.head),
                                    self.test_idx, cfg.federation.round_timeout_s)
            accuracy, loss = ev.accuracy, ev.loss

        # 5. metrics (and what crossed the wire, if asked)
        wire = cfg.output.wire_dtype_bytes
        round_time = time.perf_counter() - t0
        personal = [outcomes[c].result.local_accuracy for c in completed
                    if outcomes[c].result.local_accuracy is not None]
        personal_w = [outcomes[c].result.num_samples for c in completed
                      if outcomes[c].result.local_accuracy is not None]
        row = {
            "round": rnd,
            "wall_s": self.elapsed_before + (time.time() - self.started),
            "round_time_s": round_time,
            "accuracy": accuracy,
            "loss": loss,
            "personalized_accuracy": (float(np.average(personal, weights=personal_w))
                                      if personal and self._personal_eval() else None),
            "deviation_rel": None if dev is None else dev[0],
            "deviation_rel_round": None if dev is None else dev[1],
            "bytes_up": int(bytes_up * wire),
            "bytes_down": int(bytes_down * wire),
            "clients_sampled": len(sampled),
            "clients_completed": len(completed),
            "clients_failed": sum(o.status != "ok" for o in outcomes.values()),
            "train_loss": (float(np.average([outcomes[c].result.train_loss for c in completed],
                                            weights=[outcomes[c].result.num_samples for c in completed]))
                           if completed else float("nan")),
            "aggregator": self.aggregator.name,
        }
        row.update({f"agg_{k}": float(v) for k, v in result.stats.items()})
        out = RoundOutput(row=row, clients=self._client_rows(rnd, sampled, plans, outcomes, wire))
        if cfg.output.save_updates:
            self._attach_updates(out, updates, plans)
        if cfg.output.checkpoint_every and (rnd % cfg.output.checkpoint_every == 0 or rnd == cfg.federation.rounds):
            out.checkpoint = self.state_dict(rnd)
        return out

    # ------------------------------------------------------------------------------------------------ parts

    def _job(self, rnd: int, cid: int, plan: ClientPlan) -> ClientJob:
        cfg = self.cfg
        train_idx = self.client_train[cid]
        steps = cfg.train.local_steps
        if cfg.train.local_epochs is not None:
            steps = max(1, int(np.ceil(cfg.train.local_epochs * len(train_idx) / cfg.train.batch_size)))
        seed = derive_seed(cfg.seed, rnd, cid)
        fault_rng = np.random.default_rng(derive_seed(cfg.seed, rnd, cid, 0xFA17))
        fail = bool(fault_rng.random() < cfg.faults.drop_rate)
        slow = bool(fault_rng.random() < cfg.faults.slow_fraction)
        return ClientJob(client_id=cid, round=rnd, seed=seed, train_idx=train_idx,
                         test_idx=self.client_test[cid] if self._personal_eval() else None,
                         start=plan.start, head=self._head_for(cid), train=plan.train, steps=steps, fail=fail,
                         sleep_s=cfg.faults.slow_client_s if slow else 0.0, lr_scale=dict(plan.lr_scale),
                         descriptor=plan.descriptor)

    def _updates(self, completed: list[int], plans: dict[int, ClientPlan],
                 outcomes: dict[int, JobOutcome]) -> list[ClientUpdate]:
        """End-of-round factors (frozen factors are the start ones, bit for bit), weights p_k."""
        if not completed:
            return []
        if self.cfg.federation.weighting == "samples":
            raw = [outcomes[c].result.num_samples for c in completed]
        else:
            raw = [1.0] * len(completed)
        p = normalise_weights(raw)
        updates = []
        for w, cid in zip(p, completed):
            got = outcomes[cid].result.factors
            if self.cfg.output.debug:
                changed = frozen_changed(plans[cid].start, got, plans[cid].train)
                if changed:
                    raise RuntimeError(f"output.debug: client {cid} changed factors that {self.aggregator.name} "
                                       f"keeps frozen: {', '.join(changed[:4])}"
                                       f"{' …' if len(changed) > 4 else ''} (an engine bug)")
            factors = {}
            for name, start in plans[cid].start.items():
                end = got[name]
                factors[name] = LoRAFactors(
                    a=end.a if "a" in plans[cid].train else start.a,
                    b=end.b if "b" in plans[cid].train else start.b,
                    scale=start.scale,
                    c=(end.c if "c" in plans[cid].train else start.c) if start.c is not None else None)
            updates.append(ClientUpdate(cid, float(w), outcomes[cid].result.num_samples, factors,
                                        descriptor=outcomes[cid].result.descriptor))
        return updates

    def _local_head(self) -> bool:
        return self.cfg.lora.head_policy == "local"

    def _head_for(self, cid: int) -> dict[str, np.ndarray]:
        """What the client's head starts from: the global head, or (local) its own last head."""
        if self._local_head():
            return self.client_heads.get(cid, self.initial_head)
        return self.head

    def _average_head(self, updates: list[ClientUpdate], outcomes: dict[int, JobOutcome]) -> dict[str, np.ndarray]:
        """The global head: FedAvg of this round's heads. With head_policy local it is computed only to
        evaluate the global adapter (`accuracy`, the exported adapter) and is never sent to a client."""
        if not self.cfg.lora.train_head:
            return self.head
        weights = [u.weight for u in updates]
        return {k: weighted_mean([outcomes[u.client_id].result.head[k] for u in updates], weights).astype(np.float32)
                for k in self.head}

    def _log_base_delta(self, rnd: int, delta: dict[str, BaseDelta]) -> None:
        per_module = {k: (d.u.astype(np.float64), d.v.astype(np.float64)) for k, d in delta.items() if d.u.shape[1]}
        self.pool.record_base_delta(rnd, per_module)
        self.base_sizes.append((rnd, {k: BaseDelta(*uv).numel() for k, uv in per_module.items()}))

    def _deviation(self, updates, result: AggregateResult, old_global: Factors) -> tuple[float | None, float | None]:
        if result.deviation_rel is not None:
            return result.deviation_rel, None
        if self.aggregator.personalized:
            return None, None
        per_module = {name: [(u.weight, u.factors[name]) for u in updates] for name in updates[0].factors}
        rep = deviation(per_module, self.aggregator.global_factors, result.base_delta, old_global)
        return rep.deviation_rel, rep.deviation_rel_round

    # -- communication (ALGORITHMS.md §1.7), in scalars -----------------------------------------------------

    def _head_numel(self) -> int:
        """Head scalars each way per client: the whole head under fedavg, none when frozen or local."""
        return sum(v.size for v in self.head.values()) if self.cfg.lora.train_head and not self._local_head() else 0

    def _download_numel(self, cid: int, plan: ClientPlan) -> int:
        """Factors sent + head + base catch-up min(m·n, Σ missed factored changes); marks the client synced."""
        numel = (sum(f.numel(tuple(plan.download)) for f in plan.start.values()) + self._head_numel()
                 + plan.extra_download)
        missed: dict[str, int] = {}
        for version, sizes in self.base_sizes:
            if version > self.last_sync[cid]:
                for name, size in sizes.items():
                    missed[name] = missed.get(name, 0) + size
        for name, size in missed.items():
            m, n = self.module_shapes[name]
            numel += min(m * n, size)
        if self.base_sizes:
            self.last_sync[cid] = self.base_sizes[-1][0]
        return numel

    def _upload_numel(self, plan: ClientPlan, result=None) -> int:
        """Uploaded factors + head + a data descriptor if this result carries one (sent once, CE-LoRA)."""
        descriptor = 0 if result is None or result.descriptor is None else int(np.size(result.descriptor))
        return sum(f.numel(tuple(plan.upload)) for f in plan.start.values()) + self._head_numel() + descriptor

    def _personal_eval(self) -> bool:
        """Per-client evaluation on local test splits: eval.personalized, always on for personalised methods
        and local heads."""
        return self.cfg.eval.personalized or self.aggregator.personalized or self._local_head()

    def _client_rows(self, rnd, sampled, plans, outcomes: dict[int, JobOutcome], wire: int) -> list[dict]:
        rows = []
        for cid in sampled:
            o = outcomes[cid]
            r = o.result
            rows.append({
                "round": rnd, "client_id": cid, "worker": o.worker,
                "rank": next((f.rank for f in plans[cid].start.values()), self.ranks[cid]),
                "noisy": cid in self.noisy,
                "num_samples": int(len(self.client_train[cid])),
                "train_loss": r.train_loss if r else None,
                "train_time_s": r.train_time_s if r else None,
                "bytes_up": int(self._upload_numel(plans[cid], r) * wire) if r else 0,
                "local_accuracy": r.local_accuracy if r else None,
                "status": o.status,
            })
        return rows

    def _attach_updates(self, out: RoundOutput, updates: list[ClientUpdate], plans: dict[int, ClientPlan]) -> None:
        """What crossed the wire: each client's uploaded tensors (PEFT names, unscaled) and the global state."""
        import json

        short = {"a": "lora_A", "b": "lora_B", "c": "lora_C"}
        for u in updates:
            tensors, scales = {}, {}
            for name, f in u.factors.items():
                for key in sorted(plans[u.client_id].upload):
                    tensors[f"{name}.{short[key]}"] = np.ascontiguousarray(getattr(f, key), dtype=np.float32)
                scales[name] = f.scale
            if u.descriptor is not None:            # CE-LoRA's one-off data descriptor
                tensors["descriptor"] = np.ascontiguousarray(u.descriptor, dtype=np.float32)
            out.uploads[u.client_id] = tensors
            uniq = set(scales.values())
            out.upload_meta[u.client_id] = {"weight": repr(u.weight),
                                            "scale": repr(uniq.pop()) if len(uniq) == 1 else json.dumps(scales)}
        glob = {}
        for name, f in self.aggregator.global_factors.items():
            glob[f"{name}.lora_A"] = np.ascontiguousarray(f.a, dtype=np.float32)
            glob[f"{name}.lora_B"] = np.ascontiguousarray(f.b, dtype=np.float32)
            if f.c is not None:
                glob[f"{name}.lora_C"] = np.ascontiguousarray(f.c, dtype=np.float32)
        if self.aggregator.changes_base:
            for name, delta in self.cumulative_base_delta().items():
                glob[f"{name}.base_delta"] = delta.astype(np.float32)
        out.global_tensors = glob

    def cumulative_base_delta(self) -> dict[str, np.ndarray]:
        """W_base − W0 per module (m, n), float64, from the factored log."""
        out: dict[str, np.ndarray] = {}
        for _, per_module in self.pool.base_log:
            for name, (u, v) in per_module.items():
                out[name] = out.get(name, 0) + u @ v
        return out

    # ------------------------------------------------------------------------------------------------ state

    def state_dict(self, rnd: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        agg_tensors, agg_meta = self.aggregator.state_dict()
        tensors = {f"agg/{k}": np.ascontiguousarray(v) for k, v in agg_tensors.items()}
        tensors.update({f"head/{k}": v for k, v in self.head.items()})
        tensors.update({f"client_head/{cid}/{k}": v for cid, h in self.client_heads.items() for k, v in h.items()})
        for version, per_module in self.pool.base_log:
            for name, (u, v) in per_module.items():
                tensors[f"base/{version}/{name}/u"] = np.ascontiguousarray(u)
                tensors[f"base/{version}/{name}/v"] = np.ascontiguousarray(v)
        meta = {"round": rnd, "aggregator": agg_meta, "head": sorted(self.head),
                "client_heads": sorted(self.client_heads),
                "base_versions": {str(v): sorted(d) for v, d in self.pool.base_log},
                "last_sync": {str(k): v for k, v in self.last_sync.items()},
                "wall_s": self.elapsed_before + (time.time() - self.started)}
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> int:
        """Restore a checkpoint; returns the round it was taken after."""
        self.aggregator.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("agg/")},
                                        meta["aggregator"])
        self.head = {k: np.array(tensors[f"head/{k}"]) for k in meta["head"]}
        self.client_heads = {int(cid): {k: np.array(tensors[f"client_head/{cid}/{k}"]) for k in meta["head"]}
                             for cid in meta.get("client_heads", [])}
        for version in sorted(int(v) for v in meta["base_versions"]):
            per_module = {name: (np.array(tensors[f"base/{version}/{name}/u"]),
                                 np.array(tensors[f"base/{version}/{name}/v"]))
                          for name in meta["base_versions"][str(version)]}
            self.pool.record_base_delta(version, per_module)
            self.base_sizes.append((version, {k: BaseDelta(*uv).numel() for k, uv in per_module.items()}))
        self.last_sync = {int(k): int(v) for k, v in meta["last_sync"].items()}
        self.elapsed_before = float(meta["wall_s"])
        self.started = time.time()
        return int(meta["round"])

    def final_adapter(self, base_model_name: str) -> tuple[dict[str, bytes], dict[str, np.ndarray] | None]:
        """(PEFT adapter directory files, cumulative base delta per module or None)."""
        files = self.pool.call_first("export_adapter", self.aggregator.evaluation_factors(), self.head,
                                     base_model_name)
        delta = None
        if self.aggregator.changes_base:
            delta = {name: d.astype(np.float32) for name, d in self.cumulative_base_delta().items()}
        return files, delta

    def shutdown(self) -> None:
        self.pool.shutdown()


Coordinator = ray.remote(num_cpus=0, max_restarts=0)(CoordinatorImpl)
