"""Image sources of ``task.type: image_cls`` (numpy and Pillow only; no torchvision).

Sources:

- ``embedded:digits``: scikit-learn's bundled 8×8 handwritten digits (1,797 images, 10 classes, one channel;
  no download).
- ``image-folder:DIR``: one subfolder per class (the folder name is the label), images decoded with Pillow.
- ``hf-disk:PATH``: a ``datasets.save_to_disk`` folder with an Image column (``data.image_column``) and a
  label column (``data.label_column``); other short scalar columns (e.g. a DomainNet ``domain``) are kept.

`load_images` returns ``RawData.images`` as (N, C, H, W) float32 intensities in [0, 1]: C = 1 when every
image is greyscale, else 3 (RGB); resized (bilinear) to ``data.image_size`` when it is set, else kept at
their own size (which must then be the same for all). ``data.domains`` transforms are applied to these
intensities (see `raysim.data.domains`). What depends on the model (its channel count and image size, and
the normalisation) is done by `to_model_input`, called by the image task when it builds the arrays.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from raysim.config import ConfigError, DataConfig
from raysim.data.raw import RawData, encode_labels

EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})
IMAGE_SOURCES = "embedded:digits, image-folder:DIR or hf-disk:PATH with an image column"


def is_image_source(source: str) -> bool:
    return source == "embedded:digits" or source.startswith("image-folder:")


def load_images(data: DataConfig, seed: int, task: str) -> RawData:
    """The images of ``data.source`` as RawData (``images`` in [0, 1], see the module docstring), with the
    ``data.domains`` transforms applied and a ``domain`` column when they are set.

    Raises:
        ConfigError: an image source with a non-image task, an image task with a text source, a missing
            folder, image or label column, no images, fewer than 2 classes, images of different sizes
            without ``data.image_size``.
    """
    source = data.source
    if task != "image_cls":
        raise ConfigError(f"data.source: {source} holds images; task.type {task} needs text (use task.type: "
                          "image_cls for images)")
    if source == "embedded:digits":
        raw = load_digits()
    elif source.startswith("image-folder:"):
        raw = load_folder(Path(source.split(":", 1)[1]), data.image_size)
    elif source.startswith("hf-disk:"):
        raw = load_hf_images(Path(source.split(":", 1)[1]), data)
    else:
        raise ConfigError(f"data.source: {source} holds text; task.type image_cls needs images ({IMAGE_SOURCES})")
    if raw.num_labels < 2:
        raise ConfigError(f"data.source: {source} has {raw.num_labels} class; image_cls needs at least 2")
    if data.image_size is not None and raw.images.shape[-1] != data.image_size:
        raw.images = resize_images(raw.images, data.image_size)
    if data.domains:
        from raysim.data.domains import apply_domains

        raw = apply_domains(raw, data.domains, seed)
    return raw


def load_digits() -> RawData:
    """scikit-learn's 8×8 digits, intensities 0..16 scaled to [0, 1]: (1797, 1, 8, 8), labels 0..9."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    images = (bunch.images.astype(np.float32) / 16.0)[:, None]
    labels = np.asarray(bunch.target, dtype=np.int64)
    return RawData(labels=labels, label_names=[str(int(n)) for n in bunch.target_names], images=images)


def load_folder(root: Path, size: int | None) -> RawData:
    """``root/<class>/<image>``: every image file (by extension) of every class subfolder, in sorted order."""
    if not root.is_dir():
        raise ConfigError(f"data.source: image-folder:{root} is not a directory")
    files, classes = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        found = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in EXTENSIONS)
        files += found
        classes += [folder.name] * len(found)
    if not files:
        raise ConfigError(f"data.source: image-folder:{root} holds no images; expected one subfolder per class "
                          f"with image files ({', '.join(sorted(EXTENSIONS))})")
    images = [_open(f) for f in files]
    labels, names = encode_labels(classes)
    return RawData(labels=labels, label_names=names, images=decode(images, size, f"image-folder:{root}"))


