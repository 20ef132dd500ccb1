"""The bad-input catalogue (docs/bad_inputs.md): every wrong input fails early with a message naming the problem and
the fix, or is converted / skipped as documented.

Cases already covered elsewhere are not repeated here:
SAE width (test_sae::test_width_mismatch_is_a_clear_error, test_trainer::test_errors_are_clear), SAE source model
(test_trainer::test_errors_are_clear, test_sae::test_check_compatible_names_model_and_representation), unknown
activation and corrupted SAE configs (test_sae::test_corrupted_configs_are_refused), corrupt / truncated images at the
data level (test_data::test_corrupt_image_*, test_skip_mode_drops_and_counts_corrupt_images), grayscale / RGBA /
16-bit images (test_data::test_grayscale_*, test_rgba_*, test_16bit_*), labels outside the head
(test_data::test_collator_label_range_and_shapes), a missing split
(test_data::test_missing_split_names_available_splits) and LoRA targets that match nothing
(test_trainer::test_errors_are_clear). The checks that run before the first step (configuration, YAML types, labels,
eval-set specs, tokenizer, SAE weights and keys) are in test_validation.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from helpers import CLASSNAMES, TEMPLATES, make_image_folder, make_tiny_clip, recipe_module, tiny_run_config
from saeft_hf import SAEConfig, SAEFTConfig, SAEFTTrainer, SAEMismatchError, SparseAutoencoder, train_sae
from saeft_hf.data import CorruptImageError, load_image_dataset
from saeft_hf.lora import add_lora
from saeft_hf.pipeline import ModelArguments, run_saeft
from saeft_hf.sae import SAELoadError
from saeft_hf.zeroshot import from_clip

ROOT = Path(__file__).resolve().parents[1]
WNIDS = (ROOT / "saeft_hf" / "resources" / "imagenet_wnids.txt").read_text().split()[:4]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    with recipe_module("imagenet", "imagenet_recipe_bad_inputs") as module:
        yield module


def args(tmp_path, **kw) -> SAEFTConfig:
    return tiny_run_config(tmp_path, **{'max_steps': 2, **kw})


def pixel_dataset(n: int = 8) -> datasets.Dataset:
    gen = torch.Generator().manual_seed(0)
    px, labels = torch.randn(n, 3, 30, 30, generator=gen), torch.randint(0, 4, (n,), generator=gen)
    return datasets.Dataset.from_dict({"pixel_values": px.numpy(), "labels": labels.numpy()}).with_format("torch")


def small_sae(d_in: int, representation: str, source_model: str | None = None) -> SparseAutoencoder:
    config = SAEConfig(d_in=d_in, d_sae=4 * d_in, k=4, representation=representation, source_model=source_model)
    return train_sae(torch.randn(64, d_in), config, epochs=1, batch_size=32, progress=False).sae


def model_args(clip_dir, **kw) -> ModelArguments:
    return ModelArguments(model_name_or_path=str(clip_dir), sae_epochs=1, sae_batch_size=8, sae_k=4,
                          embedding_batch_size=8, **kw)


# ---------------------------------------------------------------------------------------------------------------------
# The SAE
# ---------------------------------------------------------------------------------------------------------------------


def test_sae_of_another_representation_is_refused_by_the_trainer(clip_dir, tmp_path):
    # Same width (the vision hidden size, 32), other representation: the width check alone would not catch it.
    model = from_clip(str(clip_dir), CLASSNAMES, TEMPLATES, representation="hidden_states.2.cls", progress=False)
    sae = small_sae(32, "pooler_output")
    with pytest.raises(SAEMismatchError, match=r"trained on `pooler_output`.*`hidden_states.2.cls`"):
        SAEFTTrainer(model=model, args=args(tmp_path), sae=sae, train_dataset=pixel_dataset())


def test_unreadable_sae_directories_are_refused(tmp_path):
    sae = small_sae(16, "image_embeds")
    sae.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for bad, message in (
        ([config], "must be a JSON object"),
        ({**config, "d_in": "16"}, "d_in must be a positive int"),
        ({k: v for k, v in config.items() if k != "d_sae"}, r"missing required keys \['d_sae'\]"),
        ({**config, "activation": "topk", "k": 10_000}, "needs an int k in"),
    ):
        (tmp_path / "config.json").write_text(json.dumps(bad))
        with pytest.raises(SAELoadError, match=message):
            SparseAutoencoder.from_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(SAELoadError, match="No config.json for an SAE"):
        SparseAutoencoder.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# Data through the pipeline
# ---------------------------------------------------------------------------------------------------------------------


def test_empty_or_too_small_train_set_fails_before_anything_is_built(tmp_path):
    empty = datasets.Dataset.from_dict({"image": [], "label": []})
    # A model path that does not exist: the error must come before any model is loaded.
    margs = ModelArguments(model_name_or_path=str(tmp_path / "no-model-here"))
    with pytest.raises(ValueError, match="The training set has only 0 example"):
        run_saeft(margs, args(tmp_path), train_dataset=empty, eval_dataset=None, classnames=CLASSNAMES,
                  templates=TEMPLATES)
    three = datasets.Dataset.from_dict({"image": [b"x"] * 3, "label": [0] * 3})
    with pytest.raises(ValueError, match=r"only 3 example\(s\) but at least 8"):  # drop_last: one full step of 4 x 2
        run_saeft(margs, args(tmp_path, dataloader_drop_last=True, gradient_accumulation_steps=2),
                  train_dataset=three, eval_dataset=None, classnames=CLASSNAMES, templates=TEMPLATES)
    with pytest.raises(ValueError, match="The evaluation set has only 0 example"):
        run_saeft(margs, args(tmp_path), train_dataset=three, eval_dataset=empty, classnames=CLASSNAMES,
                  templates=TEMPLATES)


def test_empty_folders_and_streams_through_the_recipe(recipe, clip_dir, tmp_path):
    empty = tmp_path / "empty"
    (empty / WNIDS[0]).mkdir(parents=True)
    with pytest.raises(ValueError, match=r"Split 'train' of .* is empty: no images were found"):
        load_image_dataset(train_dir=empty, split="train", cache_dir=str(tmp_path / "cache"))
    common = ["--model_name_or_path", str(clip_dir), "--train_dir", str(empty), "--output_dir", str(tmp_path / "o"),
              "--use_cpu", "--report_to", "none"]
    # A local folder is listed before it is streamed in shards, so an empty one fails at the listing.
    with pytest.raises(ValueError, match=r"Split 'train' of .* is empty: no images were found"):
        recipe.main([*common, "--streaming", "--max_steps", "2"])
    folder = make_image_folder(tmp_path / "train", per_class=1, names=WNIDS)
    common[3] = str(folder)
    with pytest.raises(ValueError, match="The training set has only 0 example"):
        recipe.main([*common, "--max_train_samples", "0"])


def test_corrupt_training_image_is_named_or_skipped(clip_dir, tmp_path):
    folder = make_image_folder(tmp_path / "train", per_class=3, names=WNIDS)
    good = (folder / WNIDS[2] / "1.png").read_bytes()
    (folder / WNIDS[2] / "1.png").write_bytes(good[: len(good) // 3])  # truncated mid-stream
    raw = load_image_dataset(train_dir=folder, split="train", cache_dir=str(tmp_path / "cache"))
    kwargs = dict(eval_dataset=None, classnames=CLASSNAMES, templates=TEMPLATES)
    with pytest.raises(CorruptImageError, match=rf"{WNIDS[2]}/1\.png.*skip_corrupt_images=True"):
        run_saeft(model_args(clip_dir), args(tmp_path / "strict"), train_dataset=raw, **kwargs)
    # Skip mode: the SAE's embedding pass and training both go past it (each skip is logged and counted).
    result = run_saeft(model_args(clip_dir), args(tmp_path / "skip"), train_dataset=raw, skip_corrupt_images=True,
                       **kwargs)
    assert result.trainer.state.global_step == 2
    assert (tmp_path / "skip" / "model.safetensors").is_file()


def test_classnames_file_must_match_the_label_count(recipe, tmp_path):
    features = datasets.Features({"label": datasets.ClassLabel(names=["a", "b", "c"])})
    ds = datasets.Dataset.from_dict({"label": [0, 1, 2]}, features=features)
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n")
    data_args = recipe.DataArguments(classnames_file=str(names))
    with pytest.raises(ValueError, match=r"names.txt has 2 class names but the dataset has 3 labels"):
        recipe.classnames_for(ds, data_args)
    names.write_text("cat\ndog\nfox\n\n")  # blank lines are ignored
    assert recipe.classnames_for(ds, data_args) == ["cat", "dog", "fox"]


# ---------------------------------------------------------------------------------------------------------------------
# Training arguments
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lambda_reg", "lambda_add", "lambda_remove", "mu"])
def test_negative_lambdas_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match=rf"{name} must be >= 0, got -0.5.*Use {name}=0 to switch the term off"):
        args(tmp_path, **{name: -0.5})


def test_lora_targets_that_partly_match_name_the_missing_ones(clip_dir):
    model = from_clip(str(clip_dir), CLASSNAMES, TEMPLATES, progress=False)
    with pytest.raises(ValueError, match=r"\['query'\] match no linear layer.*Available names: \[.*'q_proj'"):
        add_lora(model, target_modules=["q_proj", "query"])
    with pytest.raises(ValueError, match="target_modules is empty"):
        add_lora(model, target_modules=[])


# ---------------------------------------------------------------------------------------------------------------------
# NaN / inf in the loss
# ---------------------------------------------------------------------------------------------------------------------


class PoisonAfter(TrainerCallback):
    """From step `step + 1` on, the model's forward produces NaN (a weight is set to NaN at that step's start)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                model.vision_model.post_layernorm.weight.fill_(math.nan)


