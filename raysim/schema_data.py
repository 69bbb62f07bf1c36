"""The data section of the config schema: sources, partitions, synthetic generators, domains.

Split from `raysim.schema` to keep both files small; import these models from `raysim.config`.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Strict(BaseModel):
    # unknown keys are errors; infinities and NaN are refused for every number (train.lr: .inf would train
    # a NaN model that still reports "completed")
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class SyntheticConfig(_Strict):
    """The generated token data of `synthetic:text-cls`, `synthetic:text-pair` and `synthetic:regression`."""

    num_examples: int = Field(2000, ge=2, description="number of generated examples (train + test)")
    seq_len: int = Field(32, ge=4, description="tokens per generated example")
    vocab_size: int = Field(1000, ge=16, description="size of the generated token vocabulary")
    num_labels: int = Field(4, ge=2, description="number of classes")
    key_fraction: float = Field(0.25, gt=0, le=1, description="share of positions holding class key tokens; "
                                "higher makes the task easier")
    examples_per_client: int | None = Field(None, ge=2, description="`synthetic:text-cls` only: generate the "
                                            "data per client instead of one pool (num_examples is then unused). "
                                            "A client's examples are made from (seed, client id) by the worker "
                                            "that trains it, so a run can have millions of clients; a client "
                                            "holds about this many (see size_sigma); partition iid or dirichlet "
                                            "sets each client's label mix; null: one pooled data set")
    size_sigma: float = Field(0.5, ge=0, le=3, description="per-client synthetic data: spread of the client "
                              "sizes, lognormal with this sigma around examples_per_client (0: all equal); "
                              "never below data.partition.min_samples")


class ArithConfig(_Strict):
    """The generated arithmetic task of `data.source: synthetic:arith`: prompts such as `7*8=` with the result
    as the response, and an `operator` column (for `partition: {scheme: by_column, column: operator}`)."""

    num_examples: int = Field(4000, ge=10, description="number of generated prompt/response pairs (train + test)")
    operators: list[Literal["+", "-", "*"]] = Field(default_factory=lambda: ["+", "-", "*"], min_length=1,
                                                    description="operators to draw from, uniformly")
    max_operand: int = Field(9, ge=1, le=999, description="operands are drawn uniformly from 0..max_operand")
    modulo: int | None = Field(10, ge=2, description="the response is the result modulo this (10: one digit, "
                               "so a tiny model answers with one token); null: the exact result")


_MIN_SAMPLES = "every client gets at least this many training examples (an error names the key when the " \
               "data is too small for num_clients x min_samples)"


class IIDPartition(_Strict):
    """Uniformly random split: every client sees the same label distribution."""

    scheme: Literal["iid"] = Field(description="selects this partition scheme")
    min_samples: int = Field(4, ge=1, description=_MIN_SAMPLES)


class DirichletPartition(_Strict):
    """Label skew: each client's label mix is drawn from Dirichlet(alpha)."""

    scheme: Literal["dirichlet"] = Field(description="selects this partition scheme")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration of each client's label mix; small "
                         "(0.1) = few labels per client, large (100) = close to IID; 0.5 is a common non-IID "
                         "benchmark setting")
    min_samples: int = Field(4, ge=1, description=_MIN_SAMPLES)


class ShardsPartition(_Strict):
    """Pathological label skew: the label-sorted data is cut into shards, each client gets a few."""

    scheme: Literal["shards"] = Field(description="selects this partition scheme")
    shards_per_client: int = Field(2, ge=1, description="label-sorted shards given to each client (2: most "
                                   "clients see at most two labels)")
    min_samples: int = Field(4, ge=1, description=_MIN_SAMPLES)


class QuantitySkewPartition(_Strict):
    """Size skew: IID labels, but client sizes are proportional to a Dirichlet(alpha) draw."""

    scheme: Literal["quantity_skew"] = Field(description="selects this partition scheme")
    alpha: float = Field(1.0, gt=0, description="Dirichlet concentration of the client sizes; small = a few "
                         "large clients and many small ones")
    min_samples: int = Field(4, ge=1, description=_MIN_SAMPLES)


class ByColumnPartition(_Strict):
    """Natural non-IID: each client draws its examples from `values_per_client` values of a column (an
    operator, an instruction category, a domain); clients sharing a value split its examples."""

    scheme: Literal["by_column"] = Field(description="selects this partition scheme")
    column: str = Field(description="the data column whose values define the groups (e.g. `operator` for "
                        "synthetic:arith, a category column of a JSONL file)")
    values_per_client: int = Field(1, ge=1, description="how many of the column's values each client draws from")
    min_samples: int = Field(4, ge=1, description=_MIN_SAMPLES)


class GroupsPartition(_Strict):
    """Label groups: the clients are split evenly over the groups, each client draws only from its group's
    labels (CE-LoRA's setting)."""

    scheme: Literal["groups"] = Field(description="selects this partition scheme")
    groups: list[list[int]] = Field(min_length=1, description="label ids per group, e.g. [[0, 1, 2], [3, 4, 5], "
                                    "[6, 7, 8, 9]]; every label in at most one group")
    min_samples: int = Field(4, ge=1, description=_MIN_SAMPLES)


PartitionConfig = Annotated[
    Union[IIDPartition, DirichletPartition, ShardsPartition, QuantitySkewPartition, ByColumnPartition,
          GroupsPartition],
    Field(discriminator="scheme"),
]


