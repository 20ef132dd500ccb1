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
import numpy as np
import torch
from torch import nn

from ..data import AnyDataset, transforms_from_pretrained
from ..sae import SparseAutoencoder
from .analysis import (
    CHANGES_FILENAME,
    DIRECTIONS,
    PRETRAINED_NAME,
    PROFILES_FILENAME,
    REPORT_FILENAME,
    FeatureChangeReport,
    FeatureProfile,
    _check_model,
    _class_names,
    _embed,
    _prepare_dataset,
    compare_codes,
    load_model_for_interpretation,
    patch_activations,
    profile_features,
    save_profiles,
    select_features,
)
from .report import feature_grid, write_report
from .text import build_text_vocabulary, describe_profiles, describe_with_text

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
    max_features: int = 12,
    patch_heatmaps: bool = True,
    progress: bool = True,
) -> dict[str, FeatureChangeReport]:
    """Compare one or more fine-tuned models with the pre-trained one and write JSON, grids and an HTML report.

    Writes into `output_dir`: `<name>/feature_changes.json` and `<name>/grid_added.png`, `grid_removed.png` per
    model, `summary.json` (headline numbers of every model), `feature_profiles.json` (the feature pages' numbers,
    `profile_features`) and `report.html` (self-contained).

    The report has a page per feature (`select_features`: each model's `max_features` most added and most removed
    features, and those whose frequency changed most) with its statistics under every model, its activation
    histogram, its top-activating images under every model side by side, its closest prompts, and, for an SAE on
    `hidden_states.{i}.{cls|mean}` (with `patch_heatmaps`), patch heatmaps on those images.

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
        max_features: features per model and direction in the report (lists and pages).
        patch_heatmaps: draw patch heatmaps for an SAE on hidden states (one extra forward of each model on the
            top images only).
        Other arguments: see `compute_feature_changes` / `compare_codes` / `describe_with_text`.

    Returns:
        {name: FeatureChangeReport}.
    """
    if not finetuned:
        raise ValueError("interpret_runs needs at least one fine-tuned model.")
    if PRETRAINED_NAME in finetuned:
        raise ValueError(f"'{PRETRAINED_NAME}' names the pre-trained model in the report; rename that fine-tuned model.")
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
    text_note = "none (no text model given)"
    if text_model is not None and representation != "image_embeds":
        # Prompts live in CLIP's joint space; an SAE on another representation has atoms in another space.
        text_note = f"none: the SAE is on `{representation}`, not CLIP's joint image-text space"
        logger.warning("The SAE is on %s, not image_embeds: features are not described with text.", representation)
    elif text_model is not None and (names or vocabulary):
        vocab = build_text_vocabulary(text_model, tokenizer, classnames=names, templates=templates,
                                      vocabulary=vocabulary, progress=False)
    elif text_model is not None:
        text_note = "none (no class names or vocabulary to describe features with)"
        logger.warning("No class names and no vocabulary to describe features with: the report has no text. "
                       "Pass classnames= or vocabulary=.")

    reports: dict[str, FeatureChangeReport] = {}
    embeddings = {PRETRAINED_NAME: z_before}
    for name, model in models.items():
        z_after, labels_after = _embed(model, data, transform, **kwargs)
        embeddings[name] = z_after
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

    # Feature pages: every listed feature under every model (positions in `data`, remapped to dataset rows below).
    profiles = profile_features(sae, embeddings, select_features(reports, per_direction=max_features),
                                normalize=normalize, top_images=top_images)
    if vocab is not None:
        describe_profiles(profiles, sae, vocab, top_prompts=top_prompts, center=center_text)
    patch_maps = None
    if patch_heatmaps and representation.startswith("hidden_states.") and profiles:
        patch_maps = _patch_maps(profiles, {PRETRAINED_NAME: pretrained, **models}, sae, data, transform,
                                 normalize=normalize, batch_size=batch_size)
    if rows is not None:
        for profile in profiles:
            profile.remap_indices(rows)
    save_profiles(profiles, output_dir / PROFILES_FILENAME)
    write_report(reports, output_dir / REPORT_FILENAME,
                 dataset=dataset if not isinstance(dataset, datasets.IterableDataset) else data,
                 title=title, description=description, max_features=max_features, profiles=profiles,
                 patch_maps=patch_maps, text_note=text_note)
    return reports


def _patch_maps(profiles: Sequence[FeatureProfile], models: Mapping[str, nn.Module], sae: SparseAutoencoder,
                data: datasets.Dataset, transform: Callable[[Any], torch.Tensor], *, normalize: bool | None,
                batch_size: int) -> dict[int, dict[str, np.ndarray]]:
    """{feature: {model: [n_top, gh, gw]}}: each model's heatmaps of each feature on that model's top images.

    One forward per model over the union of its top images (rows of `data`), every profiled feature at once.
    """
    features = [p.feature for p in profiles]
    column = {j: c for c, j in enumerate(features)}
    maps: dict[int, dict[str, np.ndarray]] = {j: {} for j in features}
    for name, model in models.items():
        rows = sorted({i for p in profiles for i in p.top_indices.get(name, [])})
        if not rows:
            continue
        pixels = torch.stack([transform(data[i]["image"]) for i in rows])
        acts = patch_activations(model, sae, pixels, features, normalize=normalize, batch_size=batch_size)
        position = {i: k for k, i in enumerate(rows)}
        for p in profiles:
            picked = [position[i] for i in p.top_indices.get(name, [])]
            # Signed so that positive = towards the feature (signed TopK features can fire negatively).
            maps[p.feature][name] = (p.sign * acts[picked, column[p.feature]]).numpy()
    return maps
