"""Typed experiment configuration: pydantic models that mirror the YAML key for key.

`load_config(path, overrides)` reads a YAML file, applies `--set a.b=c` overrides (values parsed as
YAML), validates everything and raises `ConfigError` with the dotted key and what is allowed.
Checks that need the data (missing file, label column, more clients than samples) live in
`raysim.data.sources` / `raysim.data.partition` and raise the same error type before Ray starts.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator,
                      model_validator)


class ConfigError(ValueError):
    """A user mistake in the config (or in data it points to); the CLI prints it and exits with 2."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------- model & data


class ModelConfig(_Strict):
    name: str = Field("embedded:minilm-l6", description="embedded:minilm-l6, a local HF dir, or random:<arch>")
    max_length: int = Field(128, ge=8, le=4096, description="tokens per example (truncation/padding)")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="compute dtype of the frozen base")


class SyntheticConfig(_Strict):
    num_examples: int = Field(2000, ge=2)
    seq_len: int = Field(32, ge=4)
    vocab_size: int = Field(1000, ge=16)
    num_labels: int = Field(4, ge=2)
    key_fraction: float = Field(0.25, gt=0, le=1, description="share of positions holding class key tokens")


class IIDPartition(_Strict):
    scheme: Literal["iid"]
    min_samples: int = Field(4, ge=1)


class DirichletPartition(_Strict):
    scheme: Literal["dirichlet"]
    alpha: float = Field(0.5, gt=0, description="concentration; large alpha -> IID")
    min_samples: int = Field(4, ge=1)


class ShardsPartition(_Strict):
    scheme: Literal["shards"]
    shards_per_client: int = Field(2, ge=1, description="label-sorted shards given to each client")
    min_samples: int = Field(4, ge=1)


class QuantitySkewPartition(_Strict):
    scheme: Literal["quantity_skew"]
    alpha: float = Field(1.0, gt=0, description="Dirichlet concentration of client sizes")
    min_samples: int = Field(4, ge=1)


PartitionConfig = Annotated[
    Union[IIDPartition, DirichletPartition, ShardsPartition, QuantitySkewPartition],
    Field(discriminator="scheme"),
]


class LabelNoiseConfig(_Strict):
    """Label noise for data-quality experiments (raysim.data.noise): a seeded `fraction_clients` of the
    clients get each TRAIN label flipped to a uniformly random other class with probability `flip_prob`;
    the global and local test splits keep their true labels."""

    fraction_clients: float = Field(0.0, ge=0, le=1, description="share of clients with noisy labels")
    flip_prob: float = Field(0.0, ge=0, le=1, description="per-example flip probability on those clients")


class DataConfig(_Strict):
    source: str = Field("embedded:bbc-news", description="embedded:bbc-news, parquet:PATH, csv:PATH, "
                        "jsonl:PATH, hf-disk:PATH or synthetic:text-cls")
    text_column: str = "text"
    label_column: str = "label"
    test_fraction: float = Field(0.2, gt=0, lt=1, description="held-out global test split")
    local_test_fraction: float = Field(0.2, ge=0, lt=1, description="per-client local test split")
    max_examples: int | None = Field(None, ge=2, description="use at most this many examples (stratified)")
    partition: PartitionConfig = Field(default_factory=lambda: DirichletPartition(scheme="dirichlet"))
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    label_noise: LabelNoiseConfig | None = Field(None, description="{fraction_clients, flip_prob}: noisy "
                                                 "train labels on some clients")

    @field_validator("source")
    @classmethod
    def _known_source(cls, v: str) -> str:
        kinds = ("embedded:bbc-news", "synthetic:text-cls")
        prefixes = ("parquet:", "csv:", "jsonl:", "hf-disk:")
        if v in kinds or (v.startswith(prefixes) and len(v.split(":", 1)[1]) > 0):
            return v
        raise ValueError(f"unknown data source {v!r}; allowed: embedded:bbc-news, synthetic:text-cls, "
                         "parquet:PATH, csv:PATH, jsonl:PATH, hf-disk:PATH")


# ----------------------------------------------------------------------------- federation & training


class FederationConfig(_Strict):
    num_clients: int = Field(20, ge=1)
    clients_per_round: int = Field(5, ge=1)
    rounds: int = Field(10, ge=1)
    weighting: Literal["samples", "uniform"] = Field("samples", description="raw client weight ω_k")
    round_timeout_s: float = Field(600.0, gt=0, description="deadline per round; later clients are stragglers")
    max_task_retries: int = Field(1, ge=0, description="retries of a failed client task on another worker")

    @model_validator(mode="after")
    def _per_round(self) -> "FederationConfig":
        if self.clients_per_round > self.num_clients:
            raise ValueError(f"federation.clients_per_round ({self.clients_per_round}) must be <= "
                             f"federation.num_clients ({self.num_clients})")
        return self


