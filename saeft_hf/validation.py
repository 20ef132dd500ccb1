"""Checks that run before anything expensive: configuration, data, evaluation specs, the model's shape and the SAE.

Every problem a run can meet only after hours of training (an eval set that reads logit 999 of a 10-class head, a
WiSE-FT alpha that is NaN, an SAE that is all zeros) or that would make it silently wrong (a NaN lambda switching the
penalty off, validation folders labelled in another class order, 1000 ImageNet prompts for MNIST digits) is found
here, before any model is built, and reported as an `SAEFTConfigError` that names the problem and the fix.

The functions are pure: they read the parsed arguments, the datasets' features (and, for map-style datasets, their
label column), the specs and the SAE; never argv or the environment. `validate_run` runs them all; the recipes call
the parts that can run even earlier (before datasets are loaded).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any

import datasets
import torch

from .imagenet_classes import imagenet_classnames
from .modeling import parse_representation, parse_representations
from .sae import ACTIVATIONS, SAELoadError, SparseAutoencoder
from .sae_set import match_sae_set

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm",
                              ".jfif", ".avif", ".heic", ".ico"})
IMAGENET_NUM_CLASSES = 1000


class SAEFTConfigError(ValueError):
    """A configuration, data, evaluation-set or SAE problem found before training; the message names the fix."""


# ----------------------------------------------------------------------------------------------------------------
# Numbers
# ----------------------------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_loss_weight(name: str, value: Any) -> None:
    """A loss weight (lambda_reg, lambda_add, lambda_remove, mu) must be a finite number >= 0."""
    if not _is_number(value):
        raise SAEFTConfigError(f"{name} must be a number >= 0, got {value!r}.")
    if math.isnan(value) or math.isinf(value):
        # `nan > 0` is False: a NaN weight would switch its term off without a word.
        raise SAEFTConfigError(
            f"{name} must be a finite number >= 0, got {value}: a NaN weight silently switches the term off and an "
            f"infinite one makes the loss infinite. Use {name}=0 to switch the term off."
        )
    if value < 0:
        raise SAEFTConfigError(
            f"{name} must be >= 0, got {value}: a negative weight would reward the drift it is meant to "
            f"limit. Use {name}=0 to switch the term off."
        )


# ----------------------------------------------------------------------------------------------------------------
# YAML configuration files
# ----------------------------------------------------------------------------------------------------------------


def check_config_mapping(values: Any, source: str) -> dict[str, Any]:
    """A `--config` YAML file must be a mapping `option: value` (not a list, a bare word or a number)."""
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        shown = repr(values) if len(repr(values)) < 80 else f"a {type(values).__name__}"
        raise SAEFTConfigError(
            f"{source} must be a YAML mapping of option: value (e.g. `learning_rate: 1.0e-5`), but it holds "
            f"{shown}. Write one `option: value` per line; run the recipe with --help for the options."
        )
    bad = [k for k in values if not isinstance(k, str)]
    if bad:
        raise SAEFTConfigError(f"{source}: option names must be strings, got {bad!r}.")
    return dict(values)


def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", None) or str(kind)


def _coerce_scalar(key: str, value: Any, kind: Any, choices: Sequence[Any] | None, source: str) -> Any:
    def fail(detail: str, example: str) -> SAEFTConfigError:
        return SAEFTConfigError(f"{source}: `{key}: {value!r}` {detail}. Write e.g. `{key}: {example}`.")

    if value is None:
        return None
    if kind is int:
        if _is_number(value) and float(value).is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise fail("is not an integer", "3")
    if kind is float:
        if _is_number(value):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads `1e-5` (no dot) as a string: convert it rather than fail.
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise fail("is not a number", "1.0e-5")
    if getattr(kind, "__name__", "") == "string_to_bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str):
            try:
                return kind(value)
            except (argparse.ArgumentTypeError, ValueError):
                pass
        raise fail("is not a boolean", "true")
    if kind is str and _is_number(value):
        return str(value)
    if choices and isinstance(value, str) and value not in {str(c) for c in choices}:
        raise fail(f"is not one of {[str(c) for c in choices]}", str(choices[0]))
    return value


def coerce_config_values(values: Mapping[str, Any], actions: Mapping[str, argparse.Action],
                         source: str) -> dict[str, Any]:
    """Convert YAML values to the types of the options they set, or raise naming the option.

    `actions` maps option names to their argparse actions (`HfArgumentParser` builds them from the dataclasses).
    Lists: a scalar becomes a one-element list (`lora_target_modules: q_proj` means `[q_proj]`, not 6 letters).
    Numbers: strings that read as numbers are converted (`1e-5` is a string in YAML 1.1). Dicts and lists given
    to options that accept them (e.g. `fsdp_config`, `report_to`) pass unchanged.
    """
    out: dict[str, Any] = {}
    for key, value in values.items():
        action = actions.get(key)
        if action is None or value is None:
            out[key] = value
            continue
        if action.nargs in ("+", "*"):
            if isinstance(value, Mapping):
                raise SAEFTConfigError(f"{source}: `{key}` takes a list (e.g. `{key}: [a, b]`), got a mapping.")
            items = list(value) if isinstance(value, (list, tuple)) else [value]
            out[key] = [_coerce_scalar(key, item, action.type, action.choices, source) for item in items]
        elif isinstance(value, (list, tuple, Mapping)):
            if action.type in (int, float) or getattr(action.type, "__name__", "") == "string_to_bool":
                raise SAEFTConfigError(f"{source}: `{key}` takes one {_type_name(action.type)} value, got "
                                       f"{type(value).__name__} {value!r}.")
            out[key] = value  # str-typed options of TrainingArguments that also take dicts/lists (fsdp_config, ...)
        else:
            out[key] = _coerce_scalar(key, value, action.type, action.choices, source)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Training and model arguments
# ----------------------------------------------------------------------------------------------------------------


def check_training_args(args: Any, *, streaming: bool = False) -> None:
    """The `SAEFTConfig` fields whose bad values would train nothing, or train silently wrong."""
    for name in ("lambda_reg", "lambda_add", "lambda_remove", "mu"):
        check_loss_weight(name, getattr(args, name))
    lr = args.learning_rate
    if not _is_number(lr) or not math.isfinite(lr) or lr <= 0:
        raise SAEFTConfigError(f"learning_rate must be a finite number > 0, got {lr!r}: with it the weights would "
                               "not move (0) or become NaN. The paper uses 1e-5.")
    if not math.isfinite(args.weight_decay) or args.weight_decay < 0:
        raise SAEFTConfigError(f"weight_decay must be a finite number >= 0, got {args.weight_decay!r}.")
    if args.max_grad_norm is not None and (not math.isfinite(args.max_grad_norm) or args.max_grad_norm < 0):
        raise SAEFTConfigError(f"max_grad_norm must be a finite number >= 0 (0 turns clipping off), got "
                               f"{args.max_grad_norm!r}.")
    if args.max_steps == 0:
        raise SAEFTConfigError("max_steps=0 trains no step: the untouched model would be saved and evaluated as if "
                               "fine-tuned. Give max_steps > 0, or leave it at -1 and set num_train_epochs.")
    if args.max_steps < 0:
        if streaming and not getattr(args, "num_train_examples", None):
            raise SAEFTConfigError("A streaming training set has no length, so epochs cannot be turned into steps: "
                                   "give --max_steps.")
        if not math.isfinite(args.num_train_epochs) or args.num_train_epochs <= 0:
            raise SAEFTConfigError(
                f"num_train_epochs={args.num_train_epochs} trains no step: the untouched model would be saved and "
                "evaluated as if fine-tuned. Give num_train_epochs > 0 (or max_steps > 0)."
            )
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        value = getattr(args, name)
        if not isinstance(value, int) or value < 1:
            raise SAEFTConfigError(f"{name} must be an integer >= 1, got {value!r}.")
    targets = args.lora_target_modules
    if isinstance(targets, str) or not isinstance(targets, Sequence) or not all(isinstance(t, str) for t in targets):
        raise SAEFTConfigError(
            f"lora_target_modules must be a list of module names, got {targets!r} (a single string would be read "
            "letter by letter). Write e.g. lora_target_modules=['q_proj', 'v_proj'] (YAML: [q_proj, v_proj])."
        )
    if args.use_lora and not 0 <= args.lora_dropout < 1:
        raise SAEFTConfigError(f"lora_dropout must lie in [0, 1), got {args.lora_dropout!r}.")


def check_model_args(model_args: Any) -> None:
    """`ModelArguments`: the representation spec(s) and the settings of an SAE the run would train."""
    try:
        parse_representations(model_args.representation)
    except ValueError as err:
        raise SAEFTConfigError(str(err)) from err
    positive = ("sae_d_sae_multiplier", "sae_k", "sae_epochs", "sae_batch_size", "embedding_batch_size")
    for name in positive:
        value = getattr(model_args, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SAEFTConfigError(f"{name} must be an integer >= 1, got {value!r}.")
    for name in ("sae_max_samples", "sae_aux_k"):
        value = getattr(model_args, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise SAEFTConfigError(f"{name} must be None or an integer >= 1, got {value!r}: the SAE needs images to "
                                   "embed and AuxK at least one latent.")
    if model_args.sae_activation not in ACTIVATIONS:
        raise SAEFTConfigError(f"Unknown sae_activation {model_args.sae_activation!r}; choose one of "
                               f"{', '.join(ACTIVATIONS)}.")
    lr = model_args.sae_lr
    if not _is_number(lr) or not math.isfinite(lr) or lr <= 0:
        raise SAEFTConfigError(f"sae_lr must be a finite number > 0, got {lr!r} (the paper: 1e-3).")


def model_shape(config: Any) -> dict[str, int]:
    """Depth and widths of a `CLIPConfig` or `SAEFTCLIPConfig`: num_hidden_layers, hidden_size, projection_dim."""
    vision = config.vision_config
    return {"num_hidden_layers": int(vision.num_hidden_layers), "hidden_size": int(vision.hidden_size),
            "projection_dim": int(config.projection_dim)}


def representation_width(representation: str, shape: Mapping[str, int]) -> int:
    """Width of `representation` for a model of this shape (see `model_shape`), after checking its layer exists."""
    kind, layer, _ = parse_representation(representation)
    if kind == "image_embeds":
        return shape["projection_dim"]
    if kind == "hidden_states":
        n = shape["num_hidden_layers"]
        if not -(n + 1) <= layer <= n:
            raise SAEFTConfigError(
                f"representation={representation!r} reads hidden state {layer}, but the vision tower has {n} layers "
                f"(hidden_states 0..{n}: 0 is the embedding output, i the output of block i). Use a layer in "
                f"0..{n} (or -1 for the last)."
            )
    return shape["hidden_size"]


def representation_widths(representation: str | Sequence[str], shape: Mapping[str, int]) -> dict[str, int]:
    """`{spec: width}` for one or several (comma-separated) representations, each layer checked to exist."""
    try:
        specs = parse_representations(representation)
    except ValueError as err:
        raise SAEFTConfigError(str(err)) from err
    return {spec: representation_width(spec, shape) for spec in specs}


def check_wise_ft_alphas(alphas: Any) -> list[float] | None:
    """WiSE-FT alphas: None, or a list of finite numbers. Returns them as floats."""
    if alphas is None:
        return None
    if isinstance(alphas, (str, bytes, Mapping)) or not isinstance(alphas, Sequence):
        raise SAEFTConfigError(f"wise_ft_alphas must be a list of numbers, got {alphas!r}. Write e.g. "
                               "wise_ft_alphas=[0.5] (YAML: [0.25, 0.5, 0.75]; CLI: --wise_ft_alphas 0.25 0.5 0.75).")
    bad = [a for a in alphas if not _is_number(a) or not math.isfinite(a)]
    if bad:
        raise SAEFTConfigError(f"wise_ft_alphas must be finite numbers (0 = the pre-trained model, 1 = the "
                               f"fine-tuned one), got {bad}.")
    return [float(a) for a in alphas]


def check_files(**paths: str | None) -> None:
    """Every given file path exists (class-names, templates and eval-set files are read only later)."""
    for name, path in paths.items():
        if path is not None and not os.path.isfile(path):
            what = "a directory, not a file" if os.path.isdir(path) else "not found"
            raise SAEFTConfigError(f"{name}={path!r} is {what}. Check the path.")


def check_templates(templates: Sequence[str]) -> None:
    """Zero-shot prompt templates: at least one, each with a `{}` for the class name."""
    if not templates:
        raise SAEFTConfigError("No prompt templates: give at least one, e.g. 'a photo of a {}.'.")
    bad = [t for t in templates if not isinstance(t, str) or "{}" not in t]
    if bad:
        raise SAEFTConfigError(f"Every prompt template needs a '{{}}' placeholder for the class name; these do not: "
                               f"{bad[:3]}. Write e.g. 'a photo of a {{}}.'.")


# ----------------------------------------------------------------------------------------------------------------
# Image folders and labels
# ----------------------------------------------------------------------------------------------------------------


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def check_class_folders(root: str | os.PathLike[str], what: str = "train_dir") -> list[str]:
    """A local class-folder tree must be `root/<class>/<image>` with at least two class folders.

    Refuses the layouts that `datasets`' imagefolder would silently read wrong: images directly under the root (a
    flat folder: the root's name becomes a class), class folders whose images sit one level deeper
    (`root/<class>/images/<image>`: every image gets the class `images`), and a single class. Returns the class
    folder names. Reads directory entries only (no image is opened).
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise SAEFTConfigError(f"{what}={root!r} is not a directory. Point it at the root whose sub-folders are the "
                               "classes (root/<class>/<image>).")
    with os.scandir(root) as it:
        entries = [e for e in it if not e.name.startswith(".")]
    loose = sorted(e.name for e in entries if e.is_file() and _is_image(e.name))
    classes = sorted(e.name for e in entries if e.is_dir())
    if loose:
        raise SAEFTConfigError(
            f"{what}={root!r} has {len(loose)} image(s) directly in it (e.g. {loose[0]!r}): a flat folder has no "
            "labels. Put each image in a folder named after its class: root/<class>/<image> (ImageNet's validation "
            "images come flat and must be sorted into their wnid folders first)."
        )
    nested, with_images = [], []
    for name in classes:
        with os.scandir(os.path.join(root, name)) as it:
            sub = [e for e in it if not e.name.startswith(".")]
        below = [e.name for e in sub if e.is_dir()]
        if below:
            nested.append(f"{name}/{below[0]}")
        if any(e.is_file() and _is_image(e.name) for e in sub):
            with_images.append(name)
    if nested:
        raise SAEFTConfigError(
            f"{what}={root!r}: class folder(s) hold sub-folders (e.g. {nested[0]!r}). Images must sit directly in "
            "their class folder (root/<class>/<image>): datasets would label each image by its innermost folder "
            f"(here {nested[0].split('/')[-1]!r}). Move the images up one level."
        )
    if len(with_images) == 1:  # none at all: the loader's "no images were found" says it better
        raise SAEFTConfigError(
            f"{what}={root!r} has images in 1 class folder {with_images}: a classifier needs at least two classes "
            "(with one, the loss is always 0 and nothing is learned). The layout is root/<class>/<image>, one "
            "sub-folder per class."
        )
    return with_images
    return classes


