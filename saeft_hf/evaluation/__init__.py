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

from ..imagenet_classes import (
    IMAGENET_TEMPLATES,
    imagenet_classnames,
    objectnet_classnames,
)
from .accuracy import (
    evaluate_accuracy,
    evaluate_sets,
    pretransform,
    project_logits,
    results_to_json,
    shift_averages,
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
    scale_lora,
    wise_ft,
    wise_ft_sweep,
)

__all__ = [
    "DEFAULT_ID_NAME",
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
    "pretransform",
    "project_logits",
    "results_to_json",
    "scale_lora",
    "shift_averages",
    "wise_ft",
    "wise_ft_sweep",
]
