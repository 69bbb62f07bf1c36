"""The experiment config schema: pydantic models that mirror the YAML key for key.

Every field carries a `description`; docs/config.md is generated from them (`python -m raysim.configdoc`).
Loading, `--set` overrides and error messages live in `raysim.config`, which re-exports these models;
import them from there.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator


from raysim.schema_data import (ArithConfig, ByColumnPartition, DataConfig, DirichletPartition,  # noqa: F401
                                GroupsPartition, IIDPartition, ImageDomain, LabelNoiseConfig, PartitionConfig,
                                QuantitySkewPartition, ShardsPartition, SyntheticConfig, _Strict)


# ----------------------------------------------------------------------------- model & data


class ModelConfig(_Strict):
    """The frozen base model that LoRA adapters are trained on."""

    name: str = Field("embedded:minilm-l6", description="`embedded:minilm-l6` (the bundled MiniLM-L6, no "
                      "download), a local Hugging Face model directory, or `random:<arch>` (a randomly "
                      "initialised model for fast tests and benchmarks: encoders bert-tiny, bert-mini, minilm, bert-base; "
                      "decoders llama-tiny, gpt2-tiny (byte vocabulary) and the benchmark shapes llama-1b, qwen-0.5b)")
    max_length: int = Field(128, ge=8, le=4096, description="tokens per example; longer texts are truncated, "
                            "shorter ones padded (must fit the model's position embeddings)")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="compute dtype of the frozen base "
                                                  "model; bfloat16 halves memory, float32 keeps runs exact")


class TaskConfig(_Strict):
    """What is learned: decides the model class, what a batch holds, the loss, the metrics and the PEFT task
    type of the exported adapter."""

    type: Literal["seq_cls", "regression", "causal_lm", "image_cls"] = Field(
        "seq_cls", description="`seq_cls`: an encoder with a classification head, single texts or sentence pairs "
        "(accuracy, loss, macro_f1, mcc); `regression`: the same encoder with one output trained with MSE, "
        "STS-B style (loss, pearson, spearman); `causal_lm`: a decoder LLM trained on prompt/response pairs or "
        "plain text (loss, perplexity, exact_match of greedy generations); `image_cls`: a vision transformer "
        "or MLP-Mixer with a classification head (accuracy, loss, macro_f1)")


# ----------------------------------------------------------------------------- federation & training


class FederationConfig(_Strict):
    """Clients, rounds and how client updates are weighted."""

    num_clients: int = Field(20, ge=1, description="number of simulated clients N")
    clients_per_round: int = Field(5, ge=1, description="clients sampled each round (<= num_clients)")
    rounds: int = Field(10, ge=1, description="number of federated rounds")
    weighting: Literal["samples", "uniform"] = Field("samples", description="raw client weight ω_k before "
                                                     "normalisation: `samples` = n_k (FedAvg), `uniform` = 1")
    round_timeout_s: float = Field(600.0, gt=0, description="seconds a round waits for its clients; later "
                                   "clients are stragglers and are left out of that round")
    max_task_retries: int = Field(1, ge=0, description="how often a failed client task is retried on another "
                                  "worker before the client is dropped from the round")
    max_update_norm: float | None = Field(None, gt=0, description="reject an upload whose change (L2 norm over "
                                          "every trained factor, end minus start) exceeds this (null: no limit); "
                                          "non-finite and wrongly shaped uploads are always rejected")
    clip_update_norm: float | None = Field(None, gt=0, description="server-side clipping: scale an accepted "
                                           "upload's change down to this L2 norm (null: no clipping)")
    min_completed_fraction: float = Field(0.0, ge=0, le=1, description="a round in which fewer than this share "
                                          "of the sampled clients is aggregated is marked `degraded` in "
                                          "rounds.parquet (0: never)")
    max_degraded_rounds: int | None = Field(None, ge=0, description="end the run with status `failed` (exit "
                                            "code 3) once more than this many rounds were degraded (null: "
                                            "never)")
    hung_after_s: float = Field(60.0, gt=0, description="a worker still busy this many seconds after a round's "
                                "deadline is considered hung: it is killed and replaced")

    @model_validator(mode="after")
    def _per_round(self) -> "FederationConfig":
        if self.clients_per_round > self.num_clients:
            raise ValueError(f"federation.clients_per_round ({self.clients_per_round}) must be <= "
                             f"federation.num_clients ({self.num_clients})")
        return self


class TrainConfig(_Strict):
    """Local training on each client."""

    local_steps: int = Field(10, ge=1, description="optimizer steps per client per round (ignored when "
                             "local_epochs is set)")
    local_epochs: float | None = Field(None, gt=0, description="if set, steps = ceil(local_epochs · n_k / "
                                       "batch_size), so larger clients train longer (null = use local_steps)")
    batch_size: int = Field(16, ge=1, description="examples per optimizer step")
    lr: float = Field(5.0e-4, gt=0, description="learning rate of the LoRA factors (and the head)")
    optimizer: Literal["adamw", "adam", "sgd"] = Field("adamw", description="local optimizer; its state is "
                                                       "reset every round, as on a real client")
    weight_decay: float = Field(0.0, ge=0, description="weight decay of the optimizer (decoupled for "
                                "adamw, an L2 penalty for adam and sgd)")
    max_grad_norm: float | None = Field(None, gt=0, description="clip each client's gradient to this global "
                                        "L2 norm (null = no clipping)")


class _RankFractions(_Strict):
    ranks: list[int] = Field(description="the distinct ranks, e.g. [4, 16]")
    fractions: list[float] = Field(description="share of clients per rank, same length as ranks, sums to 1")

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

    scheme: Literal["tiers"] = Field(description="selects this rank scheme")


class RankByDataSize(_RankFractions):
    """Tiers by client size: the largest clients get the highest rank (counts as for `tiers`)."""

    scheme: Literal["by_data_size"] = Field(description="selects this rank scheme")


class RankByQuality(_Strict):
    """ranks [low, high]: a `high_fraction` of the clients gets the high rank, high-quality ones first.

    With `data.label_noise` the high-quality clients are the clean ones (see raysim.ranks.assign_ranks).
    """

    scheme: Literal["by_quality"] = Field(description="selects this rank scheme")
    ranks: list[int] = Field(description="[low, high] with 1 <= low <= high")
    high_fraction: float = Field(0.1, ge=0, le=1, description="share of clients with the high rank (0-1)")

    @model_validator(mode="after")
    def _check(self) -> "RankByQuality":
        if len(self.ranks) != 2 or any(r <= 0 for r in self.ranks) or self.ranks[0] > self.ranks[1]:
            raise ValueError(f"lora.rank.ranks must be [low, high] with 1 <= low <= high (got {self.ranks})")
        return self


class RankByValidation(_Strict):
    """ranks [low, high]: every client starts at `low`; after round `after_round` the `high_fraction` of the
    clients with the best local validation score move to `high` (a measured quality proxy, unlike by_quality).

    The score is the accuracy (for tasks without accuracy, minus the loss) of the model the client holds
    after that round (the global adapter at its rank, with its head) on a seeded subset of its own training
    rows, with the labels the client holds, label noise included (see raysim.ranks.validation_rows).
    """

    scheme: Literal["by_validation"] = Field(description="selects this rank scheme")
    ranks: list[int] = Field(description="[low, high] with 1 <= low <= high")
    high_fraction: float = Field(0.1, ge=0, le=1, description="share of all clients moved to the high rank (0-1)")
    after_round: int = Field(1, ge=1, description="the round after which the clients are scored and re-ranked "
                             "(at most federation.rounds)")
    max_examples: int = Field(64, ge=1, description="labelled rows per client that are scored (a seeded subset "
                              "of its training rows; all of them when it has fewer)")

    @model_validator(mode="after")
    def _check(self) -> "RankByValidation":
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
          Annotated[RankByQuality, Tag("by_quality")], Annotated[RankByDataSize, Tag("by_data_size")],
          Annotated[RankByValidation, Tag("by_validation")]],
    Discriminator(_rank_kind, custom_error_type="rank_scheme",
                  custom_error_message="expected an int, a per-client list of ints or {scheme: ...} with "
                                       "scheme one of: tiers, by_quality, by_data_size, by_validation"),
]


class LoRAConfig(_Strict):
    """The LoRA adapters: rank per client, scaling, where they go, and the classifier head."""

    rank: RankSpec = Field(8, description="one rank for all clients (int), one rank per client (list of "
                           "num_clients ints), or a scheme below (`{scheme: tiers | by_quality | by_data_size | "
                           "by_validation, ...}`); mixed ranks need an aggregator that supports them")
    alpha: float = Field(16, gt=0, description="LoRA alpha; the update is scaled by s = alpha / rank")
    mixed_rank_scale: Literal["shared", "per_rank"] = Field(
        "shared", description="LoRA scale when clients have different ranks: `shared` = alpha / r_max for every "
        "client (slot-wise averages combine columns trained at one scale), `per_rank` = alpha / r_k, PEFT's "
        "default for a client of rank r_k (see docs/algorithms.md, Mixed ranks)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input during local training")
    target_modules: list[str] | None = Field(None, min_length=1, description="names of the linear layers that "
                                             "get adapters; null: the architecture's attention query and value "
                                             "projections, as in the LoRA paper (BERT `query, value`; Llama/Qwen/"
                                             "Mistral `q_proj, v_proj`; GPT-2 `c_attn`)")
    modules_to_save: list[str] | None = Field(None, description="modules trained in full and shared like the "
                                              "classifier head (e.g. `embed_tokens`, `lm_head`); null: the "
                                              "task's default (seq_cls: the classifier; causal_lm: the input "
                                              "embeddings and the LM head)")
    train_head: bool = Field(True, description="train the classifier head (shared per head_policy); false "
                             "keeps the randomly initialised head frozen; causal_lm: false trains no "
                             "modules_to_save (embeddings and LM head stay frozen)")
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
    """`name` plus method parameters (e.g. {name: lora_fair, lam: 0.01}); the method validates them.

    `name` works like the tag of a union: `--set aggregator.name=X` drops the parameters X does not have.
    """

    model_config = ConfigDict(extra="allow")
    TAG: ClassVar[str] = "name"
    name: str = Field("fedit", description="aggregation method: a registered name (`raysim aggregators` lists "
                      "them), an installed entry point of group `raysim.aggregators`, or `pkg.module:Class`")

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ResourcesConfig(_Strict):
    """Ray workers that train the clients."""

    num_workers: int = Field(2, ge=1, description="Ray actors that train clients in parallel (each holds one "
                             "copy of the base model)")
    cpus_per_worker: float = Field(1, ge=0, description="CPUs reserved per worker; also its torch thread count")
    gpus_per_worker: float | Literal["auto"] = Field("auto", description="GPU share per worker (0.5 = two "
                                                     "workers per GPU); `auto`: 1/num_workers of a GPU if the "
                                                     "cluster has one, else 0")
    engine: Literal["peft", "cohort"] = Field("peft", description="`peft`: one client per task with Hugging "
                                              "Face PEFT; `cohort`: several clients trained together in one "
                                              "batched pass (faster for many small clients)")
    cohort_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        8, description="most clients per cohort with engine: cohort; `auto`: each worker times cohorts of 1 "
                       "(the PEFT path), 2, 4, 8, 16 (GPU: also 32, 64) clients on its first cohort and keeps the fastest "
                       "(reported in summary.json as `cohort_calibration`; updates then match a fixed size "
                       "up to float round-off)")
    worker_start_timeout_s: float = Field(300.0, gt=0, description="seconds a replacement worker (for one lost "
                                          "with its node, or hung) may take to start; if the cluster has no room "
                                          "for it by then the run goes on with fewer workers and asks again "
                                          "next round")

    @field_validator("gpus_per_worker")
    @classmethod
    def _non_negative(cls, v):
        if v != "auto" and v < 0:
            raise ValueError("resources.gpus_per_worker must be >= 0 or 'auto'")
        return v


class EvalConfig(_Strict):
    """Evaluation of the global (and personalised) models."""

    every: int = Field(1, ge=1, description="evaluate the global model every N rounds (and always after the "
                       "last)")
    deviation_every: int = Field(1, ge=1, description="compute the deviation metric (deviation_rel) every N "
                                 "rounds and after the last (null in the other rounds; it runs off the critical "
                                 "path but costs server CPU)")
    personalized: bool = Field(False, description="also report per-client accuracy on the local test splits "
                               "(always on for personalised methods: fedsa, celora)")
    batch_size: int = Field(64, ge=1, description="examples per evaluation batch (memory and speed only)")
    max_new_tokens: int = Field(8, ge=1, le=1024, description="causal_lm: tokens generated (greedy) per prompt "
                                "for exact_match")
    max_examples: int | None = Field(None, ge=1, description="causal_lm: generate for at most this many test "
                                     "examples per evaluation (a seeded subset; null = all); loss and "
                                     "perplexity use the whole split")
    match: Literal["exact", "number"] = Field("exact", description="causal_lm: `exact` compares the stripped "
                                              "generation with the response; `number` compares the last "
                                              "number in each (GSM8K-style)")
    group_by: str | None = Field(None, description="a data column (e.g. `operator`, a category, `domain`); "
                                 "every evaluation also writes per-value metrics to groups.parquet")
    metrics: list[Literal["accuracy", "macro_f1", "mcc", "pearson", "spearman"]] | None = Field(
        None, description="extra metrics logged as rounds.parquet columns (loss always); null: the task's "
        "defaults (seq_cls: accuracy, macro_f1, mcc; regression: pearson, spearman; image_cls: accuracy, "
        "macro_f1)")


class FaultsConfig(_Strict):
    """Injected failures, to test robustness; all off by default."""

    drop_rate: float = Field(0.0, ge=0, lt=1, description="probability that a sampled client drops out of "
                             "a round (a simulated failure, never retried)")
    kill_worker_at_round: int | None = Field(None, ge=1, description="kill one worker during this round "
                                             "(null = never); the pool replaces it")
    kill_worker_every: int | None = Field(None, ge=1, description="also kill one worker every this many rounds "
                                          "(soak tests; null = never)")
    kill_worker_phase: Literal["train", "evaluation"] = Field("train", description="when in that round the "
                                                              "worker dies: while clients train (their jobs "
                                                              "are retried) or while the global model is "
                                                              "evaluated (the evaluation is repeated)")
    slow_client_s: float = Field(0.0, ge=0, description="extra seconds a 'slow' client sleeps before "
                                 "returning its update")
    slow_fraction: float = Field(0.0, ge=0, le=1, description="probability that a client task is slow (0-1)")
    corrupt_rate: float = Field(0.0, ge=0, lt=1, description="probability that a sampled client uploads a "
                                "corrupt update (the server must reject it); drawn from the same uniform as "
                                "drop_rate, so a client fails in at most one way and drop_rate + corrupt_rate "
                                "must stay below 1")
    corrupt_kind: Literal["nan", "inf", "huge", "shape"] = Field("nan", description="how a corrupt upload is "
                                                                  "broken: a NaN or an Inf entry, a 1e6× scaled "
                                                                  "change (rejected by federation.max_update_norm), "
                                                                  "or a factor with a wrong shape")

    @model_validator(mode="after")
    def _one_failure(self) -> "FaultsConfig":
        if self.drop_rate + self.corrupt_rate >= 1:
            raise ValueError(f"faults.corrupt_rate: drop_rate + corrupt_rate must be < 1 (got "
                             f"{self.drop_rate} + {self.corrupt_rate})")
        return self


class OutputConfig(_Strict):
    """What a run writes besides metrics."""

    save_updates: bool = Field(False, description="write updates/round-NNNN/ with what crossed the wire (large)")
    checkpoint_every: int = Field(1, ge=0, description="checkpoint every N rounds and after the last (0: never; "
                                  "a run can only be resumed from a checkpoint)")
    wire_dtype_bytes: int = Field(4, ge=1, description="bytes per scalar when counting bytes_up/bytes_down "
                                  "(4 = float32, 2 = a 16-bit wire format)")
    client_state_cache: int = Field(4096, ge=1, description="clients whose per-client state (FedSA-LoRA's B_k, "
                                    "CE-LoRA's cores and frames, HetLoRA's pruned ranks, local heads) is kept in "
                                    "memory; the rest lives in client_state/ of the run directory (keep it >= "
                                    "federation.clients_per_round to avoid re-reads)")
    debug: bool = Field(False, description="check every round that the factors a method keeps frozen (FFA's A, "
                        "RoLoRA's idle factor, CE-LoRA's frame with train_ab: false) came back bit for bit")


class ExperimentConfig(_Strict):
    """One experiment: every key of the YAML file."""

    name: str = Field("experiment", pattern=r"^[A-Za-z0-9][A-Za-z0-9._=+-]{0,199}$",
                      description="run name (letters, digits and `. _ = + -`, starting with a letter or digit; "
                      "no path separators, at most 200 characters): the default run directory "
                      "runs/<name>-<time> stays inside runs/")
    seed: int = Field(0, ge=0, lt=2**63, description="seed of every random choice (data split, sampling, init, "
                      "faults), 0 ≤ seed < 2^63; the "
                      "same config and seed give the same run")
    task: TaskConfig = Field(default_factory=TaskConfig, description="what is learned (see the task section)")
    model: ModelConfig = Field(default_factory=ModelConfig, description="base model")
    data: DataConfig = Field(default_factory=DataConfig, description="data source and partition")
    federation: FederationConfig = Field(default_factory=FederationConfig, description="clients and rounds")
    train: TrainConfig = Field(default_factory=TrainConfig, description="local training")
    lora: LoRAConfig = Field(default_factory=LoRAConfig, description="LoRA adapters")
    aggregator: AggregatorConfig = Field(default_factory=AggregatorConfig, description="aggregation method")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Ray workers")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="evaluation")
    faults: FaultsConfig = Field(default_factory=FaultsConfig, description="fault injection")
    output: OutputConfig = Field(default_factory=OutputConfig, description="run outputs")

    @model_validator(mode="after")
    def _ranks_per_client(self) -> "ExperimentConfig":
        if isinstance(self.lora.rank, list) and len(self.lora.rank) != self.federation.num_clients:
            raise ValueError(f"lora.rank lists {len(self.lora.rank)} ranks but federation.num_clients "
                             f"is {self.federation.num_clients}")
        kill = self.faults.kill_worker_at_round
        if kill is not None and kill > self.federation.rounds:
            raise ValueError(f"faults.kill_worker_at_round: round {kill} never comes (federation.rounds is "
                             f"{self.federation.rounds})")
        return self

    def to_yaml_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
