"""Generate the config reference (docs/config.md) from the schema's field descriptions.

    python -m raysim.configdoc > docs/config.md      # or: raysim config-docs > docs/config.md

One section per config section, a table of key | type | default | description, and every variant of a
tagged union (data.partition, lora.rank, the aggregator's method parameters) with its own keys.
tests/test_configdoc.py fails when docs/config.md is not what this module prints.
"""

from __future__ import annotations

import sys
import typing
from typing import Any, Literal

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from raysim.aggregators import REGISTRY
from raysim.config import AggregatorConfig, ExperimentConfig, section_model, tagged_variants, union_members

COMMAND = "python -m raysim.configdoc > docs/config.md"

INTRO = f"""# Config reference

<!-- Generated from the field descriptions in raysim/schema.py (and each aggregator's Params).
     Regenerate with `{COMMAND}` (or `raysim config-docs > docs/config.md`);
     do not edit by hand. -->

An experiment is one YAML file whose keys mirror the sections below; a key left out takes the default
shown (`required` appears only inside a variant, once it is chosen). `raysim run CONFIG --set a.b=c` overrides one key (the value is parsed as YAML, e.g.
`--set lora.target_modules=[query,value]`); unknown keys are rejected with the key's dotted name.

**Switching a variant with `--set`.** `data.partition`, `lora.rank` and `aggregator` are tagged unions:
their tag (`scheme`, `scheme`, `name`) selects a variant with its own keys. Setting the tag to a different
variant (e.g. `--set data.partition.scheme=iid` on a `dirichlet` partition) replaces the section by the new
variant: keys the new variant also has (e.g. `min_samples`) are kept, as are keys set earlier on the same
command line; the other keys (e.g. `alpha`) are dropped and named in one line on stderr. Missing keys take
the new variant's defaults; keys given after the tag on the same command line apply to the new variant.
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _yaml(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30, sort_keys=False).strip()
    return text.removesuffix("...").strip()


def type_name(ann: Any) -> str:
    """A short, YAML-oriented name of an annotation: int, float, list[int], "a" | "b", str | null ..."""
    found = tagged_variants(ann)
    if found is not None:
        plain = [type_name(m) for m in union_members(ann) if section_model(m) is None]
        return " | ".join([*plain, f"{{{found[0]}: {' | '.join(found[1])}, ...}}"])
    members = union_members(ann)
    if members:
        return " | ".join(type_name(m) for m in members)
    if ann is type(None):
        return "null"
    if typing.get_origin(ann) is Literal:
        return " | ".join(f'"{a}"' for a in typing.get_args(ann))
    if typing.get_origin(ann) is list:
        return f"list[{', '.join(type_name(a) for a in typing.get_args(ann))}]"
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "section"
    return getattr(ann, "__name__", str(ann))


def default_text(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            found = tagged_variants(field.annotation)
            return f"`{_yaml({found[0]: getattr(value, found[0])})}`" if found else "see below"
        return f"`{_yaml(value)}`"
    if field.default is PydanticUndefined:
        return "required"
    if isinstance(field.default, BaseModel):
        return "see below"
    return f"`{_yaml(field.default)}`"


def _rows(fields: dict[str, FieldInfo]) -> list[str]:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for key, field in fields.items():
        rows.append(f"| `{key}` | {_cell(type_name(field.annotation))} | {_cell(default_text(field))} | "
                    f"{_cell(field.description or '')} |")
    return rows


def _table(model: type[BaseModel]) -> list[str]:
    return _rows(model.model_fields)


def _doc(model: type) -> list[str]:
    doc = " ".join(line.strip() for line in (model.__doc__ or "").strip().splitlines() if line.strip())
    return [doc, ""] if doc else []


def _variants(dotted: str, ann: Any, level: int) -> list[str]:
    """One subsection per variant of a tagged union field, with the variant's own keys."""
    tag, models = tagged_variants(ann)
    lines = []
    for value, model in models.items():
        fields = {tag: model.model_fields[tag], **model.model_fields}          # the tag first
        lines += [f"{'#' * level} `{dotted}` with `{tag}: {value}`", "", *_doc(model), *_rows(fields), ""]
    return lines


def _section(dotted: str, model: type[BaseModel], level: int) -> list[str]:
    lines = [f"{'#' * level} `{dotted}`", "", *_doc(model), *_table(model), ""]
    for key, field in model.model_fields.items():
        child = f"{dotted}.{key}"
        sub = section_model(field.annotation)
        if sub is not None:
            lines += _section(child, sub, min(level + 1, 4))
        elif tagged_variants(field.annotation) is not None:
            lines += _variants(child, field.annotation, min(level + 1, 4))
    if model is AggregatorConfig:
        lines += _aggregator_params(min(level + 1, 4))
    return lines


def _aggregator_params(level: int) -> list[str]:
    """Each registered method's parameters, given next to `name` in the aggregator section."""
    lines = []
    for name in sorted(REGISTRY):
        cls = REGISTRY[name]
        summary = cls.describe()["summary"]
        lines += [f"{'#' * level} `aggregator` with `name: {name}`", "", *([summary, ""] if summary else [])]
        lines += [*_table(cls.Params), ""] if cls.Params.model_fields else ["No parameters.", ""]
    return lines


def render() -> str:
    """The whole reference as markdown text."""
    fields = ExperimentConfig.model_fields
    sections = {k: section_model(f.annotation) for k, f in fields.items()}
    lines = [INTRO, "## Top level", "", *_doc(ExperimentConfig),
             *_rows({k: f for k, f in fields.items() if sections[k] is None}), ""]
    for key, model in sections.items():
        lines += _section(key, model, 2) if model is not None else []
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
