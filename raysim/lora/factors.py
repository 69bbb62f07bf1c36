"""Canonical LoRA factor layout and the factored linear algebra the server needs (numpy).

Layout (identical to PEFT; docs/algorithms.md, "Factor layout") for a module with W0 ∈ ℝ^{m×n}:

    a: (r, n)   = lora_A.weight
    b: (m, r)   = lora_B.weight          (unscaled)
    ΔW = scale · b @ a ∈ ℝ^{m×n}

Server math uses the scale-folded b̃ = scale·b so that ΔW = b̃ @ a whatever the client's scale.
A change of the frozen base is kept factored, W_base += u @ v with u: (m, q), v: (q, n), or dense
(u: (m, n), v None) where q(m+n) > m·n, always in nn.Linear orientation (m×n); `delta_matrix` reads
both forms, and `raysim.lora.peft_io.fold_into_base` is the only code that writes it into a module.

Norms and products of sums of low-rank terms follow one cost rule (`prefer_dense`): the dense m×n
product (2mnq flops) or QR of the stacked factors (≈2(m+n)q², weighted by QR_WEIGHT), whichever is
cheaper; ΔW* itself is formed (or QR'd) once per module and use.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# A flop of Householder QR (LAPACK geqrf) costs about twice a GEMM flop on the machines we measured; the
# cost rule weighs QR's ≈2(m+n)q² by this (docs/algorithms.md, "Norms and SVDs of factored products")
QR_WEIGHT = 2.0


@dataclass
class LoRAFactors:
    """One module's adapter: a (r, n), b (m, r) unscaled, scale s; optional tri-matrix core c (r, r)."""

    a: np.ndarray
    b: np.ndarray
    scale: float
    c: np.ndarray | None = None

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(m, n) of the module's weight."""
        return int(self.b.shape[0]), int(self.a.shape[1])

    def b_tilde(self) -> np.ndarray:
        """Scale-folded b̃ = s·b (m, r); with a core c, b̃ = s·b·c so that ΔW = b̃ @ a."""
        b = self.b if self.c is None else self.b @ self.c
        return self.scale * b

    def product(self) -> np.ndarray:
        """Dense ΔW = s·b·(c)·a, (m, n)."""
        return self.b_tilde() @ self.a

    def copy(self) -> "LoRAFactors":
        return LoRAFactors(self.a.copy(), self.b.copy(), float(self.scale),
                           None if self.c is None else self.c.copy())

    def numel(self, names: tuple[str, ...] | frozenset[str] = ("a", "b")) -> int:
        return int(sum(getattr(self, n).size for n in names if getattr(self, n) is not None))


Factors = dict[str, LoRAFactors]


def fold_core(factors: Factors) -> Factors:
    """Tri-matrix factors as plain LoRA factors with the same ΔW: b ← b·c, c dropped (export, evaluation)."""
    return {name: f if f.c is None else LoRAFactors(a=f.a, b=(f.b @ f.c).astype(f.b.dtype), scale=f.scale)
            for name, f in factors.items()}


@dataclass
class BaseDelta:
    """Change of one module's frozen weight: ΔW_base = u @ v, u (m, q), v (q, n); or dense, u (m, n), v None.

    The dense form is used where it is smaller (q(m+n) > m·n); `delta_matrix(u, v)` reads both.
    """

    u: np.ndarray
    v: np.ndarray | None

    def dense(self) -> np.ndarray:
        return delta_matrix(self.u, self.v)

    def is_empty(self) -> bool:
        """A factored change of rank 0 (u has no columns): nothing to apply or send."""
        return is_empty_term((self.u, self.v))

    def numel(self) -> int:
        """Scalars needed to send it: factored q(m+n), or dense m·n if that is smaller."""
        m, n = self.shape
        if self.v is None:
            return m * n
        return int(min(m * n, self.u.shape[1] * (m + n)))

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.u.shape[0]), int(self.u.shape[1] if self.v is None else self.v.shape[1])


def delta_matrix(u: np.ndarray, v: np.ndarray | None) -> np.ndarray:
    """The m×n matrix of a base-delta pair, float64: u @ v, or u itself when v is None (the dense form)."""
    u = np.asarray(u, dtype=np.float64)
    return u if v is None else u @ np.asarray(v, dtype=np.float64)


def compact_delta(u: np.ndarray, v: np.ndarray) -> BaseDelta:
    """A factored delta as stored: dense (u @ v, None) when q(m+n) > m·n, else as given."""
    m, q = u.shape
    n = v.shape[1]
    return BaseDelta(u @ v, None) if q * (m + n) > m * n else BaseDelta(u, v)


