"""The WiSE-FT curve of plain fine-tuning and how far a method lies above it (`gain_over_wise_curve`).

SAE-FT's claim is a better robustness / ID trade-off than WiSE-FT's. WiSE-FT traces a curve from the zero-shot model
(alpha 0) to the fine-tuned one (alpha 1) in the (ID accuracy, shift-average accuracy) plane; a method beats it only
if its point lies above that curve at its own ID accuracy. The rule, so anyone can recompute it from `results.json`:

    curve  = the points {"id", "shift_avg"} of the same seed's plain-FT sweep; alphas with equal "id" count once,
             with their best "shift_avg"; sorted by "id"
    gain   = shift_avg(method) - np.interp(id(method), curve ids, curve shift_avgs)

`None` when the method's ID accuracy is outside the curve's ID range (the curve says nothing there). Everything is a
fraction (0.83, not 83), like the rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

GAIN_RULE = (
    "gain = shift_avg(method, seed) - np.interp(id(method, seed), xp, fp), where (xp, fp) are the (id, shift_avg) "
    "points of wise_ft_curve for that seed, one per distinct id (the highest shift_avg among alphas with that id), "
    "sorted by id; None when id is outside [min xp, max xp]."
)


def curve_points(seed: int, alphas: Sequence[float], results: Sequence[Mapping[str, float]], id_set: str,
                 shift_sets: Sequence[str]) -> list[dict[str, float]]:
    """One sweep's points as `{"seed", "alpha", "id", "shift_avg"}` rows (the format of `results.json`)."""
    points = []
    for alpha, accs in zip(alphas, results):
        shifts = [accs[s] for s in shift_sets]
        points.append({"seed": int(seed), "alpha": float(alpha), "id": float(accs[id_set]),
                       "shift_avg": float(np.mean(shifts))})
    return points


def gain_over_curve(id_acc: float, shift_avg: float, points: Sequence[Mapping[str, float]]) -> float | None:
    """`shift_avg` minus the curve's shift average at `id_acc` (linear in ID), or None outside its ID range."""
    if len(points) < 2:
        raise ValueError(f"A curve needs at least 2 points, got {len(points)}.")
    best: dict[float, float] = {}
    for p in points:  # alphas with the same ID accuracy (common on small sets): the curve's best point there
        best[float(p["id"])] = max(best.get(float(p["id"]), -np.inf), float(p["shift_avg"]))
    xp = np.array(sorted(best), dtype=np.float64)
    fp = np.array([best[x] for x in xp], dtype=np.float64)
    if not xp[0] <= id_acc <= xp[-1]:
        return None
    return float(shift_avg - np.interp(id_acc, xp, fp))


def gain_over_wise_curve(rows: Sequence[Mapping[str, Any]], curve: Sequence[Mapping[str, Any]], id_set: str,
                         shift_sets: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per method: per-seed gain over the same seed's plain-FT WiSE-FT curve, with mean and std over seeds.

    `rows`: `{"method", "seed", "eval_set", "accuracy"}`; `curve`: `curve_points` rows of plain FT for each seed.
    Seeds without a curve, or whose ID accuracy lies outside it, get None and are left out of mean and std
    (`n` says how many seeds count).
    """
    accs: dict[str, dict[int, dict[str, float]]] = {}
    for row in rows:
        accs.setdefault(row["method"], {}).setdefault(int(row["seed"]), {})[row["eval_set"]] = float(row["accuracy"])
    by_seed: dict[int, list[Mapping[str, Any]]] = {}
    for point in curve:
        by_seed.setdefault(int(point["seed"]), []).append(point)
    out: dict[str, dict[str, Any]] = {}
    for method, seeds in accs.items():
        per_seed: dict[str, float | None] = {}
        for seed, values in sorted(seeds.items()):
            if id_set not in values or any(s not in values for s in shift_sets) or len(by_seed.get(seed, ())) < 2:
                continue
            shift_avg = float(np.mean([values[s] for s in shift_sets]))
            per_seed[str(seed)] = gain_over_curve(values[id_set], shift_avg, by_seed[seed])
        if not per_seed:
            continue
        valid = [g for g in per_seed.values() if g is not None]
        out[method] = {
            "mean": float(np.mean(valid)) if valid else None,
            "std": float(np.std(valid)) if valid else None,
            "n": len(valid),
            "per_seed": per_seed,
        }
    return out
