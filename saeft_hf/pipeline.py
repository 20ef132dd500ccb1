"""The end-to-end SAE-FT run that the recipes wire up: model + head, SAE, fine-tuning, saving, evaluation.

Recipes parse arguments and load datasets; everything else happens here, so that the ImageNet recipe and the digit
benchmark run the same code path.
"""

from __future__ import annotations

import copy
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

from .config import SAEFTConfig
from .data import (
    REFERENCE_COLUMN,
    ImageClassificationCollator,
    check_dataset_size,
    transforms_from_pretrained,
    with_image_transform,
)
from .embeddings import add_reference_embeddings, compute_embeddings
from .evaluation import evaluate_sets, shift_averages, wise_ft_sweep
from .hub import push_run_to_hub, save_results, write_model_card
from .lora import add_lora, save_base_config
from .sae import SAEConfig, SparseAutoencoder
from .sae_training import train_sae
from .trainer import SAE_SUBFOLDER, SAEFTTrainer, SetEpochCallback, base_classifier
from .validation import (
    SAEFTConfigError,
    check_clip_config,
    check_config_mapping,
    check_sae,
    coerce_config_values,
    data_fingerprint,
    representation_width,
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
        metadata={"help": "What the penalty sees: image_embeds (the paper), pooler_output, hidden_states.{i}.cls|mean."},
    )
    sae_d_sae_multiplier: int = field(default=4, metadata={"help": "New SAE: latents per input dimension (paper: 4)."})
    sae_k: int = field(default=32, metadata={"help": "New SAE: active latents per input (paper: 32)."})
    sae_activation: str = field(default="topk_signed", metadata={"help": "New SAE: topk_signed (paper), topk, batchtopk, relu."})
    sae_epochs: int = field(default=100, metadata={"help": "New SAE: epochs over the cached embeddings (paper: 100)."})
    sae_batch_size: int = field(default=1024, metadata={"help": "New SAE: batch size (paper: 1024)."})
    sae_lr: float = field(default=1e-3, metadata={"help": "New SAE: AdamW learning rate (paper: 1e-3)."})
    sae_max_samples: int | None = field(
        default=None, metadata={"help": "New SAE: embed at most this many training images (all by default)."}
    )
    sae_aux_k: int | None = field(default=None, metadata={"help": "New SAE: AuxK dead latents (None: off, as the paper)."})
    embedding_batch_size: int = field(default=256, metadata={"help": "Batch size for computing embeddings."})


@dataclass
class RunResult:
    """What `run_saeft` produced."""

    trainer: SAEFTTrainer
    sae: SparseAutoencoder | None
    results: dict[str, Any]


def parse_args(dataclass_types: Sequence[type], argv: Sequence[str]) -> tuple[Any, ...]:
    """Parse `argv` into dataclasses; `--config file.yaml` supplies defaults that CLI flags override.

    Unknown YAML keys are an error (a typo would otherwise be silently ignored).
    """
    parser = HfArgumentParser(tuple(dataclass_types))
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
    return parser.parse_args_into_dataclasses(args=argv)


def build_model(
    model_args: ModelArguments,
    classnames: Sequence[str],
    templates: Sequence[str],
) -> Any:
    """The classifier with CLIP's vision weights and a zero-shot head."""
    return from_clip(model_args.model_name_or_path, classnames, templates, representation=model_args.representation)