class ImageDomain(_Strict):
    """One domain of `data.domains`: a named, seeded transform applied to a share of the images."""

    name: str = Field(description="the domain's name (its value in the `domain` column)")
    transform: Literal["identity", "rotate", "invert", "noise", "blur", "contrast"] = Field(
        "identity", description="`identity`; `rotate` by `strength` quarter turns; `invert` intensities; "
        "Gaussian `noise` of standard deviation `strength`; Gaussian `blur` of radius `strength` pixels; "
        "`contrast` scaled by `strength`")
    strength: float = Field(1.0, ge=0, description="the transform's parameter (see transform)")


class LabelNoiseConfig(_Strict):
    """Label noise for data-quality experiments (raysim.data.noise): a seeded `fraction_clients` of the
    clients get each TRAIN label flipped to a uniformly random other class with probability `flip_prob`;
    the global and local test splits keep their true labels."""

    fraction_clients: float = Field(0.0, ge=0, le=1, description="share of clients with noisy labels (0-1)")
    flip_prob: float = Field(0.0, ge=0, le=1, description="probability that a training label of a noisy client "
                             "is flipped (0-1)")


class DataConfig(_Strict):
    """Where the examples come from and how they are split into test sets and clients."""

    source: str = Field("embedded:bbc-news", description="`embedded:bbc-news` (bundled news topics), "
                        "`synthetic:text-cls` (generated, see data.synthetic), `parquet:PATH`, `csv:PATH`, "
                        "`jsonl:PATH`, `hf-disk:PATH` (a `datasets.save_to_disk` folder), or "
                        "`parquet-dataset:DIR` (a folder of Parquet files read one client at a time, see "
                        "data.client_column)")
    text_column: str = Field("text", description="column holding the text (file and hf-disk sources)")
    label_column: str = Field("label", description="column holding the class label (file and hf-disk sources); "
                              "any values, mapped to 0..C-1")
    text_pair_column: str | None = Field(None, description="seq_cls/regression: column holding the second "
                                         "sentence of a pair (encoded with the tokenizer's pair encoding)")
    image_column: str = Field("image", description="image_cls with hf-disk sources: column holding the images")
    image_size: int | None = Field(None, ge=4, le=1024, description="image_cls: images are resized to this many "
                                   "pixels per side during data preparation (null: the model's image size)")
    domains: list[ImageDomain] | None = Field(None, min_length=1, description="image_cls: turn one dataset "
                                              "into several domains (each image gets one, at random) with a "
                                              "`domain` column; with partition by_column on `domain` each "
                                              "client holds one domain")
    prompt_column: str | None = Field(None, description="causal_lm: column holding the prompt (instruction); "
                                      "with response_column the loss covers the response tokens only; null: "
                                      "plain language modelling on text_column")
    response_column: str | None = Field(None, description="causal_lm: column holding the response the model "
                                        "learns to generate")
    chat_template: Literal["auto", "none"] = Field("auto", description="causal_lm: `auto` wraps prompt and "
                                                   "response in the tokenizer's chat template when it has one; "
                                                   "`none` concatenates them as they are")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="share of the examples held out as the global "
                                 "test split (0-1, exclusive); per-client data uses data.test_clients instead")
    client_column: str | None = Field(None, description="`parquet-dataset:DIR` sources: the column naming each "
                                      "example's client; every distinct value is one client (required there, "
                                      "unused elsewhere)")
    test_clients: int = Field(50, ge=1, description="per-client data (`parquet-dataset:DIR`, or "
                              "data.synthetic.examples_per_client): this many clients, chosen at random, are "
                              "held out and their examples form the global test set")
    local_test_fraction: float = Field(0.2, ge=0, lt=1, description="share of each client's examples kept "
                                       "as its local test split for personalised evaluation (0 = none)")
    max_examples: int | None = Field(None, ge=2, description="use at most this many examples, sampled "
                                     "stratified by label (null = all)")
    partition: PartitionConfig = Field(default_factory=lambda: DirichletPartition(scheme="dirichlet"),
                                       description="how training examples are split across clients; one of "
                                       "the schemes below, selected by `scheme`")
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig, description="settings of the "
                                       "`synthetic:text-cls`, `synthetic:text-pair` and `synthetic:regression` "
                                       "sources (ignored by other sources)")
    arith: ArithConfig = Field(default_factory=ArithConfig, description="settings of the `synthetic:arith` "
                               "source (ignored by other sources)")
    label_noise: LabelNoiseConfig | None = Field(None, description="noisy training labels on some clients "
                                                 "(null = clean data)")

    @field_validator("source")
    @classmethod
    def _known_source(cls, v: str) -> str:
        kinds = ("embedded:bbc-news", "embedded:digits", "synthetic:text-cls", "synthetic:text-pair",
                 "synthetic:regression", "synthetic:arith")
        prefixes = ("parquet:", "parquet-dataset:", "csv:", "jsonl:", "hf-disk:", "image-folder:")
        if v in kinds or (v.startswith(prefixes) and len(v.split(":", 1)[1]) > 0):
            return v
        raise ValueError(f"unknown data source {v!r}; allowed: {', '.join(kinds)}, "
                         "parquet:PATH, parquet-dataset:DIR, csv:PATH, jsonl:PATH, hf-disk:PATH, image-folder:DIR")
