"""The analysis half of `saeft_hf.interpret`: SAE codes of two models compared, as numbers (no plotting, no HTML).

See the package docstring (`saeft_hf.interpret`) for the exact definitions.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data import AnyDataset, with_image_transform
from ..embeddings import compute_embeddings
from ..lora import load_classifier
from ..modeling import SAEFTCLIPForImageClassification
from ..sae import SAEMismatchError, SparseAutoencoder

logger = logging.getLogger(__name__)

REPORT_FILENAME = "report.html"
CHANGES_FILENAME = "feature_changes.json"
RANK_BY: tuple[str, ...] = ("mass", "count", "strength")
DIRECTIONS: tuple[str, ...] = ("added", "removed")


# ----------------------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class FeatureChange:
    """One SAE feature that fine-tuning added (or removed), with what describes it.

    Attributes:
        feature: latent index j in [0, d_sae).
        direction: "added" (active after, inactive before) or "removed" (active before, inactive after).
        count: images on which the change happened.
        image_fraction: count / number of images.
        mean_abs_activation: mean |code| over those images (the after-code for added, the before-code for removed).
        mean_signed_activation: mean signed code over those images (its sign says which way the atom points).
        mass: count * mean_abs_activation, the ranking score by default.
        frequency_before / frequency_after: fraction of all images where the feature is active.
        mean_activation_before / mean_activation_after: mean signed code over the images where it is active.
        example_indices / example_activations: dataset rows where the change happened, strongest |code| first.
        exemplar_indices / exemplar_activations: dataset rows where the *pre-trained* model activates the feature
            most (|code|), i.e. what the feature meant before fine-tuning.
        top_classes: [label, count] of the classes on which the change happened most often.
        text: prompts whose text embedding aligns best with the (signed) decoder atom, filled by
            `describe_with_text`: [{"prompt", "cosine", "kind"}], best first.
    """

    feature: int
    direction: str
    count: int
    image_fraction: float
    mean_abs_activation: float
    mean_signed_activation: float
    mass: float
    frequency_before: float
    frequency_after: float
    mean_activation_before: float
    mean_activation_after: float
    example_indices: list[int] = field(default_factory=list)
    example_activations: list[float] = field(default_factory=list)
    exemplar_indices: list[int] = field(default_factory=list)
    exemplar_activations: list[float] = field(default_factory=list)
    top_classes: list[list[int]] = field(default_factory=list)
    text: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ClassChange:
    """The change on the images of one label.

    Attributes:
        label / name: the class.
        n_images: images of this class analysed.
        added_per_image / removed_per_image: mean number of features added / removed per image of the class.
        top_added / top_removed: [{"feature", "count", "fraction"}] most frequent changes within the class
            (fraction = count / n_images).
    """

    label: int
    name: str
    n_images: int
    added_per_image: float
    removed_per_image: float
    top_added: list[dict[str, Any]] = field(default_factory=list)
    top_removed: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class FeatureChangeReport:
    """Everything `compare_codes` measured; `to_dict()` is JSON-serialisable and `from_dict` reads it back.

    Headline numbers (see the module docstring for exact definitions): `added_per_image`, `removed_per_image`,
    `images_with_added` / `images_with_removed` (fractions of images with at least one change), `distinct_added` /
    `distinct_removed` (features added / removed on at least one image), `fvu_before` / `fvu_after` (None when the
    inputs have no variance), `cka` (None when undefined), `active_per_image_before` / `_after` (L0).

    Per-feature arrays (length d_sae): `frequency_before/after`, `mean_activation_before/after`, `added_count`,
    `removed_count`, `added_mean_abs`, `removed_mean_abs` (0 where the count is 0).

    Ranked lists: `top_added`, `top_removed` (FeatureChange, at most `top_features` each, only features with a
    non-zero count). `per_class`: one ClassChange per label present. `metadata`: free-form provenance (models,
    SAE, dataset) added by the callers.
    """

    n_images: int
    d_sae: int
    k: int | None
    input_regime: str
    rank_by: str
    added_per_image: float
    removed_per_image: float
    images_with_added: float
    images_with_removed: float
    distinct_added: int
    distinct_removed: int
    fvu_before: float | None
    fvu_after: float | None
    cka: float | None
    active_per_image_before: float
    active_per_image_after: float
    frequency_before: list[float]
    frequency_after: list[float]
    mean_activation_before: list[float]
    mean_activation_after: list[float]
    added_count: list[int]
    removed_count: list[int]
    added_mean_abs: list[float]
    removed_mean_abs: list[float]
    top_added: list[FeatureChange] = field(default_factory=list)
    top_removed: list[FeatureChange] = field(default_factory=list)
    per_class: list[ClassChange] = field(default_factory=list)
    class_names: list[str] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    SUMMARY_KEYS = (
        "n_images", "added_per_image", "removed_per_image", "images_with_added", "images_with_removed",
        "distinct_added", "distinct_removed", "fvu_before", "fvu_after", "cka",
    )

    def summary(self) -> dict[str, Any]:
        """The headline numbers as a flat dict (what the HTML summary table and the recipe print)."""
        return {key: getattr(self, key) for key in self.SUMMARY_KEYS}

    def top(self, direction: str) -> list[FeatureChange]:
        """`top_added` or `top_removed`."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}.")
        return self.top_added if direction == "added" else self.top_removed

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (plain Python numbers, lists and strings only)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureChangeReport:
        """Rebuild a report from `to_dict()` output (e.g. a saved `feature_changes.json`)."""
        data = dict(data)
        for key in ("top_added", "top_removed"):
            data[key] = [FeatureChange(**item) for item in data.get(key, [])]
        data["per_class"] = [ClassChange(**item) for item in data.get("per_class", [])]
        return cls(**data)

    def save_json(self, path: str | Path) -> Path:
        """Write `to_dict()` as JSON (atomically: a crash never leaves a truncated file). Returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        # allow_nan=False: a NaN would make the file invalid JSON for strict readers; undefined numbers are None.
        tmp.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False), encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def load_json(cls, path: str | Path) -> FeatureChangeReport:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def remap_indices(self, rows: Sequence[int]) -> None:
        """Replace image positions p by `rows[p]` in every example/exemplar list, in place.

        Used when the embeddings were computed on a subset (`max_samples`): positions in the subset become row
        indices of the dataset the caller passed in.
        """
        lookup = list(rows)
        for change in (*self.top_added, *self.top_removed):
            change.example_indices = [int(lookup[i]) for i in change.example_indices]
            change.exemplar_indices = [int(lookup[i]) for i in change.exemplar_indices]


# ----------------------------------------------------------------------------------------------------------------
# Metrics on embeddings
# ----------------------------------------------------------------------------------------------------------------


def sae_inputs(sae: SparseAutoencoder, z: torch.Tensor, normalize: bool | None = None) -> torch.Tensor:
    """The vectors the SAE encodes for embeddings `z` [N, d] -> [N, d] (see "Input regime" in the module docs).

    normalize: None -> `sae.preprocess(z)` (the SAE's training regime); True -> `z / |z|`; False -> raw `z`.
    """
    if normalize is None:
        return sae.preprocess(z)
    if normalize:
        return F.normalize(z, dim=-1, eps=1e-8)
    return z


def _regime_name(sae: SparseAutoencoder, normalize: bool | None) -> str:
    if normalize is None:
        return f"sae.preprocess ({sae.config.input_normalization})"
    return "unit_norm" if normalize else "raw"


def fraction_of_variance_unexplained(sae: SparseAutoencoder, x: torch.Tensor, *, chunk_size: int = 4096) -> float | None:
    """FVU of the SAE on inputs `x` [N, d_in] *as given* (no preprocessing): sum sq. error / sum sq. deviation.

    Equals the FVU of `sae(z)` when `x = sae.preprocess(z)`. Returns None when `x` has no variance (N = 1 or
    identical rows), where FVU is undefined.
    """
    x = x.float()
    total = float(((x.double() - x.double().mean(0)) ** 2).sum())
    if total <= 0.0:
        return None
    device = sae.W_enc.device
    error = 0.0
    with torch.no_grad():
        for start in range(0, x.shape[0], chunk_size):
            chunk = x[start:start + chunk_size].to(device)
            error += float(((chunk - sae.decode(sae.encode(chunk))).double() ** 2).sum())
    return error / total


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Linear centred kernel alignment between x [N, d1] and y [N, d2] (Kornblith et al., 2019).

    ``CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred Xc, Yc; 1 for identical
    representations, invariant to orthogonal transforms and isotropic scaling of either side. Computed in float64
    on feature-space Gram matrices ([d, d], so memory does not grow with N). None if either side is constant.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs x [N, d1] and y [N, d2] with the same N; got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}.")
    xc = x.double() - x.double().mean(0)
    yc = y.double() - y.double().mean(0)
    cross = torch.linalg.matrix_norm(yc.T @ xc) ** 2
    norm_x = torch.linalg.matrix_norm(xc.T @ xc)
    norm_y = torch.linalg.matrix_norm(yc.T @ yc)
    if float(norm_x) == 0.0 or float(norm_y) == 0.0:
        return None
    return float(cross / (norm_x * norm_y))


# ----------------------------------------------------------------------------------------------------------------
# compare_codes: the pure function on embeddings
# ----------------------------------------------------------------------------------------------------------------


class _TopRows:
    """Running per-feature top-n rows by score over chunks: keeps values and row indices [n, F]."""

    def __init__(self, n: int, d_sae: int) -> None:
        self.n = n
        self.values = torch.full((n, d_sae), -math.inf)
        self.rows = torch.full((n, d_sae), -1, dtype=torch.long)

    def update(self, scores: torch.Tensor, offset: int) -> None:
        """scores [b, F] on CPU, -inf where the row is not a candidate; rows are numbered from `offset`."""
        if self.n == 0:
            return
        b, d_sae = scores.shape
        rows = torch.arange(offset, offset + b).unsqueeze(1).expand(b, d_sae)
        values = torch.cat([self.values, scores])
        all_rows = torch.cat([self.rows, rows])
        top = values.topk(self.n, dim=0)  # n <= n + b always
        self.values = top.values
        self.rows = all_rows.gather(0, top.indices)

    def get(self, feature: int) -> tuple[list[int], list[float]]:
        keep = torch.isfinite(self.values[:, feature])
        return self.rows[keep, feature].tolist(), [float(v) for v in self.values[keep, feature]]


def _rank(score: np.ndarray, count: np.ndarray, top: int) -> list[int]:
    """Indices of features with count > 0, by score desc, then count desc, then index asc (deterministic)."""
    candidates = np.flatnonzero(count > 0)
    order = np.lexsort((candidates, -count[candidates], -score[candidates]))
    return [int(j) for j in candidates[order][:top]]


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)


@torch.no_grad()
def compare_codes(
    sae: SparseAutoencoder,
    z_before: torch.Tensor,
    z_after: torch.Tensor,
    labels: torch.Tensor | Sequence[int] | None = None,
    *,
    normalize: bool | None = None,
    class_names: Sequence[str] | None = None,
    top_features: int = 20,
    top_images: int = 8,
    top_class_features: int = 5,
    rank_by: str = "mass",
    chunk_size: int = 4096,
    progress: bool = False,
) -> FeatureChangeReport:
    """Compare the SAE codes of pre-trained embeddings `z_before` [N, d] and fine-tuned `z_after` [N, d].

    Rows must be the same images in the same order. Counting is exactly the module docstring's definitions, e.g.
    ``added_count == ((s != 0) & (s0 == 0)).sum(0)`` with ``s0 = sae.encode(sae_inputs(sae, z_before, normalize))``.

    Args:
        sae: the SAE trained on the pre-trained model's representation (width d). Used in eval mode, unchanged.
        labels: [N] integer labels for the per-class breakdown (None: no breakdown).
        normalize: input regime (None = the SAE's own preprocessing; see module docs).
        class_names: names for labels 0..C-1 (defaults to the label numbers).
        top_features: how many added and how many removed features to report in detail.
        top_images: example / exemplar images kept per reported feature.
        top_class_features: top added / removed features listed per class.
        rank_by: "mass" (count x mean |activation|, default), "count" (images), or "strength" (mean |activation|).
        chunk_size: rows encoded at a time ([chunk, d_sae] codes in memory, never [N, d_sae]).

    Raises:
        SAEMismatchError: the embeddings' width is not the SAE's d_in.
        ValueError: shapes or arguments that do not fit.
    """
    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by must be one of {RANK_BY}, got {rank_by!r}.")
    if z_before.dim() != 2 or z_before.shape != z_after.shape:
        raise ValueError(f"z_before and z_after must both be [N, d] with the same shape; got {tuple(z_before.shape)} "
                         f"and {tuple(z_after.shape)}.")
    n, d = z_before.shape
    if n == 0:
        raise ValueError("compare_codes got no embeddings (N = 0).")
    sae.check_compatible(d_in=d)
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long).cpu()
        if labels.shape != (n,):
            raise ValueError(f"labels must be [N] = [{n}], got shape {tuple(labels.shape)}.")
        if int(labels.min()) < 0:
            raise ValueError(f"labels must be >= 0 for the per-class breakdown; got {int(labels.min())}.")
    if top_features < 0 or top_images < 0 or top_class_features < 0 or chunk_size <= 0:
        raise ValueError("top_features, top_images and top_class_features must be >= 0 and chunk_size > 0.")

    was_training = sae.training
    sae.eval()  # BatchTopK uses its inference threshold in eval mode
    device = sae.W_enc.device
    d_sae = sae.config.d_sae
    x_before = sae_inputs(sae, z_before.float(), normalize)
    x_after = sae_inputs(sae, z_after.float(), normalize)
    n_classes = 0
    if labels is not None:
        n_classes = max(int(labels.max()) + 1, len(class_names or ()))

    # Accumulators (float64 sums, int64 counts), all [F] or [C, F] on CPU.
    active_b = torch.zeros(d_sae, dtype=torch.long)
    active_a = torch.zeros(d_sae, dtype=torch.long)
    sum_b = torch.zeros(d_sae, dtype=torch.float64)
    sum_a = torch.zeros(d_sae, dtype=torch.float64)
    added = torch.zeros(d_sae, dtype=torch.long)
    removed = torch.zeros(d_sae, dtype=torch.long)
    added_abs = torch.zeros(d_sae, dtype=torch.float64)
    removed_abs = torch.zeros(d_sae, dtype=torch.float64)
    added_signed = torch.zeros(d_sae, dtype=torch.float64)
    removed_signed = torch.zeros(d_sae, dtype=torch.float64)
    added_per_row = torch.zeros(n, dtype=torch.long)
    removed_per_row = torch.zeros(n, dtype=torch.long)
    l0_b = l0_a = 0
    class_added = torch.zeros(n_classes, d_sae, dtype=torch.long)
    class_removed = torch.zeros(n_classes, d_sae, dtype=torch.long)
    top_added_rows, top_removed_rows, exemplar_rows = (_TopRows(top_images, d_sae) for _ in range(3))
    err_b = err_a = 0.0

    starts = range(0, n, chunk_size)
    for start in tqdm(starts, desc="SAE codes", disable=not progress, unit="chunk"):
        xb = x_before[start:start + chunk_size].to(device)
        xa = x_after[start:start + chunk_size].to(device)
        sb, sa = sae.encode(xb), sae.encode(xa)
        err_b += float(((xb - sae.decode(sb)).double() ** 2).sum())
        err_a += float(((xa - sae.decode(sa)).double() ** 2).sum())
        sb, sa = sb.float().cpu(), sa.float().cpu()
        on_b, on_a = sb != 0, sa != 0
        add_mask, rem_mask = on_a & ~on_b, on_b & ~on_a  # the definitions, verbatim

        active_b += on_b.sum(0)
        active_a += on_a.sum(0)
        sum_b += sb.double().sum(0)  # inactive codes are exactly 0, so the sum is over active images only
        sum_a += sa.double().sum(0)
        l0_b += int(on_b.sum())
        l0_a += int(on_a.sum())
        added += add_mask.sum(0)
        removed += rem_mask.sum(0)
        added_abs += (sa.abs() * add_mask).double().sum(0)
        removed_abs += (sb.abs() * rem_mask).double().sum(0)
        added_signed += (sa * add_mask).double().sum(0)
        removed_signed += (sb * rem_mask).double().sum(0)
        added_per_row[start:start + sb.shape[0]] = add_mask.sum(1)
        removed_per_row[start:start + sb.shape[0]] = rem_mask.sum(1)
        if labels is not None:
            chunk_labels = labels[start:start + sb.shape[0]]
            class_added.index_add_(0, chunk_labels, add_mask.long())
            class_removed.index_add_(0, chunk_labels, rem_mask.long())
        neg_inf = torch.tensor(-math.inf)
        top_added_rows.update(torch.where(add_mask, sa.abs(), neg_inf), start)
        top_removed_rows.update(torch.where(rem_mask, sb.abs(), neg_inf), start)
        exemplar_rows.update(torch.where(on_b, sb.abs(), neg_inf), start)
    sae.train(was_training)

    var_b = float(((x_before.double() - x_before.double().mean(0)) ** 2).sum())
    var_a = float(((x_after.double() - x_after.double().mean(0)) ** 2).sum())

    freq_b = active_b.double().numpy() / n
    freq_a = active_a.double().numpy() / n
    mean_b = _safe_div(sum_b.numpy(), active_b.numpy())
    mean_a = _safe_div(sum_a.numpy(), active_a.numpy())
    added_np, removed_np = added.numpy(), removed.numpy()
    added_mean_abs = _safe_div(added_abs.numpy(), added_np)
    removed_mean_abs = _safe_div(removed_abs.numpy(), removed_np)
    added_mean_signed = _safe_div(added_signed.numpy(), added_np)
    removed_mean_signed = _safe_div(removed_signed.numpy(), removed_np)

    names = list(class_names) if class_names is not None else None
    if names is not None and len(names) < n_classes:
        raise ValueError(f"class_names has {len(names)} names but the labels go up to {n_classes - 1}.")

    def score(count: np.ndarray, mean_abs: np.ndarray, abs_sum: np.ndarray) -> np.ndarray:
        return {"mass": abs_sum, "count": count.astype(np.float64), "strength": mean_abs}[rank_by]

    def feature_change(j: int, direction: str) -> FeatureChange:
        is_add = direction == "added"
        count = int((added_np if is_add else removed_np)[j])
        mean_abs = float((added_mean_abs if is_add else removed_mean_abs)[j])
        examples, example_values = (top_added_rows if is_add else top_removed_rows).get(j)
        exemplars, exemplar_values = exemplar_rows.get(j)
        top_classes: list[list[int]] = []
        if labels is not None:
            per_class = (class_added if is_add else class_removed)[:, j]
            for c in _rank(per_class.double().numpy(), per_class.numpy(), 3):
                top_classes.append([c, int(per_class[c])])
        return FeatureChange(
            feature=j, direction=direction, count=count, image_fraction=count / n, mean_abs_activation=mean_abs,
            mean_signed_activation=float((added_mean_signed if is_add else removed_mean_signed)[j]),
            mass=count * mean_abs, frequency_before=float(freq_b[j]), frequency_after=float(freq_a[j]),
            mean_activation_before=float(mean_b[j]), mean_activation_after=float(mean_a[j]),
            example_indices=examples, example_activations=example_values,
            exemplar_indices=exemplars, exemplar_activations=exemplar_values, top_classes=top_classes,
        )

    top_added = [feature_change(j, "added") for j in
                 _rank(score(added_np, added_mean_abs, added_abs.numpy()), added_np, top_features)]
    top_removed = [feature_change(j, "removed") for j in
                   _rank(score(removed_np, removed_mean_abs, removed_abs.numpy()), removed_np, top_features)]

    per_class: list[ClassChange] = []
    if labels is not None:
        for c in range(n_classes):
            rows = labels == c
            n_c = int(rows.sum())
            if n_c == 0:
                continue
            entries = {}
            for key, table in (("added", class_added[c]), ("removed", class_removed[c])):
                counts = table.numpy()
                entries[key] = [{"feature": j, "count": int(counts[j]), "fraction": float(counts[j]) / n_c}
                                for j in _rank(counts.astype(np.float64), counts, top_class_features)]
            per_class.append(ClassChange(
                label=c, name=names[c] if names is not None else str(c), n_images=n_c,
                added_per_image=float(added_per_row[rows].double().mean()),
                removed_per_image=float(removed_per_row[rows].double().mean()),
                top_added=entries["added"], top_removed=entries["removed"],
            ))

    return FeatureChangeReport(
        n_images=n, d_sae=d_sae, k=sae.config.k if sae.config.activation != "relu" else None,
        input_regime=_regime_name(sae, normalize), rank_by=rank_by,
        added_per_image=float(added_per_row.double().mean()),
        removed_per_image=float(removed_per_row.double().mean()),
        images_with_added=float((added_per_row > 0).double().mean()),
        images_with_removed=float((removed_per_row > 0).double().mean()),
        distinct_added=int((added > 0).sum()), distinct_removed=int((removed > 0).sum()),
        fvu_before=err_b / var_b if var_b > 0 else None, fvu_after=err_a / var_a if var_a > 0 else None,
        cka=linear_cka(z_before, z_after),
        active_per_image_before=l0_b / n, active_per_image_after=l0_a / n,
        frequency_before=freq_b.tolist(), frequency_after=freq_a.tolist(),
        mean_activation_before=mean_b.tolist(), mean_activation_after=mean_a.tolist(),
        added_count=[int(v) for v in added_np], removed_count=[int(v) for v in removed_np],
        added_mean_abs=added_mean_abs.tolist(), removed_mean_abs=removed_mean_abs.tolist(),
        top_added=top_added, top_removed=top_removed, per_class=per_class,
        class_names=names if names is not None else ([str(c) for c in range(n_classes)] if labels is not None else None),
    )


# ----------------------------------------------------------------------------------------------------------------
# Models and data
# ----------------------------------------------------------------------------------------------------------------


def _config_model_type(path: str) -> str | None:
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(path)
    except OSError:
        return None
    return config.get("model_type")


def load_model_for_interpretation(path: str, *, representation: str = "image_embeds", **hub_kwargs: Any) -> nn.Module:
    """Load what `compute_feature_changes` needs from a path: a vision tower with the SAE's representation.

    - a LoRA/DoRA adapter directory (`adapter_config.json`) or a saved `SAEFTCLIPForImageClassification`:
      `saeft_hf.lora.load_classifier` (the head is irrelevant here but loads with it);
    - any CLIP checkpoint (`CLIPModel` weights): its vision tower and projection only (`num_labels=1`; no head,
      no text tower needed).

    A classifier saved with another representation (e.g. fine-tuned with the penalty on `image_embeds`) is read
    through the SAE's: the representation only chooses which tensor of the same forward is returned, so an SAE on
    `hidden_states.{i}.{cls|mean}` can describe a model fine-tuned with an `image_embeds` penalty.
    """
    if os.path.isfile(os.path.join(path, "adapter_config.json")) or _config_model_type(path) == "saeft_clip":
        model = load_classifier(path, **hub_kwargs)
    else:
        model = SAEFTCLIPForImageClassification.from_pretrained(
            path, num_labels=1, source_model=path, representation=representation, **hub_kwargs)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.config.representation != representation:
        from ..modeling import parse_representation

        parse_representation(representation)  # a clear error for a malformed spec
        logger.info("%s was saved returning `%s`; reading `%s` (the SAE's representation) instead.", path,
                    base.config.representation, representation)
        base.config.representation = representation
    return model.eval()


def _check_model(model: nn.Module, sae: SparseAutoencoder, role: str, *, check_source: bool) -> None:
    """Raise SAEMismatchError (with the role in the message) if `model`'s representation does not fit the SAE."""
    from transformers import CLIPModel

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        if isinstance(base, SAEFTCLIPForImageClassification):
            sae.check_compatible(d_in=base.representation_dim(), representation=base.config.representation,
                                 source_model=base.config.source_model if check_source else None)
        elif isinstance(base, CLIPModel):
            sae.check_compatible(d_in=base.config.projection_dim, representation="image_embeds")
    except SAEMismatchError as err:
        raise SAEMismatchError(f"{role} model: {err}") from err


def _prepare_dataset(dataset: AnyDataset, max_samples: int | None, seed: int) -> tuple[datasets.Dataset, list[int] | None]:
    """A map-style dataset to analyse and, for a subset, the original row of each of its rows.

    A map-style dataset larger than `max_samples` is subsampled with a seeded shuffle (the first rows of a split
    are often sorted by class). A streaming dataset is materialised: its first `max_samples` examples.
    """
    if isinstance(dataset, datasets.IterableDataset):
        if max_samples is None:
            raise ValueError("A streaming dataset needs max_samples: its images are kept in memory for the report.")
        return datasets.Dataset.from_list(list(dataset.take(max_samples)), features=dataset.features), None
    if max_samples is not None and max_samples < len(dataset):
        rows = sorted(np.random.default_rng(seed).permutation(len(dataset))[:max_samples].tolist())
        return dataset.select(rows), rows
    return dataset, None


def _class_names(dataset: AnyDataset, models: Sequence[nn.Module] = ()) -> list[str] | None:
    """Readable names of the labels, or None.

    A fine-tuned model's `id2label` wins when it is readable (not LABEL_i) and covers the dataset's classes: class
    folders are often ids (ImageNet wnids) while the head was built from readable class names. Otherwise the
    dataset's ClassLabel names.
    """
    feature = dataset.features.get("label") if getattr(dataset, "features", None) else None
    dataset_names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    for model in models:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        id2label = getattr(getattr(base, "config", None), "id2label", None) or {}
        names = [id2label.get(i, id2label.get(str(i))) for i in range(len(id2label))]
        readable = len(names) > 1 and all(names) and not all(str(name).startswith("LABEL_") for name in names)
        if readable and (dataset_names is None or len(names) == len(dataset_names)):
            return [str(name) for name in names]
    return dataset_names


def _embed(model: nn.Module, dataset: datasets.Dataset, transform: Callable[[Any], torch.Tensor], *,
           batch_size: int, device: torch.device | str | None, autocast_dtype: torch.dtype | None,
           progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if device is not None:
        model.to(device)
    # skip_corrupt_images stays False: a dropped image would shift every later row against the other model's.
    return compute_embeddings(model, with_image_transform(dataset, transform), batch_size=batch_size, device=device,
                              autocast_dtype=autocast_dtype, progress=progress, return_labels=True)


def compute_feature_changes(
    pretrained: nn.Module,
    finetuned: nn.Module,
    sae: SparseAutoencoder,
    dataset: AnyDataset,
    transform: Callable[[Any], torch.Tensor],
    *,
    normalize: bool | None = None,
    max_samples: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    class_names: Sequence[str] | None = None,
    top_features: int = 20,
    top_images: int = 8,
    rank_by: str = "mass",
    output_path: str | Path | None = None,
    progress: bool = True,
) -> FeatureChangeReport:
    """Embed `dataset` with both models, compare their SAE codes, and (optionally) write the report as JSON.

    Args:
        pretrained: the frozen pre-trained model (`SAEFTCLIPForImageClassification`, `CLIPModel`, or a PeftModel).
        finetuned: the fine-tuned model: a full classifier or a PeftModel with LoRA adapters
            (`saeft_hf.lora.load_classifier(path)` loads either).
        sae: the SAE trained on the pre-trained model's representation.
        dataset: a `datasets` dataset with `image` and `label` columns (raw images; `transform` is applied here).
        transform: the eval transform (`transforms_from_pretrained(path)[1]`): the SAE was trained on un-augmented
            centre crops, and both models must see identical pixels.
        max_samples: analyse a seeded random subset of this size (streaming datasets: the first examples).
            Example/exemplar indices in the report always refer to rows of `dataset` itself.
        Other arguments: see `compare_codes`.

    Returns:
        The FeatureChangeReport (with `metadata.n_images` etc.); also saved to `output_path` when given.
    """
    for role, model in (("pre-trained", pretrained), ("fine-tuned", finetuned)):
        _check_model(model, sae, role, check_source=role == "pre-trained")
    data, rows = _prepare_dataset(dataset, max_samples, seed)
    kwargs = dict(batch_size=batch_size, device=device, autocast_dtype=autocast_dtype, progress=progress)
    z_before, labels = _embed(pretrained, data, transform, **kwargs)
    z_after, labels_after = _embed(finetuned, data, transform, **kwargs)
    if not torch.equal(labels, labels_after):
        raise RuntimeError("The two passes over the dataset returned different label orders; use a map-style "
                           "dataset (or a deterministic stream) so both models see the same images.")
    report = compare_codes(sae, z_before, z_after, labels, normalize=normalize,
                           class_names=class_names or _class_names(dataset, (finetuned,)),
                           top_features=top_features, top_images=top_images, rank_by=rank_by)
    if rows is not None:
        report.remap_indices(rows)
    report.metadata.update(sae_config={k: v for k, v in sae.config.to_dict().items() if k != "training_metrics"},
                           max_samples=max_samples, seed=seed)
    if output_path is not None:
        report.save_json(output_path)
    return report




# ----------------------------------------------------------------------------------------------------------------
# Feature pages: one feature seen through every model (what saev / Neuronpedia show per feature)
# ----------------------------------------------------------------------------------------------------------------

PRETRAINED_NAME = "pre-trained"
PROFILES_FILENAME = "feature_profiles.json"


@dataclass
class FeatureProfile:
    """One SAE feature under the pre-trained model and every fine-tuned model, for its feature page.

    Every per-model field is a dict keyed by model name (`PRETRAINED_NAME` for the pre-trained model, then the
    fine-tuned models' names, in `models` order). "Active" means a non-zero code, as in `compare_codes`, so
    `frequency[PRETRAINED_NAME] == report.frequency_before[feature]` and `frequency[name] ==
    reports[name].frequency_after[feature]` exactly.

    Attributes:
        feature: latent index.
        models: model names, pre-trained first.
        roles: why the feature has a page: [{"model", "direction" ("added" / "removed" / "frequency"), "count",
            "rank"}] (count = images added / removed on, or the signed change in active images for "frequency").
        sign: +1 or -1, the sign of the feature's typical code (signed TopK SAEs can fire negatively; its direction
            in input space is then `-W_dec[feature]`).
        frequency / mean_activation: fraction of images where it is active / mean signed code over those images.
        max_activation: the largest |code| (0 if never active).
        top_indices / top_activations: dataset rows with the largest |code| under that model, and their signed codes.
        histogram_edges: [bins + 1] edges shared by every model (signed codes, active images only), so the
            histograms of one feature compare bin for bin.
        histogram_counts: [bins] active images per bin.
        text: best-aligned prompts (filled by `saeft_hf.interpret.text.describe_profiles`).
    """

    feature: int
    models: list[str]
    roles: list[dict[str, Any]]
    sign: float
    frequency: dict[str, float]
    mean_activation: dict[str, float]
    max_activation: dict[str, float]
    top_indices: dict[str, list[int]]
    top_activations: dict[str, list[float]]
    histogram_edges: list[float]
    histogram_counts: dict[str, list[int]]
    text: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureProfile:
        return cls(**data)

    def remap_indices(self, rows: Sequence[int]) -> None:
        """Replace image positions p by `rows[p]` (see `FeatureChangeReport.remap_indices`), in place."""
        self.top_indices = {m: [int(rows[i]) for i in idx] for m, idx in self.top_indices.items()}


def select_features(reports: Mapping[str, FeatureChangeReport], *, per_direction: int = 12,
                    by_frequency: int = 4) -> list[tuple[int, list[dict[str, Any]]]]:
    """The features that get a page, in page order, each with its roles (see `FeatureProfile.roles`).

    Per model: its `per_direction` most added and most removed features (the report's ranking), then its
    `by_frequency` features whose number of active images changed most (|after - before|, ties to the lower index)
    among those not yet listed. A feature listed by several models or directions gets one page with every role.
    """
    order: dict[int, list[dict[str, Any]]] = {}
    for name, report in reports.items():
        for direction in DIRECTIONS:
            for rank, change in enumerate(report.top(direction)[:per_direction]):
                order.setdefault(change.feature, []).append(
                    {"model": name, "direction": direction, "count": change.count, "rank": rank + 1})
        if by_frequency > 0:
            delta = (np.asarray(report.frequency_after) - np.asarray(report.frequency_before)) * report.n_images
            delta = np.rint(delta).astype(np.int64)
            candidates = [j for j in np.lexsort((np.arange(delta.size), -np.abs(delta))).tolist()
                          if delta[j] != 0 and j not in order][:by_frequency]
            for rank, j in enumerate(candidates):
                order[j] = [{"model": name, "direction": "frequency", "count": int(delta[j]), "rank": rank + 1}]
    return list(order.items())


@torch.no_grad()
def profile_features(
    sae: SparseAutoencoder,
    embeddings: Mapping[str, torch.Tensor],
    features: Sequence[int] | Sequence[tuple[int, list[dict[str, Any]]]],
    *,
    normalize: bool | None = None,
    top_images: int = 8,
    bins: int = 24,
    chunk_size: int = 4096,
) -> list[FeatureProfile]:
    """Per-feature statistics under each model: what a feature page shows (pure function of embeddings).

    Args:
        embeddings: {model name: [N, d] embeddings}, the pre-trained model first (its name is used as given;
            `interpret_runs` uses `PRETRAINED_NAME`), all on the same images in the same order.
        features: feature indices, or `select_features` output (indices with their roles).
        normalize: the input regime, as in `compare_codes`.
        top_images: top-activating rows kept per model.
        bins: histogram bins (edges shared across models for one feature).
    """
    if not embeddings:
        raise ValueError("profile_features needs the embeddings of at least one model.")
    items = [(f, []) if isinstance(f, (int, np.integer)) else (int(f[0]), list(f[1])) for f in features]
    ids = [int(j) for j, _ in items]
    d_sae = sae.config.d_sae
    if any(not 0 <= j < d_sae for j in ids):
        raise ValueError(f"Feature indices must be in [0, {d_sae}); got {ids}.")
    shapes = {name: tuple(z.shape) for name, z in embeddings.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"Every model's embeddings must have the same shape [N, d]; got {shapes}.")
    if bins < 1 or top_images < 0:
        raise ValueError("bins must be >= 1 and top_images >= 0.")
    was_training = sae.training
    sae.eval()
    device = sae.W_enc.device
    index = torch.tensor(ids, dtype=torch.long, device=device)
    columns: dict[str, torch.Tensor] = {}  # [N, m] codes of the selected features only
    for name, z in embeddings.items():
        sae.check_compatible(d_in=z.shape[1])
        x = sae_inputs(sae, z.float(), normalize)
        parts = [sae.encode(x[s:s + chunk_size].to(device)).index_select(1, index).float().cpu()
                 for s in range(0, x.shape[0], chunk_size)]
        columns[name] = torch.cat(parts) if parts else torch.zeros(0, len(ids))
    sae.train(was_training)

    n = next(iter(shapes.values()))[0]
    profiles: list[FeatureProfile] = []
    for col, (j, roles) in enumerate(items):
        values = {name: codes[:, col] for name, codes in columns.items()}
        active = {name: v[v != 0] for name, v in values.items()}
        pooled = torch.cat(list(active.values()))
        low, high = (float(pooled.min()), float(pooled.max())) if pooled.numel() else (0.0, 1.0)
        if high <= low:  # one distinct value: a unit-wide bin around it
            low, high = low - 0.5, high + 0.5
        edges = torch.linspace(low, high, bins + 1, dtype=torch.float64)
        first_active = next((a for a in active.values() if a.numel()), torch.ones(1))
        sign = -1.0 if float(first_active.double().mean()) < 0 else 1.0
        top_idx: dict[str, list[int]] = {}
        top_val: dict[str, list[float]] = {}
        for name, v in values.items():
            keep = min(top_images, int((v != 0).sum()))
            order = v.abs().topk(keep).indices if keep else torch.zeros(0, dtype=torch.long)
            top_idx[name] = [int(i) for i in order]
            top_val[name] = [float(v[i]) for i in order]
        profiles.append(FeatureProfile(
            feature=j, models=list(embeddings), roles=roles, sign=sign,
            frequency={name: int(a.numel()) / n for name, a in active.items()},
            mean_activation={name: float(a.double().mean()) if a.numel() else 0.0 for name, a in active.items()},
            max_activation={name: float(a.abs().max()) if a.numel() else 0.0 for name, a in active.items()},
            top_indices=top_idx, top_activations=top_val, histogram_edges=edges.tolist(),
            histogram_counts={name: torch.histc(a.double(), bins=bins, min=low, max=high).long().tolist()
                              if a.numel() else [0] * bins for name, a in active.items()},
        ))
    return profiles


def save_profiles(profiles: Sequence[FeatureProfile], path: str | Path) -> Path:
    """Write the profiles as a JSON list (atomically). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps([p.to_dict() for p in profiles], indent=1, allow_nan=False), encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_profiles(path: str | Path) -> list[FeatureProfile]:
    return [FeatureProfile.from_dict(item) for item in json.loads(Path(path).read_text(encoding="utf-8"))]


# ----------------------------------------------------------------------------------------------------------------
# Patch heatmaps (SAEs on hidden states)
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def patch_activations(
    model: nn.Module,
    sae: SparseAutoencoder,
    pixel_values: torch.Tensor,
    features: Sequence[int],
    *,
    normalize: bool | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """The features' SAE pre-activations on every patch token: [B, C, H, W] -> [B, m, grid_h, grid_w].

    For an SAE on `hidden_states.{i}.{cls|mean}`, each patch token of hidden state i (the CLS token excluded) goes
    through the SAE's encoder as if it were the pooled vector: ``sae.pre_activations(sae_inputs(sae, h_p))``. The
    pre-activation (before TopK / ReLU) is what is mapped, because a sparsifying activation applied to one patch
    would blank most of the map. For `.mean` pooling with raw inputs (`input_normalization="none"`, or
    `normalize=False`) the map averages exactly to the pooled image's pre-activation (the encoder is affine).

    Raises:
        ValueError: the SAE is not on a `hidden_states.*` representation, or the patches do not form a square grid.
    """
    from transformers import CLIPModel

    from ..modeling import parse_representation

    kind, layer, _ = parse_representation(sae.config.representation)
    if kind != "hidden_states":
        raise ValueError(f"Patch heatmaps need an SAE on `hidden_states.{{i}}.{{cls|mean}}`; this one is on "
                         f"`{sae.config.representation}`, which has no per-patch vectors.")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(base, (SAEFTCLIPForImageClassification, CLIPModel)):
        raise TypeError(f"patch_activations needs a CLIP vision model, got {type(base).__name__}.")
    was_training = (model.training, sae.training)
    model.eval()
    sae.eval()
    device = sae.W_enc.device
    model_device = next(base.parameters()).device
    index = torch.tensor(list(features), dtype=torch.long, device=device)
    maps = []
    for start in range(0, pixel_values.shape[0], batch_size):
        pixels = pixel_values[start:start + batch_size].to(model_device)
        hidden = base.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[layer][:, 1:]
        b, p, d = hidden.shape
        side = math.isqrt(p)
        if side * side != p:
            raise ValueError(f"{p} patch tokens do not form a square grid; cannot draw a heatmap.")
        x = sae_inputs(sae, hidden.reshape(b * p, d).float().to(device), normalize)
        pre = sae.pre_activations(x).index_select(1, index)  # [b * p, m]
        maps.append(pre.reshape(b, side, side, -1).permute(0, 3, 1, 2).float().cpu())
    model.train(was_training[0])
    sae.train(was_training[1])
    return torch.cat(maps) if maps else torch.zeros(0, len(index), 0, 0)
