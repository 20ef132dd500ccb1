"""Initialising the classification head: zero-shot from CLIP's text tower, or a linear probe (for LP-FT).

Zero-shot (METHOD.md section 4): per class, embed every prompt template filled with the class name, L2-normalise each
embedding, average, re-normalise, and multiply by `logit_scale.exp()`; the bias is 0. The text tower is used once,
here, and is not part of the fine-tuned model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoTokenizer, CLIPModel, PreTrainedTokenizerBase

from .cache import (
    CACHE_FORMAT,
    config_fingerprint,
    load_cached_tensors,
    model_fingerprint,
    save_cached_tensors,
    text_fingerprint,
)
from .distributed import all_ranks_agree, gather_rows, is_main_process, shard_range
from .modeling import SAEFTCLIPConfig, SAEFTCLIPForImageClassification
from .validation import SAEFTConfigError, check_text_embeddings, check_tokenizer


@torch.no_grad()
def zeroshot_text_embeddings(
    clip: CLIPModel,
    tokenizer: PreTrainedTokenizerBase,
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    batch_size: int = 256,
    progress: bool = True,
    device: torch.device | str | None = None,
    distributed: bool = False,
) -> torch.Tensor:
    """Template-averaged, unit-norm text embedding per class. Returns [num_classes, projection_dim] (float32, CPU).

    Args:
        device: where the text tower runs (default: where it is); it is moved there for the pass and back.
        distributed: every process of the initialised `torch.distributed` group calls this with the same classes;
            each encodes a contiguous block of them (`saeft_hf.distributed.shard_range`) and all receive every row,
            in class order. False (default): this process encodes every class.
    """
    if not classnames or not templates:
        raise ValueError("Zero-shot head needs at least one class name and one prompt template.")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"Every template needs a '{{}}' placeholder for the class name; these do not: {bad[:3]}")
    names = list(classnames)
    mine = [names[i] for i in (shard_range(len(names)) if distributed else range(len(names)))]
    text_parts = [m for m in (clip.text_model, clip.text_projection) if m is not None]
    home = next(clip.text_model.parameters()).device
    device = torch.device(device) if device is not None else home
    was_training = clip.training
    clip.eval()
    for module in text_parts:
        module.to(device)
    weights = []
    try:
        for name in tqdm(mine, desc="zero-shot head", disable=not progress or (distributed and not is_main_process())):
            texts = [template.format(name) for template in templates]
            per_template = []
            for start in range(0, len(texts), batch_size):
                tokens = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, return_tensors="pt")
                tokens = {k: v.to(device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
                per_template.append(F.normalize(clip.get_text_features(**tokens).pooler_output.float(), dim=-1))
            weights.append(F.normalize(torch.cat(per_template).mean(0), dim=-1).cpu())
    finally:
        clip.train(was_training)
        for module in text_parts:
            module.to(home)
    local = torch.stack(weights) if weights else None
    return gather_rows(local) if distributed else local


def zeroshot_cache_key(
    clip: CLIPModel,
    tokenizer: PreTrainedTokenizerBase,
    classnames: Sequence[str],
    templates: Sequence[str],
) -> dict[str, Any]:
    """What a zero-shot head depends on: the checkpoint (name, revision, text config, text-tower and logit-scale
    weights), the tokenizer, the class names and the templates (see `saeft_hf.cache`)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return {
        "format": CACHE_FORMAT,
        "kind": "zeroshot_head",
        "model": getattr(clip.config, "_name_or_path", None),
        "revision": getattr(clip.config, "_commit_hash", None),
        "text_config": config_fingerprint(clip.config.text_config),
        "weights": model_fingerprint(clip, ("text_model", "text_projection", "logit_scale")),
        "tokenizer": text_fingerprint([type(tokenizer).__name__, vocab, str(tokenizer.model_max_length)]),
        "classnames": text_fingerprint(list(classnames)),
        "num_classes": len(classnames),
        "templates": text_fingerprint(list(templates)),
    }


