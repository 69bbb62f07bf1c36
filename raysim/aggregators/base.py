"""Aggregator contract and registry. Pure numpy: no Ray, no torch.

An aggregator is a server-side algorithm with two halves (the prepare/fold pair):

- `plan(rnd, client_id)` says what one sampled client starts from this round (its factors), which
  factors it trains, which it uploads and which it was sent, and optionally a function the client
  runs on its own data (`client_hook`, e.g. CE-LoRA's label histogram);
- `aggregate(rnd, updates)` folds the clients' end-of-round factors into the new global adapter
  and, for methods that change the frozen base, a factored base delta.

Conventions (docs/algorithms.md): a (r, n), b (m, r) unscaled, ΔW = s·b·a; weights p_k sum to 1 over
the clients that completed the round. Server state lives on the instance; each class declares which
attributes are global state (`global_state`) and which are per-client state (`client_state`, dicts
keyed by client id), and `state_dict()` / `load_state_dict()` checkpoint exactly those. With
`use_client_store(store)` the per-client state lives in a `raysim.client_store.ClientStore` (files on the
run's storage, a small cache in memory) instead, behind dict-like views, and a checkpoint lists its files.
"""

from __future__ import annotations

import importlib
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from raysim.aggregators.state import decode, encode
from raysim.errors import ConfigError
from raysim.lora.factors import BaseDelta, Factors, LoRAFactors

if TYPE_CHECKING:
    from raysim.client_store import ClientStore

AB = frozenset({"a", "b"})
SHARED_SEED = {"seed": 1}    # `ClientPlan.once` of methods whose clients derive factors from the run seed


@dataclass
class ClientData:
    """What a client-side hook may read of one client: its training labels."""

    labels: np.ndarray        # int64, the client's training labels
    num_labels: int


@dataclass
class ClientPlan:
    """What client k does this round. `start` holds its initial factors (module -> LoRAFactors)."""

    start: Factors
    train: frozenset[str] = AB       # factors trained locally
    upload: frozenset[str] = AB      # factors sent to the server after training
    download: frozenset[str] = AB    # factors the server sent (charged as bytes_down)
    lr_scale: dict[str, float] = field(default_factory=dict)   # factor -> learning-rate multiplier (1.0)
    # run on the client's data where it lives; the result comes back as ClientUpdate.hook_output and is
    # charged as an upload. A module-level function, so that it pickles.
    client_hook: Callable[[ClientData], np.ndarray] | None = None
    # one-off downloads, item -> scalars (e.g. {"seed": 1}, a shared seed that clients derive factors
    # from): the ledger charges each item once per client, the first time the client is sampled
    once: dict[str, int] = field(default_factory=dict)


@dataclass
class ClientUpdate:
    """One completed client. `factors` are its end-of-round factors, with frozen ones filled from start."""

    client_id: int
    weight: float                    # p_k, renormalised over completed clients
    num_samples: int
    factors: Factors
    hook_output: np.ndarray | None = None   # what plan.client_hook returned, if the plan had one


@dataclass
class AggregateResult:
    base_delta: dict[str, BaseDelta] | None = None   # change of W_base this round (nn.Linear orientation)
    deviation_rel: float | None = None               # set only when the method defines its own
    deviation_rel_round: float | None = None         # the same over this round's increment (with deviation_rel)
    stats: dict[str, float] = field(default_factory=dict)


