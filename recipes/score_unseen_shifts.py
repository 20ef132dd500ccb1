"""Score saved shift-benchmark models on shifts their makers never saw (issue 11's check).

    # world 1 (the bundled tiny CLIP) and world 2 (its own CLIP inside the folder), the built-in unseen shifts:
    OMP_NUM_THREADS=1 python recipes/score_unseen_shifts.py --models_dir docs/results/models/digits_world1 \
        --clip_name_or_path bundled --output_prefix docs/results/unseen_shifts_world1
    OMP_NUM_THREADS=1 python recipes/score_unseen_shifts.py --models_dir docs/results/models/digits_world2 \
        --output_prefix docs/results/unseen_shifts_world2
    # the Fashion-MNIST world (its bundled CLIP; the same shifts but `invert`, a tuning family there)
    OMP_NUM_THREADS=1 python recipes/score_unseen_shifts.py --world fashion --clip_name_or_path bundled \
        --models_dir docs/results/models/fashion --output_prefix docs/results/unseen_shifts_fashion
    # your own shifts: image folders (root/<class>/<image>, classes "0".."9" or "zero".."nine"), one `role: id` set
    # and any number of `role: shift` sets, in the eval-set YAML format of recipes/evaluate.py:
    python recipes/score_unseen_shifts.py --models_dir ... --eval_sets_config my_sets.yaml

For each seed: zero-shot, plain FT's WiSE-FT sweep (alphas 0, 0.1, ..., 1) and the variant's saved model are
scored on every set; the variant's gain over the FT curve is computed by saeft_hf/benchmarks/curves.py. Writes
PREFIX.json, PREFIX.md and PREFIX.png.
"""

from __future__ import annotations

import logging
import shlex
import sys
from dataclasses import dataclass, field

from saeft_hf.benchmarks.score_saved import DEFAULT_ALPHAS, find_saved_world, score_saved_world, write_unseen_outputs
from saeft_hf.benchmarks.unseen_shifts import UNSEEN_BY_WORLD, build_unseen_shifts, save_image_folders
from saeft_hf.benchmarks.worlds import get_world
from saeft_hf.evaluation import load_eval_sets, load_eval_specs
from saeft_hf.pipeline import parse_args


@dataclass
class UnseenShiftArguments:
    models_dir: str = field(metadata={"help": "A folder of saved runs {baseline}-seed<N>/ and {variant}-seed<N>/ "
                                              "(e.g. docs/results/models/digits_world1)."})
    world: str = field(default="digits", metadata={"help": f"Benchmark world: {', '.join(UNSEEN_BY_WORLD)}."})
    output_prefix: str = field(default="outputs/unseen_shifts",
                               metadata={"help": "Writes PREFIX.json, PREFIX.md and PREFIX.png."})
    clip_name_or_path: str | None = field(
        default=None, metadata={"help": "The pre-trained CLIP the runs started from; 'bundled' = the world's bundled "
                                        "tiny CLIP. Default: the one CLIP checkpoint folder in models_dir."})
    variant: str = field(default="sae_ft_remove", metadata={"help": "The method whose gain is measured."})
    baseline: str = field(default="ft", metadata={"help": "The method whose WiSE-FT curve is the reference."})
    eval_sets_config: str | None = field(
        default=None, metadata={"help": "YAML of eval sets (recipes/evaluate.py's format): one `role: id` set and "
                                        "`role: shift` sets. Default: the built-in unseen shifts of id_test."})
    shifts: list[str] | None = field(
        default=None, metadata={"help": "Built-in unseen shifts to use (without eval_sets_config); default: all of "
                                        "the world's."})
    data_seed: int = field(default=0, metadata={"help": "Data seed of the id_test images (the models' own: 0)."})
    alphas: list[float] = field(default_factory=lambda: list(DEFAULT_ALPHAS),
                                metadata={"help": "WiSE-FT alphas of the baseline's curve (must include 0 and 1)."})
    export_dir: str | None = field(
        default=None, metadata={"help": "Also write the built-in sets as image folders and an eval_sets.yaml here."})
    batch_size: int = 512
    title: str = ""
    plot: bool = True


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    (args,) = parse_args((UnseenShiftArguments,), argv)
    bench = get_world(args.world)
    classnames, templates = list(bench.classnames), list(bench.templates)
    clip = bench.clip_path() if args.clip_name_or_path == "bundled" else args.clip_name_or_path
    world = find_saved_world(args.models_dir, variant=args.variant, baseline=args.baseline, clip_path=clip)
    if args.eval_sets_config:
        specs = load_eval_specs(args.eval_sets_config)
        ids = [s.name for s in specs if s.role == "id"]
        if len(ids) != 1:
            raise SystemExit(f"{args.eval_sets_config} needs exactly one `role: id` set, found {ids}.")
        sets = load_eval_sets([s for s in specs if s.role in ("id", "shift")], head_labels=classnames)
        id_set, shift_sets = ids[0], [s.name for s in specs if s.role == "shift"]
    else:
        built = build_unseen_shifts(args.data_seed, args.shifts, world=args.world)
        if args.export_dir:
            print("built-in sets written as image folders:", save_image_folders(built, args.export_dir))
        sets = {name: (ds, None) for name, ds in built.items()}
        id_set, shift_sets = "id_test", [name for name in built if name != "id_test"]
    results = score_saved_world(world, sets, id_set=id_set, shift_sets=shift_sets, classnames=classnames,
                                templates=templates, alphas=args.alphas, batch_size=args.batch_size)
    if args.clip_name_or_path == "bundled":
        results["clip"] = f"bundled: {bench.name} world's tiny CLIP"
    results["command"] = shlex.join(["python", "recipes/score_unseen_shifts.py", *argv])
    paths = write_unseen_outputs(results, args.output_prefix, args.title, plot=args.plot)
    with open(paths[1], encoding="utf-8") as fh:
        print(fh.read())
    print("outputs:", ", ".join(paths))


if __name__ == "__main__":
    main(sys.argv[1:])
