"""Digit shifts that no earlier run of the benchmark used: a check on saved models, built after they were trained.

Every shift is made from the ``id_test`` MNIST images of ``build_digit_benchmark(seed)`` (the same 1,000 digits the
reported ID accuracy uses, so a model's shift accuracy compares with its ID accuracy on the same digits), with its
own seeded stream, and is none of the families any run saw for training, tuning or reporting (``uci``, ``printed``,
``noise``, ``blur``, ``contrast``, ``tune_shift`` = salt-and-pepper, ``tune_fonts``, ``tune_pixelate``,
``tune_shear``) nor any the pre-training pool contains (Gaussian noise, blur and low contrast copies):

==========  ===============================================================  ==========================
shift       what                                                             severities (mildest first)
==========  ===============================================================  ==========================
``rotate``  rotation about the centre by +-angle (random sign), bilinear      20, 27.5, 35 degrees
``erase``   a black square at a random place whose centre lies in the         side 8, 11, 14 px
            central 16x16 box: part of the digit is missing
``invert``  black digit on white (255 - pixel)                                one level
``thin``    grey erosion (3x3 PIL MinFilter) blended with the image           blend 0.5, 0.75, 1.0
``thick``   grey dilation (3x3 PIL MaxFilter) applied n times                 n = 1, 2, 3
``jpeg``    JPEG round trip (8x8 block artefacts, ringing)                    quality 12, 8, 5
==========  ===============================================================  ==========================

Each source image appears once at every severity (3,000 images per shift, 1,000 for ``invert``), shuffled, like the
reported corruptions.

The Fashion world (``world="fashion"``) gets the same shifts of its own ``id_test`` photos, except ``invert``: there,
inverted photos are the tuning family ``tune_negative``, so not unseen. Its tuning families ``tune_outline``
(max minus min filter) and ``tune_haze`` differ from ``thin`` / ``thick`` (one-sided erosion / dilation). The set was fixed before any model was scored on it. ``erase`` may place its square on
background only: 70 of its 3,000 images (54 of them with the smallest square) are their id_test source unchanged.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFilter

from .worlds import get_world
from .digits import IMAGE_SIZE, _rng, _to_dataset, digit_split_plan, load_mnist

if TYPE_CHECKING:
    import datasets

#: The unseen shifts, in table order, and their severity parameters (see the module docstring).
UNSEEN_SEVERITIES: dict[str, tuple[float, ...]] = {
    "rotate": (20.0, 27.5, 35.0),
    "erase": (8, 11, 14),
    "invert": (1.0,),
    "thin": (0.5, 0.75, 1.0),
    "thick": (1, 2, 3),
    "jpeg": (12, 8, 5),
}
UNSEEN_SHIFTS: tuple[str, ...] = tuple(UNSEEN_SEVERITIES)
#: The unseen shifts of each benchmark world (the fashion world tunes on inverted photos: `invert` is not unseen).
UNSEEN_BY_WORLD: dict[str, tuple[str, ...]] = {
    "digits": UNSEEN_SHIFTS, "fashion": tuple(k for k in UNSEEN_SHIFTS if k != "invert"),
}
#: Prefix of every stream name here, so no stream coincides with one of `build_digit_benchmark`'s.
_STREAM = "unseen"


def id_test_images(seed: int = 0, world: str = "digits") -> tuple[np.ndarray, np.ndarray]:
    """The ``id_test`` split of the world's benchmark (``build_digit_benchmark(seed)`` or
    ``build_fashion_benchmark(seed)``) as arrays (uint8 [1000, 28, 28], labels [1000]), without building the other
    splits."""
    if world == "fashion":
        from .fashion import fashion_split_plan, load_fashion_mnist

        fx, fy = load_fashion_mnist()
        idx = fashion_split_plan(fy, seed)["id_test"]
        return fx[idx], fy[idx]
    if world != "digits":
        raise ValueError(f"Unknown benchmark world {world!r}; choose one of {sorted(UNSEEN_BY_WORLD)}.")
    mx, my = load_mnist()
    idx = digit_split_plan(seed).mnist["id_test"]
    return mx[idx], my[idx]


def _check_kinds(kinds: tuple[str, ...] | list[str], world: str) -> None:
    if world not in UNSEEN_BY_WORLD:
        raise ValueError(f"Unknown benchmark world {world!r}; choose one of {sorted(UNSEEN_BY_WORLD)}.")
    bad = [k for k in kinds if k not in UNSEEN_BY_WORLD[world]]
    if bad:
        raise ValueError(f"{bad} are not unseen shifts of the {world} world; choose from {list(UNSEEN_BY_WORLD[world])}.")


def _pil(a: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(a), "L")


def apply_unseen_shift(images: np.ndarray, kind: str, params: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Shift a batch deterministically: uint8 [N, 28, 28] (white on black) -> uint8 [N, 28, 28].

    `params` [N]: each image's severity value from ``UNSEEN_SEVERITIES[kind]``; `rng` draws the rotation's sign
    and the erased square's place (unused by the other shifts).
    """
    params = np.asarray(params)
    if len(params) != len(images):
        raise ValueError(f"{len(images)} images but {len(params)} severity values.")
    out = np.empty_like(images)
    if kind == "rotate":
        signs = np.where(rng.random(len(images)) < 0.5, -1.0, 1.0)
        for i, (a, angle) in enumerate(zip(images, params * signs)):
            out[i] = np.asarray(_pil(a).rotate(float(angle), resample=Image.Resampling.BILINEAR, fillcolor=0))
    elif kind == "erase":
        lo, hi = IMAGE_SIZE // 2 - 8, IMAGE_SIZE // 2 + 8  # the square's centre: the central 16x16 box
        centres = rng.integers(lo, hi + 1, size=(len(images), 2))
        for i, (a, side, (cy, cx)) in enumerate(zip(images, params.astype(int), centres)):
            b = a.copy()
            y0, x0 = max(0, cy - side // 2), max(0, cx - side // 2)
            b[y0:y0 + side, x0:x0 + side] = 0
            out[i] = b
    elif kind == "invert":
        out[:] = 255 - images
    elif kind == "thin":
        for i, (a, s) in enumerate(zip(images, params.astype(np.float64))):
            eroded = np.asarray(_pil(a).filter(ImageFilter.MinFilter(3)), dtype=np.float64)
            out[i] = np.clip(np.round((1.0 - s) * a + s * eroded), 0, 255).astype(np.uint8)
    elif kind == "thick":
        for i, (a, n) in enumerate(zip(images, params.astype(int))):
            img = _pil(a)
            for _ in range(int(n)):
                img = img.filter(ImageFilter.MaxFilter(3))
            out[i] = np.asarray(img)
    elif kind == "jpeg":
        for i, (a, q) in enumerate(zip(images, params.astype(int))):
            buf = io.BytesIO()
            _pil(a).save(buf, format="JPEG", quality=int(q))
            out[i] = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"))
    else:
        raise ValueError(f"unknown unseen shift {kind!r}; expected one of {list(UNSEEN_SHIFTS)}")
    return out


def unseen_shift_arrays(kind: str, seed: int = 0, world: str = "digits") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every ``id_test`` image of data seed `seed` at every severity of `kind`, shuffled:
    (uint8 [N*S, 28, 28], labels [N*S], severity index [N*S]). Deterministic for a given seed and Pillow version."""
    if kind not in UNSEEN_SEVERITIES:
        raise ValueError(f"unknown unseen shift {kind!r}; expected one of {list(UNSEEN_SHIFTS)}")
    _check_kinds([kind], world)
    images, labels = id_test_images(seed, world)
    severities = np.asarray(UNSEEN_SEVERITIES[kind])
    levels = np.repeat(np.arange(len(severities)), len(images))
    src = np.tile(np.arange(len(images)), len(severities))
    rng = _rng(seed, f"{_STREAM}/{kind}" if world == "digits" else f"{_STREAM}/{world}/{kind}")
    shifted = apply_unseen_shift(images[src], kind, severities[levels], rng)
    perm = rng.permutation(len(shifted))
    return shifted[perm], labels[src][perm], levels[perm]


def build_unseen_shifts(seed: int = 0, kinds: tuple[str, ...] | list[str] | None = None, world: str = "digits"
                        ) -> dict[str, datasets.Dataset]:
    """``{"id_test": ..., kind: ...}``: the ID set and the unseen shifts (default: all of the world's) as in-memory
    Datasets with ``image`` (28x28 mode "L") and ``label`` (``ClassLabel`` of the world's class names) columns, like
    the benchmark's splits."""
    kinds = UNSEEN_BY_WORLD.get(world, ()) if kinds is None else kinds
    _check_kinds(kinds, world)
    names = get_world(world).classnames
    images, labels = id_test_images(seed, world)
    sets = {"id_test": _to_dataset(images, labels, names)}
    for kind in kinds:
        x, y, _ = unseen_shift_arrays(kind, seed, world)
        sets[kind] = _to_dataset(x, y, names)
    return sets


def save_image_folders(sets: dict[str, datasets.Dataset], root: str) -> str:
    """Write each set as a class-folder tree ``root/<set>/<class name>/<i>.png`` (lossless) and ``root/eval_sets.yaml``
    (the eval-set format of ``recipes/evaluate.py``: ``id_test`` with ``role: id``, the rest ``role: shift``), so the
    shifts can be looked at, shared and scored again with ``--eval_sets_config``. Returns the YAML's path."""
    import os

    import yaml

    entries = []
    for name, ds in sets.items():
        names = ds.features["label"].names
        for i, row in enumerate(ds):
            folder = os.path.join(root, name, names[row["label"]])
            os.makedirs(folder, exist_ok=True)
            row["image"].save(os.path.join(folder, f"{i:05d}.png"))
        entries.append({"name": name, "data_dir": os.path.abspath(os.path.join(root, name)),
                        "role": "id" if name == "id_test" else "shift"})
    path = os.path.join(root, "eval_sets.yaml")
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump({"eval_sets": entries}, fh, sort_keys=False)
    return path
