"""The sparse autoencoder: `SAEConfig` and `SparseAutoencoder`.

Parameters are named and shaped like SAELens (`W_enc` [d_in, d_sae], `b_enc` [d_sae], `W_dec` [d_sae, d_in],
`b_dec` [d_in]); `b_dec` is the pre-bias, subtracted before encoding and added after decoding. The default,
`activation="topk_signed"`, is the paper's TopK: keep the k largest raw pre-activations, no ReLU, no encoder bias.

Files: `config.json` (every `SAEConfig` field, including what the SAE was trained on) and `model.safetensors`.
Loading is safetensors-only and strict: a missing, extra or mis-shaped tensor, an unknown config key or a pickle file
is refused with a message that says what to do.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard, ModelCardData, PyTorchModelHubMixin, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id
from safetensors.torch import load_file, save_file
from torch import nn

from .modeling import parse_representation

Activation = Literal["topk_signed", "topk", "batchtopk", "relu"]
ACTIVATIONS: tuple[str, ...] = ("topk_signed", "topk", "batchtopk", "relu")
INPUT_NORMALIZATIONS: tuple[str, ...] = ("unit_norm", "none")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PICKLE_NAMES = ("pytorch_model.bin", "model.bin", "model.pt", "sae.pt", "model.pth")


class SAELoadError(ValueError):
    """A saved SAE could not be loaded: bad config, missing file, or weights that disagree with the config."""


class _NotCached(SAELoadError):
    """Offline, and the Hub repo's config.json is not in the local cache."""


class SAEMismatchError(ValueError):
    """The SAE does not fit the model or representation it is being used on."""


@dataclass
class SAEConfig:
    """Shape, activation and provenance of a sparse autoencoder.

    Parameters:
        d_in: width of the input vectors (512 for CLIP ViT-B image embeddings).
        d_sae: number of latents (dictionary size F; the paper uses 4 * d_in).
        k: active latents per input for the TopK family (`topk_signed`, `topk`, `batchtopk`); unused for `relu`.
        activation: `topk_signed` (paper: raw TopK, codes may be negative, exactly k non-zeros, no encoder bias),
            `topk` (ReLU then TopK), `batchtopk` (TopK over the whole batch in training, a learned threshold at
            inference), `relu` (ReLU trained with an L1 penalty weighted by decoder norms).
        input_normalization: `unit_norm` (scale each input to unit L2 norm, as the paper) or `none`.
            Applied by `preprocess`, never inside `encode`.
        l1_coefficient: weight of the L1 sparsity loss (`relu` only).
        source_model: the model whose representations the SAE was trained on (Hub id or path).
        representation: which representation: `image_embeds` (final projected CLIP image embedding), `pooler_output`,
            or `hidden_states.{layer}.cls` / `hidden_states.{layer}.mean`.
        training_metrics: final metrics of `train_sae` (fvu, l0, dead_fraction, ...), written into the model card.
        provenance: what made this SAE when a run trained it itself (its settings and a fingerprint of the images,
            see `saeft_hf.validation.sae_training_key`); a later run in the same output_dir reuses the SAE only when
            they match. Empty for SAEs trained otherwise.
    """

    d_in: int
    d_sae: int
    k: int | None = 32
    activation: str = "topk_signed"
    input_normalization: str = "unit_norm"
    l1_coefficient: float = 0.0
    source_model: str | None = None
    representation: str = "image_embeds"
    training_metrics: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Types first: a wrong type found here is a clear error; found when the card is written, a crash after training.
        for name in ("training_metrics", "provenance"):
            value = getattr(self, name)
            if not isinstance(value, dict):
                raise ValueError(f"SAEConfig.{name} must be a JSON object (name -> value), got "
                                 f"{type(value).__name__} {value!r}.")
        for name in ("activation", "input_normalization", "representation"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"SAEConfig.{name} must be a string, got {getattr(self, name)!r}.")
        if self.source_model is not None and not isinstance(self.source_model, str):
            raise ValueError(f"SAEConfig.source_model must be a string or null, got {self.source_model!r}.")
        parse_representation(self.representation)
        if (not isinstance(self.l1_coefficient, (int, float)) or isinstance(self.l1_coefficient, bool)
                or not math.isfinite(self.l1_coefficient)):
            raise ValueError(f"SAEConfig.l1_coefficient must be a finite number, got {self.l1_coefficient!r}.")
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"SAEConfig.{name} must be a positive int, got {value!r}.")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"Unknown SAE activation {self.activation!r}; choose one of {', '.join(ACTIVATIONS)}."
            )
        if self.activation != "relu":
            if not isinstance(self.k, int) or isinstance(self.k, bool) or not 0 < self.k <= self.d_sae:
                raise ValueError(
                    f"activation={self.activation!r} needs an int k in [1, d_sae={self.d_sae}], got k={self.k!r}."
                )
        if self.input_normalization not in INPUT_NORMALIZATIONS:
            raise ValueError(
                f"Unknown input_normalization {self.input_normalization!r}; choose one of "
                f"{', '.join(INPUT_NORMALIZATIONS)}."
            )
        if self.l1_coefficient < 0:
            raise ValueError(f"l1_coefficient must be >= 0, got {self.l1_coefficient}.")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        """Build a config from a saved dict, refusing unknown keys (they mean a corrupted or foreign file)."""
        if not isinstance(data, dict):
            raise SAELoadError(f"An SAE config must be a JSON object, got {type(data).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SAELoadError(
                f"SAE config has unknown keys {unknown}; expected only {sorted(known)}. The file is corrupted or "
                "was not written by saeft-hf: re-save the SAE with `SparseAutoencoder.save_pretrained`."
            )
        missing = [f.name for f in fields(cls) if f.name in ("d_in", "d_sae") and f.name not in data]
        if missing:
            raise SAELoadError(f"SAE config is missing required keys {missing}.")
        try:
            return cls(**data)
        except (TypeError, ValueError) as err:
            raise SAELoadError(f"Invalid SAE config: {err}") from err

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SAEOutput:
    """What `SparseAutoencoder.forward` returns.

    Attributes:
        x: the preprocessed input [B, d_in] (what was encoded and what `reconstruction` approximates).
        pre_activations: encoder outputs before sparsification [B, d_sae].
        codes: sparse codes [B, d_sae].
        reconstruction: decoded codes [B, d_in].
    """

    x: torch.Tensor
    pre_activations: torch.Tensor
    codes: torch.Tensor
    reconstruction: torch.Tensor


