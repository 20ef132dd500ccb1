"""SAE-FT of a Hub CLIP checkpoint on ImageNet (or any image-classification dataset), full or LoRA.

    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/imagenet.py \
        --config recipes/configs/imagenet_vit_b16.yaml --output_dir outputs/vit-b16-saeft

    python recipes/imagenet.py --model_name_or_path openai/clip-vit-base-patch16 \
        --train_dir /data/imagenet/train --validation_dir /data/imagenet/val --use_lora --output_dir out

Trains an SAE on the pre-trained embeddings first when no `--sae_name_or_path` is given; saves the model (or
adapter), `sae/`, `trainer_state.json` and `eval_results.json` in `--output_dir`; evaluates the shift sets listed in
`--eval_sets_config` (ImageNet-V2/R/A/Sketch/ObjectNet); `--push_to_hub` uploads it all with a model card.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from saeft_hf.config import SAEFTConfig
from saeft_hf.data import check_dataset_size, load_image_dataset, shuffle_for_training
from saeft_hf.evaluation import load_eval_sets, load_eval_specs
from saeft_hf.imagenet_classes import IMAGENET_TEMPLATES, imagenet_classnames, imagenet_wnids
from saeft_hf.pipeline import ModelArguments, parse_args, run_saeft


@dataclass
class DataArguments:
    """Where the images come from."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset id (e.g. timm/imagenet-1k-wds, ILSVRC/imagenet-1k) or a builder."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    train_dir: str | None = field(default=None, metadata={"help": "Local class-folder tree for training."})
    validation_dir: str | None = field(default=None, metadata={"help": "Local class-folder tree for validation."})
    train_split: str = field(default="train", metadata={"help": "Training split name."})
    validation_split: str = field(default="validation", metadata={"help": "ID validation split name."})
    streaming: bool = field(default=False, metadata={"help": "Stream the training set (needs --max_steps)."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (auto-detected by default)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (auto-detected by default)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation images."})
    skip_corrupt_images: bool = field(
        default=False, metadata={"help": "Skip (and count) undecodable images instead of stopping with an error."}
    )
    classnames_file: str | None = field(
        default=None, metadata={"help": "One class name per line, in label order (default: from the dataset, "
                                        "ImageNet names for ImageNet wnids)."}
    )
    templates_file: str | None = field(
        default=None, metadata={"help": "Prompt templates for the zero-shot head, one per line with {} for the class "
                                        "name (default: the 80 OpenAI ImageNet templates)."}
    )
    eval_sets_config: str | None = field(
        default=None, metadata={"help": "YAML list of shift sets to evaluate (see recipes/configs/imagenet_eval_sets.yaml)."}
    )
    wise_ft_alphas: list[float] | None = field(
        default=None, metadata={"help": "WiSE-FT mixing weights to sweep after training; the chosen model is saved in "
                                        "OUTPUT_DIR/wise_ft/."}
    )
    wise_ft_holdout: float = field(
        default=0.01, metadata={"help": "Training images held out (at random, seed --seed) to choose the WiSE-FT "
                                        "alpha: a count (>= 1) or a fraction (< 1). Never a reported set."}
    )
    wise_ft_select_on: str | None = field(
        default=None, metadata={"help": "Choose the WiSE-FT alpha on this eval set instead (e.g. a `role: holdout` "
                                        "set of the --eval_sets_config); no training images are held out then."}
    )
    eval_bf16: bool = field(
        default=False, metadata={"help": "Evaluate under bf16 autocast (default: fp32, whatever --bf16 says)."}
    )


def _take(dataset, n):
    if n is None:
        return dataset
    return dataset.take(n) if hasattr(dataset, "take") else dataset.select(range(min(n, len(dataset))))


def classnames_for(dataset, data_args: DataArguments) -> list[str]:
    """Readable class names in label order."""
    names = None
    if data_args.classnames_file:
        names = [line.strip() for line in Path(data_args.classnames_file).read_text().splitlines() if line.strip()]
    features = getattr(dataset, "features", None) or {}
    label_feature = features.get("label") if hasattr(features, "get") else None
    dataset_names = list(getattr(label_feature, "names", []) or [])
    if names is not None:
        if dataset_names and len(names) != len(dataset_names):
            raise ValueError(
                f"{data_args.classnames_file} has {len(names)} class names but the dataset has "
                f"{len(dataset_names)} labels: give one name per label, in label order."
            )
        return names
    if dataset_names and set(dataset_names) <= set(imagenet_wnids()):
        lookup = dict(zip(imagenet_wnids(), imagenet_classnames()))
        return [lookup[w] for w in dataset_names]
    if dataset_names:
        return dataset_names
    return imagenet_classnames()  # ImageNet sources whose label is a plain 0..999 index


def main(argv: list[str]) -> None:
    model_args, data_args, training_args = parse_args((ModelArguments, DataArguments, SAEFTConfig), argv)
    source = dict(
        dataset_name=data_args.dataset_name, dataset_config_name=data_args.dataset_config_name,
        image_column=data_args.image_column, label_column=data_args.label_column,
    )
    train = load_image_dataset(**source, train_dir=data_args.train_dir, split=data_args.train_split,
                               streaming=data_args.streaming)
    validation = None
    if data_args.validation_dir or data_args.dataset_name:
        validation = load_image_dataset(**source, validation_dir=data_args.validation_dir,
                                        split=data_args.validation_split)
    classnames = classnames_for(train, data_args)
    if data_args.streaming:
        # An empty stream would otherwise "train" for 0 steps and save the untouched model. Checked on the raw,
        # undecoded stream before the shuffle buffer, so this reads one example. (run_saeft checks map-style sets.)
        check_dataset_size(train, 1, "The training stream")
        train = shuffle_for_training(train, seed=training_args.seed)
    train = _take(train, data_args.max_train_samples)
    validation = _take(validation, data_args.max_eval_samples) if validation is not None else None

    templates = list(IMAGENET_TEMPLATES)
    if data_args.templates_file:
        templates = [t.strip() for t in Path(data_args.templates_file).read_text().splitlines() if t.strip()]
    eval_sets = {}
    if validation is not None:
        eval_sets["validation"] = (validation, None)
    shift_names: list[str] = []
    id_name = "validation"
    if data_args.eval_sets_config:
        # The ID set of the spec file is replaced by the run's own validation split when there is one.
        specs = [s for s in load_eval_specs(data_args.eval_sets_config) if s.role != "id" or validation is None]
        eval_sets.update(load_eval_sets(specs))
        shift_names = [s.name for s in specs if s.role == "shift"]  # `other` and `holdout` sets are in no average
        id_name = next((s.name for s in specs if s.role == "id"), id_name)

    result = run_saeft(
        model_args, training_args, train_dataset=train, eval_dataset=validation, classnames=classnames,
        templates=templates, eval_sets=eval_sets, id_name=id_name, shift_names=shift_names,
        wise_ft_alphas=data_args.wise_ft_alphas, wise_ft_holdout=data_args.wise_ft_holdout,
        wise_ft_select_on=data_args.wise_ft_select_on, eval_bf16=data_args.eval_bf16,
        eval_batch_size=training_args.per_device_eval_batch_size,
        max_eval_samples=data_args.max_eval_samples, skip_corrupt_images=data_args.skip_corrupt_images,
        dataset_id=data_args.dataset_name,
    )
    print(result.results.get("final", result.results))


if __name__ == "__main__":
    main(sys.argv[1:])
