"""Optional training backends: fail at startup, naming the install command, when a run asks for one that is missing.

``accelerate launch --config_file accelerate_configs/zero2.yaml`` already stops with accelerate's own message when
DeepSpeed is missing; a run given a DeepSpeed config directly (``--deepspeed ds.json`` under ``torchrun`` or
``python``, or ``deepspeed:`` in a recipe YAML) would otherwise fail inside ``TrainingArguments`` with
"No package metadata was found for The 'deepspeed>=0.9.3' distribution".
"""

from __future__ import annotations

import importlib.util
from typing import Any

__all__ = ["MissingBackendError", "check_backends"]

# backend -> (import name, pip command, alternatives without it)
_BACKENDS: dict[str, tuple[str, str, str]] = {
    "deepspeed": ("deepspeed", "pip install deepspeed  (or: pip install 'saeft-hf[deepspeed]')",
                  "accelerate_configs/multi_gpu.yaml (DDP) or accelerate_configs/fsdp2.yaml (FSDP2, built into torch)"),
}


class MissingBackendError(ImportError):
    """A run asks for a training backend (e.g. DeepSpeed) that is not installed."""


def check_backends(*, deepspeed: Any = None) -> None:
    """Raise :class:`MissingBackendError` naming the install command when ``deepspeed`` (a config path or dict, as
    ``TrainingArguments.deepspeed`` takes) is given but the package is not installed."""
    if deepspeed in (None, "", False):
        return
    module, install, alternatives = _BACKENDS["deepspeed"]
    if importlib.util.find_spec(module) is None:
        raise MissingBackendError(
            f"This run asks for DeepSpeed (deepspeed={deepspeed!r}) but the deepspeed package is not installed. "
            f"Install it: {install}. Or train without it: {alternatives}.")
