"""The Fashion-MNIST world: IDX loading, the split plan, the styles, the tokenizer, and the world interface.

The data tests run on synthetic IDX files written here (the real data is the Debian package
`dataset-fashion-mnist`, which a machine may lack); the end-to-end experiment test needs the real data and the
bundled checkpoint and is skipped without the package.
"""

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest

from saeft_hf.benchmarks import fashion as F
from saeft_hf.benchmarks.digits import apply_corruption
from saeft_hf.benchmarks.worlds import WORLD_MODULES, get_world

PER_CLASS_NEEDED = sum(F.PER_CLASS.values())


def _write_idx(path: Path, array: np.ndarray) -> None:
    magic = 2051 if array.ndim == 3 else 2049
    header = np.array([magic, *array.shape], dtype=">i4").tobytes()
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def fake_dir(tmp_path_factory):
    """Fashion-MNIST-shaped IDX files: class c = a bright box whose size depends on c, plus noise; every image
    differs (a per-image counter pixel pattern), so image-level disjointness is checkable."""
    root = tmp_path_factory.mktemp("fashion")
    rng = np.random.default_rng(0)
    n = 10 * PER_CLASS_NEEDED
    labels = np.arange(n) % 10
    images = rng.integers(0, 6, size=(n, 28, 28)).astype(np.uint8)
    for i, c in enumerate(labels):
        images[i, 4:8 + 2 * c, 6:22] = 200
        images[i, 26, :] = [(i >> b) & 1 for b in range(28)]  # a unique fingerprint per image
    split = n - 10 * 300
    _write_idx(root / "train-images-idx3-ubyte.gz", images[:split])
    _write_idx(root / "train-labels-idx1-ubyte.gz", labels[:split])
    _write_idx(root / "t10k-images-idx3-ubyte.gz", images[split:])
    _write_idx(root / "t10k-labels-idx1-ubyte.gz", labels[split:])
    return str(root)


@pytest.fixture(scope="module")
def bench(fake_dir):
    return F.build_fashion_benchmark(0, data_dir=fake_dir)


def test_loader_reads_idx_in_train_then_test_order(fake_dir):
    x, y = F.load_fashion_mnist(fake_dir)
    assert x.shape == (10 * PER_CLASS_NEEDED, 28, 28) and x.dtype == np.uint8 and y.dtype == np.int64
    assert y[:20].tolist() == list(range(10)) * 2
    assert not x.flags.writeable  # cached and shared: nobody may change it in place


def test_missing_data_names_the_debian_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt install dataset-fashion-mnist"):
        F.load_fashion_mnist(str(tmp_path))


def test_wrong_file_type_is_refused(tmp_path, fake_dir):
    for name in os.listdir(fake_dir):
        (tmp_path / name).write_bytes((Path(fake_dir) / name).read_bytes())
    # Labels where images should be: the magic number says so.
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes((Path(fake_dir) / "train-labels-idx1-ubyte.gz").read_bytes())
    with pytest.raises(ValueError, match="not an IDX image file"):
        F.load_fashion_mnist(str(tmp_path))


def test_splits_sizes_and_features(bench):
    assert list(bench) == list(F.ALL_SPLITS)
    sizes = F.split_sizes(bench)
    pc = F.PER_CLASS
    assert sizes["pretrain"] == 10 * (4 * pc["pool"] + pc["pool_sketch"] + pc["pool_silhouette"])
    assert sizes["finetune"] == 10 * pc["finetune"] and sizes["id_test"] == 10 * pc["id_test"]
    assert sizes["noise"] == sizes["blur"] == sizes["contrast"] == 3 * sizes["id_test"]
    assert sizes["sketch"] == 10 * pc["sketch"] and sizes["tune_negative"] == 10 * pc["tune"]
    assert sizes["tune_pixelate"] == sizes["tune_shear"] == sizes["tune_haze"] == 3 * 10 * pc["tune"]
    assert sizes["tune_outline"] == 10 * pc["tune"]
    for ds in bench.values():
        assert ds.features["label"].names == F.CLASSNAMES
        assert ds[0]["image"].size == (28, 28) and ds[0]["image"].mode == "L"
    pool = bench["pretrain"]
    assert set(pool["source"]) == set(F.CAPTION_TEMPLATES)
    for label, source, caption in zip(pool["label"][:200], pool["source"][:200], pool["caption"][:200]):
        assert caption in F.caption_choices(label, source)


def test_blocks_are_disjoint_and_cover_the_plan(fake_dir):
    _, y = F.load_fashion_mnist(fake_dir)
    plan = F.fashion_split_plan(y, 0)
    seen = np.concatenate(list(plan.values()))
    assert len(seen) == len(set(seen.tolist())) == 10 * PER_CLASS_NEEDED
    for block, idx in plan.items():
        assert np.bincount(y[idx], minlength=10).tolist() == [F.PER_CLASS[block]] * 10


