"""WiSE-FT: weight-space interpolation between the pre-trained and the fine-tuned model (full and LoRA), and sweeps."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from peft import PeftModel
from torch import nn

logger = logging.getLogger(__name__)

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
    if pretrained_model is None:
        raise ValueError("wise_ft needs the pre-trained model for a fully fine-tuned model.")
    theta0, theta1 = pretrained_model.state_dict(), finetuned_model.state_dict()
    _check_compatible(theta0, theta1)
    model = copy.deepcopy(finetuned_model)
    _lerp_into(model, theta0, theta1, alpha)
    return model


@dataclass
class WiseFTResult:
    """A WiSE-FT sweep: ``results[i]`` are the metrics at ``alphas[i]``; ``best_alpha`` maximises ``select_on``,
    the accuracy on held-out data described by ``selection``."""

    alphas: list[float]
    results: list[dict[str, float]]
    best_alpha: float
    select_on: str
    selection: str = ""

    @property
    def best_results(self) -> dict[str, float]:
        """The metrics at ``best_alpha``."""
        return self.results[self.alphas.index(self.best_alpha)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The head the fine-tuning started from (zero-shot or linear probe): with the source CLIP's vision weights it is
# theta_0, so a saved run can be swept without its training script (the source checkpoint has no head).
INITIAL_HEAD_FILE = "initial_head.safetensors"


def save_initial_head(model: nn.Module, output_dir: str | os.PathLike[str]) -> str:
    """Write ``model.classifier``'s weights (before fine-tuning) to ``output_dir/initial_head.safetensors``."""
    from safetensors.torch import save_file

    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, INITIAL_HEAD_FILE)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.classifier.state_dict().items()}, path)
    return path


def load_initial_head(model: nn.Module, run_dir: str | os.PathLike[str]) -> None:
    """Write a run's saved initial head into ``model.classifier`` (in place)."""
    from safetensors.torch import load_file

    path = os.path.join(run_dir, INITIAL_HEAD_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: WiSE-FT needs the head the fine-tuning started from (runs saved "
                                "by saeft-hf record it). Without it, sweep in the training run itself.")
    model.classifier.load_state_dict(load_file(path))


def wise_ft_variants(
    pretrained_model: nn.Module | None, finetuned_model: nn.Module, alphas: Sequence[float]
) -> dict[float, nn.Module | Callable[[], contextlib.AbstractContextManager[nn.Module]]]:
    """One scorer per alpha for :func:`~saeft_hf.evaluation.count_correct`, so a sweep decodes each batch once.

    Full fine-tuning: alpha 0 is ``pretrained_model`` and alpha 1 ``finetuned_model`` themselves; every other alpha
    is a model built once (:func:`wise_ft`; one model's memory per alpha). LoRA/DoRA ``PeftModel``: one set of
    weights, switched per batch with :func:`scale_lora` (alpha 1 is the model as it is).
    """
    alpha_list = [_check_alpha(a) for a in alphas]
    if not alpha_list:
        raise ValueError("A WiSE-FT sweep needs at least one alpha.")
    if len(set(alpha_list)) != len(alpha_list):
        raise ValueError(f"Duplicate WiSE-FT alphas in {alpha_list}.")
    variants: dict[float, Any] = {}
    if isinstance(finetuned_model, PeftModel):
        _lora_layers(finetuned_model)  # unsupported adapter types fail here, before any scoring
        for alpha in alpha_list:
            variants[alpha] = (finetuned_model if alpha == 1.0
                               else functools.partial(scale_lora, finetuned_model, alpha))
        return variants
    if pretrained_model is None:
        raise ValueError("A WiSE-FT sweep of a fully fine-tuned model needs the pre-trained model.")
    _check_compatible(pretrained_model.state_dict(), finetuned_model.state_dict())
    for alpha in alpha_list:
        if alpha == 0.0:
            variants[alpha] = pretrained_model
        elif alpha == 1.0:
            variants[alpha] = finetuned_model
        else:
            variants[alpha] = wise_ft(pretrained_model, finetuned_model, alpha)
    return variants


def select_alpha(alphas: Sequence[float], scores: Sequence[float]) -> float:
    """The alpha with the highest score; ties go to the first alpha, NaN never wins.

    The scores must come from held-out in-distribution data that is not reported (e.g. held-out training images):
    choosing alpha on a reported set, worse on a shift, overstates the result.
    """
    if len(alphas) != len(scores) or not alphas:
        raise ValueError(f"{len(alphas)} alphas but {len(scores)} scores.")
    best = max(range(len(scores)), key=lambda i: (-math.inf if math.isnan(scores[i]) else scores[i], -i))
    return float(alphas[best])
