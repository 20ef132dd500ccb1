"""recipes/benchmark.py --quick: runs end to end on a tiny model and writes every key of the benchmark JSON."""

import datetime
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("ft", "sae_ft", "sae_ft_cached", "lora", "lora_sae_ft", "loop")


def is_positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def test_quick_benchmark_writes_every_key(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}  # this checkout
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "benchmark.py"), "--quick", "--threads", "1",
                           "--output", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())

    for key in ("ratio_sae_ft_to_ft", "ratio_cached_to_ft", "ratio_lora_sae_ft_to_lora", "trainer_vs_loop_throughput",
                "lora_sae_ft_extra_with_sae_fraction", "fvu_ours", "fvu_ours_paper_init"):
        assert is_positive_number(result[key]), (key, result[key])
    # LoRA SAE-FT adds the SAE and nothing else: its reference is the same model with adapters disabled.
    assert result["lora_sae_ft_extra_reference_bytes"] == 0
    assert result["lora_sae_ft_extra_weight_bytes"] == 0 and result["lora_sae_ft_sae_bytes"] > 0
    assert result["lora_sae_ft_extra_weight_fraction"] == 0
    assert 0 < result["lora_sae_ft_extra_with_sae_fraction"] < 1
    has_saelens = importlib.util.find_spec("sae_lens") is not None
    for key in ("sae_train_speedup_vs_saelens", "fvu_saelens"):
        assert is_positive_number(result[key]) if has_saelens else result[key] is None, (key, result[key])

    model = result["models"]["tiny"]
    for table in ("step_time_median_s", "cycle_time_median_s", "throughput_images_per_s"):
        assert set(model[table]) == set(CONFIGS) and all(is_positive_number(v) for v in model[table].values())
    assert all(len(v) == 2 for v in model["step_times_s"].values())  # --quick: 2 measured steps each
    for name in CONFIGS:
        memory = model["memory"][name]
        assert is_positive_number(memory["peak_bytes"]) and memory["peak_bytes"] > memory["persistent_bytes"]["total"]
    held = {name: model["memory"][name]["persistent_bytes"] for name in CONFIGS}
    assert held["sae_ft"]["reference_model"] == held["ft"]["model_weights"]  # the frozen copy of full SAE-FT
    assert held["sae_ft_cached"]["reference_model"] == 0 and held["lora_sae_ft"]["reference_model"] == 0

    for key in ("input_train_ratio_to_pil", "input_eval_ratio_to_pil", "input_large_eval_ratio_to_pil",
                "input_train_images_per_s_per_core", "embedding_pass_images_per_s"):  # the input-pipeline part
        assert is_positive_number(result[key]), (key, result[key])
    assert result["input_workers_per_gpu_4000"] >= result["input_workers_per_gpu_2000"] >= 1

    sae = result["sae_training"]
    assert is_positive_number(sae["ours"]["vectors_per_s"]) and 0 <= sae["ours"]["fvu"]
    assert result["device"] == "cpu" and result["dtype"] == "fp32"
    assert datetime.datetime.fromisoformat(result["date"])
    assert result["machine"]["versions"]["torch"] and result["machine"]["cpu_count"]
    assert "recipes/benchmark.py --quick" in result["command"]
