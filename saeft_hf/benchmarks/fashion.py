"""The Fashion-MNIST world: a second data world for the shift benchmark, from packaged real data.

Source: Fashion-MNIST (Zalando; 70,000 28x28 grayscale product photos, 10 classes, white object on black), as
shipped by the Debian package ``dataset-fashion-mnist`` in ``/usr/share/datasets/fashion-mnist`` (the four IDX
files; ``apt install dataset-fashion-mnist``). Its train and test files are pooled and re-split here by a seeded,
stratified plan, like MNIST in `digits.py`.

The world mirrors the digit world: the tiny CLIP is pre-trained on a BROAD pool in which clean photos are scarce,
then fine-tuned on clean photos only, and evaluated on clean photos (ID) and on shifts:

- ``sketch``: edge drawings (Sobel gradient magnitude) of photos no pool or fine-tuning image comes from; the pool
  has sketches of other photos (an ImageNet-Sketch-like style shift);
- ``silhouette``: filled white shapes of other photos (pool: silhouettes of yet other photos);
- ``noise``/``blur``/``contrast``: `digits.apply_corruption` of the ``id_test`` photos, 3 severities each (the
  pool has one corrupted copy of each pool photo, as in the digit world).

Held-out tuning families (docs/tuning_protocol.md; never reported, never in the pool), from the ``tune`` block:
``tune_negative`` (inverted photos, black on white), ``tune_pixelate`` and ``tune_shear`` (3 severities each), and,
added after the calibration run showed that fine-tuning helps on those three, ``tune_outline`` (a morphological
outline, 3x3 max minus min filter: another drawing style than ``sketch``'s Sobel edges) and ``tune_haze`` (the photo
blended towards light grey, 3 severities: another loss of contrast than ``contrast``'s).

Photos per class in each block (x10 classes):

=================  ====  =============================================================
block              size  used by
=================  ====  =============================================================
pool                 25  ``pretrain`` (clean, plus one noise, one blur and one contrast copy)
pool_sketch         150  ``pretrain`` (as sketches)
pool_silhouette     150  ``pretrain`` (as silhouettes)
finetune            275  ``finetune`` (clean)
validation           50  ``validation`` (clean)
id_test             100  ``id_test`` and the corruption shifts
sketch              300  ``sketch``
silhouette          300  ``silhouette``
tune                 50  ``tune_negative``, ``tune_pixelate``, ``tune_shear``
=================  ====  =============================================================
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageFilter

from .digits import (
    SPECIAL_TOKENS, DigitCLIPCollator, _all_severities, _rng, _to_dataset, apply_corruption, build_tokenizer,
    split_sizes, tokenizer_vocabulary,
)

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "CLASSNAMES", "TEMPLATES", "SHIFT_SPLITS", "TUNING_SPLITS", "ALL_SPLITS", "FASHION_DATA_DIR", "WORLD",
    "load_fashion_mnist", "sketch", "silhouette", "outline", "build_fashion_benchmark", "build_fashion_tokenizer",
    "fashion_clip_path", "split_sizes",
]

#: Where the Debian package ``dataset-fashion-mnist`` puts the IDX files.
FASHION_DATA_DIR = "/usr/share/datasets/fashion-mnist"
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

#: Class names for labels 0..9 (Fashion-MNIST's "T-shirt/top" is "top", "Ankle boot" is "boot": one word each, so no
#: class name contains another's).
CLASSNAMES: list[str] = ["top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
#: Other words the pre-training captions use for each class (CLIP's captions are not one fixed name either).
SYNONYMS: dict[str, tuple[str, ...]] = {
    "top": ("top", "tee"), "trouser": ("trouser", "pants"), "pullover": ("pullover", "sweater"),
    "dress": ("dress",), "coat": ("coat", "jacket"), "sandal": ("sandal",), "shirt": ("shirt",),
    "sneaker": ("sneaker", "trainer"), "bag": ("bag", "handbag"), "boot": ("boot",),
}
#: Zero-shot prompt templates; each also occurs among the pre-training captions.
TEMPLATES: list[str] = [
    "a photo of a {}.", "a sketch of a {}.", "a silhouette of a {}.", "a blurry photo of a {}.",
    "a noisy photo of a {}.", "a faint photo of a {}.", "a {}.",
]
SHIFT_SPLITS: tuple[str, ...] = ("sketch", "silhouette", "noise", "blur", "contrast")
ID_TEST_SPLIT = "id_test"
TUNING_SPLITS: tuple[str, ...] = ("tune_negative", "tune_pixelate", "tune_shear", "tune_outline", "tune_haze")
ALL_SPLITS: tuple[str, ...] = ("pretrain", "finetune", "validation", ID_TEST_SPLIT, *SHIFT_SPLITS, *TUNING_SPLITS)
CORRUPTIONS: tuple[str, ...] = ("noise", "blur", "contrast")
PER_CLASS: dict[str, int] = {
    "pool": 25, "pool_sketch": 150, "pool_silhouette": 150, "finetune": 275, "validation": 50, "id_test": 100,
    "sketch": 300, "silhouette": 300, "tune": 50,
}
CAPTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "photo": ("a photo of a {}.", "a {}.", "a product photo of a {}.", "a picture of a {}.", "a photo of the {}."),
    "noise": ("a noisy photo of a {}.", "a grainy photo of a {}.", "a photo of a {}."),
    "blur": ("a blurry photo of a {}.", "a blurred {}.", "a photo of a {}."),
    "contrast": ("a faint photo of a {}.", "a low contrast photo of a {}.", "a photo of a {}."),
    "sketch": ("a sketch of a {}.", "a drawing of a {}.", "an outline of a {}.", "a line drawing of a {}."),
    "silhouette": ("a silhouette of a {}.", "the shape of a {}.", "a white silhouette of a {}."),
}


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """One gzipped IDX file -> uint8 array ([N] labels or [N, rows, cols] images)."""
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    header = np.frombuffer(raw, dtype=">i4", count=2 if magic == 2049 else 4)
    if header[0] != magic:
        raise ValueError(f"{path} is not an IDX {'label' if magic == 2049 else 'image'} file (magic {header[0]}, "
                         f"expected {magic}).")
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 * len(header))
    return data.reshape(tuple(int(d) for d in header[1:]))


@functools.lru_cache(maxsize=2)
def load_fashion_mnist(data_dir: str = FASHION_DATA_DIR) -> tuple[np.ndarray, np.ndarray]:
    """All 70,000 images (train then test): uint8 [70000, 28, 28] (white on black) and int64 labels [70000]."""
    root = Path(data_dir)
    missing = [f for pair in _FILES.values() for f in pair if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {root} (missing {', '.join(missing)}). Install the Debian package "
            "(`apt install dataset-fashion-mnist`), or pass data_dir= a folder with the four IDX .gz files.")
    images, labels = [], []
    for part in ("train", "test"):
        x = _read_idx(root / _FILES[part][0], 2051)
        y = _read_idx(root / _FILES[part][1], 2049)
        if len(x) != len(y) or x.shape[1:] != (28, 28):
            raise ValueError(f"{root}: {part} has {len(x)} images of shape {x.shape[1:]} and {len(y)} labels; "
                             "expected equal counts of 28x28 images.")
        images.append(x)
        labels.append(y.astype(np.int64))
    x, y = np.concatenate(images), np.concatenate(labels)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def sketch(images: np.ndarray) -> np.ndarray:
    """Edge drawings: Sobel gradient magnitude, scaled per image so its 99th percentile is white. uint8 [N, 28, 28]."""
    x = np.pad(images.astype(np.float64), ((0, 0), (1, 1), (1, 1)))
    gx = (x[:, :-2, 2:] + 2 * x[:, 1:-1, 2:] + x[:, 2:, 2:]) - (x[:, :-2, :-2] + 2 * x[:, 1:-1, :-2] + x[:, 2:, :-2])
    gy = (x[:, 2:, :-2] + 2 * x[:, 2:, 1:-1] + x[:, 2:, 2:]) - (x[:, :-2, :-2] + 2 * x[:, :-2, 1:-1] + x[:, :-2, 2:])
    mag = np.hypot(gx, gy)
    scale = np.maximum(np.percentile(mag.reshape(len(mag), -1), 99, axis=1), 1e-6)[:, None, None]
    return np.clip(np.round(255.0 * mag / scale), 0, 255).astype(np.uint8)


def silhouette(images: np.ndarray, threshold: int = 8) -> np.ndarray:
    """Filled white shapes: every pixel brighter than `threshold` becomes white. uint8 [N, 28, 28]."""
    return np.where(images > threshold, 255, 0).astype(np.uint8)


def outline(images: np.ndarray) -> np.ndarray:
    """Morphological outlines: 3x3 max filter minus 3x3 min filter (PIL), scaled per image to white. uint8."""
    out = []
    for a in images:
        im = Image.fromarray(a, "L")
        grad = np.asarray(im.filter(ImageFilter.MaxFilter(3)), np.int32) - np.asarray(im.filter(ImageFilter.MinFilter(3)), np.int32)
        out.append(np.clip(np.round(255.0 * grad / max(int(grad.max()), 1)), 0, 255).astype(np.uint8))
    return np.stack(out)


def caption_choices(label: int, source: str) -> list[str]:
    """Every caption a pool image of `source` with class `label` may get."""
    return [t.format(n) for t in CAPTION_TEMPLATES[source] for n in SYNONYMS[CLASSNAMES[label]]]


def sample_caption(label: int, source: str, rng: np.random.Generator) -> str:
    choices = caption_choices(label, source)
    return choices[int(rng.integers(len(choices)))]


def fashion_split_plan(labels: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded, stratified assignment of image indices to the blocks of `PER_CLASS` (disjoint by construction)."""
    rng = _rng(seed, "fashion/plan")
    blocks: dict[str, list[np.ndarray]] = {b: [] for b in PER_CLASS}
    for c in range(len(CLASSNAMES)):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) < sum(PER_CLASS.values()):
            raise ValueError(f"Fashion-MNIST class {c} has {len(idx)} images; the split plan needs "
                             f"{sum(PER_CLASS.values())}.")
        start = 0
        for b, n in PER_CLASS.items():
            blocks[b].append(idx[start:start + n])
            start += n
    return {b: rng.permutation(np.concatenate(v)) for b, v in blocks.items()}