def prefer_dense(m: int, n: int, q: int) -> bool:
    """The cost rule: form the m×n product (2mnq flops) rather than QR the stacked factors (≈2(m+n)q²,
    weighted by QR_WEIGHT) when that is cheaper."""
    return m * n <= QR_WEIGHT * (m + n) * q


Term = tuple[np.ndarray, np.ndarray | None]        # (L, R): the matrix L @ R, or L itself when R is None


def sum_norms(terms: list[Term], combos: list[list[float]]) -> list[float]:
    """‖Σ_i c_i L_i R_i‖_F for each coefficient list c in `combos`, in float64, by the cost rule.

    Equal terms (e.g. FLoRA's base delta and the stack of ΔW*) are merged first, their coefficients
    added up. Dense: each term's product is formed at most once (one BLAS product). QR: one QR of the
    stacked left and of the stacked right factors, then ‖R₁·diag(c)·R₂ᵀ‖ of the small core per
    combination, accurate even when the sum nearly cancels. A dense term (R None) forces the dense form.
    """
    terms, combos = _merge_terms(terms, combos)
    if not terms:
        return [0.0] * len(combos)
    m = terms[0][0].shape[0]
    n = terms[0][0].shape[1] if terms[0][1] is None else terms[0][1].shape[1]
    q = sum(0 if r is None else l.shape[1] for l, r in terms)
    if any(r is None for _, r in terms) or prefer_dense(m, n, q):
        return _dense_norms(terms, combos)
    left = np.concatenate([np.asarray(l, dtype=np.float64) for l, _ in terms], axis=1)
    right = np.concatenate([np.asarray(r, dtype=np.float64) for _, r in terms], axis=0)
    r1 = np.linalg.qr(left, mode="r")                                  # left = Q₁R₁
    r2 = np.linalg.qr(right.T, mode="r")                               # rightᵀ = Q₂R₂
    widths = [l.shape[1] for l, _ in terms]
    return [float(np.linalg.norm((r1 * np.repeat(np.asarray(c, dtype=np.float64), widths)) @ r2.T))
            for c in combos]


def _merge_terms(terms: list[Term], combos: list[list[float]]) -> tuple[list[Term], list[list[float]]]:
    """The distinct non-empty terms that some combination uses, with the coefficients of equal terms added."""
    keep: list[int] = []
    where: dict[int, int] = {}
    for i, term in enumerate(terms):
        if is_empty_term(term) or not any(c[i] for c in combos):
            continue
        j = next((k for k, t in enumerate(keep) if _same_term(terms[t], term)), None)
        if j is None:
            keep.append(i)
            j = len(keep) - 1
        where[i] = j
    merged = []
    for c in combos:
        row = [0.0] * len(keep)
        for i, j in where.items():
            row[j] += float(c[i])
        merged.append(row)
    used = [j for j in range(len(keep)) if any(row[j] for row in merged)]
    return [terms[keep[j]] for j in used], [[row[j] for j in used] for row in merged]


def _dense_norms(terms: list[Term], combos: list[list[float]]) -> list[float]:
    """Dense sums of distinct terms: a term used by several combinations, or dense, is formed once; any
    other is added by a BLAS update (C += c·L·R, no m×n temporary); the last combination that needs a
    formed product works on it in place."""
    uses = [sum(1 for c in combos if c[i]) for i in range(len(terms))]
    formed = {i: delta_matrix(*t) for i, t in enumerate(terms) if uses[i] > 1 or t[1] is None}
    out = []
    for c in combos:
        live = [i for i in range(len(terms)) if c[i]]
        if not live:
            out.append(0.0)
            continue
        base = next((i for i in live if i in formed), max(live, key=lambda i: terms[i][0].shape[1]))
        uses[base] -= 1
        if len(live) == 1 and base in formed:        # ‖c·P‖ of a formed product: no copy
            out.append(abs(float(c[base])) * _fro(formed[base]))
            if uses[base] == 0:
                formed.pop(base)
            continue
        if base in formed:       # a dense term is the caller's array: never changed in place
            owned = uses[base] == 0 and terms[base][1] is not None
            acc = formed.pop(base) if owned else formed[base].copy()
            if c[base] != 1:
                acc *= c[base]
        else:
            acc = c[base] * delta_matrix(*terms[base])
        for i in live:
            if i == base:
                continue
            uses[i] -= 1
            if i not in formed:
                acc = _add_product(acc, c[i], *terms[i])
            elif c[i] in (1, -1):
                (np.add if c[i] == 1 else np.subtract)(acc, formed[i], out=acc)
            else:
                acc += c[i] * formed[i]
        out.append(_fro(acc))
    return out