class MethodParams(BaseModel):
    """Base of a method's parameters (`aggregator.params`): unknown keys, infinities and NaN are errors."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Aggregator:
    """Base class. Subclasses set the class attributes and implement `aggregate`.

    `global_state` and `client_state` name the attributes that make up the server state; subclasses
    extend them (`global_state = Aggregator.global_state + ("svd",)`). Per-client state attributes are
    dicts client id -> value (or, with a client store, views that read and write like one: `in`, `[]`,
    `get`, assignment; replace a client's value, never mutate it in place) and start empty; other state is
    initialised in `reset_state`.
    """

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = False
    personalized: ClassVar[bool] = False       # no single global update; deviation_rel is null
    mixed_ranks: ClassVar[bool] = False        # accepts clients of different ranks
    changes_base: ClassVar[bool] = False       # folds updates into the frozen base
    uploads: ClassVar[str] = "A_k, B_k"
    broadcasts: ClassVar[str] = "A_g, B_g"
    comm_per_module: ClassVar[str] = "up r(m+n), down r(m+n)"
    Params: ClassVar[type[BaseModel]] = MethodParams
    global_state: ClassVar[tuple[str, ...]] = ("global_factors",)
    client_state: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **params: Any):
        self.client_store: ClientStore | None = None
        self.params = self.Params(**params)
        self.global_factors: Factors = {}
        self.client_ranks: dict[int, int] = {}
        self.scale_of_rank: Callable[[int], float] = lambda r: 1.0
        self.seed = 0
        self.reset_state()

    # -- lifecycle --------------------------------------------------------------------------------

    def use_client_store(self, store: "ClientStore | None") -> None:
        """Keep the per-client state in `store` (None: dicts in memory); call before `setup`."""
        self.client_store = store
        self.reset_state()

    def reset_state(self) -> None:
        """Empty server state: every per-client state dict becomes {} (or an empty view of the client
        store). Called by __init__ and setup."""
        store = getattr(self, "client_store", None)
        if store is not None:
            store.clear()
        for name in self.client_state:
            setattr(self, name, {} if store is None else store.view(name))

    def setup(self, init: Factors, client_ranks: dict[int, int], scale_of_rank: Callable[[int], float],
              seed: int) -> None:
        """init: the round-0 adapter at the maximum rank (PEFT init: a Kaiming, b = 0)."""
        self.reset_state()
        self.global_factors = {k: f.copy() for k, f in init.items()}
        self.client_ranks = dict(client_ranks)
        self.scale_of_rank = scale_of_rank
        self.seed = seed

    @property
    def max_client_rank(self) -> int:
        """The largest client rank; computed once per `client_ranks` mapping (O(clients)), not every round."""
        ranks = self.client_ranks
        if getattr(self, "_max_rank_of", None) is not ranks:
            self._max_rank_of, self._max_rank = ranks, max(ranks.values())
        return self._max_rank

    def plan(self, rnd: int, client_id: int) -> ClientPlan:
        """Default: every client continues from the global adapter, truncated to its rank."""
        rank = self.client_ranks[client_id]
        return ClientPlan(start=truncate(self.global_factors, rank, self.scale_of_rank(rank)))

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> AggregateResult:
        raise NotImplementedError(f"{type(self).__name__} must implement aggregate()")

    def evaluation_factors(self) -> Factors:
        """The adapter the global model is evaluated with."""
        return self.global_factors

    def evaluation_base_delta(self) -> dict[str, BaseDelta] | None:
        """A change of the frozen base that only the global model carries (None: nothing).

        The evaluated and exported global model is W_base + this + `evaluation_factors()`; clients never
        train on it (unlike `AggregateResult.base_delta`). FlexLoRA: the part of ΔW* beyond r_max, which
        the r_max slots of a worker's model cannot hold.
        """
        return None

    # -- checkpoints ----------------------------------------------------------------------------------

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(tensors, JSON metadata) of the declared state; tensor names start with the attribute name.

        With a client store, the per-client state is written to its files (only what changed) and the
        metadata lists them under "client_store" instead."""
        tensors: dict[str, np.ndarray] = {}
        meta: dict[str, Any] = {"global": {}, "client": {}}
        for name in self.global_state:
            meta["global"][name] = encode(getattr(self, name), name, tensors)
        from raysim.client_store import ClientStateView     # (raysim.client_store imports this package)

        store = self.client_store
        for name in self.client_state:
            value = getattr(self, name)
            if store is not None:
                if not (isinstance(value, ClientStateView) and value.store is store and value.attr == name):
                    raise TypeError(f"{type(self).__name__}.{name} is per-client state kept in the client store "
                                    f"and must stay its view (got {type(value).__name__})")
            elif not isinstance(value, dict):
                raise TypeError(f"{type(self).__name__}.{name} is per-client state and must be a dict "
                                f"client id -> value (got {type(value).__name__})")
            else:
                meta["client"][name] = encode(value, name, tensors)
        if store is not None:
            meta["client_store"] = store.state_dict()
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Restore `state_dict()`'s output; a checkpoint with the client state inline also loads into an
        aggregator with a client store (it is copied in)."""
        for name in self.global_state:
            setattr(self, name, decode(meta["global"][name], name, tensors))
        store = self.client_store
        if "client_store" in meta:
            if store is None:
                raise ValueError("this checkpoint keeps per-client state in client-store files: call "
                                 "use_client_store() with the run's storage before loading it")
            store.load_state_dict(meta["client_store"])
            for name in self.client_state:
                setattr(self, name, store.view(name))
            return
        if store is not None:
            store.clear()
        for name in self.client_state:
            value = decode(meta["client"][name], name, tensors)
            if store is not None:
                store.view(name).update(value)
                value = store.view(name)
            setattr(self, name, value)

    @classmethod
    def describe(cls) -> dict[str, str]:
        doc = (cls.__doc__ or "").strip().splitlines()
        return {"name": cls.name, "summary": doc[0] if doc else "", "exact": "yes" if cls.exact else "no",
                "uploads": cls.uploads, "broadcasts": cls.broadcasts, "comm_per_module": cls.comm_per_module,
                "mixed_ranks": "yes" if cls.mixed_ranks else "no"}


# ----------------------------------------------------------------------------- helpers for methods


def weighted_mean(arrays: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Σ_k w_k x_k in float64 (weights already normalised)."""
    out = np.zeros(arrays[0].shape, dtype=np.float64)
    for w, x in zip(weights, arrays):
        out += w * x.astype(np.float64)
    return out


def average_parts(previous: Factors, updates: list[ClientUpdate], parts: frozenset[str]) -> Factors:
    """New global factors: the p-weighted mean of the factors in `parts`, the others kept as they are.

    A is averaged as is, B as B̃ = s_k·B_k and then divided by the global scale (so clients of other
    scales add up correctly); both are cast to the dtype of `previous`. Factors not in `parts` are the
    very same arrays as in `previous` (FFA's frozen A, RoLoRA's frozen factor).
    """
    weights = [u.weight for u in updates]
    out = {}
    for name, g in previous.items():
        a, b = g.a, g.b
        if "a" in parts:
            a = weighted_mean([u.factors[name].a for u in updates], weights).astype(g.a.dtype)       # (r, n)
        if "b" in parts:
            bt = weighted_mean([u.factors[name].b_tilde() for u in updates], weights)                # (m, r)
            b = (bt / g.scale).astype(g.b.dtype)
        out[name] = LoRAFactors(a=a, b=b, scale=g.scale)
    return out


def truncate(factors: Factors, rank: int, scale: float) -> Factors:
    """First `rank` slots of every module, re-expressed for a client of scale `scale` (b = b̃ / scale)."""
    out = {}
    for name, f in factors.items():
        bt = f.b_tilde()[:, :rank]
        out[name] = LoRAFactors(a=f.a[:rank].copy(), b=(bt / scale).astype(f.b.dtype), scale=scale)
    return out


def client_start(factors: Factors, rank: int, scale: float) -> Factors:
    """`truncate`, except that modules whose rank and scale already match are copied bit for bit.

    truncate computes b = (s_g·b_g)/s_j, which can move b by one ulp even when s_j = s_g; methods whose
    exactness relies on a factor being identical on every client (frozen A, alternating phases) use this.
    """
    out = {}
    for name, f in factors.items():
        if f.rank == rank and float(f.scale) == float(scale) and f.c is None:
            out[name] = f.copy()
        else:
            out.update(truncate({name: f}, rank, scale))
    return out


def kaiming_a(rank: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """PEFT's default A init (kaiming_uniform_, a=√5): U(−1/√n, 1/√n), shape (rank, n), float32."""
    bound = 1.0 / np.sqrt(n)
    return rng.uniform(-bound, bound, size=(rank, n)).astype(np.float32)


def derived_rng(seed: int, *keys: int | str) -> np.random.Generator:
    """Generator seeded from (seed, *keys), e.g. (run seed, round, client id, module name).

    Strings enter through a stable CRC32 (never Python's randomised hash), so the stream depends only
    on the keys: not on call order, process or worker.
    """
    words = [int(k) % (1 << 64) if not isinstance(k, str) else zlib.crc32(k.encode()) for k in (seed, *keys)]
    return np.random.default_rng(np.random.SeedSequence(words))


# ----------------------------------------------------------------------------- registry

REGISTRY: dict[str, type[Aggregator]] = {}


def register(name: str):
    """Class decorator: register an aggregator under a lower-case name; duplicates are refused."""

    def wrap(cls: type[Aggregator]) -> type[Aggregator]:
        if name != name.lower() or not name.replace("_", "").isalnum():
            raise ValueError(f"aggregator name {name!r} must be lower case letters, digits and _")
        if name in REGISTRY and REGISTRY[name] is not cls:
            raise ValueError(f"aggregator {name!r} is already registered by {REGISTRY[name].__module__}")
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return wrap


def _entry_point_aggregators() -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group="raysim.aggregators")}


