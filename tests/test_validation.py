"""Server-side upload checks (raysim.validation), against hand-computed norms in float64."""

from __future__ import annotations

import numpy as np
import pytest

from raysim.lora.factors import LoRAFactors
from raysim.validation import clip_update, rejection_reason, update_norm

TRAIN = frozenset({"a", "b"})


def _pair(seed=0):
    rng = np.random.default_rng(seed)
    start = {m: LoRAFactors(a=rng.normal(size=(2, 5)).astype(np.float32),
                            b=rng.normal(size=(4, 2)).astype(np.float32), scale=2.0) for m in ("q", "v")}
    end = {m: LoRAFactors(a=f.a + rng.normal(size=f.a.shape).astype(np.float32),
                          b=f.b + rng.normal(size=f.b.shape).astype(np.float32), scale=2.0)
           for m, f in start.items()}
    return start, end


def _dense_norm(start, end, keys):
    return np.sqrt(sum(np.sum((np.float64(getattr(end[m], k)) - np.float64(getattr(start[m], k))) ** 2)
                       for m in start for k in keys))


def test_update_norm_counts_only_trained_factors():
    start, end = _pair()
    assert update_norm(start, end, TRAIN) == pytest.approx(_dense_norm(start, end, "ab"), rel=1e-12)
    assert update_norm(start, end, frozenset({"b"})) == pytest.approx(_dense_norm(start, end, "b"), rel=1e-12)


@pytest.mark.parametrize("broken, expect", [("nan", "not finite"), ("inf", "not finite"), ("shape", "shape")])
def test_broken_uploads_are_rejected_with_a_reason(broken, expect):
    start, end = _pair()
    a = end["v"].a.copy()
    if broken == "shape":
        a = a[:-1]
    else:
        a[1, 2] = np.nan if broken == "nan" else np.inf
    end["v"] = LoRAFactors(a=a, b=end["v"].b, scale=2.0)
    reason = rejection_reason(start, end, TRAIN, None, None, None)
    assert reason is not None and expect in reason and "v.a" in reason


def test_a_frozen_factor_is_not_judged_and_a_clean_upload_passes():
    start, end = _pair()
    assert rejection_reason(start, end, TRAIN, None, None, None) is None
    a = end["q"].a.copy()
    a[0, 0] = np.nan                                   # FFA-LoRA: a is frozen, the server keeps its own copy
    end["q"] = LoRAFactors(a=a, b=end["q"].b, scale=2.0)
    assert rejection_reason(start, end, frozenset({"b"}), None, None, None) is None


def test_non_finite_head_and_norm_limit():
    start, end = _pair()
    head = {"classifier.weight": np.ones((3, 4), np.float32)}
    bad = {"classifier.weight": np.full((3, 4), np.inf, np.float32)}
    assert "head" in rejection_reason(start, end, TRAIN, head, bad, None)
    assert "shape" in rejection_reason(start, end, TRAIN, head, {"classifier.weight": np.ones((2, 4))}, None)
    norm = _dense_norm(start, end, "ab")
    assert rejection_reason(start, end, TRAIN, head, head, norm * 1.01) is None
    assert "max_update_norm" in rejection_reason(start, end, TRAIN, head, head, norm * 0.99)


def test_clipping_scales_the_change_to_the_limit_and_keeps_its_direction():
    start, end = _pair()
    norm = _dense_norm(start, end, "ab")
    clipped = clip_update(start, end, TRAIN, norm / 4)
    assert _dense_norm(start, clipped, "ab") == pytest.approx(norm / 4, rel=1e-5)
    for m in start:
        want = np.float64(start[m].b) + 0.25 * (np.float64(end[m].b) - np.float64(start[m].b))
        np.testing.assert_allclose(clipped[m].b, want, rtol=1e-5, atol=1e-6)
    assert clip_update(start, end, TRAIN, norm * 2) is end            # under the limit: untouched