def _open(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return img
    except (OSError, UnidentifiedImageError) as exc:
        raise ConfigError(f"data.source: could not decode {path} as an image ({exc})") from None


def load_hf_images(path: Path, data: DataConfig) -> RawData:
    """A ``datasets`` folder with an Image column; labels as for text sources (any values, sorted)."""
    from raysim.data.tables import open_table, scalar_columns

    columns, get = open_table("hf-disk", path)
    for key, col in (("data.image_column", data.image_column), ("data.label_column", data.label_column)):
        if col not in columns:
            raise ConfigError(f"{key}: column {col!r} not found in hf-disk:{path}; columns: {', '.join(columns)}")
    values = list(get(data.image_column))
    if not values:
        raise ConfigError(f"data.source: hf-disk:{path} has no rows")
    images = [_as_pil(v, data.image_column) for v in values]
    labels, names = encode_labels(list(get(data.label_column)))
    extra = scalar_columns(columns, get, exclude={data.image_column, data.label_column})
    return RawData(labels=labels, label_names=names, columns=extra,
                   images=decode(images, data.image_size, f"hf-disk:{path}"))


def _as_pil(value: Any, column: str):
    """A datasets Image value: a PIL image, or an undecoded {"bytes", "path"} dict."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        src = io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]
        with Image.open(src) as img:
            img.load()
            return img
    raise ConfigError(f"data.image_column: column {column!r} holds {type(value).__name__}, not images")


def decode(images: list, size: int | None, where: str) -> np.ndarray:
    """PIL images -> (N, C, H, W) float32 in [0, 1]: greyscale when all are, else RGB; resized to size × size
    (bilinear), or all of one size when size is None."""
    from PIL import Image

    mode = "L" if all(img.mode in GRAY_MODES for img in images) else "RGB"
    if size is None:
        sizes = {img.size for img in images}
        if len(sizes) > 1:
            a, b = sorted(sizes)[:2]
            raise ConfigError(f"data.image_size: the images of {where} have different sizes (e.g. {a[0]}×{a[1]} "
                              f"and {b[0]}×{b[1]}); set data.image_size to resize them all")
    out = []
    for img in images:
        img = img.convert(mode)
        if size is not None and img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.float32) / 255.0
        out.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
    return np.stack(out).astype(np.float32)


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """(N, C, H, W) float32 -> (N, C, size, size), bilinear (Pillow's float mode, channel by channel)."""
    from PIL import Image

    n, c = images.shape[:2]
    out = np.empty((n, c, size, size), dtype=np.float32)
    for i in range(n):
        for j in range(c):
            img = Image.fromarray(np.ascontiguousarray(images[i, j], dtype=np.float32), mode="F")
            out[i, j] = np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.float32)
    return out


def to_model_input(images: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """[0, 1] images -> the model's pixel_values (N, C, S, S) float32.

    spec (`raysim.models.image_spec`): `num_channels` (greyscale is repeated to 3 channels, RGB becomes its
    channel mean for a 1-channel model), `image_size` S (bilinear resize when the images differ) and the
    per-channel `mean`/`std` of the model's image processor (local models). Without them each channel is
    standardised with the mean and standard deviation of all the images (test split included: the
    statistics of the data at hand, the same in a run and when it is re-evaluated).
    """
    channels, size = int(spec["num_channels"]), int(spec["image_size"])
    if images.shape[1] != channels:
        images = np.repeat(images, channels, axis=1) if images.shape[1] == 1 else images.mean(axis=1, keepdims=True)
        if images.shape[1] != channels:
            raise ConfigError(f"model.name: the model takes {channels} channels; images have {images.shape[1]}")
    if images.shape[-2:] != (size, size):
        images = resize_images(images, size)
    if spec.get("mean") is not None:
        mean = np.asarray(spec["mean"], dtype=np.float32)[:channels]
        std = np.asarray(spec["std"], dtype=np.float32)[:channels]
    else:
        mean = images.mean(axis=(0, 2, 3))
        std = np.maximum(images.std(axis=(0, 2, 3)), 1e-6)
    return ((images - mean[None, :, None, None]) / std[None, :, None, None]).astype(np.float32)
