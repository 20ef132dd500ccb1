"""`SAEFTConfig`: every SAE-FT knob as a documented `TrainingArguments` field (the TRL way).

Defaults follow the paper's recipe (METHOD.md section 4): AdamW lr 1e-5, weight decay 0.1, 500 warm-up steps then
cosine, gradient clipping at 1.0, lambda_reg 70, lambda_add 10, mu 1, raw (un-normalised) embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments
from transformers.utils import is_torch_xla_available

from .validation import check_loss_weight

REGULARIZERS = ("sae_ft", "feature_distill", "l2sp", "none")
HEAD_INITS = ("zero-shot", "linear-probe")
REFERENCE_MODES = ("live", "cached")
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


# repr=False: keep TrainingArguments' repr, which hides `*_token` fields; a generated dataclass repr would print
# `hub_token` in clear wherever the config is logged or shown in a traceback.
@dataclass(repr=False)
class SAEFTConfig(TrainingArguments):
    """Training arguments for `SAEFTTrainer`: `TrainingArguments` plus the SAE-FT regulariser, LoRA and the head.

    The loss is `CE + lambda_reg * R`, where `R` is the chosen regulariser:
    `sae_ft`: `lambda_add * add + lambda_remove * remove + mu * residual` (see `saeft_hf.penalty.sae_ft_penalty`);
    `feature_distill`: mean squared distance between the embeddings of the model and of the frozen pre-trained one;
    `l2sp`: squared distance of the weights to their pre-trained values; `none`: plain fine-tuning.
    """

    # -- The regulariser ----------------------------------------------------------------------------------------
    regularizer: str = field(
        default="sae_ft",
        metadata={"help": "Regulariser added to the cross-entropy: sae_ft, feature_distill, l2sp or none.",
                  "choices": list(REGULARIZERS)},
    )
    lambda_reg: float = field(
        default=70.0,
        metadata={"help": "Weight of the regulariser in the loss; 0 means plain fine-tuning (the paper: 70)."},
    )
    lambda_add: float = field(
        default=10.0, metadata={"help": "SAE-FT: weight of the feature-addition term (the paper: 10)."}
    )
    lambda_remove: float = field(
        default=0.0,
        metadata={"help": "SAE-FT: weight of the one-sided feature-removal term (0 = the reference's sae_mask)."},
    )
    mu: float = field(
        default=1.0, metadata={"help": "SAE-FT: weight of the residual term, drift the SAE cannot explain (the paper: 1)."}
    )
    sae_normalize: bool = field(
        default=False,
        metadata={"help": "SAE-FT: feed unit-norm embeddings to the SAE and residual instead of raw ones "
                          "(the reference feeds raw embeddings; its lambdas were tuned for that)."},
    )
    sae_name_or_path: str | None = field(
        default=None,
        metadata={"help": "SAE for the penalty: a Hub repo or a directory written by SparseAutoencoder.save_pretrained, "
                          "or an SAELens or sparsify SAE (folder or Hub repo; one hookpoint's sub-folder). Several "
                          "representations: a folder (or repo) with one SAE per representation in <representation>/ "
                          "subfolders, as a run saves in output_dir/sae/."},
    )
    allow_sae_source_mismatch: bool = field(
        default=False,
        metadata={"help": "Accept an SAE whose recorded source model differs from the model's (same weights, "
                          "other path). Width and representation must still match."},
    )
    reference_mode: str = field(
        default="live",
        metadata={"help": "Where the frozen reference embeddings z0 come from: live (a frozen forward on the same "
                          "augmented batch, as the paper) or cached (a `z0` column computed once per image).",
                  "choices": list(REFERENCE_MODES)},
    )

    # -- LoRA (through PEFT) -----------------------------------------------------------------------------------
    use_lora: bool = field(default=False, metadata={"help": "Fine-tune LoRA adapters on the vision tower instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scaling = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS),
        metadata={"help": "Vision-tower module names that get adapters (attention and MLP projections by default)."},
    )
    use_dora: bool = field(default=False, metadata={"help": "Use DoRA (weight-decomposed LoRA)."})

    # -- The head -----------------------------------------------------------------------------------------------
    head_init: str = field(
        default="zero-shot",
        metadata={"help": "How the recipe initialises the head: zero-shot (from the text tower) or linear-probe "
                          "(LP-FT: a logistic regression on frozen embeddings, from the zero-shot head).",
                  "choices": list(HEAD_INITS)},
    )

    # -- The output directory ------------------------------------------------------------------------------------
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace the results and checkpoints of an earlier run in output_dir (otherwise a run "
                          "refuses a directory that holds them, unless it resumes with --resume_from_checkpoint)."},
    )

    # -- The run's size, independent of the number of processes ------------------------------------------------
    global_batch_size: int | None = field(
        default=None,
        metadata={"help": "Examples per optimizer step over all processes (the paper: 512). Defines the recipe: "
                          "gradient_accumulation_steps is derived as global_batch_size / (per_device_train_batch_size "
                          "x processes), so 1, 2, 4 or 8 GPUs run the same optimisation. None: per-device batch x "
                          "processes x gradient_accumulation_steps, as in TrainingArguments."},
    )
    num_train_examples: int | None = field(
        default=None,
        metadata={"help": "Examples in one pass over a streaming training set (ImageNet-1k: 1281167). A stream has no "
                          "length, so this turns num_train_epochs into steps: steps per epoch = floor(num_train_examples "
                          "/ global batch); each epoch is that many full global batches of the stream reshuffled for "
                          "the epoch. Ignored for map-style datasets, whose length is known."},
    )

    # -- Re-declared parent defaults (the paper's recipe; image datasets need the raw columns) -------------------
    gradient_accumulation_steps: int | None = field(
        default=None,
        metadata={"help": "Micro-batches per optimizer step. None: derived from global_batch_size, or 1 without it. "
                          "Setting it together with global_batch_size is only allowed when the two agree."},
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={"help": "DDP's find_unused_parameters. Off: every trainable parameter of the classifier (or of its "
                          "LoRA adapters) gets a gradient each step, so the extra graph traversal per step is wasted."},
    )
    learning_rate: float = field(default=1e-5, metadata={"help": "Peak AdamW learning rate (the paper: 1e-5)."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (the paper: 0.1)."})
    warmup_steps: float = field(default=500, metadata={"help": "Warm-up steps (int) or ratio (float < 1)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule after warm-up."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (the paper: 1.0)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps (or a ratio)."})
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={"help": "Off: SAEFTTrainer itself stops on a NaN/inf loss at the next logging step, without the "
                          "per-step GPU sync the Trainer's filter costs (it would only hide that loss in the logs)."},
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep dataset columns: the collator needs the raw images."}
    )
    label_names: list[str] | None = field(
        default_factory=lambda: ["labels"], metadata={"help": "Names of the label keys in a batch."}
    )

    def __post_init__(self) -> None:
        accumulation_given = self.gradient_accumulation_steps
        if self.gradient_accumulation_steps is None:
            self.gradient_accumulation_steps = 1  # the parent's default; replaced below when derived
        if not self.use_cpu and not (torch.accelerator.is_available() or is_torch_xla_available()):
            # Without an accelerator the run is on the CPU anyway; saying so is what makes accelerate treat a
            # torchrun / accelerate launch job as one multi-process CPU (gloo) run instead of N unrelated runs.
            self.use_cpu = True
        super().__post_init__()
        self._derive_gradient_accumulation(accumulation_given)
        if self.regularizer not in REGULARIZERS:
            raise ValueError(f"regularizer must be one of {REGULARIZERS}, got {self.regularizer!r}.")
        if self.head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be one of {HEAD_INITS}, got {self.head_init!r}.")
        if self.reference_mode not in REFERENCE_MODES:
            raise ValueError(f"reference_mode must be one of {REFERENCE_MODES}, got {self.reference_mode!r}.")
        for name in ("lambda_reg", "lambda_add", "lambda_remove", "mu"):
            check_loss_weight(name, getattr(self, name))  # finite and >= 0: `nan > 0` is False, NaN would hide
        if self.use_lora and (self.lora_r < 1 or self.lora_alpha <= 0):
            raise ValueError(f"LoRA needs lora_r >= 1 and lora_alpha > 0, got r={self.lora_r}, alpha={self.lora_alpha}.")

    def _derive_gradient_accumulation(self, given: int | None) -> None:
        """`gradient_accumulation_steps` from `global_batch_size` and the world size (known once devices are set up)."""
        if self.num_train_examples is not None and self.num_train_examples < 1:
            raise ValueError(f"num_train_examples must be >= 1, got {self.num_train_examples}.")
        if self.global_batch_size is None:
            return
        if self.global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {self.global_batch_size}.")
        if self.auto_find_batch_size:
            raise ValueError("global_batch_size and auto_find_batch_size cannot be combined: the Trainer would shrink "
                             "the per-device batch without raising the accumulation, changing the global batch. Pick "
                             "a per_device_train_batch_size that fits instead.")
        per_step = self.per_device_train_batch_size * self.world_size
        if self.global_batch_size % per_step:
            fits = [b for b in range(1, self.global_batch_size // self.world_size + 1)
                    if self.global_batch_size % (b * self.world_size) == 0]
            hint = (f"per_device_train_batch_size in {fits[-6:]}" if fits else
                    f"a global_batch_size that is a multiple of the {self.world_size} processes")
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not a multiple of per_device_train_batch_size "
                f"({self.per_device_train_batch_size}) x processes ({self.world_size}) = {per_step}, so no whole "
                f"number of gradient accumulation steps gives it. Use {hint}."
            )
        derived = self.global_batch_size // per_step
        if given is not None and given != derived:
            raise ValueError(
                f"gradient_accumulation_steps={given} conflicts with global_batch_size={self.global_batch_size}: with "
                f"per_device_train_batch_size={self.per_device_train_batch_size} on {self.world_size} process(es) "
                f"the accumulation must be {derived}. Drop gradient_accumulation_steps (it is derived) or "
                "global_batch_size."
            )
        self.gradient_accumulation_steps = derived

    def stream_steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch of a stream of `num_train_examples`: floor(examples / global batch).

        Floor, not ceil: every step then sees a full global batch (static shapes, the same batch statistics on any
        number of processes), and the at most `global batch - 1` examples a pass leaves out differ per epoch
        because each epoch reshuffles the stream.
        """
        if self.num_train_examples is None:
            raise ValueError("stream_steps_per_epoch needs num_train_examples.")
        world_size = self.world_size
        global_batch = self.per_device_train_batch_size * self.gradient_accumulation_steps * world_size
        steps = self.num_train_examples // global_batch
        if steps < 1:
            raise ValueError(
                f"num_train_examples={self.num_train_examples} is smaller than one global batch of {global_batch} "
                f"(per-device {self.per_device_train_batch_size} x accumulation {self.gradient_accumulation_steps} x "
                f"{world_size} process(es)): use more data or a smaller batch."
            )
        return steps

    def stream_max_steps(self) -> int:
        """Total optimizer steps of a streaming run: max_steps if set, else ceil(num_train_epochs x steps/epoch)."""
        if self.max_steps > 0:
            return self.max_steps
        return math.ceil(self.num_train_epochs * self.stream_steps_per_epoch())

    @property
    def regularization_active(self) -> bool:
        """True when the loss has a regulariser term (and so needs a reference)."""
        return self.regularizer != "none" and self.lambda_reg > 0
