"""Shift benchmarks, class-subset projections, exact sharded scoring, WiSE-FT interpolation and sweeps.

``specs`` says which data to evaluate on, ``accuracy`` scores (sharded over processes, exact counts), ``wise_ft``
interpolates weights, ``runner`` loads a model, evaluates it and sweeps WiSE-FT for the recipes.

The protocol (WiSE-FT lineage, METHOD.md section 5): top-1 on ImageNet validation and on five shifts: ImageNetV2
(matched frequency), ImageNet-R and ImageNet-A (200-class subsets: the 1000-way logits are *restricted* to those
classes), ImageNet-Sketch (all 1000 classes) and ObjectNet (113 classes; a class logit is the max over its mapped
ImageNet classes; a 2-px border is cropped). Avg-5 is the mean over the five shifts, Avg-4 leaves ObjectNet out.
WiSE-FT's alpha is chosen on held-out ImageNet training images (or another `role: holdout` set), never on a
reported set.

Which data to evaluate on is configuration (:class:`EvalSetSpec`, ``recipes/configs/imagenet_eval_sets.yaml``),
not code. The model contract: ``model(pixel_values=...)`` returns an object with ``.logits`` [B, num_classes]
(a ``transformers`` ``PreTrainedModel`` or a ``peft.PeftModel`` wrapping one).
"""

from ..imagenet_classes import (
    IMAGENET_TEMPLATES,
    imagenet_classnames,
    objectnet_classnames,
)
from ..distributed import shard_range
from .accuracy import (
    Counts,
    PixelSet,
    count_correct,
    evaluate_accuracy,
    evaluate_sets,
    pretransform,
    project_logits,
    shard_dataset,
    shift_averages,
)
from .runner import (
    EvalReport,
    LoadedModel,
    evaluate_model,
    holdout_split,
    load_for_evaluation,
    save_wise_ft_model,
)
from .specs import (
    DEFAULT_ID_NAME,
    DEFAULT_SHIFT_NAMES,
    EvalSetSpec,
    default_imagenet_eval_specs,
    imagenet_a_indices,
    imagenet_r_indices,
    imagenet_wnids,
    load_eval_dataset,
    load_eval_sets,
    load_eval_specs,
    objectnet_class_groups,
    objectnet_folders,
)
from .wise_ft import (
    WiseFTResult,
    interpolate_state_dicts,
    save_initial_head,
    scale_lora,
    select_alpha,
    wise_ft,
    wise_ft_variants,
)

__all__ = [
    "DEFAULT_ID_NAME",
    "DEFAULT_SHIFT_NAMES",
    "IMAGENET_TEMPLATES",
    "Counts",
    "EvalReport",
    "EvalSetSpec",
    "LoadedModel",
    "PixelSet",
    "WiseFTResult",
    "count_correct",
    "default_imagenet_eval_specs",
    "evaluate_accuracy",
    "evaluate_model",
    "evaluate_sets",
    "holdout_split",
    "imagenet_a_indices",
    "imagenet_classnames",
    "imagenet_r_indices",
    "imagenet_wnids",
    "interpolate_state_dicts",
    "load_eval_dataset",
    "load_eval_sets",
    "load_eval_specs",
    "load_for_evaluation",
    "objectnet_class_groups",
    "objectnet_classnames",
    "objectnet_folders",
    "pretransform",
    "project_logits",
    "save_initial_head",
    "save_wise_ft_model",
    "scale_lora",
    "select_alpha",
    "shard_dataset",
    "shard_range",
    "shift_averages",
    "wise_ft",
    "wise_ft_variants",
]
