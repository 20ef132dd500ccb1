"""Pre-train a benchmark world's tiny CLIP contrastively and write its bundled checkpoint.

    HF_HUB_OFFLINE=1 .venv/bin/python recipes/pretrain_tiny_clip.py                        # -> saeft_hf/benchmarks/tiny_clip/
    HF_HUB_OFFLINE=1 .venv/bin/python recipes/pretrain_tiny_clip.py --output_dir /tmp/clip --seed 1
    HF_HUB_OFFLINE=1 .venv/bin/python recipes/pretrain_tiny_clip.py --world fashion   # -> .../tiny_clip_fashion/

Trains `transformers.CLIPModel(return_loss=True)` with `transformers.Trainer` on the ``pretrain`` split of
`build_digit_benchmark(data_seed)` (4,900 images: scarce MNIST and its corrupted copies, UCI, printed), or of another
world's benchmark (`--world fashion`: 4,000 images), captions re-drawn per image and epoch by the world's collator. Writes the model (safetensors), the tokenizer,
``preprocessor_config.json`` and ``training_info.json`` (arguments, wall time, zero-shot accuracies, split sizes,
versions). Same seed, same package versions and same thread count -> the same weights bit for bit (CPU,
single-process data loading, `full_determinism`).
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any HF import: nothing here needs the Hub

import numpy as np
import PIL
import torch
import transformers
from transformers import CLIPModel, HfArgumentParser, Trainer, TrainerCallback, TrainingArguments

from saeft_hf.benchmarks import digits
from saeft_hf.benchmarks.worlds import WORLD_MODULES, get_world


@dataclass
class PretrainArguments:
    world: str = field(default="digits", metadata={"help": f"benchmark world: {', '.join(WORLD_MODULES)}"})
    output_dir: str | None = field(default=None,
                                   metadata={"help": "where to write the checkpoint (default: the world's bundled "
                                                     "directory)"})
    seed: int = field(default=0, metadata={"help": "model init, data order and caption sampling seed"})
    data_seed: int = field(default=digits.BUNDLED_DATA_SEED, metadata={"help": "build_digit_benchmark seed"})
    epochs: float = 25.0
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 0.1
    warmup_ratio: float = 0.05
    max_logit_scale: float = field(default=math.log(100.0), metadata={"help": "clamp for logit_scale (CLIP: ln 100)"})
    num_threads: int = field(default=2, metadata={"help": "torch threads; part of what makes reruns bit-identical"})
    evaluate: bool = field(default=True, metadata={"help": "report zero-shot accuracy on every evaluation split"})


class ClampLogitScale(TrainerCallback):
    """CLIP clamps its temperature at 100 in the original training code; `CLIPModel`'s loss does not."""

    def __init__(self, max_value: float) -> None:
        self.max_value = max_value

    def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001 (Trainer callback API)
        with torch.no_grad():
            model.logit_scale.clamp_(max=self.max_value)


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(PretrainArguments).parse_args_into_dataclasses(args=argv)
    torch.set_num_threads(args.num_threads)
    t0 = time.perf_counter()

    world = get_world(args.world)
    dsd = world.build(args.data_seed)
    tokenizer = world.build_tokenizer()
    transformers.set_seed(args.seed, deterministic=True)  # model init below depends on it
    model = CLIPModel(digits.tiny_clip_config(tokenizer))
    model.accepts_loss_kwargs = False  # CLIP's loss is a batch mean; don't let the Trainer pass num_items_in_batch

    with tempfile.TemporaryDirectory() as tmp:  # Trainer wants an output_dir; we save the model ourselves
        targs = TrainingArguments(
            output_dir=tmp, use_cpu=True, report_to="none", save_strategy="no", eval_strategy="no",
            seed=args.seed, data_seed=args.seed, full_determinism=True,
            num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
            learning_rate=args.learning_rate, weight_decay=args.weight_decay, lr_scheduler_type="cosine",
            warmup_steps=args.warmup_ratio, optim="adamw_torch",
            remove_unused_columns=False,  # the collator needs image/label/source, not CLIP forward args
            dataloader_num_workers=0, dataloader_pin_memory=False, logging_steps=100, disable_tqdm=True,
        )
        trainer = Trainer(
            model=model, args=targs, train_dataset=dsd["pretrain"],
            data_collator=world.collator(tokenizer, seed=args.seed),
            callbacks=[ClampLogitScale(args.max_logit_scale)],
        )
        train_out = trainer.train()
    train_seconds = time.perf_counter() - t0

    model = trainer.model.eval()
    out = Path(args.output_dir or world.clip_path())
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    os.chmod(out / "model.safetensors", 0o644)  # saved via a private temp file (0600); package data must be readable
    tokenizer.save_pretrained(out)
    digits.save_image_processor(out)

    accuracy: dict[str, float] = {}
    if args.evaluate:
        text = digits.zero_shot_text_embeddings(model, tokenizer, world.classnames, world.templates)
        tune = (world.tune_shift_split,) if world.tune_shift_split else world.tuning_splits
        for name in ("validation", world.id_test_split, *world.shift_splits, *tune):
            accuracy[name] = round(100 * digits.zero_shot_accuracy(model, tokenizer, dsd[name], text_embeddings=text), 2)
        accuracy["shift_avg"] = round(sum(accuracy[s] for s in world.shift_splits) / len(world.shift_splits), 2)

    info = {
        "arguments": {**asdict(args), "output_dir": None},  # the path is machine-specific
        "wall_seconds_build_and_train": round(train_seconds, 1),  # benchmark build + Trainer.train
        "mean_train_loss": round(float(train_out.training_loss), 4),
        "logit_scale_exp": round(float(model.logit_scale.detach().exp()), 3),
        "num_parameters": {"total": sum(p.numel() for p in model.parameters()),
                           "vision": sum(p.numel() for p in model.vision_model.parameters())},
        "zero_shot_accuracy": accuracy,
        "split_sizes": digits.split_sizes(dsd),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "numpy": np.__version__,
                     "pillow": PIL.__version__},
    }
    (out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))
    return info


if __name__ == "__main__":
    main(sys.argv[1:])