def _label_feature(ds: Any) -> Any:
    features = getattr(ds, "features", None)
    return features.get("label") if features is not None and hasattr(features, "get") else None


def class_names_of(ds: Any) -> list[str] | None:
    """The dataset's class names (a `ClassLabel` label column), or None."""
    feature = _label_feature(ds)
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def label_values(ds: Any) -> torch.Tensor | None:
    """All labels of a map-style dataset [N] (one read of the label column), or None for a stream."""
    if isinstance(ds, datasets.IterableDataset) or not isinstance(ds, datasets.Dataset):
        return None
    if "label" not in ds.column_names or len(ds) == 0:
        return None
    column = ds.select_columns(["label"]).with_format("numpy")["label"]
    return torch.as_tensor(column[:] if not hasattr(column, "dtype") else column)


def check_label_column(ds: Any, what: str) -> None:
    """Labels must be integer class ids >= 0: not floats (they would be truncated), not strings."""
    feature = _label_feature(ds)
    if isinstance(feature, datasets.Value):
        dtype = feature.dtype
        if dtype.startswith("float") or dtype.startswith("double") or dtype == "bool":
            raise SAEFTConfigError(
                f"{what}'s labels are {dtype}; they must be integer class ids (a float label would be truncated, "
                "1.7 -> 1). Cast the label column to int64 (or a ClassLabel with the class names)."
            )
        if "string" in dtype:
            raise SAEFTConfigError(
                f"{what}'s labels are strings (class names); saeft-hf needs integer class ids. Convert them with "
                "`ds = ds.class_encode_column('label')` (the same names, in the same order, for every split), or "
                "lay the images out as class folders (root/<class>/<image>)."
            )
    values = label_values(ds)
    if values is not None:
        if values.is_floating_point() or values.dtype == torch.bool:
            raise SAEFTConfigError(f"{what}'s labels are {values.dtype}; they must be integer class ids.")
        if int(values.min()) < 0:
            raise SAEFTConfigError(
                f"{what} has label {int(values.min())} (< 0): negative labels usually mark unlabelled images (e.g. "
                "a Hub test split). Use a labelled split."
            )


