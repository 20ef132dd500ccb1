"""The end-to-end SAE-FT run that the recipes wire up: model + head, SAE, fine-tuning, saving, evaluation.

Recipes parse arguments and load datasets; everything else happens here, so that the ImageNet recipe and the digit
benchmark run the same code path.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import torch
import yaml
from transformers import AutoConfig, HfArgumentParser

from .atomic import write_dir_atomic
from .backends import check_backends
from .config import SAEFTConfig
from .data import (
    REFERENCE_COLUMN,
    ImageClassificationCollator,
    check_dataset_size,
    random_subset,
    transforms_from_pretrained,
    with_image_transform,
)
from .cache import cache_dir, dataset_fingerprint, embedding_cache_key
from .distributed import all_ranks_agree
from .embeddings import add_reference_embeddings, compute_embeddings
from .evaluation import (
    evaluate_model,
    holdout_split,
    load_for_evaluation,
    save_initial_head,
    save_wise_ft_model,
)
from .evaluation.runner import HOLDOUT_NAME, transform_for
from .expected import split_expected
from .hub import push_run_to_hub, save_results, write_model_card
from .lora import add_lora, save_base_config
from .modeling import parse_representations
from .run_dir import claims_output_dir
from .sae import SAEConfig, SparseAutoencoder
from .sae_set import SAESet, as_sae_set, load_sae_set, save_sae_set
from .sae_training import train_sae
from .trainer import SAE_SUBFOLDER, SAEFTTrainer, SetEpochCallback, base_classifier
from .validation import (
    SAEFTConfigError,
    check_clip_config,
    check_config_mapping,
    check_sae_set,
    coerce_config_values,
    representation_widths,
    reuse_trained_sae,
    sae_training_key,
    validate_run,
)
from .zeroshot import fit_linear_probe, from_clip, set_head

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """The pre-trained model, its representation, the head and (when none is given) the SAE to train."""

    model_name_or_path: str = field(
        default="openai/clip-vit-base-patch16",
        metadata={"help": "CLIPModel checkpoint (Hub id or directory) with its tokenizer and image processor."},
    )
    representation: str = field(
        default="image_embeds",
        metadata={"help": "What the penalty sees: image_embeds (the paper), pooler_output, hidden_states.{i}.cls|mean; "
                          "several, comma-separated (hidden_states.-1.cls,hidden_states.-2.cls; YAML: also a list): "
                          "one SAE each, penalties summed."},
    )
    sae_d_sae_multiplier: int = field(default=4, metadata={"help": "New SAE: latents per input dimension (paper: 4)."})
    sae_k: int = field(default=32, metadata={"help": "New SAE: active latents per input (paper: 32)."})
    sae_activation: str = field(default="topk_signed", metadata={"help": "New SAE: topk_signed (paper), topk, batchtopk, relu."})
    sae_epochs: int = field(default=100, metadata={"help": "New SAE: epochs over the cached embeddings (paper: 100)."})
    sae_batch_size: int = field(default=1024, metadata={"help": "New SAE: batch size (paper: 1024)."})
    sae_lr: float = field(default=1e-3, metadata={"help": "New SAE: AdamW learning rate (paper: 1e-3)."})
    sae_max_samples: int | None = field(
        default=None, metadata={"help": "New SAE: embed a seeded random subset of this many training images (all by "
                                        "default; see saeft_hf.data.random_subset for streams)."}
    )
    sae_aux_k: int | None = field(default=None, metadata={"help": "New SAE: AuxK dead latents (None: off, as the paper)."})
    embedding_batch_size: int = field(default=256, metadata={"help": "Batch size for computing embeddings."})

    def __post_init__(self) -> None:
        # A YAML list (`representation: [a, b]`) arrives as a list: keep the one comma-separated form (each spec is
        # checked by validation.check_model_args, with the other settings).
        if isinstance(self.representation, (list, tuple)):
            self.representation = ",".join(str(spec).strip() for spec in self.representation)


@dataclass
class RunResult:
    """What `run_saeft` produced."""

    trainer: SAEFTTrainer
    sae: SparseAutoencoder | None  # the SAE of a single-representation run (None with several: see `saes`)
    results: dict[str, Any]
    saes: SAESet | None = None  # representation spec -> its SAE, every run with the SAE-FT penalty


def parse_args(dataclass_types: Sequence[type], argv: Sequence[str]) -> tuple[Any, ...]:
    """Parse `argv` into dataclasses; `--config file.yaml` supplies defaults that CLI flags override.

    Unknown YAML keys are an error (a typo would otherwise be silently ignored).
    """
    parser = HfArgumentParser(tuple(dataclass_types))
    parser.epilog = ("--config FILE.yaml sets any of these options (`learning_rate: 1.0e-5`); flags given on the command "
                     "line override it. An `expected:` section (the numbers the config should reproduce) is checked "
                     "and otherwise ignored.")
    argv = list(argv)
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise ValueError("--config needs a YAML file path.")
        path = argv[index + 1]
        del argv[index:index + 2]
        if not os.path.isfile(path):
            raise SAEFTConfigError(f"--config {path}: no such file.")
        try:
            with open(path, encoding="utf-8") as fh:
                values = yaml.safe_load(fh)
        except yaml.YAMLError as err:
            raise SAEFTConfigError(f"--config {path} is not valid YAML: {err}") from err
        values = check_config_mapping(values, path)
        values, _ = split_expected(values, path)  # validated here, read by `saeft compare`
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SAEFTConfigError(f"Unknown keys in {path}: {unknown}. Run the recipe with --help for the valid "
                                   "options.")
        # YAML types to the options' types: `q_proj` for a list option, "1e-5" (a YAML string) for a float, ...
        values = coerce_config_values(values, {a.dest: a for a in parser._actions}, path)
        parser.set_defaults(**values)
        # Required-ness is satisfied by YAML values too.
        for action in parser._actions:
            if action.dest in values:
                action.required = False
    _check_requested_backends(parser, argv)
    return parser.parse_args_into_dataclasses(args=argv)


def _check_requested_backends(parser: HfArgumentParser, argv: list[str]) -> None:
    """Before the dataclasses are built (TrainingArguments would fail on a missing DeepSpeed with a cryptic
    package-metadata error): a requested but missing backend is named with its install command."""
    if not any(action.dest == "deepspeed" for action in parser._actions):
        return
    value = parser.get_default("deepspeed")  # from the YAML
    for i, arg in enumerate(argv):
        if arg == "--deepspeed" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--deepspeed="):
            value = arg.split("=", 1)[1]
    check_backends(deepspeed=value)


def build_model(
    model_args: ModelArguments,
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    device: torch.device | str | None = None,
    distributed: bool = False,
    output_dir: str | None = None,
) -> Any:
    """The classifier with CLIP's vision weights and a zero-shot head.

    The head's text pass runs on `device`, split over all processes with `distributed` (every rank calls this),
    and is cached in `output_dir/cache/zeroshot_head.safetensors` when `output_dir` is given (a resume reuses it).
    """
    cache = cache_dir(output_dir) / "zeroshot_head.safetensors" if output_dir else None
    return from_clip(model_args.model_name_or_path, classnames, templates, representation=model_args.representation,
                     device=device, distributed=distributed, cache_path=cache)  # progress on the main process only


def autocast_dtype_for(training_args: SAEFTConfig) -> torch.dtype | None:
    """The run's mixed precision as an autocast dtype (bf16 / fp16), None for fp32."""
    return torch.bfloat16 if training_args.bf16 else (torch.float16 if training_args.fp16 else None)


