"""Tune every method of the digit benchmark under the written protocol (docs/tuning_protocol.md), on held-out data only.

    python recipes/tune_digits.py --tuning_dir outputs/tuning11
    python recipes/tune_digits.py --tuning_dir outputs/tuning11-clip1 --clip_name_or_path outputs/tiny_clip_seed1
    python recipes/tune_digits.py --tuning_dir outputs/tuning-fashion --world fashion     # the Fashion-MNIST world
    # the same split over two processes (--tune_methods), then merged: the choice is made over all records at once
    python recipes/tune_digits.py --tuning_dir outputs/tuning-fashion --world fashion \
        --merge_dirs outputs/tuning-fashion-a outputs/tuning-fashion-b

1. Plain FT (tuning seed) and zero-shot on `validation` and the candidate tuning families: the families where FT is
   below zero-shot are the ones used; FT's WiSE-FT sweep gives the tuning curve.
2. Every setting of every method's grid, scored by its tuning gain over that curve (`saeft_hf.benchmarks.curves`).
Reported sets are never evaluated. Writes tuning.json, chosen_variants.yaml, and prints the command of the final
3-seed run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import yaml

from saeft_hf.benchmarks.curves import gain_over_curve
from saeft_hf.benchmarks.experiment import ALL_METHODS, DigitExperimentConfig, Variant, run_digit_experiment
from saeft_hf.pipeline import parse_args

PROTOCOL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "digits_protocol.yaml")


@dataclass
class TuneArguments:
    tuning_dir: str = field(default="outputs/tuning", metadata={"help": "Where tuning.json and every run go."})
    protocol: str = field(default=PROTOCOL, metadata={"help": "The protocol YAML (families, seed, grids)."})
    tune_methods: list[str] | None = field(default=None, metadata={"help": "Tune only these methods of the protocol."})
    merge_dirs: list[str] | None = field(
        default=None, metadata={"help": "Run nothing: choose from the tuning.json of these tuning dirs (one protocol, "
                                        "split by --tune_methods over processes) and write the result to tuning_dir."})


def _accs(results: dict, method: str) -> dict[str, float]:
    return {r["eval_set"]: r["accuracy"] for r in results["rows"] if r["method"] == method}


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args, base = parse_args((TuneArguments, DigitExperimentConfig), argv)
    with open(args.protocol, encoding="utf-8") as fh:
        protocol = yaml.safe_load(fh)
    os.makedirs(args.tuning_dir, exist_ok=True)
    if args.merge_dirs:
        return merge(args, base, protocol)
    seed = int(protocol["tune_seed"])
    families = protocol["candidate_families"]
    if base.world not in families:
        raise SystemExit(f"{args.protocol} lists no candidate tuning families for the {base.world!r} world.")
    candidates = list(families[base.world])
    base = dataclasses.replace(base, seeds=[seed], wise_alphas=[float(a) for a in protocol["wise_alphas"]],
                               interpret=False, wise_select_on="validation",
                               sae_cache_dir=os.path.join(args.tuning_dir, "saes"))

    # 1. Which families does fine-tuning hurt, and plain FT's WiSE-FT curve on the tuning axes.
    ft = run_digit_experiment(dataclasses.replace(base, methods=["zeroshot", "ft"], output_dir=os.path.join(
        args.tuning_dir, "ft"), eval_splits=["validation", *candidates], wise_select_on="tuning",
        tuning_splits=candidates))
    zs, ft_accs = _accs(ft, "zeroshot"), _accs(ft, "ft")
    used = [f for f in candidates if ft_accs[f] < zs[f]]
    if not used:
        raise SystemExit(f"Fine-tuning hurts none of the candidate families {candidates}; the protocol cannot run.")
    sweep = ft["wise_ft_curves"][f"wise_ft-seed{seed}"]
    curve = [{"alpha": a, "id": r["validation"], "shift_avg": float(np.mean([r[f] for f in used]))}
             for a, r in zip(sweep["alphas"], sweep["accuracies"])]

    def tuning_gain(accs: dict[str, float]) -> float:
        # Flat beyond the curve's ends (np.interp's rule), so every setting gets a score.
        clipped = float(np.clip(accs["validation"], min(p["id"] for p in curve), max(p["id"] for p in curve)))
        return gain_over_curve(clipped, float(np.mean([accs[f] for f in used])), curve)

    # 2. Every setting of every method, the same budget each, scored the same way.
    records = []
    methods = {m: s for m, s in protocol["methods"].items() if not args.tune_methods or m in args.tune_methods}
    for method, spec in methods.items():
        for i, overrides in enumerate(spec["grid"]):
            settings = {**(spec.get("settings") or {}), **overrides}
            name = f"{method}__{i}"
            results = run_digit_experiment(
                dataclasses.replace(base, methods=[name], output_dir=os.path.join(args.tuning_dir, name),
                                    eval_splits=["validation", *used]),
                variants={name: Variant(name, spec["base"], settings)},
            )
            accs = _accs(results, name)
            record = {"method": method, "setting": i, "settings": settings, "accuracies": accs,
                      "tuning_gain": tuning_gain(accs)}
            records.append(record)
            print(json.dumps(record), flush=True)
    summary = {"protocol": protocol, "tune_seed": seed, "used_families": used, "zeroshot": zs, "ft": ft_accs,
               "ft_curve": curve, "records": records}
    choose_and_write(summary, methods, args.tuning_dir, base)


def merge(args: TuneArguments, base: DigitExperimentConfig, protocol: dict) -> None:
    """One choice over the records of several tuning dirs that ran parts of the same protocol."""
    parts = []
    for d in args.merge_dirs:
        with open(os.path.join(d, "tuning.json"), encoding="utf-8") as fh:
            parts.append(json.load(fh))
    shared = ("protocol", "tune_seed", "used_families", "zeroshot", "ft", "ft_curve")
    for d, part in zip(args.merge_dirs[1:], parts[1:]):
        differs = [k for k in shared if part[k] != parts[0][k]]
        if differs:  # e.g. another protocol file, or FT not bit-identical (thread counts differ)
            raise SystemExit(f"{d} differs from {args.merge_dirs[0]} in {differs}; they are not parts of one tuning.")
    summary = {k: parts[0][k] for k in shared}
    summary["records"] = [r for part in parts for r in part["records"]]
    summary["merged_from"] = list(args.merge_dirs)
    tuned = {r["method"] for r in summary["records"]}
    choose_and_write(summary, {m: s for m, s in protocol["methods"].items() if m in tuned}, args.tuning_dir, base)


def choose_and_write(summary: dict, methods: dict, tuning_dir: str, base: DigitExperimentConfig) -> None:
    """The protocol's rule: per method the setting with the largest tuning gain (ties: the first); the SAE-FT variant
    with the largest one is also swept with WiSE-FT. Writes tuning.json and chosen_variants.yaml, prints the final
    command."""
    best: dict[str, dict] = {}
    for record in summary["records"]:
        method = record["method"]
        if method not in best or record["tuning_gain"] > best[method]["tuning_gain"]:
            best[method] = record
    sae_methods = [m for m in best if methods[m]["base"] == "sae_ft"]
    top = max(sae_methods, key=lambda m: best[m]["tuning_gain"]) if sae_methods else None
    # Built-in names stay built-in (sae_ft is the default setting); the tuned ones get a suffix. The SAE-FT variant
    # with the best tuning gain is also swept: its `<name>_wise` row is SAE-FT + WiSE-FT.
    chosen = {(f"{m}_tuned" if m in ALL_METHODS else m): {"base": methods[m]["base"], "settings": best[m]["settings"],
                                                         "wise": m == top} for m in best}
    summary["best"] = {m: {k: r[k] for k in ("setting", "settings", "tuning_gain")} for m, r in best.items()}
    with open(os.path.join(tuning_dir, "tuning.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
    variants_path = os.path.join(tuning_dir, "chosen_variants.yaml")
    with open(variants_path, "w", encoding="utf-8") as fh:
        yaml.safe_dump({"variants": chosen}, fh, sort_keys=False)
    for method, record in best.items():
        print(f"{method}: {record['settings']} tuning gain {100 * record['tuning_gain']:+.2f} points")
    alphas = " ".join(str(a) for a in summary["protocol"]["wise_alphas"])
    clip = f" --clip_name_or_path {base.clip_name_or_path}" if base.clip_name_or_path else ""
    clip += f" --world {base.world}" if base.world != "digits" else ""
    print(f"\nFinal run:\npython recipes/digits.py --variants_file {variants_path} --methods zeroshot ft wise_ft "
          f"{' '.join(chosen)} --seeds 0 1 2 --wise_alphas {alphas} --wise_select_on tuning --tuning_splits "
          f"{' '.join(summary['used_families'])}{clip} --output_dir {tuning_dir}/final")


if __name__ == "__main__":
    main(sys.argv[1:])
