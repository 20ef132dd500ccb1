"""The fast input path: JPEG draft decoding (eval, train, BorderCrop), the cheap per-image crop key, datasets'
decoded Image columns handed over undecoded, and the input-pipeline benchmark (saeft_hf.benchmarks.input_pipeline)."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from saeft_hf.benchmarks.input_pipeline import (  # noqa: E402
    PlainPIL,
    benchmark_input_pipeline,
    make_jpegs,
    workers_needed,
)
from saeft_hf.data import (  # noqa: E402
    BorderCrop,
    CLIPImageTransform,
    CorruptImageError,
    decode_image,
    with_image_transform,
)

MEAN3, STD3 = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
# Draft decoding replaces part of the bicubic downscale by the JPEG decoder's DCT scaling. Measured on these photos:
# mean |diff| 0.001-0.004 (under 1/255) and max 0.043 (11/255) in [0, 1] units. The bounds leave 2.5x headroom
# for other libjpeg builds; a wrong geometry (a shifted or mis-scaled crop) gives a mean of 0.03-0.1.
DRAFT_MEAN_TOL, DRAFT_MAX_TOL = 0.01, 0.12


@pytest.fixture(scope="module")
def large_jpegs() -> list[bytes]:
    return make_jpegs(2, size=(1920, 1440), seed=1)


def row(data: bytes) -> dict:
    return {"bytes": data, "path": None}


def tf(size: int = 224, **kwargs) -> CLIPImageTransform:
    return CLIPImageTransform(size, MEAN3, STD3, **kwargs)


def test_decode_image_draft_only_reduces_to_at_least_the_target(large_jpegs: list[bytes]) -> None:
    assert decode_image(large_jpegs[0]).size == (1920, 1440)
    assert decode_image(row(large_jpegs[0]), draft_size=224).size == (480, 360)  # 1/4: 360 >= 224, 1/8 would be 180
    assert decode_image(large_jpegs[0], draft_size=700).size == (960, 720)
    assert decode_image(large_jpegs[0], draft_size=1000).size == (1920, 1440)  # 1/2 would give 720 < 1000
    png = io.BytesIO()
    PIL.Image.open(io.BytesIO(large_jpegs[0])).save(png, format="PNG")
    assert decode_image(png.getvalue(), draft_size=224).size == (1920, 1440)  # not a JPEG: full size


@pytest.mark.parametrize("train", [False, True])
def test_draft_output_is_close_to_the_full_decode(large_jpegs: list[bytes], train: bool) -> None:
    on, off = tf(train=train, seed=0), tf(train=train, seed=0, draft=False)
    if train:
        on.set_epoch(0), off.set_epoch(0)  # per-image crops: the same crop from the bytes, draft or not
    for data in large_jpegs:
        fast, exact = on(row(data)), off(row(data))
        assert fast.shape == exact.shape == (3, 224, 224)
        assert not torch.equal(fast, exact)  # the draft path was taken: only draft changes pixels
        diff = (fast - exact).abs()
        assert float(diff.mean()) < DRAFT_MEAN_TOL and float(diff.max()) < DRAFT_MAX_TOL


def test_draft_leaves_small_jpegs_and_decoded_images_exact() -> None:
    small = make_jpegs(3, min_side=300, max_side=447, seed=3)  # under 2 x 224 px: no reduction keeps >= 224 px
    for data in small:
        assert torch.equal(tf(train=False)(row(data)), tf(train=False, draft=False)(row(data)))
    decoded = PIL.Image.open(io.BytesIO(make_jpegs(1, size=(1920, 1440))[0]))
    decoded.load()
    assert torch.equal(tf(train=False)(decoded), tf(train=False, draft=False)(decoded))


def test_border_crop_with_draft_removes_the_same_region(large_jpegs: list[bytes]) -> None:
    for data in large_jpegs:
        fast = BorderCrop(tf(train=False), 2)(row(data))
        exact = BorderCrop(tf(train=False, draft=False), 2)(row(data))
        assert not torch.equal(fast, exact)
        # Measured 0.0007-0.001; cropping 4 px instead of 2 (1 px at 1/4 scale) gave 0.011-0.039.
        assert float((fast - exact).abs().mean()) < 0.005


def test_per_image_crop_key_is_the_encoded_image(tmp_path: Path) -> None:
    a, b = make_jpegs(2, seed=5)
    path = tmp_path / "a.jpg"
    path.write_bytes(a)
    t = tf(64, train=True, seed=0, scale=(0.2, 1.0))
    t.set_epoch(0)
    # Bytes, a {"bytes"} row and a {"path"} row of the same file: the same crop (the key is the encoded bytes).
    same = [t(a), t(row(a)), t({"bytes": None, "path": str(path)}), t(str(path))]
    assert all(torch.equal(same[0], x) for x in same[1:])
    assert not torch.equal(t(a), t(b))
    t.set_epoch(1)
    assert not torch.equal(same[0], t(a))
    # Decoded inputs are keyed on a pixel subsample: still deterministic per (seed, epoch, image).
    img = PIL.Image.open(io.BytesIO(a)).convert("RGB")
    assert torch.equal(t(img), t(img.copy())) and torch.equal(t(np.asarray(img)), t(img))


def test_decode_errors_still_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(CorruptImageError, match="cannot decode"):
        tf(train=False)({"bytes": None, "path": str(tmp_path / "missing.jpg")})
    with pytest.raises(CorruptImageError, match="cannot decode"):
        tf(train=True)(make_jpegs(1)[0][:600])  # truncated JPEG: fails at decode, not at open
    with pytest.raises(CorruptImageError, match="neither bytes nor a path"):
        tf(train=False)({"bytes": None, "path": None})
    with pytest.raises(TypeError):
        tf(train=False)(3.0)


class RecordingTransform:
    """A real transform that also records what kind of value it was given."""

    def __init__(self) -> None:
        self.inner, self.kinds = tf(16, train=False), set()

    def __call__(self, image):
        self.kinds.add(type(image).__name__)
        return self.inner(image)


def test_with_image_transform_hands_decoded_image_columns_over_undecoded() -> None:
    data = make_jpegs(3, seed=7)
    ds = datasets.Dataset.from_dict({"image": [row(d) for d in data], "label": [0, 1, 2]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.Value("int64")}))
    assert isinstance(ds[0]["image"], PIL.Image.Image)  # datasets would decode it
    for dataset in (ds, ds.to_iterable_dataset()):
        record = RecordingTransform()
        out = list(with_image_transform(dataset, record))
        assert record.kinds == {"dict"} and len(out) == 3
        assert all(o["pixel_values"].shape == (3, 16, 16) for o in out)


def test_workers_needed_is_ceil_of_target_over_rate() -> None:
    got = workers_needed(203.0)
    assert got["2000"] == {"total_workers": 10, "workers_per_gpu": 2, "images_per_s_per_gpu": 250.0}
    assert got["4000"]["total_workers"] == math.ceil(4000 / 203) == 20
    assert got["4000"]["workers_per_gpu"] == math.ceil(500 / 203) == 3


def test_plain_pil_baseline_matches_our_eval_geometry() -> None:
    # The baseline does the same operations: on a small JPEG (no draft) its eval output equals ours.
    from saeft_hf.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    data = make_jpegs(2, seed=11)
    ours = CLIPImageTransform(224, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, train=False)
    for d in data:
        torch.testing.assert_close(ours(d), PlainPIL(224, train=False)(d), rtol=0, atol=1e-5)


def test_input_benchmark_writes_ratios_and_workers() -> None:
    threads = torch.get_num_threads()
    result = benchmark_input_pipeline(n_images=6, n_large=2, rounds=1, chunk=3, image_size=32,
                                      embedding_model="tiny", embedding_batch=2, embedding_batches=1)
    rates = result["images_per_s_per_core"]
    assert set(rates["small"]) == {"ours_train", "ours_train_exact", "pil_train", "ours_eval", "ours_eval_exact", "pil_eval"}
    assert set(rates["large"]) == {"ours_train", "pil_train", "ours_eval", "pil_eval", "pil_eval_draft"}
    for ratio in result["ratios_ours_to_plain_pil"].values():
        assert ratio["ratio"] > 0 and ratio["ratio_paired"] > 0
    workers = result["workers_for_train_transform"]
    assert workers["targets_images_per_s"] == workers_needed(workers["images_per_s_per_core"])
    assert result["embedding_pass"]["forward_images_per_s"] > 0
    assert torch.get_num_threads() == threads  # one thread while measuring, restored after
