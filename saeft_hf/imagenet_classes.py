"""Public class-list facts for ImageNet and its distribution shifts, and the OpenAI ImageNet prompt templates.

The files live in ``saeft_hf/resources/`` (package data):

- ``imagenet_wnids.txt``: the 1000 ImageNet-1k WordNet ids in the standard (sorted) class-index order.
- ``imagenet_classnames.txt``: the curated readable name of each class (CLIP zero-shot names), same order.
- ``imagenet_r_indices.json`` / ``imagenet_a_indices.json``: the ImageNet-1k indices of the 200 ImageNet-R /
  ImageNet-A classes (sorted). An image's label is the position of its class in that list.
- ``objectnet_to_imagenet.json``: the 113 ObjectNet-1.0 classes that map to ImageNet-1k, in ObjectNet class order
  (sorted image-folder names), each with its folder name, readable name and ImageNet-1k indices.

Loaders return fresh lists (callers may mutate them); the parsed files are cached.
This module imports only the standard library, so any module may use it.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

__all__ = [
    "IMAGENET_TEMPLATES",
    "imagenet_a_indices",
    "imagenet_classnames",
    "imagenet_r_indices",
    "imagenet_wnids",
    "objectnet_class_groups",
    "objectnet_classnames",
    "objectnet_folders",
    "curated_imagenet_classnames",
]

# The 80 prompt templates OpenAI used for CLIP zero-shot ImageNet (also used by WiSE-FT and SAE-FT for the head).
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)


def _read_text(name: str) -> str:
    return resources.files("saeft_hf").joinpath("resources", name).read_text(encoding="utf-8")


@functools.cache
def _lines(name: str) -> tuple[str, ...]:
    lines = tuple(line.strip() for line in _read_text(name).splitlines() if line.strip())
    if len(lines) != 1000:
        # A truncated package-data file would silently shift every class index: fail loudly instead.
        raise RuntimeError(f"saeft_hf/resources/{name} has {len(lines)} entries, expected 1000; reinstall saeft-hf.")
    return lines


@functools.cache
def _json(name: str) -> dict[str, Any]:
    return json.loads(_read_text(name))


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids (``n01440764``, ...) in class-index order."""
    return list(_lines("imagenet_wnids.txt"))


def imagenet_classnames() -> list[str]:
    """The 1000 readable ImageNet-1k class names (CLIP zero-shot names) in class-index order."""
    return list(_lines("imagenet_classnames.txt"))


def curated_imagenet_classnames(label_names: list[str] | tuple[str, ...]) -> list[str] | None:
    """The curated class names when ``label_names`` are ImageNet-1k's 1000 classes in class-index order, else None.

    Recognised: the WordNet ids (``n01440764``, ...; the order of ``label_names`` is kept), the curated names
    themselves, and the WordNet synset strings that ``ILSVRC/imagenet-1k`` and many model configs carry ("tench,
    Tinca tinca", "hammerhead, hammerhead shark", ...). Those make poor zero-shot prompts; they are recognised by
    agreement with the curated list position by position (a curated name equal to one of the comma-separated lemmas
    at the same index, for at least a quarter of the 1000 classes: most curated names are one of those lemmas, a
    few are rewordings such as "rooster" for "cock", and any other 1000-class list, or ImageNet's in another order,
    agrees at almost no position).
    """
    names = [str(n).strip() for n in label_names]
    curated = imagenet_classnames()
    wnids = imagenet_wnids()
    if names and set(names) <= set(wnids):
        lookup = dict(zip(wnids, curated))
        return [lookup[n] for n in names]
    if len(names) != len(curated):
        return None
    agree = sum(c.lower() in {lemma.strip().lower() for lemma in n.split(",")} for n, c in zip(names, curated))
    return curated if agree >= len(curated) // 4 else None


def imagenet_r_indices() -> list[int]:
    """ImageNet-1k indices of the 200 ImageNet-R classes, sorted; label = position in this list."""
    return [int(i) for i in _json("imagenet_r_indices.json")["indices"]]


def imagenet_a_indices() -> list[int]:
    """ImageNet-1k indices of the 200 ImageNet-A classes, sorted; label = position in this list."""
    return [int(i) for i in _json("imagenet_a_indices.json")["indices"]]


def objectnet_class_groups() -> list[list[int]]:
    """For each of the 113 ObjectNet classes (ObjectNet class order), the ImageNet-1k indices it maps to.

    The logit of ObjectNet class ``c`` is the max over ``logits[:, groups[c]]``.
    """
    return [[int(i) for i in c["imagenet_indices"]] for c in _json("objectnet_to_imagenet.json")["classes"]]


def objectnet_folders() -> list[str]:
    """The image-folder names (``alarm_clock``, ...) of the 113 mapped ObjectNet classes, in class order."""
    return [str(c["folder"]) for c in _json("objectnet_to_imagenet.json")["classes"]]


def objectnet_classnames() -> list[str]:
    """The readable names (``Alarm clock``, ...) of the 113 mapped ObjectNet classes, in class order."""
    return [str(c["name"]) for c in _json("objectnet_to_imagenet.json")["classes"]]
