"""Train the SAE that SAE-FT needs, on a pre-trained CLIP's embeddings of a training set, and save (or push) it.

    python recipes/train_sae.py --model_name_or_path openai/clip-vit-base-patch16 \
        --dataset_name timm/imagenet-1k-wds --output_dir outputs/sae-vit-b16 [--push_to_hub --hub_model_id me/sae]

The CLIP forward runs once (eval transform, no augmentation, as the paper); the embeddings are cached in
`output_dir/cache/sae_embeddings.safetensors` (keyed on the model, data, transform and precision), so the 100-epoch
schedule never recomputes them. Under `accelerate launch` / `torchrun` every process embeds its share of the images
on its accelerator; rank 0 then trains, saves (and pushes) the SAE while the others exit:

    accelerate launch --num_processes 8 recipes/train_sae.py --model_name_or_path ... --output_dir ... --bf16
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from accelerate import PartialState

from saeft_hf.data import load_image_dataset, transforms_from_pretrained
from saeft_hf.modeling import SAEFTCLIPForImageClassification
from saeft_hf.pipeline import ModelArguments, parse_args, sae_training_embeddings, train_saes_for_model
from saeft_hf.sae_set import save_sae_set
from saeft_hf.run_dir import claimed_by_writers


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
    dataloader_num_workers: int = field(default=4, metadata={"help": "Image decoding workers per process."})
    bf16: bool = field(default=False, metadata={"help": "Embedding pass under bf16 autocast (default: fp32)."})
    fp16: bool = field(default=False, metadata={"help": "Embedding pass under fp16 autocast (default: fp32)."})
    use_cpu: bool = field(default=False, metadata={"help": "Run on the CPU even when an accelerator is present."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace an SAE already saved in --output_dir (otherwise refused)."}
    )


def main(argv: list[str]) -> None:
    model_args, run_args = parse_args((ModelArguments, SAERunArguments), argv)
    if run_args.bf16 and run_args.fp16:
        raise ValueError("Pass at most one of --bf16 and --fp16.")
    # One process, or one per accelerator under accelerate launch / torchrun (this initialises the process group).
    state = PartialState(cpu=run_args.use_cpu)
    # Before anything is loaded: a writable output_dir, not in use by another run, holding no other SAE (checked by
    # rank 0, the verdict shared so that every rank fails together).
    with claimed_by_writers(run_args.output_dir, writes=state.is_main_process, world_size=state.num_processes,
                            overwrite=run_args.overwrite_output_dir, result_files=("model.safetensors", "config.json"),
                            checkpoints=False):
        train_and_save(model_args, run_args, state)


def train_and_save(model_args: ModelArguments, run_args: SAERunArguments, state: PartialState) -> None:
    with state.main_process_first():  # one process prepares the datasets cache, the others then read it
        dataset = load_image_dataset(dataset_name=run_args.dataset_name,
                                     dataset_config_name=run_args.dataset_config_name, train_dir=run_args.train_dir,
                                     split=run_args.split, streaming=run_args.streaming)
    _, eval_transform = transforms_from_pretrained(model_args.model_name_or_path)
    # Only the vision tower and projection matter here: no text tower, no head.
    model = SAEFTCLIPForImageClassification.from_pretrained(
        model_args.model_name_or_path, num_labels=1, representation=model_args.representation,
        source_model=model_args.model_name_or_path,
    )
    autocast = torch.bfloat16 if run_args.bf16 else (torch.float16 if run_args.fp16 else None)
    embeddings = sae_training_embeddings(
        model, dataset, eval_transform, model_args, output_dir=run_args.output_dir, split=run_args.split,
        device=state.device, autocast_dtype=autocast, num_workers=run_args.dataloader_num_workers,
        distributed=state.num_processes > 1, seed=run_args.seed,
    )
    if not state.is_main_process:
        return  # the others are done: nothing left to wait for, so no barrier can time out while rank 0 trains
    saes = train_saes_for_model(model, dataset, eval_transform, model_args, output_dir=run_args.output_dir,
                                seed=run_args.seed, embeddings=embeddings, device=state.device)
    repo_id = run_args.hub_model_id or run_args.output_dir.rstrip("/").split("/")[-1]
    if len(saes) == 1:
        (sae,) = saes.values()
        sae.save_pretrained(run_args.output_dir)
        print(sae.config.training_metrics)
        if run_args.push_to_hub:
            sae.push_to_hub(repo_id)
        return
    # Several representations: one SAE each in output_dir/<spec>/, the layout --sae_name_or_path reads.
    save_sae_set(saes, run_args.output_dir)
    for spec, sae in saes.items():
        print(spec, sae.config.training_metrics)
    if run_args.push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(folder_path=run_args.output_dir, repo_id=repo_id,
                          allow_patterns=[f"{spec}/*" for spec in saes])  # never the embedding cache


if __name__ == "__main__":
    main(sys.argv[1:])