def sae_training_embeddings(
    model: Any,
    dataset: Any,
    eval_transform: Callable[[Any], torch.Tensor],
    model_args: ModelArguments,
    *,
    output_dir: str | None = None,
    split: str = "train",
    skip_corrupt_images: bool = False,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    num_workers: int = 0,
    distributed: bool = False,
    seed: int = 0,
) -> torch.Tensor:
    """The pre-trained model's embeddings [N, d] of `dataset` (eval transform, no augmentation) for the SAE.

    With several representations, all of them in one pass, concatenated ([N, d_1 + d_2 + ...]; cut them apart with
    `base_classifier(model).split_representation`).

    Runs on `device` under `autocast_dtype` with `num_workers` loader workers; with `distributed` every rank calls
    this, embeds its share and gets all rows in dataset order. Cached in `output_dir/cache/sae_embeddings.safetensors`
    (keyed by `saeft_hf.cache.embedding_cache_key`: model weights, data fingerprint, split, sample count, transform,
    representation, dtype); only rank 0 writes it.
    """
    dataset = random_subset(dataset, model_args.sae_max_samples, seed=seed)  # seeded, never the first rows
    # The same skip policy as training: a corrupt image must not stop the SAE's embedding pass when skips are on.
    images = with_image_transform(dataset, eval_transform, skip_corrupt_images=skip_corrupt_images)
    key = (embedding_cache_key(model, dataset, split=split, transform=eval_transform,
                               representation=model_args.representation, max_samples=model_args.sae_max_samples,
                               autocast_dtype=autocast_dtype, kind="sae_embeddings",
                               skip_corrupt_images=skip_corrupt_images)
           if output_dir else None)
    if output_dir and key is None:
        logger.warning("The SAE's training embeddings are not cached: the dataset (%s) has no fingerprint.",
                       type(dataset).__name__)
    cache = cache_dir(output_dir) / "sae_embeddings.safetensors" if key is not None else None
    return compute_embeddings(
        model, images, batch_size=model_args.embedding_batch_size, cache_path=cache, cache_key=key, device=device,
        autocast_dtype=autocast_dtype, num_workers=num_workers, distributed=distributed,
    )  # its progress bar shows on the main process only


