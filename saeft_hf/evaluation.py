"""Shift benchmarks, class-subset projections, WiSE-FT interpolation and sweeps.

The protocol (WiSE-FT lineage, METHOD.md section 5): top-1 on ImageNet validation and on five shifts: ImageNetV2
(matched frequency), ImageNet-R and ImageNet-A (200-class subsets: the 1000-way logits are *restricted* to those
classes), ImageNet-Sketch (all 1000 classes) and ObjectNet (113 classes; a class logit is the max over its mapped
ImageNet classes; a 2-px border is cropped). Avg-5 is the mean over the five shifts, Avg-4 leaves ObjectNet out.
WiSE-FT's alpha is chosen on ImageNet validation data, never on a shift.

Which data to evaluate on is configuration (:class:`EvalSetSpec`, ``recipes/configs/imagenet_eval_sets.yaml``),
not code. The model contract: ``model(pixel_values=...)`` returns an object with ``.logits`` [B, num_classes]
(a ``transformers`` ``PreTrainedModel`` or a ``peft.PeftModel`` wrapping one).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import logging
import math
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import datasets
import numpy as np
import torch
from peft import PeftModel
from torch import nn
from tqdm.auto import tqdm

from .data import (
    AnyDataset,
    BorderCrop,
    ImageClassificationCollator,
    load_image_dataset,
    relabel_by_name,
    with_image_transform,
)
from .imagenet_classes import (
    IMAGENET_TEMPLATES,
    imagenet_a_indices,
    imagenet_classnames,
    imagenet_r_indices,
    imagenet_wnids,
    objectnet_class_groups,
    objectnet_classnames,
    objectnet_folders,
)

__all__ = [
    "DEFAULT_SHIFT_NAMES",
    "IMAGENET_TEMPLATES",
    "EvalSetSpec",
    "WiseFTResult",
    "default_imagenet_eval_specs",
    "evaluate_accuracy",
    "evaluate_sets",
    "imagenet_a_indices",
    "imagenet_classnames",
    "imagenet_r_indices",
    "imagenet_wnids",
    "interpolate_state_dicts",
    "load_eval_dataset",
    "load_eval_sets",
    "load_eval_specs",
    "objectnet_class_groups",
    "objectnet_classnames",
    "objectnet_folders",
    "project_logits",
    "results_to_json",
    "scale_lora",
    "shift_averages",
    "wise_ft",
    "wise_ft_sweep",
]

logger = logging.getLogger(__name__)

EvalKind = Literal["full", "subset", "grouped"]
DEFAULT_ID_NAME = "imagenet"
DEFAULT_SHIFT_NAMES: tuple[str, ...] = ("imagenetv2", "imagenet_r", "imagenet_sketch", "objectnet", "imagenet_a")

# Named class lists a YAML file may refer to instead of spelling out 200 integers.
_NAMED_INDICES: dict[str, Callable[[], list[int]]] = {"imagenet_r": imagenet_r_indices,
                                                     "imagenet_a": imagenet_a_indices}
_NAMED_GROUPS: dict[str, Callable[[], list[list[int]]]] = {"objectnet": objectnet_class_groups}
_NAMED_FOLDERS: dict[str, Callable[[], list[str]]] = {"objectnet": objectnet_folders}
_WNID = re.compile(r"^n\d{8}$")


def _resolve(value: Any, named: Mapping[str, Callable[[], Any]], field_name: str) -> Any:
    if isinstance(value, str):
        if value not in named:
            raise ValueError(f"{field_name}={value!r} is not a known class list; use one of {sorted(named)} or "
                             "give the list itself.")
        return named[value]()
    return value


# ----------------------------------------------------------------------------------------------------------------
# Evaluation-set specs (configuration)
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class EvalSetSpec:
    """Where an evaluation set lives and how its labels relate to the model's 1000 ImageNet logits.

    Source (as in :func:`saeft_hf.data.load_image_dataset`): ``dataset_name`` (Hub id or builder) with optional
    ``dataset_config_name`` / ``data_dir`` (a folder inside the repo) / ``data_files``; or, without
    ``dataset_name`` and ``data_files``, ``data_dir`` is a *local class-folder tree* (``root/<class>/<image>``,
    ``split`` is then ignored).

    ``kind``:
      - ``"full"``: all 1000 logits; labels are ImageNet indices (ImageNet val, V2, Sketch).
      - ``"subset"``: logits restricted to ``class_indices`` (sorted ImageNet indices, or the name ``"imagenet_r"``
        / ``"imagenet_a"``); the label is the position in that list (ImageNet-R/A).
      - ``"grouped"``: class ``c``'s logit is the max over ``class_groups[c]`` (ImageNet indices, or
        ``"objectnet"``); ``crop_border`` px are removed before the transform (ObjectNet: 2).

    Labels of folder datasets are aligned by *name*, not by sorted position: wnid folders map to their ImageNet
    index (or subset position), ``class_folders`` (e.g. ``"objectnet"``) map folder names to class positions and
    drop unmapped folders, and ``numeric_folder_labels`` maps ImageNetV2's ``0``..``999`` folders to ``int(name)``
    (``None``: automatic when all class names are digits). Integer labels (webdataset ``cls``) are used as given.

    ``role``: ``"id"`` (the in-distribution set, used to select WiSE-FT's alpha), ``"shift"`` (counted in the
    shift averages) or ``"other"``.
    """

    name: str
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    data_dir: str | None = None
    data_files: str | list[str] | dict[str, Any] | None = None
    split: str = "test"
    image_column: str | None = None
    label_column: str | None = None
    kind: EvalKind = "full"
    class_indices: list[int] | str | None = None
    class_groups: list[list[int]] | str | None = None
    class_folders: list[str] | str | None = None
    crop_border: int = 0
    numeric_folder_labels: bool | None = None
    role: Literal["id", "shift", "other"] = "shift"

    def __post_init__(self) -> None:
        if self.kind not in ("full", "subset", "grouped"):
            raise ValueError(f"EvalSetSpec {self.name!r}: kind must be 'full', 'subset' or 'grouped', got "
                             f"{self.kind!r}.")
        if self.role not in ("id", "shift", "other"):
            raise ValueError(f"EvalSetSpec {self.name!r}: role must be 'id', 'shift' or 'other', got {self.role!r}.")
        if self.dataset_name is None and self.data_dir is None and self.data_files is None:
            raise ValueError(f"EvalSetSpec {self.name!r} has no source: set dataset_name (Hub id), data_dir (local "
                             "class folders) or data_files (local tars/parquet).")
        if self.kind == "subset":
            indices = self.indices()
            if not indices:
                raise ValueError(f"EvalSetSpec {self.name!r}: kind='subset' needs class_indices.")
            if list(indices) != sorted(set(indices)):
                raise ValueError(f"EvalSetSpec {self.name!r}: class_indices must be sorted and unique (the label of "
                                 "an image is the position of its class in this list).")
        if self.kind == "grouped" and not self.groups():
            raise ValueError(f"EvalSetSpec {self.name!r}: kind='grouped' needs class_groups.")
        if self.crop_border < 0:
            raise ValueError(f"EvalSetSpec {self.name!r}: crop_border must be >= 0.")
        self.folders()  # validate a named folder list early

    def indices(self) -> list[int] | None:
        """The resolved ``class_indices`` (ImageNet indices), or None."""
        value = _resolve(self.class_indices, _NAMED_INDICES, "class_indices")
        return None if value is None else [int(i) for i in value]

    def groups(self) -> list[list[int]] | None:
        """The resolved ``class_groups`` (one list of ImageNet indices per class), or None."""
        value = _resolve(self.class_groups, _NAMED_GROUPS, "class_groups")
        return None if value is None else [[int(i) for i in g] for g in value]

    def folders(self) -> list[str] | None:
        """The resolved ``class_folders`` (folder name per class position), or None."""
        value = _resolve(self.class_folders, _NAMED_FOLDERS, "class_folders")
        return None if value is None else [str(f) for f in value]

    @property
    def num_classes(self) -> int | None:
        """Number of classes after :func:`project_logits` (None for ``"full"``: the model's logit count)."""
        if self.kind == "subset":
            return len(self.indices() or [])
        if self.kind == "grouped":
            return len(self.groups() or [])
        return None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> EvalSetSpec:
        """Build from a YAML/JSON mapping; unknown keys are an error (typos must not be silently ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown EvalSetSpec field(s) {unknown} in {dict(values)!r}; known: {sorted(known)}.")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        """Fields as given (named class lists stay names), for YAML/JSON."""
        return dataclasses.asdict(self)


def default_imagenet_eval_specs() -> list[EvalSetSpec]:
    """ImageNet validation and its five shifts, from public Hub copies (all script-free webdataset repos).

    Mirrors ``recipes/configs/imagenet_eval_sets.yaml``. Caveats: ImageNet (``timm/imagenet-1k-wds``) is gated
    behind the ImageNet terms (log in / pass a token); ``ILSVRC/imagenet-1k`` is the alternative id (it may still be
    script-based, which datasets>=4 refuses). ObjectNet's licence restricts its use; check it. The
    ``clip-benchmark/wds_*`` label ids follow the datasets' own sorted class lists: V2 and Sketch give ImageNet
    indices, R/A the position in the 200 sorted classes, ObjectNet the position among the 113 sorted folder names;
    these match :func:`imagenet_r_indices`, :func:`imagenet_a_indices` and :func:`objectnet_folders`.
    """
    return [
        EvalSetSpec(name="imagenet", dataset_name="timm/imagenet-1k-wds", split="validation", kind="full",
                    role="id"),
        EvalSetSpec(name="imagenetv2", dataset_name="clip-benchmark/wds_imagenetv2", split="test", kind="full"),
        EvalSetSpec(name="imagenet_r", dataset_name="clip-benchmark/wds_imagenet-r", split="test", kind="subset",
                    class_indices="imagenet_r"),
        EvalSetSpec(name="imagenet_sketch", dataset_name="clip-benchmark/wds_imagenet_sketch", split="test",
                    kind="full"),
        EvalSetSpec(name="objectnet", dataset_name="clip-benchmark/wds_objectnet", split="test", kind="grouped",
                    class_groups="objectnet", class_folders="objectnet", crop_border=2),
        EvalSetSpec(name="imagenet_a", dataset_name="clip-benchmark/wds_imagenet-a", split="test", kind="subset",
                    class_indices="imagenet_a"),
    ]


def load_eval_specs(source: str | os.PathLike[str] | Mapping[str, Any] | Sequence[Mapping[str, Any]]
                    ) -> list[EvalSetSpec]:
    """Eval-set specs from a YAML file path, a mapping ``{"eval_sets": [...]}``, or a list of field mappings.

    Each entry holds :class:`EvalSetSpec` fields; see ``recipes/configs/imagenet_eval_sets.yaml``.
    """
    data: Any = source
    if isinstance(source, (str, os.PathLike)):
        import yaml

        with open(source, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    if isinstance(data, Mapping):
        unknown = sorted(set(data) - {"eval_sets"})
        if unknown or "eval_sets" not in data:
            raise ValueError(f"An eval-set config is a mapping with one key 'eval_sets' (a list of sets); got keys "
                             f"{sorted(data)}.")
        data = data["eval_sets"]
    if not isinstance(data, Sequence) or isinstance(data, (str, bytes)):
        raise ValueError(f"Expected a list of eval-set mappings, got {type(data).__name__}.")
    specs = [spec if isinstance(spec, EvalSetSpec) else EvalSetSpec.from_dict(spec) for spec in data]
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"Duplicate eval-set names {duplicates}; each set needs its own name.")
    return specs


def _align_labels(ds: AnyDataset, spec: EvalSetSpec) -> AnyDataset:
    """Map ClassLabel names (folder names) to the evaluation label space of ``spec``; see :class:`EvalSetSpec`."""
    feature = (ds.features or {}).get("label")
    if not isinstance(feature, datasets.ClassLabel):
        return ds  # integer labels (webdataset cls, relabelled numeric folders): used as given
    names = list(feature.names)
    folders = spec.folders()
    if folders is not None:
        mapping = {folder: position for position, folder in enumerate(folders)}
        missing = [f for f in folders if f not in set(names)]
        if missing:
            logger.warning("%s: %d of the %d expected class folders are absent (e.g. %s); a partial copy?",
                           spec.name, len(missing), len(folders), missing[:3])
        return relabel_by_name(ds, mapping, drop_unknown=True)
    if names and all(_WNID.match(n) for n in names):
        wnid_index = {w: i for i, w in enumerate(imagenet_wnids())}
        unknown = [n for n in names if n not in wnid_index]
        if unknown:
            raise ValueError(f"{spec.name}: folder names {unknown[:5]} are not ImageNet-1k wnids.")
        if spec.kind == "subset":
            position = {idx: p for p, idx in enumerate(spec.indices() or [])}
            mapping = {n: position[wnid_index[n]] for n in names if wnid_index[n] in position}
        elif spec.kind == "full":
            mapping = {n: wnid_index[n] for n in names}
        else:
            return ds
        # Name-based, so a copy that lacks some class folders still gets the right labels.
        return relabel_by_name(ds, mapping)
    return ds


def load_eval_dataset(
    spec: EvalSetSpec,
    *,
    streaming: bool = False,
    token: str | bool | None = None,
    cache_dir: str | None = None,
) -> AnyDataset:
    """Load the raw (``image`` undecoded, ``label``) dataset of ``spec`` with labels in its evaluation space."""
    common: dict[str, Any] = {
        "streaming": streaming, "image_column": spec.image_column, "label_column": spec.label_column,
        "numeric_folder_labels": spec.numeric_folder_labels, "token": token, "cache_dir": cache_dir,
    }
    if spec.dataset_name is None and spec.data_files is None:
        ds = load_image_dataset(validation_dir=spec.data_dir, split="validation", **common)
    else:
        ds = load_image_dataset(dataset_name=spec.dataset_name, dataset_config_name=spec.dataset_config_name,
                                data_dir=spec.data_dir, data_files=spec.data_files, split=spec.split, **common)
    return _align_labels(ds, spec)


def load_eval_sets(
    specs: Sequence[EvalSetSpec],
    *,
    streaming: bool = False,
    token: str | bool | None = None,
    cache_dir: str | None = None,
) -> dict[str, tuple[AnyDataset, EvalSetSpec]]:
    """``{spec.name: (dataset, spec)}`` for :func:`evaluate_sets`."""
    return {s.name: (load_eval_dataset(s, streaming=streaming, token=token, cache_dir=cache_dir), s) for s in specs}


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
# WiSE-FT
# ----------------------------------------------------------------------------------------------------------------


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha}.")
    return alpha


def _check_compatible(theta0: Mapping[str, torch.Tensor], theta1: Mapping[str, torch.Tensor]) -> None:
    only0, only1 = sorted(set(theta0) - set(theta1)), sorted(set(theta1) - set(theta0))
    if only0 or only1:
        raise ValueError(f"The state dicts have different keys (only in theta0: {only0[:5]}, only in theta1: "
                         f"{only1[:5]}). WiSE-FT needs two models of the same architecture; for a PeftModel use "
                         "scale_lora() or wise_ft(), which handle the adapter.")
    for key, t1 in theta1.items():
        if tuple(theta0[key].shape) != tuple(t1.shape):
            raise ValueError(f"{key!r}: shape {tuple(theta0[key].shape)} vs {tuple(t1.shape)}; the models differ "
                             "(e.g. a resized head).")


def _lerp(t0: torch.Tensor, t1: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 - alpha) t0 + alpha t1 in t1's dtype/device; exact at alpha 0 and 1 (torch.lerp's endpoint rule).
    Non-float tensors (step counters, position ids) come from t1."""
    if not (t1.is_floating_point() and t0.is_floating_point()):
        return t1.detach().clone()
    t0 = t0.detach().to(device=t1.device)
    if t1.dtype in (torch.float32, torch.float64):
        return torch.lerp(t0.to(t1.dtype), t1.detach(), alpha)
    # Half precision: interpolate in fp32, round once.
    return torch.lerp(t0.float(), t1.detach().float(), alpha).to(t1.dtype)


def interpolate_state_dicts(
    theta0: Mapping[str, torch.Tensor],
    theta1: Mapping[str, torch.Tensor],
    alpha: float,
) -> dict[str, torch.Tensor]:
    """WiSE-FT weights ``(1 - alpha) * theta0 + alpha * theta1`` as a new dict of new tensors.

    ``theta0`` = pre-trained (zero-shot), ``theta1`` = fine-tuned. Float tensors are interpolated (exactly theta0 at
    alpha 0, theta1 at 1; alpha outside [0, 1] extrapolates); non-float buffers are copied from theta1. The inputs
    are not modified. Keys and shapes must match (clear error otherwise).
    """
    alpha = _check_alpha(alpha)
    _check_compatible(theta0, theta1)
    return {key: _lerp(theta0[key], t1, alpha) for key, t1 in theta1.items()}


def _lerp_into(model: nn.Module, theta0: Mapping[str, torch.Tensor], theta1: Mapping[str, torch.Tensor],
               alpha: float) -> None:
    """Write the interpolated weights into ``model``'s own tensors (no extra full copy of the model)."""
    with torch.no_grad():
        for key, target in model.state_dict(keep_vars=False).items():
            target.copy_(_lerp(theta0[key], theta1[key], alpha))


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import TrainableTokensWrapper

    layers: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            layers.append((name, module))
        elif isinstance(module, BaseTunerLayer):
            raise ValueError(f"{name}: {type(module).__name__} is not a LoRA layer. scale_lora / WiSE-FT on adapters "
                             "supports LoRA and DoRA; for other PEFT methods merge the adapter "
                             "(merge_and_unload) and call wise_ft(pretrained, merged, alpha).")
        elif isinstance(module, TrainableTokensWrapper):
            raise ValueError(f"{name}: trainable_token_indices adapters are not supported by scale_lora; merge the "
                             "adapter (merge_and_unload) and call wise_ft(pretrained, merged, alpha).")
    return layers


def _apply_wise_in_place(peft_model: nn.Module, alpha: float) -> Callable[[], None]:
    """Turn a LoRA/DoRA PeftModel into its WiSE-FT interpolation in place; return the exact undo.

    - Vanilla LoRA layers: ``scaling *= alpha`` (W0 + alpha * dW is exactly the weight-space interpolation).
    - Layers with a LoRA variant (DoRA, ...): their output is not linear in the scaling, so the adapter is merged and
      the merged weight interpolated: ``W = (1 - alpha) W0 + alpha W_merged`` (also the bias with ``lora_bias``).
    - ``modules_to_save`` copies (e.g. the trainable head): ``(1 - alpha) original + alpha trained``.
    """
    from peft.utils import ModulesToSaveWrapper

    alpha = _check_alpha(alpha)
    layers = _lora_layers(peft_model)
    wrappers = [(n, m) for n, m in peft_model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    if not layers and not wrappers:
        raise ValueError("No LoRA layers or modules_to_save found: is this a LoRA PeftModel?")
    undo: list[Callable[[], None]] = []

    def restore_all() -> None:
        with torch.inference_mode(False), torch.no_grad():
            for step in reversed(undo):
                step()
        undo.clear()

    try:
        # inference_mode(False): peft's merge assigns new tensors to weight.data; created under an enclosing
        # inference_mode they would become inference tensors and break later training steps.
        with torch.inference_mode(False), torch.no_grad():
            for name, layer in layers:
                if layer.merged:
                    raise ValueError(f"{name}: the adapter is merged into the base weights already; call "
                                     "peft_model.unmerge_adapter() first, or use wise_ft on the merged model.")
                active = [a for a in layer.active_adapters if a in layer.lora_A]
                if not active:
                    continue
                if not any(a in layer.lora_variant for a in active):
                    saved = {a: layer.scaling[a] for a in active}
                    for a in active:
                        layer.scaling[a] = saved[a] * alpha
                    undo.append(functools.partial(layer.scaling.update, saved))
                else:
                    undo.append(_merge_and_interpolate(layer, active, alpha))
            for _, wrapper in wrappers:
                for adapter in wrapper.active_adapters:
                    if adapter in wrapper.modules_to_save:
                        undo.append(_interpolate_module(wrapper.original_module, wrapper.modules_to_save[adapter],
                                                        alpha))
    except BaseException:
        restore_all()
        raise
    return restore_all


def _merge_and_interpolate(layer: nn.Module, active: list[str], alpha: float) -> Callable[[], None]:
    base = layer.get_base_layer()
    w0 = base.weight.detach().clone()
    b0 = base.bias.detach().clone() if getattr(base, "bias", None) is not None else None
    layer.merge(adapter_names=active)
    w1 = base.weight.detach().clone()
    b1 = base.bias.detach().clone() if b0 is not None else None
    base.weight.data.copy_(_lerp(w0, w1, alpha))
    if b0 is not None:
        base.bias.data.copy_(_lerp(b0, b1, alpha))

    def undo() -> None:
        # Put the merged weights back so peft's unmerge bookkeeping (caches, merged list) runs on what it expects,
        # then restore the original tensors bit-exactly (unmerge's subtraction is not exact in floating point).
        base.weight.data.copy_(w1)
        if b0 is not None:
            base.bias.data.copy_(b1)
        layer.unmerge()
        base.weight.data.copy_(w0)
        if b0 is not None:
            base.bias.data.copy_(b0)

    return undo


def _interpolate_module(original: nn.Module, trained: nn.Module, alpha: float) -> Callable[[], None]:
    saved = {k: v.detach().clone() for k, v in trained.state_dict().items()}
    theta0 = original.state_dict()
    _check_compatible(theta0, saved)
    for key, target in trained.state_dict().items():
        target.copy_(_lerp(theta0[key], saved[key], alpha))

    def undo() -> None:
        for key, target in trained.state_dict().items():
            target.copy_(saved[key])

    return undo


@contextlib.contextmanager
def scale_lora(peft_model: PeftModel, alpha: float) -> Iterator[PeftModel]:
    """Temporarily turn a LoRA/DoRA ``PeftModel`` into its WiSE-FT interpolation with the base model.

    Inside the block the model computes ``W0 + alpha * dW`` for every LoRA adapter (``scaling`` multiplied by
    ``alpha``), the merged-weight interpolation for DoRA layers, and ``(1 - alpha) original + alpha trained`` for
    ``modules_to_save`` (the head). alpha 0 gives the base model's outputs, 1 the adapter's. Everything is restored
    exactly on exit, also on error::

        with scale_lora(model, 0.5):
            acc = evaluate_accuracy(model, val_ds, eval_tf)
    """
    restore = _apply_wise_in_place(peft_model, alpha)
    try:
        yield peft_model
    finally:
        restore()


def _interpolation_start(
    pretrained_model: nn.Module | None, finetuned_model: nn.Module, caller: str
) -> tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor], nn.Module]:
    """(theta_0, theta_1, a working copy of the fine-tuned model) for full-model weight interpolation."""
    if pretrained_model is None:
        raise ValueError(f"{caller} needs the pre-trained model for a fully fine-tuned model.")
    theta0 = pretrained_model.state_dict()
    theta1 = finetuned_model.state_dict()
    _check_compatible(theta0, theta1)
    return theta0, theta1, copy.deepcopy(finetuned_model)