def distinct_labels(ds: Any) -> list[int] | None:
    """The sorted distinct integer labels of a map-style dataset, or None (a stream)."""
    values = label_values(ds)
    return None if values is None else sorted(int(v) for v in torch.unique(values))


def imagenet_classnames_for_unnamed_labels(ds: Any, dataset_name: str | None = None) -> list[str]:
    """Class names for a dataset whose labels are plain integers: ImageNet's only when the labels are ImageNet's.

    Map-style: the labels must be exactly 0..999. A stream cannot be counted, so a stream counts as ImageNet only when
    `dataset_name` says so. Anything else (MNIST-style numeric folders, an int-labelled parquet) raises: prompts with
    the wrong class names would give a meaningless zero-shot head.
    """
    labels = distinct_labels(ds)
    if labels is not None and labels and labels[0] >= 0 and labels[-1] < IMAGENET_NUM_CLASSES \
            and len(labels) == IMAGENET_NUM_CLASSES:
        return imagenet_classnames()
    if labels is None and dataset_name and "imagenet" in dataset_name.lower():
        logger.info("%s: integer labels without names; using the 1000 ImageNet class names.", dataset_name)
        return imagenet_classnames()
    seen = (f"{len(labels)} distinct labels ({labels[0]}..{labels[-1]})" if labels
            else "a stream or an empty set, whose labels cannot be counted")
    raise SAEFTConfigError(
        f"The dataset's labels are plain integers without class names ({seen}), so the zero-shot prompts cannot be "
        "written (the 1000 ImageNet names are used only for ImageNet's 0..999 labels). Pass --classnames_file with "
        "one class name per line, in label order (label 0 first)."
    )


