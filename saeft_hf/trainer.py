"""`SAEFTTrainer`: `transformers.Trainer` whose loss is cross-entropy plus `lambda_reg` times the SAE-FT penalty.

Per batch: `z = f(x)` from the model being trained and `z0 = f0(x)` from the frozen pre-trained model on the same
augmented images (a frozen copy for full fine-tuning; for LoRA, the same model with its adapters disabled), then
`loss = CE(head(z/|z|), y) + lambda_reg * R(z, z0)`. Every term is logged for train and eval.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import shutil
from collections import defaultdict
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn
from transformers import EvalPrediction, Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .atomic import STAGING_PREFIX, fsync_tree, publish_dir, write_dir_atomic
from .checkpoints import (
    RUN_INFO_NAME,
    CheckpointSaveError,
    check_run_matches,
    is_disk_full,
    list_checkpoints,
    recover_leftovers,
    resolve_resume_checkpoint,
)
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
            # An SAELens/sparsify SAE names no representation of ours: it is taken to read the model's.
            sae = SparseAutoencoder.from_pretrained(args.sae_name_or_path,
                                                    default_representation=base.config.representation)
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

    def _count_processes(self, flag: torch.Tensor | bool) -> int:
        """How many processes have `flag` set (every process must call this at the same point)."""
        value = torch.as_tensor(flag, device=self.args.device).to(torch.float32).reshape(())
        if self.args.world_size > 1:
            value = self.accelerator.reduce(value.clone(), reduction="sum")
        return int(value.item())

    def _raise_if_nonfinite(self) -> None:
        # Every process gets here at the same step (logging and saving steps are global). The flags are summed over
        # processes, so a NaN on any one stops all of them here with the same error; a per-process check would let
        # that one raise while the others wait for it forever at the next collective.
        flagged = self._count_processes(self._nonfinite)
        if flagged:
            checkpoints = list_checkpoints(self.args.output_dir)
            last = checkpoints[-1][1] if checkpoints else None
            where = f" on {flagged} of {self.args.world_size} processes" if self.args.world_size > 1 else ""
            raise FloatingPointError(
                f"The training loss became NaN or inf{where} at or before step {self.state.global_step}; training "
                f"stopped and nothing after it was saved. Last good checkpoint: {last or 'none saved yet'}. Lower "
                "learning_rate or lambda_reg, check the images for NaN/inf, or train in fp32, then resume with "
                "--resume_from_checkpoint."
            )

    # ------------------------------------------------------------------------------------------------------------
    # Checkpoints: written whole or not at all, resumed only when complete and from the same run
    # ------------------------------------------------------------------------------------------------------------
    _staging_root: str | None = None  # set while a checkpoint is being written
    _sae_digest: str | None = None

    def run_info(self) -> dict[str, Any]:
        """The settings a resumed run must share with its checkpoint (saved as `saeft_checkpoint.json`)."""
        args: SAEFTConfig = self.args
        base = base_classifier(self.model)
        source = base.config.source_model
        if self._sae_digest is None and self.sae is not None:
            digest = hashlib.sha256()
            for name, tensor in sorted(self.sae.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().float().cpu().numpy().tobytes())
            self._sae_digest = digest.hexdigest()[:16]
        world = max(1, args.world_size)
        return {
            "model": os.path.normpath(source) if source else None,
            "representation": base.config.representation,
            "num_labels": base.config.num_labels,
            "lora": ({"r": args.lora_r, "alpha": args.lora_alpha, "dora": args.use_dora,
                      "target_modules": sorted(args.lora_target_modules)} if self.is_lora else None),
            "regularizer": args.regularizer if args.regularization_active else "none",
            "lambda_reg": args.lambda_reg, "lambda_add": args.lambda_add, "lambda_remove": args.lambda_remove,
            "mu": args.mu, "sae_normalize": args.sae_normalize,
            "sae": self._sae_digest if self.sae is not None else None,
            "global_batch_size": args.per_device_train_batch_size * world * args.gradient_accumulation_steps,
            "world_size": world,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
        }

    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None, **kwargs: Any) -> Any:
        """`Trainer.train`, resuming only from a complete checkpoint of this same run.

        `resume_from_checkpoint=True` (or "true"/"last") picks the newest complete checkpoint in `output_dir` and logs
        the incomplete ones it skipped; a path must be a complete checkpoint. An incomplete checkpoint (no optimizer
        or scheduler state, ...) or one written with another model, regulariser, SAE or global batch is refused
        with a `ResumeError` saying why.
        """
        if self.args.should_save:
            for name in recover_leftovers(self.args.output_dir):
                logger.warning("Cleaned up %s, left by a checkpoint save that was killed midway.", name)
        resume_from_checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if resume_from_checkpoint is not None:
            check_run_matches(resume_from_checkpoint, self.run_info())
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    def _run_epoch(self, *args: Any, **kwargs: Any) -> None:
        # Resumed from a checkpoint that already reached max_steps (a run killed after its last checkpoint, before
        # its final outputs), the Trainer's loop would still run one more step before checking (transformers 5.24):
        # stop before it, so the resumed run ends with the uninterrupted run's weights.
        if self.state.max_steps > 0 and self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True
            return
        super()._run_epoch(*args, **kwargs)

    def _get_output_dir(self, trial: Any) -> str:
        # While a checkpoint is being saved, the Trainer's code writes under the staging folder (see below).
        return self._staging_root if self._staging_root is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Write `checkpoint-N` as if atomically: in `.tmp-checkpoint-N/`, renamed into place when complete.

        The Trainer's own `_save_checkpoint` does the writing, pointed at the staging folder through
        `_get_output_dir`; rotation (`save_total_limit`) and a Hub push then run on the published folder. If any
        process fails to write (a full disk, ...), every process raises `CheckpointSaveError` and the earlier
        checkpoints are left as they were.
        """
        self._raise_if_nonfinite()  # never overwrite a good checkpoint with NaN weights
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        final, staging_root = os.path.join(run_dir, name), os.path.join(run_dir, STAGING_PREFIX + name)
        staged = os.path.join(staging_root, name)
        if self.args.should_save and os.path.exists(staging_root):
            shutil.rmtree(staging_root)  # from an earlier attempt at this step that was killed
        self.accelerator.wait_for_everyone()  # ...before any process writes its RNG state into it
        push, limit = self.args.push_to_hub, self.args.save_total_limit
        error: BaseException | None = None
        self._staging_root = staging_root
        self.args.push_to_hub, self.args.save_total_limit = False, None  # both done below, on `final`
        try:
            super()._save_checkpoint(model, trial)
            if self.args.should_save:
                if self.state.best_model_checkpoint == staged:
                    self.state.best_model_checkpoint = final
                    self.state.save_to_json(os.path.join(staged, "trainer_state.json"))
                with open(os.path.join(staged, RUN_INFO_NAME), "w", encoding="utf-8") as fh:
                    json.dump(self.run_info(), fh, indent=2, sort_keys=True)
                fsync_tree(staged)
        except Exception as err:  # noqa: BLE001 -- every process must learn of it (below) before anyone raises
            error = err
        finally:
            self._staging_root = None
            self.args.push_to_hub, self.args.save_total_limit = push, limit
        failed = self._count_processes(error is not None)
        if failed:
            if self.args.should_save:
                shutil.rmtree(staging_root, ignore_errors=True)
            previous = list_checkpoints(run_dir)
            reason = "the disk is full" if error is not None and is_disk_full(error) else "writing it failed"
            detail = f" ({type(error).__name__}: {error})" if error is not None else " on another process"
            raise CheckpointSaveError(
                f"Saving {name} failed: {reason}{detail}. Nothing of it was kept; "
                + (f"the previous checkpoint {previous[-1][1]} is intact. " if previous
                   else "no earlier checkpoint exists. ")
                + f"Free space under {run_dir} (or lower save_total_limit, or use a larger disk), then "
                + ("resume with --resume_from_checkpoint true." if previous else "run again.")
            ) from error
        if self.args.should_save:
            publish_dir(staged, final)
            shutil.rmtree(staging_root, ignore_errors=True)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        if push:
            self._push_from_checkpoint(final)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.sae is not None and self.args.should_save:
            # The SAE travels with every checkpoint and with the final model (and so to the Hub); written as a whole
            # folder, so a kill while it is replaced leaves the old or the new SAE, never a mix.
            write_dir_atomic(os.path.join(output_dir, SAE_SUBFOLDER), self.sae.save_pretrained)
