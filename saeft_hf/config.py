"""`SAEFTConfig`: every SAE-FT knob as a documented `TrainingArguments` field (the TRL way).

Defaults follow the paper's recipe (METHOD.md section 4): AdamW lr 1e-5, weight decay 0.1, 500 warm-up steps then
cosine, gradient clipping at 1.0, lambda_reg 70, lambda_add 10, mu 1, raw (un-normalised) embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

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
        metadata={"help": "SAE for the penalty: a Hub repo or a directory written by SparseAutoencoder.save_pretrained."},
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

    # -- Re-declared parent defaults (the paper's recipe; image datasets need the raw columns) -------------------
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
        super().__post_init__()
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

    @property
    def regularization_active(self) -> bool:
        """True when the loss has a regulariser term (and so needs a reference)."""
        return self.regularizer != "none" and self.lambda_reg > 0
