"""Loading and naming after training: a validation split reads only its own files, adapters open with PEFT's own
loaders, ImageNet label strings become the curated class names, missing backends say how to install them, and the
card names every default eval set."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import CLASSNAMES, TEMPLATES, make_tiny_clip  # noqa: E402
from saeft_hf.data import load_image_dataset  # noqa: E402


# ------------------------------------------------------------------------------------------------------------------
# A split loads only its own files
# ------------------------------------------------------------------------------------------------------------------


def write_shard(path: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            buf = io.BytesIO()
            PIL.Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)).save(buf, format="PNG")
            for ext, payload in (("png", buf.getvalue()), ("cls", str(i % 2).encode())):
                info = tarfile.TarInfo(f"s{seed}-{i:04d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


@pytest.fixture
def wds_repo(tmp_path: Path) -> Path:
    """A webdataset 'repo' laid out like timm/imagenet-1k-wds: train/ and validation/ shards. The train shard is
    not a tar at all: reading it, as preparing the train split would, fails."""
    root = tmp_path / "repo"
    write_shard(root / "validation" / "imagenet1k-validation-0000.tar", 5, seed=1)
    (root / "train").mkdir(parents=True)
    (root / "train" / "imagenet1k-train-0000.tar").write_bytes(b"not a tar: the train split must not be read" * 50)
    # A dataset card declaring the features, class names included (as Hub repos do).
    (root / "README.md").write_text(
        "---\ndataset_info:\n  features:\n  - name: __key__\n    dtype: string\n  - name: __url__\n"
        "    dtype: string\n  - name: cls\n    dtype:\n      class_label:\n        names:\n          '0': cat\n"
        "          '1': dog\n  - name: png\n    dtype: image\n---\n")
    return root


def test_validation_split_of_a_repo_reads_only_its_files(wds_repo: Path, tmp_path: Path) -> None:
    ds = load_image_dataset(dataset_name=str(wds_repo), split="validation", cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 5 and {"image", "label"} <= set(ds.column_names)
    assert ds["label"] == [0, 1, 0, 1, 0]
    assert ds.features["label"].names == ["cat", "dog"]  # the card's features survive the per-split data_files


def test_validation_split_of_data_files_reads_only_its_files(wds_repo: Path, tmp_path: Path) -> None:
    files = {"train": str(wds_repo / "train" / "*.tar"), "validation": str(wds_repo / "validation" / "*.tar")}
    ds = load_image_dataset(dataset_name="webdataset", data_files=files, split="validation[:3]",
                            cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 3
    with pytest.raises(Exception):  # the train split itself is still read when asked for (and is broken here)
        load_image_dataset(dataset_name="webdataset", data_files=files, split="train",
                           cache_dir=str(tmp_path / "cache2"))


# ------------------------------------------------------------------------------------------------------------------
# Adapters open with PEFT's own loaders
# ------------------------------------------------------------------------------------------------------------------


def test_lora_adapter_records_its_base_and_opens_with_peft(tmp_path: Path) -> None:
    import json

    from peft import AutoPeftModel, PeftConfig, PeftModel

    from saeft_hf.lora import add_lora, load_classifier, save_base_config
    from saeft_hf.modeling import SAEFTCLIPForImageClassification
    from saeft_hf.zeroshot import from_clip

    clip = make_tiny_clip(tmp_path / "clip")
    model = add_lora(from_clip(str(clip), CLASSNAMES, TEMPLATES, progress=False), r=4, alpha=8)
    torch.manual_seed(0)
    with torch.no_grad():  # a "trained" adapter and head: non-zero LoRA B, a changed head
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(0.1 * torch.randn_like(param))
    run = tmp_path / "run"
    model.save_pretrained(run)
    save_base_config(model, str(run))
    assert json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"] == str(clip)

    pixels = torch.randn(2, 3, 30, 30)
    model.eval()
    expected = model(pixel_values=pixels).logits
    with model.disable_adapter():  # sanity: the adapter changes the output
        assert not torch.allclose(expected, model(pixel_values=pixels).logits, atol=1e-3)

    base = SAEFTCLIPForImageClassification.from_pretrained(PeftConfig.from_pretrained(str(run)).base_model_name_or_path,
                                                           num_labels=len(CLASSNAMES))
    loaded = [PeftModel.from_pretrained(base, str(run)),
              AutoPeftModel.from_pretrained(str(run), num_labels=len(CLASSNAMES),
                                            import_allowlist=["transformers", "peft", "saeft_hf"]),
              load_classifier(str(run))]
    for other in loaded:
        other.eval()
        # The same weights and ops: equal up to float reassociation in the loaders' module layout.
        torch.testing.assert_close(other(pixel_values=pixels).logits, expected, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# ImageNet label strings become the curated class names
# ------------------------------------------------------------------------------------------------------------------

# The first ten labels of ILSVRC/imagenet-1k (WordNet synset strings, in class-index order).
ILSVRC_HEAD = [
    "tench, Tinca tinca", "goldfish, Carassius auratus",
    "great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias",
    "tiger shark, Galeocerdo cuvieri", "hammerhead, hammerhead shark", "electric ray, crampfish, numbfish, torpedo",
    "stingray", "cock", "hen", "ostrich, Struthio camelus",
]


def synset_like(curated: list[str], rng: np.random.Generator) -> list[str]:
    """Synset-style strings: the real first ten, then for each class its curated name among other lemmas, except
    for a third of the classes whose synset string does not contain the curated name (like "cock" for "rooster")."""
    out = list(ILSVRC_HEAD)
    for i, name in enumerate(curated[len(ILSVRC_HEAD):], start=len(ILSVRC_HEAD)):
        if rng.random() < 1 / 3:
            out.append(f"synset {i}, Genus species{i}")
        else:
            out.append(f"{name}, Genus species{i}" if rng.random() < 0.5 else f"other name {i}, {name}")
    return out


def recipe_module():
    import importlib.util
    import sys

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("imagenet_recipe_names", root / "recipes" / "imagenet.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_imagenet_synset_strings_map_to_the_curated_names() -> None:
    import datasets

    from saeft_hf.imagenet_classes import curated_imagenet_classnames, imagenet_classnames, imagenet_wnids

    curated = imagenet_classnames()
    synsets = synset_like(curated, np.random.default_rng(0))
    assert curated_imagenet_classnames(synsets) == curated
    assert curated_imagenet_classnames(curated) == curated
    wnids = imagenet_wnids()
    assert curated_imagenet_classnames([wnids[5], wnids[0]]) == [curated[5], curated[0]]  # a wnid subset, its order
    # Not ImageNet: another 1000-class list, or ImageNet's names shifted by one position (wrong label order).
    assert curated_imagenet_classnames([f"class {i}, thing" for i in range(1000)]) is None
    assert curated_imagenet_classnames(synsets[1:] + synsets[:1]) is None
    assert curated_imagenet_classnames(["tench, Tinca tinca"]) is None

    recipe = recipe_module()
    features = datasets.Features({"label": datasets.ClassLabel(names=synsets)})
    ds = datasets.Dataset.from_dict({"label": [0, 7]}, features=features)
    names = recipe.classnames_for(ds, recipe.DataArguments())
    assert names == curated and names[7] == "rooster" and names[0] == "tench"


# ------------------------------------------------------------------------------------------------------------------
# Missing backends say how to install them; the card names every default eval set
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("deepspeed") is not None,
                    reason="deepspeed is installed")
def test_a_deepspeed_run_without_deepspeed_names_the_install_command(tmp_path: Path) -> None:
    from saeft_hf.backends import MissingBackendError
    from saeft_hf.config import SAEFTConfig
    from saeft_hf.pipeline import parse_args

    ds_config = tmp_path / "ds.json"
    ds_config.write_text('{"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}')
    yaml_config = tmp_path / "run.yaml"
    yaml_config.write_text(f"deepspeed: {ds_config}\n")
    for argv in (["--output_dir", str(tmp_path), "--deepspeed", str(ds_config)],
                 ["--output_dir", str(tmp_path), f"--deepspeed={ds_config}"],
                 ["--config", str(yaml_config), "--output_dir", str(tmp_path)]):
        with pytest.raises(MissingBackendError, match=r"pip install deepspeed.*multi_gpu\.yaml"):
            parse_args((SAEFTConfig,), argv)
    (args,) = parse_args((SAEFTConfig,), ["--output_dir", str(tmp_path)])  # no DeepSpeed asked: no error
    assert args.deepspeed is None


def test_card_pretty_names_cover_the_default_eval_sets() -> None:
    from saeft_hf.evaluation.specs import DEFAULT_SHIFT_NAMES
    from saeft_hf.hub import PRETTY_NAMES

    assert {"imagenet", *DEFAULT_SHIFT_NAMES} <= set(PRETTY_NAMES)
    assert PRETTY_NAMES["imagenetv2"] == "ImageNet-V2"