def build_fashion_benchmark(seed: int = 0, data_dir: str = FASHION_DATA_DIR) -> datasets.DatasetDict:
    """Every split of the Fashion world in memory (~21k images, a few seconds), `ALL_SPLITS` in order.

    Same seed -> identical splits. ``pretrain`` also has ``caption`` and ``source`` (one of `CAPTION_TEMPLATES`).
    The bundled checkpoint (`fashion_clip_path()`) was pre-trained on ``seed=0``: evaluate it on that seed only.
    """
    import datasets

    x, y = load_fashion_mnist(data_dir)
    plan = fashion_split_plan(y, seed)

    def ds(images: np.ndarray, labels: np.ndarray, **extra: Any) -> datasets.Dataset:
        return _to_dataset(images, labels, CLASSNAMES, **extra)

    pool = plan["pool"]
    parts_x, parts_y, parts_src = [x[pool]], [y[pool]], ["photo"] * len(pool)
    for kind in CORRUPTIONS:
        r = _rng(seed, f"fashion/pool/{kind}")
        levels = r.integers(0, 3, size=len(pool))  # one random severity per copy, as in the digit world
        parts_x.append(apply_corruption(x[pool], kind, levels, r))
        parts_y.append(y[pool])
        parts_src += [kind] * len(pool)
    for style, fn in (("sketch", sketch), ("silhouette", silhouette)):
        idx = plan[f"pool_{style}"]
        parts_x.append(fn(x[idx]))
        parts_y.append(y[idx])
        parts_src += [style] * len(idx)
    px, py, psrc = np.concatenate(parts_x), np.concatenate(parts_y), np.asarray(parts_src)
    r = _rng(seed, "fashion/pool/order")
    perm = r.permutation(len(px))
    px, py, psrc = px[perm], py[perm], psrc[perm]
    captions = [sample_caption(int(lab), str(s), r) for lab, s in zip(py, psrc)]

    splits = {"pretrain": ds(px, py, caption=captions, source=psrc.tolist())}
    for name in ("finetune", "validation", ID_TEST_SPLIT):
        splits[name] = ds(x[plan[name]], y[plan[name]])
    splits["sketch"] = ds(sketch(x[plan["sketch"]]), y[plan["sketch"]])
    splits["silhouette"] = ds(silhouette(x[plan["silhouette"]]), y[plan["silhouette"]])
    test = plan[ID_TEST_SPLIT]
    for kind in CORRUPTIONS:
        cx, cy, _ = _all_severities(x[test], y[test], kind, _rng(seed, f"fashion/test/{kind}"))
        splits[kind] = ds(cx, cy)
    tune = plan["tune"]
    splits["tune_negative"] = ds(255 - x[tune], y[tune])
    for kind in ("pixelate", "shear", "haze"):
        kx, ky, _ = _all_severities(x[tune], y[tune], kind, _rng(seed, f"fashion/tune/{kind}"))
        splits[f"tune_{kind}"] = ds(kx, ky)
    splits["tune_outline"] = ds(outline(x[tune]), y[tune])
    return datasets.DatasetDict({k: splits[k] for k in ALL_SPLITS})


