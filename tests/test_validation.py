"""Everything that would fail after training, or train silently wrong, fails before the first step (docs/bad_inputs.md).

Mostly the pure checks of saeft_hf.validation; a few runs through `run_saeft` and the ImageNet recipe prove the error
comes before any model, SAE embedding pass or checkpoint exists.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import ViTConfig

from helpers import CLASSNAMES, TEMPLATES, make_image_folder, make_tiny_clip, recipe_module, tiny_run_config
from saeft_hf import SAEConfig, SAEFTConfig, SparseAutoencoder
from saeft_hf.data import load_image_dataset
from saeft_hf.evaluation import EvalSetSpec
from saeft_hf.pipeline import ModelArguments, parse_args, run_saeft
from saeft_hf.sae import SAELoadError, SAEMismatchError, convert_pickle_to_safetensors
from saeft_hf.validation import (
    SAEFTConfigError,
    align_validation_classes,
    check_class_folders,
    check_clip_config,
    check_eval_sets,
    check_eval_specs,
    check_files,
    check_label_column,
    check_labels_fit_head,
    check_model_args,
    check_templates,
    check_text_embeddings,
    check_training_args,
    check_wise_ft_alphas,
    load_eval_specs_checked,
    representation_width,
    reuse_trained_sae,
)
from saeft_hf.zeroshot import from_clip

ROOT = Path(__file__).resolve().parents[1]
WNIDS = (ROOT / "saeft_hf" / "resources" / "imagenet_wnids.txt").read_text().split()[:4]
SHAPE = {"num_hidden_layers": 2, "hidden_size": 32, "projection_dim": 16}  # the tiny CLIP's


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture(scope="module")
def recipe():
    with recipe_module("imagenet", "imagenet_recipe_validation") as module:
        yield module


def args(tmp_path, **kw) -> SAEFTConfig:
    return tiny_run_config(tmp_path, **{'max_steps': 1, **kw})


def model_args(clip_dir, **kw) -> ModelArguments:
    base = dict(model_name_or_path=str(clip_dir), sae_epochs=1, sae_batch_size=8, sae_k=4, embedding_batch_size=8)
    return ModelArguments(**{**base, **kw})


def folder_dataset(tmp_path, name="train", **kw) -> datasets.Dataset:
    root = make_image_folder(tmp_path / name, per_class=2, names=kw.pop("names", WNIDS), **kw)
    return load_image_dataset(train_dir=root, split="train", cache_dir=str(tmp_path / f"cache-{name}"))


def files_under(path: Path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()) if path.exists() else []


# ---------------------------------------------------------------------------------------------------------------------
# Training arguments
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("name", ["lambda_reg", "lambda_add", "lambda_remove", "mu"])
def test_nan_and_inf_loss_weights_are_refused(tmp_path, name, value):
    with pytest.raises(SAEFTConfigError, match=rf"{name} must be a finite number >= 0, got {value}.*silently"):
        args(tmp_path, **{name: value})


def test_runs_that_train_no_step_are_refused(tmp_path):
    with pytest.raises(SAEFTConfigError, match="max_steps=0 trains no step: the untouched model"):
        check_training_args(args(tmp_path, max_steps=0))
    for epochs in (0, -1):
        with pytest.raises(SAEFTConfigError, match=rf"num_train_epochs={epochs} trains no step"):
            check_training_args(args(tmp_path, max_steps=-1, num_train_epochs=epochs))
    check_training_args(args(tmp_path, max_steps=-1, num_train_epochs=0.5))  # a fraction of an epoch is fine


@pytest.mark.parametrize("lr", [math.nan, math.inf, 0.0, -1e-5])
def test_learning_rates_that_cannot_train_are_refused(tmp_path, lr):
    with pytest.raises(SAEFTConfigError, match="learning_rate must be a finite number > 0"):
        check_training_args(args(tmp_path, learning_rate=lr))


def test_batch_sizes_and_accumulation_must_be_positive(tmp_path):
    cfg = args(tmp_path)
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        bad = args(tmp_path)
        setattr(bad, name, 0)  # TrainingArguments itself does not refuse 0
        with pytest.raises(SAEFTConfigError, match=rf"{name} must be an integer >= 1, got 0"):
            check_training_args(bad)
    check_training_args(cfg)


def test_a_string_lora_target_is_refused_and_yaml_lists_it(tmp_path, recipe):
    with pytest.raises(SAEFTConfigError, match=r"lora_target_modules must be a list.*letter by letter"):
        check_training_args(args(tmp_path, use_lora=True, lora_target_modules="q_proj"))
    config = tmp_path / "c.yaml"
    config.write_text("lora_target_modules: q_proj\nwise_ft_alphas: 0.5\n")
    _, data_args, training_args = parse_args((ModelArguments, recipe.DataArguments, SAEFTConfig),
                                             ["--config", str(config), "--output_dir", str(tmp_path)])
    assert training_args.lora_target_modules == ["q_proj"]
    assert data_args.wise_ft_alphas == [0.5]


def test_a_stream_needs_max_steps(tmp_path):
    with pytest.raises(SAEFTConfigError, match="streaming training set has no length.*--max_steps"):
        check_training_args(args(tmp_path, max_steps=-1), streaming=True)


@pytest.mark.parametrize("field,value,message", [
    ("sae_k", 0, "sae_k must be an integer >= 1"),
    ("sae_epochs", 0, "sae_epochs must be an integer >= 1"),
    ("sae_max_samples", 0, "sae_max_samples must be None or an integer >= 1"),
    ("sae_lr", math.nan, "sae_lr must be a finite number > 0"),
    ("sae_activation", "jumprelu", "Unknown sae_activation 'jumprelu'"),
    ("representation", "hidden_states.last", "Unknown representation 'hidden_states.last'"),
])
def test_new_sae_settings_are_checked_before_the_embedding_pass(clip_dir, field, value, message):
    with pytest.raises(SAEFTConfigError, match=message):
        check_model_args(model_args(clip_dir, **{field: value}))


def test_a_representation_deeper_than_the_tower_is_refused():
    assert representation_width("hidden_states.2.cls", SHAPE) == 32
    assert representation_width("hidden_states.-1.mean", SHAPE) == 32
    assert representation_width("image_embeds", SHAPE) == 16
    with pytest.raises(SAEFTConfigError, match=r"reads hidden state 99, but the vision tower has 2 layers.*0\.\.2"):
        representation_width("hidden_states.99.cls", SHAPE)
    with pytest.raises(SAEFTConfigError, match="hidden state -4"):
        representation_width("hidden_states.-4.cls", SHAPE)


def test_wise_ft_alphas_must_be_a_list_of_finite_numbers():
    assert check_wise_ft_alphas([0, 0.5, 1]) == [0.0, 0.5, 1.0]
    assert check_wise_ft_alphas(None) is None
    for bad in (0.5, "0.5", {"a": 1}):
        with pytest.raises(SAEFTConfigError, match="wise_ft_alphas must be a list of numbers"):
            check_wise_ft_alphas(bad)
    for bad in ([0.5, math.nan], [math.inf], [True]):
        with pytest.raises(SAEFTConfigError, match="wise_ft_alphas must be finite numbers"):
            check_wise_ft_alphas(bad)


def test_wise_ft_needs_eval_sets_and_the_id_set():
    ds = datasets.Dataset.from_dict({"label": [0, 1]})
    with pytest.raises(SAEFTConfigError, match="wise_ft_alphas needs evaluation sets"):
        check_eval_sets({}, 4, id_name="validation", wise_ft_alphas=[0.5])
    with pytest.raises(SAEFTConfigError, match=r"picks its alpha on the ID set 'validation'.*\['other'\]"):
        check_eval_sets({"other": (ds, None)}, 4, id_name="validation", wise_ft_alphas=[0.5])


# ---------------------------------------------------------------------------------------------------------------------
# YAML configuration files
# ---------------------------------------------------------------------------------------------------------------------


def parse_yaml(recipe, tmp_path, text: str):
    config = tmp_path / "config.yaml"
    config.write_text(text)
    return parse_args((ModelArguments, recipe.DataArguments, SAEFTConfig),
                      ["--config", str(config), "--output_dir", str(tmp_path)])


@pytest.mark.parametrize("text,shown", [("- learning_rate: 1e-5\n", r"\[\{'learning_rate'"), ("sae_ft\n", "'sae_ft'"),
                                        ("3\n", "3")])
def test_a_yaml_config_that_is_not_a_mapping_is_refused(recipe, tmp_path, text, shown):
    with pytest.raises(SAEFTConfigError, match=rf"must be a YAML mapping of option: value.*holds {shown}"):
        parse_yaml(recipe, tmp_path, text)


def test_yaml_string_numbers_are_converted_and_wrong_types_named(recipe, tmp_path):
    # PyYAML reads `1e-5` (no dot) as a string.
    margs, _, targs = parse_yaml(recipe, tmp_path, "learning_rate: 1e-5\nlambda_reg: '35'\nsae_k: '8'\nuse_lora: 'false'\n")
    assert targs.learning_rate == 1e-5 and targs.lambda_reg == 35.0 and margs.sae_k == 8 and targs.use_lora is False
    for text, message in (
        ("learning_rate: fast\n", r"`learning_rate: 'fast'` is not a number. Write e.g. `learning_rate: 1.0e-5`"),
        ("sae_k: 2.5\n", r"`sae_k: 2.5` is not an integer"),
        ("use_lora: maybe\n", r"`use_lora: 'maybe'` is not a boolean"),
        ("regularizer: sae\n", r"`regularizer: 'sae'` is not one of \['sae_ft'"),
        ("learning_rate: [1, 2]\n", "`learning_rate` takes one float value"),
    ):
        with pytest.raises(SAEFTConfigError, match=message):
            parse_yaml(recipe, tmp_path, text)


def test_unknown_yaml_keys_are_refused(recipe, tmp_path):
    with pytest.raises(SAEFTConfigError, match=r"Unknown keys in .*config.yaml: \['lerning_rate'\]. Run the recipe with --help"):
        parse_yaml(recipe, tmp_path, "lerning_rate: 1.0e-5\n")


def test_a_missing_or_broken_yaml_file_is_named(recipe, tmp_path):
    with pytest.raises(SAEFTConfigError, match="--config .*nope.yaml: no such file"):
        parse_args((ModelArguments, recipe.DataArguments, SAEFTConfig), ["--config", str(tmp_path / "nope.yaml")])
    with pytest.raises(SAEFTConfigError, match="is not valid YAML"):
        parse_yaml(recipe, tmp_path, "learning_rate: [1e-5\n")


# ---------------------------------------------------------------------------------------------------------------------
# Image folders and labels
# ---------------------------------------------------------------------------------------------------------------------


def test_a_flat_folder_is_refused(tmp_path):
    make_image_folder(tmp_path / "tmp", per_class=2, names=["a"])
    flat = tmp_path / "flat"
    shutil.move(tmp_path / "tmp" / "a", flat)  # images directly under the root
    with pytest.raises(SAEFTConfigError, match=r"2 image\(s\) directly in it.*root/<class>/<image>"):
        check_class_folders(flat)


def test_class_folders_with_an_images_subfolder_are_refused(tmp_path):
    root = tmp_path / "nested"
    for name in ("cat", "dog"):
        make_image_folder(root / name, per_class=1, names=["images"])  # root/cat/images/0.png
    with pytest.raises(SAEFTConfigError, match=r"sub-folders \(e.g. 'cat/images'\).*innermost folder \(here 'images'\)"):
        check_class_folders(root, "train_dir")


def test_a_single_class_is_refused(tmp_path, recipe, clip_dir):
    root = make_image_folder(tmp_path / "one", per_class=2, names=["cat"])
    with pytest.raises(SAEFTConfigError, match=r"images in 1 class folder \['cat'\].*at least two classes"):
        check_class_folders(root)
    assert check_class_folders(make_image_folder(tmp_path / "two", per_class=1, names=["a", "b"])) == ["a", "b"]
    # Through the recipe, before any data is loaded or model built.
    with pytest.raises(SAEFTConfigError, match="at least two classes"):
        recipe.main(["--model_name_or_path", str(clip_dir), "--train_dir", str(root), "--output_dir",
                     str(tmp_path / "o"), "--use_cpu", "--report_to", "none", "--max_steps", "1"])
    assert files_under(tmp_path / "o") == []


def test_validation_classes_must_be_the_training_classes(tmp_path):
    train = folder_dataset(tmp_path, "train", names=["cat", "dog", "fox"])
    other = folder_dataset(tmp_path, "val", names=["cat", "cow", "dog"])
    with pytest.raises(SAEFTConfigError, match=r"only in validation \['cow'\], only in training \['fox'\]"):
        align_validation_classes(train, other)
    # A subset of the classes: relabelled by name, so "fox" keeps training's id 2 (it would be 1 by position).
    subset = folder_dataset(tmp_path, "val2", names=["cat", "fox"])
    aligned = align_validation_classes(train, subset)
    assert sorted(set(aligned["label"])) == [0, 2]
    assert align_validation_classes(train, train) is train


def test_unaligned_validation_is_refused_by_run_saeft(tmp_path, clip_dir):
    train = folder_dataset(tmp_path, "train", names=["cat", "dog", "fox"])
    subset = folder_dataset(tmp_path, "val", names=["cat", "fox"])
    with pytest.raises(SAEFTConfigError, match="Relabel it by name first.*align_validation_classes"):
        run_saeft(model_args(clip_dir), args(tmp_path / "o"), train_dataset=train, eval_dataset=subset,
                  classnames=["cat", "dog", "fox"], templates=TEMPLATES)
    assert files_under(tmp_path / "o") == []


def test_numeric_folders_and_unnamed_int_labels_need_class_names(tmp_path, recipe):
    digits = folder_dataset(tmp_path, "digits", names=["0", "1", "2"])  # MNIST-style: relabelled to ints 0..2
    with pytest.raises(SAEFTConfigError, match=r"plain integers without class names \(3 distinct labels \(0\.\.2\)\)"
                                               r".*--classnames_file"):
        recipe.classnames_for(digits, recipe.DataArguments())
    parquet_like = datasets.Dataset.from_dict({"image": [b"x"] * 4, "label": [0, 1, 1, 3]})
    with pytest.raises(SAEFTConfigError, match="--classnames_file"):
        recipe.classnames_for(parquet_like, recipe.DataArguments())
    # ImageNet's own 0..999 labels keep the ImageNet names.
    imagenet = datasets.Dataset.from_dict({"label": list(range(1000))})
    names = recipe.classnames_for(imagenet, recipe.DataArguments())
    assert len(names) == 1000 and names[1] == "goldfish"
    names_file = tmp_path / "digits.txt"
    names_file.write_text("zero\none\ntwo\n")
    assert recipe.classnames_for(digits, recipe.DataArguments(classnames_file=str(names_file))) == ["zero", "one", "two"]
    # Integer labels (webdataset shards' .cls) beside a class-folder validation set: its names, in label order
    # (wnids -> curated ImageNet names); without such a validation set, still --classnames_file.
    shards = datasets.Dataset.from_dict({"label": [0, 1, 2]}).to_iterable_dataset()
    val = folder_dataset(tmp_path, "val-wnids", names=["n01443537", "n02123045", "n02119022"])
    assert recipe.classnames_for(shards, recipe.DataArguments(), val) == ["goldfish", "red fox", "tabby cat"]
    with pytest.raises(SAEFTConfigError, match="--classnames_file"):
        recipe.classnames_for(shards, recipe.DataArguments(), None)


@pytest.mark.parametrize("labels,message", [
    ([0.0, 1.7], "labels are float64; they must be integer class ids"),
    (["cat", "dog"], r"labels are strings.*class_encode_column\('label'\)"),
    ([0, -1], "has label -1 \\(< 0\\): negative labels usually mark unlabelled images"),
])
def test_labels_must_be_integer_class_ids(labels, message):
    with pytest.raises(SAEFTConfigError, match=message):
        check_label_column(datasets.Dataset.from_dict({"label": labels}), "The training set")


def test_labels_beyond_the_head_fail_before_training(tmp_path, clip_dir):
    ds = datasets.Dataset.from_dict({"label": [0, 1, 5]})
    with pytest.raises(SAEFTConfigError, match=r"has label 5 but the head has 4 classes \(labels 0\.\.3\)"):
        check_labels_fit_head(ds, 4, "The training set")
    train = folder_dataset(tmp_path)
    bad_val = datasets.Dataset.from_dict({"image": train[:2]["image"], "label": [0, 7]})
    start = time.monotonic()
    with pytest.raises(SAEFTConfigError, match="The evaluation set has label 7"):
        run_saeft(model_args(clip_dir), args(tmp_path / "o"), train_dataset=train, eval_dataset=bad_val,
                  classnames=CLASSNAMES, templates=TEMPLATES)
    assert time.monotonic() - start < 10 and files_under(tmp_path / "o") == []


def test_one_class_name_or_bad_templates_are_refused(tmp_path, clip_dir):
    train = folder_dataset(tmp_path)
    with pytest.raises(SAEFTConfigError, match=r"The head would have 1 class\(es\)"):
        run_saeft(model_args(clip_dir), args(tmp_path / "o"), train_dataset=train, eval_dataset=None,
                  classnames=["cat"], templates=TEMPLATES)
    with pytest.raises(SAEFTConfigError, match="needs a '\\{\\}' placeholder"):
        check_templates(["a photo of a cat"])
    with pytest.raises(SAEFTConfigError, match="No prompt templates"):
        check_templates([])


def test_missing_side_files_are_named_before_anything_loads(tmp_path):
    with pytest.raises(SAEFTConfigError, match=r"classnames_file='.*names.txt' is not found"):
        check_files(classnames_file=str(tmp_path / "names.txt"))
    with pytest.raises(SAEFTConfigError, match="eval_sets_config=.* is a directory, not a file"):
        check_files(eval_sets_config=str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation-set specs
# ---------------------------------------------------------------------------------------------------------------------


def eval_config(tmp_path, **fields) -> Path:
    path = tmp_path / "eval_sets.yaml"
    entry = {"name": "shift", "data_dir": str(tmp_path / "data"), **fields}
    path.write_text(json.dumps({"eval_sets": [entry]}))  # JSON is YAML
    return path


@pytest.mark.parametrize("fields,message", [
    ({"kind": "subset", "class_indices": [1.5, 2.7]}, r"class_indices must hold integer class indices, got \[1.5, 2.7\]"),
    ({"kind": "subset", "class_indices": [-1, 2]}, r"class_indices holds negative class indices \[-1\]"),
    ({"kind": "grouped", "class_groups": [[0], [-1]]}, r"class_groups\[1\] holds negative class indices \[-1\]"),
    ({"kind": "grouped", "class_groups": [[0], []]}, r"class_groups\[1\] is \[\]; every group must be a non-empty"),
    ({"kind": "subset", "class_indices": [0, 7]}, r"reads class indices \[7\] but the head has 4 classes"),
    ({"kind": "subset", "class_indices": "imagenet_r"}, r"head has 4 classes.*need a 1000-class ImageNet head"),
    ({"kind": "grouped", "class_groups": [[0, 9]]}, r"reads class indices \[9\]"),
])
def test_eval_specs_are_checked_against_the_head(tmp_path, fields, message):
    with pytest.raises(SAEFTConfigError, match=message):
        load_eval_specs_checked(eval_config(tmp_path, **fields), num_labels=4)


def test_an_eval_set_without_a_name_is_refused(tmp_path):
    path = tmp_path / "eval_sets.yaml"
    path.write_text("eval_sets:\n  - data_dir: /data/v2\n")
    with pytest.raises(SAEFTConfigError, match=r"eval set #0 .* has no name: give each set a `name:`"):
        load_eval_specs_checked(path, num_labels=4)
    with pytest.raises(SAEFTConfigError, match="no such file"):
        load_eval_specs_checked(tmp_path / "missing.yaml", num_labels=4)


def test_eval_sets_given_to_run_saeft_are_checked_before_anything_is_built(tmp_path, clip_dir):
    train = folder_dataset(tmp_path)
    spec = EvalSetSpec(name="sub", data_dir="/nowhere", kind="subset", class_indices="imagenet_a")
    start = time.monotonic()
    with pytest.raises(SAEFTConfigError, match="Eval set 'sub' \\(subset\\) reads class indices"):
        run_saeft(model_args(clip_dir), args(tmp_path / "o"), train_dataset=train, eval_dataset=None,
                  classnames=CLASSNAMES, templates=TEMPLATES, eval_sets={"sub": (train, spec)})
    with pytest.raises(SAEFTConfigError, match="Eval set key 'other' differs from its spec's name 'sub'"):
        check_eval_sets({"other": (train, EvalSetSpec(name="sub", data_dir="/x"))}, 4, id_name="x",
                        wise_ft_alphas=None)
    assert time.monotonic() - start < 10 and files_under(tmp_path / "o") == []
    check_eval_specs([EvalSetSpec(name="ok", data_dir="/x", kind="subset", class_indices=[0, 3])], 4)


def test_bad_wise_ft_alphas_fail_in_the_recipe_before_any_data_is_read(recipe, clip_dir, tmp_path):
    common = ["--model_name_or_path", str(clip_dir), "--train_dir", str(tmp_path / "none"),
              "--output_dir", str(tmp_path / "o"), "--use_cpu", "--report_to", "none", "--max_steps", "1"]
    with pytest.raises(SAEFTConfigError, match=r"wise_ft_alphas must be finite numbers.*\[nan\]"):
        recipe.main([*common, "--wise_ft_alphas", "0.5", "nan"])
    with pytest.raises(SAEFTConfigError, match="lambda_reg must be a finite number"):
        recipe.main([*common, "--lambda_reg", "nan"])
    with pytest.raises(SAEFTConfigError, match="num_train_epochs=0.0 trains no step"):
        recipe.main([*common[:-2], "--num_train_epochs", "0"])
    assert files_under(tmp_path / "o") == []


def test_a_bad_eval_set_fails_in_the_recipe_before_training(recipe, clip_dir, tmp_path):
    folder = make_image_folder(tmp_path / "train", per_class=2, names=WNIDS)
    config = eval_config(tmp_path, kind="grouped", class_groups=[[0, 1], [-1]])
    start = time.monotonic()
    with pytest.raises(SAEFTConfigError, match="negative class indices"):
        recipe.main(["--model_name_or_path", str(clip_dir), "--train_dir", str(folder), "--output_dir",
                     str(tmp_path / "o"), "--use_cpu", "--report_to", "none", "--max_steps", "1",
                     "--eval_sets_config", str(config)])
    assert time.monotonic() - start < 20
    assert files_under(tmp_path / "o") == []  # no SAE embeddings, no SAE, no checkpoint


# ---------------------------------------------------------------------------------------------------------------------
# The model and its tokenizer
# ---------------------------------------------------------------------------------------------------------------------


def test_a_clip_checkpoint_without_tokenizer_files_is_refused(clip_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        shutil.copy(clip_dir / name, bare / name)
    with pytest.raises(SAEFTConfigError, match="only unknown tokens to every class name.*Save the tokenizer files"):
        from_clip(str(bare), CLASSNAMES, TEMPLATES, progress=False)
    same = torch.ones(3, 4)
    with pytest.raises(SAEFTConfigError, match="Every class got the same zero-shot text embedding"):
        check_text_embeddings(same, ["a", "b", "c"], "x")
    with pytest.raises(SAEFTConfigError, match="hold NaN/inf"):
        check_text_embeddings(torch.full((2, 4), math.nan), ["a", "b"], "x")
    check_text_embeddings(torch.eye(3), ["a", "b", "c"], "x")


def test_a_non_clip_or_missing_model_is_refused_before_building(tmp_path):
    with pytest.raises(SAEFTConfigError, match="is a 'vit' checkpoint, not CLIP"):
        check_clip_config(ViTConfig(), "'google/vit'")
    train = datasets.Dataset.from_dict({"image": [b"x"] * 2, "label": [0, 1]})
    with pytest.raises(SAEFTConfigError, match="Could not read the model config of .*no-model.*Pass a CLIP checkpoint"):
        run_saeft(ModelArguments(model_name_or_path=str(tmp_path / "no-model")), args(tmp_path / "o"),
                  train_dataset=train, eval_dataset=None, classnames=CLASSNAMES, templates=TEMPLATES)


def test_a_missing_layer_fails_in_run_saeft_before_building(tmp_path, clip_dir):
    train = folder_dataset(tmp_path)
    with pytest.raises(SAEFTConfigError, match="reads hidden state 99, but the vision tower has 2 layers"):
        run_saeft(model_args(clip_dir, representation="hidden_states.99.cls"), args(tmp_path / "o"),
                  train_dataset=train, eval_dataset=None, classnames=CLASSNAMES, templates=TEMPLATES)
    assert files_under(tmp_path / "o") == []


def test_cached_reference_on_a_stream_without_z0_fails_before_the_sae(tmp_path, clip_dir):
    root = make_image_folder(tmp_path / "train", per_class=2, names=WNIDS)
    stream = load_image_dataset(train_dir=root, split="train", streaming=True)
    with pytest.raises(SAEFTConfigError, match="reference_mode='cached' with a streaming training set"):
        run_saeft(model_args(clip_dir), args(tmp_path / "o", reference_mode="cached"), train_dataset=stream,
                  eval_dataset=None, classnames=CLASSNAMES, templates=TEMPLATES)
    assert files_under(tmp_path / "o") == []


# ---------------------------------------------------------------------------------------------------------------------
# The SAE
# ---------------------------------------------------------------------------------------------------------------------


def saved_sae(path: Path, d_in: int = 16, **kw) -> Path:
    SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=4 * d_in, k=4, **kw)).save_pretrained(path)
    return path


def test_sae_paths_that_are_not_an_sae_folder_are_named(tmp_path):
    sae_dir = saved_sae(tmp_path / "sae")
    for typo in (tmp_path / "sea", "./sea", "../runs/x/sae"):
        with pytest.raises(SAELoadError, match=r"No SAE at `.*`: no such folder. Give the folder written by"):
            SparseAutoencoder.from_pretrained(typo)
    with pytest.raises(SAELoadError, match=rf"is a file; an SAE is loaded from the folder .*pass `{sae_dir}`"):
        SparseAutoencoder.from_pretrained(sae_dir / "model.safetensors")
    with pytest.raises(SAELoadError, match="not in the local cache and cannot be downloaded"):  # tests run offline
        SparseAutoencoder.from_pretrained("someone/no-such-sae")


def test_the_pickle_converter_named_in_the_refusal_works(tmp_path):
    sae_dir = saved_sae(tmp_path / "sae")
    state = load_file(sae_dir / "model.safetensors")
    (sae_dir / "model.safetensors").unlink()
    torch.save(state, sae_dir / "sae.pt")
    with pytest.raises(SAELoadError, match=r"convert_pickle_to_safetensors\('(.*)'\)") as info:
        SparseAutoencoder.from_pretrained(sae_dir)
    call = re.search(r"`saeft_hf.sae.(convert_pickle_to_safetensors\('[^']*'\))`", str(info.value)).group(1)
    eval(call, {"convert_pickle_to_safetensors": convert_pickle_to_safetensors})  # the call exactly as recommended
    loaded = SparseAutoencoder.from_pretrained(sae_dir)
    assert torch.equal(loaded.W_enc, state["W_enc"])


@pytest.mark.parametrize("field,value,message", [
    ("training_metrics", [0.1, 0.2], "training_metrics must be a JSON object"),
    ("provenance", "run-1", "provenance must be a JSON object"),
    ("source_model", 7, "source_model must be a string or null"),
    ("representation", "layer4", "Unknown representation 'layer4'"),
    ("l1_coefficient", "high", "l1_coefficient must be a finite number"),
])
def test_sae_config_types_are_checked_on_load(tmp_path, field, value, message):
    sae_dir = saved_sae(tmp_path / "sae")
    config = json.loads((sae_dir / "config.json").read_text())
    (sae_dir / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(SAELoadError, match=message):
        SparseAutoencoder.from_pretrained(sae_dir)


@pytest.mark.parametrize("tensor,fill,message", [
    ("W_enc", 0.0, "W_enc is all zeros"), ("W_dec", 0.0, "W_dec is all zeros"),
    ("b_dec", math.nan, r"b_dec has 16 NaN/inf value\(s\)"), ("W_enc", math.inf, "W_enc has 1024 NaN/inf"),
])
def test_degenerate_or_non_finite_sae_weights_are_refused(tmp_path, tensor, fill, message):
    sae_dir = saved_sae(tmp_path / "sae")
    state = load_file(sae_dir / "model.safetensors")
    state[tensor] = torch.full_like(state[tensor], fill)
    save_file(state, sae_dir / "model.safetensors")
    with pytest.raises(SAELoadError, match=rf"is unusable: .*{message}.*Retrain the SAE"):
        SparseAutoencoder.from_pretrained(sae_dir)


def test_an_empty_weights_file_is_refused(tmp_path):
    sae_dir = saved_sae(tmp_path / "sae")
    (sae_dir / "model.safetensors").write_bytes(b"")
    with pytest.raises(SAELoadError, match="Could not read SAE weights .*The file is corrupted"):
        SparseAutoencoder.from_pretrained(sae_dir)


def test_a_given_sae_that_does_not_fit_fails_before_the_model_is_built(tmp_path, clip_dir):
    train = folder_dataset(tmp_path)
    wide = saved_sae(tmp_path / "wide", d_in=8)
    start = time.monotonic()
    with pytest.raises(SAEMismatchError, match="SAE width mismatch: the SAE has d_in=8 but .* has width 16"):
        run_saeft(model_args(clip_dir), args(tmp_path / "o", sae_name_or_path=str(wide)), train_dataset=train,
                  eval_dataset=None, classnames=CLASSNAMES, templates=TEMPLATES)
    other_rep = saved_sae(tmp_path / "rep", d_in=32, representation="pooler_output")
    with pytest.raises(SAEMismatchError, match="trained on `pooler_output` but is being applied to `hidden_states.2.cls`"):
        run_saeft(model_args(clip_dir, representation="hidden_states.2.cls"),
                  args(tmp_path / "o", sae_name_or_path=str(other_rep)), train_dataset=train, eval_dataset=None,
                  classnames=CLASSNAMES, templates=TEMPLATES)
    zero = SparseAutoencoder(SAEConfig(d_in=16, d_sae=64, k=4))
    with torch.no_grad():
        zero.W_dec.zero_()
    with pytest.raises(SAEFTConfigError, match="W_dec is all zeros"):  # an SAE object given to the API
        run_saeft(model_args(clip_dir), args(tmp_path / "o"), sae=zero, train_dataset=train, eval_dataset=None,
                  classnames=CLASSNAMES, templates=TEMPLATES)
    assert time.monotonic() - start < 15 and files_under(tmp_path / "o") == []


def test_reusing_a_runs_own_sae_is_keyed_on_settings_and_images(caplog):
    key = {"k": 32, "data": "abc"}
    assert reuse_trained_sae(key, dict(key), "out/sae", resuming=False)
    with caplog.at_level(logging.WARNING, logger="saeft_hf.validation"):
        assert not reuse_trained_sae(key, {"k": 16, "data": "abc"}, "out/sae", resuming=False)
    assert "k: 32 -> 16" in caplog.text and "training a new SAE" in caplog.text
    with pytest.raises(SAEFTConfigError, match=r"other settings or images than this run's \(data: 'abc' -> 'xyz'\)"
                                               r".*A resumed run must keep the SAE"):
        reuse_trained_sae(key, {"k": 32, "data": "xyz"}, "out/sae", resuming=True)
    assert reuse_trained_sae({}, key, "out/sae", resuming=False)  # saved before keys existed: reused, with a warning
    assert reuse_trained_sae(key, {"k": 32, "data": None}, "out/sae", resuming=True)  # a stream: settings only


def test_a_rerun_with_other_sae_settings_or_images_trains_a_new_sae(tmp_path, clip_dir):
    out = tmp_path / "run"
    train = folder_dataset(tmp_path)
    kwargs = dict(eval_dataset=None, classnames=CLASSNAMES, templates=TEMPLATES)

    def rerun(margs, ds):
        # The same output_dir holding the earlier run's SAE (and its embedding cache), nothing else.
        for path in out.iterdir():
            if path.name not in ("sae", "sae_embeddings.safetensors"):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        return run_saeft(margs, args(out), train_dataset=ds, **kwargs).sae

    first = run_saeft(model_args(clip_dir), args(out), train_dataset=train, **kwargs).sae
    assert first.config.provenance["k"] == 4 and first.config.provenance["data"] == train._fingerprint
    same = rerun(model_args(clip_dir), train)
    assert torch.equal(same.W_enc, first.W_enc)  # same settings and images: reused
    other_k = rerun(model_args(clip_dir, sae_k=2), train)
    assert other_k.config.k == 2 and SparseAutoencoder.from_pretrained(out / "sae").config.k == 2
    fewer = train.select(range(4))  # other images
    again = rerun(model_args(clip_dir, sae_k=2), fewer)
    assert again.config.provenance["data"] == fewer._fingerprint != train._fingerprint
    assert SparseAutoencoder.from_pretrained(out / "sae").config.provenance["data"] == fewer._fingerprint
