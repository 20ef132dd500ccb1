"""`SAEFTTrainer`: `transformers.Trainer` whose loss is cross-entropy plus `lambda_reg` times the SAE-FT penalty.

Per batch: `z = f(x)` from the model being trained and `z0 = f0(x)` from the frozen pre-trained model on the same
augmented images (a frozen copy for full fine-tuning; for LoRA, the same model with its adapters disabled), then
`loss = CE(head(z/|z|), y) + lambda_reg * R(z, z0)`. Every term is logged for train and eval.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections import defaultdict
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn
from transformers import EvalPrediction, Trainer, TrainerCallback

from .config import SAEFTConfig
from .modeling import SAEFTCLIPForImageClassification
from .penalty import feature_distillation_penalty, l2sp_penalty, sae_ft_penalty
from .sae import SparseAutoencoder

SAE_SUBFOLDER = "sae"

logger = logging.getLogger(__name__)


def compute_accuracy(eval_pred: EvalPrediction) -> dict[str, float]:
    """Top-1 accuracy in numpy (works offline, unlike `evaluate.load("accuracy")`)."""
    logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(eval_pred.label_ids)).mean())}


def base_classifier(model: nn.Module) -> SAEFTCLIPForImageClassification:
    """The `SAEFTCLIPForImageClassification` inside `model` (itself, or the base of a `PeftModel`)."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if not isinstance(base, SAEFTCLIPForImageClassification):
        raise TypeError(
            f"SAEFTTrainer trains a SAEFTCLIPForImageClassification (or a PeftModel around one), got "
            f"{type(base).__name__}. Build it with saeft_hf.zeroshot.from_clip(...)."
        )
    return base


class SetEpochCallback(TrainerCallback):
    """Call `set_epoch(epoch)` on some objects (e.g. the train transform) at the start of every training epoch.

    Epochs are numbered as the Trainer's loop numbers them, also after `resume_from_checkpoint`: the first epoch of a
    `train()` call is `floor(state.epoch)` (the epoch the resumed checkpoint is in), then one more per epoch.
    Counting, rather than reading `state.epoch` each time, keeps the numbering right when a streaming epoch ends
    before the `max_steps` steps the Trainer assumes for it.
    """

    def __init__(self, *targets: Any) -> None:
        self.targets = [t for t in targets if hasattr(t, "set_epoch")]
        self._epoch: int | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._epoch = None

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._epoch = int(math.floor(state.epoch or 0.0)) if self._epoch is None else self._epoch + 1
        for target in self.targets:
            target.set_epoch(self._epoch)