class TrainConfig(_Strict):
    local_steps: int = Field(10, ge=1, description="optimizer steps per client per round")
    local_epochs: float | None = Field(None, gt=0, description="if set, steps = ceil(epochs * n_k / batch)")
    batch_size: int = Field(16, ge=1)
    lr: float = Field(5.0e-4, gt=0)
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(None, gt=0, description="per-client gradient clipping")


class _RankFractions(_Strict):
    ranks: list[int]
    fractions: list[float]

    @model_validator(mode="after")
    def _check(self) -> "_RankFractions":
        if not self.ranks or len(self.ranks) != len(self.fractions):
            raise ValueError("lora.rank.ranks and lora.rank.fractions must be non-empty and of equal length")
        if any(r <= 0 for r in self.ranks):
            raise ValueError("lora.rank.ranks must all be >= 1")
        if any(f < 0 for f in self.fractions) or not math.isclose(sum(self.fractions), 1.0, abs_tol=1e-6):
            raise ValueError(f"lora.rank.fractions must be >= 0 and sum to 1 (got {sum(self.fractions):g})")
        return self


class RankTiers(_RankFractions):
    """Exact counts round(fraction·N) per rank, given to a seeded random permutation of the clients."""

    scheme: Literal["tiers"]


class RankByDataSize(_RankFractions):
    """Tiers by client size: the largest clients get the highest rank (counts as for `tiers`)."""

    scheme: Literal["by_data_size"]


class RankByQuality(_Strict):
    """ranks [low, high]: a `high_fraction` of the clients gets the high rank, high-quality ones first.

    With `data.label_noise` the high-quality clients are the clean ones (see raysim.ranks.assign_ranks).
    """

    scheme: Literal["by_quality"]
    ranks: list[int]
    high_fraction: float = Field(0.1, ge=0, le=1, description="share of clients with the high rank")

    @model_validator(mode="after")
    def _check(self) -> "RankByQuality":
        if len(self.ranks) != 2 or any(r <= 0 for r in self.ranks) or self.ranks[0] > self.ranks[1]:
            raise ValueError(f"lora.rank.ranks must be [low, high] with 1 <= low <= high (got {self.ranks})")
        return self


def _rank_kind(v: Any) -> str | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return "int"
    if isinstance(v, list):
        return "list"
    if isinstance(v, dict):
        return v.get("scheme") if isinstance(v.get("scheme"), str) else None
    return getattr(v, "scheme", None)


RankSpec = Annotated[
    Union[Annotated[int, Tag("int")], Annotated[list[int], Tag("list")], Annotated[RankTiers, Tag("tiers")],
          Annotated[RankByQuality, Tag("by_quality")], Annotated[RankByDataSize, Tag("by_data_size")]],
    Discriminator(_rank_kind, custom_error_type="rank_scheme",
                  custom_error_message="expected an int, a per-client list of ints or {scheme: ...} with "
                                       "scheme one of: tiers, by_quality, by_data_size"),
]


