"""Loading the experiment config: YAML file + `--set a.b=c` overrides -> a validated `ExperimentConfig`.

`load_config(path, overrides)` reads a YAML file, applies the overrides (values parsed as YAML), validates
everything and raises `ConfigError` with the dotted key and what is allowed. The models themselves live in
`raysim.schema` and are re-exported here. Checks that need the data (missing file, label column, more
clients than samples) live in `raysim.data.sources` / `raysim.data.partition` and raise the same error
type before Ray starts.
"""

from __future__ import annotations

import copy
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Union

import yaml
from pydantic import BaseModel, Tag, ValidationError

from raysim.errors import ConfigError
from raysim.schema import (AggregatorConfig, ArithConfig, ByColumnPartition, DataConfig, GroupsPartition, ImageDomain, DirichletPartition, EvalConfig, ExperimentConfig,
                           FaultsConfig, FederationConfig, IIDPartition, LabelNoiseConfig, LoRAConfig, ModelConfig,
                           OutputConfig, PartitionConfig, QuantitySkewPartition, RankByDataSize, RankByQuality,
                           RankByValidation,
                           RankSpec, RankTiers, ResourcesConfig, ShardsPartition, SyntheticConfig, TaskConfig,
                           TrainConfig)

__all__ = ["AggregatorConfig", "ArithConfig", "ByColumnPartition", "ConfigError", "GroupsPartition", "ImageDomain", "DataConfig", "DirichletPartition", "EvalConfig", "ExperimentConfig",
           "FaultsConfig", "FederationConfig", "IIDPartition", "LabelNoiseConfig", "LoRAConfig", "ModelConfig",
           "OutputConfig", "PartitionConfig", "QuantitySkewPartition", "RankByDataSize", "RankByQuality", "RankByValidation", "RankSpec",
           "RankTiers", "ResourcesConfig", "ShardsPartition", "SyntheticConfig", "TaskConfig", "TrainConfig", "apply_overrides",
           "load_config", "parse_override", "validate_config"]


# ----------------------------------------------------------------------------- schema helpers


def _unwrap(ann: Any) -> Any:
    """Annotated[X, ...] -> X."""
    while typing.get_origin(ann) is Annotated:
        ann = typing.get_args(ann)[0]
    return ann


def union_members(ann: Any) -> list[Any]:
    """Members of a Union (Annotated wrappers removed); [] if `ann` is not a union."""
    ann = _unwrap(ann)
    if typing.get_origin(ann) not in (Union, types.UnionType):
        return []
    return [_unwrap(m) for m in typing.get_args(ann)]


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def section_model(ann: Any) -> type[BaseModel] | None:
    """The model of a plain section: `X` or `X | None` where X is a pydantic model."""
    ann = _unwrap(ann)
    if _is_model(ann):
        return ann
    members = [m for m in union_members(ann) if m is not type(None)]
    return members[0] if len(members) == 1 and _is_model(members[0]) else None


def _literal_value(model: type[BaseModel], key: str) -> Any:
    """The value of `key` if the model declares it as a one-value Literal, else None."""
    field = model.model_fields.get(key)
    if field is None or typing.get_origin(field.annotation) is not Literal:
        return None
    args = typing.get_args(field.annotation)
    return args[0] if len(args) == 1 else None


def tagged_variants(ann: Any) -> tuple[str, dict[str, type[BaseModel]]] | None:
    """(tag key, {tag value: model}) if `ann` is a union of models told apart by a one-value Literal field."""
    models = [m for m in union_members(ann) if _is_model(m)]
    for key in models[0].model_fields if models else ():
        values = [_literal_value(m, key) for m in models]
        if all(v is not None for v in values):
            return key, dict(zip(values, models))
    return None


def _field_annotation(path: list[str]) -> Any:
    """Annotation of the config key at `path` (e.g. ['data', 'partition']), or None if there is none."""
    model: type[BaseModel] | None = ExperimentConfig
    ann = None
    for part in path:
        if model is None or part not in model.model_fields:
            return None
        ann = model.model_fields[part].annotation
        model = section_model(ann)
    return ann


