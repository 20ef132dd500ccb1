"""SAEs in other tools' formats: reading SAELens and EleutherAI sparsify folders, writing SAELens folders.

`SparseAutoencoder.from_pretrained` and `save_pretrained(..., format="saelens")` call this module; it only converts
(configs and tensors), it never builds a model.

SAELens (>= 6): `cfg.json` + `sae_weights.safetensors`, tensors named as ours (`W_enc` [d_in, d_sae], `b_enc`,
`W_dec` [d_sae, d_in], `b_dec`). What maps, with SAELens's inference encode (`sae_lens/saes/*.py`):
- `standard`: relu((x - b_dec) @ W_enc + b_enc) -> our `relu`.
- `topk`: keep the k largest pre-activations, then ReLU them -> our `topk` (ReLU then TopK keeps the same non-zero
  codes: both keep every positive value among the k largest). `rescale_acts_by_decoder_norm` (pre-activations times
  the decoder row norms, decode divided by them) is folded into the weights, as SAELens folds it when it saves.
- `jumprelu` with one threshold shared by every latent: SAELens's BatchTopK, which it saves for inference as a
  JumpReLU -> our `batchtopk` (inference keeps relu(pre) where it exceeds the threshold; `k` is read from the
  metadata SAELens writes, `training_architecture_details`). Per-latent thresholds are refused.
- `apply_b_dec_to_input: false` (no pre-bias on the input) is folded into `b_enc`.
Refused, each with its reason: other architectures (gated, abstopk, matryoshka, transcoders, ...), any
`normalize_activations` but `none` (a scale or normalisation outside the weights), `hook_z` reshaping.

sparsify (EleutherAI): `cfg.json` + `sae.safetensors` (`encoder.weight` [d_sae, d_in], `encoder.bias`, `W_dec`
[d_sae, d_in], `b_dec`); encode is relu(linear(x - b_dec)) then the top k -> our `topk`. A repo or run folder holds
one sub-folder per hookpoint (and the run's `config.json`). Transcoders, skip connections and `groupmax` are refused.

Weights are read as float32 (our parameters' dtype; widening bf16/fp16 is exact, but SAELens would encode a bf16 SAE
in bf16, so its codes can then differ in rounding). Foreign files name no saeft-hf representation: an SAELens
`hook_name` that is one (as our export writes it) is used, otherwise the caller's `default_representation` (default
`image_embeds`, with a warning). `model_name` (SAELens) or the run's `model` (sparsify) becomes `source_model`.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from safetensors.torch import load_file, save_file

from .atomic import write_file_atomic, write_text_atomic
from .modeling import parse_representation
from .sae import SAEConfig, SAELoadError

logger = logging.getLogger(__name__)

FOREIGN_CONFIG = "cfg.json"  # both SAELens and sparsify
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
# The SAELens config layout we write (metadata.sae_lens_version): SAELens reads configs older than 6.0 as legacy ones.
SAELENS_FORMAT_VERSION = "6.0.0"
SAELENS_ARCHITECTURES = ("standard", "topk", "jumprelu")
_BASE_KEYS = ("W_enc", "b_enc", "W_dec", "b_dec")


# ----------------------------------------------------------------------------------------------------------------
# Finding a foreign SAE
# ----------------------------------------------------------------------------------------------------------------


def detect_format(folder: str | Path) -> str | None:
    """`saelens`, `sparsify`, or None (no `cfg.json`: not a foreign SAE folder)."""
    folder = Path(folder)
    if not (folder / FOREIGN_CONFIG).is_file():
        return None
    if (folder / SAELENS_WEIGHTS).is_file():
        return "saelens"
    if (folder / SPARSIFY_WEIGHTS).is_file():
        return "sparsify"
    raise SAELoadError(
        f"{folder} has a {FOREIGN_CONFIG} but neither {SAELENS_WEIGHTS} (SAELens) nor {SPARSIFY_WEIGHTS} (sparsify) "
        "beside it: the download is incomplete, or the weights are in a format saeft-hf does not read."
    )


def sae_subfolders(root: str | Path) -> list[str]:
    """Sub-folders of `root` (any depth) holding a foreign SAE (`cfg.json`), as posix paths, sorted."""
    root = Path(root)
    found = {p.parent.relative_to(root).as_posix() for p in root.rglob(FOREIGN_CONFIG) if p.parent != root}
    return sorted(found, key=lambda s: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)])


def choose_subfolder_error(where: str, choices: list[str]) -> SAELoadError:
    shown = ", ".join(choices[:20]) + (f", ... ({len(choices)} in all)" if len(choices) > 20 else "")
    return SAELoadError(
        f"{where} holds several SAEs, one per hookpoint: pass `subfolder=` (for a local folder, or a Hub repo "
        f"downloaded with `hf download`, you may also give the sub-folder's path), one of: {shown}."
    )


def hub_snapshot(repo_id: str, subfolder: str | None, **hub_kwargs: Any) -> tuple[Path, str]:
    """Download a foreign SAE from the Hub; returns (local snapshot root, subfolder inside it).

    First only the small JSON files (to tell the layout and list the hookpoints), then the weights of the one SAE.
    `hub_kwargs`: revision, token, cache_dir, local_files_only, force_download.
    """
    sub = subfolder.strip("/") if subfolder else ""
    prefix, parent = (f"{sub}/" if sub else ""), posixpath.dirname(sub)
    # The SAE's cfg.json, those below it (to list hookpoints), and the run's config.json beside it (sparsify's model).
    patterns = [f"{prefix}{FOREIGN_CONFIG}", f"{prefix}*/{FOREIGN_CONFIG}", f"{parent}/config.json" if parent else "config.json"]
    root = Path(snapshot_download(repo_id, allow_patterns=patterns, **hub_kwargs))
    if not (root / sub / FOREIGN_CONFIG).is_file():
        choices = sae_subfolders(root / sub)
        if choices:
            raise choose_subfolder_error(f"The Hub repo `{repo_id}`", choices)
        raise SAELoadError(
            f"The Hub repo `{repo_id}`{f' (subfolder {subfolder})' if subfolder else ''} holds no SAE: no config.json "
            f"(saeft-hf) nor {FOREIGN_CONFIG} (SAELens, sparsify)."
        )
    weights = [f"{prefix}{SAELENS_WEIGHTS}", f"{prefix}{SPARSIFY_WEIGHTS}"]
    snapshot_download(repo_id, allow_patterns=weights, **hub_kwargs)
    return root, sub


def read_foreign(folder: str | Path, *, default_representation: str | None = None) -> tuple[SAEConfig, dict[str, torch.Tensor], str]:
    """Config, state dict (our names, float32) and format name of the foreign SAE in `folder`."""
    folder = Path(folder)
    kind = detect_format(folder)
    if kind == "saelens":
        config, state = read_saelens(folder, default_representation=default_representation)
    elif kind == "sparsify":
        config, state = read_sparsify(folder, default_representation=default_representation)
    else:
        raise SAELoadError(f"No {FOREIGN_CONFIG} in {folder}: not an SAELens or sparsify SAE folder.")
    return config, state, kind


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise SAELoadError(f"{path} is not valid JSON ({err}); the file is corrupted.") from err
    if not isinstance(data, dict):
        raise SAELoadError(f"{path} must hold a JSON object, got {type(data).__name__}.")
    return data


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for truncated files
        raise SAELoadError(f"Could not read SAE weights {path}: {err}. The file is corrupted.") from err


def _check_tensors(state: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], where: Path, what: str) -> None:
    missing, extra = sorted(set(shapes) - set(state)), sorted(set(state) - set(shapes))
    bad = [f"{k}: {tuple(state[k].shape)}, expected {shapes[k]}" for k in shapes if k in state
           and tuple(state[k].shape) != shapes[k]]
    if missing or extra or bad:
        raise SAELoadError(
            f"The weights in {where} do not fit {what}: missing {missing}, unexpected {extra}, shapes {bad}. "
            "Extra tensors mean an architecture saeft-hf cannot express (its encode would ignore them)."
        )


def _positive_int(value: Any, name: str, where: Path) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise SAELoadError(f"{where}: `{name}` must be a positive integer, got {value!r}.")
    return value


def _representation(hook_name: Any, default: str | None, where: Path) -> str:
    if isinstance(hook_name, str):
        try:
            parse_representation(hook_name)
            return hook_name  # written by our export, or a tool that uses our names
        except ValueError:
            pass
    if default is not None:
        return default
    logger.warning(
        "%s does not say which saeft-hf representation it reads (hook %r); assuming `image_embeds`. Pass "
        "`default_representation=` to `SparseAutoencoder.from_pretrained` if it was trained on another one.",
        where, hook_name,
    )
    return "image_embeds"


def _legacy_saelens(cfg: dict[str, Any]) -> dict[str, Any]:
    """SAELens < 6 configs: flat metadata keys and `activation_fn_str` instead of `architecture` (as SAELens reads them)."""
    renamed = {"hook_point": "hook_name", "activation_fn_str": "activation_fn"}
    cfg = {renamed.get(k, k): v for k, v in cfg.items()}
    cfg.setdefault("metadata", {k: cfg[k] for k in ("model_name", "hook_name") if k in cfg})
    if "architecture" not in cfg:
        kwargs = cfg.get("activation_fn_kwargs") or {}
        if cfg.get("activation_fn") == "topk" and kwargs.get("k") is not None:
            cfg["architecture"], cfg["k"] = "topk", kwargs["k"]
        elif cfg.get("activation_fn", "relu") == "relu":
            cfg["architecture"] = "standard"
        else:
            cfg["architecture"] = f"standard with activation_fn={cfg.get('activation_fn')!r}"
    if isinstance(cfg.get("normalize_activations"), bool):
        cfg["normalize_activations"] = "expected_average_only_in" if cfg["normalize_activations"] else "none"
    return cfg


def read_saelens(folder: Path, *, default_representation: str | None = None) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    """An SAELens folder as (our config, our state dict); refuses what our encode cannot reproduce exactly."""
    cfg_path = folder / FOREIGN_CONFIG
    cfg = _read_json(cfg_path)
    metadata = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    version = str(cfg.get("sae_lens_version") or metadata.get("sae_lens_version") or "0")
    if not version.split(".")[0].isdigit() or int(version.split(".")[0]) < 6:
        cfg = _legacy_saelens(cfg)
        metadata = cfg["metadata"]
    arch = cfg.get("architecture", "standard")
    if arch not in SAELENS_ARCHITECTURES:
        raise SAELoadError(
            f"{cfg_path}: SAELens architecture {arch!r} has no saeft-hf equivalent. saeft-hf reads `standard` (ReLU), "
            "`topk` and `jumprelu` with one threshold shared by all latents (BatchTopK), the encoders it can "
            "reproduce exactly."
        )
    norm = cfg.get("normalize_activations") or "none"
    if norm != "none":
        fixes = {
            "expected_average_only_in": "it expects inputs scaled by a dataset-wide factor that the files do not hold: "
            "fold it into the weights in SAELens (`sae.fold_activation_norm_scaling_factor(factor)`) and save again",
            "covariance_whitening": "fold the whitening into the weights in SAELens (`sae.fold_activation_whitening`) "
            "and save again",
        }
        raise SAELoadError(
            f"{cfg_path}: normalize_activations={norm!r} normalises inputs outside the weights, which saeft-hf's encode "
            f"does not do; {fixes.get(norm, 'saeft-hf can only use SAEs whose encode reads the raw activation')}."
        )
    if (cfg.get("reshape_activations") or "none") != "none":
        raise SAELoadError(f"{cfg_path}: reshape_activations={cfg['reshape_activations']!r} (attention-head outputs) "
                           "is not a vector representation saeft-hf fine-tunes; it reads `none` only.")
    if cfg.get("finetuning_scaling_factor"):
        raise SAELoadError(f"{cfg_path}: a finetuning_scaling_factor (legacy SAELens) rescales codes at decode; "
                           "load and save it with SAELens >= 6 first.")
    d_in, d_sae = _positive_int(cfg.get("d_in"), "d_in", cfg_path), _positive_int(cfg.get("d_sae"), "d_sae", cfg_path)

    weights = folder / SAELENS_WEIGHTS
    state = {k: v.to(torch.float32) for k, v in _read_tensors(weights).items()}
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if arch == "jumprelu":
        shapes["threshold"] = (d_sae,)
    _check_tensors(state, shapes, weights, f"an SAELens `{arch}` SAE with d_in={d_in}, d_sae={d_sae}")

    details = metadata.get("training_architecture_details")
    details = details if isinstance(details, dict) else {}
    k: int | None = None
    threshold = None
    if arch == "standard":
        activation = "relu"
    elif arch == "topk":
        activation, k = "topk", _positive_int(cfg.get("k"), "k", cfg_path)
        if cfg.get("rescale_acts_by_decoder_norm"):
            # SAELens: pre * |W_dec row| before the TopK, codes / |W_dec row| at decode. Folding the norms into the
            # encoder and out of the decoder gives the same codes and reconstructions (as SAELens's own fold).
            norms = state["W_dec"].norm(dim=-1)
            state["W_enc"], state["b_enc"] = state["W_enc"] * norms, state["b_enc"] * norms
            state["W_dec"] = state["W_dec"] / norms[:, None]
    else:  # jumprelu
        thresholds = state.pop("threshold")
        if not bool((thresholds == thresholds[0]).all()):
            raise SAELoadError(
                f"{cfg_path}: a JumpReLU SAE with per-latent thresholds (from {float(thresholds.min()):.4g} to "
                f"{float(thresholds.max()):.4g}); saeft-hf has one shared threshold (BatchTopK's), no per-latent JumpReLU."
            )
        if details.get("k") is None:
            raise SAELoadError(
                f"{cfg_path}: a JumpReLU SAE with one shared threshold reads as BatchTopK, but its metadata does not "
                "record the training k (metadata.training_architecture_details.k, which SAELens writes for BatchTopK)."
                " Add it to cfg.json if you know it."
            )
        activation, threshold = "batchtopk", thresholds[0].clone()
        k = min(max(1, round(float(details["k"]))), d_sae)  # SAELens's k is a float (a batch mean); used in training only
    if cfg.get("apply_b_dec_to_input", True) is False:
        # SAELens encodes x @ W_enc + b_enc; ours (x - b_dec) @ W_enc + b_enc: add b_dec @ W_enc back to the bias.
        state["b_enc"] = state["b_enc"] + state["b_dec"] @ state["W_enc"]

    model_name = metadata.get("model_name")
    config = SAEConfig(
        d_in=d_in, d_sae=d_sae, k=k, activation=activation, input_normalization="none",
        l1_coefficient=float(details.get("l1_coefficient") or 0.0) if activation == "relu" else 0.0,
        source_model=model_name if isinstance(model_name, str) and model_name else None,
        representation=_representation(metadata.get("hook_name"), default_representation, cfg_path),
        provenance={"imported_from": {
            "format": "saelens", "architecture": arch, "hook_name": metadata.get("hook_name"),
            "model_name": model_name, "sae_lens_version": metadata.get("sae_lens_version"),
        }},
    )
    if threshold is not None:
        state["threshold"] = threshold
    return config, state


def read_sparsify(folder: Path, *, default_representation: str | None = None) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    """A sparsify (EleutherAI) SAE folder as (our config, our state dict)."""
    cfg_path = folder / FOREIGN_CONFIG
    cfg = _read_json(cfg_path)
    refused = [(cfg.get("transcode"), "a transcoder (it predicts a module's output from its input, not the input)"),
               (cfg.get("skip_connection"), "a linear skip connection (W_skip) that saeft-hf's decode has no place for"),
               (cfg.get("signed"), "signed TopK of the legacy `sae` package"),
               (cfg.get("activation", "topk") != "topk", f"activation {cfg.get('activation')!r} (saeft-hf reads topk)")]
    reasons = [why for flag, why in refused if flag]
    if reasons:
        raise SAELoadError(f"{cfg_path}: cannot be used as an SAE-FT dictionary: {'; '.join(reasons)}.")
    d_in = _positive_int(cfg.get("d_in"), "d_in", cfg_path)
    d_sae = cfg.get("num_latents") or d_in * _positive_int(cfg.get("expansion_factor", 32), "expansion_factor", cfg_path)
    d_sae, k = _positive_int(d_sae, "num_latents", cfg_path), _positive_int(cfg.get("k", 32), "k", cfg_path)
    weights = folder / SPARSIFY_WEIGHTS
    raw = {key: v.to(torch.float32) for key, v in _read_tensors(weights).items()}
    _check_tensors(raw, {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "W_dec": (d_sae, d_in),
                         "b_dec": (d_in,)}, weights, f"a sparsify SAE with d_in={d_in}, num_latents={d_sae}")
    state = {"W_enc": raw["encoder.weight"].T.contiguous(), "b_enc": raw["encoder.bias"], "W_dec": raw["W_dec"],
             "b_dec": raw["b_dec"]}
    run_config = folder.parent / "config.json"  # the training run's, beside the hookpoint folders
    model = _read_json(run_config).get("model") if run_config.is_file() else None
    config = SAEConfig(
        d_in=d_in, d_sae=d_sae, k=min(k, d_sae), activation="topk", input_normalization="none",
        source_model=model if isinstance(model, str) and model else None,
        representation=_representation(None, default_representation, cfg_path),
        provenance={"imported_from": {"format": "sparsify", "hookpoint": folder.name, "model": model}},
    )
    return config, state


# ----------------------------------------------------------------------------------------------------------------
# Writing SAELens
# ----------------------------------------------------------------------------------------------------------------


def saelens_export(config: SAEConfig, state: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """SAELens `cfg.json` and tensors for our SAE; a `ValueError` naming why when SAELens cannot express it."""
    if config.activation == "topk_signed":
        raise ValueError(
            "This SAE uses activation='topk_signed' (the paper's TopK: the k largest raw pre-activations, negative "
            "codes kept). SAELens cannot express it: its `topk` applies a ReLU to the kept values and its `abstopk` "
            "ranks by absolute value, so either would give other codes. Train the SAE with activation='topk' "
            "(ReLU then TopK) to exchange it with SAELens, or keep saeft-hf's own format."
        )
    if config.input_normalization != "none":
        raise ValueError(
            f"This SAE expects inputs normalised to unit L2 norm (input_normalization={config.input_normalization!r}), "
            "but SAELens's encode reads the raw activation and has no unit-norm mode (`constant_norm_rescale` scales "
            "to norm sqrt(d_in) and rescales reconstructions back), so SAELens users would get other codes. Train the "
            "SAE with input_normalization='none' to exchange it with SAELens, or keep saeft-hf's own format."
        )
    tensors = {k: state[k].detach().to("cpu").contiguous() for k in _BASE_KEYS}
    details: dict[str, Any] = {}
    fields: dict[str, Any] = {}
    if config.activation == "relu":
        architecture = "standard"
        details["l1_coefficient"] = config.l1_coefficient
    elif config.activation == "topk":
        architecture = "topk"
        fields = {"k": config.k, "rescale_acts_by_decoder_norm": False}
    else:  # batchtopk: at inference relu(pre) where it exceeds one threshold, SAELens's JumpReLU with equal thresholds
        architecture = "jumprelu"
        tensors["threshold"] = torch.full_like(tensors["b_enc"], float(state["threshold"]))
        details["k"] = config.k
    metadata: dict[str, Any] = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "model_name": config.source_model,
        "hook_name": config.representation,  # saeft-hf's representation; read back as it by `read_saelens`
        "saeft_hf_activation": config.activation,
    }
    if details:
        metadata["training_architecture"] = "batchtopk" if architecture == "jumprelu" else architecture
        metadata["training_architecture_details"] = details
    dtype = str(tensors["W_enc"].dtype).removeprefix("torch.")
    cfg = {"architecture": architecture, "d_in": config.d_in, "d_sae": config.d_sae, "dtype": dtype, "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           **fields, "metadata": metadata}
    return cfg, tensors


def save_saelens(config: SAEConfig, state: dict[str, torch.Tensor], directory: str | Path) -> Path:
    """Write `cfg.json` + `sae_weights.safetensors` that `sae_lens.SAE.load_from_disk(directory)` loads."""
    cfg, tensors = saelens_export(config, state)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_file_atomic(directory / SAELENS_WEIGHTS, lambda tmp: save_file(tensors, os.fspath(tmp), metadata={"format": "pt"}))
    write_text_atomic(directory / FOREIGN_CONFIG, json.dumps(cfg, indent=2) + "\n")
    return directory