def train_sae_for_model(
    model: Any,
    dataset: Any,
    eval_transform: Callable[[Any], torch.Tensor],
    model_args: ModelArguments,
    *,
    output_dir: str | None = None,
    seed: int = 0,
    skip_corrupt_images: bool = False,
) -> SparseAutoencoder:
    """Train an SAE on the pre-trained model's embeddings of `dataset` (eval transform, no augmentation)."""
    if model_args.sae_max_samples is not None:
        dataset = dataset.take(model_args.sae_max_samples) if hasattr(dataset, "take") else dataset
    # The same skip policy as training: a corrupt image must not stop the SAE's embedding pass when skips are on.
    images = with_image_transform(dataset, eval_transform, skip_corrupt_images=skip_corrupt_images)
    cache = os.path.join(output_dir, "sae_embeddings.safetensors") if output_dir else None
    embeddings = compute_embeddings(
        model, images, batch_size=model_args.embedding_batch_size, cache_path=cache,
        cache_key=f"{model_args.model_name_or_path}|{model_args.representation}|{model_args.sae_max_samples}",
    )
    d_in = embeddings.shape[1]
    config = SAEConfig(
        d_in=d_in,
        d_sae=model_args.sae_d_sae_multiplier * d_in,
        k=model_args.sae_k,
        activation=model_args.sae_activation,
        source_model=base_classifier(model).config.source_model,
        representation=model_args.representation,
    )
    result = train_sae(
        embeddings, config, epochs=model_args.sae_epochs, batch_size=model_args.sae_batch_size,
        lr=model_args.sae_lr, aux_k=model_args.sae_aux_k, seed=seed,
    )
    logger.info("Trained SAE: %s", result.metrics)
    return result.sae


def init_linear_probe_head(model: Any, dataset: Any, eval_transform: Callable[[Any], torch.Tensor], batch_size: int,
                           skip_corrupt_images: bool = False) -> None:
    """LP-FT: fit the head as a logistic regression on frozen embeddings, starting from the zero-shot head."""
    images = with_image_transform(dataset, eval_transform, skip_corrupt_images=skip_corrupt_images)
    base = base_classifier(model)
    rep = base.config.representation
    base.config.representation = "image_embeds"  # the head reads the projected embedding
    try:
        features, labels = compute_embeddings(base, images, batch_size=batch_size, return_labels=True)
    finally:
        base.config.representation = rep
    weight, bias = fit_linear_probe(features, labels, base.config.num_labels, init_weight=base.classifier.weight.detach())
    set_head(base, weight, bias)


def _model_shape(model_args: ModelArguments, model: Any | None) -> tuple[dict[str, int], str, str | None]:
    """(depth and widths, representation, source model) of the model the run will fine-tune; reads only its config."""
    if model is not None:
        config = base_classifier(model).config
        return check_clip_config(config, "the given model"), config.representation, config.source_model
    name = model_args.model_name_or_path
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise SAEFTConfigError(f"Could not read the model config of {name!r} ({type(err).__name__}: {err}). Pass a "
                               "CLIP checkpoint: a Hub id or a directory with config.json.") from err
    return check_clip_config(config, repr(name)), model_args.representation, str(name)


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
    """`reference_mode="cached"`: `dataset` with a `z0` column from the pre-trained `model` (eval transform), cached in
    `output_dir/reference_embeddings_<split>.safetensors`. A dataset that already has `z0` is used as it is; a
    streaming one must have it (see `saeft_hf.embeddings.add_reference_embeddings`)."""
    if REFERENCE_COLUMN in (dataset.column_names or []):
        return dataset
    if isinstance(dataset, datasets.IterableDataset):
        raise ValueError(
            f"reference_mode='cached' with a streaming {split} dataset that has no `{REFERENCE_COLUMN}` column: "
            "precompute it on a map-style copy (saeft_hf.embeddings.add_reference_embeddings), store it with the "
            "images and stream that, or use reference_mode='live'."
        )
    cache = os.path.join(training_args.output_dir, f"reference_embeddings_{split}.safetensors")
    key = (f"{model_args.model_name_or_path}|{model_args.representation}|{split}|"
           f"{getattr(dataset, '_fingerprint', None)}")
    with training_args.main_process_first(desc=f"reference embeddings ({split})"):
        autocast = torch.bfloat16 if training_args.bf16 else (torch.float16 if training_args.fp16 else None)
        return add_reference_embeddings(dataset, model, eval_transform, batch_size=model_args.embedding_batch_size,
                                        device=training_args.device, autocast_dtype=autocast,
                                        skip_corrupt_images=skip_corrupt_images, cache_path=cache, cache_key=key,
                                        progress=False)


