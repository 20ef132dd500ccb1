"""LoRA / DoRA adapters on the CLIP vision tower through PEFT.

Adapters go on the vision tower's attention and MLP projections only (never the text tower, the visual projection
or the head); the head is trained in full and saved with the adapter (`modules_to_save`). During SAE-FT the frozen
reference is the same model with its adapters disabled, so LoRA SAE-FT keeps a single copy of the weights.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from .modeling import SAEFTCLIPForImageClassification

_VISION_LAYER = r"vision_model\.encoder\.layers\.\d+\."


def vision_lora_regex(target_modules: Sequence[str]) -> str:
    """A PEFT `target_modules` regex matching `target_modules` inside the vision tower's encoder blocks only."""
    names = "|".join(re.escape(name) for name in target_modules)
    return rf".*{_VISION_LAYER}(?:.*\.)?(?:{names})"


def add_lora(
    model: SAEFTCLIPForImageClassification,
    *,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.0,
    target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    use_dora: bool = False,
) -> PeftModel:
    """Wrap `model` in LoRA (or DoRA) adapters on the vision tower; the head stays fully trainable.

    Raises a ValueError naming the available module names when `target_modules` match nothing.
    """
    if not target_modules:
        raise ValueError("target_modules is empty: name at least one vision-tower linear layer, e.g. q_proj.")
    pattern = re.compile(vision_lora_regex(target_modules))
    linear_names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    matched = [name for name in linear_names if pattern.fullmatch(name)]
    unmatched = [t for t in target_modules if not any(name.split(".")[-1] == t or name.endswith("." + t) for name in matched)]
    if not matched or unmatched:
        available = sorted({name.split(".")[-1] for name in linear_names if re.match(_VISION_LAYER, name)})
        raise ValueError(
            f"LoRA target modules {list(unmatched or target_modules)} match no linear layer of the vision tower. "
            f"Available names: {available}."
        )
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=vision_lora_regex(target_modules),
        modules_to_save=["classifier"],
        use_dora=use_dora,
        bias="none",
    )
    return get_peft_model(model, config)


def merge_lora(model: PeftModel) -> SAEFTCLIPForImageClassification:
    """Fold the adapters into the base weights and return a plain classifier (no `lora_` parameters)."""
    return model.merge_and_unload(progressbar=False)
