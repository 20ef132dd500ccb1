"""Input-pipeline speed: our train and eval transforms against a plain PIL pipeline doing the same operations, on
realistic JPEGs, one core; and the embedding pass (images/s through a CLIP vision tower). `recipes/benchmark.py
--parts input` is the command line.

* Images: random crops of the two photos scikit-learn ships (`sklearn.datasets.load_sample_images()`: china.jpg and
  flower.jpg, 640x427), resized to 300-500 px per side (ImageNet's typical size) and saved as JPEG quality 90; plus
  a few 1920x1440 ones (ObjectNet's size) for the large-JPEG case. Made in memory, seeded.
* Pipelines, each from the encoded bytes (what a dataset row holds) to a normalised float32 [3, S, S] tensor:
  `ours_train` (`CLIPImageTransform(train=True)` after `set_epoch(0)`, i.e. the per-image crops a training run uses),
  `ours_eval` (both also with `draft=False`: `*_exact`, exactly the operations of the baseline), and `pil_train` / `pil_eval`: `Image.open(...).convert("RGB")`, torchvision's random-resized-crop
  rule with Python's `random` (or shortest-edge resize + center crop), `crop` + bicubic `resize`, then
  `torch.from_numpy(...).permute(2, 0, 1).float().div(255)` and `(x - mean) / std`. On the large JPEGs also
  `pil_eval_draft` (the same plus `Image.draft`), the fastest plain PIL can do.
* Timing: one torch thread; the pipelines are interleaved chunk by chunk (the order rotating per chunk), so machine
  noise hits all alike. "Images/s per core" = images / the thread's CPU time (`time.thread_time`: decoding,
  resizing and the one-thread torch ops all run on the calling thread), which other jobs on a shared machine do
  not inflate the way they inflate wall time; the wall-clock rates are reported beside them. Each ratio is the
  ratio of totals and also the median over chunks of the ratio within a chunk (`*_paired`).
* Workers: a DataLoader worker is one core running this pipeline, so a job needing T images/s needs
  ceil(T / rate) workers; given for 2,000 and 4,000 images/s in total and per GPU of an 8-GPU node.
"""

from __future__ import annotations

import io
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch

from ..data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, CLIPImageTransform

TARGETS_IMAGES_PER_S: tuple[int, ...] = (2000, 4000)
GPUS_PER_NODE = 8