def run_saeft(
    model_args: ModelArguments,
    training_args: SAEFTConfig,
    *,
    train_dataset: Any,
    eval_dataset: Any | None,
    classnames: Sequence[str],
    templates: Sequence[str],
    sae: SparseAutoencoder | None = None,
    eval_sets: Mapping[str, tuple[Any, Any]] | None = None,
    id_name: str = "validation",
    shift_names: Sequence[str] = (),
    wise_ft_alphas: Sequence[float] | None = None,
    wise_ft_known: Mapping[float, Mapping[str, float]] | None = None,
    eval_batch_size: int = 256,
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
            pre-trained embeddings of `train_dataset` and saved in `output_dir/sae`.
        eval_sets: `{name: (raw dataset, EvalSetSpec or None)}` evaluated after training (ID validation and
            shifts; see `saeft_hf.evaluation.load_eval_sets`); results go to `eval_results.json` and the card.
        id_name / shift_names: which of `eval_sets` is the ID validation set (used to pick the WiSE-FT alpha)
            and which are shifts (averaged into `avg_shift`).
        wise_ft_alphas: sweep WiSE-FT over these alphas (weight interpolation; adapter scaling for LoRA).
        wise_ft_known: metrics already measured at some alphas (e.g. {0.0: the zero-shot model's}); alpha 1 is
            always the final evaluation, so neither is evaluated twice.
        skip_corrupt_images: skip (and log) undecodable images in the SAE, linear-probe, training and eval passes.
        model: a ready classifier (skips `build_model`).

    Fails before building anything when a map-style train or eval set is empty (or, with `dataloader_drop_last`,
    smaller than one step), and on every configuration, label, eval-set, model-config or SAE problem that
    `saeft_hf.validation.validate_run` finds (an `SAEFTConfigError` naming the fix). The SAE it trains itself is keyed
    on its settings and the training set's fingerprint (`SAEConfig.provenance`): a later run in the same
    `output_dir` reuses it only when they match, retrains otherwise, and refuses to switch SAEs when resuming. With `push_to_hub`, the upload happens here, once, at the end: the Trainer's own
    `push_to_hub` is turned off and `hub_token` is taken out of `training_args` (so no `training_args.bin` holds
    it). Several processes: only the main process trains and saves the SAE (the others load it) and writes the
    results and the card, and pushes.
    """
    start = time.time()
    output_dir = training_args.output_dir
    _check_sizes(train_dataset, eval_dataset, training_args)
    # Everything else that could fail after training (or make it silently wrong) fails here, before any model exists.
    shape, representation, source_model = _model_shape(model_args, model)
    wise_ft_alphas = validate_run(
        model_args, training_args, train_dataset=train_dataset, eval_dataset=eval_dataset, classnames=classnames,
        templates=templates, eval_sets=eval_sets, id_name=id_name, wise_ft_alphas=wise_ft_alphas, shape=shape,
    )
    needs_sae = training_args.regularizer == "sae_ft" and training_args.regularization_active
    if needs_sae:
        if sae is None and training_args.sae_name_or_path:
            sae = SparseAutoencoder.from_pretrained(training_args.sae_name_or_path)
        if sae is not None:
            check_sae(sae, width=representation_width(representation, shape), representation=representation,
                      source_model=None if training_args.allow_sae_source_mismatch else source_model)
    train_transform, eval_transform = transforms_from_pretrained(model_args.model_name_or_path, seed=training_args.seed)
    if model is None:
        model = build_model(model_args, classnames, templates)
    if training_args.head_init == "linear-probe":
        init_linear_probe_head(model, train_dataset, eval_transform, model_args.embedding_batch_size,
                               skip_corrupt_images=skip_corrupt_images)

    if needs_sae and sae is None:
        sae_dir = os.path.join(output_dir, SAE_SUBFOLDER)
        # Several processes: the main process trains and saves the SAE while the others wait, then they load
        # that file, so every rank regularises with the same SAE and only one process writes it. (One per node
        # with save_on_each_node, i.e. when the nodes share no file system.)
        with training_args.main_process_first(local=training_args.save_on_each_node, desc="training the SAE"):
            # Keyed on its settings and images: a re-run with other ones must not silently reuse it.
            key = sae_training_key(model_args, seed=training_args.seed,
                                   data_fingerprint=data_fingerprint(train_dataset))
            if os.path.isfile(os.path.join(sae_dir, "model.safetensors")):
                previous = SparseAutoencoder.from_pretrained(sae_dir)  # resuming (or another rank): reuse it
                # Only the writing process judges the key (it went first); the others load what it left, so no two
                # processes ever train or write the SAE (their dataset fingerprints may differ across nodes).
                if not training_args.should_save or reuse_trained_sae(
                        previous.config.provenance, key, sae_dir, resuming=bool(training_args.resume_from_checkpoint)):
                    sae = previous
                elif any(previous.config.provenance.get(k) != key[k] for k in ("model", "representation", "data",
                                                                               "max_samples")):
                    embeddings = os.path.join(output_dir, "sae_embeddings.safetensors")
                    if os.path.isfile(embeddings):
                        os.remove(embeddings)  # embeddings of other images (or another model): never reuse them
            if sae is None:
                sae = train_sae_for_model(model, train_dataset, eval_transform, model_args,
                                          output_dir=output_dir, seed=training_args.seed,
                                          skip_corrupt_images=skip_corrupt_images)
                sae.config.provenance = json.loads(json.dumps(key))
                sae.save_pretrained(sae_dir)

    if (training_args.reference_mode == "cached" and training_args.regularization_active
            and training_args.regularizer in ("sae_ft", "feature_distill")):
        # z0 once per image from the pre-trained model, before LoRA and the trainer exist: only the reference changes.
        train_dataset = add_cached_reference(model, train_dataset, eval_transform, model_args, training_args, "train",
                                             skip_corrupt_images=skip_corrupt_images)
        if eval_dataset is not None:
            eval_dataset = add_cached_reference(model, eval_dataset, eval_transform, model_args, training_args, "eval",
                                                skip_corrupt_images=skip_corrupt_images)

    pretrained = None
    if wise_ft_alphas and not training_args.use_lora:
        pretrained = copy.deepcopy(model).requires_grad_(False)  # theta_0 for WiSE-FT
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
        sae=sae,
        train_dataset=with_image_transform(train_dataset, train_transform, skip_corrupt_images=skip_corrupt_images),
        eval_dataset=(with_image_transform(eval_dataset, eval_transform, skip_corrupt_images=skip_corrupt_images)
                      if eval_dataset is not None else None),
        data_collator=ImageClassificationCollator(num_labels=num_labels),
        # Per-image crops keyed on (seed, epoch, image): a resumed or multi-process run sees the same augmentation.
        callbacks=[SetEpochCallback(train_transform)],
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(output_dir)
    trainer.save_state()
    if training_args.use_lora and trainer.is_world_process_zero():
        save_base_config(trainer.model, output_dir)

    results: dict[str, Any] = {}
    if eval_dataset is not None:
        results["trainer_eval"] = trainer.evaluate()
    if eval_sets:
        def evaluate_fn(m: Any) -> dict[str, float]:
            accs = evaluate_sets(m, eval_sets, eval_transform, batch_size=eval_batch_size,
                                 max_samples=max_eval_samples, progress=False, skip_corrupt_images=skip_corrupt_images)
            return {**accs, **shift_averages(accs, id_name, [n for n in shift_names if n in accs])}

        results["final"] = evaluate_fn(trainer.model)
        if wise_ft_alphas:
            known = {1.0: results["final"], **(dict(wise_ft_known) if wise_ft_known else {})}
            sweep = wise_ft_sweep(pretrained, trainer.model, wise_ft_alphas, evaluate_fn, select_on=id_name,
                                  known=known)
            results["wise_ft"] = sweep.to_dict()
    results["wall_time_s"] = round(time.time() - start, 1)

    if trainer.is_world_process_zero():
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
            results={k: v for k, v in results.get("final", {}).items() if k in eval_sets or k == "avg_shift"},
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
    return RunResult(trainer=trainer, sae=sae, results=results)
