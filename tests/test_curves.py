"""`gain_over_wise_curve`: the claim's metric, recomputable from results.json's rows and curve points."""

import pytest

from saeft_hf.benchmarks.curves import curve_points, gain_over_curve, gain_over_wise_curve
from saeft_hf.benchmarks.experiment import DigitExperimentConfig, load_variants, run_digit_experiment

SHIFTS = ["a", "b"]


def _curve(seed, pts):
    return [{"seed": seed, "alpha": a, "id": i, "shift_avg": s} for a, i, s in pts]


def test_gain_is_the_vertical_distance_to_the_linear_curve_at_the_same_id():
    curve = _curve(0, [(0.0, 0.80, 0.85), (0.5, 0.90, 0.86), (1.0, 0.94, 0.80)])
    assert gain_over_curve(0.85, 0.90, curve) == pytest.approx(0.90 - 0.855)
    assert gain_over_curve(0.92, 0.80, curve) == pytest.approx(0.80 - 0.83)
    assert gain_over_curve(0.80, 0.85, curve) == 0.0  # the zero-shot end lies on the curve
    assert gain_over_curve(0.95, 0.90, curve) is None and gain_over_curve(0.79, 0.90, curve) is None
    # Alphas with equal ID accuracy count once, with their best shift average (so the rule has no order ambiguity).
    tied = curve + _curve(0, [(0.6, 0.90, 0.88)])
    assert gain_over_curve(0.90, 0.90, tied) == pytest.approx(0.02)
    assert gain_over_curve(0.90, 0.90, list(reversed(tied))) == pytest.approx(0.02)
    with pytest.raises(ValueError, match="at least 2 points"):
        gain_over_curve(0.9, 0.9, curve[:1])


def test_per_seed_gains_use_their_own_seed_curve_and_skip_out_of_range_seeds():
    curve = _curve(0, [(0.0, 0.8, 0.8), (1.0, 0.9, 0.7)]) + _curve(1, [(0.0, 0.8, 0.8), (1.0, 0.9, 0.6)])
    rows = []
    for seed, (id_acc, a, b) in {0: (0.85, 0.80, 0.80), 1: (0.85, 0.70, 0.80), 2: (0.85, 0.9, 0.9)}.items():
        for name, acc in (("id", id_acc), ("a", a), ("b", b)):
            rows.append({"method": "m", "seed": seed, "eval_set": name, "accuracy": acc})
    rows += [{"method": "far", "seed": 0, "eval_set": n, "accuracy": v} for n, v in (("id", 0.95), ("a", 1), ("b", 1))]
    gains = gain_over_wise_curve(rows, curve, "id", SHIFTS)
    # seed 0: 0.80 - 0.75; seed 1: 0.75 - 0.70; seed 2 has no curve
    assert gains["m"]["per_seed"] == pytest.approx({"0": 0.05, "1": 0.05})
    assert gains["m"]["mean"] == pytest.approx(0.05) and gains["m"]["std"] == pytest.approx(0.0) and gains["m"]["n"] == 2
    assert gains["far"] == {"mean": None, "std": None, "n": 0, "per_seed": {"0": None}}


def test_curve_points_average_the_shift_sets():
    pts = curve_points(3, [0.0, 1.0], [{"id": 0.5, "a": 0.2, "b": 0.4}, {"id": 0.9, "a": 0.1, "b": 0.1}], "id", SHIFTS)
    assert pts == [{"seed": 3, "alpha": 0.0, "id": 0.5, "shift_avg": pytest.approx(0.3)},
                   {"seed": 3, "alpha": 1.0, "id": 0.9, "shift_avg": pytest.approx(0.1)}]


def test_variants_file_is_checked(tmp_path):
    good = tmp_path / "v.yaml"
    good.write_text("variants:\n  sae_ft_cls:\n    base: sae_ft\n    wise: true\n"
                    "    settings: {representation: hidden_states.-1.cls, sae_ft_lambda_reg: 2.0}\n")
    (v,) = load_variants(str(good)).values()
    assert (v.name, v.base, v.wise, v.settings["representation"]) == ("sae_ft_cls", "sae_ft", True,
                                                                       "hidden_states.-1.cls")
    for text, what in (("variants:\n  x: {base: sae_ft, settings: {lambda_typo: 1}}\n", "lambda_typo"),
                       ("variants:\n  x: {base: zeroshot}\n", "base 'zeroshot'"),
                       ("variants:\n  ft: {base: sae_ft}\n", "built-in")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ValueError, match=what):
            load_variants(str(bad))
    with pytest.raises(ValueError, match="Unknown methods"):
        run_digit_experiment(DigitExperimentConfig(output_dir=str(tmp_path / "o"), methods=["nope"]))
    with pytest.raises(ValueError, match="must include 0 and 1"):
        run_digit_experiment(DigitExperimentConfig(output_dir=str(tmp_path / "o"), wise_alphas=[0.0, 0.5]))
