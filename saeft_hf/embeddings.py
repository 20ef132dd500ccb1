"""Image embeddings in batches: for training the SAE, and as cached reference embeddings (`z0`) for SAE-FT.

The SAE recipe trains for many epochs over the same embeddings, so the CLIP forward runs once and the result can be
cached on disk (safetensors, written atomically, keyed on what made it: see `saeft_hf.cache`). Both passes can run
sharded over all processes (`distributed=True`, see `saeft_hf.distributed`), on the accelerator, in the run's precision.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import torch
from datasets.table import InMemoryTable
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import CLIPModel

from .cache import CacheKey, load_cached_tensors, save_cached_tensors
from .data import REFERENCE_COLUMN, ImageClassificationCollator, with_image_transform
from .distributed import all_ranks_agree, gather_rows, is_main_process, shard_dataset
from .modeling import SAEFTCLIPForImageClassification, join_representations


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
    cache_key: CacheKey | None = None,
    progress: bool = True,
    return_labels: bool = False,
    distributed: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Embed every image of `dataset` (items `{"pixel_values", "labels"}`, e.g. from `with_image_transform`).

    Args:
        model: the model whose representation to take (eval mode is used; weights are not changed). It is moved to
            `device` for the pass and put back where it was afterwards.
        dataset: a map-style or iterable dataset of transformed images (use the eval transform: the paper trains
            its SAE on centre-cropped, un-augmented images).
        device: where the forward runs (default: where the model is); pass the accelerator (e.g.
            `training_args.device`), the model is usually still on the CPU before training.
        autocast_dtype: e.g. `torch.bfloat16` for a bf16 run; None (default): fp32. The result is float32 either way.
        num_workers: DataLoader workers decoding and transforming images.
        cache_path: a `.safetensors` file (by convention in `saeft_hf.cache.cache_dir(output_dir)`). If it exists
            and was made with `cache_key`, it is loaded instead of running the model; otherwise it is (re)built,
            saying why (see `saeft_hf.cache`).
        cache_key: what the embeddings depend on (`saeft_hf.cache.embedding_cache_key`); required with `cache_path`.
        return_labels: also return the labels [N] (-1 for unlabelled rows).
        distributed: every process of the initialised `torch.distributed` group calls this with the same dataset;
            each embeds its contiguous share of the rows (`saeft_hf.distributed.shard_dataset`) and all receive the
            full result in dataset order (rank-major for a stream). Only rank 0 writes the cache. False (default):
            this process embeds everything, whatever the group.

    Returns:
        embeddings [N, d] (float32, CPU), and labels [N] when `return_labels`. Rows of skipped corrupt images
        (`with_image_transform(..., skip_corrupt_images=True)`) are left out.
    """
    if cache_path is not None and cache_key is None:
        raise ValueError("compute_embeddings got a cache_path without a cache_key: the cache could not tell stale "
                         "embeddings from valid ones. Pass cache_key (saeft_hf.cache.embedding_cache_key) or no cache.")
    if cache_path is not None:
        cached = load_cached_tensors(cache_path, cache_key, what="embeddings cache")
        if all_ranks_agree(cached is not None) if distributed else cached is not None:
            return (cached["embeddings"], cached["labels"]) if return_labels else cached["embeddings"]

    # Whole batches per rank: each batch is the one a single process would form, so N ranks give its result exactly.
    local = shard_dataset(dataset, unit=batch_size) if distributed else dataset
    fn = representation_fn(model)
    home = _model_device(model)
    device = torch.device(device) if device is not None else home
    was_training = model.training
    model.eval().to(device)
    show = progress and (not distributed or is_main_process())
    loader = DataLoader(local, batch_size=batch_size, collate_fn=ImageClassificationCollator(), num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    n_local = len(local) if hasattr(local, "__len__") and not isinstance(local, datasets.IterableDataset) else None
    chunks, labels = [], []
    try:
        for batch in tqdm(loader, total=-(-n_local // batch_size) if n_local else None, desc="embeddings",
                          disable=not show, unit="batch"):
            pixel_values = batch["pixel_values"].to(device, non_blocking=True)
            with _autocast(device, autocast_dtype):
                z = fn(pixel_values)
            chunks.append(z.float().cpu())
            labels.append(batch["labels"].cpu() if "labels" in batch
                          else torch.full((pixel_values.shape[0],), -1, dtype=torch.long))
    finally:
        model.train(was_training).to(home)
    embeddings = torch.cat(chunks) if chunks else None
    label_tensor = torch.cat(labels) if labels else None
    if distributed:
        try:
            embeddings, label_tensor = gather_rows(embeddings), gather_rows(label_tensor)
        except ValueError as err:
            raise ValueError(f"compute_embeddings got an empty dataset: there are no images to embed ({err})") from None
    elif embeddings is None:
        raise ValueError("compute_embeddings got an empty dataset: there are no images to embed.")
    if cache_path is not None and (not distributed or is_main_process()):
        save_cached_tensors(cache_path, {"embeddings": embeddings, "labels": label_tensor}, cache_key)
    return (embeddings, label_tensor) if return_labels else embeddings


def compute_representations(model: nn.Module, dataset: Any, representations: str | Sequence[str],
                            **kwargs: Any) -> dict[str, torch.Tensor]:
    """`{spec: [N, d_spec]}`: the embeddings of `dataset` for one or several representations of `model` (our
    classifier, or a PeftModel around one), whatever representation the model is configured with, in ONE forward
    pass over the data (`compute_embeddings` with the same keyword arguments: device, precision, sharding, cache).

    E.g. `compute_representations(model, images, "hidden_states.-1.cls,hidden_states.-2.cls")` for one SAE per
    layer. With a cache, key it on these representations (`embedding_cache_key(..., representation=...)`).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(base, SAEFTCLIPForImageClassification):
        raise TypeError(f"compute_representations needs a SAEFTCLIPForImageClassification, got {type(base).__name__}.")
    if kwargs.get("return_labels"):
        raise ValueError("compute_representations returns no labels; use compute_embeddings(return_labels=True).")
    configured = base.config.representation
    base.config.representation = join_representations(representations)
    try:
        return base.split_representation(compute_embeddings(model, dataset, **kwargs))
    finally:
        base.config.representation = configured


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


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
    cache_key: CacheKey | None = None,
    overwrite: bool = False,
    progress: bool = True,
    distributed: bool = False,
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
        distributed: every process of the group calls this; each embeds its share of the rows and all get the
            whole column (as in `compute_embeddings`).

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
    if cache_path is not None and cache_key is None:
        raise ValueError("add_reference_embeddings got a cache_path without a cache_key; pass both or neither.")
    embeddings = None
    if cache_path is not None:
        cached = load_cached_tensors(cache_path, cache_key, what="reference embeddings cache")
        hit = cached is not None and cached["embeddings"].shape[0] == len(dataset)
        if all_ranks_agree(hit) if distributed else hit:
            embeddings = cached["embeddings"]
    if embeddings is None:
        embeddings = _reference_embeddings(dataset, model, transform, batch_size=batch_size, device=device,
                                           autocast_dtype=autocast_dtype, num_workers=num_workers,
                                           skip_corrupt_images=skip_corrupt_images, progress=progress,
                                           distributed=distributed)
        if cache_path is not None and (not distributed or is_main_process()):
            save_cached_tensors(cache_path, {"embeddings": embeddings}, cache_key)
    values = embeddings.float().contiguous().numpy()
    array = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
    z0 = datasets.Dataset(InMemoryTable(pa.table({column: array})))
    return datasets.concatenate_datasets([dataset, z0], axis=1)


def _reference_embeddings(dataset: datasets.Dataset, model: nn.Module, transform: Any, *, batch_size: int,
                          device: torch.device | str | None, autocast_dtype: torch.dtype | None, num_workers: int,
                          skip_corrupt_images: bool, progress: bool, distributed: bool = False) -> torch.Tensor:
    """[N, d] float32, row i for image i (NaN for a skipped corrupt image)."""
    fn = representation_fn(model)
    home = _model_device(model)
    device = torch.device(device) if device is not None else home
    was_training = model.training
    model.eval().to(device)
    images = with_image_transform(dataset.select_columns(["image"]), transform,
                                  skip_corrupt_images=skip_corrupt_images)
    # Every row (NaN for a corrupt image) keeps its place, so the ranks' contiguous blocks concatenate in order.
    local = shard_dataset(images, unit=batch_size) if distributed else images
    loader = DataLoader(local, batch_size=batch_size, num_workers=num_workers, collate_fn=_pixels_with_gaps,
                        pin_memory=device.type == "cuda")
    rows: list[torch.Tensor] = []
    for pixel_values, present in tqdm(loader, total=-(-len(local) // batch_size), desc="reference embeddings",
                                      disable=not progress or (distributed and not is_main_process()), unit="batch"):
        z = None
        if pixel_values is not None:
            pixel_values = pixel_values.to(device, non_blocking=True)
            with _autocast(device, autocast_dtype):
                z = fn(pixel_values).float().cpu()
        if present.all():
            rows.append(z)
            continue
        filled = torch.full((present.shape[0], _width(model) if z is None else z.shape[1]), float("nan"))
        if z is not None:
            filled[present] = z
        rows.append(filled)
    model.train(was_training).to(home)
    if distributed:
        return gather_rows(torch.cat(rows) if rows else None)
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
