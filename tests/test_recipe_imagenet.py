"""recipes/imagenet.py end to end, as a user runs it: tiny CLIP, generated ImageNet-shaped folders, full and LoRA."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import make_image_folder, make_tiny_clip, torchrun

ROOT = Path(__file__).resolve().parents[1]
WNIDS = (ROOT / "saeft_hf" / "resources" / "imagenet_wnids.txt").read_text().split()[:4]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recipe")
    clip = make_tiny_clip(tmp / "clip")
    make_image_folder(tmp / "train", per_class=8, names=WNIDS, seed=0)
    make_image_folder(tmp / "val", per_class=3, names=WNIDS, seed=1)
    # An ImageNet-R-like shift: only classes 1 and 3, evaluated with a 2-class logit mask.
    make_image_folder(tmp / "shift", per_class=3, names=[WNIDS[1], WNIDS[3]], seed=2)
    (tmp / "eval_sets.yaml").write_text(
        f"eval_sets:\n  - name: tiny_r\n    data_dir: {tmp / 'shift'}\n    kind: subset\n    class_indices: [1, 3]\n"
    )
    return tmp, clip


def run_recipe(tmp, clip, out, *extra):
    cmd = [
        sys.executable, str(ROOT / "recipes" / "imagenet.py"),
        "--model_name_or_path", str(clip), "--train_dir", str(tmp / "train"), "--validation_dir", str(tmp / "val"),
        "--output_dir", str(out), "--max_steps", "4", "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "8", "--learning_rate", "1e-3", "--warmup_steps", "0", "--logging_steps", "2",
        "--eval_strategy", "steps", "--eval_steps", "2", "--save_steps", "2", "--use_cpu", "--report_to", "none",
        "--sae_epochs", "3", "--sae_batch_size", "8", "--sae_k", "4", "--embedding_batch_size", "16",
        "--eval_sets_config", str(tmp / "eval_sets.yaml"), "--wise_ft_alphas", "0.0", "0.5", "1.0",
        "--dataloader_num_workers", "0", *extra,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def check_common(out):
    state = json.loads((out / "trainer_state.json").read_text())
    train_logs = [e for e in state["log_history"] if "loss" in e]
    eval_logs = [e for e in state["log_history"] if "eval_loss" in e]
    for key in ("ce", "add", "remove", "residual", "penalty", "features_added", "features_removed"):
        assert key in train_logs[0], key
        assert f"eval_{key}" in eval_logs[0], key
    results = json.loads((out / "eval_results.json").read_text())
    final = results["final"]
    assert set(final) >= {"validation", "tiny_r", "avg_shift"}
    assert 0.0 <= final["tiny_r"] <= 1.0
    # Alpha is chosen on held-out training images (1% of 32, at least one), never on the reported validation set.
    assert results["wise_ft"]["alphas"] == [0.0, 0.5, 1.0] and results["wise_ft"]["select_on"] == "train_holdout"
    assert results["num_examples"] == {"validation": 12, "tiny_r": 6, "train_holdout": 1}
    wise = json.loads((out / "wise_ft" / "wise_ft.json").read_text())
    assert wise["alpha"] == results["wise_ft"]["best_alpha"] and (out / "wise_ft" / "model.safetensors").is_file()
    assert (out / "sae" / "model.safetensors").is_file() and (out / "sae" / "config.json").is_file()
    card = (out / "README.md").read_text()
    assert "model-index" in card and "tiny_r" in card
    return state


def test_full_finetuning_end_to_end(workspace):
    tmp, clip = workspace
    out = tmp / "full"
    run_recipe(tmp, clip, out)
    check_common(out)
    weights = load_file(out / "model.safetensors")
    assert "classifier.weight" in weights and any(k.startswith("vision_model.") for k in weights)
    # The model loads back through the Auto API, and the SAE records its source model.
    import saeft_hf  # noqa: F401
    from transformers import AutoModelForImageClassification

    from saeft_hf import SparseAutoencoder

    model = AutoModelForImageClassification.from_pretrained(out)
    assert model.config.num_labels == 4
    sae = SparseAutoencoder.from_pretrained(out / "sae")
    assert sae.config.source_model == str(clip) and sae.config.d_in == 16
    assert (out / "checkpoint-4" / "sae" / "model.safetensors").is_file()


def test_lora_end_to_end(workspace):
    tmp, clip = workspace
    out = tmp / "lora"
    run_recipe(tmp, clip, out, "--use_lora", "--lora_r", "4", "--lora_alpha", "8")
    check_common(out)
    assert (out / "adapter_model.safetensors").is_file() and (out / "base" / "config.json").is_file()
    from saeft_hf.lora import load_classifier

    model = load_classifier(str(out))
    pixel_values = torch.randn(2, 3, 30, 30)
    assert model(pixel_values=pixel_values).logits.shape == (2, 4)


def test_two_process_cpu_run(workspace):
    """torchrun with 2 gloo ranks completes; only rank 0 writes the outputs."""
    tmp, clip = workspace
    out = tmp / "ddp"
    cmd_prefix = torchrun(2)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = cmd_prefix + [
        str(ROOT / "recipes" / "imagenet.py"), "--model_name_or_path", str(clip), "--train_dir", str(tmp / "train"),
        "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
        "--warmup_steps", "0", "--logging_steps", "1", "--use_cpu", "--report_to", "none", "--save_strategy", "no",
        "--sae_epochs", "2", "--sae_batch_size", "8", "--sae_k", "4", "--ddp_backend", "gloo",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and any("penalty" in e for e in state["log_history"])


def test_push_to_hub_uploads_model_sae_and_card(workspace, monkeypatch):
    """The recipe's --push_to_hub, in process, with only the Hub's network edge patched."""
    import importlib.util
    from unittest import mock

    tmp, clip = workspace
    out = tmp / "push"
    spec = importlib.util.spec_from_file_location("imagenet_recipe", ROOT / "recipes" / "imagenet.py")
    recipe = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "imagenet_recipe", recipe)  # dataclasses resolve annotations through it
    spec.loader.exec_module(recipe)
    uploaded = {}

    def upload_folder(*, repo_id, folder_path, ignore_patterns, **kwargs):
        import fnmatch

        root = Path(folder_path)
        files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
        uploaded["files"] = [f for f in files if not any(fnmatch.fnmatch(f, pat) for pat in ignore_patterns)]
        uploaded["repo_id"] = repo_id
        uploaded["card"] = (root / "README.md").read_text()

    with mock.patch("saeft_hf.hub.HfApi") as api_cls:
        api_cls.return_value.create_repo.return_value.repo_id = "me/tiny-saeft"
        api_cls.return_value.upload_folder.side_effect = upload_folder
        recipe.main([
            "--model_name_or_path", str(clip), "--train_dir", str(tmp / "train"), "--validation_dir", str(tmp / "val"),
            "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "8",
            "--learning_rate", "1e-3", "--warmup_steps", "0", "--use_cpu", "--report_to", "none",
            "--save_strategy", "no", "--sae_epochs", "2", "--sae_batch_size", "8", "--sae_k", "4",
            "--push_to_hub", "--hub_model_id", "me/tiny-saeft",
        ])
    assert uploaded["repo_id"] == "me/tiny-saeft"
    assert {"model.safetensors", "config.json", "README.md", "eval_results.json", "sae/model.safetensors",
            "sae/config.json"} <= set(uploaded["files"])
    assert not any(f.startswith("checkpoint-") or f.endswith(".bin") for f in uploaded["files"])
    assert "me/tiny-saeft" in uploaded["card"] and "validation" in uploaded["card"]