def align_validation_classes(train: Any, validation: Any) -> Any:
    """Make the validation labels mean the training labels, by class name; refuse classes the head lacks.

    Both with class names (`ClassLabel`, e.g. class folders): equal names pass unchanged; a validation set with a
    subset of the training classes (or another order) is relabelled by name; a class that training lacks raises,
    naming the differing classes. Otherwise returned unchanged (integer labels are checked against the head by
    `check_labels_fit_head`).
    """
    if validation is None:
        return None
    train_names, val_names = class_names_of(train), class_names_of(validation)
    if train_names is None or val_names is None or train_names == val_names:
        return validation
    only_val = [n for n in val_names if n not in set(train_names)]
    if only_val:
        only_train = [n for n in train_names if n not in set(val_names)]
        raise SAEFTConfigError(
            f"The validation classes differ from the training classes: only in validation {only_val[:10]}"
            f"{' ...' if len(only_val) > 10 else ''}, only in training {only_train[:10]}"
            f"{' ...' if len(only_train) > 10 else ''}. Labels are class positions, so validation would be "
            "mislabelled. Give both the same class folders (root/<class>/<image>)."
        )
    from .data import relabel_by_name  # data imports nothing from here; local to keep the module's imports light

    logger.info("Validation has %d of the %d training classes; relabelling it by class name.", len(val_names),
                len(train_names))
    return relabel_by_name(validation, {name: i for i, name in enumerate(train_names)})


