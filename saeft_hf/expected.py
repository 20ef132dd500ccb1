"""The numbers a recipe config should reproduce (its `expected:` section), and a run's results set beside them.

A training config may carry an `expected:` mapping; `parse_args` validates it and leaves it out of the options (an
unknown key anywhere else is still an error). `saeft compare RUN --config FILE` prints `compare_run(...)`:

    expected:
      source: where the numbers come from
      tolerance: 1.0                    # points; how far the run's alpha-0 numbers may be from `zero_shot`
      id_set: imagenet                  # the row name matched to the run's `id` accuracy, whatever the run named its ID set
      zero_shot: {imagenet: 68.3, ...}  # checked: the alpha = 0 end of the run's WiSE-FT sweep is the pre-trained model
      published: {FT: {...}, ...}       # shown beside the run, not checked (other methods' published numbers)

Numbers are top-1 accuracy in percent; run results (fractions in eval_results.json) are shown in percent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .validation import SAEFTConfigError

EXPECTED_KEY = "expected"
_FIELDS = ("source", "tolerance", "id_set", "zero_shot", "published")


def _numbers(values: Any, where: str) -> dict[str, float]:
    if not isinstance(values, Mapping) or not values:
        raise SAEFTConfigError(f"{where} must be a mapping of eval set name to top-1 accuracy in percent "
                               f"(e.g. `{{imagenet: 68.3}}`), got {values!r}.")
    out: dict[str, float] = {}
    for name, value in values.items():
        if not isinstance(name, str) or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SAEFTConfigError(f"{where}: `{name}: {value!r}` is not `set_name: number`.")
        if not 0.0 <= float(value) <= 100.0:
            raise SAEFTConfigError(f"{where}: {name} = {value} is not a percentage in [0, 100].")
        out[name] = float(value)
    return out


@dataclass(frozen=True)
class ExpectedNumbers:
    """A config's `expected:` section (see the module docstring)."""

    source: str
    zero_shot: dict[str, float]
    tolerance: float = 1.0
    id_set: str = "imagenet"
    published: dict[str, dict[str, float]] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, values: Any, where: str) -> ExpectedNumbers:
        """Validate a parsed `expected:` mapping; errors name the file and the fix."""
        where = f"{where}: `{EXPECTED_KEY}`"
        if not isinstance(values, Mapping):
            raise SAEFTConfigError(f"{where} must be a mapping with keys {list(_FIELDS)}, got {values!r}.")
        unknown = sorted(set(values) - set(_FIELDS))
        if unknown:
            raise SAEFTConfigError(f"{where} has unknown keys {unknown}; valid keys: {list(_FIELDS)}.")
        for key in ("source", "zero_shot"):
            if key not in values:
                raise SAEFTConfigError(f"{where} needs `{key}`.")
        if not isinstance(values["source"], str) or not values["source"].strip():
            raise SAEFTConfigError(f"{where}.source must say where the numbers come from.")
        tolerance = values.get("tolerance", 1.0)
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 100:
            raise SAEFTConfigError(f"{where}.tolerance must be a number of points in [0, 100), got {tolerance!r}.")
        id_set = values.get("id_set", "imagenet")
        if not isinstance(id_set, str):
            raise SAEFTConfigError(f"{where}.id_set must be a set name, got {id_set!r}.")
        published = values.get("published") or {}
        if not isinstance(published, Mapping):
            raise SAEFTConfigError(f"{where}.published must map method names to their numbers, got {published!r}.")
        return cls(
            source=values["source"].strip(), zero_shot=_numbers(values["zero_shot"], f"{where}.zero_shot"),
            tolerance=float(tolerance), id_set=id_set,
            published={str(m): _numbers(v, f"{where}.published.{m}") for m, v in published.items()},
        )


def split_expected(values: dict[str, Any], where: str) -> tuple[dict[str, Any], ExpectedNumbers | None]:
    """(the config's options without `expected`, the validated section or None): what `parse_args` calls."""
    if EXPECTED_KEY not in values:
        return values, None
    options = {k: v for k, v in values.items() if k != EXPECTED_KEY}
    return options, ExpectedNumbers.from_mapping(values[EXPECTED_KEY], where)


