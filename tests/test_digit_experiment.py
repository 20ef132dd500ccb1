"""A few-step version of the digit benchmark, through the same code path as `make demo`."""

import json
import math

import pytest

from saeft_hf.benchmarks.experiment import ALL_METHODS, DigitExperimentConfig, run_digit_experiment

REQUIRED = {"zeroshot", "ft", "lp_ft", "wise_ft", "feature_distill", "l2sp", "sae_ft", "lora_ft", "lora_sae_ft"}


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    cfg = DigitExperimentConfig(output_dir=str(out), seeds=[0], methods=["all"], max_steps=3, batch_size=32,
                                max_eval_samples=40, max_train_samples=200, sae_epochs=2)
    run_digit_experiment(cfg)
    return out


def test_results_json_schema(quick_results):
    results = json.loads((quick_results / "results.json").read_text())
    assert results["id_set"] == "id_test"
    assert results["shift_sets"] == ["uci", "printed", "noise", "blur", "contrast"]
    methods = {row["method"] for row in results["rows"]}
    assert REQUIRED <= methods and methods <= set(ALL_METHODS)
    for row in results["rows"]:
        assert set(row) == {"method", "seed", "eval_set", "accuracy"}
        assert 0.0 <= row["accuracy"] <= 1.0 and not math.isnan(row["accuracy"])
    for key in ("config", "split_sizes", "versions", "wall_time_s"):
        assert key in results
    assert results["split_sizes"]["finetune"] > 0 and "torch" in results["versions"]
    # Every method is evaluated on the ID test set and every shift.
    sets = {(row["method"], row["eval_set"]) for row in results["rows"]}
    for method in REQUIRED:
        for name in ["id_test", *results["shift_sets"]]:
            assert (method, name) in sets
    # Where the time went (the README reports the split): training vs evaluation.
    assert {"data_s", "sae_s", "train_s", "eval_s", "interpret_s"} <= set(results["timing"])
    assert all(v >= 0 for v in results["timing"].values())
    curve = results["wise_ft_curves"]["wise_ft-seed0"]
    assert curve["alphas"][0] == 0.0 and curve["alphas"][-1] == 1.0 and curve["best_alpha"] in curve["alphas"]


def test_feature_report_written(quick_results):
    results = json.loads((quick_results / "results.json").read_text())
    assert set(results["interpretation"]) == {"FT", "SAE-FT"}
    html = (quick_results / "interpret" / "report.html").read_text()
    assert "SAE-FT" in html and "data:image/png;base64" in html


def test_markdown_and_plot_written(quick_results):
    table = (quick_results / "results.md").read_text()
    assert "| sae_ft |" in table and "shift_avg" in table
    png = (quick_results / "robustness.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_gain_over_wise_curve_recomputes_from_rows_and_curve_points(quick_results):
    import numpy as np

    results = json.loads((quick_results / "results.json").read_text())
    curve = results["wise_ft_curve"]
    assert [p["alpha"] for p in curve] == results["config"]["wise_alphas"] and {p["seed"] for p in curve} == {0}
    accs = {(r["method"], r["eval_set"]): r["accuracy"] for r in results["rows"]}
    best = {}
    for p in curve:  # the documented rule: one point per distinct ID, its best shift average
        best[p["id"]] = max(best.get(p["id"], -1.0), p["shift_avg"])
    xp = sorted(best)
    fp = [best[x] for x in xp]
    for method, gain in results["gain_over_wise_curve"].items():
        id_acc = accs[(method, "id_test")]
        shift = float(np.mean([accs[(method, s)] for s in results["shift_sets"]]))
        expected = None if not xp[0] <= id_acc <= xp[-1] else shift - float(np.interp(id_acc, xp, fp))
        assert gain["per_seed"]["0"] == (pytest.approx(expected) if expected is not None else None)
    # Zero-shot is the curve's alpha-0 point: never above the curve (below it only where another alpha ties its ID).
    assert results["gain_over_wise_curve"]["zeroshot"]["per_seed"]["0"] <= 1e-12


def test_a_variant_runs_with_alpha_chosen_on_the_tuning_families(tmp_path):
    variants = tmp_path / "variants.yaml"
    variants.write_text("variants:\n  sae_ft_multi:\n    base: sae_ft\n    wise: true\n    settings:\n"
                        "      representation: hidden_states.-1.cls,hidden_states.-2.cls\n      sae_ft_lambda_reg: 2.0\n")
    out = tmp_path / "out"
    cfg = DigitExperimentConfig(output_dir=str(out), seeds=[0], methods=["zeroshot", "ft", "sae_ft_multi"],
                                variants_file=str(variants), wise_alphas=[0.0, 0.5, 1.0], wise_select_on="tuning",
                                tuning_splits=["tune_fonts"], max_steps=2, batch_size=16, max_eval_samples=30,
                                max_train_samples=64, sae_epochs=1, interpret=False)
    results = run_digit_experiment(cfg)
    methods = {r["method"] for r in results["rows"]}
    assert methods == {"zeroshot", "ft", "sae_ft_multi", "sae_ft_multi_wise"}
    assert {r["eval_set"] for r in results["rows"]} == {"validation", "id_test", *results["shift_sets"], "tune_fonts"}
    assert results["wise_select_on"] == ["validation", "tune_fonts"]
    assert results["wise_ft_curves"]["sae_ft_multi_wise-seed0"]["select_on"] == "selection"
    # One SAE per layer, and the run's saved model penalised both.
    assert sorted(p.name for p in (out / "saes").iterdir()) and \
        json.loads((out / "runs" / "sae_ft_multi-seed0" / "config.json").read_text())["representation"] == \
        "hidden_states.-1.cls,hidden_states.-2.cls"
    assert "tune_fonts" in (out / "results.md").read_text()


def test_a_stopped_benchmark_is_rebuilt_from_its_finished_runs(quick_results, tmp_path):
    import shutil

    original = json.loads((quick_results / "results.json").read_text())
    copy = tmp_path / "stopped"
    shutil.copytree(quick_results / "runs", copy / "runs")
    shutil.rmtree(copy / "runs" / "l2sp-seed0")  # a run that never finished
    (copy / "runs" / "lp_ft-seed0" / "eval_results.json").unlink()
    collected = run_digit_experiment(DigitExperimentConfig(output_dir=str(copy), collect_only=True))
    key = lambda r: (r["method"], r["seed"], r["eval_set"])  # noqa: E731
    before = {key(r): r["accuracy"] for r in original["rows"]}
    after = {key(r): r["accuracy"] for r in collected["rows"]}
    assert {k[0] for k in after} == {m for m, _, _ in before} - {"linear_probe", "l2sp", "lp_ft"}
    assert all(after[k] == before[k] for k in after)  # zero-shot from alpha 0 of FT's sweep: the same numbers
    assert collected["wise_ft_curve"] == original["wise_ft_curve"]
    assert collected["gain_over_wise_curve"]["sae_ft"] == original["gain_over_wise_curve"]["sae_ft"]
    assert (copy / "results.md").is_file() and (copy / "robustness.png").is_file()
