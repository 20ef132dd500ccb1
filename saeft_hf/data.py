"""Datasets in, model-ready batches out: loading, CLIP image transforms without torchvision, and the collator.

The pieces, in the order data flows through them::

    raw = load_image_dataset(dataset_name="timm/imagenet-1k-wds", split="train", streaming=True)
    raw = shuffle_for_training(raw, seed=0)                       # streaming only; map-style: the Trainer shuffles
    train_tf, eval_tf = transforms_from_pretrained("openai/clip-vit-base-patch16")
    ds = with_image_transform(raw, train_tf)                      # {"pixel_values": [C, H, W], "labels": int}
    collator = ImageClassificationCollator(num_labels=1000)       # {"pixel_values": [B, C, H, W], "labels": [B]}

Design choices, and why:

- The image column stays *undecoded* (``datasets.Image(decode=False)``: ``{"bytes", "path"}``) so that our transform
  decodes it and a broken file can be reported by name (:class:`CorruptImageError`) or skipped, instead of crashing
  deep inside ``datasets``' formatting code.
- Transforms are PIL + numpy (torchvision semantics for ``RandomResizedCrop``, ``Resize`` and ``CenterCrop``): the
  project must not need torchvision.
- Nothing here shards a streaming dataset across ranks: with the ``Trainer``, Accelerate does it (calling
  ``split_dataset_by_node`` as well would shard twice).

This module imports only torch, numpy, PIL and datasets (transformers lazily, in :func:`transforms_from_pretrained`).
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

import datasets
import numpy as np
import PIL.Image
import torch

__all__ = [
    "IMAGE_COLUMN_CANDIDATES",
    "LABEL_COLUMN_CANDIDATES",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "AnyDataset",
    "BorderCrop",
    "CLIPImageTransform",
    "CorruptImageError",
    "ImageClassificationCollator",
    "check_dataset_size",
    "decode_image",
    "load_image_dataset",
    "random_subset",
    "relabel_by_name",
    "shuffle_for_training",
    "to_model_mode",
    "transforms_from_pretrained",
    "with_image_transform",
]

logger = logging.getLogger(__name__)

AnyDataset: TypeAlias = datasets.Dataset | datasets.IterableDataset

IMAGE_COLUMN_CANDIDATES: tuple[str, ...] = ("image", "img", "jpg", "jpeg", "png", "webp")
LABEL_COLUMN_CANDIDATES: tuple[str, ...] = ("label", "labels", "cls")
# Columns kept besides image/label: webdataset sample ids, used to name a corrupt sample.
_ID_COLUMNS: tuple[str, ...] = ("__key__", "__url__")

OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif")
_SKIP_HINT = "Pass skip_corrupt_images=True to drop such samples (they are counted by ImageClassificationCollator)."


# ----------------------------------------------------------------------------------------------------------------
# Decoding and mode conversion
# ----------------------------------------------------------------------------------------------------------------


class CorruptImageError(ValueError):
    """An image that cannot be decoded (truncated, not an image, missing file). ``sample`` names it when known."""

    def __init__(self, message: str, *, sample: str | None = None) -> None:
        super().__init__(message)
        self.sample = sample


def _array_to_pil(array: np.ndarray) -> PIL.Image.Image:
    """[H, W], [H, W, C] or [C, H, W] (C in 1, 3, 4) array -> 8-bit PIL image ("L", "RGB" or "RGBA").

    uint8 is taken as is; uint16 (and other integers above 255) is scaled to 8 bits (65535 -> 255, not clipped);
    bool -> {0, 255}; floats in [0, 1] are scaled by 255, other floats are clipped to [0, 255].
    """
    arr = np.asarray(array)
    if arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4) and arr.shape[0] in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # CHW (torch layout) -> HWC
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ValueError(f"Cannot interpret an array of shape {tuple(array.shape)} as an image; expected [H, W] or "
                         "[H, W, C] / [C, H, W] with C in (1, 3, 4).")
    if arr.dtype == np.uint8:
        out = arr
    elif arr.dtype == np.bool_:
        out = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.integer):
        out = _int_to_uint8(arr)
    elif np.issubdtype(arr.dtype, np.floating):
        finite_max = float(np.nanmax(arr)) if arr.size else 0.0
        scaled = arr * 255.0 if finite_max <= 1.0 else arr
        out = np.clip(np.rint(np.nan_to_num(scaled)), 0, 255).astype(np.uint8)
    else:
        raise ValueError(f"Unsupported image array dtype {arr.dtype}.")
    return PIL.Image.fromarray(np.ascontiguousarray(out))


def _int_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Integer samples -> uint8. Values above 255 mean a 16-bit range (scale by 255/65535, i.e. divide by 257);
    beyond 65535 (32-bit data) scale by the maximum. Never clip a 16-bit image to 255 (that whitens it)."""
    arr = arr.astype(np.int64)
    top = int(arr.max()) if arr.size else 0
    if top <= 255:
        return np.clip(arr, 0, 255).astype(np.uint8)
    denom = 65535.0 if top <= 65535 else float(top)
    return np.clip(np.rint(arr.astype(np.float64) * (255.0 / denom)), 0, 255).astype(np.uint8)


def _to_8bit(img: PIL.Image.Image) -> PIL.Image.Image:
    """Any PIL mode -> one of "L", "LA", "RGB", "RGBA" (8 bits per sample)."""
    mode = img.mode
    if mode in ("L", "LA", "RGB", "RGBA"):
        return img
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grayscale (PNG/TIFF). PIL's convert("L") clips at 255, which turns most pixels white: rescale.
        # Mode "I" (32-bit int) is read as the 16-bit range it almost always holds when it comes from a file.
        arr = np.asarray(img).astype(np.int64)
        top = int(arr.max()) if arr.size else 0
        denom = 65535.0 if top <= 65535 else float(top)
        out = np.clip(np.rint(arr * (255.0 / denom)), 0, 255).astype(np.uint8)
        return PIL.Image.fromarray(out, mode="L")
    if mode == "F":
        return _array_to_pil(np.asarray(img, dtype=np.float32))
    if mode == "P":
        # Palette images may carry transparency; go through RGBA so the alpha policy applies (and PIL doesn't warn).
        return img.convert("RGBA" if "transparency" in img.info else "RGB")
    if mode in ("PA", "RGBa"):
        return img.convert("RGBA")
    if mode == "La":
        return img.convert("LA")
    if mode == "1":
        return img.convert("L")
    # CMYK, YCbCr, LAB, HSV, RGBX, ...: PIL knows the conversion to RGB.
    return img.convert("RGB")


