"""Image sources: embedded digits, image folders and hf-disk Image columns; decoding, resizing, the model input
(channels, size, normalisation) and the config errors."""

import numpy as np
import pytest
from PIL import Image

from raysim.config import ConfigError, DataConfig
from raysim.data.images import decode, load_images, resize_images, to_model_input
from raysim.data.sources import load_source


def _data(**kw) -> DataConfig:
    return DataConfig(**kw)


def _folder(tmp_path, classes=("cat", "dog"), per_class=3, size=(6, 6), mode="L"):
    rng = np.random.default_rng(0)
    for c in classes:
        (tmp_path / c).mkdir()
        for i in range(per_class):
            shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(tmp_path / c / f"{i}.png")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    return tmp_path


def test_digits_are_scaled_one_channel_images():
    raw = load_images(_data(source="embedded:digits"), 0, "image_cls")
    assert raw.images.shape == (1797, 1, 8, 8) and raw.images.dtype == np.float32
    assert raw.images.min() == 0.0 and raw.images.max() == 1.0
    assert raw.label_names == [str(i) for i in range(10)] and set(raw.labels.tolist()) == set(range(10))
    from sklearn.datasets import load_digits

    assert np.allclose(raw.images[5, 0] * 16, load_digits().images[5])


def test_digits_through_load_source_with_max_examples_and_resize():
    raw = load_source(_data(source="embedded:digits", max_examples=200, image_size=16), 0, task="image_cls")
    assert raw.images.shape == (200, 1, 16, 16) and len(raw.labels) == 200


def test_image_folder_one_class_per_subfolder(tmp_path):
    raw = load_images(_data(source=f"image-folder:{_folder(tmp_path)}"), 0, "image_cls")
    assert raw.label_names == ["cat", "dog"] and raw.labels.tolist() == [0, 0, 0, 1, 1, 1]   # .txt skipped
    assert raw.images.shape == (6, 1, 6, 6)
    first = np.asarray(Image.open(tmp_path / "cat" / "0.png"), dtype=np.float32) / 255
    assert np.allclose(raw.images[0, 0], first)


def test_rgb_folder_is_channels_first_and_resized(tmp_path):
    raw = load_images(_data(source=f"image-folder:{_folder(tmp_path, mode='RGB')}", image_size=4), 0, "image_cls")
    assert raw.images.shape == (6, 3, 4, 4)
    img = Image.open(tmp_path / "dog" / "2.png").resize((4, 4), Image.BILINEAR)
    assert np.allclose(raw.images[5], np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255)


def test_mixed_sizes_need_image_size(tmp_path):
    _folder(tmp_path)
    Image.new("L", (9, 7)).save(tmp_path / "dog" / "big.png")
    with pytest.raises(ConfigError, match="data.image_size: .* different sizes"):
        load_images(_data(source=f"image-folder:{tmp_path}"), 0, "image_cls")
    raw = load_images(_data(source=f"image-folder:{tmp_path}", image_size=5), 0, "image_cls")
    assert raw.images.shape == (7, 1, 5, 5)


