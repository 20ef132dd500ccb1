"""Scoring: logit projections onto a set's classes and exact, sharded top-1 counting.

Every rank scores its own shard of every set (contiguous index slices of a map-style set, ``split_dataset_by_node``
for a stream), and the integer ``(correct, total)`` counts are summed with one ``all_reduce``: no example is padded
or counted twice, so the accuracy is the same for any number of processes. Each batch is decoded once and scored by
every *variant* (e.g. one per WiSE-FT alpha), so a sweep costs one decoding pass.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..distributed import shard_range
from ..data import (
    AnyDataset,
    BorderCrop,
    ImageClassificationCollator,
    with_image_transform,
)
from .specs import DEFAULT_ID_NAME, DEFAULT_SHIFT_NAMES, EvalSetSpec

logger = logging.getLogger(__name__)

# A model to score with, or a factory of a context that yields one (e.g. ``lambda: scale_lora(peft_model, 0.5)``,
# entered per batch so one set of weights serves several WiSE-FT alphas).
Variant = nn.Module | Callable[[], AbstractContextManager[nn.Module]]

# ----------------------------------------------------------------------------------------------------------------
# Logit projection
# ----------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _group_index(groups: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """[G, max_group_len] index matrix; short groups repeat their first index (the max is unchanged)."""
    width = max(len(g) for g in groups)
    return torch.tensor([list(g) + [g[0]] * (width - len(g)) for g in groups], dtype=torch.long)


def project_logits(logits: torch.Tensor, spec: EvalSetSpec | None) -> torch.Tensor:
    """Map 1000-way logits [B, 1000] to the set's classes [B, C'].

    ``"full"`` (or ``spec=None``): unchanged. ``"subset"``: ``logits[:, class_indices]`` (C' = len). ``"grouped"``:
    ``max`` over each group's columns (C' = number of groups).
    """
    if spec is None or spec.kind == "full":
        return logits
    num_logits = logits.shape[-1]
    if spec.kind == "subset":
        indices = spec.indices() or []
        if max(indices) >= num_logits:
            raise ValueError(f"Eval set {spec.name!r} selects ImageNet class {max(indices)} but the model returns "
                             f"{num_logits} logits; subset/grouped sets need a 1000-way ImageNet head.")
        return logits.index_select(-1, torch.as_tensor(indices, dtype=torch.long, device=logits.device))
    groups = tuple(tuple(g) for g in (spec.groups() or []))
    index = _group_index(groups).to(logits.device)
    if int(index.max()) >= num_logits:
        raise ValueError(f"Eval set {spec.name!r} maps to ImageNet class {int(index.max())} but the model returns "
                         f"{num_logits} logits; subset/grouped sets need a 1000-way ImageNet head.")
    return logits[..., index].amax(dim=-1)  # [B, G, W] -> [B, G]


def _logits_of(output: Any) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None:
        raise TypeError(f"The model returned {type(output).__name__} without .logits; evaluation expects "
                        "model(pixel_values=...) to return an object with logits [B, num_classes].")
    return logits


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype | None]:
    for p in model.parameters():
        return p.device, (p.dtype if p.is_floating_point() else None)
    return torch.device("cpu"), None


# ----------------------------------------------------------------------------------------------------------------
# Data: pre-transformed sets, seeded subsets, shards
# ----------------------------------------------------------------------------------------------------------------


class PixelSet(torch.utils.data.Dataset):
    """An evaluation set held in memory as model inputs: ``pixel_values`` [N, C, H, W] float, ``labels`` [N] long.

    Made by :func:`pretransform`; scored by slicing the tensors (no per-row decoding, collation or workers).
    """

    def __init__(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> None:
        if pixel_values.shape[0] != labels.shape[0]:
            raise ValueError(f"{pixel_values.shape[0]} images but {labels.shape[0]} labels.")
        self.pixel_values = pixel_values
        self.labels = labels

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixel_values[index], "labels": self.labels[index]}

    def select(self, indices: Sequence[int] | range) -> PixelSet:
        """The rows at ``indices`` (a contiguous ``range`` is a view, no copy)."""
        if isinstance(indices, range) and indices.step == 1:
            return PixelSet(self.pixel_values[indices.start:indices.stop], self.labels[indices.start:indices.stop])
        index = torch.as_tensor(list(indices), dtype=torch.long)
        return PixelSet(self.pixel_values[index], self.labels[index])


def pretransform(
    dataset: AnyDataset,
    transform: Callable[[Any], torch.Tensor],
    *,
    batch_size: int = 512,
    num_workers: int = 0,
) -> PixelSet:
    """Decode and apply a deterministic (eval) transform once; the result is scored by slicing, so repeated
    evaluations (sweeps, many methods) skip decoding. Memory: N x C x H x W floats (use it for small sets)."""
    loader = torch.utils.data.DataLoader(with_image_transform(dataset, transform), batch_size=batch_size,
                                         collate_fn=ImageClassificationCollator(), num_workers=num_workers)
    pixels, labels = [], []
    for batch in loader:
        pixels.append(batch["pixel_values"])
        labels.append(batch["labels"])
    if not pixels:
        raise ValueError("pretransform got an empty dataset.")
    return PixelSet(torch.cat(pixels), torch.cat(labels))


def shard_dataset(dataset: AnyDataset, process_index: int, num_processes: int) -> AnyDataset:
    """This rank's part of ``dataset``: an index slice (map-style), or ``split_dataset_by_node`` (streams:
    whole shards per rank when they divide evenly, else every ``num_processes``-th example)."""
    if num_processes == 1:
        return dataset
    if isinstance(dataset, datasets.IterableDataset):
        from datasets.distributed import split_dataset_by_node

        return split_dataset_by_node(dataset, rank=process_index, world_size=num_processes)
    rows = shard_range(len(dataset), process_index, num_processes)
    # A set smaller than the process count leaves some ranks nothing: `select(range(n, n))` on n rows raises in
    # datasets (it checks the start index), `range(0)` is the same empty selection.
    return dataset.select(rows if len(rows) else range(0))


# ----------------------------------------------------------------------------------------------------------------
# Counting
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Counts:
    """Top-1 counts of one model on one set (all processes together)."""

    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        if self.total == 0:
            raise ValueError("No samples were evaluated (empty set, max_samples=0, or every image skipped).")
        return self.correct / self.total


def _batches(ds: AnyDataset, transform: Callable[[Any], torch.Tensor] | None, spec: EvalSetSpec | None,
             batch_size: int, num_workers: int, skip_corrupt_images: bool, pin_memory: bool
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(ds, PixelSet):
        for start in range(0, len(ds), batch_size):
            yield ds.pixel_values[start:start + batch_size], ds.labels[start:start + batch_size]
        return
    if transform is not None:
        if spec is not None and spec.crop_border:
            transform = BorderCrop(transform, spec.crop_border)
        ds = with_image_transform(ds, transform, skip_corrupt_images=skip_corrupt_images)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=ImageClassificationCollator(),
                                         num_workers=num_workers, pin_memory=pin_memory)
    for batch in loader:
        if "labels" not in batch:
            raise ValueError("The evaluation dataset has no labels; load it with a label column.")
        yield batch["pixel_values"], batch["labels"]


def _enter(variant: Variant) -> AbstractContextManager[nn.Module]:
    return contextlib.nullcontext(variant) if isinstance(variant, nn.Module) else variant()


def count_correct(
    variants: Mapping[Hashable, Variant],
    sets: Mapping[str, tuple[AnyDataset, EvalSetSpec | None]],
    transform: Callable[[Any], torch.Tensor] | None,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    autocast_dtype: torch.dtype | None = None,
    skip_corrupt_images: bool = False,
    process_index: int = 0,
    num_processes: int = 1,
    progress: bool = True,
) -> dict[str, dict[Hashable, Counts]]:
    """``{set: {variant: Counts}}``: top-1 counts of every variant on every set, this rank's shard scored here.

    ``variants``: models (all on one device), or factories of contexts yielding one (entered per batch, e.g.
    :func:`~saeft_hf.evaluation.scale_lora`). ``sets``: ``{name: (raw dataset, spec or None)}`` with ``image`` /
    ``label`` columns (labels in the set's label space, see :func:`load_eval_dataset`), or a :class:`PixelSet`.
    ``transform`` turns one image into [C, H, W] (``spec.crop_border`` is applied first); ``None``: the dataset
    yields ``pixel_values`` / ``labels`` already.

    Runs under ``torch.inference_mode`` with every model in eval mode (their flags are restored), in the models'
    own precision (fp32 for a freshly loaded model), or under ``torch.autocast(autocast_dtype)`` when given.
    With ``num_processes > 1`` every rank must call this with the same arguments: the counts are summed with one
    ``torch.distributed.all_reduce`` (int64), so every rank returns the totals. Corrupt images skipped with
    ``skip_corrupt_images=True`` are left out of ``total`` (and logged).
    """
    if not variants:
        raise ValueError("count_correct needs at least one model.")
    keys = list(variants)
    modules: list[nn.Module] = []
    for v in variants.values():
        if isinstance(v, nn.Module):
            modules.append(v)
        else:
            with v() as entered:
                modules.append(entered)
    device, model_dtype = _model_device_dtype(modules[0])
    autocast = (torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    names = list(sets)
    counts = np.zeros((len(names), len(keys), 2), dtype=np.int64)  # [..., 0] correct, [..., 1] total
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        with torch.inference_mode(), autocast:
            for s, name in enumerate(names):
                ds, spec = sets[name]
                shard = shard_dataset(ds, process_index, num_processes)
                total_batches = None if isinstance(shard, datasets.IterableDataset) else math.ceil(
                    len(shard) / batch_size)
                batches = _batches(shard, transform, spec, batch_size, num_workers, skip_corrupt_images,
                                   pin_memory=device.type == "cuda")
                for pixel_values, labels in tqdm(batches, total=total_batches, desc=name, leave=False,
                                                 disable=not progress or process_index != 0):
                    pixel_values = pixel_values.to(device, non_blocking=True)
                    if autocast_dtype is None and model_dtype is not None:
                        pixel_values = pixel_values.to(model_dtype)  # a bf16 model without autocast needs bf16 input
                    labels = labels.to(device, non_blocking=True)
                    for k, key in enumerate(keys):
                        with _enter(variants[key]) as model:
                            logits = project_logits(_logits_of(model(pixel_values=pixel_values)).float(), spec)
                        _check_labels(labels, logits.shape[-1], name)
                        counts[s, k, 0] += int((logits.argmax(dim=-1) == labels).sum())
                        counts[s, k, 1] += int(labels.numel())
    finally:
        for m, flag in zip(modules, was_training):
            m.train(flag)
    if num_processes > 1:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"count_correct was told num_processes={num_processes} but torch.distributed is not "
                               "initialised; launch with torchrun / accelerate launch (or pass num_processes=1).")
        # On the models' device: NCCL reduces CUDA tensors only, gloo CPU ones.
        reduced = torch.from_numpy(counts).to(device)
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        counts = reduced.cpu().numpy()
    out = {name: {key: Counts(int(counts[s, k, 0]), int(counts[s, k, 1])) for k, key in enumerate(keys)}
           for s, name in enumerate(names)}
    for name, ds_spec in sets.items():
        ds = ds_spec[0]
        total = out[name][keys[0]].total
        if not isinstance(ds, datasets.IterableDataset) and total < len(ds):
            logger.warning("%s: %d of %d images skipped (corrupt) and left out of the accuracy.", name,
                           len(ds) - total, len(ds))
    return out


def _check_labels(labels: torch.Tensor, num_classes: int, name: str) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = int(labels.min()) if int(labels.min()) < 0 else int(labels.max())
        raise ValueError(f"{name}: label {bad} is outside [0, {num_classes}) (the classes after projection): the "
                         "dataset's labels do not match the model/spec (an unlabelled split has label -1).")


def evaluate_sets(
    model: nn.Module,
    sets: Mapping[str, tuple[AnyDataset, EvalSetSpec | None]],
    transform: Callable[[Any], torch.Tensor] | None,
    **kwargs: Any,
) -> dict[str, float]:
    """``{name: top-1}`` of one model on every ``(dataset, spec)`` of ``sets``; ``kwargs`` go to
    :func:`count_correct`."""
    counts = count_correct({"model": model}, sets, transform, **kwargs)
    return {name: per["model"].accuracy for name, per in counts.items()}


def evaluate_accuracy(
    model: nn.Module,
    dataset: AnyDataset,
    transform: Callable[[Any], torch.Tensor] | None,
    *,
    spec: EvalSetSpec | None = None,
    **kwargs: Any,
) -> float:
    """Top-1 accuracy of ``model`` on one raw (``image``, ``label``) dataset; see :func:`count_correct`."""
    name = spec.name if spec is not None else "eval"
    return evaluate_sets(model, {name: (dataset, spec)}, transform, **kwargs)[name]


def shift_averages(
    results: Mapping[str, float],
    id_name: str | None = DEFAULT_ID_NAME,
    shift_names: Sequence[str] = DEFAULT_SHIFT_NAMES,
    *,
    objectnet_name: str = "objectnet",
) -> dict[str, float]:
    """Summary numbers: ``id`` (``results[id_name]``), ``avg_shift`` (mean over the shifts present: Avg-5 with all
    five), ``avg_shift_no_objectnet`` (Avg-4, when ObjectNet is among them) and ``num_shifts``.

    Only ``shift_names`` are averaged (sets with ``role: other`` are not shifts). Shifts missing from ``results``
    are left out of the means (and logged): compare only equal ``num_shifts``.
    """
    out: dict[str, float] = {}
    if id_name is not None and id_name in results:
        out["id"] = float(results[id_name])
    present = [n for n in shift_names if n in results]
    missing = [n for n in shift_names if n not in results]
    if missing:
        logger.warning("Shift averages without %s (not in the results).", missing)
    if present:
        out["avg_shift"] = float(np.mean([results[n] for n in present]))
        out["num_shifts"] = float(len(present))
        without = [n for n in present if n != objectnet_name]
        if objectnet_name in present and without:
            out["avg_shift_no_objectnet"] = float(np.mean([results[n] for n in without]))
    return out