def to_model_mode(
    img: PIL.Image.Image, num_channels: int = 3, *, alpha_background: tuple[int, int, int] | None = None
) -> PIL.Image.Image:
    """Convert any PIL image to "L" (``num_channels=1``) or "RGB" (``num_channels=3``).

    Handles "1", "L", "P" (with or without transparency), "I;16*" / "I" (16-bit, rescaled to 8 bits, not clipped),
    "F", "LA", "RGB", "RGBA", "CMYK", "YCbCr", ...

    Alpha: with ``alpha_background=None`` (default) the alpha channel is dropped and the colour channels are kept as
    stored, which is what ``PIL.Image.convert("RGB")`` and torchvision's ``pil_loader`` do (the reference pipeline).
    Give an RGB colour, e.g. ``(0, 0, 0)`` or ``(255, 255, 255)``, to alpha-composite onto that background instead
    (transformers' ``convert_rgb`` composites onto white).
    """
    if num_channels not in (1, 3):
        raise ValueError(f"num_channels must be 1 (grayscale) or 3 (RGB), got {num_channels}.")
    img = _to_8bit(img)
    if img.mode in ("RGBA", "LA"):
        if alpha_background is None:
            img = img.convert("RGB" if img.mode == "RGBA" else "L")
        else:
            rgba = img.convert("RGBA")
            background = PIL.Image.new("RGBA", rgba.size, (*alpha_background, 255))
            img = PIL.Image.alpha_composite(background, rgba).convert("RGB")
    target = "L" if num_channels == 1 else "RGB"
    return img if img.mode == target else img.convert(target)


def _open_image(image: Any) -> tuple[PIL.Image.Image | None, bytes | None, PIL.Image.Image | np.ndarray | None]:
    """Open an image value lazily: ``(unloaded PIL image, its encoded bytes, None)`` for encoded inputs (bytes, a
    ``{"bytes", "path"}`` dict, a path: the file is read here), or ``(None, None, value)`` for PIL images and arrays.

    An encoded image is only parsed (header), not decoded, so the caller may still call ``draft`` on it.
    """
    if isinstance(image, (PIL.Image.Image, np.ndarray)):
        return None, None, image
    if isinstance(image, Mapping):
        data, path = image.get("bytes"), image.get("path")
        if data is None and not path:
            raise CorruptImageError("The image value has neither bytes nor a path.")
    elif isinstance(image, (bytes, bytearray, memoryview)):
        data, path = image, None
    elif isinstance(image, (str, os.PathLike)):
        data, path = None, image
    else:
        raise TypeError(f"Cannot decode an image from {type(image).__name__}; expected a PIL image, a numpy array, "
                        "a {'bytes', 'path'} dict (datasets Image(decode=False)), bytes or a path.")
    try:
        if data is None:
            with open(os.fspath(path), "rb") as fh:  # read once: the bytes also key the per-image crop
                data = fh.read()
        data = bytes(data)
        return PIL.Image.open(io.BytesIO(data)), data, None
    except PIL.Image.DecompressionBombError as err:
        raise CorruptImageError(f"refused to decode a suspiciously large image ({err}).") from err
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as err:
        raise CorruptImageError(f"cannot decode image ({type(err).__name__}: {err}).") from err


def _load_image(img: PIL.Image.Image) -> PIL.Image.Image:
    """Decode now: truncation and bad data surface here (as :class:`CorruptImageError`), not later inside resize."""
    try:
        img.load()
    except PIL.Image.DecompressionBombError as err:
        raise CorruptImageError(f"refused to decode a suspiciously large image ({err}).") from err
    # PIL plugins signal bad data with any of these (struct.error / IndexError on garbage headers).
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as err:
        raise CorruptImageError(f"cannot decode image ({type(err).__name__}: {err}).") from err
    return img


