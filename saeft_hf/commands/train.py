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

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from saeft_hf.config import SAEFTConfig
from saeft_hf.data import check_dataset_size, load_image_dataset, random_subset, shuffle_for_training
from saeft_hf.evaluation import load_eval_sets
from saeft_hf.imagenet_classes import IMAGENET_TEMPLATES, curated_imagenet_classnames
from saeft_hf.pipeline import ModelArguments, parse_args, run_saeft
from saeft_hf.validation import (
    align_validation_classes,
    check_class_folders,
    check_files,
    check_model_args,
    check_training_args,
    check_wise_ft_alphas,
    imagenet_classnames_for_unnamed_labels,
    load_eval_specs_checked,
)


logger = logging.getLogger(__name__)

@dataclass
class DataArguments:
    """Where the images come from."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset id (e.g. timm/imagenet-1k-wds, ILSVRC/imagenet-1k) or a builder."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    train_dir: str | None = field(default=None, metadata={"help": "Local class-folder tree for training."})
    validation_dir: str | None = field(default=None, metadata={"help": "Local class-folder tree for validation."})
    train_files: list[str] | None = field(
        default=None, metadata={"help": "Local training files: webdataset tars (<key>.jpg + <key>.cls) or parquet "
                                        "files, as globs or paths, e.g. 'shards/train-*.tar' (the builder follows "
                                        "the extension; one stream shard per file)."}
    )
    validation_files: list[str] | None = field(
        default=None, metadata={"help": "Local validation files, as --train_files."}
    )
    train_split: str = field(default="train", metadata={"help": "Training split name."})
    validation_split: str = field(default="validation", metadata={"help": "ID validation split name."})
    streaming: bool = field(
        default=False, metadata={"help": "Stream the training set; give --num_train_examples (examples per pass) to "
                                        "train for --num_train_epochs, or --max_steps."}
    )
    image_column: str | None = field(default=None, metadata={"help": "Image column (auto-detected by default)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (auto-detected by default)."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on a seeded random subset of N images (a stream: the first N after its "
                                        "seeded shuffle, redrawn each epoch)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Validate on a seeded random subset of N images."}
    )
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


def _label_names(dataset) -> list[str]:
    features = getattr(dataset, "features", None) or {}
    label_feature = features.get("label") if hasattr(features, "get") else None
    return list(getattr(label_feature, "names", []) or [])


def classnames_for(dataset, data_args: DataArguments, validation=None) -> list[str]:
    """Readable class names in label order.

    From --classnames_file, else the training set's label names, else (integer labels, e.g. webdataset shards'
    `.cls`) the validation set's (e.g. class folders: position i is label i), else ImageNet's for ImageNet's labels.
    """
    names = None
    if data_args.classnames_file:
        names = [line.strip() for line in Path(data_args.classnames_file).read_text().splitlines() if line.strip()]
    dataset_names = _label_names(dataset)
    if not dataset_names and names is None and validation is not None and _label_names(validation):
        dataset_names = _label_names(validation)
        logger.info("The training labels have no names; using the validation set's %d class names, in label order.",
                    len(dataset_names))
    if names is not None:
        if dataset_names and len(names) != len(dataset_names):
            raise ValueError(
                f"{data_args.classnames_file} has {len(names)} class names but the dataset has "
                f"{len(dataset_names)} labels: give one name per label, in label order."
            )
        return names
    curated = curated_imagenet_classnames(dataset_names)  # wnids or ILSVRC's synset strings ("tench, Tinca tinca")
    if curated is not None:
        return curated
    if dataset_names:
        return dataset_names
    # Plain integer labels: ImageNet's names only for ImageNet's 0..999 labels; otherwise --classnames_file.
    return imagenet_classnames_for_unnamed_labels(dataset, data_args.dataset_name)


def main(argv: list[str]) -> None:
    model_args, data_args, training_args = parse_args((ModelArguments, DataArguments, SAEFTConfig), argv)
    # The library logs its plan (batch, accumulation, steps) and progress at INFO; only the main process prints it.
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if training_args.process_index == 0 else logging.WARNING)
    # What can be checked before any data is read (run_saeft checks the rest before building the model).
    check_training_args(training_args, streaming=data_args.streaming)
    check_model_args(model_args)
    data_args.wise_ft_alphas = check_wise_ft_alphas(data_args.wise_ft_alphas)
    check_files(classnames_file=data_args.classnames_file, templates_file=data_args.templates_file,
                eval_sets_config=data_args.eval_sets_config)
    for what, root in (("train_dir", data_args.train_dir), ("validation_dir", data_args.validation_dir)):
        if root is not None:
            check_class_folders(root, what)
    source = dict(
        dataset_name=data_args.dataset_name, dataset_config_name=data_args.dataset_config_name,
        image_column=data_args.image_column, label_column=data_args.label_column,
    )
    # A local folder streams in shards for every process and DataLoader worker (several each, for the shuffle).
    stream_shards = training_args.world_size * max(1, training_args.dataloader_num_workers) * 8
    train = load_image_dataset(**source, train_dir=data_args.train_dir, data_files=data_args.train_files,
                               split=data_args.train_split, streaming=data_args.streaming,
                               num_shards=stream_shards if data_args.train_dir else None)
    validation = None
    if data_args.validation_dir or data_args.validation_files or data_args.dataset_name:
        validation = load_image_dataset(**source, validation_dir=data_args.validation_dir,
                                        data_files=data_args.validation_files, split=data_args.validation_split)
    validation = align_validation_classes(train, validation)  # same classes, same ids (or a clear error)
    if data_args.streaming:
        # An empty stream would otherwise "train" for 0 steps and save the untouched model. Checked on the raw,
        # undecoded stream before the shuffle buffer, so this reads one example. (run_saeft checks map-style sets.)
        check_dataset_size(train, 1, "The training stream")
        if data_args.max_train_samples is None:
            train = shuffle_for_training(train, seed=training_args.seed)
        elif training_args.num_train_examples is not None:  # an epoch is a pass over the subset
            training_args.num_train_examples = min(training_args.num_train_examples, data_args.max_train_samples)
    classnames = classnames_for(train, data_args, validation)  # before max_train_samples: a sample may lack some classes
    # Seeded random subsets, never the first rows (a stream's subset comes out of its seeded shuffle).
    train = random_subset(train, data_args.max_train_samples, seed=training_args.seed)
    if validation is not None:
        validation = random_subset(validation, data_args.max_eval_samples, seed=training_args.seed)

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
        specs = [s for s in load_eval_specs_checked(data_args.eval_sets_config, len(classnames))
                 if s.role != "id" or validation is None]
        eval_sets.update(load_eval_sets(specs, head_labels=classnames))
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
