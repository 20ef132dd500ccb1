"""Text descriptions of SAE features: CLIP text prompts closest to each feature's decoder atom."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..sae import SAEMismatchError, SparseAutoencoder
from ..zeroshot import zeroshot_text_embeddings
from .analysis import FeatureChangeReport, FeatureProfile

# ----------------------------------------------------------------------------------------------------------------
# Text descriptions
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TextVocabulary:
    """Prompts and their unit-norm CLIP text embeddings [P, projection_dim]; `kinds[i]` is "class" or "vocabulary"."""

    prompts: list[str]
    kinds: list[str]
    embeddings: torch.Tensor


def build_text_vocabulary(
    clip: Any,
    tokenizer: Any = None,
    *,
    classnames: Sequence[str] | None = None,
    templates: Sequence[str] = ("a photo of a {}.",),
    vocabulary: Sequence[str] = (),
    progress: bool = False,
) -> TextVocabulary:
    """Text embeddings to describe features with.

    Class names: one template-averaged embedding per class (`saeft_hf.zeroshot.zeroshot_text_embeddings`, exactly
    the zero-shot head's directions), labelled with the class name. Vocabulary: each entry embedded as given
    (a word or a full prompt such as "a blurry photo").

    Args:
        clip: a `transformers.CLIPModel`, or a path / Hub id of one (loaded with its tokenizer).
        tokenizer: the CLIP tokenizer (loaded from `clip` when it is a path and this is None).
    """
    from transformers import AutoTokenizer, CLIPModel

    if isinstance(clip, (str, os.PathLike)):
        path = os.fspath(clip)
        clip = CLIPModel.from_pretrained(path)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
    if tokenizer is None:
        raise ValueError("build_text_vocabulary needs the CLIP tokenizer when `clip` is a model object.")
    prompts, kinds, parts = [], [], []
    if classnames:
        parts.append(zeroshot_text_embeddings(clip, tokenizer, list(classnames), list(templates), progress=progress))
        prompts += [str(name) for name in classnames]
        kinds += ["class"] * len(classnames)
    if vocabulary:
        # The template "{}" embeds each entry as written.
        parts.append(zeroshot_text_embeddings(clip, tokenizer, list(vocabulary), ["{}"], progress=progress))
        prompts += [str(v) for v in vocabulary]
        kinds += ["vocabulary"] * len(vocabulary)
    if not parts:
        raise ValueError("build_text_vocabulary needs class names and/or a vocabulary.")
    return TextVocabulary(prompts=prompts, kinds=kinds, embeddings=torch.cat(parts).float().cpu())


def describe_with_text(
    report: FeatureChangeReport,
    sae: SparseAutoencoder,
    vocabulary: TextVocabulary,
    *,
    top_prompts: int = 3,
    center: bool = False,
) -> None:
    """Fill `FeatureChange.text` of every reported feature with its best-aligned prompts, in place.

    Score: cosine between the decoder atom ``W_dec[j]`` (times the sign of the feature's mean changed code, since a
    negative code of a signed TopK SAE adds ``-W_dec[j]``) and each prompt's text embedding. The atom lives in the
    SAE's input space: for an SAE on `image_embeds` that is CLIP's joint image-text space (unit norm only rescales,
    so directions are unchanged). `center=True` subtracts the mean text embedding first, which removes the
    direction all prompts share (CLIP's modality gap) and can make the ranking less uniform across features.

    Raises:
        ValueError / SAEMismatchError: the SAE is not on `image_embeds`, or the widths differ.
    """
    text, atoms = _unit_text_and_atoms(sae, vocabulary, center)
    for change in (*report.top_added, *report.top_removed):
        sign = -1.0 if change.mean_signed_activation < 0 else 1.0
        change.text = _best_prompts(text, atoms[change.feature], sign, vocabulary, top_prompts)


def describe_profiles(
    profiles: Sequence[FeatureProfile],
    sae: SparseAutoencoder,
    vocabulary: TextVocabulary,
    *,
    top_prompts: int = 3,
    center: bool = False,
) -> None:
    """Fill `FeatureProfile.text` in place, scored as in `describe_with_text` (the atom signed by `profile.sign`)."""
    text, atoms = _unit_text_and_atoms(sae, vocabulary, center)
    for profile in profiles:
        profile.text = _best_prompts(text, atoms[profile.feature], profile.sign, vocabulary, top_prompts)


def _unit_text_and_atoms(sae: SparseAutoencoder, vocabulary: TextVocabulary,
                         center: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm prompt embeddings [P, d] (centred first if asked) and unit-norm decoder atoms [F, d]."""
    if sae.config.representation != "image_embeds":
        raise ValueError(
            f"Text alignment needs an SAE on `image_embeds` (CLIP's joint space); this one is on "
            f"`{sae.config.representation}`, whose directions are not comparable with text embeddings.")
    text = vocabulary.embeddings.float()
    if text.shape[1] != sae.config.d_in:
        raise SAEMismatchError(f"Text embeddings have width {text.shape[1]} but the SAE's d_in is {sae.config.d_in}: "
                               "use the text tower of the CLIP model the SAE was trained on.")
    if center:
        text = text - text.mean(0, keepdim=True)
    text = F.normalize(text, dim=-1)
    atoms = F.normalize(sae.W_dec.detach().float().cpu(), dim=-1)  # [F, d]
    return text, atoms


def _best_prompts(text: torch.Tensor, atom: torch.Tensor, sign: float, vocabulary: TextVocabulary,
                  top_prompts: int) -> list[dict[str, Any]]:
    cosines = sign * (text @ atom)
    order = cosines.argsort(descending=True)[:top_prompts].tolist()
    return [{"prompt": vocabulary.prompts[i], "cosine": float(cosines[i]), "kind": vocabulary.kinds[i]}
            for i in order]