class LoRAConfig(_Strict):
    rank: RankSpec = Field(8, description="int, a per-client list, or {scheme: tiers | by_quality | "
                           "by_data_size, ...}")
    alpha: float = Field(16, gt=0, description="scale s = alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["query", "value"], min_length=1)
    train_head: bool = Field(True, description="train the classifier head (shared per head_policy)")
    head_policy: Literal["fedavg", "local"] = Field(
        "fedavg", description="fedavg: the head is uploaded and averaged like FedAvg; local: each client keeps "
        "its own head (never sent), personalised evaluation on")

    @field_validator("head_policy")
    @classmethod
    def _head_trained(cls, v, info):
        if v == "local" and not info.data.get("train_head", True):
            raise ValueError("'local' needs lora.train_head: true (a frozen head has nothing local)")
        return v

    @field_validator("rank")
    @classmethod
    def _positive(cls, v):
        if isinstance(v, int) and v <= 0:
            raise ValueError(f"lora.rank must be >= 1 (got {v})")
        if isinstance(v, list) and (not v or any(r <= 0 for r in v)):
            raise ValueError("lora.rank as a list needs one rank >= 1 per client")
        return v

    def max_rank(self) -> int:
        if isinstance(self.rank, int):
            return self.rank
        if isinstance(self.rank, list):
            return max(self.rank)
        return max(self.rank.ranks)


class AggregatorConfig(_Strict):
    """`name` plus method parameters (e.g. {name: lora_fair, lam: 0.01}); the method validates them."""

    model_config = ConfigDict(extra="allow")
    name: str = "fedit"

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ResourcesConfig(_Strict):
    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(1, ge=0)
    gpus_per_worker: float | Literal["auto"] = Field("auto", description="'auto': 1/num_workers of a GPU if any")
    engine: Literal["peft", "cohort"] = "peft"
    cohort_size: int = Field(8, ge=1)

    @field_validator("gpus_per_worker")
    @classmethod
    def _non_negative(cls, v):
        if v != "auto" and v < 0:
            raise ValueError("resources.gpus_per_worker must be >= 0 or 'auto'")
        return v


class EvalConfig(_Strict):
    every: int = Field(1, ge=1, description="evaluate the global model every N rounds (and the last)")
    personalized: bool = Field(False, description="per-client accuracy on local test splits "
                               "(always on for personalised methods: fedsa, celora)")
    batch_size: int = Field(64, ge=1)


class FaultsConfig(_Strict):
    drop_rate: float = Field(0.0, ge=0, lt=1, description="probability that a client task fails")
    kill_worker_at_round: int | None = Field(None, ge=1, description="kill one worker during this round")
    slow_client_s: float = Field(0.0, ge=0, description="extra seconds a 'slow' client sleeps")
    slow_fraction: float = Field(0.0, ge=0, le=1)


class OutputConfig(_Strict):
    save_updates: bool = Field(False, description="write updates/round-NNNN/ with what crossed the wire")
    checkpoint_every: int = Field(1, ge=0, description="checkpoint every N rounds (0: never)")
    wire_dtype_bytes: int = Field(4, ge=1, description="bytes per scalar for bytes_up/bytes_down")
    debug: bool = Field(False, description="check every round that the factors a method keeps frozen (FFA's A, "
                        "RoLoRA's idle factor, CE-LoRA's frame with train_ab: false) came back bit for bit")


class ExperimentConfig(_Strict):
    name: str = "experiment"
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    aggregator: AggregatorConfig = Field(default_factory=AggregatorConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    faults: FaultsConfig = Field(default_factory=FaultsConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _ranks_per_client(self) -> "ExperimentConfig":
        if isinstance(self.lora.rank, list) and len(self.lora.rank) != self.federation.num_clients:
            raise ValueError(f"lora.rank lists {len(self.lora.rank)} ranks but federation.num_clients "
                             f"is {self.federation.num_clients}")
        return self

    def to_yaml_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# ----------------------------------------------------------------------------- loading


def parse_override(item: str) -> tuple[list[str], Any]:
    """'a.b=c' -> (['a', 'b'], yaml-parsed c)."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value (got {item!r})")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set has an empty key in {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({exc})") from None
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {'.'.join(path)}: {part!r} is not a mapping")
            node = child
        node[path[-1]] = value
    return out


def _format_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-after", "tagged-union")))
        # drop discriminator tags such as 'dirichlet' that pydantic inserts into the location
        parts = [p for p in loc.split(".") if p not in ("iid", "dirichlet", "shards", "quantity_skew",
                                                         "int", "list[int]", "RankTiers", "list", "tiers",
                                                         "by_quality", "by_data_size")]
        key = ".".join(parts) or "<root>"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
            lines.append(f"{key}: unknown key (check the spelling; see DESIGN.md §4 for allowed keys)")
            continue
        if err["type"] == "union_tag_invalid":
            msg = f"unknown scheme; allowed: iid, dirichlet, shards, quantity_skew"
        lines.append(f"{key}: {msg}")
    # unions report one error per member; keep the distinct messages in order
    seen, uniq = set(), []
    for line in lines:
        if line not in seen:
            seen.add(line)
            uniq.append(line)
    return "invalid config:\n  " + "\n  ".join(uniq)


def validate_config(raw: dict[str, Any]) -> ExperimentConfig:
    if not isinstance(raw, dict):
        raise ConfigError("the config must be a YAML mapping")
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None
    # late import: the registry imports every aggregator module
    from raysim.aggregators import resolve_aggregator

    resolve_aggregator(cfg.aggregator.name, cfg.aggregator.params(), cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML ({exc})") from None
    raw = apply_overrides(raw, overrides or [])
    return validate_config(raw)