def test_clean_splits_hold_no_pool_or_finetune_image(bench):
    """Image-level: no clean ID evaluation image is in the pool or the fine-tuning set."""
    def keys(name):
        return {np.asarray(im).tobytes() for im in bench[name]["image"]}

    train = keys("pretrain") | keys("finetune")
    for name in ("validation", "id_test"):
        assert not (keys(name) & train), name


def test_same_seed_same_data_other_seed_other_plan(fake_dir, bench):
    again = F.build_fashion_benchmark(0, data_dir=fake_dir)
    for name in ("pretrain", "sketch", "noise", "tune_shear"):
        a = [np.asarray(im).tobytes() for im in bench[name]["image"][:50]]
        b = [np.asarray(im).tobytes() for im in again[name]["image"][:50]]
        assert a == b and bench[name]["label"] == again[name]["label"]
    _, y = F.load_fashion_mnist(fake_dir)
    assert not np.array_equal(F.fashion_split_plan(y, 0)["id_test"], F.fashion_split_plan(y, 1)["id_test"])


def test_styles():
    img = np.zeros((1, 28, 28), np.uint8)
    img[0, 8:20, 8:20] = 180
    img[0, 12:16, 12:16] = 5  # a dark patch inside the object stays dark in a silhouette (threshold 8)
    sil = F.silhouette(img)
    assert set(np.unique(sil)) == {0, 255} and sil[0, 10, 10] == 255 and sil[0, 13, 13] == 0 and sil[0, 2, 2] == 0
    sk = F.sketch(img)
    assert sk[0, 2, 2] == 0 and sk[0, 10, 10] == 0  # flat areas have no edges
    assert sk[0, 8, 14] > 0 and sk.max() == 255  # the border of the box is drawn, scaled to white
    assert (F.sketch(np.zeros((2, 28, 28), np.uint8)) == 0).all()  # a blank image stays blank (no 0/0)
    ol = F.outline(img)
    assert ol[0, 2, 2] == 0 and ol[0, 10, 10] == 0 and ol[0, 8, 14] == 255  # the box border, thin, scaled to white
    assert (F.outline(np.zeros((1, 28, 28), np.uint8)) == 0).all()
    hz = apply_corruption(np.stack([img[0]] * 3), "haze", np.array([0, 1, 2]), np.random.default_rng(0))
    assert hz[0, 2, 2] == 100 and hz[2, 2, 2] == 160  # black -> grey veil: 0.5 * 200, 0.8 * 200
    assert hz[0, 10, 10] == 190 and hz[2, 10, 10] == 196  # 0.5 * 180 + 100, 0.2 * 180 + 160


def test_tokenizer_knows_every_caption_and_prompt():
    tok = F.build_fashion_tokenizer()
    texts = [c for label in range(10) for src in F.CAPTION_TEMPLATES for c in F.caption_choices(label, src)]
    texts += [t.format(c) for t in F.TEMPLATES for c in F.CLASSNAMES]
    ids = tok(texts)["input_ids"]
    assert all(tok.unk_token_id not in row for row in ids)
    assert tok.eos_token_id != 2  # CLIP's legacy eos pooling rule (see digits.py)
    assert max(len(row) for row in ids) <= 16


def test_world_interface():
    assert set(WORLD_MODULES) == {"digits", "fashion"}
    for name in WORLD_MODULES:
        world = get_world(name)
        assert world.name == name and len(world.classnames) == 10
        assert not set(world.shift_splits) & set(world.tuning_splits)
        assert world.id_test_split not in world.shift_splits
    assert get_world("fashion").clip_path().endswith("tiny_clip_fashion")
    with pytest.raises(ValueError, match="Unknown benchmark world 'imagenet'"):
        get_world("imagenet")


REAL = os.path.isfile(os.path.join(F.FASHION_DATA_DIR, "train-images-idx3-ubyte.gz"))


@pytest.mark.skipif(not REAL, reason="needs the Debian package dataset-fashion-mnist")
def test_experiment_runs_in_the_fashion_world(tmp_path):
    from saeft_hf.benchmarks.experiment import DigitExperimentConfig, run_digit_experiment

    cfg = DigitExperimentConfig(world="fashion", output_dir=str(tmp_path), seeds=[0], methods=["zeroshot", "ft",
                                "wise_ft", "sae_ft"], max_steps=3, batch_size=32, max_eval_samples=40,
                                max_train_samples=200, sae_epochs=2, interpret=False, wise_select_on="tuning")
    run_digit_experiment(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["world"] == "fashion" and results["shift_sets"] == list(F.SHIFT_SPLITS)
    assert results["tuning_sets"] == list(F.TUNING_SPLITS)
    assert {r["eval_set"] for r in results["rows"]} == {"validation", "id_test", *F.SHIFT_SPLITS, *F.TUNING_SPLITS}
    with pytest.raises(ValueError, match="not held-out tuning families"):
        run_digit_experiment(DigitExperimentConfig(world="fashion", output_dir=str(tmp_path / "x"),
                                                   wise_select_on="tuning", tuning_splits=["sketch"]))