def make_jpegs(n: int, *, min_side: int = 300, max_side: int = 500, size: tuple[int, int] | None = None,
               seed: int = 0, quality: int = 90) -> list[bytes]:
    """``n`` JPEG files (bytes) cut from scikit-learn's sample photos: random crops resized to ``size`` or to a
    random ``min_side``..``max_side`` px per side."""
    try:
        from sklearn.datasets import load_sample_images
    except ImportError as err:
        raise ImportError("The input-pipeline benchmark makes its JPEGs from scikit-learn's sample photos: "
                          "pip install scikit-learn (or saeft-hf[demo]).") from err
    photos = [PIL.Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = size or (int(rng.integers(min_side, max_side + 1)), int(rng.integers(min_side, max_side + 1)))
        # A random crop with the target's aspect, at least half the photo's shorter side.
        ratio = w / h
        ch = int(rng.integers(photo.height // 2, photo.height + 1))
        cw = min(photo.width, max(1, round(ch * ratio)))
        ch = min(photo.height, max(1, round(cw / ratio)))
        left = int(rng.integers(0, photo.width - cw + 1))
        top = int(rng.integers(0, photo.height - ch + 1))
        img = photo.crop((left, top, left + cw, top + ch)).resize((w, h), PIL.Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


class PlainPIL:
    """The baseline: plain PIL + torch doing the same operations as :class:`CLIPImageTransform`."""

    def __init__(self, image_size: int, *, train: bool, draft: bool = False, scale: tuple[float, float] = (0.9, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), seed: int = 0) -> None:
        self.size, self.train, self.draft, self.scale, self.ratio = image_size, train, draft, scale, ratio
        self.rng = random.Random(seed)
        self.mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
        self.std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)

    def crop_params(self, width: int, height: int) -> tuple[int, int, int, int]:
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * self.rng.uniform(*self.scale)
            aspect = math.exp(self.rng.uniform(*log_ratio))
            w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return self.rng.randint(0, height - h), self.rng.randint(0, width - w), h, w
        in_ratio = width / height  # torchvision's fallback: the largest central crop within the ratio bounds
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, data: bytes) -> torch.Tensor:
        img = PIL.Image.open(io.BytesIO(data))
        if self.draft and not self.train:
            img.draft("RGB", (self.size, self.size))
        img = img.convert("RGB")
        if self.train:
            top, left, h, w = self.crop_params(*img.size)
            img = img.crop((left, top, left + w, top + h)).resize((self.size, self.size),
                                                                  PIL.Image.Resampling.BICUBIC)
        else:
            width, height = img.size
            factor = self.size / min(width, height)
            new = (max(self.size, int(width * factor)), max(self.size, int(height * factor)))
            img = img.resize(new, PIL.Image.Resampling.BICUBIC)
            left, top = round((new[0] - self.size) / 2), round((new[1] - self.size) / 2)
            img = img.crop((left, top, left + self.size, top + self.size))
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255)
        return (x - self.mean) / self.std


def interleaved_rates(pipelines: dict[str, Callable[[Any], Any]], items: Sequence[Any], *, rounds: int,
                      chunk: int, warmup: int = 2) -> dict[str, Any]:
    """Run every pipeline over ``items`` ``rounds`` times, chunk by chunk, interleaved (order rotating per chunk).

    Returns per pipeline the images per CPU-second of this thread (and per wall-clock second) over all measured
    work, and the per-chunk CPU rates (for paired ratios)."""
    names = list(pipelines)
    for name in names:  # warm-up: first-call costs (imports, allocator) out of the measurement
        for item in items[:warmup]:
            pipelines[name](item)
    totals = {n: 0.0 for n in names}
    wall = {n: 0.0 for n in names}
    per_chunk: dict[str, list[float]] = {n: [] for n in names}
    count = 0
    turn = 0
    for _ in range(rounds):
        for start in range(0, len(items), chunk):
            part = items[start:start + chunk]
            order = names[turn % len(names):] + names[:turn % len(names)]
            turn += 1
            for name in order:
                fn = pipelines[name]
                w0, t0 = time.perf_counter(), time.thread_time()
                for item in part:
                    fn(item)
                elapsed = max(time.thread_time() - t0, 1e-9)
                wall[name] += time.perf_counter() - w0
                totals[name] += elapsed
                per_chunk[name].append(len(part) / elapsed)
            count += len(part)
    return {"images_per_s": {n: count / totals[n] for n in names},
            "wall_images_per_s": {n: count / wall[n] for n in names}, "chunk_rates": per_chunk, "images": count}


def _ratio(result: dict[str, Any], ours: str, theirs: str) -> dict[str, float]:
    rates, chunks = result["images_per_s"], result["chunk_rates"]
    paired = statistics.median(a / b for a, b in zip(chunks[ours], chunks[theirs]))
    return {"ratio": round(rates[ours] / rates[theirs], 3), "ratio_paired": round(paired, 3)}


def workers_needed(rate_per_core: float, targets: Sequence[int] = TARGETS_IMAGES_PER_S,
                   gpus: int = GPUS_PER_NODE) -> dict[str, Any]:
    """Dataloader workers (one core each) to sustain each target rate: in total and per GPU of a ``gpus`` node."""
    return {str(t): {"total_workers": math.ceil(t / rate_per_core),
                     "workers_per_gpu": math.ceil(t / gpus / rate_per_core),
                     "images_per_s_per_gpu": t / gpus} for t in targets}


@torch.no_grad()
def embedding_throughput(model_name: str, images: Sequence[Any], *, batch_size: int,
                         batches: int) -> dict[str, Any]:
    """Images per CPU-second of the SAE embedding pass on CPU (one thread): the vision tower's representation of eval-transformed
    images (at the model's own image size), forward only, and end to end (decode + transform + forward) in one
    process."""
    from .speed import build_model

    model, source = build_model(model_name)
    model.eval()
    transform = CLIPImageTransform(model.config.vision_config.image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD,
                                   train=False)
    pixels = torch.stack([transform(images[i % len(images)]) for i in range(batch_size)])
    model.get_representation(pixels)  # warm-up
    t0 = time.thread_time()  # CPU time of this thread: one torch thread runs here (see the module docstring)
    for _ in range(batches):
        model.get_representation(pixels)
    forward = time.thread_time() - t0
    t0 = time.thread_time()
    for b in range(batches):
        batch = torch.stack([transform(images[(b * batch_size + i) % len(images)]) for i in range(batch_size)])
        model.get_representation(batch)
    end_to_end = time.thread_time() - t0
    n = batches * batch_size
    return {"model": model_name, "source": source, "batch_size": batch_size, "images": n, "dtype": "fp32",
            "forward_images_per_s": round(n / forward, 2), "end_to_end_images_per_s": round(n / end_to_end, 2)}


def benchmark_input_pipeline(*, n_images: int = 300, n_large: int = 8, image_size: int = 224, rounds: int = 3,
                             chunk: int = 25, embedding_model: str = "vit_b32", embedding_batch: int = 8,
                             embedding_batches: int = 2, seed: int = 0) -> dict[str, Any]:
    """The whole input-pipeline benchmark (one torch thread; restores the thread count). JSON-ready."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        small = make_jpegs(n_images, seed=seed)
        large = make_jpegs(n_large, size=(1920, 1440), seed=seed + 1)
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        def ours(train: bool, draft: bool = True) -> CLIPImageTransform:
            tf = CLIPImageTransform(image_size, mean, std, train=train, seed=seed, draft=draft)
            if train:
                tf.set_epoch(0)  # per-image crops, as in a training run (run_saeft's SetEpochCallback)
            return tf

        def rows(blobs: list[bytes]) -> list[dict[str, Any]]:
            return [{"bytes": b, "path": None} for b in blobs]  # a datasets Image(decode=False) row

        # ours_*: the defaults (draft on: a 300-500 px JPEG is decoded at 1/2 scale when both sides are >= 2 x 224
        # px in eval, or the crop is, in train); ours_*_exact: draft=False, exactly the operations of pil_*.
        pipelines = {"ours_train": ours(True), "ours_train_exact": ours(True, False),
                     "pil_train": PlainPIL(image_size, train=True, seed=seed),
                     "ours_eval": ours(False), "ours_eval_exact": ours(False, False),
                     "pil_eval": PlainPIL(image_size, train=False)}
        wrapped = {n: (f if n.startswith("pil") else _OnRow(f)) for n, f in pipelines.items()}
        res_small = interleaved_rates(wrapped, small, rounds=rounds, chunk=chunk)
        large_pipes = {n: f for n, f in wrapped.items() if not n.endswith("_exact")}
        large_pipes["pil_eval_draft"] = PlainPIL(image_size, train=False, draft=True)
        res_large = interleaved_rates(large_pipes, large, rounds=rounds, chunk=max(1, min(chunk, len(large) // 2)),
                                      warmup=1)
        # The workers follow the reported rate of the exact train transform (the conservative one).
        train_rate = round(res_small["images_per_s"]["ours_train_exact"], 1)
        out: dict[str, Any] = {
            "images": {"small": {"count": len(small), "sides_px": [300, 500], "jpeg_quality": 90,
                                 "mean_bytes": round(statistics.mean(map(len, small)))},
                       "large": {"count": len(large), "size_px": [1920, 1440], "jpeg_quality": 90,
                                 "mean_bytes": round(statistics.mean(map(len, large)))},
                       "source": "random crops of sklearn.datasets.load_sample_images() (china.jpg, flower.jpg)"},
            "image_size": image_size, "rounds": rounds, "torch_threads": 1,
            "timing": "images per CPU-second of the measuring thread (time.thread_time), one torch thread",
            "images_per_s_per_core": {
                "small": {k: round(v, 1) for k, v in res_small["images_per_s"].items()},
                "large": {k: round(v, 2) for k, v in res_large["images_per_s"].items()},
            },
            "wall_clock_images_per_s": {
                "small": {k: round(v, 1) for k, v in res_small["wall_images_per_s"].items()},
                "large": {k: round(v, 2) for k, v in res_large["wall_images_per_s"].items()},
            },
            "ratios_ours_to_plain_pil": {
                "train": _ratio(res_small, "ours_train_exact", "pil_train"),
                "eval": _ratio(res_small, "ours_eval_exact", "pil_eval"),
                "train_default_draft": _ratio(res_small, "ours_train", "pil_train"),
                "eval_default_draft": _ratio(res_small, "ours_eval", "pil_eval"),
                "large_train": _ratio(res_large, "ours_train", "pil_train"),
                "large_eval": _ratio(res_large, "ours_eval", "pil_eval"),
                "large_eval_vs_pil_with_draft": _ratio(res_large, "ours_eval", "pil_eval_draft"),
            },
            "workers_for_train_transform": {"images_per_s_per_core": train_rate,
                                            "gpus_per_node": GPUS_PER_NODE,
                                            "targets_images_per_s": workers_needed(train_rate)},
        }
        if embedding_model:
            out["embedding_pass"] = embedding_throughput(embedding_model, rows(small), batch_size=embedding_batch,
                                                         batches=embedding_batches)
        return out
    finally:
        torch.set_num_threads(threads)


class _OnRow:
    """Feed our transform what a dataset row holds (``{"bytes", "path"}``); the baseline takes the bytes."""

    def __init__(self, transform: CLIPImageTransform) -> None:
        self.transform = transform

    def __call__(self, data: bytes) -> torch.Tensor:
        return self.transform({"bytes": data, "path": None})
