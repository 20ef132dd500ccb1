"""Tune every method of the digit benchmark under the written protocol (docs/tuning_protocol.md), on held-out data only.

    python recipes/tune_digits.py --tuning_dir outputs/tuning11
    python recipes/tune_digits.py --tuning_dir outputs/tuning11-clip1 --clip_name_or_path outputs/tiny_clip_seed1

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


def _accs(results: dict, method: str) -> dict[str, float]:
    return {r["eval_set"]: r["accuracy"] for r in results["rows"] if r["method"] == method}


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args, base = parse_args((TuneArguments, DigitExperimentConfig), argv)
    with open(args.protocol, encoding="utf-8") as fh:
        protocol = yaml.safe_load(fh)
    os.makedirs(args.tuning_dir, exist_ok=True)
    seed = int(protocol["tune_seed"])
    candidates = list(protocol["candidate_families"])
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
    records, best = [], {}
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
            if method not in best or record["tuning_gain"] > best[method]["tuning_gain"]:
                best[method] = record

    sae_methods = [m for m in best if methods[m]["base"] == "sae_ft"]
    top = max(sae_methods, key=lambda m: best[m]["tuning_gain"]) if sae_methods else None
    # Built-in names stay built-in (sae_ft is the default setting); the tuned ones get a suffix. The SAE-FT variant
    # with the best tuning gain is also swept: its `<name>_wise` row is SAE-FT + WiSE-FT.
    chosen = {(f"{m}_tuned" if m in ALL_METHODS else m): {"base": methods[m]["base"], "settings": best[m]["settings"],
                                                         "wise": m == top} for m in best}
    summary = {"protocol": protocol, "tune_seed": seed, "used_families": used, "zeroshot": zs, "ft": ft_accs,
               "ft_curve": curve, "records": records,
               "best": {m: {k: r[k] for k in ("setting", "settings", "tuning_gain")} for m, r in best.items()}}
    with open(os.path.join(args.tuning_dir, "tuning.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
    variants_path = os.path.join(args.tuning_dir, "chosen_variants.yaml")
    with open(variants_path, "w", encoding="utf-8") as fh:
        yaml.safe_dump({"variants": chosen}, fh, sort_keys=False)
    for method, record in best.items():
        print(f"{method}: {record['settings']} tuning gain {100 * record['tuning_gain']:+.2f} points")
    alphas = " ".join(str(a) for a in protocol["wise_alphas"])
    clip = f" --clip_name_or_path {base.clip_name_or_path}" if base.clip_name_or_path else ""
    print(f"\nFinal run:\npython recipes/digits.py --variants_file {variants_path} --methods zeroshot ft wise_ft "
          f"{' '.join(chosen)} --seeds 0 1 2 --wise_alphas {alphas} --wise_select_on tuning --tuning_splits "
          f"{' '.join(used)}{clip} --output_dir {args.tuning_dir}/final")


if __name__ == "__main__":
    main(sys.argv[1:])