def check_labels_fit_head(ds: Any, num_labels: int, what: str) -> None:
    """Integer labels of a map-style set lie in [0, num_labels) (a stream is checked batch by batch by the collator)."""
    check_label_column(ds, what)
    names = class_names_of(ds)
    if names is not None and len(names) > num_labels:
        raise SAEFTConfigError(f"{what} has {len(names)} classes but the head has {num_labels}: give one class name "
                               "per label (--classnames_file) or use matching data.")
    values = label_values(ds)
    if values is not None and int(values.max()) >= num_labels:
        raise SAEFTConfigError(
            f"{what} has label {int(values.max())} but the head has {num_labels} classes (labels 0..{num_labels - 1})."
            " Give one class name per label, in label order (--classnames_file), or check the label column."
        )


def check_classnames(classnames: Sequence[str]) -> None:
    """At least two classes, each named by a non-empty string."""
    if len(classnames) < 2:
        raise SAEFTConfigError(
            f"The head would have {len(classnames)} class(es) {list(classnames)}: a classifier needs at least two "
            "(with one, the loss is always 0 and nothing is learned). Check the data's layout (root/<class>/<image>) "
            "or the class-names file."
        )
    bad = [i for i, n in enumerate(classnames) if not isinstance(n, str) or not n.strip()]
    if bad:
        raise SAEFTConfigError(f"Class names must be non-empty strings; labels {bad[:5]} have none.")


# ----------------------------------------------------------------------------------------------------------------
# Evaluation-set specs
# ----------------------------------------------------------------------------------------------------------------


def _check_index_list(where: str, field_name: str, values: Any) -> None:
    if isinstance(values, str):
        return  # a named list, resolved (and validated) by EvalSetSpec
    if not isinstance(values, Sequence):
        raise SAEFTConfigError(f"{where}: {field_name} must be a list of class indices (or a named list), got "
                               f"{values!r}.")
    bad = [v for v in values if not isinstance(v, int) or isinstance(v, bool)]
    if bad:
        raise SAEFTConfigError(f"{where}: {field_name} must hold integer class indices, got {bad[:5]} (a float "
                               "would be truncated to another class).")
    negative = [v for v in values if v < 0]
    if negative:
        raise SAEFTConfigError(f"{where}: {field_name} holds negative class indices {negative[:5]} (-1 would read "
                               "the last logit). Use indices 0..num_labels-1.")