def aggregator_class(name: str) -> type[Aggregator]:
    """Registered name, entry point (group `raysim.aggregators`) or dotted path `pkg.mod:Class`."""
    if name in REGISTRY:
        return REGISTRY[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        if not (all(part.isidentifier() for part in module_name.split(".")) and attr.isidentifier()):
            raise ConfigError(f"aggregator.name: {name!r} is not a dotted path `package.module:Class` (checked "
                              "before anything is imported)")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"aggregator.name: cannot import {name!r} ({exc})") from None
        if not (isinstance(cls, type) and issubclass(cls, Aggregator)):
            raise ConfigError(f"aggregator.name: {name!r} is not a raysim Aggregator subclass")
        if not cls.name:
            cls.name = name
        return cls
    eps = _entry_point_aggregators()
    if name in eps:
        cls = eps[name].load()
        if not cls.name:
            cls.name = name
        return cls
    allowed = ", ".join(sorted(set(REGISTRY) | set(eps)))
    raise ConfigError(f"aggregator.name: unknown aggregator {name!r}; allowed: {allowed} "
                      "(or a dotted path pkg.module:Class)")


def build_aggregator(name: str, params: dict[str, Any]) -> Aggregator:
    cls = aggregator_class(name)
    try:
        return cls(**params)
    except ValidationError as exc:
        msgs = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            msgs.append(f"aggregator.{key}: {msg} (method {name!r})")
        raise ConfigError("invalid config:\n  " + "\n  ".join(msgs)) from None
