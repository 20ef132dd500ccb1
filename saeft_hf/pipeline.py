"""The end-to-end SAE-FT run that the recipes wire up: model + head, SAE, fine-tuning, saving, evaluation.

Recipes parse arguments and load datasets; everything else happens here, so that the ImageNet recipe and the digit
benchmark run the same code path.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import torch
import yaml
from transformers import HfArgumentParser

from .config import SAEFTConfig
from .data import (
    REFERENCE_COLUMN,
    ImageClassificationCollator,
    check_dataset_size,
    transforms_from_pretrained,
    with_image_transform,
)
from .embeddings import add_reference_embeddings, compute_embeddings
from .evaluation import (
    evaluate_model,
    holdout_split,
    load_for_evaluation,
    save_initial_head,
    save_wise_ft_model,
)
from .evaluation.runner import HOLDOUT_NAME, transform_for
from .hub import push_run_to_hub, save_results, write_model_card
from .lora import add_lora, save_base_config
from .sae import SAEConfig, SparseAutoencoder
from .sae_training import train_sae
from .trainer import SAE_SUBFOLDER, SAEFTTrainer, SetEpochCallback, base_classifier
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
        with open(path, encoding="utf-8") as fh:
            values = yaml.safe_load(fh) or {}
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown keys in {path}: {unknown}. Run the recipe with --help for the valid options.")
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
            pre-trained embeddings of `train_dataset` and saved in `output_dir/sae`.
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

    Fails before building anything when a map-style train or eval set is empty (or, with `dataloader_drop_last`,
    smaller than one step). With `push_to_hub`, the upload happens here, once, at the end: the Trainer's own
    `push_to_hub` is turned off and `hub_token` is taken out of `training_args` (so no `training_args.bin` holds
    it). Several processes: only the main process trains and saves the SAE (the others load it) and writes the
    results and the card, and pushes.
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
    train_transform, eval_transform = transforms_from_pretrained(model_args.model_name_or_path, seed=training_args.seed)
    if model is None:
        model = build_model(model_args, classnames, templates)
    if training_args.head_init == "linear-probe":
        init_linear_probe_head(model, train_dataset, eval_transform, model_args.embedding_batch_size,
                               skip_corrupt_images=skip_corrupt_images)

    needs_sae = training_args.regularizer == "sae_ft" and training_args.regularization_active
    if needs_sae and sae is None:
        if training_args.sae_name_or_path:
            sae = SparseAutoencoder.from_pretrained(training_args.sae_name_or_path)
        else:
            sae_dir = os.path.join(output_dir, SAE_SUBFOLDER)
            # Several processes: the main process trains and saves the SAE while the others wait, then they load
            # that file, so every rank regularises with the same SAE and only one process writes it. (One per node
            # with save_on_each_node, i.e. when the nodes share no file system.)
            with training_args.main_process_first(local=training_args.save_on_each_node, desc="training the SAE"):
                if os.path.isfile(os.path.join(sae_dir, "model.safetensors")):
                    sae = SparseAutoencoder.from_pretrained(sae_dir)  # resuming (or another rank): reuse it
                else:
                    sae = train_sae_for_model(model, train_dataset, eval_transform, model_args,
                                              output_dir=output_dir, seed=training_args.seed,
                                              skip_corrupt_images=skip_corrupt_images)
                    sae.save_pretrained(sae_dir)

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
        sae=sae,
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
    return RunResult(trainer=trainer, sae=sae, results=results)