SAE_CARD_TEMPLATE = """---
{{ card_data }}
---

# Sparse autoencoder for SAE-FT

A sparse autoencoder trained with [saeft-hf](https://github.com/saeft-hf/saeft-hf) on `{{ representation }}` of
`{{ source_model }}`. It is the dictionary that SAE-FT uses to keep fine-tuning from adding or removing semantic
features (arXiv 2605.15961).

| | |
|---|---|
| d_in / d_sae / k | {{ d_in }} / {{ d_sae }} / {{ k }} |
| activation | `{{ activation }}` |
| input normalisation | `{{ input_normalization }}` |

## Training metrics
{{ metrics_table }}

## Use
```python
from saeft_hf import SparseAutoencoder
sae = SparseAutoencoder.from_pretrained("{{ repo_id }}")
codes = sae.encode(sae.preprocess(image_embeds))
```
"""


class SparseAutoencoder(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="saeft-hf",
    tags=["sparse-autoencoder", "clip", "sae-ft"],
    license="apache-2.0",
    repo_url="https://github.com/saeft-hf/saeft-hf",
    paper_url="https://arxiv.org/abs/2605.15961",
    model_card_template=SAE_CARD_TEMPLATE,
):
    """A sparse autoencoder over vectors of width `config.d_in`.

    `encode` and `decode` work on inputs exactly as given; `preprocess` applies the configured input normalisation;
    `forward(x)` does all three and returns an `SAEOutput`.
    """

    def __init__(self, config: SAEConfig) -> None:
        super().__init__()
        if isinstance(config, dict):
            config = SAEConfig.from_dict(config)
        self.config = config
        d_in, d_sae = config.d_in, config.d_sae
        # Init as the reference: Kaiming-uniform encoder, decoder with unit-norm atoms, zero biases.
        w_enc = torch.empty(d_sae, d_in)
        nn.init.kaiming_uniform_(w_enc, a=math.sqrt(5))
        w_dec = torch.empty(d_sae, d_in)
        nn.init.kaiming_uniform_(w_dec, a=math.sqrt(5))
        self.W_enc = nn.Parameter(w_enc.T.contiguous())
        self.W_dec = nn.Parameter(F.normalize(w_dec, dim=-1))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        # The paper's TopK has no encoder bias: keep it at zero by never training it.
        self.b_enc.requires_grad_(config.activation != "topk_signed")
        # BatchTopK's inference threshold, estimated during training (a buffer: saved, never optimised).
        self.register_buffer("threshold", torch.zeros(()), persistent=config.activation == "batchtopk")

    # ----------------------------------------------------------------------------------------------------------
    # Core maths
    # ----------------------------------------------------------------------------------------------------------
    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the configured input normalisation. [..., d_in] -> [..., d_in]."""
        if self.config.input_normalization == "unit_norm":
            return F.normalize(x, dim=-1, eps=1e-8)
        return x

    def pre_activations(self, x: torch.Tensor, *, detach_weights: bool = False) -> torch.Tensor:
        """`(x - b_dec) @ W_enc + b_enc`. [B, d_in] -> [B, d_sae]."""
        w_enc, b_enc, b_dec = self.W_enc, self.b_enc, self.b_dec
        if detach_weights:
            w_enc, b_enc, b_dec = w_enc.detach(), b_enc.detach(), b_dec.detach()
        w_enc = w_enc.to(x.dtype)
        return torch.addmm(b_enc.to(x.dtype), x - b_dec.to(x.dtype), w_enc)

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """Sparsify pre-activations into codes. [B, d_sae] -> [B, d_sae]."""
        activation, k = self.config.activation, self.config.k
        if activation == "relu":
            return F.relu(pre)
        if activation == "topk_signed":
            return _keep_topk(pre, k)
        if activation == "topk":
            return _keep_topk(F.relu(pre), k)
        # batchtopk
        post = F.relu(pre)
        if self.training:
            flat = post.flatten()
            n_keep = min(k * pre.shape[0], flat.numel())
            values, indices = flat.topk(n_keep, sorted=False)
            codes = torch.zeros_like(flat).scatter(0, indices, values).view_as(post)
            return codes
        return post * (post > self.threshold.to(post.dtype))

    def encode(self, x: torch.Tensor, *, detach_weights: bool = False) -> torch.Tensor:
        """Dense codes of `x` exactly as given (no normalisation). [B, d_in] -> [B, d_sae].

        `detach_weights=True` treats the SAE as a constant: gradients reach `x` but never the SAE's parameters.
        """
        self._check_width(x)
        return self.activate(self.pre_activations(x, detach_weights=detach_weights))

    def decode(self, codes: torch.Tensor, *, detach_weights: bool = False) -> torch.Tensor:
        """`codes @ W_dec + b_dec`. [B, d_sae] -> [B, d_in]."""
        w_dec, b_dec = self.W_dec, self.b_dec
        if detach_weights:
            w_dec, b_dec = w_dec.detach(), b_dec.detach()
        return torch.addmm(b_dec.to(codes.dtype), codes, w_dec.to(codes.dtype))

    def forward(self, x: torch.Tensor) -> SAEOutput:
        """Preprocess, encode and decode. [B, d_in] -> `SAEOutput`.

        For `topk_signed` and `topk` the decode reads only the k kept atoms per row (`embedding_bag`). In fp32
        without autocast the backward also uses the sparsity: the encoder and decoder weight gradients come from the
        k kept entries per row (sparse matmuls on CPU, where they beat dense ones), the pre-bias gradient from a
        [d_sae] vector, and no dense [B, d_sae] gradient is built unless `pre_activations` itself is in the loss
        (AuxK). Same values and gradients as `decode(activate(pre_activations(x)))` up to float summation order.
        """
        x = self.preprocess(x)
        self._check_width(x)
        activation = self.config.activation
        if activation not in ("topk_signed", "topk"):
            pre = self.pre_activations(x)
            codes = self.activate(pre)
            return SAEOutput(x=x, pre_activations=pre, codes=codes, reconstruction=self.decode(codes))
        if x.dim() == 2 and x.dtype == self.W_enc.dtype and not torch.is_autocast_enabled(x.device.type):
            pre, values, indices = _TopKEncode.apply(x, self.W_enc, self.b_enc, self.b_dec, self.config.k)
        else:
            pre = self.pre_activations(x)
            values, indices = pre.topk(self.config.k, dim=-1, sorted=False)
        if activation == "topk":
            values = F.relu(values)  # = TopK(ReLU(pre)): a kept non-positive entry becomes a zero code either way
        codes = torch.zeros_like(pre).scatter_(-1, indices, values)
        weight = self.W_dec if self.W_dec.dtype == values.dtype else self.W_dec.to(values.dtype)
        reconstruction = _TopKDecode.apply(values, indices, codes.detach(), weight)
        reconstruction = reconstruction + self.b_dec.to(reconstruction.dtype)
        return SAEOutput(x=x, pre_activations=pre, codes=codes, reconstruction=reconstruction)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every decoder atom (row of `W_dec`) to unit L2 norm, in place."""
        self.W_dec.copy_(F.normalize(self.W_dec, dim=-1))

    # ----------------------------------------------------------------------------------------------------------
    # Safety checks
    # ----------------------------------------------------------------------------------------------------------
    def _check_width(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.config.d_in:
            raise SAEMismatchError(
                f"The SAE expects vectors of width d_in={self.config.d_in} but got {x.shape[-1]} "
                f"(input shape {tuple(x.shape)}). Use an SAE trained on this model's "
                f"`{self.config.representation}`, or train one with `train_sae`."
            )

    def check_compatible(
        self, *, d_in: int | None = None, source_model: str | None = None, representation: str | None = None
    ) -> None:
        """Raise `SAEMismatchError` if this SAE was trained on another width, model or representation.

        An SAE whose config does not record its source (None) is accepted for that field.
        """
        cfg = self.config
        if d_in is not None and d_in != cfg.d_in:
            raise SAEMismatchError(
                f"SAE width mismatch: the SAE has d_in={cfg.d_in} but the model's `{representation or cfg.representation}`"
                f" has width {d_in}. Train an SAE on this model (recipes/train_sae.py) or pass the matching one."
            )
        if representation is not None and representation != cfg.representation:
            raise SAEMismatchError(
                f"The SAE was trained on `{cfg.representation}` but is being applied to `{representation}`. "
                f"Set the model's representation to `{cfg.representation}` or train an SAE on `{representation}`."
            )
        if source_model is not None and cfg.source_model is not None:
            if _same_model(source_model, cfg.source_model):
                return
            raise SAEMismatchError(
                f"The SAE was trained on `{cfg.source_model}` but the model being fine-tuned is `{source_model}`. "
                "An SAE only describes the embeddings of the model it was trained on: train one for this model "
                "(recipes/train_sae.py), or pass `allow_sae_source_mismatch=True` if they are the same weights."
            )

    def check_weights(self) -> None:
        """Raise `SAELoadError` if the weights are non-finite or degenerate (an all-zero encoder or decoder).

        An all-zero encoder or decoder makes every code or reconstruction 0, so the SAE-FT add/remove terms vanish
        and training is silently plain fine-tuning; a NaN or inf weight poisons the loss.
        """
        problems = []
        for name, tensor in self.state_dict().items():
            if tensor.is_floating_point():
                bad = int((~torch.isfinite(tensor)).sum())
                if bad:
                    problems.append(f"{name} has {bad} NaN/inf value(s)")
        for name in ("W_enc", "W_dec"):
            if not getattr(self, name).detach().any():
                problems.append(f"{name} is all zeros")
        if problems:
            raise SAELoadError(
                f"SAE weights are unusable: {'; '.join(problems)}. An all-zero encoder or decoder would make the "
                "SAE-FT penalty vanish and NaN/inf weights poison the loss. Retrain the SAE (recipes/train_sae.py) "
                "or re-download it."
            )

    # ----------------------------------------------------------------------------------------------------------
    # Saving and loading (safetensors only)
    # ----------------------------------------------------------------------------------------------------------
    def _save_pretrained(self, save_directory: Path) -> None:
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        tmp = save_directory / f".{WEIGHTS_NAME}.tmp"
        save_file(state, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, save_directory / WEIGHTS_NAME)  # a crash mid-write never leaves a truncated file

    def save_pretrained(  # type: ignore[override]
        self,
        save_directory: str | Path,
        *,
        config: Any = None,
        repo_id: str | None = None,
        push_to_hub: bool = False,
        model_card_kwargs: dict[str, Any] | None = None,
        format: str = "saeft",
        **push_to_hub_kwargs: Any,
    ) -> str | None:
        """Write `config.json`, `model.safetensors` and a model card (README.md) into `save_directory`.

        `format="saelens"` writes instead a folder SAELens loads (`cfg.json` + `sae_weights.safetensors`, see
        `saeft_hf.sae_formats`), and raises `ValueError` naming why for SAEs SAELens cannot express (`topk_signed`,
        unit-norm inputs). `config` is accepted for compatibility with `PyTorchModelHubMixin.push_to_hub` and ignored:
        the SAE's own `self.config` is always what is written.
        """
        if format not in ("saeft", "saelens"):
            raise ValueError(f"Unknown SAE format {format!r}; choose 'saeft' (saeft-hf's own) or 'saelens'.")
        if format == "saelens":
            if push_to_hub:
                raise ValueError("push_to_hub writes saeft-hf's own format; to share the SAELens copy, upload the "
                                 "folder it writes with `hf upload REPO_ID FOLDER`.")
            from .sae_formats import save_saelens

            save_saelens(self.config, self.state_dict(), save_directory)
            return None
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        self._save_pretrained(save_directory)
        tmp = save_directory / f".{CONFIG_NAME}.tmp"
        tmp.write_text(json.dumps(self.config.to_dict(), sort_keys=True, indent=2))
        os.replace(tmp, save_directory / CONFIG_NAME)
        self.generate_model_card(**(model_card_kwargs or {})).save(save_directory / "README.md")
        if push_to_hub:
            return self.push_to_hub(
                repo_id=repo_id or save_directory.name, model_card_kwargs=model_card_kwargs, **push_to_hub_kwargs
            )
        return None

    def push_to_hub(self, repo_id: str, *, model_card_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> str:  # type: ignore[override]
        """Upload config, weights and a model card (with the training metrics) to `repo_id` on the Hub."""
        card_kwargs = {"repo_id": repo_id, **(model_card_kwargs or {})}
        return super().push_to_hub(repo_id, model_card_kwargs=card_kwargs, **kwargs)

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        cfg = self.config
        metrics = cfg.training_metrics or {}
        rows = "\n".join(f"| {key} | {_fmt(value)} |" for key, value in sorted(metrics.items()))
        table = f"| metric | value |\n|---|---|\n{rows}" if rows else "Not recorded."
        card_data = ModelCardData(
            library_name="saeft-hf",
            license="apache-2.0",
            tags=["sparse-autoencoder", "clip", "sae-ft"],
            base_model=cfg.source_model if cfg.source_model and "/" in cfg.source_model and not os.path.isdir(cfg.source_model) else None,
        )
        return ModelCard.from_template(
            card_data,
            template_str=SAE_CARD_TEMPLATE,
            metrics_table=table,
            repo_id=kwargs.get("repo_id") or "<repo_id or local path>",
            **{key: value for key, value in cfg.to_dict().items() if key not in ("training_metrics", "provenance")},
        )

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
        map_location: str | torch.device = "cpu",
        subfolder: str | None = None,
        default_representation: str | None = None,
    ) -> SparseAutoencoder:
        """Load an SAE from a local directory or a Hub repo (safetensors only; strict keys and shapes), in eval mode.

        Besides saeft-hf's own folders, reads SAELens (`cfg.json` + `sae_weights.safetensors`) and EleutherAI sparsify
        (`cfg.json` + `sae.safetensors`) SAEs whose encode it reproduces exactly, and refuses the others naming why
        (see `saeft_hf.sae_formats`). A folder or repo holding one SAE per hookpoint needs `subfolder`; the error
        lists the choices. `default_representation`: the representation to record for a foreign SAE whose files do
        not name one of saeft-hf's (default `image_embeds`, with a warning).
        """
        from . import sae_formats

        source = str(pretrained_model_name_or_path)
        is_dir = os.path.isdir(source)
        _check_sae_source(source, is_dir)
        if is_dir:
            folder = Path(source, subfolder or "")
            if subfolder and not folder.is_dir() and (choices := sae_formats.sae_subfolders(source)):
                raise sae_formats.choose_subfolder_error(f"`{source}` has no sub-folder {subfolder!r}; it", choices)
            if sae_formats.detect_format(folder):
                return cls._from_foreign(folder, default_representation, map_location)
            if not _is_own_config(folder / CONFIG_NAME) and (choices := sae_formats.sae_subfolders(folder)):
                raise sae_formats.choose_subfolder_error(f"`{folder}`", choices)

        def resolve(filename: str) -> str:
            if is_dir:
                path = os.path.join(source, subfolder or "", filename)
                if not os.path.isfile(path):
                    raise FileNotFoundError(path)
                return path
            try:
                return hf_hub_download(
                    source, filename, subfolder=subfolder, revision=revision, token=token, cache_dir=cache_dir,
                    local_files_only=local_files_only, force_download=force_download,
                )
            except RepositoryNotFoundError as err:  # also gated/private repos
                raise SAELoadError(
                    f"No SAE at `{source}`: there is no such local folder, and no Hub repo `{source}` you can read "
                    f"({type(err).__name__}). Give the folder written by `SparseAutoencoder.save_pretrained`, or a "
                    "Hub repo id; for a private or gated repo log in (`hf auth login`)."
                ) from err
            except RevisionNotFoundError as err:
                raise SAELoadError(f"The Hub repo `{source}` has no revision {revision!r}.") from err
            except LocalEntryNotFoundError as err:
                if filename != CONFIG_NAME:
                    raise
                raise _NotCached(
                    f"No SAE at `{source}`: there is no such local folder, and the Hub repo `{source}` is not in the "
                    "local cache and cannot be downloaded (offline?). Check the path, or go online once to download it."
                ) from err
            except (HfHubHTTPError, OSError) as err:
                if isinstance(err, (FileNotFoundError, EntryNotFoundError)):
                    raise
                raise SAELoadError(f"Could not download the SAE `{source}` from the Hub ({type(err).__name__}: {err}). "
                                   "Check the network and the repo id.") from err

        not_cached: _NotCached | None = None
        try:
            config_path = resolve(CONFIG_NAME)
        except _NotCached as err:  # offline: a cached SAELens or sparsify repo has no config.json, try those next
            config_path, not_cached = None, err
        except (FileNotFoundError, EntryNotFoundError) as err:
            if is_dir:
                raise SAELoadError(
                    f"No {CONFIG_NAME} for an SAE at `{source}`{f' (subfolder {subfolder})' if subfolder else ''}. "
                    "Pass the directory written by `SparseAutoencoder.save_pretrained`, or an SAELens or sparsify "
                    "SAE folder (cfg.json)."
                ) from err
            config_path = None
        if not is_dir and not _is_own_config(config_path):
            # No saeft-hf config (or a sparsify run's config.json): an SAELens or sparsify repo, or none at all.
            try:
                root, sub = sae_formats.hub_snapshot(
                    source, subfolder, revision=revision, token=token, cache_dir=cache_dir,
                    local_files_only=local_files_only, force_download=force_download,
                )
            except (HfHubHTTPError, OSError) as err:
                if not_cached is not None:
                    raise not_cached from err
                raise SAELoadError(f"Could not download the SAE `{source}` from the Hub ({type(err).__name__}: "
                                   f"{err}). Check the network and the repo id.") from err
            return cls._from_foreign(root / sub, default_representation, map_location)
        try:
            with open(config_path, encoding="utf-8") as fh:
                raw = json.load(fh)
        except json.JSONDecodeError as err:
            raise SAELoadError(f"The SAE config {config_path} is not valid JSON ({err}); the file is corrupted.") from err
        config = SAEConfig.from_dict(raw)

        try:
            weights_path = resolve(WEIGHTS_NAME)
        except (FileNotFoundError, EntryNotFoundError) as err:
            pickles = [n for n in PICKLE_NAMES if os.path.isfile(os.path.join(source, subfolder or "", n))]
            pickle_path = os.path.join(source, subfolder or "", pickles[0]) if pickles else ""
            hint = (
                f" Found {pickles}: pickle files can run arbitrary code, so saeft-hf refuses to load them. If you "
                "trust the file, convert it once (it is read with torch.load(weights_only=True), using the "
                "config.json beside it, and model.safetensors is written next to it): "
                f"`saeft_hf.sae.convert_pickle_to_safetensors({pickle_path!r})`."
                if pickles else ""
            )
            raise SAELoadError(f"No {WEIGHTS_NAME} for the SAE at `{source}`.{hint}") from err

        try:
            state = load_file(weights_path, device=str(map_location))
        except Exception as err:  # safetensors raises its own error types for truncated files
            raise SAELoadError(f"Could not read SAE weights {weights_path}: {err}. The file is corrupted.") from err
        return cls._from_state(config, state, weights_path, source, map_location)

    @classmethod
    def _from_foreign(cls, folder: Path, default_representation: str | None,
                      map_location: str | torch.device) -> SparseAutoencoder:
        from .sae_formats import read_foreign

        config, state, kind = read_foreign(folder, default_representation=default_representation)
        return cls._from_state(config, state, folder, f"{folder} ({kind})", map_location)

    @classmethod
    def _from_state(cls, config: SAEConfig, state: dict[str, torch.Tensor], weights_path: str | Path, source: str,
                    map_location: str | torch.device) -> SparseAutoencoder:
        """The SAE of `config` with the tensors `state`, refused unless keys, shapes and values are all sound."""
        sae = cls(config)
        expected = sae.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        bad_shapes = [
            f"{name}: file {tuple(state[name].shape)} vs config {tuple(expected[name].shape)}"
            for name in expected if name in state and state[name].shape != expected[name].shape
        ]
        if missing or unexpected or bad_shapes:
            raise SAELoadError(
                f"SAE weights in {weights_path} do not match its config (d_in={config.d_in}, d_sae={config.d_sae}, "
                f"activation={config.activation}): missing {missing}, unexpected {unexpected}, shapes {bad_shapes}."
            )
        sae.load_state_dict(state, strict=True)
        try:
            sae.check_weights()
        except SAELoadError as err:
            raise SAELoadError(f"The SAE at `{source}` is unusable: {err}") from err
        return sae.to(map_location).eval()  # like transformers: BatchTopK then encodes with its inference threshold


def _keep_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Zero all but the k largest entries of each row. [B, F] -> [B, F]; gradients flow through the kept ones."""
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, indices, values)


def _sparse_rows_t(indices: torch.Tensor, values: torch.Tensor, n_cols: int) -> torch.Tensor:
    """The transpose [n_cols, B] of the [B, n_cols] matrix with `values` [B, k] at `indices` [B, k], as sparse COO."""
    rows = torch.arange(indices.shape[0], device=indices.device).repeat_interleave(indices.shape[1])
    return torch.sparse_coo_tensor(torch.stack([indices.reshape(-1), rows]), values.reshape(-1),
                                   (n_cols, indices.shape[0]), check_invariants=False)


def _use_sparse_backward(t: torch.Tensor) -> bool:
    # CPU: k-sparse matmuls are several times faster than dense ones at SAE sizes; on GPUs dense matmuls win.
    return t.device.type == "cpu"


class _TopKEncode(torch.autograd.Function):
    """`pre = (x - b_dec) @ W_enc + b_enc` and its top k per row; returns (pre, values, indices).

    Same forward as `pre_activations` + `topk`. The backward takes the gradient of the kept values [B, k]: when
    `pre` itself gets no gradient, the weight gradient is a k-sparse product (CPU) and no dense [B, d_sae] gradient
    is built; the pre-bias gradient is `-(W_enc @ column sums)`, a vector product instead of a [B, d_in] matmul.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor,
                k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        centred = x - b_dec
        pre = torch.addmm(b_enc, centred, w_enc)
        values, indices = pre.topk(k, dim=-1, sorted=False)
        ctx.save_for_backward(centred, w_enc, indices)
        ctx.mark_non_differentiable(indices)
        ctx.set_materialize_grads(False)
        return pre, values, indices

    @staticmethod
    def backward(ctx: Any, grad_pre: torch.Tensor | None, grad_values: torch.Tensor | None,
                 _grad_indices: Any) -> tuple[torch.Tensor | None, ...]:
        centred, w_enc, indices = ctx.saved_tensors
        need_x, need_w, need_b_enc, need_b_dec, _ = ctx.needs_input_grad
        if grad_pre is None and grad_values is None:
            return None, None, None, None, None
        n_features = w_enc.shape[1]
        if grad_pre is None and _use_sparse_backward(centred):
            s_t = _sparse_rows_t(indices, grad_values, n_features)  # the [B, d_sae] gradient of pre, transposed
            grad_x = torch.sparse.mm(s_t.t(), w_enc.T) if need_x else None
            grad_w = torch.sparse.mm(s_t, centred).T if need_w else None
            column_sum = None
            if need_b_enc or need_b_dec:
                column_sum = centred.new_zeros(n_features).index_add_(0, indices.reshape(-1), grad_values.reshape(-1))
        else:
            grad = centred.new_zeros(centred.shape[0], n_features) if grad_pre is None else grad_pre.clone()
            if grad_values is not None:
                grad.scatter_add_(-1, indices, grad_values)  # top-k indices are distinct within a row
            grad_x = grad @ w_enc.T if need_x else None
            grad_w = centred.T @ grad if need_w else None
            column_sum = grad.sum(0) if (need_b_enc or need_b_dec) else None
        grad_b_enc = column_sum if need_b_enc else None
        grad_b_dec = None
        if need_b_dec:
            grad_b_dec = -grad_x.sum(0) if grad_x is not None else -(w_enc @ column_sum)
        return grad_x, grad_w, grad_b_enc, grad_b_dec, None


class _TopKDecode(torch.autograd.Function):
    """`codes @ W_dec` for codes with k non-zeros per row (`values` at `indices`; `codes` is their dense form).

    The forward reads only the k kept atoms per row (`embedding_bag`). The backward computes the values' gradient
    with a dense matmul and a gather (faster than gathering B x k atoms), and the weight gradient as a k-sparse
    product on CPU, a dense one elsewhere (`embedding_bag`'s own backward sorts all B x k indices: slower).
    """

    @staticmethod
    def forward(ctx: Any, values: torch.Tensor, indices: torch.Tensor, codes: torch.Tensor, w_dec: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(values, indices, codes, w_dec)
        return F.embedding_bag(indices, w_dec, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        values, indices, codes, w_dec = ctx.saved_tensors
        need_values, _, _, need_w = ctx.needs_input_grad
        grad_values = (grad @ w_dec.T).gather(-1, indices) if need_values else None
        grad_w = None
        if need_w:
            if _use_sparse_backward(grad) and grad.dtype == w_dec.dtype == values.dtype:
                grad_w = torch.sparse.mm(_sparse_rows_t(indices, values.detach(), w_dec.shape[0]), grad)
            else:
                grad_w = codes.T @ grad
        return grad_values, None, None, grad_w


def _is_own_config(path: str | Path | None) -> bool:
    """Whether `path` is a saeft-hf SAE config.json (not absent, nor e.g. a sparsify run's config.json)."""
    if path is None or not os.path.isfile(path):
        return False
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return True  # ours but corrupted: the strict loader reports it
    return not isinstance(data, dict) or "d_sae" in data or "sae" not in data


def _same_model(a: str, b: str) -> bool:
    """Hub ids compare exactly; local paths compare after resolving."""
    if a == b:
        return True
    try:
        return Path(a).resolve() == Path(b).resolve() and os.path.exists(a)
    except OSError:
        return False


def _check_sae_source(source: str, is_dir: bool) -> None:
    """A local path that is not an SAE folder gets our error, not the Hub's `Repo id must be in the form ...`."""
    if is_dir:
        return
    if os.path.isfile(source):
        raise SAELoadError(
            f"`{source}` is a file; an SAE is loaded from the folder written by `SparseAutoencoder.save_pretrained` "
            f"(config.json + model.safetensors): pass `{os.path.dirname(source) or '.'}`."
        )
    looks_local = source.startswith((".", "~", os.sep)) or source.count("/") > 1 or "\\" in source
    try:
        validate_repo_id(source)
    except HFValidationError:
        looks_local = True
    if looks_local:
        raise SAELoadError(
            f"No SAE at `{source}`: no such folder. Give the folder written by `SparseAutoencoder.save_pretrained`, "
            "or a Hub repo id (namespace/name)."
        )


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def convert_pickle_to_safetensors(path: str | Path, output_dir: str | Path | None = None,
                                  config: SAEConfig | None = None) -> Path:
    """Convert a trusted pickled state dict (e.g. the reference code's `sae_4_32.pt`) to our safetensors format.

    Loaded with `torch.load(weights_only=True)`, which refuses arbitrary objects. The reference names
    (`encoder.weight` [F, d], `decoder.weight` [d, F], `b_pre` [d]) are mapped to ours. `path` is the pickle file
    (or a folder holding one of `PICKLE_NAMES`); `output_dir` defaults to its folder; `config` defaults to the
    `config.json` in that folder. Returns `output_dir`, now loadable with `SparseAutoencoder.from_pretrained`.
    """
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in PICKLE_NAMES if (path / n).is_file()]
        if not found:
            raise SAELoadError(f"No pickled SAE ({', '.join(PICKLE_NAMES)}) in {path}; pass the file itself.")
        path = found[0]
    if not path.is_file():
        raise SAELoadError(f"No file at {path}: pass the pickled state dict to convert.")
    if config is None:
        config_file = Path(output_dir or path.parent) / CONFIG_NAME
        if not config_file.is_file():
            config_file = path.parent / CONFIG_NAME
        if not config_file.is_file():
            raise SAELoadError(f"No {CONFIG_NAME} beside {path}: pass config=SAEConfig(d_in=..., d_sae=..., k=...).")
        try:
            config = SAEConfig.from_dict(json.loads(config_file.read_text(encoding="utf-8")))
        except json.JSONDecodeError as err:
            raise SAELoadError(f"{config_file} is not valid JSON ({err}).") from err
    output_dir = output_dir if output_dir is not None else path.parent
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refuses arbitrary objects with its own error types
        raise SAELoadError(f"Could not read {path} as a plain state dict ({type(err).__name__}: {err}).") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise SAELoadError(f"{path} holds a {type(state).__name__}, not a state dict of tensors.")
    if "encoder.weight" in state:  # the authors' SparseAutoencoderTopK
        state = {
            "W_enc": state["encoder.weight"].T.contiguous(),
            "W_dec": state["decoder.weight"].T.contiguous(),
            "b_dec": state["b_pre"],
            "b_enc": torch.zeros(state["encoder.weight"].shape[0]),
        }
    sae = SparseAutoencoder(config)
    try:
        sae.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes that disagree with the config
        raise SAELoadError(f"{path} does not fit {config}: {err}") from err
    missing = set(sae.state_dict()) - set(state) - {"threshold"}
    if missing:
        raise SAELoadError(f"{path} lacks tensors {sorted(missing)} needed by {config}.")
    output_dir = Path(output_dir)
    sae.save_pretrained(output_dir)
    return output_dir