def _aggregator_keys(name: Any) -> set[str] | None:
    """Keys allowed next to `aggregator.name` for this method, or None if `name` is not a known method."""
    from raysim.aggregators import aggregator_class   # the dependency points config -> aggregators only

    try:
        cls = aggregator_class(name) if isinstance(name, str) else None
    except ConfigError:
        return None
    return None if cls is None else {AggregatorConfig.TAG, *cls.Params.model_fields}


def _variant_keys_at(path: list[str]) -> tuple[str, Callable[[Any], set[str] | None]] | None:
    """(tag key, tag value -> keys of that variant or None) if the section at `path` is a tagged union."""
    ann = _field_annotation(path)
    if ann is None:
        return None
    model = section_model(ann)
    if model is AggregatorConfig:
        return AggregatorConfig.TAG, _aggregator_keys
    if model is not None:
        return None
    found = tagged_variants(ann)
    if found is None:
        return None
    tag, by_value = found

    def keys_of(value: Any) -> set[str] | None:
        model = by_value.get(value) if isinstance(value, str) else None
        return None if model is None else set(model.model_fields)

    return tag, keys_of


# ----------------------------------------------------------------------------- overrides


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


def _warn(message: str) -> None:
    print(f"raysim: {message}", file=sys.stderr)


def _mapping_at(root: dict[str, Any], path: list[str], dotted: str) -> dict[str, Any]:
    """The mapping at `path` inside `root`, created where missing."""
    node = root
    for part in path:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {part!r} is not a mapping")
        node = child
    return node


def _switch_variant(path: list[str], value: Any, out: dict[str, Any], explicit: set[str],
                    notify: Callable[[str], None]) -> bool:
    """Apply `--set <section>.<tag>=value` when it changes a tagged union's variant; False if it does not.

    The section becomes {tag: value} plus the old keys the new variant also has and the keys set earlier
    in the same command; the others are dropped and named in one notice. Pydantic fills in the defaults.
    """
    spec = _variant_keys_at(path[:-1]) if len(path) >= 2 else None
    if spec is None or path[-1] != spec[0]:
        return False
    dotted, section = ".".join(path), ".".join(path[:-1])
    parent = _mapping_at(out, path[:-2], dotted)
    old = parent.get(path[-2])
    keys = spec[1](value)
    if old is None or keys is None or (isinstance(old, dict) and old.get(path[-1]) == value):
        return False                                       # nothing to replace, or an unknown tag for validation
    if not isinstance(old, dict):
        parent[path[-2]] = {path[-1]: value}
        notify(f"{dotted}={value}: replaced {section}={old!r} with a {value} section")
        return True
    kept = {k: v for k, v in old.items() if k != path[-1] and (k in keys or f"{section}.{k}" in explicit)}
    dropped = [k for k in old if k != path[-1] and k not in kept]
    parent[path[-2]] = {path[-1]: value, **kept}
    if dropped:
        note = f"; kept {', '.join(kept)}" if kept else ""
        notify(f"{dotted}={value}: dropped {', '.join(dropped)} (not keys of {value}){note}")
    return True


def apply_overrides(raw: dict[str, Any], overrides: list[str],
                    notify: Callable[[str], None] = _warn) -> dict[str, Any]:
    """A copy of `raw` with each 'a.b=c' applied in order.

    Setting the tag of a tagged union (`data.partition.scheme`, `lora.rank.scheme`, `aggregator.name`) to a
    new variant replaces the section by that variant: keys the new variant also has are kept, as are keys
    set earlier in the same command; the others are dropped and `notify` names them (default: stderr).
    """
    out = copy.deepcopy(raw)
    explicit: set[str] = set()
    for item in overrides:
        path, value = parse_override(item)
        if not _switch_variant(path, value, out, explicit, notify):
            _mapping_at(out, path[:-1], ".".join(path))[path[-1]] = value
        explicit.add(".".join(path))
    return out


# ----------------------------------------------------------------------------- validation & loading


