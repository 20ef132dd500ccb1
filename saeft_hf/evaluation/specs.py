"""Which data an evaluation runs on: shift-set specs (`EvalSetSpec`), the ImageNet defaults, loading them."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import datasets

from ..data import (
    AnyDataset,
    load_image_dataset,
    relabel_by_name,
)
from ..imagenet_classes import (
    imagenet_a_indices,
    imagenet_classnames,
    imagenet_r_indices,
    imagenet_wnids,
    objectnet_class_groups,
    objectnet_folders,
)

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

    ``role``: ``"id"`` (the reported in-distribution set), ``"shift"`` (counted in the shift averages),
    ``"other"`` (reported, in no average) or ``"holdout"`` (held-out in-distribution data that chooses WiSE-FT's
    alpha; never reported).
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
    role: Literal["id", "shift", "other", "holdout"] = "shift"

    def __post_init__(self) -> None:
        if self.kind not in ("full", "subset", "grouped"):
            raise ValueError(f"EvalSetSpec {self.name!r}: kind must be 'full', 'subset' or 'grouped', got "
                             f"{self.kind!r}.")
        if self.role not in ("id", "shift", "other", "holdout"):
            raise ValueError(f"EvalSetSpec {self.name!r}: role must be 'id', 'shift', 'other' or 'holdout', got "
                             f"{self.role!r}.")
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


def _head_positions(names: Sequence[str], head_labels: Sequence[str]) -> dict[str, int] | None:
    """Folder name -> position in the head's classes (`id2label` order: the recipe's readable class names), by the
    name itself or, for an ImageNet wnid, by its curated name; None when some folder is not one of the head's, or
    when the head's names are ambiguous (a repeated name)."""
    if len(set(head_labels)) != len(head_labels):
        return None
    position = {label: i for i, label in enumerate(head_labels)}
    curated = dict(zip(imagenet_wnids(), imagenet_classnames()))
    mapping = {}
    for name in names:
        index = position.get(name, position.get(curated.get(name, ""), None))
        if index is None:
            return None
        mapping[name] = index
    return mapping


def _align_labels(ds: AnyDataset, spec: EvalSetSpec, head_labels: Sequence[str] | None = None) -> AnyDataset:
    """Map ClassLabel names (folder names) to the evaluation label space of ``spec``; see :class:`EvalSetSpec`.

    ``head_labels``: the evaluated head's classes in label order (its ``id2label``). A ``full`` set whose folders
    are all among them (by name, or an ImageNet wnid by its curated name) is labelled by their positions, so class
    folders score correctly against any head, not only a 1000-way ImageNet one.
    """
    feature = (ds.features or {}).get("label")
    if not isinstance(feature, datasets.ClassLabel):
        return ds  # integer labels (webdataset cls, relabelled numeric folders): used as given
    names = list(feature.names)
    folders = spec.folders()
    if head_labels and spec.kind == "full" and folders is None:
        mapping = _head_positions(names, head_labels)
        if mapping is not None:
            return relabel_by_name(ds, mapping)
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
    head_labels: Sequence[str] | None = None,
) -> AnyDataset:
    """Load the raw (``image`` undecoded, ``label``) dataset of ``spec`` with labels in its evaluation space
    (``head_labels``: the evaluated head's class names in label order; see ``_align_labels``)."""
    common: dict[str, Any] = {
        "streaming": streaming, "image_column": spec.image_column, "label_column": spec.label_column,
        "numeric_folder_labels": spec.numeric_folder_labels, "token": token, "cache_dir": cache_dir,
    }
    if spec.dataset_name is None and spec.data_files is None:
        ds = load_image_dataset(validation_dir=spec.data_dir, split="validation", **common)
    else:
        ds = load_image_dataset(dataset_name=spec.dataset_name, dataset_config_name=spec.dataset_config_name,
                                data_dir=spec.data_dir, data_files=spec.data_files, split=spec.split, **common)
    return _align_labels(ds, spec, head_labels)


def load_eval_sets(
    specs: Sequence[EvalSetSpec],
    *,
    streaming: bool = False,
    token: str | bool | None = None,
    cache_dir: str | None = None,
    head_labels: Sequence[str] | None = None,
) -> dict[str, tuple[AnyDataset, EvalSetSpec]]:
    """``{spec.name: (dataset, spec)}`` for :func:`evaluate_sets` (``head_labels``: see :func:`load_eval_dataset`)."""
    return {s.name: (load_eval_dataset(s, streaming=streaming, token=token, cache_dir=cache_dir,
                                       head_labels=head_labels), s) for s in specs}
