"""Image domains: seeded balanced assignment, each transform's effect, and the domain column."""

import numpy as np
import pytest
from PIL import Image, ImageFilter

from raysim.config import ConfigError, DataConfig
from raysim.data.domains import apply_domains, assign_domains, gaussian_blur, transform
from raysim.data.images import load_images
from raysim.data.raw import RawData
from raysim.schema_data import ImageDomain


def _images(n=12, size=8, seed=0):
    return np.random.default_rng(seed).random((n, 1, size, size)).astype(np.float32)


def _raw(n=12):
    return RawData(labels=np.arange(n) % 2, label_names=["a", "b"], images=_images(n))


def _rng():
    return np.random.default_rng(0)


def test_assignment_is_seeded_balanced_and_varies_with_the_seed():
    a, b, c = assign_domains(103, 4, 0), assign_domains(103, 4, 0), assign_domains(103, 4, 1)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    counts = np.bincount(a, minlength=4)
    assert counts.sum() == 103 and counts.max() - counts.min() <= 1
    assert not np.array_equal(a, np.arange(103) % 4)             # shuffled, not in blocks


def test_apply_domains_transforms_each_image_by_its_domain():
    raw = _raw()
    domains = [ImageDomain(name="plain"), ImageDomain(name="neg", transform="invert")]
    out = apply_domains(raw, domains, seed=3)
    names = out.columns["domain"]
    assert sorted(set(names.tolist())) == ["neg", "plain"] and len(names) == len(raw)
    plain, neg = names == "plain", names == "neg"
    assert np.array_equal(out.images[plain], raw.images[plain])
    assert np.allclose(out.images[neg], 1 - raw.images[neg])
    assert np.array_equal(apply_domains(raw, domains, seed=3).images, out.images)      # deterministic
    assert np.array_equal(out.labels, raw.labels) and raw.columns == {}                # input unchanged


def test_duplicate_domain_names_are_an_error():
    with pytest.raises(ConfigError, match="data.domains: domain names must be unique"):
        apply_domains(_raw(), [ImageDomain(name="x"), ImageDomain(name="x", transform="invert")], 0)


def test_rotate_turns_by_quarter_turns():
    img = _images(1)
    once = transform(img, "rotate", 1, _rng())
    assert np.array_equal(once[0, 0], np.rot90(img[0, 0]))
    assert np.array_equal(transform(img, "rotate", 4, _rng()), img)
    assert np.array_equal(transform(once, "rotate", 3, _rng()), img)
    with pytest.raises(ConfigError, match="rotate needs square images"):
        transform(np.zeros((1, 1, 4, 6), np.float32), "rotate", 1, _rng())


def test_noise_has_the_requested_spread_and_stays_in_range():
    img = np.full((200, 1, 8, 8), 0.5, dtype=np.float32)
    out = transform(img, "noise", 0.1, _rng())
    assert abs(float((out - img).std()) - 0.1) < 0.005 and out.min() >= 0 and out.max() <= 1
    assert np.array_equal(out, transform(img, "noise", 0.1, _rng()))


def test_contrast_scales_around_each_image_mean():
    img = np.linspace(0.2, 0.8, 64, dtype=np.float32).reshape(1, 1, 8, 8)
    out = transform(img, "contrast", 0.5, _rng())
    assert np.isclose(out.mean(), img.mean()) and np.isclose(out.std(), 0.5 * img.std(), rtol=1e-5)
    assert np.allclose(transform(img, "contrast", 1.0, _rng()), img, atol=1e-6)


def test_blur_matches_pillow_and_keeps_the_mean():
    img = np.zeros((1, 1, 15, 15), dtype=np.float32)
    img[0, 0, 7, 7] = 1.0
    out = gaussian_blur(img, 1.0)
    assert np.isclose(out.sum(), 1.0) and out[0, 0, 7, 7] < 0.2 and out[0, 0, 7, 8] > 0.05
    assert np.allclose(out[0, 0], out[0, 0].T) and np.array_equal(gaussian_blur(img, 0.0), img)
    pil = np.asarray(Image.fromarray((img[0, 0] * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.0)),
                     dtype=np.float32) / 255
    assert np.abs(pil - out[0, 0]).max() < 0.02                 # the same blur up to Pillow's 8-bit rounding


def test_load_images_applies_the_domains_config():
    data = DataConfig(source="embedded:digits", domains=[
        {"name": "id", "transform": "identity"}, {"name": "inv", "transform": "invert"},
        {"name": "blur", "transform": "blur", "strength": 1.0}])
    raw = load_images(data, 0, "image_cls")
    plain = load_images(DataConfig(source="embedded:digits"), 0, "image_cls")
    names = raw.columns["domain"]
    assert {n: int((names == n).sum()) for n in ("id", "inv", "blur")} == {"id": 599, "inv": 599, "blur": 599}
    assert np.allclose(raw.images[names == "inv"], 1 - plain.images[names == "inv"])
    assert np.array_equal(raw.images[names == "id"], plain.images[names == "id"])
    blurred = raw.images[names == "blur"]
    assert blurred.std() < plain.images[names == "blur"].std()


def test_unknown_transform_is_a_schema_error():
    with pytest.raises(ValueError, match="transform"):
        DataConfig(source="embedded:digits", domains=[{"name": "x", "transform": "sepia"}])