def wise_ft(pretrained_model: nn.Module | None, finetuned_model: nn.Module, alpha: float) -> nn.Module:
    """A new model with WiSE-FT weights ``(1 - alpha) * pretrained + alpha * finetuned``; inputs untouched.

    Full fine-tuning: deep-copies ``finetuned_model`` and writes the interpolated weights into the copy (all
    weights, the head included; non-float buffers from the fine-tuned model).
    LoRA/DoRA ``PeftModel``: the pre-trained weights are the adapter's own base weights, so ``pretrained_model`` is
    not needed (pass None); returns a plain merged model (``merge_and_unload``) with the adapter delta scaled by alpha
    (see :func:`scale_lora`).
    """
    alpha = _check_alpha(alpha)
    if isinstance(finetuned_model, PeftModel):
        if pretrained_model is not None and pretrained_model is not finetuned_model.get_base_model():
            logger.warning("wise_ft: for a PeftModel the base weights inside it are the pre-trained weights; the "
                           "pretrained_model argument is ignored.")
        model = copy.deepcopy(finetuned_model)
        _apply_wise_in_place(model, alpha)  # the copy is consumed: no undo
        with warnings.catch_warnings():
            # DoRA layers are merged already (interpolated); peft warns that there is nothing left to merge.
            warnings.filterwarnings("ignore", message=".*already merged.*")
            return model.merge_and_unload()
    theta0, theta1, model = _interpolation_start(pretrained_model, finetuned_model, "wise_ft")
    _lerp_into(model, theta0, theta1, alpha)
    return model


