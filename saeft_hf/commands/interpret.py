"""Read what fine-tuning changed: SAE features added and removed, per class, with images and text, in one HTML file.

    # the digit demo (after `make demo`): FT vs SAE-FT on the in-distribution test split
    python recipes/interpret.py --digits_split id_test \
        --finetuned FT=outputs/demo/runs/ft-seed0 --finetuned SAE-FT=outputs/demo/runs/sae_ft-seed0 \
        --sae outputs/demo/sae --output_dir outputs/demo/interpret

    # any model and dataset (full fine-tuned checkpoints or LoRA adapters)
    python recipes/interpret.py --pretrained_model openai/clip-vit-base-patch16 \
        --finetuned FT=outputs/ft --finetuned SAE-FT=outputs/saeft-lora --sae outputs/sae-vit-b16 \
        --dataset_name ILSVRC/imagenet-1k --split validation --max_samples 5000 --output_dir outputs/interpret

Writes `report.html` (self-contained), `summary.json`, and per model `feature_changes.json` and
`grid_added.png` / `grid_removed.png` into --output_dir. The library entry point is
`saeft_hf.interpret.interpret_runs`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from saeft_hf.data import load_image_dataset
from saeft_hf.interpret import interpret_runs

logger = logging.getLogger("interpret")

#: Extra prompts for the digit benchmark: the styles and shifts its captions talk about (all in its vocabulary).
DIGIT_VOCABULARY: tuple[str, ...] = (
    "a handwritten digit.", "a printed digit.", "a typed digit.", "a scanned handwritten digit.",
    "a low resolution photo of the digit.", "a blurry photo of the digit.", "a noisy photo of the digit.",
    "a grainy photo of the digit.", "a faint photo of the digit.", "a low contrast handwritten digit.",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Compare fine-tuned CLIP models with the pre-trained one in SAE features (SAE-FT).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    models = parser.add_argument_group("models")
    models.add_argument("--pretrained_model", default=None,
                        help="Pre-trained CLIP checkpoint (Hub id or directory). Default with --digits_split: the "
                             "bundled tiny CLIP.")
    models.add_argument("--finetuned", action="append", nargs="+", required=True, metavar="NAME=PATH",
                        help="A fine-tuned model: a saved classifier directory or a LoRA adapter. Repeat for a "
                             "second model (shown side by side).")
    models.add_argument("--sae", required=True, help="SAE directory or Hub id (SparseAutoencoder.from_pretrained).")
    models.add_argument("--text_model", default=None,
                        help="CLIPModel checkpoint whose text tower describes features (default: --pretrained_model).")
    models.add_argument("--no_text", action="store_true", help="Do not describe features with text.")

    data = parser.add_argument_group("data")
    data.add_argument("--digits_split", default=None,
                      help="Use this split of the offline digit benchmark (e.g. id_test, noise, printed).")
    data.add_argument("--dataset_name", default=None, help="Hub dataset id or builder name.")
    data.add_argument("--dataset_config_name", default=None, help="Dataset configuration name.")
    data.add_argument("--train_dir", default=None, help="Local class-folder tree (split 'train').")
    data.add_argument("--data_dir", default=None, help="data_dir for a builder such as imagefolder.")
    data.add_argument("--split", default="validation", help="Split to analyse (with --dataset_name).")
    data.add_argument("--streaming", action="store_true", help="Stream the dataset (needs --max_samples).")
    data.add_argument("--max_samples", type=int, default=None, help="Analyse a seeded random subset of this size.")
    data.add_argument("--seed", type=int, default=0, help="Seed of the --max_samples subset.")

    report = parser.add_argument_group("report")
    report.add_argument("--output_dir", required=True, help="Where report.html and the JSON files go.")
    report.add_argument("--top_features", type=int, default=20, help="Added / removed features reported per model.")
    report.add_argument("--top_images", type=int, default=8, help="Images shown per feature.")
    report.add_argument("--top_prompts", type=int, default=3, help="Best-aligned prompts shown per feature.")
    report.add_argument("--rank_by", default="mass", choices=("mass", "count", "strength"),
                        help="Rank features by images x mean |activation|, images, or mean |activation|.")
    report.add_argument("--classnames", nargs="+", default=None,
                        help="Readable class names in label order (default: the fine-tuned model's id2label, else "
                             "the dataset's label names).")
    report.add_argument("--templates", nargs="+", default=None,
                        help="Prompt templates for class names (default: the digit templates with --digits_split, "
                             "else 'a photo of a {}.').")
    report.add_argument("--vocabulary", nargs="+", default=None,
                        help="Extra words/prompts to describe features with (default: digit styles with "
                             "--digits_split).")
    report.add_argument("--center_text", action="store_true",
                        help="Subtract the mean text embedding before the cosine (removes the shared text direction).")
    report.add_argument("--sae_inputs", default="sae", choices=("sae", "unit_norm", "raw"),
                        help="What the SAE encodes: 'sae' = its own preprocessing (as trained; default), "
                             "'unit_norm' = z/|z|, 'raw' = z as the reference penalty feeds it.")
    report.add_argument("--title", default="What fine-tuning changed, in SAE features", help="Report title.")

    run = parser.add_argument_group("compute")
    run.add_argument("--batch_size", type=int, default=256, help="Images per forward pass.")
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: where the model is, CPU).")
    return parser


def parse_finetuned(values: list[list[str]]) -> dict[str, str]:
    """['FT=a', 'SAE-FT=b'] (from repeated or multi-valued --finetuned) -> {'FT': 'a', 'SAE-FT': 'b'}."""
    out: dict[str, str] = {}
    for item in (v for group in values for v in group):
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).name or item, item  # a bare path is named after its folder
        if not name or not path:
            raise SystemExit(f"--finetuned expects NAME=PATH, got {item!r}.")
        if name in out:
            raise SystemExit(f"--finetuned name {name!r} is given twice; names label the report columns.")
        out[name] = path
    return out


def main(argv: list[str]) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    finetuned = parse_finetuned(args.finetuned)
    templates, vocabulary, classnames = args.templates, args.vocabulary, args.classnames

    if args.digits_split is not None:
        if args.dataset_name or args.train_dir:
            raise SystemExit("Give either --digits_split or --dataset_name/--train_dir, not both.")
        from saeft_hf.benchmarks.digits import (
            ALL_SPLITS, BUNDLED_DATA_SEED, CLASSNAMES, TEMPLATES, build_digit_benchmark, tiny_clip_path,
        )

        if args.digits_split not in ALL_SPLITS:
            raise SystemExit(f"--digits_split must be one of {list(ALL_SPLITS)}, got {args.digits_split!r}.")
        # The bundled model's splits come from this data seed only (other seeds leak pre-training images).
        dataset = build_digit_benchmark(BUNDLED_DATA_SEED)[args.digits_split]
        args.pretrained_model = args.pretrained_model or tiny_clip_path()
        classnames = classnames or CLASSNAMES
        templates = templates or TEMPLATES
        vocabulary = DIGIT_VOCABULARY if vocabulary is None else vocabulary
        source = f"digit benchmark, split '{args.digits_split}'"
    else:
        if args.pretrained_model is None:
            raise SystemExit("--pretrained_model is required (a CLIP checkpoint) unless --digits_split is given.")
        if not (args.dataset_name or args.train_dir or args.data_dir):
            raise SystemExit("Give a dataset: --digits_split, --dataset_name or --train_dir.")
        split = "train" if args.train_dir and not args.dataset_name else args.split
        dataset = load_image_dataset(dataset_name=args.dataset_name or ("imagefolder" if args.data_dir else None),
                                     dataset_config_name=args.dataset_config_name, train_dir=args.train_dir,
                                     data_dir=args.data_dir, split=split, streaming=args.streaming)
        source = f"{args.dataset_name or args.train_dir or args.data_dir}, split '{split}'"
    templates = templates or ["a photo of a {}."]

    text_model = None if args.no_text else (args.text_model or args.pretrained_model)
    if text_model is not None:
        # A text tower is optional: a vision-only checkpoint still gets images and numbers, just no prompts.
        try:
            from transformers import AutoTokenizer, CLIPModel

            text_model = CLIPModel.from_pretrained(text_model), AutoTokenizer.from_pretrained(text_model)
        except (OSError, ValueError) as err:
            logger.warning("No CLIP text tower at %s (%s): features are described by images only.", text_model, err)
            text_model = None

    normalize = {"sae": None, "unit_norm": True, "raw": False}[args.sae_inputs]
    description = (f"Pre-trained: {args.pretrained_model}. Fine-tuned: "
                   + ", ".join(f"{name} = {path}" for name, path in finetuned.items())
                   + f". SAE: {args.sae}. Data: {source}"
                   + (f" ({args.max_samples} images, seed {args.seed})." if args.max_samples else "."))
    reports = interpret_runs(
        args.pretrained_model, finetuned, args.sae, dataset, output_dir=args.output_dir,
        text_model=text_model[0] if text_model else None, tokenizer=text_model[1] if text_model else None,
        classnames=classnames, templates=templates, vocabulary=vocabulary or (), normalize=normalize,
        max_samples=args.max_samples, seed=args.seed, batch_size=args.batch_size, device=args.device,
        top_features=args.top_features, top_images=args.top_images, top_prompts=args.top_prompts,
        rank_by=args.rank_by, center_text=args.center_text, title=args.title, description=description,
    )
    summary = {name: report.summary() for name, report in reports.items()}
    print(json.dumps(summary, indent=1))
    print(f"report: {Path(args.output_dir) / 'report.html'}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
