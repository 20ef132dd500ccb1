"""End to end: embed a dataset with the pre-trained and fine-tuned models, compare, describe, write the report."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import torch
from torch import nn

from ..data import AnyDataset, transforms_from_pretrained
from ..sae import SparseAutoencoder
from .analysis import (
    CHANGES_FILENAME,
    DIRECTIONS,
    REPORT_FILENAME,
    FeatureChangeReport,
    _check_model,
    _class_names,
    _embed,
    _prepare_dataset,
    compare_codes,
    load_model_for_interpretation,
)
from .report import feature_grid, write_report
from .text import build_text_vocabulary, describe_with_text

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------------------------


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def interpret_runs(
    pretrained: nn.Module | str,
    finetuned: Mapping[str, nn.Module | str],
    sae: SparseAutoencoder | str,
    dataset: AnyDataset,
    transform: Callable[[Any], torch.Tensor] | None = None,
    *,
    output_dir: str | Path,
    text_model: Any = None,
    tokenizer: Any = None,
    classnames: Sequence[str] | None = None,
    templates: Sequence[str] = ("a photo of a {}.",),
    vocabulary: Sequence[str] = (),
    normalize: bool | None = None,
    max_samples: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    top_features: int = 20,
    top_images: int = 8,
    top_prompts: int = 3,
    rank_by: str = "mass",
    center_text: bool = False,
    title: str = "What fine-tuning changed, in SAE features",
    description: str | None = None,
    progress: bool = True,
) -> dict[str, FeatureChangeReport]:
    """Compare one or more fine-tuned models with the pre-trained one and write JSON, grids and an HTML report.

    Writes into `output_dir`: `<name>/feature_changes.json` and `<name>/grid_added.png`, `grid_removed.png` per
    model, `summary.json` (headline numbers of every model) and `report.html` (self-contained).

    Args:
        pretrained: the pre-trained model, or a path (a CLIP checkpoint; only its vision tower is used).
        finetuned: {display name: model or path}; paths are loaded with `saeft_hf.lora.load_classifier` (full
            classifier directories and LoRA adapters alike). Order = column order in the report.
        sae: the SAE, or a path for `SparseAutoencoder.from_pretrained`.
        dataset: raw `datasets` dataset with `image` / `label` columns.
        transform: eval transform; None -> `transforms_from_pretrained(pretrained)[1]` (needs a path).
        text_model / tokenizer: a CLIPModel (or path) whose text tower describes features; None: no text.
        classnames: label names (default: the dataset's ClassLabel names, else the fine-tuned model's id2label).
        templates: prompt templates for the class-name text embeddings.
        vocabulary: extra words or prompts to describe features with.
        Other arguments: see `compute_feature_changes` / `compare_codes` / `describe_with_text`.

    Returns:
        {name: FeatureChangeReport}.
    """
    if not finetuned:
        raise ValueError("interpret_runs needs at least one fine-tuned model.")
    output_dir = Path(output_dir)
    if isinstance(sae, (str, os.PathLike)):
        sae_source = os.fspath(sae)
        sae = SparseAutoencoder.from_pretrained(sae_source)
    else:
        sae_source = None
    representation = sae.config.representation
    pretrained_source = None
    if isinstance(pretrained, (str, os.PathLike)):
        pretrained_source = os.fspath(pretrained)
        pretrained = load_model_for_interpretation(pretrained_source, representation=representation)
        if transform is None:
            transform = transforms_from_pretrained(pretrained_source)[1]
    if transform is None:
        raise ValueError("Pass the eval `transform` (transforms_from_pretrained(path)[1]) when `pretrained` is a model.")
    models: dict[str, nn.Module] = {}
    sources: dict[str, str | None] = {}
    for name, model in finetuned.items():
        sources[name] = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
        models[name] = load_model_for_interpretation(sources[name], representation=representation) \
            if sources[name] is not None else model
    _check_model(pretrained, sae, "pre-trained", check_source=True)
    for name, model in models.items():
        _check_model(model, sae, f"fine-tuned '{name}'", check_source=False)

    data, rows = _prepare_dataset(dataset, max_samples, seed)
    names = list(classnames) if classnames is not None else _class_names(dataset, list(models.values()))
    kwargs = dict(batch_size=batch_size, device=device, autocast_dtype=autocast_dtype, progress=progress)
    # The pre-trained embeddings are shared by every comparison: compute them once.
    z_before, labels = _embed(pretrained, data, transform, **kwargs)

    vocab = None
    if text_model is not None and (names or vocabulary):
        vocab = build_text_vocabulary(text_model, tokenizer, classnames=names, templates=templates,
                                      vocabulary=vocabulary, progress=False)
    elif text_model is not None:
        logger.warning("No class names and no vocabulary to describe features with: the report has no text. "
                       "Pass classnames= or vocabulary=.")

    reports: dict[str, FeatureChangeReport] = {}
    for name, model in models.items():
        z_after, labels_after = _embed(model, data, transform, **kwargs)
        if not torch.equal(labels, labels_after):
            raise RuntimeError("The passes over the dataset returned different label orders; use a map-style dataset.")
        report = compare_codes(sae, z_before, z_after, labels, normalize=normalize, class_names=names,
                               top_features=top_features, top_images=top_images, rank_by=rank_by)
        if vocab is not None:
            describe_with_text(report, sae, vocab, top_prompts=top_prompts, center=center_text)
        if rows is not None:
            report.remap_indices(rows)
        report.metadata.update(
            name=name, finetuned=sources[name], pretrained=pretrained_source, sae=sae_source,
            sae_config={k: v for k, v in sae.config.to_dict().items() if k != "training_metrics"},
            max_samples=max_samples, seed=seed,
        )
        model_dir = output_dir / _slug(name)
        report.save_json(model_dir / CHANGES_FILENAME)
        image_source = dataset if not isinstance(dataset, datasets.IterableDataset) else data
        for direction in DIRECTIONS:
            feature_grid(report, image_source, direction, title=f"{name}: most {direction} features").save(
                model_dir / f"grid_{direction}.png")
        reports[name] = report
        logger.info("%s: %s", name, report.summary())

    summary = {name: report.summary() for name, report in reports.items()}
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    write_report(reports, output_dir / REPORT_FILENAME,
                 dataset=dataset if not isinstance(dataset, datasets.IterableDataset) else data,
                 title=title, description=description)
    return reports