def load_expected(config_path: str) -> ExpectedNumbers:
    """The `expected:` section of a YAML config file (an error if it has none)."""
    import yaml

    with open(config_path, encoding="utf-8") as fh:
        values = yaml.safe_load(fh)
    if not isinstance(values, Mapping) or EXPECTED_KEY not in values:
        raise SAEFTConfigError(f"{config_path} has no `{EXPECTED_KEY}:` section to compare with.")
    return ExpectedNumbers.from_mapping(values[EXPECTED_KEY], config_path)


@dataclass
class Comparison:
    """`compare_run`'s result: the table (markdown) and the zero-shot checks that failed or could not be made."""

    table: str
    failed: list[str]
    unchecked: list[str]

    @property
    def ok(self) -> bool:
        return not self.failed


def _run_value(results: Mapping[str, Any] | None, name: str, expected: ExpectedNumbers) -> float | None:
    """A run's accuracy (fraction) for an expected row name: the ID row reads the run's `id` entry; `avg_shift` counts
    only when the run evaluated as many shifts as the expected numbers average over."""
    if not results:
        return None
    if name == expected.id_set and name not in results:
        name = "id"
    if name == "avg_shift":
        shifts = [s for s in expected.zero_shot if s not in (expected.id_set, "avg_shift")]
        if int(results.get("num_shifts", 0)) != len(shifts):
            return None
    value = results.get(name)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def compare_run(results: Mapping[str, Any], expected: ExpectedNumbers) -> Comparison:
    """Set a run's `eval_results.json` (fine-tuned, WiSE-FT at the chosen alpha, and alpha 0) beside the expected
    numbers; the alpha-0 column is checked against `zero_shot` within `tolerance` points."""
    final = results.get("final") or {}
    wise = results.get("wise_ft") or {}
    alphas = [float(a) for a in wise.get("alphas", [])]
    chosen = zero = None
    if wise:
        chosen = wise["results"][alphas.index(float(wise["best_alpha"]))]
        zero = wise["results"][alphas.index(0.0)] if 0.0 in alphas else None
    rows = list(dict.fromkeys([*expected.zero_shot, *(k for v in expected.published.values() for k in v)]))
    header = ["set", "fine-tuned"]
    if chosen is not None:
        header.append(f"WiSE-FT (alpha {float(wise['best_alpha']):g})")
    header += ["alpha 0 (run)", "zero-shot (expected)", "check"] + [f"{m} (published)" for m in expected.published]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    failed: list[str] = []
    unchecked: list[str] = []

    def pct(value: float | None) -> str:
        return "" if value is None else f"{100 * value:.1f}"

    for name in rows:
        run0 = _run_value(zero, name, expected)
        want = expected.zero_shot.get(name)
        check = ""
        if want is not None:
            if run0 is None:
                check = "not evaluated" if zero is not None else "no alpha 0"
                unchecked.append(name)
            elif math.isclose(100 * run0, want, abs_tol=expected.tolerance + 1e-9):
                check = "ok"
            else:
                check = f"off by {100 * run0 - want:+.1f}"
                failed.append(f"{name}: alpha 0 gives {100 * run0:.1f}, expected {want:.1f} +- {expected.tolerance:g}")
        row = [name, pct(_run_value(final, name, expected))]
        if chosen is not None:
            row.append(pct(_run_value(chosen, name, expected)))
        row += [pct(run0), "" if want is None else f"{want:.1f}", check]
        row += ["" if name not in v else f"{v[name]:.1f}" for v in expected.published.values()]
        lines.append("| " + " | ".join(row) + " |")
    notes = [f"Top-1 %. Expected numbers: {expected.source}",
             f"`check` compares the alpha = 0 end of the run's WiSE-FT sweep (the pre-trained model with its zero-shot "
             f"head) with the expected zero-shot numbers, within {expected.tolerance:g} point(s); the published "
             "columns are other methods' numbers, for reference."]
    if chosen is not None:
        notes.append(f"WiSE-FT alpha {float(wise['best_alpha']):g} was chosen on `{wise.get('select_on')}`.")
    if zero is None:
        notes.append("The run has no alpha-0 result: sweep WiSE-FT with alpha 0 included (`--wise_ft_alphas 0 ... 1`, "
                     "as the configs do) to check the evaluation against the zero-shot numbers.")
    return Comparison(table="\n".join(lines) + "\n\n" + "\n".join(notes), failed=failed, unchecked=unchecked)