@torch.no_grad()
def set_head(model: SAEFTCLIPForImageClassification, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Write `weight` [num_labels, projection_dim] (and `bias`) into the model's head, checking shapes."""
    head = model.classifier
    if weight.shape != head.weight.shape:
        raise ValueError(
            f"Head weight has shape {tuple(weight.shape)} but the model's head is {tuple(head.weight.shape)} "
            f"(num_labels={model.config.num_labels}): the class names must match the label count."
        )
    head.weight.copy_(weight.to(head.weight))
    head.bias.copy_(bias.to(head.bias) if bias is not None else torch.zeros_like(head.bias))


def build_zeroshot_head(
    model: SAEFTCLIPForImageClassification,
    clip: CLIPModel,
    tokenizer: PreTrainedTokenizerBase,
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    progress: bool = True,
    device: torch.device | str | None = None,
    distributed: bool = False,
    cache_path: str | os.PathLike[str] | None = None,
) -> torch.Tensor:
    """Fill `model.classifier` with CLIP's zero-shot classifier; returns the unscaled text embeddings [C, d].

    `device` / `distributed`: as `zeroshot_text_embeddings`. `cache_path`: a `.safetensors` file (by convention
    `saeft_hf.cache.cache_dir(output_dir) / "zeroshot_head.safetensors"`) holding the text embeddings, keyed by
    `zeroshot_cache_key`: reused when the key matches, rebuilt (and the reason logged) when not. With `distributed`,
    only rank 0 writes it.
    """
    text = None
    key = zeroshot_cache_key(clip, tokenizer, classnames, templates) if cache_path is not None else None
    if cache_path is not None:
        cached = load_cached_tensors(cache_path, key, what="zero-shot head cache")
        if all_ranks_agree(cached is not None) if distributed else cached is not None:
            text = cached["text_embeddings"]
    if text is None:
        text = zeroshot_text_embeddings(clip, tokenizer, classnames, templates, progress=progress, device=device,
                                        distributed=distributed)
        if cache_path is not None and (not distributed or is_main_process()):
            save_cached_tensors(cache_path, {"text_embeddings": text}, key)
    set_head(model, text * clip.logit_scale.exp().float().cpu())
    return text


def from_clip(
    clip_name_or_path: str,
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    representation: str = "image_embeds",
    tokenizer: PreTrainedTokenizerBase | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
    distributed: bool = False,
    cache_path: str | os.PathLike[str] | None = None,
    **hub_kwargs,
) -> SAEFTCLIPForImageClassification:
    """A classifier with CLIP's vision weights and a zero-shot head for `classnames`.

    Args:
        clip_name_or_path: a `CLIPModel` checkpoint (Hub id or directory) with its tokenizer.
        classnames: one readable name per label, in label order.
        templates: prompt templates with a `{}` placeholder (e.g. `saeft_hf.evaluation.IMAGENET_TEMPLATES`).
        representation: what the SAE-FT penalty sees (see `saeft_hf.modeling.parse_representation`).
        device / distributed / cache_path: where and how the head's text pass runs, and its cache (see
            `build_zeroshot_head`). The returned classifier stays on the CPU.
    """
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(clip_name_or_path, **hub_kwargs)
        except (OSError, ValueError, TypeError) as err:
            raise SAEFTConfigError(f"Could not load the tokenizer of {clip_name_or_path!r} ({type(err).__name__}: "
                                   f"{err}). The zero-shot head needs the checkpoint's tokenizer files.") from err
    # Before the model loads: a checkpoint without tokenizer files maps every class name to the same tokens.
    check_tokenizer(tokenizer, classnames, repr(str(clip_name_or_path)))
    clip = CLIPModel.from_pretrained(clip_name_or_path, **hub_kwargs)
    config = SAEFTCLIPConfig(
        vision_config=clip.config.vision_config.to_dict(),
        projection_dim=clip.config.projection_dim,
        representation=representation,
        source_model=str(clip_name_or_path),
        num_labels=len(classnames),
        id2label={i: name for i, name in enumerate(classnames)},
        label2id={name: i for i, name in enumerate(classnames)},
    )
    model = SAEFTCLIPForImageClassification(config)
    model.vision_model.load_state_dict(clip.vision_model.state_dict())
    model.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    text = build_zeroshot_head(model, clip, tokenizer, classnames, templates, progress=progress, device=device,
                               distributed=distributed, cache_path=cache_path)
    check_text_embeddings(text, classnames, repr(str(clip_name_or_path)))
    return model


def fit_linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    init_weight: torch.Tensor | None = None,
    weight_decay: float = 1e-4,
    steps: int = 300,
    lr: float = 1e-2,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on L2-normalised `features` [N, d] (the LP step of LP-FT).

    Full-batch AdamW from `init_weight` (e.g. the zero-shot head) or zeros, on `device` (default: the CPU; a
    full-batch step over ImageNet-sized features wants the accelerator). Returns (weight [C, d], bias [C]) on the CPU.
    """
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"Labels must lie in [0, {num_classes}); got range [{int(labels.min())}, {int(labels.max())}].")
    generator = torch.Generator().manual_seed(seed)
    device = torch.device(device) if device is not None else torch.device("cpu")
    x = F.normalize(features.float(), dim=-1).to(device)
    labels = labels.to(device)
    weight = (init_weight.clone().float() if init_weight is not None else 0.01 * torch.randn(num_classes, x.shape[1], generator=generator))
    weight = weight.to(device).requires_grad_(True)
    bias = torch.zeros(num_classes, device=device, requires_grad=True)
    optimizer = torch.optim.AdamW([weight, bias], lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(x @ weight.T + bias, labels).backward()
        optimizer.step()
    return weight.detach().cpu(), bias.detach().cpu()
