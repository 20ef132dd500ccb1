"""recipes/tune_digits.py --merge_dirs: one protocol split over processes gives the same choice as one process."""

import json

import pytest
import yaml

from helpers import recipe_module

tune_digits = recipe_module


def _part(path, records):
    with open("recipes/configs/digits_protocol.yaml", encoding="utf-8") as fh:
        protocol = yaml.safe_load(fh)
    summary = {"protocol": protocol, "tune_seed": 100, "used_families": ["tune_outline"], "zeroshot": {"x": 0.7},
               "ft": {"x": 0.6}, "ft_curve": [{"alpha": 0.0, "id": 0.7, "shift_avg": 0.6}], "records": records}
    path.mkdir()
    (path / "tuning.json").write_text(json.dumps(summary))
    return summary


def _rec(method, setting, gain, **settings):
    return {"method": method, "setting": setting, "settings": settings, "accuracies": {}, "tuning_gain": gain}


def test_merge_chooses_over_all_parts(tmp_path, capsys):
    _part(tmp_path / "a", [_rec("l2sp", 0, 0.01, l2sp_lambda=0.01), _rec("l2sp", 1, 0.02, l2sp_lambda=0.1),
                           _rec("sae_ft", 0, 0.010, sae_ft_lambda_reg=2.0), _rec("sae_ft", 1, 0.010, sae_ft_lambda_reg=10.0)])
    _part(tmp_path / "b", [_rec("sae_ft_cls", 0, 0.03, sae_ft_lambda_reg=2.0),
                           _rec("sae_ft_cls", 1, -0.01, sae_ft_lambda_reg=10.0)])
    out = tmp_path / "merged"
    with tune_digits("tune_digits", "tune_digits_under_test") as mod:
        mod.main(["--tuning_dir", str(out), "--world", "fashion", "--merge_dirs", str(tmp_path / "a"),
                  str(tmp_path / "b")])
    chosen = yaml.safe_load((out / "chosen_variants.yaml").read_text())["variants"]
    assert chosen["l2sp_tuned"]["settings"] == {"l2sp_lambda": 0.1}  # the larger gain
    assert chosen["sae_ft_tuned"]["settings"] == {"sae_ft_lambda_reg": 2.0}  # a tie goes to the first (weaker)
    # The WiSE-FT sweep goes to the best SAE-FT variant over BOTH parts, not per part.
    assert chosen["sae_ft_cls"]["wise"] is True and chosen["sae_ft_tuned"]["wise"] is False
    merged = json.loads((out / "tuning.json").read_text())
    assert len(merged["records"]) == 6 and merged["merged_from"] == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert "--world fashion" in capsys.readouterr().out


def test_merge_refuses_parts_of_different_tunings(tmp_path):
    _part(tmp_path / "a", [_rec("l2sp", 0, 0.01, l2sp_lambda=0.01)])
    other = _part(tmp_path / "b", [_rec("sae_ft", 0, 0.01, sae_ft_lambda_reg=2.0)])
    other["ft_curve"][0]["shift_avg"] = 0.61  # FT was not the same run
    (tmp_path / "b" / "tuning.json").write_text(json.dumps(other))
    with tune_digits("tune_digits", "tune_digits_under_test") as mod, pytest.raises(SystemExit, match="ft_curve"):
        mod.main(["--tuning_dir", str(tmp_path / "m"), "--merge_dirs", str(tmp_path / "a"), str(tmp_path / "b")])
