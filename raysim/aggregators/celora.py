"""CE-LoRA: tri-matrix B·C·A, only C shared, personalised similarity-weighted mixing (arXiv 2503.23869).

The paper publishes no server handler; everything below is raysim's specification (◆, see
docs/algorithms.md, CE-LoRA).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from raysim.aggregators.base import (SHARED_SEED, AggregateResult, Aggregator, ClientData, ClientPlan,
                                     ClientUpdate, MethodParams, derived_rng, kaiming_a, register)
from raysim.aggregators.fedsa import drift_stats
from raysim.lora.factors import Factors, LoRAFactors, fold_core, grams, sandwich_norms, stacked

ONLY_C = frozenset({"c"})
ABC = frozenset({"a", "b", "c"})


class CELoRAParams(MethodParams):
    tau: float = Field(5.0, ge=0, description="softmax temperature τ; 0 = uniform averaging")
    beta: float = Field(0.5, ge=0, le=1, description="mix β of data similarity vs parameter similarity")
    train_ab: bool = Field(True, description="train the client-local A, B (false: frozen shared frame)")
    ab_lr_scale: float = Field(0.1, gt=0, description="learning rate of A and B relative to C")
    prior: Literal["none", "samples"] = Field("none", description="'samples' adds log p_j to z_kj")
    descriptor_noise: float = Field(0.0, ge=0, description="std of Gaussian noise on each descriptor")


def label_descriptor(data: ClientData) -> np.ndarray:
    """CE-LoRA's client hook: d_k, the normalised histogram of the client's training labels, float32."""
    num_labels = data.num_labels
    hist = np.bincount(np.asarray(data.labels, dtype=np.int64), minlength=num_labels)[:num_labels].astype(np.float64)
    total = hist.sum()
    return (hist / total if total > 0 else hist).astype(np.float32)


def cosine_matrix(rows: list[np.ndarray | None]) -> np.ndarray:
    """cos(x_k, x_j) for all pairs, float64; a missing or zero row has similarity 0 with everything."""
    k = len(rows)
    dim = next((r.size for r in rows if r is not None), 0)
    x = np.zeros((k, dim))
    for i, r in enumerate(rows):
        if r is not None:
            x[i] = np.asarray(r, dtype=np.float64).ravel()
    norms = np.linalg.norm(x, axis=1)
    x = np.divide(x, norms[:, None], out=np.zeros_like(x), where=norms[:, None] > 0)
    return x @ x.T


def personal_weights(descriptors: list[np.ndarray | None], deltas: list[np.ndarray], tau: float, beta: float,
                     log_prior: np.ndarray | None = None) -> np.ndarray:
    """W (K, K), rows summing to 1: w_kj = softmax_j τ(β cos(d_k, d_j) + (1−β) cos(ΔC_k, ΔC_j)) [+ log p_j]."""
    z = beta * cosine_matrix(descriptors) if beta > 0 else np.zeros((len(deltas), len(deltas)))
    if beta < 1:
        z = z + (1.0 - beta) * cosine_matrix(list(deltas))
    z = tau * z
    if log_prior is not None:
        z = z + np.asarray(log_prior, dtype=np.float64)[None, :]
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@register("celora")
class CELoRA(Aggregator):
    """CE-LoRA: ΔW = s·B·C·A with A, B local and only C (r×r) sent; the server mixes C per client.

    Init (◆): A, B of every module drawn once from the run seed, identical on all clients (A Kaiming
    fan-in n, B Kaiming fan-in r), C = 0, so C has a gradient at step 0 (with PEFT's B = 0 it never
    would). Each round a sampled client k starts from its own A_k, B_k (kept by the server standing
    in for the client's storage, `client_ab`; the shared frame before it first trains) and its
    personalised C_k (`client_c`, 0 at first), trains C at lr and A, B at `ab_lr_scale`·lr (or only
    C with `train_ab: false`), and uploads C only (plus, once, its label-histogram descriptor d_k).
    The server forms ΔC_k = C_k(after) − C_k(sent) and, over the clients that completed,
    w_kj = softmax_j τ(β cos(d_k, d_j) + (1−β) cos(ΔC_k, ΔC_j)) (+ log p_j with `prior: samples`),
    C_k ← Σ_j w_kj C_j. A client of weight p_j = 0 is never mixed into others (w_kj = 0). Clients
    not sampled keep their stored C_k. The global model (evaluation and the exported adapter) is the
    shared frame with the non-personalised average C̄ = Σ p_j C_j of the last round (p_j as set by
    federation.weighting), exported with C folded into B. Stats: mean self-weight w_kk, mean row
    entropy / log K (1 = uniform), the mixing drift δ_k = ‖s·B_k·(C_k(mixed) − C_k(after))·A_k‖_F /
    ‖s·B_k·C_k(after)·A_k‖_F over all modules (p-weighted mean and max, as FedSA-LoRA's broadcast
    drift), and the number of descriptors received (each reveals a client's label distribution: the
    privacy cost). The frame's seed is charged once per client (`once`).
    """

    personalized = True
    uploads = "C_k (r×r); once: label histogram d_k"
    broadcasts = "personalised C_k"
    comm_per_module = "up r², down r² (+ descriptor once)"
    Params = CELoRAParams

    global_state = Aggregator.global_state + ("last_weights",)
    client_state = ("client_c", "client_ab", "descriptors")
    client_c: dict[int, dict[str, np.ndarray]]                          # personalised C_k
    client_ab: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]]      # local (A_k, B_k)
    descriptors: dict[int, np.ndarray]                                  # d_k, as received
    last_weights: np.ndarray | None                                     # W of the last round

    def reset_state(self) -> None:
        super().reset_state()
        self.last_weights = None

    def setup(self, init, client_ranks, scale_of_rank, seed) -> None:
        super().setup(init, client_ranks, scale_of_rank, seed)
        ranks = set(client_ranks.values())
        if len(ranks) != 1:
            raise ValueError("celora needs one rank for all clients")
        r = ranks.pop()
        scale = scale_of_rank(r)
        self.global_factors = {}
        for name, f in init.items():
            m, n = f.shape
            rng = derived_rng(seed, "celora-frame", name)
            a = kaiming_a(r, n, rng).astype(f.a.dtype)               # U(±1/√n), fan-in n
            b = kaiming_a(m, r, rng).astype(f.a.dtype)               # U(±1/√r), fan-in r
            self.global_factors[name] = LoRAFactors(a=a, b=b, scale=scale, c=np.zeros((r, r), dtype=f.a.dtype))

    # -- per-client state ------------------------------------------------------------------------------

    def own_c(self, client_id: int) -> dict[str, np.ndarray]:
        """The client's personalised C_k (0 before its first completed round)."""
        own = self.client_c.get(client_id)
        if own is not None:
            return own
        return {name: np.zeros_like(g.c) for name, g in self.global_factors.items()}

    def own_ab(self, client_id: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The client's local (A_k, B_k); the shared frame (the global A, B) before it first trains."""
        own = self.client_ab.get(client_id)
        if own is not None:
            return own
        return {name: (g.a, g.b) for name, g in self.global_factors.items()}

    def plan(self, rnd: int, client_id: int) -> ClientPlan:
        scale = self.global_factors[next(iter(self.global_factors))].scale
        c, ab = self.own_c(client_id), self.own_ab(client_id)
        start = {name: LoRAFactors(a=ab[name][0].copy(), b=ab[name][1].copy(), scale=scale, c=c[name].copy())
                 for name in self.global_factors}
        p = self.params
        return ClientPlan(start=start, train=ABC if p.train_ab else ONLY_C, upload=ONLY_C, download=ONLY_C,
                          lr_scale={"a": p.ab_lr_scale, "b": p.ab_lr_scale},
                          client_hook=None if client_id in self.descriptors else label_descriptor,
                          once=SHARED_SEED)        # the frame's seed: the ledger charges it once per client

    # -- server ------------------------------------------------------------------------------------------

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> AggregateResult:
        p = self.params
        updates = sorted(updates, key=lambda u: u.client_id)
        names = list(self.global_factors)
        received = self._receive_descriptors(updates)
        after = [{name: u.factors[name].c for name in names} for u in updates]
        deltas = [np.concatenate([(c[name].astype(np.float64) - self.own_c(u.client_id)[name]).ravel()
                                  for name in names]) for u, c in zip(updates, after)]
        pw = np.array([u.weight for u in updates])
        # log p_j with `prior: samples`; a client of weight 0 is never mixed into others
        with np.errstate(divide="ignore"):
            prior = np.log(pw) if p.prior == "samples" else np.where(pw > 0, 0.0, -np.inf)
        w = personal_weights([self.descriptors.get(u.client_id) for u in updates], deltas, p.tau, p.beta, prior)
        after_c = np.stack([np.stack([c[name].astype(np.float64) for name in names]) for c in after])  # (K, M, r, r)
        mixed = (w @ after_c.reshape(len(updates), -1)).reshape(after_c.shape)   # C_k ← Σ_j w_kj C_j, every module
        dtype = self.global_factors[names[0]].c.dtype
        for k, u in enumerate(updates):
            self.client_c[u.client_id] = {name: mixed[k, i].astype(dtype) for i, name in enumerate(names)}
            if p.train_ab:
                self.client_ab[u.client_id] = {name: (u.factors[name].a.copy(), u.factors[name].b.copy())
                                               for name in names}
        drift = mixing_drifts(updates, names, mixed.astype(dtype))
        c_bar = (pw @ after_c.reshape(len(updates), -1)).reshape(after_c.shape[1:])   # C̄, plain p-average
        for i, g in enumerate(self.global_factors.values()):
            g.c = c_bar[i].astype(g.c.dtype)
        self.last_weights = w
        stats = _weight_stats(w) | drift_stats(drift, {u.client_id: u.weight for u in updates})
        return AggregateResult(stats=stats | {"descriptors_received": float(received)})

    def _receive_descriptors(self, updates: list[ClientUpdate]) -> int:
        """Store the descriptors d_k that came with this round's updates (each client's first); returns how many."""
        received = 0
        for u in updates:
            if u.hook_output is not None and u.client_id not in self.descriptors:
                d = np.asarray(u.hook_output, dtype=np.float64)
                if self.params.descriptor_noise > 0:     # simulates noise the client adds before sending
                    noise = derived_rng(self.seed, "celora-descriptor", u.client_id).normal(size=d.shape)
                    d = d + self.params.descriptor_noise * noise
                self.descriptors[u.client_id] = d
                received += 1
        return received

    def evaluation_factors(self) -> Factors:
        """The shared frame with C̄, as plain LoRA factors (b ← b·C̄): the same ΔW, exportable by PEFT."""
        return fold_core(self.global_factors)


def mixing_drifts(updates: list[ClientUpdate], names: list[str], mixed: np.ndarray) -> dict[int, float]:
    """δ_k = ‖s·B_k·(C_k(mixed) − C_k(after))·A_k‖_F / ‖s·B_k·C_k(after)·A_k‖_F per client, all modules together:
    how far mixing moves the client's own adapter from the one it trained (NaN if that adapter is 0).
    mixed: (K, modules, r, r) in the order of `updates` and `names`; r×r Gram forms, no m×n product."""
    num2 = np.zeros(len(updates))
    den2 = np.zeros(len(updates))
    for i, name in enumerate(names):
        fs = [u.factors[name] for u in updates]
        gb = grams([f.b for f in fs], "left") * np.array([f.scale for f in fs])[:, None, None] ** 2
        ga = grams([f.a for f in fs], "right")                                             # A_k A_kᵀ (K, r, r)
        c = stacked([f.c for f in fs])                                                     # (K, r, r)
        num2 += sandwich_norms(gb, ga, mixed[:, i].astype(np.float64) - c) ** 2
        den2 += sandwich_norms(gb, ga, c) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        drift = np.where(den2 > 1e-24, np.sqrt(num2 / den2), np.nan)
    return {u.client_id: float(d) for u, d in zip(updates, drift)}


def _weight_stats(w: np.ndarray) -> dict[str, float]:
    k = w.shape[0]
    entropy = -np.sum(w * np.log(np.clip(w, 1e-300, None)), axis=1)
    return {"self_weight_mean": float(np.mean(np.diag(w))),
            "weight_entropy_rel": float(np.mean(entropy) / np.log(k)) if k > 1 else 1.0}
