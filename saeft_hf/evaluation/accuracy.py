"""Scoring: logit projections onto a set's classes, top-1 accuracy loops, shift averages, results files."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import datasets
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import (
    AnyDataset,
    BorderCrop,
    ImageClassificationCollator,
    with_image_transform,
)
from .specs import DEFAULT_ID_NAME, DEFAULT_SHIFT_NAMES, EvalSetSpec

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# Logit projection and accuracy
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


def evaluate_accuracy(
    model: nn.Module,
    dataset: AnyDataset,
    transform: Callable[[Any], torch.Tensor] | None,
    *,
    spec: EvalSetSpec | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    max_samples: int | None = None,
    progress: bool = True,
    autocast_dtype: torch.dtype | None = None,
    num_workers: int = 0,
    skip_corrupt_images: bool = False,
    desc: str | None = None,
) -> float:
    """Top-1 accuracy of ``model`` on a raw (``image``, ``label``) dataset.

    ``transform`` turns one image into [C, H, W] (e.g. the eval :class:`~saeft_hf.data.CLIPImageTransform`);
    ``None`` means ``dataset`` already yields ``pixel_values`` / ``labels``. With ``spec``, logits are projected
    (:func:`project_logits`) and ``spec.crop_border`` is applied before the transform. Labels must already be in the
    set's label space (:func:`load_eval_dataset` does that).

    Runs under ``torch.inference_mode`` with ``model.eval()`` (the training flag is restored afterwards), on
    ``device`` (the model is moved there if given; default: where the model's parameters are), optionally under
    ``torch.autocast(dtype=autocast_dtype)``. Counting is done in numpy. Skipped corrupt images (with
    ``skip_corrupt_images=True``) are left out of the denominator and reported in the log.
    """
    if spec is not None and spec.crop_border and transform is not None:
        transform = BorderCrop(transform, spec.crop_border)
    ds = dataset
    if max_samples is not None:
        if isinstance(ds, datasets.IterableDataset):
            ds = ds.take(max_samples)
        else:
            ds = ds.select(range(min(max_samples, len(ds))))
    if transform is not None and "pixel_values" not in (_column_names_of(ds) or ()):
        # Datasets that already hold pixel_values (see `pretransform`) skip the transform.
        ds = with_image_transform(ds, transform, skip_corrupt_images=skip_corrupt_images)
    collator = ImageClassificationCollator(num_labels=spec.num_classes if spec is not None else None)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=collator, num_workers=num_workers)
    if device is not None:
        model.to(device)
    model_device, model_dtype = _model_device_dtype(model)
    total_batches = None if isinstance(ds, datasets.IterableDataset) else math.ceil(len(ds) / batch_size)
    autocast = (torch.autocast(device_type=model_device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    correct = total = 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast:
            for batch in tqdm(loader, total=total_batches, desc=desc or (spec.name if spec else "eval"),
                              disable=not progress, leave=False):
                if "labels" not in batch:
                    raise ValueError("The evaluation dataset has no labels; load it with a label column.")
                pixel_values = batch["pixel_values"].to(model_device, non_blocking=True)
                if autocast_dtype is None and model_dtype is not None:
                    pixel_values = pixel_values.to(model_dtype)  # a bf16 model without autocast needs bf16 inputs
                logits = project_logits(_logits_of(model(pixel_values=pixel_values)).float(), spec)
                labels = batch["labels"].numpy()
                if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[-1]):
                    bad = int(labels.min()) if int(labels.min()) < 0 else int(labels.max())
                    raise ValueError(f"Label {bad} is outside [0, {logits.shape[-1]}) (the classes after "
                                     "projection): the dataset's labels do not match the model/spec (an unlabelled "
                                     "split has label -1).")
                preds = logits.argmax(dim=-1).cpu().numpy()
                correct += int(np.sum(preds == labels))
                total += int(labels.size)
    finally:
        model.train(was_training)
    if collator.num_skipped:
        logger.warning("%s: %d corrupt image(s) skipped and left out of the accuracy.",
                       desc or (spec.name if spec else "eval"), collator.num_skipped)
    if total == 0:
        raise ValueError("No samples were evaluated (empty dataset, max_samples=0, or every image skipped).")
    return correct / total


def _column_names_of(ds: AnyDataset) -> list[str] | None:
    return list(getattr(ds, "column_names", None) or []) or None


def pretransform(
    dataset: AnyDataset, transform: Callable[[Any], torch.Tensor], *, batch_size: int = 512
) -> datasets.Dataset:
    """Apply a deterministic (eval) transform once and keep the result as a torch-formatted dataset with
    ``pixel_values`` and ``labels``, so repeated evaluations (WiSE-FT sweeps, many methods) skip decoding."""
    loader = torch.utils.data.DataLoader(with_image_transform(dataset, transform), batch_size=batch_size,
                                         collate_fn=ImageClassificationCollator())
    pixels, labels = [], []
    for batch in loader:
        pixels.append(batch["pixel_values"].numpy())
        labels.append(batch["labels"].numpy())
    if not pixels:
        raise ValueError("pretransform got an empty dataset.")
    return datasets.Dataset.from_dict(
        {"pixel_values": np.concatenate(pixels), "labels": np.concatenate(labels)}
    ).with_format("torch")


def evaluate_sets(
    model: nn.Module,
    sets: Mapping[str, tuple[AnyDataset, EvalSetSpec | None]],
    transform: Callable[[Any], torch.Tensor] | None,
    **kwargs: Any,
) -> dict[str, float]:
    """``{name: top-1}`` for every ``(dataset, spec)`` in ``sets``; ``kwargs`` go to :func:`evaluate_accuracy`."""
    results: dict[str, float] = {}
    for name, (ds, spec) in sets.items():
        results[name] = evaluate_accuracy(model, ds, transform, spec=spec, desc=name, **kwargs)
        logger.info("%s top-1: %.4f", name, results[name])
    return results


def shift_averages(
    results: Mapping[str, float],
    id_name: str = DEFAULT_ID_NAME,
    shift_names: Sequence[str] = DEFAULT_SHIFT_NAMES,
    *,
    objectnet_name: str = "objectnet",
) -> dict[str, float]:
    """Summary numbers: ``id`` (``results[id_name]``), ``avg_shift`` (mean over the shifts present: Avg-5 with all
    five), ``avg_shift_no_objectnet`` (Avg-4, when ObjectNet is among them) and ``num_shifts``.

    Shifts missing from ``results`` are left out of the means (and logged): compare only equal ``num_shifts``.
    """
    out: dict[str, float] = {}
    if id_name in results:
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


# ----------------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------------


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"Cannot write {type(obj).__name__} to JSON.")


def results_to_json(path: str | os.PathLike[str], results: Any, extra: Mapping[str, Any] | None = None) -> None:
    """Write ``{**extra, "results": results}`` as JSON, atomically (temp file in the same folder + ``os.replace``),
    so a crash never leaves a half-written file. Dataclasses (e.g. :class:`WiseFTResult`), tensors and numpy values
    are converted."""
    payload: dict[str, Any] = dict(extra or {})
    if "results" in payload:
        raise ValueError("extra must not contain the key 'results'.")
    payload["results"] = results
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=2, default=_json_default)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
