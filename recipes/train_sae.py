"""Train the SAE that SAE-FT needs, on a pre-trained CLIP's embeddings of a training set, and save (or push) it.

    python recipes/train_sae.py --model_name_or_path openai/clip-vit-base-patch16 \
        --dataset_name timm/imagenet-1k-wds --output_dir outputs/sae-vit-b16 [--push_to_hub --hub_model_id me/sae]

The CLIP forward runs once (eval transform, no augmentation, as the paper); the embeddings are cached in
`output_dir/sae_embeddings.safetensors`, so the 100-epoch schedule never recomputes them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from saeft_hf.data import load_image_dataset, transforms_from_pretrained
from saeft_hf.modeling import SAEFTCLIPForImageClassification
from saeft_hf.pipeline import ModelArguments, parse_args, train_sae_for_model
from saeft_hf.run_dir import claim_output_dir


@dataclass
class SAERunArguments:
    output_dir: str = field(metadata={"help": "Where the SAE (config.json, model.safetensors, README.md) goes."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset id or builder name."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    train_dir: str | None = field(default=None, metadata={"help": "Local class-folder tree."})
    split: str = field(default="train", metadata={"help": "Split to embed."})
    streaming: bool = field(default=False, metadata={"help": "Stream the dataset (use with --sae_max_samples)."})
    seed: int = field(default=0, metadata={"help": "Seed for initialisation and shuffling."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the SAE and its model card."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Repo id for --push_to_hub."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace an SAE already saved in --output_dir (otherwise refused)."}
    )


def main(argv: list[str]) -> None:
    model_args, run_args = parse_args((ModelArguments, SAERunArguments), argv)
    # Before anything is loaded: a writable output_dir, not in use by another run, holding no other SAE.
    with claim_output_dir(run_args.output_dir, overwrite=run_args.overwrite_output_dir,
                          result_files=("model.safetensors", "config.json"), checkpoints=False):
        train_and_save(model_args, run_args)


def train_and_save(model_args: ModelArguments, run_args: SAERunArguments) -> None:
    dataset = load_image_dataset(dataset_name=run_args.dataset_name, dataset_config_name=run_args.dataset_config_name,
                                 train_dir=run_args.train_dir, split=run_args.split, streaming=run_args.streaming)
    _, eval_transform = transforms_from_pretrained(model_args.model_name_or_path)
    # Only the vision tower and projection matter here: no text tower, no head.
    model = SAEFTCLIPForImageClassification.from_pretrained(
        model_args.model_name_or_path, num_labels=1, representation=model_args.representation,
        source_model=model_args.model_name_or_path,
    )
    sae = train_sae_for_model(model, dataset, eval_transform, model_args, output_dir=run_args.output_dir,
                              seed=run_args.seed)
    sae.save_pretrained(run_args.output_dir)
    print(sae.config.training_metrics)
    if run_args.push_to_hub:
        sae.push_to_hub(run_args.hub_model_id or run_args.output_dir.rstrip("/").split("/")[-1])


if __name__ == "__main__":
    main(sys.argv[1:])
