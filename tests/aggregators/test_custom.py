"""Third-party aggregators: the README's example, loaded by dotted path, runs like a built-in one."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

from raysim.aggregators.base import aggregator_class
from raysim.errors import ConfigError

from .helpers import make_aggregator, make_updates

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture
def readme_module(tmp_path, monkeypatch):
    block = re.search(r"```python\n(# mypkg/median\.py.*?)```", README.read_text(), re.S).group(1)
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "median.py").write_text(block)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "mypkg.median:Median"
    for name in ("mypkg.median", "mypkg"):
        sys.modules.pop(name, None)


def test_readme_example_loads_by_dotted_path_and_aggregates(readme_module):
    cls = aggregator_class(readme_module)
    agg = cls()
    ref, init = make_aggregator("fedit")
    agg.setup(init, ref.client_ranks, ref.scale_of_rank, 0)
    updates = make_updates(agg, 1, [0, 1, 2], [0.2, 0.3, 0.5], np.random.default_rng(0))
    agg.aggregate(1, updates)
    for name, g in agg.global_factors.items():
        expected = np.median([u.factors[name].a for u in updates], axis=0)
        np.testing.assert_allclose(g.a, expected, rtol=1e-6)


def test_bad_dotted_paths_are_config_errors():
    with pytest.raises(ConfigError, match="cannot import"):
        aggregator_class("no_such_pkg.mod:Thing")
    with pytest.raises(ConfigError, match="not a raysim Aggregator"):
        aggregator_class("numpy:ndarray")


def test_a_malformed_dotted_path_is_refused_before_any_import(monkeypatch):
    import importlib

    monkeypatch.setattr(importlib, "import_module", lambda *a, **k: pytest.fail("imported"))
    for name in ("os; rm -rf:X", "../evil:Cls", "pkg.mod:Cls()", "pkg..mod:Cls"):
        with pytest.raises(ConfigError, match="not a dotted path"):
            aggregator_class(name)
