"""recipes/evaluate.py on a bf16 training run of recipes/imagenet.py: same numbers under python and torchrun, exact
counts on odd-sized sets, `role: other` out of the averages, and the training run's own numbers equal to it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import make_tiny_clip

ROOT = Path(__file__).resolve().parents[1]
WNIDS = (ROOT / "saeft_hf" / "resources" / "imagenet_wnids.txt").read_text().split()[:4]
SIZES = {"id": 25, "shift": 31, "other": 19, "holdout": 13}


def make_folder(root: Path, n: int, names: list[str], seed: int) -> Path:
    """n images spread unevenly over the class folders `names` (class i gets a learnable colour)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        label = i % len(names) if i % 5 else 0  # uneven classes
        (root / names[label]).mkdir(parents=True, exist_ok=True)
        base = np.zeros(3)
        base[label % 3] = 200
        size = int(rng.integers(30, 45))  # odd image sizes: the eval transform resizes and crops
        pixels = np.clip(base + rng.normal(0, 50, (size, size + 3, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / names[label] / f"{i}.png")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], torchrun: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), *cmd]
    else:
        cmd = [sys.executable, *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    clip = make_tiny_clip(tmp / "clip")
    make_folder(tmp / "train", 40, WNIDS, seed=0)
    make_folder(tmp / "id", SIZES["id"], WNIDS, seed=1)
    make_folder(tmp / "shift", SIZES["shift"], [WNIDS[1], WNIDS[3]], seed=2)
    make_folder(tmp / "other", SIZES["other"], WNIDS, seed=3)
    make_folder(tmp / "holdout", SIZES["holdout"], WNIDS, seed=4)
    sets = (f"eval_sets:\n"
            f"  - {{name: tiny_id, data_dir: {tmp / 'id'}, kind: full, role: id}}\n"
            f"  - {{name: tiny_r, data_dir: {tmp / 'shift'}, kind: subset, class_indices: [1, 3], role: shift}}\n"
            f"  - {{name: tiny_other, data_dir: {tmp / 'other'}, kind: full, role: other}}\n")
    (tmp / "E.yaml").write_text(sets)
    (tmp / "E_holdout.yaml").write_text(
        sets + f"  - {{name: tiny_holdout, data_dir: {tmp / 'holdout'}, kind: full, role: holdout}}\n")
    out = tmp / "run"
    run([str(ROOT / "recipes" / "imagenet.py"), "--model_name_or_path", str(clip), "--train_dir", str(tmp / "train"),
         "--output_dir", str(out), "--max_steps", "3", "--per_device_train_batch_size", "8", "--learning_rate", "3e-3",
         "--warmup_steps", "0", "--use_cpu", "--bf16", "--report_to", "none", "--save_strategy", "no",
         "--sae_epochs", "2", "--sae_batch_size", "8", "--sae_k", "4", "--embedding_batch_size", "16",
         "--per_device_eval_batch_size", "7", "--eval_sets_config", str(tmp / "E.yaml"),
         "--wise_ft_alphas", "0", "0.5", "1", "--wise_ft_holdout", "5", "--dataloader_num_workers", "0"])
    return tmp, out


def evaluate(tmp: Path, run_dir: Path, name: str, *extra: str, torchrun: bool = False) -> dict:
    out = tmp / name
    run([str(ROOT / "recipes" / "evaluate.py"), "--model_name_or_path", str(run_dir), "--output_dir", str(out),
         "--batch_size", "4", "--num_workers", "0", *extra], torchrun=torchrun)
    return json.loads((out / "eval_results.json").read_text())


def test_evaluate_matches_training_and_torchrun_with_wise_ft(trained) -> None:
    tmp, run_dir = trained
    trained_results = json.loads((run_dir / "eval_results.json").read_text())
    assert trained_results["precision"] == "fp32"  # a bf16 run is still evaluated in fp32
    # 5 of the 40 training images chose alpha; none of them trained, none is reported.
    assert trained_results["wise_ft"]["select_on"] == "train_holdout"
    assert (run_dir / "wise_ft" / "model.safetensors").is_file()

    # The lead's check with a WiSE-FT sweep on top (the sweep's alpha-1 numbers are the plain evaluation's).
    args = ["--eval_sets_config", str(tmp / "E_holdout.yaml"), "--wise_ft_alphas", "0", "0.5", "1"]
    single = evaluate(tmp, run_dir, "eval1", *args)
    double = evaluate(tmp, run_dir, "eval2", *args, torchrun=True)
    sizes = {"tiny_id": SIZES["id"], "tiny_r": SIZES["shift"], "tiny_other": SIZES["other"]}
    for results in (single, double):
        # Every image once: no padding duplicates over 2 ranks with 25 / 31 / 19 / 13 images.
        assert results["num_examples"] == {**sizes, "tiny_holdout": SIZES["holdout"]}
        final = results["final"]
        assert set(final) == {*sizes, "id", "avg_shift", "num_shifts"}  # the holdout set is not reported
        assert final["avg_shift"] == final["tiny_r"] and final["num_shifts"] == 1  # `other` is in no average
        assert final["id"] == final["tiny_id"]
        sweep = results["wise_ft"]
        assert sweep["select_on"] == "tiny_holdout"
        scores = [r["tiny_holdout"] for r in sweep["results"]]
        assert sweep["best_alpha"] == sweep["alphas"][scores.index(max(scores))]
        at_one = sweep["results"][sweep["alphas"].index(1.0)]
        assert {k: at_one[k] for k in final} == final
    assert double["num_processes"] == 2 and single["final"] == double["final"]
    assert single["wise_ft"] == double["wise_ft"]
    # The training run's own numbers are the fp32 evaluation of what it saved.
    assert {k: trained_results["final"][k] for k in single["final"]} == single["final"]
    assert trained_results["num_examples"] == {**sizes, "train_holdout": 5}
    # Its alpha-0 end is the pre-trained model rebuilt from the recorded source checkpoint and initial head.
    zero = lambda r: {k: r["wise_ft"]["results"][r["wise_ft"]["alphas"].index(0.0)][k] for k in single["final"]}  # noqa: E731
    assert zero(trained_results) == zero(single)

    # The saved WiSE-FT model scores what the sweep measured at its alpha.
    saved = json.loads((tmp / "eval1" / "wise_ft" / "wise_ft.json").read_text())
    assert saved["alpha"] == single["wise_ft"]["best_alpha"]
    chosen = evaluate(tmp, tmp / "eval1" / "wise_ft", "chosen", "--eval_sets_config", str(tmp / "E.yaml"))
    best = single["wise_ft"]["results"][single["wise_ft"]["alphas"].index(saved["alpha"])]
    assert chosen["num_examples"] == sizes
    assert {k: best[k] for k in chosen["final"]} == chosen["final"]