class SAEFTTrainer(Trainer):
    """Trainer for SAE-FT and its baselines (`args.regularizer`): full fine-tuning or LoRA (a `PeftModel`).

    Args:
        model: a `SAEFTCLIPForImageClassification`, or a `PeftModel` wrapping one (`saeft_hf.lora.add_lora`).
        args: a `SAEFTConfig`.
        sae: the frozen SAE for `regularizer="sae_ft"`; loaded from `args.sae_name_or_path` when not given.
        **kwargs: everything `transformers.Trainer` takes (datasets, collator, callbacks, ...). `compute_metrics`
            defaults to top-1 accuracy.
    """

    # compute_loss returns a per-micro-batch mean: the Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, model: nn.Module, args: SAEFTConfig, *, sae: SparseAutoencoder | None = None, **kwargs: Any) -> None:
        if not isinstance(args, SAEFTConfig):
            raise TypeError(f"SAEFTTrainer needs args=SAEFTConfig(...), got {type(args).__name__}.")
        base = base_classifier(model)
        self.is_lora = isinstance(model, PeftModel)
        self.sae: SparseAutoencoder | None = None
        self.ref_model: SAEFTCLIPForImageClassification | None = None
        self._l2sp_reference: dict[str, torch.Tensor] | None = None
        if args.regularization_active:
            if args.regularizer == "sae_ft":
                self.sae = self._load_sae(sae, args, base)
            needs_embeddings = args.regularizer in ("sae_ft", "feature_distill")
            if needs_embeddings and args.reference_mode == "live" and not self.is_lora:
                # The frozen f0: a copy taken before any training step (and before a resumed checkpoint is loaded).
                self.ref_model = copy.deepcopy(base).requires_grad_(False).eval()
            if args.regularizer == "l2sp":
                self._l2sp_reference = {
                    name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad
                }
        kwargs.setdefault("compute_metrics", compute_accuracy)
        self._stream_steps_per_epoch: int | None = None
        if isinstance(kwargs.get("train_dataset"), datasets.IterableDataset):
            kwargs["train_dataset"] = self._prepare_stream(kwargs["train_dataset"], args)
        super().__init__(model=model, args=args, **kwargs)
        device = self.args.device
        for module in (self.sae, self.ref_model):
            if module is not None:
                module.to(device)
        if self._l2sp_reference is not None:
            self._l2sp_reference = {k: v.to(device) for k, v in self._l2sp_reference.items()}
        self._metrics: dict[str, dict[str, list[torch.Tensor]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._eval_prefix = "eval"
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=device)

    def _prepare_stream(self, stream: datasets.IterableDataset, args: SAEFTConfig) -> datasets.IterableDataset:
        """Streaming train set: every rank reads its own shards, and with `num_train_examples` epochs have a length.

        Accelerate's default for an IterableDataset is to read it on rank 0 and dispatch slices to the others, so one
        host's workers decode for every GPU. `dispatch_batches=False` makes it shard the stream by rank
        (`IterableDataset.shard`, once: a rank keeps its shards, whose order and examples each epoch reshuffles), and
        DataLoader workers split each rank's shards further.

        With `num_train_examples`, an epoch is `stream_steps_per_epoch()` optimizer steps: the Trainer then numbers
        epochs right, calls `set_epoch` (a seeded reshuffle) at each, and on resume skips to the exact batch of the
        exact epoch. The stream is repeated without end so that every rank has that many batches even when its shards
        hold slightly fewer examples than an even split (a rank short of data starts its pass over, like the padding
        of a DistributedSampler); the Trainer stops each epoch after its steps. Resuming inside an epoch reads and
        drops that epoch's batches up to the checkpoint: exact, for the cost of decoding them again.
        """
        if args.accelerator_config.dispatch_batches is None:
            args.accelerator_config.dispatch_batches = False
        readers = args.world_size * max(1, args.dataloader_num_workers)
        if not args.accelerator_config.dispatch_batches and stream.num_shards < readers and args.process_index == 0:
            logger.warning(
                "The training stream has %d shard(s) for %d process(es) x %d dataloader worker(s): %s Use more shards "
                "(more webdataset tars / parquet files; for a map-style dataset Dataset.to_iterable_dataset(num_shards="
                "...)) or fewer dataloader workers.",
                stream.num_shards, args.world_size, max(1, args.dataloader_num_workers),
                "every process reads the whole stream and keeps its share of the batches (the decoding is repeated "
                "on each process)." if stream.num_shards < args.world_size
                else "some dataloader workers have no shard and stay idle.",
            )
        if args.num_train_examples is None:
            if args.max_steps <= 0:
                raise ValueError(
                    "A streaming training set has no length: set num_train_examples (the examples in one pass, "
                    "e.g. 1281167 for ImageNet-1k) to train for num_train_epochs, or set max_steps."
                )
            return stream
        self._stream_steps_per_epoch = args.stream_steps_per_epoch()
        # The Trainer wants max_steps for a dataset without __len__; it is now derived from the epochs.
        args.max_steps = args.stream_max_steps()
        return stream.repeat(None)

    def set_initial_training_values(
        self, args: Any, dataloader: Any
    ) -> tuple[int, int, int, int, int, int | None, int]:
        """The Trainer's epoch/step bookkeeping, plus epochs of known length for a stream with `num_train_examples`."""
        if self._stream_steps_per_epoch is None:
            values = super().set_initial_training_values(args, dataloader)
        else:
            steps_per_epoch = self._stream_steps_per_epoch
            total_batch = self.get_total_train_batch_size(args)
            max_steps = args.max_steps
            values = (math.ceil(max_steps / steps_per_epoch), steps_per_epoch, args.num_train_examples,
                      max_steps * total_batch, total_batch, steps_per_epoch * args.gradient_accumulation_steps,
                      max_steps)
        if self.is_world_process_zero():
            _, steps_per_epoch, _, _, total_batch, _, max_steps = values
            logger.info(
                "Training plan: global batch %d = %d per device x %d process(es) x %d accumulation step(s); "
                "%d optimizer steps per epoch; %d total steps (%s epochs).",
                total_batch, self._train_batch_size, args.world_size, args.gradient_accumulation_steps,
                steps_per_epoch, max_steps, f"{max_steps / steps_per_epoch:g}",
            )
        return values

    @staticmethod
    def _load_sae(sae: SparseAutoencoder | None, args: SAEFTConfig, base: SAEFTCLIPForImageClassification) -> SparseAutoencoder:
        if sae is None:
            if args.sae_name_or_path is None:
                raise ValueError(
                    "regularizer='sae_ft' with lambda_reg > 0 needs an SAE: pass `sae=` or `sae_name_or_path`, or train "
                    "one on the pre-trained model's embeddings first (saeft_hf.train_sae / recipes/train_sae.py)."
                )
            sae = SparseAutoencoder.from_pretrained(args.sae_name_or_path)
        sae.check_compatible(
            d_in=base.representation_dim(),
            source_model=None if args.allow_sae_source_mismatch else base.config.source_model,
            representation=base.config.representation,
        )
        return sae.requires_grad_(False).eval()

    # ------------------------------------------------------------------------------------------------------------
    # The loss
    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reference_representation(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """z0 = f0(x) [B, d]: the frozen pre-trained model's representation, in the training precision.

        One forward of the frozen model under `no_grad` with the model's own attention kernel, returning only the
        penalty's representation (no hidden states). Not `inference_mode`: z0 enters the penalty next to the
        trainable z, and an inference tensor that any loss term saves for backward is an error; it measured no
        faster on CPU either. `reference_mode="cached"` removes this forward altogether.
        """
        with self.accelerator.autocast():
            if self.is_lora:
                peft_model = self.accelerator.unwrap_model(model)
                was_training = peft_model.training
                peft_model.eval()  # f0 runs without dropout, like the frozen copy
                with peft_model.disable_adapter():
                    z0 = peft_model.get_base_model().get_representation(pixel_values)
                peft_model.train(was_training)
            else:
                z0 = self.ref_model.get_representation(pixel_values)
        return z0

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        mode = "train" if model.training else "eval"
        inputs = dict(inputs)  # prediction_step reads the labels from the same dict afterwards
        labels = inputs.pop("labels")
        cached_z0 = inputs.pop("z0", None)
        outputs = model(pixel_values=inputs["pixel_values"])
        ce = F.cross_entropy(outputs.logits.float(), labels)
        loss = ce
        terms: dict[str, torch.Tensor] = {"ce": ce}
        args: SAEFTConfig = self.args
        if args.regularization_active:
            z = outputs.representation
            if args.regularizer == "l2sp":
                # The reference is keyed by the unwrapped model's names (no DDP `module.` prefix).
                reg = l2sp_penalty(self.accelerator.unwrap_model(model).named_parameters(), self._l2sp_reference)
            else:
                if args.reference_mode == "cached" and cached_z0 is not None:
                    z0 = cached_z0.to(z.device)
                elif args.reference_mode == "cached":
                    raise ValueError(
                        "reference_mode='cached' but the batch has no `z0`: add reference embeddings to the dataset "
                        "(saeft_hf.embeddings.add_reference_embeddings) or use reference_mode='live'."
                    )
                else:
                    z0 = self.reference_representation(model, inputs["pixel_values"])
                if args.regularizer == "feature_distill":
                    reg = feature_distillation_penalty(z.float(), z0.float(), normalize=args.sae_normalize)
                else:
                    penalty = sae_ft_penalty(
                        self.sae, z, z0, lambda_add=args.lambda_add, lambda_remove=args.lambda_remove, mu=args.mu,
                        normalize=args.sae_normalize,
                    )
                    reg = penalty.total
                    terms.update(
                        add=penalty.add, remove=penalty.remove, residual=penalty.residual,
                        features_added=penalty.features_added, features_removed=penalty.features_removed,
                    )
            loss = ce + args.lambda_reg * reg
            terms["penalty"] = reg
        for name, value in terms.items():
            self._metrics[mode][name].append(value.detach())
        if mode == "train":
            # No sync here: the flag is read at logging and saving steps.
            self._nonfinite |= ~torch.isfinite(loss.detach())
        if return_outputs:
            outputs.loss = loss
            outputs.representation = None  # keep eval predictions to the logits
            return loss, outputs
        return loss

    # ------------------------------------------------------------------------------------------------------------
    # Logging, evaluation, saving
    # ------------------------------------------------------------------------------------------------------------
    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval") -> dict[str, float]:
        # Remember the prefix so per-dataset evaluations log eval_<name>_ce etc., not all as eval_ce.
        self._eval_prefix = metric_key_prefix
        try:
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        finally:
            self._eval_prefix = "eval"

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        if mode == "train":
            self._raise_if_nonfinite()
        metrics = {}
        for name, values in self._metrics[mode].items():
            if values:
                mean = torch.stack([v.float() for v in values]).mean()
                metrics[name] = float(self.accelerator.reduce(mean, reduction="mean"))
        if mode == "eval":
            metrics = {f"{self._eval_prefix}_{name}": value for name, value in metrics.items()}
        logs = {**logs, **metrics}
        super().log(logs, start_time)
        self._metrics[mode].clear()

    def _raise_if_nonfinite(self) -> None:
        if bool(self._nonfinite):
            checkpoints = sorted(
                (d for d in os.listdir(self.args.output_dir) if d.startswith("checkpoint-")),
                key=lambda d: int(d.split("-")[-1]),
            ) if os.path.isdir(self.args.output_dir) else []
            last = os.path.join(self.args.output_dir, checkpoints[-1]) if checkpoints else None
            raise FloatingPointError(
                f"The training loss became NaN or inf at or before step {self.state.global_step}; training stopped "
                f"and nothing after it was saved. Last good checkpoint: {last or 'none saved yet'}. Lower "
                "learning_rate or lambda_reg, check the images for NaN/inf, or train in fp32, then resume with "
                "--resume_from_checkpoint."
            )

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        self._raise_if_nonfinite()  # never overwrite a good checkpoint with NaN weights
        super()._save_checkpoint(model, trial)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.sae is not None and self.args.should_save:
            # The SAE travels with every checkpoint and with the final model (and so to the Hub).
            self.sae.save_pretrained(os.path.join(output_dir, SAE_SUBFOLDER))
