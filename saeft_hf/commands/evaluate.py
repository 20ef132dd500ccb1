"""Evaluate a saved run, a local model or a Hub model on the eval sets of a YAML config; optionally sweep WiSE-FT.

    python recipes/evaluate.py --model_name_or_path outputs/vit-b16-saeft \
        --eval_sets_config recipes/configs/imagenet_eval_sets.yaml --output_dir outputs/vit-b16-saeft/eval

    torchrun --nproc_per_node 8 recipes/evaluate.py --config my_eval.yaml     # or: accelerate launch ...

The model: a run directory of recipes/imagenet.py (full model, or LoRA adapter + its recorded base), a Hub repo of
one, or a CLIP checkpoint (evaluated zero-shot with the ImageNet class names). Every process scores its shard of each
set and the counts are summed exactly; fp32 unless --eval_bf16. `--wise_ft_alphas` sweeps WiSE-FT against the run's
recorded pre-trained model in the same pass, choosing alpha on the config's `role: holdout` set (or
--wise_ft_select_on), and saves the chosen model in OUTPUT_DIR/wise_ft/. Writes OUTPUT_DIR/eval_results.json with
`final` (accuracy per set, `id`, `avg_shift`, ...) and `num_examples` (per set).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from saeft_hf.evaluation import evaluate_model, load_eval_sets, load_eval_specs, load_for_evaluation, save_wise_ft_model
from saeft_hf.evaluation.runner import eval_results_payload, process_info, transform_for
from saeft_hf.hub import save_results
from saeft_hf.pipeline import parse_args


@dataclass
class EvaluateArguments:
    """What to evaluate, on which sets, and how."""

    model_name_or_path: str = field(metadata={"help": "Run directory, local model, or Hub repo id (full or adapter), "
                                                      "or a CLIP checkpoint (zero-shot)."})
    eval_sets_config: str = field(metadata={"help": "YAML list of eval sets (see recipes/configs/imagenet_eval_sets.yaml)."})
    output_dir: str = field(metadata={"help": "Where eval_results.json (and wise_ft/) go."})
    wise_ft_alphas: list[float] | None = field(
        default=None, metadata={"help": "Sweep WiSE-FT over these alphas (needs a run that recorded its pre-trained model)."}
    )
    wise_ft_select_on: str | None = field(
        default=None, metadata={"help": "The set that chooses alpha (default: the config's `role: holdout` set)."}
    )
    save_wise_ft: bool = field(default=True, metadata={"help": "Save the chosen WiSE-FT model in OUTPUT_DIR/wise_ft/."})
    batch_size: int = field(default=256, metadata={"help": "Images per forward pass, per process."})
    num_workers: int = field(default=4, metadata={"help": "DataLoader workers decoding images, per process."})
    eval_bf16: bool = field(default=False, metadata={"help": "Score under bf16 autocast (default fp32)."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "A seeded random subset of at most this many images per set (quick runs)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the --max_eval_samples subsets."})
    streaming: bool = field(default=False, metadata={"help": "Stream the eval sets instead of preparing them."})
    skip_corrupt_images: bool = field(default=False, metadata={"help": "Skip (and count) undecodable images."})
    classnames_file: str | None = field(
        default=None, metadata={"help": "CLIP checkpoints only: class names, one per line (default: ImageNet's)."}
    )
    templates_file: str | None = field(
        default=None, metadata={"help": "CLIP checkpoints only: prompt templates with {} (default: OpenAI's 80)."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "datasets cache directory."})


def _lines(path: str | None) -> list[str] | None:
    return [x.strip() for x in Path(path).read_text().splitlines() if x.strip()] if path else None


def main(argv: list[str]) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    (args,) = parse_args((EvaluateArguments,), argv)
    start = time.time()
    from accelerate import PartialState

    process_index, num_processes, device = process_info()
    state = PartialState()
    with state.main_process_first():  # one process downloads / prepares, the others read its cache
        loaded = load_for_evaluation(args.model_name_or_path, classnames=_lines(args.classnames_file),
                                     templates=_lines(args.templates_file))
        specs = load_eval_specs(args.eval_sets_config)
        # Class folders are labelled by the head's own classes (its id2label), as in the training run.
        config = getattr(loaded.model, "config", None)
        id2label = getattr(config, "id2label", None) or {}
        head_labels = [id2label[i] for i in sorted(id2label)] if id2label else None
        sets = load_eval_sets(specs, streaming=args.streaming, cache_dir=args.cache_dir, head_labels=head_labels)
    pretrained = loaded.wise_ft_pretrained() if args.wise_ft_alphas else None
    report = evaluate_model(
        loaded.model, {s.name: sets[s.name] for s in specs if s.role != "holdout"}, transform_for(loaded),
        id_name=next((s.name for s in specs if s.role == "id"), None),
        shift_names=[s.name for s in specs if s.role == "shift"],
        pretrained=pretrained, wise_ft_alphas=args.wise_ft_alphas,
        holdout_sets={s.name: sets[s.name] for s in specs if s.role == "holdout"},
        select_on=args.wise_ft_select_on,
        selection="the eval config's `role: holdout` set" if args.wise_ft_select_on is None else "",
        batch_size=args.batch_size, num_workers=args.num_workers, bf16=args.eval_bf16,
        max_samples=args.max_eval_samples, seed=args.seed, skip_corrupt_images=args.skip_corrupt_images,
        device=device, process_index=process_index, num_processes=num_processes, progress=True,
    )
    payload = eval_results_payload(
        report, model=args.model_name_or_path, model_kind=loaded.kind, base_model=loaded.base_model,
        eval_sets=[s.to_dict() for s in specs], num_processes=num_processes, args=asdict(args),
        timing={"eval_s": round(time.time() - start, 1)},
    )
    if state.is_main_process:
        if args.save_wise_ft:
            save_wise_ft_model(report, args.output_dir)
        save_results(os.path.join(args.output_dir, "eval_results.json"), payload)
        print(json.dumps({"final": payload["final"], "num_examples": payload["num_examples"]}, indent=2))
    state.wait_for_everyone()
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
