"""LoRA / DoRA adapters on the CLIP vision tower through PEFT.

Adapters go on the vision tower's attention and MLP projections only (never the text tower, the visual projection
or the head); the head is trained in full and saved with the adapter (`modules_to_save`). During SAE-FT the frozen
reference is the same model with its adapters disabled, so LoRA SAE-FT keeps a single copy of the weights.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from .modeling import SAEFTCLIPConfig, SAEFTCLIPForImageClassification

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

    The adapter records its base model (`base_model_name_or_path` in `adapter_config.json`: the CLIP checkpoint the
    classifier was built from, `config.source_model`), so PEFT's own loaders open a saved run (see
    `load_classifier`). Raises a ValueError naming the available module names when `target_modules` match nothing.
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
    peft_model = get_peft_model(model, config)
    # A classifier built in code (`from_clip`) has no `name_or_path`, so PEFT would record null and its loaders could
    # not find the base: record the checkpoint the weights came from. `SAEFTCLIPForImageClassification` loads it.
    base = getattr(model.config, "source_model", None) or model.name_or_path or None
    for adapter_config in peft_model.peft_config.values():
        adapter_config.base_model_name_or_path = base
    return peft_model


def merge_lora(model: PeftModel) -> SAEFTCLIPForImageClassification:
    """Fold the adapters into the base weights and return a plain classifier (no `lora_` parameters)."""
    return model.merge_and_unload(progressbar=False)


BASE_CONFIG_SUBFOLDER = "base"


def save_base_config(model: PeftModel, output_dir: str) -> None:
    """Save the wrapped classifier's config next to an adapter, so `load_classifier` can rebuild the base."""
    model.get_base_model().config.save_pretrained(os.path.join(output_dir, BASE_CONFIG_SUBFOLDER))


def load_classifier(path: str, **hub_kwargs) -> SAEFTCLIPForImageClassification | PeftModel:
    """Load a fine-tuned model saved by the recipes: a full classifier, or an adapter (+ `base/config.json`).

    For an adapter, the base weights come from the pre-trained CLIP checkpoint recorded in the config
    (`source_model`); the trained head comes from the adapter (`modules_to_save`).

    With PEFT alone (the adapter's `base_model_name_or_path` is that checkpoint; give the head's class count)::

        from peft import AutoPeftModel, PeftConfig, PeftModel
        from saeft_hf.modeling import SAEFTCLIPForImageClassification
        base = SAEFTCLIPForImageClassification.from_pretrained(
            PeftConfig.from_pretrained(path).base_model_name_or_path, num_labels=1000)
        model = PeftModel.from_pretrained(base, path)
        # or, in one call (PEFT imports the base class only from allow-listed packages):
        model = AutoPeftModel.from_pretrained(path, num_labels=1000,
                                              import_allowlist=["transformers", "peft", "saeft_hf"])
    """
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        return SAEFTCLIPForImageClassification.from_pretrained(path, **hub_kwargs)
    config = SAEFTCLIPConfig.from_pretrained(os.path.join(path, BASE_CONFIG_SUBFOLDER))
    if not config.source_model:
        raise ValueError(f"{path} is an adapter but its base config records no source_model to load weights from.")
    base = SAEFTCLIPForImageClassification.from_pretrained(config.source_model, config=config, **hub_kwargs)
    return PeftModel.from_pretrained(base, path)