def train_sae_for_model(
    model: Any,
    dataset: Any,
    eval_transform: Callable[[Any], torch.Tensor],
    model_args: ModelArguments,
    *,
    output_dir: str | None = None,
    seed: int = 0,
    skip_corrupt_images: bool = False,
    embeddings: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> SparseAutoencoder:
    """Train an SAE on the pre-trained model's embeddings of `dataset` (eval transform, no augmentation).

    `embeddings` [N, d]: already computed (`sae_training_embeddings`, e.g. sharded over all ranks); otherwise they
    are computed here by this process alone. The SAE trains on `device` (default: CUDA if available). A model with
    several representations needs one SAE each: `train_saes_for_model`.
    """
    specs = base_classifier(model).representation_specs()
    if len(specs) > 1:
        raise ValueError(f"The model has {len(specs)} representations {specs}, one SAE each: use "
                         "train_saes_for_model (it returns {spec: SAE}; save them with saeft_hf.sae_set.save_sae_set).")
    return train_saes_for_model(model, dataset, eval_transform, model_args, output_dir=output_dir, seed=seed,
                                skip_corrupt_images=skip_corrupt_images, embeddings=embeddings, device=device)[specs[0]]


def train_saes_for_model(
    model: Any,
    dataset: Any,
    eval_transform: Callable[[Any], torch.Tensor],
    model_args: ModelArguments,
    *,
    output_dir: str | None = None,
    seed: int = 0,
    skip_corrupt_images: bool = False,
    embeddings: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    representations: Sequence[str] | None = None,
) -> SAESet:
    """One SAE per representation of `model` (`{spec: SAE}` in the model's order), each trained on its own part of
    one embedding pass, with the same settings (`model_args`) and seed; `representations`: only these.

    `embeddings` [N, d_1 + d_2 + ...]: already computed (`sae_training_embeddings`); otherwise computed here by this
    process alone.
    """
    base = base_classifier(model)
    if embeddings is None:
        embeddings = sae_training_embeddings(model, dataset, eval_transform, model_args, output_dir=output_dir,
                                             skip_corrupt_images=skip_corrupt_images, device=device, seed=seed)
    parts = base.split_representation(embeddings)
    saes: SAESet = {}
    for spec in representations or list(parts):
        d_in = parts[spec].shape[1]
        config = SAEConfig(
            d_in=d_in,
            d_sae=model_args.sae_d_sae_multiplier * d_in,
            k=model_args.sae_k,
            activation=model_args.sae_activation,
            source_model=base.config.source_model,
            representation=spec,
        )
        result = train_sae(
            parts[spec].contiguous(), config, epochs=model_args.sae_epochs, batch_size=model_args.sae_batch_size,
            lr=model_args.sae_lr, aux_k=model_args.sae_aux_k, seed=seed, device=device,
        )
        logger.info("Trained SAE on %s: %s", spec, result.metrics)
        saes[spec] = result.sae
    return saes


def init_linear_probe_head(model: Any, dataset: Any, eval_transform: Callable[[Any], torch.Tensor], batch_size: int,
                           skip_corrupt_images: bool = False, *, device: torch.device | str | None = None,
                           autocast_dtype: torch.dtype | None = None, num_workers: int = 0,
                           distributed: bool = False, output_dir: str | None = None) -> None:
    """LP-FT: fit the head as a logistic regression on frozen embeddings, starting from the zero-shot head.

    The feature pass runs on `device` (sharded over all ranks with `distributed`: every rank calls this and fits the
    same head) and is cached in `output_dir/cache/linear_probe_features.safetensors` when `output_dir` is given.
    """
    images = with_image_transform(dataset, eval_transform, skip_corrupt_images=skip_corrupt_images)
    base = base_classifier(model)
    key = (embedding_cache_key(base, dataset, split="train", transform=eval_transform, representation="image_embeds",
                               autocast_dtype=autocast_dtype, kind="linear_probe_features",
                               skip_corrupt_images=skip_corrupt_images) if output_dir else None)
    cache = cache_dir(output_dir) / "linear_probe_features.safetensors" if key is not None else None
    rep = base.config.representation
    base.config.representation = "image_embeds"  # the head reads the projected embedding
    try:
        features, labels = compute_embeddings(base, images, batch_size=batch_size, return_labels=True, device=device,
                                              autocast_dtype=autocast_dtype, num_workers=num_workers,
                                              distributed=distributed, cache_path=cache, cache_key=key)
    finally:
        base.config.representation = rep
    weight, bias = fit_linear_probe(features, labels, base.config.num_labels, init_weight=base.classifier.weight.detach(),
                                    device=device)
    set_head(base, weight, bias)


def _model_shape(model_args: ModelArguments, model: Any | None) -> tuple[dict[str, int], str, str | None]:
    """(depth and widths, representation, source model) of the model the run will fine-tune; reads only its config."""
    if model is not None:
        config = base_classifier(model).config
        asked = model_args.representation
        # The given model's own representation(s) are what the penalty sees; model_args naming others (the default
        # aside) would otherwise be ignored without a word. An invalid spec is left to validate_run's message.
        if asked != "image_embeds" and _same_specs(asked, config.representation) is False:
            raise SAEFTConfigError(
                f"model_args.representation={asked!r} but the given model returns {config.representation!r}: the "
                "penalty would be on the model's. Set it on the model (model.config.representation = "
                f"{asked!r}, or from_clip(..., representation={asked!r})), or drop the model_args setting.")
        return check_clip_config(config, "the given model"), config.representation, config.source_model
    name = model_args.model_name_or_path
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise SAEFTConfigError(f"Could not read the model config of {name!r} ({type(err).__name__}: {err}). Pass a "
                               "CLIP checkpoint: a Hub id or a directory with config.json.") from err
    return check_clip_config(config, repr(name)), model_args.representation, str(name)


def _same_specs(a: str, b: str) -> bool | None:
    """Whether two representation settings name the same specs in the same order (None if either is invalid)."""
    try:
        return parse_representations(a) == parse_representations(b)
    except ValueError:
        return None


def _check_sizes(train_dataset: Any, eval_dataset: Any | None, training_args: SAEFTConfig) -> None:
    """Fail before any model is built when a map-style train or eval set is empty, or too small for one step.

    Streaming sets are not counted: that would read (and, behind a shuffle buffer, download) data just to check.
    """
    def sized(ds: Any) -> bool:
        return not isinstance(ds, datasets.IterableDataset) and hasattr(ds, "__len__")

    if train_dataset is None:
        raise ValueError("run_saeft needs a train_dataset.")
    if sized(train_dataset):
        needed = 1
        if training_args.dataloader_drop_last:  # a partial batch is dropped: one full step's worth is needed
            needed = (training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
                      * max(1, training_args.world_size))
        check_dataset_size(train_dataset, needed, "The training set")
    if eval_dataset is not None and sized(eval_dataset):
        check_dataset_size(eval_dataset, 1, "The evaluation set")


def add_cached_reference(model: Any, dataset: Any, eval_transform: Callable[[Any], torch.Tensor],
                         model_args: ModelArguments, training_args: SAEFTConfig, split: str, *,
                         skip_corrupt_images: bool = False) -> Any:
    """`reference_mode="cached"`: `dataset` with a `z0` column from the pre-trained `model` (eval transform), computed
    on the accelerator and sharded over all ranks (every rank calls this), cached in
    `output_dir/cache/reference_embeddings_<split>.safetensors`. A dataset that already has `z0` is used as it is; a
    streaming one must have it (see `saeft_hf.embeddings.add_reference_embeddings`)."""
    if REFERENCE_COLUMN in (dataset.column_names or []):
        return dataset
    if isinstance(dataset, datasets.IterableDataset):
        raise ValueError(
            f"reference_mode='cached' with a streaming {split} dataset that has no `{REFERENCE_COLUMN}` column: "
            "precompute it on a map-style copy (saeft_hf.embeddings.add_reference_embeddings), store it with the "
            "images and stream that, or use reference_mode='live'."
        )
    autocast = autocast_dtype_for(training_args)
    key = embedding_cache_key(model, dataset, split=split, transform=eval_transform,
                              representation=model_args.representation, autocast_dtype=autocast,
                              kind="reference_embeddings", skip_corrupt_images=skip_corrupt_images)
    cache = cache_dir(training_args.output_dir) / f"reference_embeddings_{split}.safetensors"
    return add_reference_embeddings(dataset, model, eval_transform, batch_size=model_args.embedding_batch_size,
                                    device=training_args.device, autocast_dtype=autocast,
                                    num_workers=training_args.dataloader_num_workers,
                                    skip_corrupt_images=skip_corrupt_images, cache_path=cache, cache_key=key,
                                    progress=False, distributed=training_args.world_size > 1)


_FSDP_WISE_FT = (
    "WiSE-FT after FSDP training is not supported in the training run (it is untested with sharded weights). "
    "Train without --wise_ft_alphas, then sweep on the saved model: `torchrun --nproc_per_node N "
    "recipes/evaluate.py --model_name_or_path OUTPUT_DIR --eval_sets_config E.yaml --wise_ft_alphas ...` "
    "(it loads the full model from OUTPUT_DIR; save with fsdp_state_dict_type: FULL_STATE_DICT)."
)


def _evaluate_saved_run(trainer: SAEFTTrainer, eval_sets: Mapping[str, tuple[Any, Any]],
                        holdout_sets: Mapping[str, tuple[Any, Any]], **kwargs: Any) -> Any:
    """Evaluate what `output_dir` holds, loaded afresh on every rank exactly as `recipes/evaluate.py` loads it (so
    the numbers agree, in fp32 whatever the training precision), sharded over the ranks."""
    args = trainer.args
    trainer.accelerator.wait_for_everyone()  # rank 0 has written the model (and the adapter's base config)
    loaded = load_for_evaluation(args.output_dir)
    reported = {n: s for n, s in eval_sets.items() if getattr(s[1], "role", None) != "holdout"}
    holdouts = {**holdout_sets, **{n: s for n, s in eval_sets.items() if getattr(s[1], "role", None) == "holdout"}}
    pretrained = loaded.wise_ft_pretrained() if kwargs.get("wise_ft_alphas") else None
    return evaluate_model(
        loaded.model, reported, transform_for(loaded), pretrained=pretrained, holdout_sets=holdouts,
        num_workers=args.dataloader_num_workers, seed=args.seed, device=args.device,
        process_index=trainer.accelerator.process_index, num_processes=trainer.accelerator.num_processes,
        progress=not args.disable_tqdm, **kwargs,
    )


# First of all, before anything is loaded: take output_dir's lock and check that it is writable and holds no other
# run's results (see saeft_hf.run_dir); the lock is held until run_saeft returns or raises.
@claims_output_dir
def run_saeft(
    model_args: ModelArguments,
    training_args: SAEFTConfig,
    *,
    train_dataset: Any,
    eval_dataset: Any | None,
    classnames: Sequence[str],
    templates: Sequence[str],
    sae: SparseAutoencoder | Mapping[str, SparseAutoencoder] | Sequence[SparseAutoencoder] | None = None,
    eval_sets: Mapping[str, tuple[Any, Any]] | None = None,
    id_name: str = "validation",
    shift_names: Sequence[str] = (),
    wise_ft_alphas: Sequence[float] | None = None,
    wise_ft_select_on: str | None = None,
    wise_ft_holdout: float = 0.01,
    wise_ft_known: Mapping[float, Mapping[str, float]] | None = None,
    eval_batch_size: int = 256,
    eval_bf16: bool = False,
    max_eval_samples: int | None = None,
    skip_corrupt_images: bool = False,
    dataset_id: str | None = None,
    model: Any | None = None,
) -> RunResult:
    """Fine-tune with SAE-FT (or a baseline), save everything in `output_dir`, evaluate, and optionally push.

    Args:
        train_dataset / eval_dataset: `datasets` objects with `image` and `label` columns (map-style or streaming).
        classnames / templates: for the zero-shot head (one class name per label).
        sae: an SAE to use; otherwise `training_args.sae_name_or_path`, otherwise one is trained on the
            pre-trained embeddings of `train_dataset` and saved in `output_dir/sae`. With several representations
            (`model_args.representation="hidden_states.-1.cls,hidden_states.-2.cls"`): one SAE each, as
            `{spec: SAE}` or a list (matched by the representation each SAE's config records), or a folder
            `sae_name_or_path/<spec>/`; trained ones are saved in `output_dir/sae/<spec>/` (`saeft_hf.sae_set`),
            all from one embedding pass. The penalty is their sum.
        eval_sets: `{name: (raw dataset, EvalSetSpec or None)}` evaluated after training (ID validation and
            shifts; see `saeft_hf.evaluation.load_eval_sets`); results go to `eval_results.json` and the card.
            Sets whose spec has `role: holdout` only choose WiSE-FT's alpha (not reported).
        id_name / shift_names: which of `eval_sets` is the reported ID set and which are shifts (averaged into
            `avg_shift`; sets of neither kind are reported alone).
        wise_ft_alphas: sweep WiSE-FT over these alphas (weight interpolation; adapter scaling for LoRA), in the
            same pass as the final evaluation; the chosen model is saved in `output_dir/wise_ft/`.
        wise_ft_select_on: the set that chooses alpha (a `role: holdout` set, or held-out data by the caller's
            word). None: `wise_ft_holdout` training images (>= 1: a count, < 1: a fraction) are held out at random
            (seed `training_args.seed`) before anything trains, and choose alpha.
        wise_ft_known: accuracies already measured on these eval sets for some alphas (e.g. {0.0: the zero-shot
            model's, measured once for many runs}); they are not scored again.
        eval_bf16: evaluate under bf16 autocast (default fp32, whatever the training precision).
        skip_corrupt_images: skip (and log) undecodable images in the SAE, linear-probe, training and eval passes.
        model: a ready classifier (skips `build_model`).

    Fails before building anything when `output_dir` is not writable, is in use by another run (its lock file
    `.saeft.lock`), or holds another run's results without `overwrite_output_dir` or `resume_from_checkpoint`
    (`saeft_hf.run_dir`); when a map-style train or eval set is empty (or, with `dataloader_drop_last`, smaller than
    one step); and on every configuration, label, eval-set, model-config or SAE problem that
    `saeft_hf.validation.validate_run` finds (an `SAEFTConfigError` naming the fix). The SAE it trains itself is keyed
    on its settings and the training set's fingerprint (`SAEConfig.provenance`): a later run in the same
    `output_dir` reuses it only when they match, retrains otherwise, and refuses to switch SAEs when resuming.
    With `push_to_hub`, the upload happens here, once, at the end: the Trainer's own
    `push_to_hub` is turned off and `hub_token` is taken out of `training_args` (so no `training_args.bin` holds
    it). Several processes: every rank takes its share of the zero-shot head, the linear-probe features, the SAE's
    embedding pass and the cached reference (on `training_args.device`, in the run's precision; caches in
    `output_dir/cache/`); only the main process trains and saves the SAE (the others load it), writes the results
    and the card, and pushes.
    """
    start, start_cpu = time.time(), time.process_time()
    output_dir = training_args.output_dir
    if wise_ft_alphas and training_args.fsdp:
        raise ValueError(_FSDP_WISE_FT)
    holdout_sets: dict[str, tuple[Any, Any]] = {}
    selection = ""
    if wise_ft_alphas and wise_ft_select_on is None and not any(
            getattr(spec, "role", None) == "holdout" for _, spec in (eval_sets or {}).values()):
        # Alpha is chosen on training images that nothing trains on (not on a reported set such as validation).
        train_dataset, held_out, selection = holdout_split(train_dataset, wise_ft_holdout, training_args.seed)
        holdout_sets[HOLDOUT_NAME] = (held_out, None)
    _check_sizes(train_dataset, eval_dataset, training_args)
    # Everything else that could fail after training (or make it silently wrong) fails here, before any model exists.
    shape, representation, source_model = _model_shape(model_args, model)
    wise_ft_alphas = validate_run(
        model_args, training_args, train_dataset=train_dataset, eval_dataset=eval_dataset, classnames=classnames,
        templates=templates, eval_sets=eval_sets, id_name=id_name, wise_ft_alphas=wise_ft_alphas, shape=shape,
    )
    needs_sae = training_args.regularizer == "sae_ft" and training_args.regularization_active
    specs, widths = parse_representations(representation), representation_widths(representation, shape)
    saes: SAESet | None = None
    if needs_sae:
        if sae is None and training_args.sae_name_or_path:
            sae = load_sae_set(training_args.sae_name_or_path, specs)
        saes = as_sae_set(sae, specs)
        if saes is not None:
            check_sae_set(saes, widths=widths,
                          source_model=None if training_args.allow_sae_source_mismatch else source_model)
    train_transform, eval_transform = transforms_from_pretrained(model_args.model_name_or_path, seed=training_args.seed)
    # The expensive preparation (zero-shot head, linear-probe features, SAE embeddings) runs on the accelerator in
    # the run's precision, every rank taking its share: no rank waits long on a barrier.
    distributed = training_args.world_size > 1
    device, autocast = training_args.device, autocast_dtype_for(training_args)
    if model is None:
        model = build_model(model_args, classnames, templates, device=device, distributed=distributed,
                            output_dir=output_dir)
    if training_args.head_init == "linear-probe":
        init_linear_probe_head(model, train_dataset, eval_transform, model_args.embedding_batch_size,
                               skip_corrupt_images=skip_corrupt_images, device=device, autocast_dtype=autocast,
                               num_workers=training_args.dataloader_num_workers, distributed=distributed,
                               output_dir=output_dir)

    if needs_sae and saes is None:
        sae_dir = os.path.join(output_dir, SAE_SUBFOLDER)
        # One SAE: sae/ itself; several: sae/<spec>/ each (saeft_hf.sae_set).
        spec_dirs = {spec: os.path.join(sae_dir, spec) if len(specs) > 1 else sae_dir for spec in specs}
        # Keyed on its settings and images: a re-run with other ones must not silently reuse it.
        data_key = dataset_fingerprint(train_dataset)
        keys = {spec: sae_training_key(model_args, seed=training_args.seed, data_fingerprint=data_key,
                                       representation=spec if len(specs) > 1 else None) for spec in specs}
        reusable, refusal = dict.fromkeys(specs, False), None
        for spec, spec_dir in spec_dirs.items():
            if not os.path.isfile(os.path.join(spec_dir, "model.safetensors")):
                continue
            if training_args.should_save:  # the writing process judges the key; it goes first below
                try:
                    reusable[spec] = reuse_trained_sae(
                        SparseAutoencoder.from_pretrained(spec_dir).config.provenance, keys[spec], spec_dir,
                        resuming=bool(training_args.resume_from_checkpoint))
                except SAEFTConfigError as err:
                    refusal = err
                    break
            else:
                reusable[spec] = True  # the others load what it leaves (their fingerprints may differ across nodes)
        # Every rank learns a refusal, so none waits at the collective pass below for one that already failed.
        if not all_ranks_agree(refusal is None):
            raise refusal or SAEFTConfigError(f"The process that writes {sae_dir} refused it (see its error).")
        embeddings = None
        # Decided by all ranks together: the embedding pass below is collective, so no rank may skip it alone. It
        # embeds every representation at once (one forward per batch), the reused ones' parts are simply unused.
        all_reused = all_ranks_agree(all(reusable.values()))
        if not all_reused:
            embeddings = sae_training_embeddings(
                model, train_dataset, eval_transform, model_args, output_dir=output_dir,
                skip_corrupt_images=skip_corrupt_images, device=device, autocast_dtype=autocast,
                num_workers=training_args.dataloader_num_workers, distributed=distributed,
                seed=training_args.seed)
        # Several processes: the main process trains and saves the SAE (minutes on the accelerator) while the
        # others wait, then they load that file, so every rank regularises with the same SAE and only one
        # process writes it. (One per node with save_on_each_node, i.e. when the nodes share no file system.)
        with training_args.main_process_first(local=training_args.save_on_each_node, desc="training the SAE"):
            if all_reused or not training_args.should_save:
                # reused, or just written by the saving process
                saes = {spec: SparseAutoencoder.from_pretrained(spec_dir) for spec, spec_dir in spec_dirs.items()}
            else:
                kept = {spec: SparseAutoencoder.from_pretrained(spec_dirs[spec]) for spec in specs if reusable[spec]}
                fit = dict(output_dir=output_dir, seed=training_args.seed, skip_corrupt_images=skip_corrupt_images,
                           embeddings=embeddings, device=device)
                trained = ({specs[0]: train_sae_for_model(model, train_dataset, eval_transform, model_args, **fit)}
                           if len(specs) == 1 else
                           train_saes_for_model(model, train_dataset, eval_transform, model_args, **fit,
                                                representations=[s for s in specs if not reusable[s]]))
                for spec, new in trained.items():
                    new.config.provenance = json.loads(json.dumps(keys[spec]))
                saes = {spec: kept[spec] if spec in kept else trained[spec] for spec in specs}
                # Whole or absent (every SAE of the set together): it is reused on resume.
                write_dir_atomic(sae_dir, lambda tmp: save_sae_set(saes, tmp))

    if (training_args.reference_mode == "cached" and training_args.regularization_active
            and training_args.regularizer in ("sae_ft", "feature_distill")):
        # z0 once per image from the pre-trained model, before LoRA and the trainer exist: only the reference changes.
        train_dataset = add_cached_reference(model, train_dataset, eval_transform, model_args, training_args, "train",
                                             skip_corrupt_images=skip_corrupt_images)
        if eval_dataset is not None:
            eval_dataset = add_cached_reference(model, eval_dataset, eval_transform, model_args, training_args, "eval",
                                                skip_corrupt_images=skip_corrupt_images)

    if training_args.should_save:
        save_initial_head(model, output_dir)  # with the source checkpoint, theta_0 for WiSE-FT (here or later)
    if training_args.use_lora:
        model = add_lora(
            model, r=training_args.lora_r, alpha=training_args.lora_alpha, dropout=training_args.lora_dropout,
            target_modules=training_args.lora_target_modules, use_dora=training_args.use_dora,
        )

    push, hub_token = training_args.push_to_hub, training_args.hub_token
    training_args.push_to_hub = False  # we push model, SAE, results and card together at the end
    # ...so the Trainer never needs the token: keep it out of the args it pickles into every training_args.bin.
    training_args.hub_token = None
    num_labels = len(classnames)
    trainer = SAEFTTrainer(
        model=model,
        args=training_args,
        sae=saes,
        train_dataset=with_image_transform(train_dataset, train_transform, skip_corrupt_images=skip_corrupt_images),
        eval_dataset=(with_image_transform(eval_dataset, eval_transform, skip_corrupt_images=skip_corrupt_images)
                      if eval_dataset is not None else None),
        data_collator=ImageClassificationCollator(num_labels=num_labels),
        # Per-image crops keyed on (seed, epoch, image): a resumed or multi-process run sees the same augmentation.
        callbacks=[SetEpochCallback(train_transform)],
    )
    if trainer.is_fsdp_enabled:
        if wise_ft_alphas:
            raise ValueError(_FSDP_WISE_FT)
        state_dict_type = str(getattr(trainer.accelerator.state.fsdp_plugin, "state_dict_type", ""))
        if eval_sets and "FULL_STATE_DICT" not in state_dict_type:
            # The evaluation loads the saved model: a sharded checkpoint would fail only after training.
            raise ValueError(f"FSDP with fsdp_state_dict_type {state_dict_type or 'unset'} saves a sharded model "
                             "that the evaluation cannot load: set fsdp_state_dict_type: FULL_STATE_DICT (as in "
                             "accelerate_configs/fsdp2.yaml), or drop --eval_sets_config and evaluate later.")
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    train_time, train_cpu = time.time() - start, time.process_time() - start_cpu
    trainer.save_model(output_dir)
    trainer.save_state()
    if training_args.use_lora and trainer.is_world_process_zero():
        save_base_config(trainer.model, output_dir)

    results: dict[str, Any] = {}
    if eval_dataset is not None:
        results["trainer_eval"] = trainer.evaluate()
    eval_start, eval_cpu = time.time(), time.process_time()
    report = None
    if eval_sets or holdout_sets:
        report = _evaluate_saved_run(
            trainer, eval_sets or {}, holdout_sets, id_name=id_name, shift_names=shift_names,
            wise_ft_alphas=wise_ft_alphas, select_on=wise_ft_select_on, selection=selection, known=wise_ft_known,
            batch_size=eval_batch_size, bf16=eval_bf16, max_samples=max_eval_samples,
            skip_corrupt_images=skip_corrupt_images,
        )
        results.update(report.to_dict())
    # Wall seconds, and CPU seconds of this process (all threads; steadier than wall time on a shared machine).
    results["timing"] = {"train_s": round(train_time, 1), "eval_s": round(time.time() - eval_start, 1),
                         "train_cpu_s": round(train_cpu, 1), "eval_cpu_s": round(time.process_time() - eval_cpu, 1)}
    results["wall_time_s"] = round(time.time() - start, 1)

    if trainer.is_world_process_zero():
        if report is not None:
            save_wise_ft_model(report, output_dir)
        save_results(os.path.join(output_dir, "eval_results.json"), results)
        hyper = {
            "regularizer": training_args.regularizer, "lambda_reg": training_args.lambda_reg,
            "lambda_add": training_args.lambda_add, "lambda_remove": training_args.lambda_remove,
            "mu": training_args.mu, "sae_normalize": training_args.sae_normalize,
            "learning_rate": training_args.learning_rate, "weight_decay": training_args.weight_decay,
            "use_lora": training_args.use_lora, "head_init": training_args.head_init,
            "global_steps": trainer.state.global_step,
        }
        write_model_card(
            output_dir,
            model_name=os.path.basename(os.path.normpath(output_dir)),
            base_model=model_args.model_name_or_path,
            results=report.final if report is not None else {},
            wise_ft=report.wise_ft if report is not None else None,
            hyperparameters=hyper,
            dataset_id=dataset_id,
            is_adapter=training_args.use_lora,
            repo_id=training_args.hub_model_id,
        )
        if push:
            repo_id = training_args.hub_model_id or os.path.basename(os.path.normpath(output_dir))
            url = push_run_to_hub(output_dir, repo_id, token=hub_token,
                                  private=training_args.hub_private_repo, revision=training_args.hub_revision)
            logger.info("Pushed to %s", url)
    single = trainer.sae if needs_sae else (sae if isinstance(sae, SparseAutoencoder) else None)
    return RunResult(trainer=trainer, sae=single, results=results, saes=trainer.saes)
