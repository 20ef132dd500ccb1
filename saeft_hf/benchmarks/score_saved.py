"""Scoring saved runs on any labelled sets: plain FT's WiSE-FT curve there, and a variant's gain over it.

The check issue 11 promises: take the saved models of plain fine-tuning and of one variant (one run per seed, both
from the same pre-trained CLIP), score them on evaluation sets their makers never saw, and ask again whether the
variant lies above the WiSE-FT curve of plain FT. Per seed this scores, in one pass over each set:

- the zero-shot model (``from_clip``: the CLIP's vision tower and a zero-shot head; the same for every seed);
- plain FT's WiSE-FT sweep: ``wise_ft_variants(theta_0, FT, alphas)``, theta_0 being the CLIP's vision weights with
  the head FT started from (``initial_head.safetensors`` of the FT run), exactly as the training pipeline sweeps;
- the variant's saved model;

and computes ``gain_over_wise_curve`` with :mod:`saeft_hf.benchmarks.curves` (the same rule and code as the
benchmark's ``results.json``), on the average of the shift sets and on each shift set alone.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..atomic import write_text_atomic
from ..data import AnyDataset, transforms_from_pretrained
from ..evaluation import EvalSetSpec, count_correct, pretransform, wise_ft_variants
from ..evaluation.runner import _quiet_loading
from ..evaluation.wise_ft import load_initial_head
from ..lora import load_classifier
from ..zeroshot import from_clip
from .curves import GAIN_RULE, curve_points, gain_over_wise_curve

logger = logging.getLogger(__name__)

#: WiSE-FT's alpha grid: 0, 0.1, ..., 1 (the benchmark's 11 points).
DEFAULT_ALPHAS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))
_RUN = re.compile(r"^(?P<method>.+)-seed(?P<seed>\d+)$")


@dataclass(frozen=True)
class SavedWorld:
    """The saved models of one benchmark world: its pre-trained CLIP, plain FT's runs and a variant's runs
    (run directories by fine-tuning seed; each holds ``config.json``, ``model.safetensors`` and, for FT,
    ``initial_head.safetensors``)."""

    clip_path: str
    ft_runs: Mapping[int, str]
    variant_runs: Mapping[int, str]
    variant: str = "variant"
    baseline: str = "ft"
    seeds: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        if set(self.ft_runs) != set(self.variant_runs) or not self.ft_runs:
            raise ValueError(f"Plain FT has runs for seeds {sorted(self.ft_runs)} and {self.variant} for "
                             f"{sorted(self.variant_runs)}: each seed needs both (its gain is over its own FT curve).")
        object.__setattr__(self, "seeds", tuple(sorted(self.ft_runs)))


def _is_clip_checkpoint(path: str) -> bool:
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return False
    with open(config, encoding="utf-8") as fh:
        return json.load(fh).get("model_type") == "clip"


def find_saved_world(models_dir: str, *, variant: str, baseline: str = "ft",
                     clip_path: str | None = None) -> SavedWorld:
    """The runs ``{baseline}-seed{N}`` and ``{variant}-seed{N}`` in `models_dir`, and the pre-trained CLIP:
    `clip_path`, else the one CLIP checkpoint folder inside `models_dir`."""
    runs: dict[str, dict[int, str]] = {baseline: {}, variant: {}}
    clips = []
    for name in sorted(os.listdir(models_dir)):
        path = os.path.join(models_dir, name)
        if not os.path.isdir(path):
            continue
        if _is_clip_checkpoint(path):
            clips.append(path)
            continue
        match = _RUN.match(name)
        if match and match["method"] in runs:
            runs[match["method"]][int(match["seed"])] = path
    for method, found in runs.items():
        if not found:
            raise ValueError(f"No {method}-seed<N> run folders in {models_dir}.")
    if clip_path is None:
        if len(clips) != 1:
            raise ValueError(f"{models_dir} holds {len(clips)} CLIP checkpoints ({clips}); name the pre-trained CLIP "
                             "the runs were fine-tuned from (for the bundled tiny CLIP: "
                             "saeft_hf.benchmarks.digits.tiny_clip_path()).")
        clip_path = clips[0]
    return SavedWorld(clip_path=clip_path, ft_runs=runs[baseline], variant_runs=runs[variant], variant=variant,
                      baseline=baseline)


def _load_run(path: str) -> torch.nn.Module:
    with _quiet_loading(report=False):  # no progress bars or load report: a saved run loads every weight it has
        return load_classifier(path, dtype=torch.float32)


def _recorded(run_dir: str, id_set: str) -> dict[str, float]:
    """The run's own ID accuracy at alpha 1 (and alpha 0, when it swept WiSE-FT) from its eval_results.json."""
    path = os.path.join(run_dir, "eval_results.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        results = json.load(fh)
    out = {}
    if id_set in results.get("final", {}):
        out["1.0"] = float(results["final"][id_set])
    sweep = results.get("wise_ft") or {}
    if 0.0 in sweep.get("alphas", []) and id_set in sweep["results"][sweep["alphas"].index(0.0)]:
        out["0.0"] = float(sweep["results"][sweep["alphas"].index(0.0)][id_set])
    return out


def score_saved_world(
    world: SavedWorld,
    sets: Mapping[str, tuple[AnyDataset, EvalSetSpec | None]],
    *,
    id_set: str,
    shift_sets: Sequence[str],
    classnames: Sequence[str],
    templates: Sequence[str],
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    batch_size: int = 512,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Score zero-shot, plain FT's WiSE-FT sweep and the variant on `sets`, per seed; return the results dict.

    Args:
        sets: ``{name: (dataset with image/label columns, spec or None)}``, labels in `classnames` order; must
            contain `id_set` and every one of `shift_sets`.
        classnames / templates: the zero-shot head's classes and prompts (the benchmark's ``CLASSNAMES`` /
            ``TEMPLATES`` for the digit worlds).
        alphas: the sweep's grid; must contain 0 and 1 (the curve runs from zero-shot to FT).

    Returns ``{"rows", "wise_ft_curve", "gain_over_wise_curve", "gain_per_shift", ...}``: rows as in the
    benchmark's results.json (methods ``zeroshot``, the baseline, ``{baseline}_wise_alpha{a}`` and the variant),
    the curve's points per seed (fractions), and the variant's gain (mean, std, per seed) on the shift average and
    on each shift set alone.
    """
    missing = [n for n in (id_set, *shift_sets) if n not in sets]
    if missing:
        raise ValueError(f"The sets {missing} are not among the evaluation sets {sorted(sets)}.")
    if id_set in shift_sets:
        raise ValueError(f"The ID set {id_set!r} cannot also be a shift set.")
    alphas = [float(a) for a in alphas]
    if 0.0 not in alphas or 1.0 not in alphas or len(alphas) < 2:
        raise ValueError(f"The WiSE-FT grid must contain alpha 0 (zero-shot end) and 1 (FT), got {alphas}.")
    # The eval transform is deterministic: decode and transform every image once for all models.
    _, transform = transforms_from_pretrained(world.clip_path)
    pixels = {name: (pretransform(ds, transform, batch_size=batch_size), spec) for name, (ds, spec) in sets.items()}
    num_examples = {name: len(p) for name, (p, _) in pixels.items()}
    with _quiet_loading(report=False):  # the CLIP's text tower and logit scale are not the classifier's: no report
        zeroshot = from_clip(world.clip_path, list(classnames), list(templates), progress=False)
    if device is not None:
        zeroshot.to(device)

    def score(models: Mapping[Any, torch.nn.Module]) -> dict[Any, dict[str, float]]:
        counts = count_correct(models, pixels, None, batch_size=batch_size, progress=progress)
        return {key: {name: counts[name][key].accuracy for name in pixels} for key in models}

    zs = score({"zeroshot": zeroshot})["zeroshot"]
    rows: list[dict[str, Any]] = []
    curve: list[dict[str, float]] = []
    per_set_curve: dict[str, list[dict[str, float]]] = {s: [] for s in shift_sets}
    checks: dict[str, Any] = {}

    def add_rows(method: str, seed: int, accs: Mapping[str, float]) -> None:
        rows.extend({"method": method, "seed": seed, "eval_set": name, "accuracy": float(acc)}
                    for name, acc in accs.items())

    for seed in world.seeds:
        ft = _load_run(world.ft_runs[seed])
        variant = _load_run(world.variant_runs[seed])
        # theta_0: the CLIP's vision weights and the head this FT run started from (what the pipeline sweeps from).
        theta0 = copy.deepcopy(zeroshot)
        load_initial_head(theta0, world.ft_runs[seed])
        for m in (ft, variant, theta0):
            m.to(device if device is not None else "cpu")
        models: dict[Any, torch.nn.Module] = {("wise", a): m for a, m in wise_ft_variants(theta0, ft, alphas).items()}
        models["variant"] = variant
        accs = score(models)
        sweep = [accs[("wise", a)] for a in alphas]
        add_rows("zeroshot", seed, zs)
        add_rows(world.baseline, seed, accs[("wise", 1.0)])
        for a in alphas:
            if a not in (0.0, 1.0):
                add_rows(f"{world.baseline}_wise_alpha{a:g}", seed, accs[("wise", a)])
        add_rows(world.variant, seed, accs["variant"])
        curve += curve_points(seed, alphas, sweep, id_set, shift_sets)
        for s in shift_sets:
            per_set_curve[s] += curve_points(seed, alphas, sweep, id_set, [s])
        checks[str(seed)] = {
            # theta_0's head is the zero-shot head when FT started from zero-shot: then alpha 0 IS the zero-shot model.
            "alpha0_equals_zeroshot": all(accs[("wise", 0.0)][n] == zs[n] for n in pixels),
            "recorded_id": {"ft": _recorded(world.ft_runs[seed], id_set),
                            world.variant: _recorded(world.variant_runs[seed], id_set)},
            "measured_id": {"ft": {"0.0": accs[("wise", 0.0)][id_set], "1.0": accs[("wise", 1.0)][id_set]},
                            world.variant: {"1.0": accs["variant"][id_set]}},
        }
        logger.info("seed %d: %s ID %.4f, %s ID %.4f, zero-shot ID %.4f", seed, world.baseline,
                    accs[("wise", 1.0)][id_set], world.variant, accs["variant"][id_set], zs[id_set])
        del models, ft, variant, theta0
    methods = ("zeroshot", world.baseline, world.variant)
    main_rows = [r for r in rows if r["method"] in methods]
    gains = gain_over_wise_curve(main_rows, curve, id_set, list(shift_sets))
    per_shift = {s: gain_over_wise_curve([r for r in main_rows if r["method"] == world.variant], per_set_curve[s],
                                         id_set, [s]).get(world.variant) for s in shift_sets}
    return {
        "clip": world.clip_path,
        "runs": {world.baseline: {str(k): v for k, v in world.ft_runs.items()},
                 world.variant: {str(k): v for k, v in world.variant_runs.items()}},
        "variant": world.variant,
        "baseline": world.baseline,
        "seeds": list(world.seeds),
        "id_set": id_set,
        "shift_sets": list(shift_sets),
        "num_examples": num_examples,
        "alphas": alphas,
        "gain_rule": GAIN_RULE,
        "rows": rows,
        "wise_ft_curve": curve,
        "wise_ft_curve_per_shift": per_set_curve,
        "gain_over_wise_curve": gains,
        "gain_per_shift": per_shift,
        "checks": checks,
    }


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------


def _mean_std(values: Sequence[float]) -> str:
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}"


def _gain_cell(g: Mapping[str, Any] | None) -> str:
    if not g or g.get("mean") is None:
        return "n/a (ID outside the curve)"
    seeds = ", ".join("n/a" if v is None else f"{100 * v:+.2f}" for v in g["per_seed"].values())
    return f"{100 * g['mean']:+.2f} ± {100 * g['std']:.2f} ({seeds})"


def unseen_markdown(results: Mapping[str, Any], title: str = "") -> str:
    """A short table: accuracy (%) mean ± std over seeds per method and set, and the variant's gain in points."""
    id_set, shifts = results["id_set"], list(results["shift_sets"])
    acc: dict[str, dict[str, list[float]]] = {}
    for row in results["rows"]:
        acc.setdefault(row["method"], {}).setdefault(row["eval_set"], []).append(row["accuracy"])
    methods = ["zeroshot", results["baseline"], results["variant"]]
    lines = [f"### {title}", ""] if title else []
    lines += ["| method | " + " | ".join([id_set, "shift avg", *shifts]) + " |",
              "|---|" + "---|" * (len(shifts) + 2)]
    for method in methods:
        by_set = acc[method]
        n = len(by_set[id_set])
        avg = [float(np.mean([by_set[s][i] for s in shifts])) for i in range(n)]
        cells = [_mean_std(by_set[id_set]), _mean_std(avg), *(_mean_std(by_set[s]) for s in shifts)]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    variant = results["variant"]
    lines += ["", f"Gain of `{variant}` over the same seed's WiSE-FT curve of `{results['baseline']}` (points, mean ± "
              "std over seeds, per seed in brackets):", "",
              "| shifts | gain |", "|---|---|",
              f"| average of all {len(shifts)} | {_gain_cell(results['gain_over_wise_curve'].get(variant))} |"]
    lines += [f"| {s} alone | {_gain_cell(results['gain_per_shift'].get(s))} |" for s in shifts]
    lines += ["", f"Top-1 accuracy (%), mean ± std over seeds {results['seeds']}; "
              f"{results['num_examples'][id_set]} ID images, {sum(results['num_examples'][s] for s in shifts)} "
              "shifted. WiSE-FT alphas "
              f"{', '.join(f'{a:g}' for a in results['alphas'])}. Rule: {results['gain_rule']}"]
    return "\n".join(lines) + "\n"


def write_unseen_outputs(results: Mapping[str, Any], prefix: str, title: str = "", plot: bool = True) -> list[str]:
    """``prefix.json`` (atomically), ``prefix.md`` and, with `plot`, ``prefix.png``; returns the paths."""
    paths = [prefix + ".json", prefix + ".md"]
    write_text_atomic(paths[0], json.dumps(results, indent=1, sort_keys=True) + "\n")
    write_text_atomic(paths[1], unseen_markdown(results, title))
    if plot:
        paths.append(prefix + ".png")
        plot_unseen(results, paths[2], title)
    return paths


def plot_unseen(results: Mapping[str, Any], path: str, title: str = "") -> None:
    """ID vs shift average: plain FT's WiSE-FT curve per seed (thin) and its mean over seeds, zero-shot, and the
    variant's point per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5))
    by_seed: dict[int, list[Mapping[str, float]]] = {}
    for p in results["wise_ft_curve"]:
        by_seed.setdefault(int(p["seed"]), []).append(p)
    colours = plt.get_cmap("tab10").colors
    for i, (seed, points) in enumerate(sorted(by_seed.items())):
        ax.plot([100 * p["id"] for p in points], [100 * p["shift_avg"] for p in points], "-", lw=1, alpha=0.6,
                color=colours[i], label=f"{results['baseline']} WiSE-FT curve, seed {seed}")
    id_set, shifts = results["id_set"], results["shift_sets"]
    point: dict[tuple[str, int], dict[str, float]] = {}
    for row in results["rows"]:
        point.setdefault((row["method"], int(row["seed"])), {})[row["eval_set"]] = row["accuracy"]
    for i, seed in enumerate(sorted(by_seed)):
        v = point[(results["variant"], seed)]
        ax.plot(100 * v[id_set], 100 * np.mean([v[s] for s in shifts]), "*", ms=13, color=colours[i],
                markeredgecolor="k", label=f"{results['variant']}, seed {seed}")
    z = point[("zeroshot", sorted(by_seed)[0])]
    ax.plot(100 * z[id_set], 100 * np.mean([z[s] for s in shifts]), "s", ms=8, color="0.2", label="zero-shot")
    ax.set_xlabel(f"ID accuracy (%, {id_set})")
    ax.set_ylabel(f"average over {len(shifts)} unseen shifts (%)")
    ax.set_title(title or "Saved models on unseen shifts")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
