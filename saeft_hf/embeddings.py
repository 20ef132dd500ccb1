"""Image embeddings in batches: for training the SAE, and as cached reference embeddings (`z0`) for SAE-FT.

The SAE recipe trains for many epochs over the same embeddings, so the CLIP forward runs once and the result can be
cached on disk (safetensors, written atomically, with metadata that tells a stale cache from a valid one).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import torch
from datasets.table import InMemoryTable
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import CLIPModel

from .data import REFERENCE_COLUMN, ImageClassificationCollator, with_image_transform
from .modeling import SAEFTCLIPForImageClassification


def representation_fn(model: nn.Module) -> Any:
    """A function pixel_values [B, C, H, W] -> representation [B, d] for our classifier, a PeftModel or a CLIPModel."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if isinstance(base, SAEFTCLIPForImageClassification):
        return base.get_representation
    if isinstance(base, CLIPModel):
        return lambda pixel_values: base.get_image_features(pixel_values=pixel_values).pooler_output
    raise TypeError(
        f"Cannot take embeddings from a {type(base).__name__}; pass a SAEFTCLIPForImageClassification or a CLIPModel."
    )


@torch.no_grad()
def compute_embeddings(
    model: nn.Module,
    dataset: Any,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    num_workers: int = 0,
    cache_path: str | Path | None = None,
    cache_key: str | None = None,
    progress: bool = True,
    return_labels: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Embed every image of `dataset` (items `{"pixel_values", "labels"}`, e.g. from `with_image_transform`).

    Args:
        model: the model whose representation to take (eval mode is used; weights are not changed).
        dataset: a map-style or iterable dataset of transformed images (use the eval transform: the paper trains
            its SAE on centre-cropped, un-augmented images).
        cache_path: a `.safetensors` file. If it exists and its metadata matches (`cache_key`, row count), it is
            loaded instead of running the model; otherwise it is (re)written.
        cache_key: what the embeddings depend on (e.g. "<model id>|<representation>|<split>").
        return_labels: also return the labels [N].

    Returns:
        embeddings [N, d] (float32, CPU), and labels [N] when `return_labels`.
    """
    n_rows = len(dataset) if hasattr(dataset, "__len__") else None
    if cache_path is not None and os.path.isfile(cache_path):
        cached = _load_cache(Path(cache_path), cache_key, n_rows)
        if cached is not None:
            return cached if return_labels else cached[0]

    fn = representation_fn(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=ImageClassificationCollator(), num_workers=num_workers)
    chunks, labels = [], []
    total = -(-n_rows // batch_size) if n_rows else None
    for batch in tqdm(loader, total=total, desc="embeddings", disable=not progress, unit="batch"):
        pixel_values = batch["pixel_values"].to(device)
        if autocast_dtype is not None:
            with torch.autocast(device_type=device.type, dtype=autocast_dtype):
                z = fn(pixel_values)
        else:
            z = fn(pixel_values)
        chunks.append(z.float().cpu())
        labels.append(batch["labels"].cpu())
    model.train(was_training)
    if not chunks:
        raise ValueError("compute_embeddings got an empty dataset: there are no images to embed.")
    embeddings, label_tensor = torch.cat(chunks), torch.cat(labels)
    if cache_path is not None:
        _save_cache(Path(cache_path), embeddings, label_tensor, cache_key)
    return (embeddings, label_tensor) if return_labels else embeddings


def _save_cache(path: Path, embeddings: torch.Tensor, labels: torch.Tensor, key: str | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    meta = {"key": json.dumps(key), "rows": str(embeddings.shape[0])}
    save_file({"embeddings": embeddings.contiguous(), "labels": labels.contiguous()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


def _load_cache(path: Path, key: str | None, n_rows: int | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("key") != json.dumps(key) or (n_rows is not None and meta.get("rows") != str(n_rows)):
                return None  # stale: other model, representation or data
            return fh.get_tensor("embeddings"), fh.get_tensor("labels")
    except Exception:  # a truncated cache is recomputed, never trusted
        return None


@torch.no_grad()
def add_reference_embeddings(
    dataset: datasets.Dataset,
    model: nn.Module,
    transform: Any,
    *,
    column: str = REFERENCE_COLUMN,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    num_workers: int = 0,
    skip_corrupt_images: bool = False,
    cache_path: str | Path | None = None,
    cache_key: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> datasets.Dataset:
    """Return `dataset` with a `z0` column: the frozen pre-trained `model`'s representation of every image, computed
    once, for `SAEFTConfig(reference_mode="cached")`.

    With this column, `with_image_transform` passes `z0` through, `ImageClassificationCollator` stacks it into
    `batch["z0"]` [B, d], and `SAEFTTrainer` uses it instead of running the frozen reference forward every step
    (for full fine-tuning it then keeps no frozen copy of the model either). Step cost drops to about that of plain
    fine-tuning.

    Trade-off: `z0` is computed once, on `transform` (use the deterministic eval transform: resize + centre crop),
    while during training `f(x)` sees the augmented image (RandomResizedCrop). The penalty then compares `f` on a
    crop with `f0` on the centre view, not with `f0` on the same crop as the paper's live reference does. With
    augmentation off (the train transform equal to `transform`) cached and live give the same loss; with it on,
    cached mode is an approximation (mild for the paper's scale=(0.9, 1) crops) that trades fidelity for speed.
    The paper uses the live reference, which stays the default.

    Args:
        dataset: a map-style `datasets.Dataset` with an `image` column (and `label`), un-transformed. Pass it before
            `shuffle`/`select`: adding a column to a dataset with an indices mapping copies it (`flatten_indices`).
            Streaming datasets are not supported: precompute `z0` on a map-style copy (this function), store the
            result with `save_to_disk` / `push_to_hub` (the column is a fixed-length float32 list), and stream that.
        model: the pre-trained model, before any fine-tuning and before LoRA adapters are added (a
            `SAEFTCLIPForImageClassification` or a `CLIPModel`). It runs on `device` (default: where it is) in eval
            mode and is put back afterwards.
        autocast_dtype: e.g. `torch.bfloat16` when training with `bf16=True`, so z0 has the live reference's
            precision.
        transform: the deterministic eval transform (`transforms_from_pretrained(...)[1]`).
        column: the column name `SAEFTTrainer` reads (`z0`).
        skip_corrupt_images: as `with_image_transform`; a corrupt image's row gets NaN (the collator drops the row).
        cache_path / cache_key: a `.safetensors` cache of the embeddings, as in `compute_embeddings`.
        overwrite: replace an existing `column` instead of raising.

    Returns:
        A new `datasets.Dataset` with the extra column (`List(float32, length=d)`).
    """
    if isinstance(dataset, datasets.IterableDataset) or not isinstance(dataset, datasets.Dataset):
        raise TypeError(
            "add_reference_embeddings needs a map-style datasets.Dataset. For a streaming dataset, compute z0 on a "
            "map-style copy with this function, store it with the images (save_to_disk / push_to_hub) and stream "
            "that, or use reference_mode='live'."
        )
    if column in dataset.column_names:
        if not overwrite:
            raise ValueError(f"The dataset already has a `{column}` column; pass overwrite=True to recompute it.")
        dataset = dataset.remove_columns(column)
    n_rows = len(dataset)
    embeddings = None
    if cache_path is not None and os.path.isfile(cache_path):
        cached = _load_cache(Path(cache_path), cache_key, n_rows)
        embeddings = cached[0] if cached is not None else None
    if embeddings is None:
        embeddings = _reference_embeddings(dataset, model, transform, batch_size=batch_size, device=device,
                                           autocast_dtype=autocast_dtype, num_workers=num_workers,
                                           skip_corrupt_images=skip_corrupt_images, progress=progress)
        if cache_path is not None:
            _save_cache(Path(cache_path), embeddings, torch.zeros(0, dtype=torch.long), cache_key)
    values = embeddings.float().contiguous().numpy()
    array = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
    z0 = datasets.Dataset(InMemoryTable(pa.table({column: array})))
    return datasets.concatenate_datasets([dataset, z0], axis=1)


def _reference_embeddings(dataset: datasets.Dataset, model: nn.Module, transform: Any, *, batch_size: int,
                          device: torch.device | str | None, autocast_dtype: torch.dtype | None, num_workers: int,
                          skip_corrupt_images: bool, progress: bool) -> torch.Tensor:
    """[N, d] float32, row i for image i (NaN for a skipped corrupt image)."""
    fn = representation_fn(model)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    was_training = model.training
    model.eval().to(device)
    images = with_image_transform(dataset.select_columns(["image"]), transform,
                                  skip_corrupt_images=skip_corrupt_images)
    loader = DataLoader(images, batch_size=batch_size, num_workers=num_workers, collate_fn=_pixels_with_gaps)
    rows: list[torch.Tensor] = []
    for pixel_values, present in tqdm(loader, total=-(-len(dataset) // batch_size), desc="reference embeddings",
                                      disable=not progress, unit="batch"):
        z = None
        if pixel_values is not None:
            pixel_values = pixel_values.to(device)
            autocast = (torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None
                        else contextlib.nullcontext())
            with autocast:
                z = fn(pixel_values).float().cpu()
        if present.all():
            rows.append(z)
            continue
        filled = torch.full((present.shape[0], _width(model) if z is None else z.shape[1]), float("nan"))
        if z is not None:
            filled[present] = z
        rows.append(filled)
    model.train(was_training).to(home)
    if not rows:
        raise ValueError("add_reference_embeddings got an empty dataset.")
    return torch.cat(rows)


def _pixels_with_gaps(features: list[dict[str, Any]]) -> tuple[torch.Tensor | None, torch.Tensor]:
    present = torch.tensor([f.get("pixel_values") is not None for f in features])
    kept = [torch.as_tensor(f["pixel_values"]) for f in features if f.get("pixel_values") is not None]
    return (torch.stack(kept).float() if kept else None), present


def _width(model: nn.Module) -> int:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if isinstance(base, SAEFTCLIPForImageClassification):
        return base.representation_dim()
    return int(base.config.projection_dim)