def _draft(img: PIL.Image.Image, scale: int) -> int:
    """Ask the JPEG decoder for a 1/``scale`` (1, 2, 4 or 8) size decode (DCT scaling: far less work than a full
    decode plus a resize). Returns the scale obtained: 1 for non-JPEG images or when ``scale`` < 2.

    ``draft((W // s, H // s))`` makes PIL pick exactly ``s``: it takes the largest power of two <= min(W // w, H // h)
    and ``W // (W // s)`` lies in [s, 2s).
    """
    if scale < 2 or img.format not in ("JPEG", "MPO"):
        return 1
    scale = 8 if scale >= 8 else 4 if scale >= 4 else 2
    width, height = img.size
    if img.draft(None, (width // scale, height // scale)) is None:
        return 1  # progressive/multi-tile files: PIL decodes them at full size
    return scale


def decode_image(image: Any, *, draft_size: int | None = None) -> PIL.Image.Image:
    """Decode one image value into a fully loaded PIL image.

    Accepts a PIL image, a numpy array ([H, W], [H, W, C] or [C, H, W]), a ``datasets.Image(decode=False)`` dict
    ``{"bytes": ..., "path": ...}``, raw encoded bytes, or a file path.

    ``draft_size``: for an encoded JPEG, decode at the smallest 1/2, 1/4 or 1/8 scale whose shortest edge is still
    >= ``draft_size`` (PIL's ``Image.draft``); a later resize to ``draft_size`` then keeps its quality at a fraction
    of the decoding cost. Other formats and already decoded inputs are returned at full size.

    Raises:
        CorruptImageError: the bytes/file cannot be decoded (not an image, truncated, missing file).
        TypeError: the value is not an image of any supported kind (a programming error, never skipped).
    """
    img, _, decoded = _open_image(image)
    if decoded is not None:
        if isinstance(decoded, np.ndarray):
            return _array_to_pil(decoded)
        return _load_image(decoded)
    if draft_size:
        _draft(img, min(img.size) // int(draft_size))
    return _load_image(img)


# ----------------------------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------------------------


class CLIPImageTransform:
    """PIL image (or any value :func:`decode_image` accepts) -> normalised float32 tensor [C, H, W].

    Train (``train=True``): ``RandomResizedCrop(image_size, scale=scale, ratio=(3/4, 4/3), bicubic)`` with
    torchvision's sampling rule (10 tries, then a central crop fallback), without torchvision.
    Eval: resize the shortest edge to ``resize_size`` (default ``image_size``, bicubic, torchvision's rounding), then
    center-crop ``image_size`` (torchvision's offset rounding). Both then scale to [0, 1] and normalise with
    ``mean``/``std``. This is OpenAI CLIP's (and WiSE-FT's) preprocessing.

    Input modes are converted by :func:`to_model_mode` to ``num_channels`` (1 -> "L", 3 -> "RGB"); alpha is dropped
    unless ``alpha_background`` is given.

    Randomness, two modes:

    - Per image (after :meth:`set_epoch`, which training code calls at every epoch start; ``run_saeft`` does it
      through :class:`saeft_hf.trainer.SetEpochCallback`): each crop is drawn from a generator seeded by
      ``(seed, epoch, the image's identity)`` (a hash of its encoded bytes; see :meth:`_image_generator`). A crop
      then depends on nothing else (not on the order of calls, the DataLoader workers, the number of processes, or what ran before in the process), so a run resumed
      from a checkpoint, or split over several processes, sees exactly the crops of the uninterrupted single-process
      run. (A sequential stream cannot give that: on resume the Trainer skips the batches already trained on without
      transforming them, and the per-process stream restarts, so every later crop would shift.) Identical images in
      one epoch get the same crop. With ``dataloader_persistent_workers`` the workers keep the epoch they started
      with; leave that option off for per-epoch crops.
    - Sequential (before any ``set_epoch``): a numpy ``Generator`` created lazily per process and advanced by every
      call, so repeated calls on one image give fresh crops. With ``seed`` given, the same crop sequence on every run
      in the main process; inside a DataLoader worker the worker's torch seed (different per worker and per epoch)
      is mixed in, so workers don't repeat each other.

    With ``seed=None`` the torch seed is used in both modes (reproducible under ``transformers.set_seed``).

    ``draft`` (default on): an encoded JPEG is decoded at 1/2, 1/4 or 1/8 scale (PIL's ``Image.draft``, DCT scaling)
    when that still leaves at least ``resize_size`` (eval) or ``image_size`` (train: per side of the chosen crop)
    source pixels, so the final bicubic resize only ever shrinks. It changes pixel values slightly (the decoder's
    box-like downscale replaces part of the bicubic one); ``draft=False`` gives the exact full-decode pipeline.
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        train: bool,
        scale: tuple[float, float] = (0.9, 1.0),
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        num_channels: int = 3,
        resize_size: int | None = None,
        alpha_background: tuple[int, int, int] | None = None,
        seed: int | None = None,
        draft: bool = True,
    ) -> None:
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}.")
        if num_channels not in (1, 3):
            raise ValueError(f"num_channels must be 1 or 3, got {num_channels}.")
        if len(mean) != num_channels or len(std) != num_channels:
            raise ValueError(f"mean has {len(mean)} and std {len(std)} values but num_channels={num_channels}; "
                             f"give one mean/std value per channel.")
        if any(s <= 0 for s in std):
            raise ValueError(f"std values must be positive, got {list(std)}.")
        if not (0 < scale[0] <= scale[1]):
            raise ValueError(f"scale must satisfy 0 < min <= max, got {scale}.")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}.")
        self.image_size = int(image_size)
        self.resize_size = int(resize_size) if resize_size is not None else self.image_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.train = bool(train)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.num_channels = int(num_channels)
        self.alpha_background = alpha_background
        self.seed = seed
        self.draft = bool(draft)
        # [C, 1, 1] float32: normalising in torch, in place, is about twice as fast as numpy on HWC arrays.
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        self._rng: np.random.Generator | None = None
        self._rng_key: tuple[Any, ...] | None = None
        self.epoch: int | None = None  # set by set_epoch: switches to per-image crops

    def __repr__(self) -> str:
        geometry = (f"RandomResizedCrop({self.image_size}, scale={self.scale})" if self.train
                    else f"Resize({self.resize_size}) + CenterCrop({self.image_size})")
        return (f"CLIPImageTransform({geometry}, num_channels={self.num_channels}, mean={self.mean}, "
                f"std={self.std}, seed={self.seed}, draft={self.draft})")

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_rng"] = None  # re-created in the receiving process (DataLoader worker)
        state["_rng_key"] = None
        return state

    def set_epoch(self, epoch: int) -> None:
        """Draw the crops of this epoch per image, from ``(seed, epoch, image hash)`` (see the class docstring)."""
        self.epoch = int(epoch)

    def __call__(self, image: Any) -> torch.Tensor:
        """Decode, convert, crop/resize and normalise one image. Returns float32 [num_channels, S, S].

        Encoded inputs are opened lazily: the crop is chosen from the header's size, and a large JPEG is decoded at
        a reduced scale (``draft``) that still gives the crop/resize at least ``image_size`` / ``resize_size``
        source pixels per side.
        """
        lazy, data, decoded = _open_image(image)
        if decoded is not None:
            img = decode_image(decoded)
        else:
            img = lazy
        if self.train:
            rng = self._generator() if self.epoch is None else self._image_generator(img, data)
            top, left, h, w = self._crop_params(*img.size, rng)
            scale = _draft(img, min(w, h) // self.image_size) if lazy is not None and self.draft else 1
            img = self._convert(_load_image(img) if lazy is not None else img)
            if scale == 1:
                img = img.crop((left, top, left + w, top + h))
                img = img.resize((self.image_size, self.image_size), PIL.Image.Resampling.BICUBIC)
            else:  # the same crop in the reduced image's coordinates (pixel i covers source pixels s*i .. s*i+s-1)
                box = (left / scale, top / scale, (left + w) / scale, (top + h) / scale)
                img = img.resize((self.image_size, self.image_size), PIL.Image.Resampling.BICUBIC, box=box)
        else:
            if lazy is not None and self.draft:
                _draft(img, min(img.size) // self.resize_size)
            img = self._resize_center_crop(self._convert(_load_image(img) if lazy is not None else img))
        return self._to_tensor(img)

    def _convert(self, img: PIL.Image.Image) -> PIL.Image.Image:
        return to_model_mode(img, self.num_channels, alpha_background=self.alpha_background)

    def _to_tensor(self, img: PIL.Image.Image) -> torch.Tensor:
        """uint8 HWC -> normalised float32 CHW: one conversion copy, then in-place ops in the order (and so with the
        float32 rounding) of ``(x / 255 - mean) / std``."""
        width, height = img.size
        channels = len(img.getbands())
        # bytearray: a writable buffer (torch warns on read-only ones); the extra uint8 copy costs microseconds.
        pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(height, width, channels)
        # Transpose in uint8 (a quarter of the bytes), then convert: ~40% faster than one transposing float copy.
        out = pixels.permute(2, 0, 1).contiguous().to(torch.float32)
        return out.div_(255.0).sub_(self._mean).div_(self._std)

    # -- randomness ------------------------------------------------------------------------------------------------
    def _generator(self) -> np.random.Generator:
        info = torch.utils.data.get_worker_info()
        key = (os.getpid(), None if info is None else info.seed)
        if self._rng is None or key != self._rng_key:
            material: list[int] = [] if self.seed is None else [int(self.seed)]
            if info is not None:
                material.append(int(info.seed))  # differs per worker and per epoch
            elif self.seed is None:
                material.append(int(torch.initial_seed()))
            self._rng = np.random.default_rng(material)
            self._rng_key = key
        return self._rng

    def _image_generator(self, img: PIL.Image.Image | np.ndarray, data: bytes | None) -> np.random.Generator:
        """A generator for this image in this epoch only: seeded by (seed, epoch, image identity).

        The identity is a hash of the encoded bytes' length and every 16th byte when the image arrives encoded
        (dataset rows, files; independent of how it is decoded), else of its size, mode and a 32 x 32
        nearest-neighbour subsample of the pixels. Hashing every pixel cost about 1 ms per image, every encoded byte
        0.1 ms; this costs about 12 us. Two images that agree on the subsample share their crop parameters, which is
        harmless.
        """
        base = int(self.seed) if self.seed is not None else int(torch.initial_seed())
        digest = hashlib.blake2b(f"{base},{int(self.epoch or 0)},".encode(), digest_size=16)
        if data is not None:
            digest.update(f"{len(data)},".encode())
            digest.update(data[::16])
        else:
            if isinstance(img, np.ndarray):
                img = _array_to_pil(img)
            sample = img.resize((32, 32), PIL.Image.Resampling.NEAREST) if max(img.size) > 32 else img
            digest.update(f"{img.mode}{img.size}".encode())
            digest.update(sample.tobytes())
        return np.random.Generator(np.random.PCG64(int.from_bytes(digest.digest(), "little")))

    # -- geometry (torchvision semantics) ---------------------------------------------------------------------------
    def _crop_params(self, width: int, height: int,
                     rng: np.random.Generator | None = None) -> tuple[int, int, int, int]:
        """torchvision ``RandomResizedCrop.get_params``: returns (top, left, h, w).

        All 22 uniforms are drawn in one call (numpy's per-call overhead was most of this function's cost)."""
        rng = rng if rng is not None else self._generator()
        u = rng.random(22).tolist()
        area = height * width
        (s0, s1), (r0, r1) = self.scale, (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for i in range(10):
            target_area = area * (s0 + (s1 - s0) * u[2 * i])
            aspect = math.exp(r0 + (r1 - r0) * u[2 * i + 1])
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = min(int(u[20] * (height - h + 1)), height - h)  # uniform integer in [0, height - h]
                left = min(int(u[21] * (width - w + 1)), width - w)
                return top, left, h, w
        # Fallback: the largest central crop within the ratio bounds.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def _random_resized_crop(self, img: PIL.Image.Image, rng: np.random.Generator | None = None) -> PIL.Image.Image:
        top, left, h, w = self._crop_params(*img.size, rng)
        img = img.crop((left, top, left + w, top + h))
        return img.resize((self.image_size, self.image_size), PIL.Image.Resampling.BICUBIC)

    def _resize_center_crop(self, img: PIL.Image.Image) -> PIL.Image.Image:
        width, height = img.size
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.resize_size, int(self.resize_size * long / short)
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        if (new_w, new_h) != (width, height):
            img = img.resize((new_w, new_h), PIL.Image.Resampling.BICUBIC)
        size = self.image_size
        if new_w < size or new_h < size:
            # torchvision pads with zeros when the crop is larger than the image (only if resize_size < image_size).
            canvas = PIL.Image.new(img.mode, (max(new_w, size), max(new_h, size)))
            canvas.paste(img, ((max(new_w, size) - new_w) // 2, (max(new_h, size) - new_h) // 2))
            img, (new_w, new_h) = canvas, canvas.size
        top = int(round((new_h - size) / 2.0))
        left = int(round((new_w - size) / 2.0))
        return img.crop((left, top, left + size, top + size))


class BorderCrop:
    """Decode, remove ``border`` pixels from every side, then apply ``transform``.

    ObjectNet images carry a 1-2 px red border; the WiSE-FT protocol crops 2 px before the usual preprocessing.
    Images too small to crop are passed through unchanged. Before an eval :class:`CLIPImageTransform` with ``draft``
    on, a large JPEG (ObjectNet's are 1920x1440 and more) is decoded at a reduced scale ``s`` that divides
    ``border`` (2 px: ``s`` = 2), and ``border / s`` reduced pixels are removed: exactly the same region.
    """

    def __init__(self, transform: Callable[[Any], torch.Tensor], border: int) -> None:
        if border < 0:
            raise ValueError(f"border must be >= 0, got {border}.")
        self.transform = transform
        self.border = int(border)

    def __repr__(self) -> str:
        return f"BorderCrop({self.transform!r}, border={self.border})"

    def __call__(self, image: Any) -> torch.Tensor:
        inner = self.transform
        img, _, decoded = _open_image(image)
        b = self.border
        if decoded is not None:
            img = decode_image(decoded)
        else:
            if isinstance(inner, CLIPImageTransform) and inner.draft and not inner.train:
                # A scale dividing the border keeps the cropped region exact (a 2 px border at 1/4 scale would
                # crop 4 px or none: measured 10x the draft's own difference).
                limit = (min(img.size) - 2 * b) // inner.resize_size
                scale = _draft(img, min(limit, b & -b) if b else limit)
                b //= scale
            img = _load_image(img)
        width, height = img.size
        if b and width > 2 * b and height > 2 * b:
            img = img.crop((b, b, width - b, height - b))
        return self.transform(img)


def _square_size(value: Any, what: str) -> int | None:
    """Read an image-processor size entry (int, {"height","width"} or {"shortest_edge"}) as one int."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return int(value)
    if isinstance(value, Mapping):
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
        if "height" in value and "width" in value:
            if int(value["height"]) != int(value["width"]):
                raise ValueError(f"{what} is {value['height']}x{value['width']}; CLIPImageTransform makes square "
                                 "images only. Build CLIPImageTransform yourself or use a square crop_size.")
            return int(value["height"])
    raise ValueError(f"Unrecognised {what} in the image processor config: {value!r}.")


def transforms_from_pretrained(
    name_or_path: str | os.PathLike[str],
    num_channels: int | None = None,
    *,
    scale: tuple[float, float] = (0.9, 1.0),
    seed: int | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
) -> tuple[CLIPImageTransform, CLIPImageTransform]:
    """Build (train_transform, eval_transform) from a Hub id or a local directory.

    Reads ``preprocessor_config.json`` (``crop_size``, ``size``, ``image_mean``, ``image_std``; old integer and new
    dict forms) and the model's ``config.json`` for ``num_channels`` (top level, as in ``CLIPVisionConfig``, or under
    ``vision_config``, as in ``CLIPConfig`` and our own model config). Without a preprocessor config (a directory a
    trainer saved without its processor) it falls back to the config's ``image_size`` and the OpenAI CLIP mean/std,
    with a warning. ``num_channels`` overrides the config. A 3-value mean/std with a 1-channel model is averaged.
    """
    from transformers import PretrainedConfig
    from transformers.image_processing_utils import ImageProcessingMixin

    name = os.fspath(name_or_path)
    hub_kwargs: dict[str, Any] = {"token": token, "revision": revision}
    config_error: OSError | None = None
    try:
        model_config, _ = PretrainedConfig.get_config_dict(name, **hub_kwargs)
    except OSError as err:
        model_config = None
        config_error = err
    vision = (model_config or {}).get("vision_config") or model_config or {}

    try:
        proc, _ = ImageProcessingMixin.get_image_processor_dict(name, **hub_kwargs)
    except OSError as err:
        if model_config is None:
            raise OSError(f"Could not read an image processor config nor a model config from {name!r}: {err}. "
                          "Give a Hub id (online, or cached with HF_HUB_OFFLINE=1) or a local directory holding "
                          "preprocessor_config.json and/or config.json.") from config_error
        image_size = vision.get("image_size")
        if image_size is None:
            raise OSError(f"{name!r} has no preprocessor_config.json and its config has no image_size; save the "
                          "image processor next to the model (processor.save_pretrained(dir)).") from err
        logger.warning("%s has no preprocessor_config.json; using image_size=%s from its config and the OpenAI CLIP "
                       "mean/std.", name, image_size)
        proc = {"crop_size": image_size, "size": {"shortest_edge": image_size}}

    crop = _square_size(proc.get("crop_size"), "crop_size")
    resize = _square_size(proc.get("size"), "size")
    image_size = crop if crop is not None and proc.get("do_center_crop", True) else resize
    if image_size is None:
        raise ValueError(f"The image processor config of {name!r} has neither crop_size nor size.")
    resize = resize if resize is not None else image_size
    mean = list(proc.get("image_mean") or OPENAI_CLIP_MEAN)
    std = list(proc.get("image_std") or OPENAI_CLIP_STD)
    if num_channels is None:
        num_channels = int(vision.get("num_channels", 3))
    if len(mean) != num_channels:
        if num_channels == 1 and len(mean) == 3:
            logger.warning("%s: the image processor has 3-channel mean/std but the model takes 1 channel; using "
                           "their averages.", name)
            mean, std = [float(np.mean(mean))], [float(np.mean(std))]
        else:
            raise ValueError(f"{name!r}: image_mean has {len(mean)} values but the model takes {num_channels} "
                             "channels; fix preprocessor_config.json or pass num_channels.")
    common: dict[str, Any] = {"mean": mean, "std": std, "num_channels": num_channels}
    train = CLIPImageTransform(image_size, train=True, scale=scale, seed=seed, **common)
    evaluation = CLIPImageTransform(image_size, train=False, resize_size=resize, **common)
    return train, evaluation


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def _base_split(split: str) -> str:
    """"validation[:1000]" -> "validation" (datasets' slicing syntax)."""
    return re.split(r"[\[+]", str(split), maxsplit=1)[0].strip()


def _missing_split_error(split: str, source: str, available: Sequence[str] | None) -> ValueError:
    avail = f"Available splits: {list(available)}. " if available else ""
    hint = ("Pass split= one of them (ImageNet on the Hub: 'train' / 'validation'; the clip-benchmark/wds_* shift "
            "sets: 'test'); for local folders use train_dir= (split 'train') / validation_dir= (split "
            "'validation'), or give data_files={split_name: files}.")
    return ValueError(f"Split {split!r} not found in {source}. {avail}{hint}")


def _infer_builder(files: Any) -> str:
    flat: list[str] = []
    if isinstance(files, Mapping):
        for v in files.values():
            flat.extend([v] if isinstance(v, str) else list(v))
    else:
        flat.extend([files] if isinstance(files, str) else list(files))
    lowered = [f.lower() for f in flat]
    if lowered and all(f.endswith(".tar") for f in lowered):
        return "webdataset"
    if lowered and all(f.endswith(".parquet") for f in lowered):
        return "parquet"
    if lowered and all(f.endswith(".arrow") for f in lowered):
        return "arrow"
    if lowered and all(f.endswith(_IMAGE_EXTENSIONS) or f.endswith("**") or f.endswith("/*") for f in lowered):
        return "imagefolder"
    raise ValueError(f"Cannot tell which builder reads data_files={files!r}. Pass dataset_name='webdataset' (tars), "
                     "'imagefolder' (class folders), or 'parquet'.")


def _only_split_files(path: str, config_name: str | None, *, data_dir: str | None, data_files: Any, split: str,
                      token: str | bool | None, revision: str | None, cache_dir: str | None) -> tuple[Any, Any]:
    """The data files of ``split`` alone, so that a non-streaming load prepares that split only; and the source's
    declared features when its files were resolved here (explicit ``data_files`` would otherwise drop a repo card's
    features, e.g. class names, for inferred ones).

    ``load_dataset(..., split="validation")`` downloads and prepares every split of the source first (the ~140 GB
    train split of an ImageNet webdataset repo, to read its 6 GB validation split). Resolving the source's files
    per split (``load_dataset_builder(...).config.data_files``) and passing only ``split``'s avoids that.
    Folder-based builders (imagefolder) are left alone: they infer the class labels from the folders of *all* splits,
    so a split missing some classes would get other label ids on its own (they store paths, not image bytes, so
    preparing the other split is a file listing).
    """
    if path == "imagefolder":
        return data_files, None
    if isinstance(data_files, Mapping):
        return ({split: data_files[split]} if split in data_files and len(data_files) > 1 else data_files), None
    if data_files is not None:
        return data_files, None
    try:
        builder = datasets.load_dataset_builder(path, config_name, data_dir=data_dir, token=token, revision=revision,
                                                cache_dir=cache_dir)
    except Exception:  # noqa: BLE001 -- the load itself reports any problem with the source, with our hints
        return None, None
    from datasets.packaged_modules.folder_based_builder.folder_based_builder import FolderBasedBuilder

    resolved = builder.config.data_files
    if isinstance(builder, FolderBasedBuilder) or not resolved or split not in resolved or len(resolved) < 2:
        return None, None
    return {split: list(resolved[split])}, builder.info.features


def _column_names(ds: AnyDataset) -> list[str]:
    names = ds.column_names
    if names is None:  # a streaming dataset with unknown features: look at one example
        names = list(next(iter(ds.take(1))).keys())
    return list(names)


def _pick_column(columns: Sequence[str], features: Any, given: str | None, candidates: Sequence[str],
                 kind: str, arg: str) -> str | None:
    if given is not None:
        if given not in columns:
            raise ValueError(f"{arg}={given!r} is not a column of this dataset; columns: {list(columns)}.")
        return given
    for cand in candidates:
        if cand in columns:
            return cand
    if kind == "image" and features is not None:
        for col in columns:
            if isinstance(features.get(col), datasets.Image):
                return col
    return None


def relabel_by_name(
    ds: AnyDataset,
    name_to_label: Mapping[str, int],
    *,
    drop_unknown: bool = False,
    label_column: str = "label",
) -> AnyDataset:
    """Replace ``ClassLabel`` ids by ``name_to_label[class name]`` (the new column is plain int64).

    Used for folder datasets whose sorted folder names do not give the wanted ids: numeric folders (ImageNetV2),
    wnid folders of a 200-class subset, ObjectNet folders. With ``drop_unknown=True`` samples of classes missing
    from the mapping are removed (ObjectNet's folders that map to no ImageNet class); otherwise they are an error.
    """
    feature = (ds.features or {}).get(label_column)
    if not isinstance(feature, datasets.ClassLabel):
        raise ValueError(f"relabel_by_name needs a ClassLabel column {label_column!r} (class names), found "
                         f"{feature!r}.")
    names = list(feature.names)
    unknown = [n for n in names if n not in name_to_label]
    if unknown and not drop_unknown:
        raise ValueError(f"{len(unknown)} class name(s) have no target label, e.g. {unknown[:5]}. Fix the mapping "
                         "or pass drop_unknown=True to drop those samples.")
    lut = np.asarray([int(name_to_label.get(n, -1)) for n in names], dtype=np.int64)
    if isinstance(ds, datasets.IterableDataset):
        features = ds.features.copy()
        features[label_column] = datasets.Value("int64")
        ds = ds.map(_LabelLookup(lut, label_column), features=features)
        return ds.filter(_KeepLabeled(label_column)) if unknown else ds
    old = np.asarray(ds[label_column], dtype=np.int64)
    new = lut[old] if len(old) else old
    position = ds.column_names.index(label_column)
    # Add before removing: a table left without columns would have no rows to attach the new column to.
    ds = ds.add_column("__relabelled__", new, feature=datasets.Value("int64"))
    ds = ds.remove_columns(label_column).rename_column("__relabelled__", label_column)
    columns = ds.column_names  # keep the original column order (add_column appends)
    columns.insert(position, columns.pop())
    ds = ds.select_columns(columns)
    if unknown:
        ds = ds.select(np.flatnonzero(new >= 0))
    return ds


class _LabelLookup:
    """Picklable per-example label remap for IterableDataset.map (DataLoader workers may pickle it)."""

    def __init__(self, lut: np.ndarray, column: str) -> None:
        self.lut, self.column = lut, column

    def __call__(self, example: dict[str, Any]) -> dict[str, Any]:
        return {self.column: int(self.lut[int(example[self.column])])}


class _KeepLabeled:
    def __init__(self, column: str) -> None:
        self.column = column

    def __call__(self, example: dict[str, Any]) -> bool:
        return int(example[self.column]) >= 0


def load_image_dataset(
    *,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | os.PathLike[str] | None = None,
    validation_dir: str | os.PathLike[str] | None = None,
    data_dir: str | None = None,
    data_files: str | Sequence[str] | Mapping[str, str | Sequence[str]] | None = None,
    split: str,
    streaming: bool = False,
    image_column: str | None = None,
    label_column: str | None = None,
    numeric_folder_labels: bool | None = None,
    require_label: bool = True,
    token: str | bool | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
    num_shards: int | None = None,
) -> AnyDataset:
    """Load an image-classification split with its columns normalised to ``image`` (undecoded) and ``label``.

    Sources (give exactly one kind):

    - ``dataset_name``: a Hub id (``ILSVRC/imagenet-1k``, ``timm/imagenet-1k-wds``, ``clip-benchmark/wds_imagenet-r``)
      or a packaged builder (``"imagefolder"``, ``"webdataset"``, ``"parquet"``), optionally with ``data_dir`` /
      ``data_files`` as in ``datasets.load_dataset``.
    - ``train_dir`` / ``validation_dir``: local class-folder trees (``root/<class>/<image>``), splits ``"train"`` /
      ``"validation"``. Labels come from the folder names (sorted as strings by ``datasets``).
    - ``data_files`` alone: local webdataset tars, parquet files or images; the builder is inferred from the
      extensions. A list (not a dict) is taken as the files of ``split``.

    Columns: the image column is auto-detected (image/img/jpg/jpeg/png/webp, else the first ``Image`` feature) and
    the label column (label/labels/cls) unless given; they are renamed ``image`` / ``label``. Other columns are
    dropped except ``__key__`` / ``__url__`` (webdataset ids, used to name corrupt samples). The image column is
    cast to ``Image(decode=False)`` so that the transform decodes it.

    ``streaming=True`` with local folders: ``datasets`` would stream a folder as a single shard, which one DataLoader
    worker of one process reads alone. The folder is instead listed into a table of paths (no image is read) and
    streamed in ``num_shards`` shards (default 64, at most one per image); give at least processes x DataLoader
    workers. The table is first put in a fixed random order, so that each shard mixes the classes (folders list
    them one by one) as the shards of a webdataset export do; the run's seed then shuffles shard order and buffer.

    ``numeric_folder_labels``: folder names that are all digits (ImageNetV2's ``0``..``999``) sort as strings
    (``'0', '1', '10', '100', ...``); the label is mapped back to ``int(folder name)``. ``None`` (default) does this
    whenever every class name is all digits; ``True`` requires it; ``False`` keeps the string-sorted ids.

    Raises:
        ValueError: no/ambiguous source, a missing split (naming the available ones and the fix), no image or label
            column (naming the columns).
    """
    split = str(split)
    base = _base_split(split)
    has_dirs = train_dir is not None or validation_dir is not None
    if has_dirs and (dataset_name is not None or data_files is not None or data_dir is not None):
        raise ValueError("Give either train_dir/validation_dir (local class folders) or dataset_name/data_files/"
                         "data_dir, not both.")
    builder_kwargs: dict[str, Any] = {}
    if has_dirs:
        files: dict[str, list[str]] = {}
        for split_name, folder in (("train", train_dir), ("validation", validation_dir)):
            if folder is None:
                continue
            folder = os.fspath(folder)
            if not os.path.isdir(folder):
                raise ValueError(f"{split_name}_dir={folder!r} is not a directory. Point it at the root whose "
                                 "sub-folders are the classes (root/<class>/<image>).")
            files[split_name] = [os.path.join(folder, "**")]
        path, data_files = "imagefolder", files
        source = f"the local folders {files}"
    elif dataset_name is not None:
        path = dataset_name
        source = f"dataset {dataset_name!r}" + (f" (config {dataset_config_name!r})" if dataset_config_name else "")
        if data_files is not None:
            source += f" with data_files={data_files!r}"
    elif data_files is not None:
        path = _infer_builder(data_files)
        source = f"data_files={data_files!r}"
    else:
        raise ValueError("No data source: pass dataset_name= (a Hub id or a builder such as 'webdataset'), "
                         "train_dir=/validation_dir= (local class folders), or data_files= (local tars/parquet).")
    if data_files is not None and not isinstance(data_files, Mapping):
        data_files = {base: data_files}
    if isinstance(data_files, Mapping) and base not in data_files:
        raise _missing_split_error(split, source, list(data_files))
    if path == "imagefolder":
        # Keep a label even when there is a single class folder (datasets drops it by default then).
        builder_kwargs["drop_labels"] = False

    if not streaming:
        data_files, split_features = _only_split_files(path, dataset_config_name, data_dir=data_dir,
                                                       data_files=data_files, split=base, token=token,
                                                       revision=revision, cache_dir=cache_dir)
        if split_features is not None:
            builder_kwargs.setdefault("features", split_features)
    try:
        ds = datasets.load_dataset(path, dataset_config_name, data_dir=data_dir, data_files=data_files, split=split,
                                   streaming=streaming and not has_dirs, token=token, revision=revision,
                                   cache_dir=cache_dir, **builder_kwargs)
    except ValueError as err:
        msg = str(err)
        if re.search(r"(unknown|bad) split|should be one of|available splits", msg, re.IGNORECASE):
            found = re.search(r"\[([^\]]*)\]", msg)
            available = [s.strip(" '\"") for s in found.group(1).split(",")] if found else None
            raise _missing_split_error(split, source, available) from err
        if "corresponds to no data" in msg:  # datasets' words for a split that exists but holds no example
            raise ValueError(f"Split {split!r} of {source} is empty: no images were found. Check the path and the "
                             "layout (class folders: root/<class>/<image>.jpg|png|...; webdataset: tars of "
                             "<key>.jpg + <key>.cls), or pick a split with data.") from err
        raise
    except RuntimeError as err:
        if "scripts are no longer supported" in str(err):
            raise RuntimeError(f"{source} is a script-based dataset, which datasets>=4 cannot load. Use a "
                               "script-free copy on the Hub (e.g. timm/imagenet-1k-wds for ImageNet, the "
                               "clip-benchmark/wds_* shift sets), or download it and pass train_dir=/validation_dir= "
                               "or data_files=.") from err
        raise

    ds = _normalise_columns(ds, image_column=image_column, label_column=label_column, require_label=require_label,
                            source=source)
    label_feature = (ds.features or {}).get("label")
    if numeric_folder_labels is not False and isinstance(label_feature, datasets.ClassLabel):
        names = list(label_feature.names)
        all_digits = bool(names) and all(n.isdigit() for n in names)
        if numeric_folder_labels and not all_digits:
            raise ValueError(f"numeric_folder_labels=True but the class names are not all digits, e.g. {names[:5]}.")
        if all_digits:
            ds = relabel_by_name(ds, {n: int(n) for n in names})
    elif numeric_folder_labels:
        raise ValueError("numeric_folder_labels=True needs a ClassLabel label column (an imagefolder dataset); "
                         f"found {label_feature!r}.")
    if streaming and has_dirs:
        ds = _stream_in_shards(ds, num_shards)
    return ds


def _stream_in_shards(ds: datasets.Dataset, num_shards: int | None) -> datasets.IterableDataset:
    """A map-style table (of image paths) as a stream of ``num_shards`` class-mixed shards (see load_image_dataset)."""
    num_shards = 64 if num_shards is None else num_shards
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}.")
    # Seed 0, not the run's: the shard layout is part of the data source, like the order inside a webdataset tar.
    ds = ds.shuffle(seed=0, keep_in_memory=True).flatten_indices(keep_in_memory=True)
    return ds.to_iterable_dataset(num_shards=min(num_shards, len(ds)))


def _normalise_columns(ds: AnyDataset, *, image_column: str | None, label_column: str | None,
                       require_label: bool, source: str) -> AnyDataset:
    columns = _column_names(ds)
    features = ds.features
    img_col = _pick_column(columns, features, image_column, IMAGE_COLUMN_CANDIDATES, "image", "image_column")
    if img_col is None:
        raise ValueError(f"No image column found in {source}; columns: {columns}. Pass image_column=<name>.")
    lbl_col = _pick_column(columns, features, label_column, LABEL_COLUMN_CANDIDATES, "label", "label_column")
    if lbl_col is None and require_label:
        raise ValueError(f"No label column found in {source}; columns: {columns}. Pass label_column=<name> "
                         "(or require_label=False for unlabelled images).")
    if features is not None and isinstance(features.get(img_col), datasets.Image):
        # First: a streaming dataset applies the features of each step to its examples, so any step chained
        # before this cast would still decode every image.
        ds = ds.cast_column(img_col, datasets.Image(decode=False))
    keep = {img_col, *(c for c in _ID_COLUMNS if c in columns)} | ({lbl_col} if lbl_col else set())
    drop = [c for c in columns if c not in keep]
    if drop:
        ds = ds.remove_columns(drop)  # also frees the names "image"/"label" if they belonged to other columns
    if img_col != "image":
        ds = ds.rename_column(img_col, "image")
    if lbl_col is not None and lbl_col != "label":
        ds = ds.rename_column(lbl_col, "label")
    return ds


def shuffle_for_training(ds: AnyDataset, seed: int, buffer_size: int = 10_000) -> AnyDataset:
    """Shuffle a streaming dataset with a seeded buffer (shard order and a ``buffer_size`` window).

    The Trainer calls ``set_epoch`` each epoch, which reshuffles with ``seed + epoch``. Map-style datasets are
    returned unchanged: the Trainer's sampler shuffles them. Does not shard across ranks (Accelerate does that).
    """
    if isinstance(ds, datasets.IterableDataset):
        return ds.shuffle(seed=seed, buffer_size=buffer_size)
    return ds


def random_subset(ds: AnyDataset, n: int | None, seed: int, *, buffer_size: int = 10_000) -> AnyDataset:
    """At most ``n`` examples of ``ds`` drawn at random with ``seed`` (``ds`` itself when ``n`` is None or >= its size).

    Map-style: ``n`` distinct rows drawn uniformly (``numpy.random.default_rng(seed)``), kept in dataset order (sorted
    indices: the subset depends only on (seed, n, len(ds)), and reads stay in file order). Never simply the first
    rows, which in a class-folder dataset would be the first classes.

    Streaming: a stream cannot be sampled without reading all of it, so this is the first ``n`` examples after a
    seeded shuffle (``ds.shuffle(seed, buffer_size).take(n)``: the shard order, then a ``buffer_size`` buffer), i.e. a
    random draw from the first shards in the seeded order. The result is already shuffled (do not shuffle it again).
    ``datasets`` reseeds that shuffle at every ``set_epoch``, so a streamed *training* subset is redrawn each epoch.
    """
    if n is None:
        return ds
    if n < 0:
        raise ValueError(f"The subset size must be >= 0 (or None for everything), got {n}.")
    if isinstance(ds, datasets.IterableDataset):
        return ds.shuffle(seed=seed, buffer_size=buffer_size).take(n)
    if n >= len(ds):
        return ds
    rng = np.random.default_rng(seed)
    return ds.select(np.sort(rng.choice(len(ds), size=n, replace=False)))


def check_dataset_size(ds: AnyDataset, min_examples: int, name: str = "dataset") -> int:
    """Raise a clear ValueError if ``ds`` has fewer than ``min_examples`` examples; return the count seen.

    Map-style: ``len(ds)``. Streaming: iterates at most ``min_examples`` examples (call it on the raw, undecoded
    dataset to keep that cheap) and returns that many when the dataset is large enough.
    """
    if isinstance(ds, datasets.IterableDataset):
        count = sum(1 for _ in ds.take(min_examples))
    else:
        count = len(ds)
    if count < min_examples:
        raise ValueError(f"{name} has only {count} example(s) but at least {min_examples} are needed. Use a larger "
                         "split / more data files, or lower what needs them (batch size x gradient accumulation x "
                         "devices, max_samples, an eval subset).")
    return count


# ----------------------------------------------------------------------------------------------------------------
# Transformed datasets and the collator
# ----------------------------------------------------------------------------------------------------------------


def _describe_sample(image: Any, key: Any = None, url: Any = None, index: int | None = None) -> str:
    parts: list[str] = []
    path = image.get("path") if isinstance(image, Mapping) else getattr(image, "filename", None)
    if path:
        parts.append(f"path={path!r}")
    if key is not None:
        parts.append(f"__key__={key!r}" + (f" in {url!r}" if url else ""))
    if index is not None:
        parts.append(f"index {index}")
    if not parts:
        data = image.get("bytes") if isinstance(image, Mapping) else image
        if isinstance(data, (bytes, bytearray)):
            parts.append(f"in-memory image of {len(data)} bytes starting {bytes(data[:12])!r} (no path or __key__)")
        else:
            parts.append("an in-memory sample with no path or __key__")
    return "sample " + ", ".join(parts)


class _ImageTransformer:
    """Shared logic of the map-style (batch) and streaming (example) wrappers; picklable for DataLoader workers."""

    def __init__(self, transform: Callable[[Any], torch.Tensor], skip_corrupt_images: bool) -> None:
        self.transform = transform
        self.skip_corrupt_images = skip_corrupt_images

    def one(self, image: Any, key: Any = None, url: Any = None, index: int | None = None) -> torch.Tensor | None:
        try:
            return self.transform(image)
        except CorruptImageError as err:
            name = _describe_sample(image, key, url, index)
            if self.skip_corrupt_images:
                logger.warning("Skipping corrupt image (%s): %s", name, err)
                return None
            raise CorruptImageError(f"Corrupt image: {name}: {err} {_SKIP_HINT}", sample=name) from err


REFERENCE_COLUMN = "z0"  # cached frozen-model embeddings for reference_mode="cached"


def _as_z0(value: Any) -> torch.Tensor:
    return torch.as_tensor(np.asarray(value, dtype=np.float32))


class _BatchTransform(_ImageTransformer):
    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        images = batch["image"]
        keys = batch.get("__key__") or [None] * len(images)
        urls = batch.get("__url__") or [None] * len(images)
        out: dict[str, list[Any]] = {"pixel_values": [self.one(im, k, u) for im, k, u in zip(images, keys, urls)]}
        if "label" in batch:
            out["labels"] = [int(v) for v in batch["label"]]
        if REFERENCE_COLUMN in batch:  # cached reference embeddings (add_reference_embeddings) travel with the image
            out[REFERENCE_COLUMN] = [_as_z0(v) for v in batch[REFERENCE_COLUMN]]
        return out


class _ExampleTransform(_ImageTransformer):
    def __call__(self, example: dict[str, Any], index: int) -> dict[str, Any]:
        out: dict[str, Any] = {
            "pixel_values": self.one(example["image"], example.get("__key__"), example.get("__url__"), index)
        }
        if "label" in example:
            out["labels"] = int(example["label"])
        if REFERENCE_COLUMN in example:
            out[REFERENCE_COLUMN] = _as_z0(example[REFERENCE_COLUMN])
        return out


def with_image_transform(
    ds: AnyDataset,
    transform: Callable[[Any], torch.Tensor],
    *,
    skip_corrupt_images: bool = False,
) -> AnyDataset:
    """A dataset yielding ``{"pixel_values": FloatTensor[C, H, W], "labels": int}`` from ``image`` / ``label``.

    Map-style datasets get a lazy ``with_transform`` (run per accessed batch, so random augmentation differs per
    epoch); streaming datasets get ``.map``. Use the Trainer with ``remove_unused_columns=False`` for map-style
    datasets (it would otherwise drop ``image`` before the transform sees it).

    An ``image`` column that ``datasets`` would decode (``Image()``) is first cast to ``Image(decode=False)``:
    ``transform`` receives ``{"bytes", "path"}`` and decodes it itself (:func:`decode_image`), which lets it key
    crops on the encoded bytes and decode large JPEGs at reduced scale.

    A sample that cannot be decoded raises :class:`CorruptImageError` naming it (path, ``__key__`` or stream index).
    With ``skip_corrupt_images=True`` it is logged and yielded with ``pixel_values=None``;
    :class:`ImageClassificationCollator` drops it and counts it.
    """
    image_feature = (ds.features or {}).get("image")
    if isinstance(image_feature, datasets.Image) and image_feature.decode:
        # Our transforms decode themselves: from the encoded bytes they can key crops cheaply and decode large
        # JPEGs at reduced scale (draft), which an image datasets already decoded no longer allows.
        ds = ds.cast_column("image", datasets.Image(decode=False))
    if isinstance(ds, datasets.IterableDataset):
        remove = [c for c in (ds.column_names or []) if c not in ("pixel_values", "labels")]
        return ds.map(_ExampleTransform(transform, skip_corrupt_images), with_indices=True,
                      remove_columns=remove or None)
    return ds.with_transform(_BatchTransform(transform, skip_corrupt_images))


class ImageClassificationCollator:
    """Stack examples into ``{"pixel_values": [B, C, H, W] float, "labels": [B] long}`` (and ``"z0": [B, d] float``
    when the examples carry cached reference embeddings, see ``saeft_hf.embeddings.add_reference_embeddings``).

    Examples with ``pixel_values=None`` (corrupt images skipped by :func:`with_image_transform`) are dropped and
    counted in ``num_skipped`` (per process: with DataLoader workers each worker has its own copy; the skips are
    also logged as warnings). ``num_labels``: if set, labels outside ``[0, num_labels)`` raise a ValueError naming
    the label and the head size.
    """

    def __init__(self, num_labels: int | None = None) -> None:
        self.num_labels = num_labels
        self.num_skipped = 0

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        kept = [f for f in features if f.get("pixel_values") is not None]
        self.num_skipped += len(features) - len(kept)
        if not kept:
            raise ValueError(f"All {len(features)} samples of this batch were skipped as corrupt images "
                             f"({self.num_skipped} skipped so far); check the dataset files.")
        tensors = [torch.as_tensor(f["pixel_values"]) for f in kept]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            raise ValueError(f"pixel_values of different shapes in one batch: {sorted(shapes)}; use a transform "
                             "with a fixed output size (CLIPImageTransform crops to image_size).")
        batch = {"pixel_values": torch.stack(tensors).float()}
        label_key = "labels" if "labels" in kept[0] else ("label" if "label" in kept[0] else None)
        if label_key is not None:
            labels = torch.tensor([int(f[label_key]) for f in kept], dtype=torch.long)
            if self.num_labels is not None:
                bad = labels[(labels < 0) | (labels >= self.num_labels)]
                if bad.numel():
                    raise ValueError(f"Label {int(bad[0])} is outside [0, {self.num_labels}): the classification "
                                     f"head has {self.num_labels} classes. Check that the dataset's labels match "
                                     "the head (label column, numeric folder names, class subset), or resize the "
                                     "head (num_labels).")
            batch["labels"] = labels
        if any(REFERENCE_COLUMN in f for f in kept):
            missing = sum(1 for f in kept if f.get(REFERENCE_COLUMN) is None)
            if missing:
                raise ValueError(f"{missing} of {len(kept)} examples in this batch have no `{REFERENCE_COLUMN}` while "
                                 "the others do: add reference embeddings to every row (add_reference_embeddings).")
            z0 = [torch.as_tensor(f[REFERENCE_COLUMN], dtype=torch.float32) for f in kept]
            widths = {tuple(t.shape) for t in z0}
            if len(widths) > 1 or z0[0].dim() != 1:
                raise ValueError(f"`{REFERENCE_COLUMN}` must be one [d] vector per example; got shapes {sorted(widths)}.")
            batch[REFERENCE_COLUMN] = torch.stack(z0)
        return batch