def check_eval_spec_entries(entries: Any, source: str = "the eval-set config") -> None:
    """Raw eval-set entries (YAML mappings, before `EvalSetSpec` is built): names and index types.

    Run before `EvalSetSpec(...)`, whose own checks would already have truncated float indices.
    """
    if isinstance(entries, Mapping) and "eval_sets" in entries:
        entries = entries["eval_sets"]
    if not isinstance(entries, Sequence) or isinstance(entries, (str, bytes)):
        raise SAEFTConfigError(f"{source} must hold a list of eval sets (`eval_sets: [...]`), got "
                               f"{type(entries).__name__}.")
    for position, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            if hasattr(entry, "name") and hasattr(entry, "class_indices"):
                continue  # an EvalSetSpec already: see check_eval_specs
            raise SAEFTConfigError(f"{source}: eval set #{position} must be a mapping of fields, got {entry!r}.")
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise SAEFTConfigError(f"{source}: eval set #{position} ({dict(entry)!r}) has no name: give each set a "
                                   "`name:` (it keys the results).")
        where = f"{source}: eval set {name!r}"
        if entry.get("class_indices") is not None:
            _check_index_list(where, "class_indices", entry["class_indices"])
        groups = entry.get("class_groups")
        if groups is not None and not isinstance(groups, str):
            if not isinstance(groups, Sequence):
                raise SAEFTConfigError(f"{where}: class_groups must be a list of lists of class indices.")
            for g, group in enumerate(groups):
                if isinstance(group, str) or not isinstance(group, Sequence) or not group:
                    raise SAEFTConfigError(f"{where}: class_groups[{g}] is {group!r}; every group must be a non-empty "
                                           "list of class indices (its logit is the max over them).")
                _check_index_list(where, f"class_groups[{g}]", group)


def check_eval_specs(specs: Sequence[Any], num_labels: int) -> None:
    """`EvalSetSpec`s against the head: names, index types, and every class index inside [0, num_labels)."""
    check_eval_spec_entries([s if isinstance(s, Mapping) else s.to_dict() for s in specs], "the eval sets")
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SAEFTConfigError(f"Duplicate eval-set names {duplicates}; each set needs its own name.")
    for spec in specs:
        where = f"Eval set {spec.name!r}"
        if spec.kind == "full":
            continue
        try:
            indices = spec.indices() if spec.kind == "subset" else [i for g in spec.groups() or [] for i in g]
        except ValueError as err:
            raise SAEFTConfigError(f"{where}: {err}") from err
        if spec.kind == "grouped" and any(not g for g in spec.groups() or []):
            raise SAEFTConfigError(f"{where}: class_groups has an empty group; every class needs >= 1 logit.")
        too_big = sorted({i for i in indices if i >= num_labels})
        if too_big:
            imagenet = (" Subset/grouped ImageNet sets (imagenet_r, imagenet_a, objectnet) need a 1000-class ImageNet "
                        "head." if num_labels != IMAGENET_NUM_CLASSES else "")
            raise SAEFTConfigError(
                f"{where} ({spec.kind}) reads class indices {too_big[:5]} but the head has {num_labels} classes "
                f"(0..{num_labels - 1}).{imagenet} Fix the indices or drop the set."
            )


def check_eval_sets(eval_sets: Mapping[str, tuple[Any, Any]] | None, num_labels: int, *, id_name: str,
                    wise_ft_alphas: Sequence[float] | None) -> None:
    """`run_saeft`'s `eval_sets`: specs against the head, labels of map-style full sets, the WiSE-FT selection set."""
    eval_sets = eval_sets or {}
    bad_names = [n for n in eval_sets if not isinstance(n, str) or not n.strip()]
    if bad_names:
        raise SAEFTConfigError(f"Eval sets need non-empty names; got {bad_names!r}.")
    specs = [spec for _, spec in eval_sets.values() if spec is not None]
    check_eval_specs(specs, num_labels)
    for name, (ds, spec) in eval_sets.items():
        if spec is not None and spec.name != name:
            raise SAEFTConfigError(f"Eval set key {name!r} differs from its spec's name {spec.name!r}.")
        if spec is None or spec.kind == "full":
            check_labels_fit_head(ds, num_labels, f"Eval set {name!r}")
    if wise_ft_alphas:
        if not eval_sets:
            raise SAEFTConfigError("wise_ft_alphas needs evaluation sets to pick the alpha on: give a validation set "
                                   "(--validation_dir / --dataset_name) or --eval_sets_config, or drop the alphas.")
        if id_name not in eval_sets:
            raise SAEFTConfigError(f"WiSE-FT picks its alpha on the ID set {id_name!r}, which is not among the eval "
                                   f"sets {sorted(eval_sets)}. Add it (role: id) or name the ID set.")