def test_hf_disk_image_column_keeps_scalar_columns(tmp_path):
    import datasets

    rng = np.random.default_rng(1)
    pics = [Image.fromarray(rng.integers(0, 256, (5, 5), dtype=np.uint8), mode="L") for _ in range(4)]
    ds = datasets.Dataset.from_dict({"img": pics, "y": ["b", "a", "b", "a"], "domain": ["x", "x", "y", "y"]},
                                    features=datasets.Features({"img": datasets.Image(), "y": datasets.Value("string"),
                                                                "domain": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "ds"))
    data = _data(source=f"hf-disk:{tmp_path / 'ds'}", image_column="img", label_column="y")
    raw = load_images(data, 0, "image_cls")
    assert raw.images.shape == (4, 1, 5, 5) and raw.labels.tolist() == [1, 0, 1, 0]
    assert np.allclose(raw.images[2, 0], np.asarray(pics[2], dtype=np.float32) / 255)
    assert raw.columns["domain"].tolist() == ["x", "x", "y", "y"]
    with pytest.raises(ConfigError, match="data.image_column: column 'image' not found"):
        load_images(_data(source=f"hf-disk:{tmp_path / 'ds'}", label_column="y"), 0, "image_cls")
    with pytest.raises(ConfigError, match="data.image_column: column 'y' holds str, not images"):
        load_images(_data(source=f"hf-disk:{tmp_path / 'ds'}", image_column="y", label_column="y"), 0, "image_cls")


@pytest.mark.parametrize("source", ["embedded:bbc-news", "synthetic:text-cls", "synthetic:arith"])
def test_text_sources_are_refused_for_images(source):
    with pytest.raises(ConfigError, match=f"data.source: {source} holds text; task.type image_cls needs images"):
        load_source(_data(source=source), 0, task="image_cls")


@pytest.mark.parametrize("task", ["seq_cls", "causal_lm"])
def test_image_sources_are_refused_for_text_tasks(task, tmp_path):
    with pytest.raises(ConfigError, match=f"data.source: embedded:digits holds images; task.type {task} needs text"):
        load_source(_data(source="embedded:digits"), 0, task=task)
    with pytest.raises(ConfigError, match="holds images"):
        load_source(_data(source=f"image-folder:{_folder(tmp_path)}"), 0, task=task)


def test_empty_or_missing_folder_and_a_single_class(tmp_path):
    (tmp_path / "only").mkdir()
    with pytest.raises(ConfigError, match="data.source: image-folder:.* holds no images"):
        load_images(_data(source=f"image-folder:{tmp_path}"), 0, "image_cls")
    with pytest.raises(ConfigError, match="is not a directory"):
        load_images(_data(source=f"image-folder:{tmp_path / 'missing'}"), 0, "image_cls")
    Image.new("L", (4, 4)).save(tmp_path / "only" / "a.png")
    with pytest.raises(ConfigError, match="at least 2"):
        load_images(_data(source=f"image-folder:{tmp_path}"), 0, "image_cls")
    (tmp_path / "only" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match="could not decode .*broken.png"):
        load_images(_data(source=f"image-folder:{tmp_path}"), 0, "image_cls")


def test_decode_mixes_grey_and_colour_as_rgb():
    grey, red = Image.new("L", (2, 2), 255), Image.new("RGB", (2, 2), (255, 0, 0))
    out = decode([grey, red], None, "test")
    assert out.shape == (2, 3, 2, 2)
    assert np.allclose(out[0], 1.0) and np.allclose(out[1, 0], 1.0) and np.allclose(out[1, 1:], 0.0)


def test_resize_images_keeps_constant_images_and_changes_the_size():
    images = np.full((2, 3, 4, 4), 0.25, dtype=np.float32)
    out = resize_images(images, 7)
    assert out.shape == (2, 3, 7, 7) and np.allclose(out, 0.25)


def test_model_input_standardises_per_channel_with_the_data_statistics():
    rng = np.random.default_rng(0)
    images = rng.random((50, 3, 4, 4)).astype(np.float32) * np.array([1, 2, 3], np.float32)[None, :, None, None]
    out = to_model_input(images, {"image_size": 4, "num_channels": 3, "mean": None, "std": None})
    assert out.dtype == np.float32 and out.shape == images.shape
    assert np.allclose(out.mean(axis=(0, 2, 3)), 0, atol=1e-5) and np.allclose(out.std(axis=(0, 2, 3)), 1, atol=1e-4)


def test_model_input_uses_processor_statistics_channels_and_size():
    images = np.full((2, 1, 4, 4), 0.5, dtype=np.float32)
    out = to_model_input(images, {"image_size": 8, "num_channels": 3, "mean": [0.5, 0.25, 0.0],
                                  "std": [0.5, 0.25, 0.5]})
    assert out.shape == (2, 3, 8, 8)                          # grey repeated to RGB, resized to the model
    assert np.allclose(out[:, 0], 0.0) and np.allclose(out[:, 1], 1.0) and np.allclose(out[:, 2], 1.0)
    rgb = np.stack([np.full((4, 4), v, np.float32) for v in (0.0, 0.3, 0.9)])[None]
    grey = to_model_input(rgb, {"image_size": 4, "num_channels": 1, "mean": [0.0], "std": [1.0]})
    assert grey.shape == (1, 1, 4, 4) and np.allclose(grey, 0.4)