@dataclass
class WiseFTResult:
    """A WiSE-FT sweep: ``results[i]`` are the metrics at ``alphas[i]``; ``best_alpha`` maximises ``select_on``."""

    alphas: list[float]
    results: list[dict[str, float]]
    best_alpha: float
    select_on: str

    @property
    def best_results(self) -> dict[str, float]:
        """The metrics at ``best_alpha``."""
        return self.results[self.alphas.index(self.best_alpha)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def wise_ft_sweep(
    pretrained_model: nn.Module | None,
    finetuned_model: nn.Module,
    alphas: Sequence[float],
    evaluate_fn: Callable[[nn.Module], Mapping[str, float]],
    select_on: str,
    known: Mapping[float, Mapping[str, float]] | None = None,
) -> WiseFTResult:
    """Evaluate WiSE-FT at each alpha and pick the alpha with the highest ``select_on`` metric.

    ``evaluate_fn(model) -> {name: metric}`` is called once per alpha on the interpolated model, except for the
    alphas in ``known`` ({alpha: metrics} already measured, e.g. 0 = the pre-trained model, 1 = the fine-tuned one).
    ``select_on`` must be an in-distribution *validation* metric (e.g. a held-out ImageNet-train split or ImageNet
    val): choosing alpha on a distribution shift would leak the test distribution into the model and overstate
    robustness. Ties go to the first alpha in ``alphas``; NaN never wins.

    Full fine-tuning uses one working copy of the model (weights rewritten per alpha); a LoRA/DoRA ``PeftModel``
    is evaluated in place inside :func:`scale_lora` (restored afterwards).
    """
    alpha_list = [_check_alpha(a) for a in alphas]
    if not alpha_list:
        raise ValueError("wise_ft_sweep needs at least one alpha.")
    results: list[dict[str, float]] = []

    def record(alpha: float, metrics: Mapping[str, float]) -> None:
        if select_on not in metrics:
            raise ValueError(f"evaluate_fn returned {sorted(metrics)} without the selection metric "
                             f"select_on={select_on!r}.")
        results.append({k: float(v) for k, v in metrics.items()})
        logger.info("WiSE-FT alpha=%.3f: %s", alpha, results[-1])

    known = dict(known or {})
    if isinstance(finetuned_model, PeftModel):
        for alpha in alpha_list:
            if alpha in known:  # e.g. alpha 1 = the fine-tuned model, already evaluated
                record(alpha, known[alpha])
                continue
            with scale_lora(finetuned_model, alpha):
                record(alpha, evaluate_fn(finetuned_model))
    else:
        theta0, theta1, work = _interpolation_start(pretrained_model, finetuned_model, "wise_ft_sweep")
        for alpha in alpha_list:
            if alpha in known:
                record(alpha, known[alpha])
                continue
            _lerp_into(work, theta0, theta1, alpha)
            record(alpha, evaluate_fn(work))
        del work

    scores = [r[select_on] for r in results]
    best = max(range(len(scores)), key=lambda i: (-math.inf if math.isnan(scores[i]) else scores[i], -i))
    return WiseFTResult(alphas=alpha_list, results=results, best_alpha=alpha_list[best], select_on=select_on)


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