# ----------------------------------------------------------------------------------------------------------------
# The model and its tokenizer
# ----------------------------------------------------------------------------------------------------------------


def check_clip_config(config: Any, source: str) -> dict[str, int]:
    """A CLIP checkpoint's config (`CLIPConfig`): returns its `model_shape`."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ("clip", "saeft_clip") or getattr(config, "vision_config", None) is None:
        raise SAEFTConfigError(f"{source} is a {model_type!r} checkpoint, not CLIP: SAE-FT needs a CLIPModel "
                               "checkpoint (vision and text towers), e.g. openai/clip-vit-base-patch16.")
    return model_shape(config)


def check_tokenizer(tokenizer: Any, classnames: Sequence[str], source: str) -> None:
    """The tokenizer tells the class names apart (a checkpoint without tokenizer files maps every word to UNK)."""
    distinct = list(dict.fromkeys(classnames))
    if len(distinct) < 2:
        return
    tokens = [list(tokenizer(name, add_special_tokens=False)["input_ids"]) for name in distinct]
    unk = getattr(tokenizer, "unk_token_id", None)
    all_unknown = unk is not None and all(all(t == unk for t in ids) for ids in tokens)
    if all_unknown or len({tuple(ids) for ids in tokens}) == 1:
        raise SAEFTConfigError(
            f"The tokenizer of {source} gives the same or only unknown tokens to every class name ({distinct[:3]} "
            "...): its vocabulary is missing, so every class would get the same zero-shot text embedding. Save the tokenizer "
            "files (tokenizer.json / vocab.json + merges.txt) with the checkpoint, or use one that has them."
        )


def check_text_embeddings(text: torch.Tensor, classnames: Sequence[str], source: str) -> None:
    """Zero-shot class embeddings [C, d]: finite, and not all identical (a head that cannot tell classes apart)."""
    if not torch.isfinite(text).all():
        raise SAEFTConfigError(f"The zero-shot text embeddings of {source} hold NaN/inf: the text tower's weights "
                               "are broken. Re-download the checkpoint.")
    if len(set(classnames)) >= 2 and text.shape[0] >= 2 and torch.allclose(text, text[:1].expand_as(text), atol=1e-6):
        raise SAEFTConfigError(
            f"Every class got the same zero-shot text embedding from {source}: the tokenizer or text tower cannot "
            "tell the class names apart (a checkpoint without tokenizer files?). Use a checkpoint with its tokenizer."
        )


# ----------------------------------------------------------------------------------------------------------------
# The SAE
# ----------------------------------------------------------------------------------------------------------------


def check_sae(sae: SparseAutoencoder, *, width: int, representation: str, source_model: str | None) -> None:
    """A given SAE fits the model (width, representation, source) and its weights are usable."""
    try:
        sae.check_weights()
    except SAELoadError as err:
        raise SAEFTConfigError(str(err)) from err
    sae.check_compatible(d_in=width, representation=representation, source_model=source_model)


def check_sae_set(saes: Mapping[str, SparseAutoencoder], *, widths: Mapping[str, int],
                  source_model: str | None) -> None:
    """Every SAE of a `{spec: SAE}` set (see `saeft_hf.sae_set`) fits its representation (`check_sae`), and the set
    covers exactly the representations in `widths`."""
    match_sae_set(saes, list(widths), "The SAEs")
    for spec, width in widths.items():
        check_sae(saes[spec], width=width, representation=spec, source_model=source_model)


def sae_training_key(model_args: Any, *, seed: int, data_fingerprint: str | None,
                     representation: str | None = None) -> dict[str, Any]:
    """What makes the SAE a run trains itself: its settings and the images (stored in its `provenance`).

    `representation`: the one this SAE is for, in a run with several (default: the run's `model_args.representation`).
    """
    return {
        "model": str(model_args.model_name_or_path),
        "representation": representation or model_args.representation,
        "d_sae_multiplier": model_args.sae_d_sae_multiplier, "k": model_args.sae_k,
        "activation": model_args.sae_activation, "epochs": model_args.sae_epochs,
        "batch_size": model_args.sae_batch_size, "lr": model_args.sae_lr, "max_samples": model_args.sae_max_samples,
        "aux_k": model_args.sae_aux_k, "seed": seed, "data": data_fingerprint,
    }


def reuse_trained_sae(saved: Mapping[str, Any] | None, wanted: Mapping[str, Any], where: str, *,
                      resuming: bool) -> bool:
    """Whether the SAE a run trained earlier in `where` may be reused for settings `wanted`.

    Same key: reuse. Another key: refuse when resuming (the run started with that SAE; switching would change the
    penalty mid-run), otherwise False (retrain, with a warning naming what changed). No key (an SAE saved before
    keys existed, or put there by hand): reuse with a warning.
    """
    wanted = json.loads(json.dumps(dict(wanted)))  # the form it takes in config.json
    if not saved:
        logger.warning("%s has no record of what it was trained on; reusing it as is. Delete it to retrain.", where)
        return True
    saved = dict(saved)
    changed = {k: (saved.get(k), wanted.get(k)) for k in sorted(set(saved) | set(wanted))
               if saved.get(k) != wanted.get(k)}
    if not changed:
        return True
    if "data" in changed and wanted.get("data") is None:
        changed.pop("data")  # a stream: the images cannot be fingerprinted, only the settings compared
        if not changed:
            return True
    described = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
    if resuming:
        raise SAEFTConfigError(
            f"{where} was trained with other settings or images than this run's ({described}). A resumed run must "
            "keep the SAE it started with: restore those settings, or start a new output_dir."
        )
    logger.warning("%s was trained with other settings or images (%s); training a new SAE.", where, described)
    return False


# ----------------------------------------------------------------------------------------------------------------
# Everything, before the first step
# ----------------------------------------------------------------------------------------------------------------


def validate_run(
    model_args: Any,
    training_args: Any,
    *,
    train_dataset: Any,
    eval_dataset: Any | None,
    classnames: Sequence[str],
    templates: Sequence[str],
    eval_sets: Mapping[str, tuple[Any, Any]] | None,
    id_name: str,
    wise_ft_alphas: Any,
    shape: Mapping[str, int] | None = None,
) -> list[float] | None:
    """All the checks `run_saeft` makes before building anything; returns the WiSE-FT alphas as floats.

    `shape` (see `model_shape`): the model's depth and widths, to check the representation exists.
    """
    streaming = isinstance(train_dataset, datasets.IterableDataset)
    check_training_args(training_args, streaming=streaming)
    check_model_args(model_args)
    alphas = check_wise_ft_alphas(wise_ft_alphas)
    check_classnames(classnames)
    check_templates(templates)
    num_labels = len(classnames)
    check_labels_fit_head(train_dataset, num_labels, "The training set")
    if eval_dataset is not None:
        train_names, val_names = class_names_of(train_dataset), class_names_of(eval_dataset)
        if train_names is not None and val_names is not None and train_names != val_names:
            align_validation_classes(train_dataset, eval_dataset)  # raises when validation has other classes
            raise SAEFTConfigError(
                "The evaluation set's class list differs from the training set's (a subset or another order), so its "
                "label ids mean other classes. Relabel it by name first: "
                "saeft_hf.validation.align_validation_classes(train, validation)."
            )
        check_labels_fit_head(eval_dataset, num_labels, "The evaluation set")
    check_eval_sets(eval_sets, num_labels, id_name=id_name, wise_ft_alphas=alphas)
    if shape is not None:
        representation_widths(model_args.representation, shape)
    reg_active = training_args.regularizer != "none" and training_args.lambda_reg > 0
    if (training_args.reference_mode == "cached" and reg_active and streaming
            and training_args.regularizer in ("sae_ft", "feature_distill")
            and "z0" not in (getattr(train_dataset, "column_names", None) or [])):
        raise SAEFTConfigError(
            "reference_mode='cached' with a streaming training set that has no `z0` column: precompute it on a "
            "map-style copy (saeft_hf.embeddings.add_reference_embeddings) and stream that, or use "
            "reference_mode='live'."
        )
    return alphas


def load_eval_specs_checked(source: str | os.PathLike[str], num_labels: int) -> list[Any]:
    """`saeft_hf.evaluation.load_eval_specs(source)` with every entry checked first, and the specs against the head.

    Reading the YAML ourselves lets a set without a name, float indices or a -1 in a group fail with our message
    before `EvalSetSpec` would truncate or misread them; and before any eval set is downloaded.
    """
    import yaml

    from .evaluation import load_eval_specs

    try:
        with open(source, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError as err:
        raise SAEFTConfigError(f"Eval-set config {os.fspath(source)!r}: no such file.") from err
    except yaml.YAMLError as err:
        raise SAEFTConfigError(f"Eval-set config {os.fspath(source)!r} is not valid YAML: {err}") from err
    check_eval_spec_entries(data, os.fspath(source))
    try:
        specs = load_eval_specs(data)
    except (TypeError, ValueError) as err:
        raise SAEFTConfigError(f"Eval-set config {os.fspath(source)!r}: {err}") from err
    check_eval_specs(specs, num_labels)
    return specs