def build_fashion_tokenizer() -> PreTrainedTokenizerBase:
    """The word-level tokenizer of `digits.build_tokenizer` over this world's captions, prompts and class words."""
    templates = [t for ts in CAPTION_TEMPLATES.values() for t in ts] + TEMPLATES
    vocab = tokenizer_vocabulary(templates, [w for names in SYNONYMS.values() for w in names])
    assert vocab[:len(SPECIAL_TOKENS)] == list(SPECIAL_TOKENS)
    return build_tokenizer(vocab)


def fashion_collator(tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> DigitCLIPCollator:
    """`pretrain` rows -> a CLIPModel batch, captions re-drawn per image and epoch from this world's captions."""
    return DigitCLIPCollator(tokenizer, seed=seed, caption_sampler=sample_caption)


def fashion_clip_path() -> str:
    """Directory of the bundled tiny CLIP pre-trained on this world's pool (recipes/pretrain_tiny_clip.py --world
    fashion)."""
    return str(Path(__file__).resolve().parent / "tiny_clip_fashion")


def _world() -> Any:
    from .worlds import World

    return World(
        name="fashion", classnames=tuple(CLASSNAMES), templates=tuple(TEMPLATES), shift_splits=SHIFT_SPLITS,
        tuning_splits=TUNING_SPLITS, build=build_fashion_benchmark, clip_path=fashion_clip_path,
        build_tokenizer=build_fashion_tokenizer, collator=fashion_collator, id_test_split=ID_TEST_SPLIT,
        title="Fashion-shift benchmark",
    )


#: The Fashion-MNIST world (`saeft_hf.benchmarks.worlds`).
WORLD = _world()
