"""saeft_hf.data: transforms, decoding, loading (imagefolder / webdataset, map-style and streaming), collation."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any Hugging Face import

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from saeft_hf.data import (  # noqa: E402
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    BorderCrop,
    CLIPImageTransform,
    CorruptImageError,
    ImageClassificationCollator,
    check_dataset_size,
    decode_image,
    load_image_dataset,
    relabel_by_name,
    shuffle_for_training,
    to_model_mode,
    transforms_from_pretrained,
    with_image_transform,
)

MEAN1, STD1 = (0.0,), (1.0,)
MEAN3, STD3 = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def png_bytes(img: PIL.Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def noise_image(w: int, h: int, seed: int = 0) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------------------------------------
# Transforms
# ------------------------------------------------------------------------------------------------------------------


def test_eval_transform_shape_dtype_and_normalisation() -> None:
    colour = (200, 100, 50)
    img = PIL.Image.new("RGB", (40, 30), colour)
    out = CLIPImageTransform(16, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, train=False)(img)
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    expected = (torch.tensor(colour) / 255.0 - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    torch.testing.assert_close(out, expected[:, None, None].expand(3, 16, 16), rtol=0, atol=1e-6)


def test_eval_geometry_is_shortest_edge_resize_then_center_crop() -> None:
    # 20x10: left half red, right half blue. Shortest edge is already 10, so the center 10x10 crop covers x=5..14.
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, :10, 0] = 255
    arr[:, 10:, 2] = 255
    out = CLIPImageTransform(10, MEAN3, STD3, train=False)(PIL.Image.fromarray(arr))
    assert torch.all(out[0, :, :5] == 1) and torch.all(out[2, :, :5] == 0)
    assert torch.all(out[0, :, 5:] == 0) and torch.all(out[2, :, 5:] == 1)


@pytest.mark.parametrize("size", [(40, 30), (30, 42), (64, 64)])
def test_eval_transform_matches_transformers_clip_processor(size: tuple[int, int]) -> None:
    # CLIPImageProcessorPil floors the crop offset where torchvision rounds; sizes with an even margin agree exactly.
    from transformers import CLIPImageProcessorPil

    img = noise_image(*size)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    ref = torch.as_tensor(processor(images=img, return_tensors="np")["pixel_values"][0])
    ours = CLIPImageTransform(16, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, train=False)(img)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_train_crop_is_random_but_seeded() -> None:
    img = noise_image(48, 40)
    a = CLIPImageTransform(16, MEAN3, STD3, train=True, seed=0)
    b = CLIPImageTransform(16, MEAN3, STD3, train=True, seed=0)
    c = CLIPImageTransform(16, MEAN3, STD3, train=True, seed=1)
    outs_a = [a(img) for _ in range(4)]
    outs_b = [b(img) for _ in range(4)]
    outs_c = [c(img) for _ in range(4)]
    assert all(torch.equal(x, y) for x, y in zip(outs_a, outs_b))
    assert not all(torch.equal(x, y) for x, y in zip(outs_a, outs_c))
    assert not torch.equal(outs_a[0], outs_a[1])  # a fresh crop per call
    assert outs_a[0].shape == (3, 16, 16)


def test_random_resized_crop_params_respect_scale_and_ratio() -> None:
    tf = CLIPImageTransform(8, MEAN3, STD3, train=True, scale=(0.9, 1.0), seed=3)
    width, height = 300, 200
    for _ in range(200):
        top, left, h, w = tf._crop_params(width, height)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        assert 0.88 <= (w * h) / (width * height) <= 1.0
        assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02


def test_grayscale_input_gives_three_equal_channels_or_one_channel() -> None:
    img = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 20), dtype=np.uint8), mode="L")
    rgb = CLIPImageTransform(8, MEAN3, STD3, train=False)(img)
    assert rgb.shape == (3, 8, 8)
    assert torch.equal(rgb[0], rgb[1]) and torch.equal(rgb[1], rgb[2])
    gray = CLIPImageTransform(8, MEAN1, STD1, train=False, num_channels=1)(img)
    assert gray.shape == (1, 8, 8)
    torch.testing.assert_close(gray[0], rgb[0])


def test_rgba_alpha_is_dropped_or_composited() -> None:
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[..., 0] = 200  # red, fully transparent
    img = PIL.Image.fromarray(arr, mode="RGBA")
    dropped = np.asarray(to_model_mode(img, 3))
    assert dropped.shape == (4, 4, 3) and (dropped[..., 0] == 200).all()
    on_black = np.asarray(to_model_mode(img, 3, alpha_background=(0, 0, 0)))
    assert (on_black == 0).all()
    on_white = np.asarray(to_model_mode(img, 3, alpha_background=(255, 255, 255)))
    assert (on_white == 255).all()


def test_16bit_images_scale_to_8bit_instead_of_clipping() -> None:
    values = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
    img = PIL.Image.fromarray(values)
    assert img.mode == "I;16"
    decoded = decode_image({"bytes": png_bytes(img), "path": None})
    assert decoded.mode == "I;16"
    for source in (img, decoded, PIL.Image.fromarray(values.astype(np.int32))):  # "I;16" and 32-bit "I"
        assert np.asarray(to_model_mode(source, 1)).tolist() == [[0, 128, 255]]
    out = CLIPImageTransform(1, MEAN1, STD1, train=False, num_channels=1)(PIL.Image.fromarray(values[:, 2:]))
    assert out.item() == 1.0  # 65535 -> 255 -> 1.0, not a clipped-to-255 artefact of a smaller value


def test_palette_cmyk_and_numpy_inputs_convert() -> None:
    pal = PIL.Image.new("P", (6, 6))
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * (256 * 3 - 6))
    pal.paste(1, (0, 0, 6, 6))
    assert np.asarray(to_model_mode(pal, 3))[0, 0].tolist() == [10, 200, 30]
    pal.info["transparency"] = 0
    assert to_model_mode(pal, 3).mode == "RGB"
    assert to_model_mode(PIL.Image.new("CMYK", (3, 3), (0, 0, 0, 0)), 3).mode == "RGB"
    tf = CLIPImageTransform(4, MEAN3, STD3, train=False)
    hwc = np.full((6, 6, 3), 255, np.uint8)
    assert torch.all(tf(hwc) == 1.0)
    assert torch.all(tf(np.ones((3, 6, 6), np.float32)) == 1.0)  # CHW float in [0, 1]
    assert torch.all(tf(np.full((6, 6), 65535, np.uint16)) == 1.0)
    with pytest.raises(TypeError, match="Cannot decode"):
        tf(12345)


def test_transform_rejects_mismatched_mean() -> None:
    with pytest.raises(ValueError, match="num_channels=1"):
        CLIPImageTransform(8, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, train=False, num_channels=1)


def test_border_crop_removes_pixels_before_transform() -> None:
    arr = np.zeros((12, 12, 3), np.uint8)
    arr[:2], arr[-2:], arr[:, :2], arr[:, -2:] = 255, 255, 255, 255  # a 2-px white frame
    tf = CLIPImageTransform(8, MEAN3, STD3, train=False)
    assert torch.all(BorderCrop(tf, 2)(PIL.Image.fromarray(arr)) == 0)
    assert tf(PIL.Image.fromarray(arr)).max() > 0


def test_transforms_from_pretrained_local_dirs(tmp_path: Path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPVisionConfig

    clip_dir = tmp_path / "clip"
    CLIPImageProcessorPil(size={"shortest_edge": 20}, crop_size={"height": 16, "width": 16}).save_pretrained(clip_dir)
    CLIPConfig().save_pretrained(clip_dir)
    train, evaluation = transforms_from_pretrained(clip_dir, seed=0)
    assert (train.train, evaluation.train) == (True, False)
    assert (evaluation.image_size, evaluation.resize_size, evaluation.num_channels) == (16, 20, 3)
    assert evaluation.mean == pytest.approx(OPENAI_CLIP_MEAN)
    assert evaluation(noise_image(30, 25)).shape == (3, 16, 16)

    gray_dir = tmp_path / "gray"  # old-style integer sizes, a 1-channel vision config at top level
    gray_dir.mkdir()
    (gray_dir / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": 12, "size": 12, "image_mean": [0.5], "image_std": [0.25]}))
    CLIPVisionConfig(num_channels=1, image_size=12).save_pretrained(gray_dir)
    _, ev = transforms_from_pretrained(gray_dir)
    assert (ev.image_size, ev.num_channels, ev.mean, ev.std) == (12, 1, (0.5,), (0.25,))

    bare_dir = tmp_path / "bare"  # a model saved without its processor: image_size + OpenAI CLIP statistics
    CLIPConfig(vision_config={"image_size": 24}).save_pretrained(bare_dir)
    _, ev = transforms_from_pretrained(bare_dir)
    assert ev.image_size == 24 and ev.mean == pytest.approx(OPENAI_CLIP_MEAN)


# ------------------------------------------------------------------------------------------------------------------
# Corrupt images
# ------------------------------------------------------------------------------------------------------------------


def _bytes_dataset() -> datasets.Dataset:
    good = png_bytes(noise_image(10, 10))
    images = [{"bytes": good, "path": "good.png"}, {"bytes": b"definitely not an image", "path": "bad.png"},
              {"bytes": good[: len(good) // 2], "path": "truncated.png"}, {"bytes": good, "path": "good2.png"}]
    features = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.Value("int64")})
    return datasets.Dataset.from_dict({"image": images, "label": [0, 1, 2, 3]}, features=features)


def test_corrupt_image_raises_naming_the_sample() -> None:
    ds = with_image_transform(_bytes_dataset(), CLIPImageTransform(8, MEAN3, STD3, train=False))
    assert ds[0]["pixel_values"].shape == (3, 8, 8) and ds[0]["labels"] == 0
    for index, name in ((1, "bad.png"), (2, "truncated.png")):
        with pytest.raises(CorruptImageError, match=name) as info:
            ds[index]
        assert "skip_corrupt_images=True" in str(info.value)
        assert isinstance(info.value, ValueError) and name in (info.value.sample or "")


def test_corrupt_image_in_stream_names_its_index() -> None:
    raw = _bytes_dataset().remove_columns([]).to_iterable_dataset()
    ds = with_image_transform(raw, CLIPImageTransform(8, MEAN3, STD3, train=False))
    with pytest.raises(CorruptImageError, match="index 1"):
        list(ds)


def test_skip_mode_drops_and_counts_corrupt_images() -> None:
    tf = CLIPImageTransform(8, MEAN3, STD3, train=False)
    collator = ImageClassificationCollator(num_labels=4)
    ds = with_image_transform(_bytes_dataset(), tf, skip_corrupt_images=True)
    batch = collator([ds[i] for i in range(len(ds))])
    assert batch["pixel_values"].shape == (2, 3, 8, 8)
    assert batch["labels"].tolist() == [0, 3] and batch["labels"].dtype == torch.long
    assert collator.num_skipped == 2
    stream = with_image_transform(_bytes_dataset().to_iterable_dataset(), tf, skip_corrupt_images=True)
    loader = torch.utils.data.DataLoader(stream, batch_size=4, collate_fn=collator)
    assert [b["labels"].tolist() for b in loader] == [[0, 3]]
    assert collator.num_skipped == 4


def test_collator_label_range_and_shapes() -> None:
    collator = ImageClassificationCollator(num_labels=3)
    ok = collator([{"pixel_values": torch.zeros(3, 4, 4), "labels": 2}, {"pixel_values": torch.ones(3, 4, 4),
                                                                          "labels": 0}])
    assert ok["pixel_values"].shape == (2, 3, 4, 4) and ok["labels"].tolist() == [2, 0]
    with pytest.raises(ValueError, match=r"Label 5 is outside \[0, 3\).*head has 3 classes"):
        collator([{"pixel_values": torch.zeros(3, 4, 4), "labels": 5}])
    with pytest.raises(ValueError, match="different shapes"):
        collator([{"pixel_values": torch.zeros(3, 4, 4), "labels": 0},
                  {"pixel_values": torch.zeros(3, 5, 5), "labels": 0}])
    with pytest.raises(ValueError, match="skipped"):
        collator([{"pixel_values": None, "labels": 0}])


# ------------------------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------------------------


def make_imagefolder(root: Path, classes: list[str], per_class: int = 2) -> None:
    for split in ("train", "validation"):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                noise_image(8 + c, 8, seed=c * 10 + i).save(folder / f"{i}.png")


def _folder_of(example: dict) -> str:
    return Path(example["image"]["path"]).parent.name


def test_imagefolder_numeric_folders_map_back_to_int(tmp_path: Path) -> None:
    classes = ["0", "1", "2", "10"]  # datasets sorts these as strings: 0, 1, 10, 2
    make_imagefolder(tmp_path / "data", classes)
    kwargs = {"train_dir": tmp_path / "data/train", "validation_dir": tmp_path / "data/validation",
              "cache_dir": str(tmp_path / "cache")}
    ds = load_image_dataset(split="validation", **kwargs)
    assert isinstance(ds, datasets.Dataset) and set(ds.column_names) == {"image", "label"}
    assert ds.features["image"] == datasets.Image(decode=False)
    assert len(ds) == 8 and all(ex["label"] == int(_folder_of(ex)) for ex in ds)
    raw = load_image_dataset(split="validation", numeric_folder_labels=False, **kwargs)
    assert sorted({(raw.features["label"].names[ex["label"]], ex["label"]) for ex in raw}) == [
        ("0", 0), ("1", 1), ("10", 2), ("2", 3)]
    stream = load_image_dataset(split="train", streaming=True, **kwargs)
    assert isinstance(stream, datasets.IterableDataset)
    examples = list(stream)
    assert len(examples) == 8 and all(ex["label"] == int(_folder_of(ex)) for ex in examples)


def test_imagefolder_through_transform_and_collator(tmp_path: Path) -> None:
    make_imagefolder(tmp_path / "data", ["cat", "dog"])
    tf = CLIPImageTransform(8, MEAN3, STD3, train=True, seed=0)
    collator = ImageClassificationCollator(num_labels=2)
    for streaming in (False, True):
        raw = load_image_dataset(train_dir=tmp_path / "data/train", split="train", streaming=streaming,
                                 cache_dir=str(tmp_path / "cache"))
        raw = shuffle_for_training(raw, seed=0, buffer_size=8)
        loader = torch.utils.data.DataLoader(with_image_transform(raw, tf), batch_size=3, collate_fn=collator)
        batches = list(loader)
        assert [b["pixel_values"].shape[0] for b in batches] == [3, 1]
        assert sorted(torch.cat([b["labels"] for b in batches]).tolist()) == [0, 0, 1, 1]


def test_missing_split_names_available_splits(tmp_path: Path) -> None:
    make_imagefolder(tmp_path / "data", ["a", "b"])
    with pytest.raises(ValueError, match=r"Split 'test' not found.*Available splits: \['train'\].*Pass split="):
        load_image_dataset(train_dir=tmp_path / "data/train", split="test")
    with pytest.raises(ValueError, match=r"Available splits: \['train', 'validation'\]"):
        load_image_dataset(dataset_name="imagefolder", data_dir=str(tmp_path / "data"), split="test",
                           cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="not a directory"):
        load_image_dataset(train_dir=tmp_path / "nope", split="train")
    with pytest.raises(ValueError, match="No data source"):
        load_image_dataset(split="train")


def make_webdataset(path: Path, n: int, *, corrupt_key: str | None = None) -> None:
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            key = f"sample{i:04d}"
            data = b"garbage" if key == corrupt_key else png_bytes(noise_image(9, 7, seed=i))
            members = {"png": data, "cls": str(i % 3).encode(), "json": json.dumps({"i": i}).encode()}
            for ext, payload in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_webdataset_tars_load_with_renamed_columns(tmp_path: Path) -> None:
    make_webdataset(tmp_path / "shard-0000.tar", 4)
    make_webdataset(tmp_path / "shard-0001.tar", 2)
    files = str(tmp_path / "shard-*.tar")
    ds = load_image_dataset(data_files={"test": files}, split="test", cache_dir=str(tmp_path / "cache"))
    assert ds.column_names == ["image", "label", "__key__", "__url__"]  # json dropped, png/cls renamed
    assert ds.features["image"] == datasets.Image(decode=False) and len(ds) == 6
    stream = load_image_dataset(dataset_name="webdataset", data_files=[files], split="test", streaming=True,
                                cache_dir=str(tmp_path / "cache"))
    assert stream.n_shards == 2
    first = next(iter(stream))
    assert set(first) == {"image", "label", "__key__", "__url__"} and first["label"] == 0
    tf = CLIPImageTransform(4, MEAN3, STD3, train=False)
    assert check_dataset_size(stream, 6, "shift set") == 6
    with pytest.raises(ValueError, match="shift set has only 6 example"):
        check_dataset_size(stream, 7, "shift set")
    with pytest.raises(ValueError, match="only 6 example"):
        check_dataset_size(ds, 100)
    batch = ImageClassificationCollator(3)(list(with_image_transform(stream, tf)))
    assert batch["pixel_values"].shape == (6, 3, 4, 4) and batch["labels"].tolist() == [0, 1, 2, 0, 0, 1]


def test_webdataset_corrupt_member_is_named_by_key(tmp_path: Path) -> None:
    make_webdataset(tmp_path / "shard.tar", 3, corrupt_key="sample0001")
    stream = load_image_dataset(data_files=str(tmp_path / "shard.tar"), split="train", streaming=True,
                                cache_dir=str(tmp_path / "cache"))
    with pytest.raises(CorruptImageError, match=r"__key__='sample0001' in .*shard\.tar"):
        list(with_image_transform(stream, CLIPImageTransform(4, MEAN3, STD3, train=False)))


def test_column_detection_and_errors() -> None:
    png = png_bytes(noise_image(5, 5))
    ds = datasets.Dataset.from_dict({"img": [{"bytes": png, "path": None}], "labels": [1], "extra": ["x"]},
                                    features=datasets.Features({"img": datasets.Image(), "labels":
                                                                datasets.Value("int64"), "extra":
                                                                datasets.Value("string")}))
    from saeft_hf.data import _normalise_columns

    out = _normalise_columns(ds, image_column=None, label_column=None, require_label=True, source="test")
    assert out.column_names == ["image", "label"] and out.features["image"] == datasets.Image(decode=False)
    with pytest.raises(ValueError, match=r"No label column.*columns: \['img', 'extra'\]"):
        _normalise_columns(ds.remove_columns("labels"), image_column=None, label_column=None, require_label=True,
                           source="test")
    with pytest.raises(ValueError, match="image_column='photo' is not a column"):
        _normalise_columns(ds, image_column="photo", label_column=None, require_label=True, source="test")


def test_relabel_by_name_drops_or_rejects_unknown_classes() -> None:
    features = datasets.Features({"label": datasets.ClassLabel(names=["a", "b", "c"])})
    ds = datasets.Dataset.from_dict({"label": [0, 1, 2, 1]}, features=features)
    assert relabel_by_name(ds, {"a": 7, "b": 3, "c": 0})["label"][:] == [7, 3, 0, 3]
    assert relabel_by_name(ds, {"b": 0}, drop_unknown=True)["label"][:] == [0, 0]
    stream = relabel_by_name(ds.to_iterable_dataset(), {"b": 0, "c": 1}, drop_unknown=True)
    assert [ex["label"] for ex in stream] == [0, 1, 0]
    with pytest.raises(ValueError, match="have no target label"):
        relabel_by_name(ds, {"a": 0})
