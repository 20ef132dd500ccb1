"""The SAE-FT penalty and the baseline regularisers, as pure functions of embeddings (and weights for L2-SP).

Notation (METHOD.md section 3): `z = f(x)` [B, d] is the trainable embedding, `z0 = f0(x)` [B, d] the frozen
pre-trained one, `s = TopK(W_enc (z - b_dec))` and `s0` the SAE codes [B, F], `m = (s0 != 0)`.

    add      = mean over B x F of (1 - m) * |s|
    remove   = mean over B x F of m * relu(s0 - s)
    residual = mean over B x d of ((z - z0) - (s - s0) W_dec)^2
    total    = lambda_add * add + lambda_remove * remove + mu * residual

`lambda_reg` (the weight of `total` in the loss) is applied by the trainer.

Several representations (e.g. the CLS token of the last two blocks), one SAE each: `summed_sae_ft_penalty` adds the
per-representation penalties, `total = sum_r total_r`. A sum, not a mean: each term keeps the weight it has in a
single-representation run at the same `lambda_reg`, `lambda_add` and `mu`, so adding a layer adds a constraint
instead of halving the pull on the layers already penalised (with a mean, a 1-layer and a 2-layer run at one
`lambda_reg` would regularise the shared layer differently), and each layer's gradient does not depend on how many
others are penalised. The price: the overall strength grows with the number of layers, so `lambda_reg` is tuned
per set of representations, as for any other change of the penalty.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F

from .sae import SparseAutoencoder


@dataclass
class SAEFTPenalty:
    """The SAE-FT terms for one batch; every field is a scalar tensor.

    `add`, `remove`, `residual` and `total` carry gradients to `z`; `features_added` and `features_removed` are
    detached counts per image (active in `s` but not in `s0`, and the reverse), for logging.
    """

    add: torch.Tensor
    remove: torch.Tensor
    residual: torch.Tensor
    total: torch.Tensor
    features_added: torch.Tensor
    features_removed: torch.Tensor


def sae_ft_penalty(
    sae: SparseAutoencoder,
    z: torch.Tensor,
    z0: torch.Tensor,
    *,
    lambda_add: float = 10.0,
    lambda_remove: float = 0.0,
    mu: float = 1.0,
    normalize: bool = False,
) -> SAEFTPenalty:
    """The SAE-FT regulariser of `z` [B, d] against the frozen reference `z0` [B, d].

    Args:
        sae: the frozen SAE trained on the pre-trained model's embeddings. Its parameters never receive gradients.
        z: embeddings of the model being fine-tuned (gradients flow back through it).
        z0: embeddings of the frozen pre-trained model on the same inputs (treated as a constant).
        lambda_add: weight of the addition term.
        lambda_remove: weight of the one-sided removal term (0 in the reference's `sae_mask`).
        mu: weight of the residual term (drift the dictionary cannot explain).
        normalize: feed `z/|z|` and `z0/|z0|` to the SAE and the residual instead of the raw embeddings
            (the reference default is raw, although its SAE was trained on unit-norm inputs).
    """
    for name, value in (("lambda_add", lambda_add), ("lambda_remove", lambda_remove), ("mu", mu)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}: a negative weight rewards the drift it should stop.")
    if z.shape != z0.shape or z.dim() != 2:
        raise ValueError(f"z and z0 must both be [B, d]; got {tuple(z.shape)} and {tuple(z0.shape)}.")
    z0 = z0.detach()
    # Compute in at least fp32: the residual is a small difference of large numbers under bf16.
    dtype = torch.promote_types(z.dtype, torch.float32)
    z, z0 = z.to(dtype), z0.to(dtype)
    if normalize:
        z, z0 = F.normalize(z, dim=-1, eps=1e-8), F.normalize(z0, dim=-1, eps=1e-8)

    s = sae.encode(z, detach_weights=True)
    with torch.no_grad():
        s0 = sae.encode(z0, detach_weights=True)
    active0 = s0 != 0
    inactive0 = ~active0

    add = (s.abs() * inactive0).mean()
    remove = (F.relu(s0 - s) * active0).mean()
    w_dec = sae.W_dec.detach().to(dtype)
    residual = ((z - z0) - (s - s0) @ w_dec).pow(2).mean()
    total = lambda_add * add + lambda_remove * remove + mu * residual

    with torch.no_grad():
        active = s != 0
        features_added = (active & inactive0).sum(-1).float().mean()
        features_removed = (active0 & ~active).sum(-1).float().mean()
    return SAEFTPenalty(add, remove, residual, total, features_added, features_removed)


@dataclass
class SummedSAEFTPenalty:
    """`summed_sae_ft_penalty`: the sums over representations (fields as `SAEFTPenalty`: `total` is what the loss
    weights by `lambda_reg`) and each representation's own terms in `per_representation` (spec -> `SAEFTPenalty`)."""

    summed: SAEFTPenalty
    per_representation: dict[str, SAEFTPenalty]


def summed_sae_ft_penalty(
    saes: Mapping[str, SparseAutoencoder],
    z: Mapping[str, torch.Tensor],
    z0: Mapping[str, torch.Tensor],
    **kwargs: Any,
) -> SummedSAEFTPenalty:
    """The SAE-FT penalty of several representations, each with its own SAE, summed (see the module doc for why).

    `saes`, `z` and `z0` are keyed by representation spec (the same keys); `kwargs` are `sae_ft_penalty`'s weights,
    shared by every representation. Every summed field (terms and feature counts) is the plain sum of the
    per-representation ones.
    """
    if not saes or set(z) != set(saes) or set(z0) != set(saes):
        raise ValueError(f"summed_sae_ft_penalty needs the same representations in saes, z and z0; got "
                         f"{list(saes)}, {list(z)} and {list(z0)}.")
    per = {spec: sae_ft_penalty(sae, z[spec], z0[spec], **kwargs) for spec, sae in saes.items()}
    terms = [f.name for f in fields(SAEFTPenalty)]
    summed = SAEFTPenalty(**{name: sum(getattr(p, name) for p in per.values()) for name in terms})
    return SummedSAEFTPenalty(summed=summed, per_representation=per)


def feature_distillation_penalty(z: torch.Tensor, z0: torch.Tensor, *, normalize: bool = False) -> torch.Tensor:
    """Mean squared distance between `z` and the frozen `z0` over B x d (the feature-distillation baseline)."""
    z0 = z0.detach().to(z.dtype)
    if normalize:
        z, z0 = F.normalize(z, dim=-1, eps=1e-8), F.normalize(z0, dim=-1, eps=1e-8)
    return (z - z0).pow(2).mean()


def l2sp_penalty(
    named_parameters: Iterable[tuple[str, torch.Tensor]], reference: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """L2-SP: the sum over parameters of the squared distance to their pre-trained values.

    Parameters absent from `reference` (e.g. a new head) are not pulled anywhere.
    """
    total: torch.Tensor | None = None
    for name, param in named_parameters:
        if not param.requires_grad or name not in reference:
            continue
        term = (param - reference[name].to(param.dtype)).pow(2).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError(
            "l2sp_penalty found no trainable parameter with a pre-trained reference; check the parameter names."
        )
    return total
