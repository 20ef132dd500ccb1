"""Image embeddings in batches: for training the SAE, and as cached reference embeddings (`z0`) for SAE-FT.

The SAE recipe trains for many epochs over the same embeddings, so the CLIP forward runs once and the result can be
cached on disk (safetensors, written atomically, with metadata that tells a stale cache from a valid one).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import CLIPModel

from .data import ImageClassificationCollator
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
