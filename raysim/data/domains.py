"""Feature non-IID: ``data.domains`` turns one image dataset into several domains.

Every image gets one domain, uniformly at random and in equal shares (a seeded permutation of
0, 1, ..., k-1, 0, 1, ...), on the stream ``default_rng([seed, DOMAINS])``; its domain's transform is
applied to its [0, 1] intensities and its name goes to the ``domain`` column, so that
``partition: {scheme: by_column, column: domain}`` gives each client one domain and
``eval.group_by: domain`` reports accuracy per domain.

Transforms (``strength`` is the parameter):

- ``identity``: unchanged.
- ``rotate``: ``round(strength)`` quarter turns counter-clockwise (square images).
- ``invert``: ``1 - x``.
- ``noise``: plus Gaussian noise of standard deviation ``strength``, clipped to [0, 1].
- ``blur``: Gaussian blur of standard deviation ``strength`` pixels (a separable kernel of radius
  ``ceil(3 * strength)``, edges reflected), as Pillow's ``GaussianBlur(radius=strength)``.
- ``contrast``: ``m + strength * (x - m)`` with m each image's mean, clipped to [0, 1].
"""

from __future__ import annotations

import math

import numpy as np

from raysim.config import ConfigError
from raysim.data.raw import RawData
from raysim.seeds import SYNTHETIC

DOMAINS = SYNTHETIC + 0xD0        # the domain stream: default_rng([seed, DOMAINS]) (an offset of SYNTHETIC)
COLUMN = "domain"


def assign_domains(n: int, k: int, seed: int) -> np.ndarray:
    """(n,) int64 domain codes in [0, k): each code on n // k or n // k + 1 examples, in random order."""
    rng = np.random.default_rng([seed, DOMAINS])
    return rng.permutation(np.arange(n, dtype=np.int64) % k)


def apply_domains(raw: RawData, domains: list, seed: int) -> RawData:
    """A copy of `raw` with each image transformed by its domain and a ``domain`` column of domain names.

    domains: ``data.domains`` (objects with name, transform, strength); names must be unique.
    """
    names = [d.name for d in domains]
    if len(set(names)) != len(names):
        raise ConfigError(f"data.domains: domain names must be unique; got {names}")
    if raw.images is None:
        raise ConfigError("data.domains: domains transform images; they need task.type image_cls")
    codes = assign_domains(len(raw), len(domains), seed)
    images = raw.images.copy()
    for i, domain in enumerate(domains):
        rows = np.flatnonzero(codes == i)
        rng = np.random.default_rng([seed, DOMAINS, i])
        images[rows] = transform(images[rows], domain.transform, domain.strength, rng)
    columns = dict(raw.columns)
    columns[COLUMN] = np.asarray(names, dtype=str)[codes]
    return RawData(labels=raw.labels, label_names=raw.label_names, columns=columns, images=images)


def transform(images: np.ndarray, kind: str, strength: float, rng: np.random.Generator) -> np.ndarray:
    """One transform on (M, C, H, W) float32 intensities in [0, 1] (see the module docstring)."""
    if kind == "identity":
        return images
    if kind == "rotate":
        if images.shape[-1] != images.shape[-2]:
            raise ConfigError("data.domains: rotate needs square images; set data.image_size")
        return np.rot90(images, k=int(round(strength)) % 4, axes=(2, 3)).copy()
    if kind == "invert":
        return 1.0 - images
    if kind == "noise":
        return np.clip(images + rng.normal(0.0, strength, images.shape), 0.0, 1.0).astype(np.float32)
    if kind == "blur":
        return gaussian_blur(images, strength)
    if kind == "contrast":
        mean = images.mean(axis=(1, 2, 3), keepdims=True)
        return np.clip(mean + strength * (images - mean), 0.0, 1.0).astype(np.float32)
    raise ConfigError(f"data.domains: unknown transform {kind!r}; allowed: identity, rotate, invert, noise, "
                      "blur, contrast")


def gaussian_kernel(sigma: float) -> np.ndarray:
    """The normalised 1-D Gaussian of standard deviation sigma, radius ceil(3 sigma)."""
    radius = max(1, math.ceil(3 * sigma))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur over H and W of (M, C, H, W), edges reflected; sigma 0 is the identity."""
    if sigma <= 0 or len(images) == 0:
        return images
    k = gaussian_kernel(sigma)
    r = len(k) // 2
    out = images.astype(np.float64)
    for axis in (2, 3):
        pad = [(0, 0)] * 4
        pad[axis] = (r, r)
        padded = np.pad(out, pad, mode="symmetric")
        n = out.shape[axis]
        out = sum(w * np.take(padded, np.arange(i, i + n), axis=axis) for i, w in enumerate(k))
    return out.astype(np.float32)