def is_empty_term(term: Term) -> bool:
    """A factored term u·v of rank 0 (u has no columns); a dense term (v None) never is."""
    return term[1] is not None and term[0].shape[1] == 0


def _add_product(acc: np.ndarray, coef: float, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """acc + coef·left @ right, in place in acc (float64). numpy's BLAS only: calling a second BLAS library
    (scipy's) right after numpy's large product makes the two libraries' thread pools fight over the cores."""
    prod = np.asarray(left, dtype=np.float64) @ np.asarray(right, dtype=np.float64)
    if coef == 1:
        return np.add(acc, prod, out=acc)
    if coef == -1:
        return np.subtract(acc, prod, out=acc)
    prod *= coef
    return np.add(acc, prod, out=acc)


def _fro(x: np.ndarray) -> float:
    flat = np.ravel(x)
    return float(np.sqrt(np.dot(flat, flat)))


def _same_term(a: Term, b: Term) -> bool:
    """Bitwise the same factors (e.g. FLoRA's base delta, which is the stack of ΔW* itself)."""
    if (a[1] is None) != (b[1] is None):
        return False
    return all(x is y or (x.shape == y.shape and np.array_equal(x, y)) for x, y in zip(a, b) if x is not None)


def product_fro_norm(p: np.ndarray, m: np.ndarray) -> float:
    """‖p @ m‖_F for p (rows, q), m (q, cols), float64: the dense product or QR form, by the cost rule."""
    return sum_norms([(p, m)], [[1.0]])[0]


def stacked(arrays: list[np.ndarray]) -> np.ndarray:
    """The arrays on a new leading axis, float64 (one conversion for the whole stack)."""
    return np.stack(arrays).astype(np.float64, copy=False)


def grams(factors, side: str, minus_from: np.ndarray | None = None, chunk: int = 16) -> np.ndarray:
    """Gram matrices of a sequence of K factors of one shape, float64 (K, r, r): x_kᵀx_k of left factors
    (side "left", x_k (m, r)) or x_k x_kᵀ of right factors (side "right", x_k (r, n)), with x_k replaced by
    minus_from − x_k when that is given. `chunk` factors at a time go through one float64 buffer, so
    that the copies stay in cache (and in memory already mapped) whatever K."""
    k = len(factors)
    buf = np.empty((min(chunk, k), *np.shape(factors[0])))
    shift = None if minus_from is None else np.asarray(minus_from, dtype=np.float64)[None]
    out = []
    for i in range(0, k, chunk):
        x = buf[:min(chunk, k - i)]
        np.stack(list(factors[i:i + chunk]), out=x)
        if shift is not None:
            np.subtract(shift, x, out=x)
        xt = x.transpose(0, 2, 1)
        out.append(np.matmul(xt, x) if side == "left" else np.matmul(x, xt))
    return np.concatenate(out)


def sandwich_norms(gram_left: np.ndarray, gram_right: np.ndarray, mid: np.ndarray | None = None) -> np.ndarray:
    """‖L_k·M_k·R_k‖_F for every k from the small Gram forms gram_left = L_kᵀL_k, gram_right = R_kR_kᵀ
    (K, r, r) and M_k (K, r, r; the identity if None): ‖LMR‖² = Σ (LᵀL·M) ⊙ (M·RRᵀ), O(r³) per k.

    For one client's product (not a stacked sum that cancels) the relative error is about
    eps·κ(L)²κ(R)²: the per-client norms of FedSA-LoRA, CE-LoRA and HetLoRA, never ΔW* (docs/algorithms.md,
    "Norms and SVDs of factored products").
    """
    if mid is None:
        sq = np.einsum("kij,kij->k", gram_left, gram_right)
    else:
        sq = np.einsum("kij,kij->k", gram_left @ mid, mid @ gram_right)
    return np.sqrt(np.maximum(sq, 0.0))


def ideal_update(updates: list[tuple[float, LoRAFactors]],
                 buffers: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stacked factors of ΔW* = Σ_k p_k s_k B_k A_k: U = [p_k b̃_k] (m, q), V = [A_k] (q, n), float64.

    Clients of weight 0 contribute nothing and are left out of the stack (q counts only the others).
    `buffers` (a dict kept by the caller) lends arrays of the same shapes from one call to the next:
    the result is then only valid until the next call with the same dict.
    """
    live = [(w, f) for w, f in updates if w != 0]
    if not live:
        m, n = updates[0][1].shape
        return np.zeros((m, 0)), np.zeros((0, n))
    m, n = live[0][1].shape
    q = sum(f.rank for _, f in live)
    if buffers is None:
        u, v = np.empty((m, q)), np.empty((q, n))
    else:
        u, v = buffers.setdefault((m, q, n), (np.empty((m, q)), np.empty((q, n))))
    at = 0
    for w, f in live:                               # filled in place: p_k·(s_k b_k), A_k, float64
        r = f.rank
        if f.c is None:                             # one pass: b·(p_k s_k)
            np.multiply(f.b, np.float64(w) * np.float64(f.scale), out=u[:, at:at + r])
        else:
            np.multiply(f.b_tilde(), np.float64(w), out=u[:, at:at + r])
        v[at:at + r] = f.a
        at += r
    return u, v


@dataclass
class DeviationReport:
    deviation_rel: float          # ‖ΔW* − ΔW_applied‖ / ‖ΔW*‖ over all modules (NaN if ‖ΔW*‖≈0)
    deviation_rel_round: float    # same, denominators ‖ΔW* − previous global product‖
    per_module: dict[str, float] = field(default_factory=dict)      # each module's ‖ΔW* − ΔW_applied‖ / ‖ΔW*‖
    ideal_norms: dict[str, float] = field(default_factory=dict)     # each module's ‖ΔW*‖_F


def deviation(
    updates: dict[str, list[tuple[float, LoRAFactors]]],
    new_global: Factors,
    base_delta: dict[str, BaseDelta] | None,
    old_global: Factors | None = None,
) -> DeviationReport:
    """deviation_rel (docs/algorithms.md, "Deviation metric"), from what clients uploaded and what the server applied.

    updates[module] = [(p_k, client factors)], Σ p_k = 1; new_global: the global adapter after this
    round; base_delta: this round's change of W_base (None if the base did not change).
    """
    num2 = den2 = den_round2 = 0.0
    per_module, norms, buffers = {}, {}, {}
    for name, ups in updates.items():
        star, d, inc = module_deviation(ideal_update(ups, buffers), new_global[name], (base_delta or {}).get(name),
                                        (old_global or {}).get(name))
        num2 += d * d
        den2 += star * star
        den_round2 += inc * inc
        per_module[name] = d / star if star > 1e-12 else float("nan")
        norms[name] = star
    rel = float(np.sqrt(num2 / den2)) if den2 > 1e-24 else float("nan")
    rel_round = float(np.sqrt(num2 / den_round2)) if den_round2 > 1e-24 else float("nan")
    return DeviationReport(rel, rel_round, per_module, norms)


def module_deviation(stack: tuple[np.ndarray, np.ndarray], new: LoRAFactors, base: BaseDelta | None,
                     old: LoRAFactors | None) -> tuple[float, float, float]:
    """(‖ΔW*‖, ‖ΔW* − ΔW_applied‖, ‖ΔW* − previous global‖) of one module from the stack (U, V) of ΔW* = U·V
    (`ideal_update`), ΔW* formed (or QR'd) once."""
    u, v = stack
    terms: list[Term] = [(u, v), (new.b_tilde().astype(np.float64), new.a.astype(np.float64))]
    applied = [1.0, -1.0]
    if base is not None:
        terms.append((base.u, base.v))
        applied.append(-1.0)
    star_only = [1.0] + [0.0] * (len(terms) - 1)
    combos = [star_only, applied]
    if old is not None:
        terms.append((old.b_tilde().astype(np.float64), old.a.astype(np.float64)))
        star_only, applied = star_only + [0.0], applied + [0.0]
        combos = [star_only, applied, star_only[:-1] + [-1.0]]
    norms = sum_norms(terms, combos)
    return norms[0], norms[1], norms[2] if old is not None else norms[0]


# ----------------------------------------------------------------------------- weights


def normalise_weights(raw: np.ndarray | list[float]) -> np.ndarray:
    """p_k = ω_k / Σ ω_j (docs/algorithms.md, "Client weights"). Raises if all weights are zero."""
    w = np.asarray(raw, dtype=np.float64)
    if np.any(w < 0):
        raise ValueError("client weights must be >= 0")
    total = w.sum()
    if total <= 0:
        raise ValueError("client weights sum to 0")
    return w / total