def _union_tags() -> set[str]:
    """The tags pydantic puts into error locations after a union key (e.g. 'iid' in data.partition.iid.alpha)."""
    tags, todo = set(), [ExperimentConfig]
    while todo:
        for field in todo.pop().model_fields.values():
            members = typing.get_args(_unwrap(field.annotation))          # still carrying their Tag(...)
            tags.update(t.tag for m in members for t in getattr(m, "__metadata__", ()) if isinstance(t, Tag))
            tags.update((tagged_variants(field.annotation) or ("", {}))[1])
            todo += [m for m in [section_model(field.annotation)] if m is not None]
    return tags


def _member_label(part: str) -> bool:
    """Whether a location part names a union member rather than a key: float, literal['auto'], ..."""
    return "[" in part or part.startswith("constrained-") or part in ("int", "float", "str", "bool", "none")


def _format_error(exc: ValidationError) -> str:
    tags = _union_tags()
    lines = []
    for err in exc.errors():
        parts = [str(p) for p in err["loc"] if str(p) not in tags and not _member_label(str(p))]
        key = ".".join(parts) or "<root>"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; docs/config.md lists the allowed keys)"
        elif err["type"] == "union_tag_invalid":              # e.g. data.partition.scheme: zipf
            tag = err["ctx"]["discriminator"].strip("'")
            key = f"{key}.{tag}"
            allowed = err["ctx"]["expected_tags"].replace("'", "")
            msg = f"unknown {tag} {err['ctx']['tag']!r}; allowed: {allowed}"
        lines.append(f"{key}: {msg}")
    uniq = list(dict.fromkeys(lines))    # unions report one error per member; keep distinct lines in order
    return "invalid config:\n  " + "\n  ".join(uniq)


def validate_config(raw: dict[str, Any]) -> ExperimentConfig:
    """The typed config, with the aggregator's parameters checked; ConfigError names the offending key."""
    if not isinstance(raw, dict):
        raise ConfigError("the config must be a YAML mapping")
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None
    # imported here (not at the top) so loading a config stays light; aggregators never import this module
    from raysim.aggregators import resolve_aggregator

    resolve_aggregator(cfg.aggregator.name, cfg.aggregator.params(), cfg)
    return cfg


MAX_YAML_NODES = 200_000        # values in a config or sweep file once aliases are expanded


def _expanded_size(node, seen: dict[int, int]) -> int:
    """How many YAML nodes `node` stands for with every alias expanded (memoised: linear in the file)."""
    key = id(node)
    if key not in seen:
        seen[key] = 1                                   # a recursive alias counts once
        children = node.value if isinstance(node.value, list) else []
        total = 1
        for child in children:
            parts = child if isinstance(child, tuple) else (child,)
            total += sum(_expanded_size(part, seen) for part in parts)
        seen[key] = min(total, MAX_YAML_NODES + 1)
    return seen[key]


def parse_yaml_text(text: str, where: str) -> Any:
    """Safe YAML, refusing documents whose aliases expand past MAX_YAML_NODES values (a "YAML bomb" would
    otherwise exhaust memory when the result is copied, validated or serialised)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None and _expanded_size(node, {}) > MAX_YAML_NODES:
            raise ConfigError(f"{where}: more than {MAX_YAML_NODES:,} values once its aliases (*name) are "
                              "expanded; refused (write the values out)")
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML ({exc})") from None


def read_yaml_file(path: str | Path, what: str) -> Any:
    """The parsed YAML of a file; a ConfigError when it is missing, not YAML, or a YAML bomb."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} not found: {p}")
    return parse_yaml_text(p.read_text(), str(p))


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                notify: Callable[[str], None] = _warn) -> ExperimentConfig:
    """Read the YAML at `path` (None: all defaults), apply `overrides` ('a.b=c') and validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml_file(path, "config file")
        if not isinstance(raw, dict) or not raw:
            raise ConfigError(f"{path}: the config file is empty or not a mapping of keys (e.g. `name: ...`); "
                              "an empty file would silently run the default experiment")
    raw = apply_overrides(raw, overrides or [], notify)
    return validate_config(raw)
