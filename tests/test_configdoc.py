"""docs/config.md is generated from the schema and must match what the generator prints today."""

from __future__ import annotations

import re
from pathlib import Path

from raysim.aggregators import REGISTRY
from raysim.cli import main
from raysim.config import ExperimentConfig, section_model, tagged_variants
from raysim.configdoc import COMMAND, render

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "config.md"


def test_docs_config_md_is_up_to_date():
    assert DOC.is_file(), f"docs/config.md is missing; generate it with `{COMMAND}`"
    assert DOC.read_text() == render(), (
        f"docs/config.md is out of date with the config schema; regenerate it with `{COMMAND}`")


def test_the_header_says_how_to_regenerate():
    assert COMMAND in render().split("\n\n", 2)[1]


def _sections(prefix: str, model) -> dict[str, object]:
    """Dotted name -> model of every section below `model`, and every union variant."""
    out = {}
    for key, field in model.model_fields.items():
        dotted = f"{prefix}{key}"
        sub = section_model(field.annotation)
        variants = tagged_variants(field.annotation)
        if sub is not None:
            out[dotted] = sub
            out.update(_sections(f"{dotted}.", sub))
        elif variants is not None:
            out.update({f"{dotted} with {variants[0]}: {value}": m for value, m in variants[1].items()})
    return out


def _tables(text: str) -> dict[str, list[str]]:
    """Heading text (without backticks and #) -> the keys of the table under it."""
    tables, heading = {}, None
    for line in text.splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip().replace("`", "")
            tables[heading] = []
        elif heading and (m := re.match(r"\| `([^`]+)` \|", line)):
            tables[heading].append(m.group(1))
    return tables


def test_every_section_variant_and_key_is_documented():
    tables = _tables(render())
    top = [k for k, f in ExperimentConfig.model_fields.items() if section_model(f.annotation) is None]
    assert tables["Top level"] == top
    sections = _sections("", ExperimentConfig)
    assert {"data.partition with scheme: iid", "lora.rank with scheme: by_quality", "data.label_noise"} <= set(
        sections)
    for heading, model in sections.items():
        assert sorted(tables.get(heading, [])) == sorted(model.model_fields), heading
    for name, cls in REGISTRY.items():
        assert sorted(tables[f"aggregator with name: {name}"]) == sorted(cls.Params.model_fields), name


def test_every_table_row_has_a_description():
    rows = [line for line in render().splitlines() if line.startswith("| `")]
    assert rows
    cells = [re.split(r"(?<!\\)\|", row) for row in rows]             # escaped \| stays inside a cell
    assert all(len(c) == 6 for c in cells)                           # '', key, type, default, description, ''
    empty = [row for row, c in zip(rows, cells) if not c[4].strip()]
    assert not empty, "rows without a description:\n" + "\n".join(empty)


def test_cli_prints_the_same_reference(capsys):
    assert main(["config-docs"]) == 0
    assert capsys.readouterr().out == render()