@pytest.mark.parametrize("logging_steps", [1, 100], ids=["caught-at-log", "caught-at-save"])
def test_nan_loss_stops_training_and_names_the_last_good_checkpoint(clip_dir, tmp_path, logging_steps):
    model = from_clip(str(clip_dir), CLASSNAMES, TEMPLATES, progress=False)
    with torch.no_grad():
        embeds = model.get_representation(torch.randn(32, 3, 30, 30))
    sae = train_sae(embeds, SAEConfig(d_in=16, d_sae=64, k=4, source_model=str(clip_dir)), epochs=1, batch_size=8,
                    progress=False).sae
    out = tmp_path / "run"
    trainer = SAEFTTrainer(model=model, sae=sae, train_dataset=pixel_dataset(16), callbacks=[PoisonAfter(2)],
                           args=args(out, max_steps=6, save_strategy="steps", save_steps=1,
                                     logging_steps=logging_steps))
    with pytest.raises(FloatingPointError, match=r"NaN or inf at or before step 3") as info:
        trainer.train()
    message = str(info.value)
    assert f"Last good checkpoint: {out / 'checkpoint-2'}" in message and "--resume_from_checkpoint" in message
    assert not (out / "checkpoint-3").exists()  # nothing after the NaN was saved
    kept = load_file(out / "checkpoint-2" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in kept.values())
