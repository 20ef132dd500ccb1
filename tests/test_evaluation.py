"""saeft_hf.evaluation: logit projections, accuracy on tiny real models, specs, WiSE-FT (full and LoRA/DoRA)."""

from __future__ import annotations

import copy
import io
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any Hugging Face import

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import ViTConfig, ViTForImageClassification  # noqa: E402

from saeft_hf.data import BorderCrop, CLIPImageTransform, random_subset  # noqa: E402
from saeft_hf.evaluation import (  # noqa: E402
    IMAGENET_TEMPLATES,
    EvalSetSpec,
    PixelSet,
    count_correct,
    evaluate_model,
    holdout_split,
    shard_dataset,
    shard_range,
    default_imagenet_eval_specs,
    evaluate_accuracy,
    evaluate_sets,
    imagenet_a_indices,
    imagenet_classnames,
    imagenet_r_indices,
    imagenet_wnids,
    interpolate_state_dicts,
    load_eval_dataset,
    load_eval_sets,
    load_eval_specs,
    objectnet_class_groups,
    objectnet_folders,
    project_logits,
    scale_lora,
    select_alpha,
    shift_averages,
    wise_ft,
)

REPO = Path(__file__).resolve().parents[1]
MEAN3, STD3 = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def tiny_vit(num_labels: int, seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=16, num_labels=num_labels)
    return ViTForImageClassification(config).eval()


def png_dataset(n: int, num_labels: int, seed: int = 0) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        buf = io.BytesIO()
        PIL.Image.fromarray(rng.integers(0, 256, (20 + i % 3, 22, 3), dtype=np.uint8)).save(buf, format="PNG")
        images.append({"bytes": buf.getvalue(), "path": f"img{i}.png"})
    features = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.Value("int64")})
    return datasets.Dataset.from_dict({"image": images, "label": rng.integers(0, num_labels, n).tolist()},
                                      features=features)


def manual_accuracy(model, ds, transform, spec=None) -> float:
    with torch.no_grad():
        x = torch.stack([transform(ex["image"]) for ex in ds])
        logits = model(pixel_values=x).logits
    if spec is not None and spec.kind == "subset":
        logits = logits[:, spec.indices()]
    elif spec is not None and spec.kind == "grouped":
        logits = torch.stack([logits[:, g].max(dim=1).values for g in spec.groups()], dim=1)
    return float((logits.argmax(1).numpy() == np.asarray(ds["label"][:])).mean())


# ------------------------------------------------------------------------------------------------------------------
# Class lists
# ------------------------------------------------------------------------------------------------------------------


def test_class_lists_are_consistent() -> None:
    assert len(imagenet_wnids()) == len(imagenet_classnames()) == 1000
    assert imagenet_wnids() == sorted(imagenet_wnids()) and imagenet_wnids()[0] == "n01440764"
    for indices in (imagenet_r_indices(), imagenet_a_indices()):
        assert len(indices) == 200 and indices == sorted(set(indices)) and 0 <= indices[0] and indices[-1] < 1000
    groups, folders = objectnet_class_groups(), objectnet_folders()
    assert len(groups) == len(folders) == 113 and folders == sorted(folders)
    assert all(g and all(0 <= i < 1000 for i in g) for g in groups)
    assert len(IMAGENET_TEMPLATES) == 80 and all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)
    assert IMAGENET_TEMPLATES[0] == "a bad photo of a {}." and IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."


# ------------------------------------------------------------------------------------------------------------------
# Logit projection
# ------------------------------------------------------------------------------------------------------------------


def test_project_logits_subset_and_grouped_by_hand() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0, 9.0, 2.0, 3.0], [4.0, 0.0, 8.0, 1.0, 7.0, 6.0]])
    subset = EvalSetSpec(name="s", dataset_name="x", kind="subset", class_indices=[1, 3, 4])
    assert project_logits(logits, subset).tolist() == [[5.0, 9.0, 2.0], [0.0, 1.0, 7.0]]
    grouped = EvalSetSpec(name="g", dataset_name="x", kind="grouped", class_groups=[[0, 5], [2], [1, 3, 4]])
    assert project_logits(logits, grouped).tolist() == [[3.0, 1.0, 9.0], [6.0, 8.0, 7.0]]
    assert project_logits(logits, None) is logits
    assert project_logits(logits, EvalSetSpec(name="f", dataset_name="x")) is logits


def test_project_logits_named_lists_and_head_size_error() -> None:
    logits = torch.randn(3, 1000)
    r = project_logits(logits, EvalSetSpec(name="r", dataset_name="x", kind="subset", class_indices="imagenet_r"))
    torch.testing.assert_close(r, logits[:, imagenet_r_indices()])
    spec = EvalSetSpec(name="o", dataset_name="x", kind="grouped", class_groups="objectnet")
    o = project_logits(logits, spec)
    assert o.shape == (3, 113)
    torch.testing.assert_close(o[:, 0], logits[:, objectnet_class_groups()[0]].max(dim=1).values)
    with pytest.raises(ValueError, match="returns 10 logits"):
        project_logits(torch.randn(2, 10), spec)


def test_spec_validation_and_yaml() -> None:
    with pytest.raises(ValueError, match="needs class_indices"):
        EvalSetSpec(name="a", dataset_name="x", kind="subset")
    with pytest.raises(ValueError, match="sorted and unique"):
        EvalSetSpec(name="a", dataset_name="x", kind="subset", class_indices=[3, 1])
    with pytest.raises(ValueError, match="not a known class list"):
        EvalSetSpec(name="a", dataset_name="x", kind="subset", class_indices="imagenet_z")
    with pytest.raises(ValueError, match="no source"):
        EvalSetSpec(name="a")
    with pytest.raises(ValueError, match=r"Unknown EvalSetSpec field\(s\) \['splt'\]"):
        EvalSetSpec.from_dict({"name": "a", "dataset_name": "x", "splt": "test"})
    yaml_specs = load_eval_specs(REPO / "recipes/configs/imagenet_eval_sets.yaml")
    assert [s.to_dict() for s in yaml_specs] == [s.to_dict() for s in default_imagenet_eval_specs()]
    assert [s.name for s in yaml_specs if s.role == "id"] == ["imagenet"]
    assert {s.name: s.num_classes for s in yaml_specs}["objectnet"] == 113
    with pytest.raises(ValueError, match="Duplicate"):
        load_eval_specs([{"name": "a", "dataset_name": "x"}, {"name": "a", "dataset_name": "y"}])


# ------------------------------------------------------------------------------------------------------------------
# Accuracy
# ------------------------------------------------------------------------------------------------------------------


def test_evaluate_accuracy_matches_manual_computation() -> None:
    model = tiny_vit(num_labels=4).train()  # evaluate_accuracy must switch to eval and back
    ds = png_dataset(11, num_labels=4)
    tf = CLIPImageTransform(16, MEAN3, STD3, train=False)
    model.eval()
    expected = manual_accuracy(model, ds, tf)
    model.train()
    acc = evaluate_accuracy(model, ds, tf, batch_size=4, progress=False)
    assert acc == pytest.approx(expected) and model.training
    assert evaluate_accuracy(model, ds.to_iterable_dataset(), tf, batch_size=5, progress=False) == pytest.approx(acc)
    some = random_subset(ds, 5, seed=3)
    paths = [im["path"] for im in some["image"][:]]
    assert len(set(paths)) == 5 and paths == sorted(paths, key=lambda p: int(p[3:-4]))  # original order kept
    assert paths != [f"img{i}.png" for i in range(5)]  # random rows, not the first five
    assert [im["path"] for im in random_subset(ds, 5, seed=3)["image"][:]] == paths  # seeded
    assert evaluate_accuracy(model, some, tf, progress=False) == pytest.approx(manual_accuracy(model.eval(), some, tf))


def test_evaluate_accuracy_with_subset_and_grouped_specs() -> None:
    model = tiny_vit(num_labels=1000, seed=1)
    tf = CLIPImageTransform(16, MEAN3, STD3, train=False)
    subset = EvalSetSpec(name="sub", dataset_name="x", kind="subset", class_indices=[0, 5, 9])
    ds = png_dataset(9, num_labels=3, seed=2)
    assert evaluate_accuracy(model, ds, tf, spec=subset, batch_size=4, progress=False) == pytest.approx(
        manual_accuracy(model, ds, tf, subset))
    grouped = EvalSetSpec(name="grp", dataset_name="x", kind="grouped", class_groups=[[1, 2], [3], [4, 5, 6]],
                          crop_border=2)
    expected = manual_accuracy(model, ds, BorderCrop(tf, 2), grouped)
    results = evaluate_sets(model, {"sub": (ds, subset), "grp": (ds, grouped)}, tf, batch_size=4, progress=False)
    assert results["grp"] == pytest.approx(expected)
    bad = png_dataset(3, num_labels=1, seed=3).map(lambda ex: {"label": 7})
    with pytest.raises(ValueError, match="label 7 is outside"):
        evaluate_accuracy(model, bad, tf, spec=subset, progress=False)


def test_load_eval_dataset_aligns_wnid_and_objectnet_folders(tmp_path: Path) -> None:
    wnids, r_indices = imagenet_wnids(), imagenet_r_indices()
    picks = [r_indices[3], r_indices[150]]  # two ImageNet-R classes; a partial copy must keep their positions
    for i, index in enumerate(picks):
        (tmp_path / "r" / wnids[index]).mkdir(parents=True)
        PIL.Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / "r" / wnids[index] / "x.png")
    spec = EvalSetSpec(name="imagenet_r", data_dir=str(tmp_path / "r"), kind="subset", class_indices="imagenet_r")
    ds = load_eval_dataset(spec, cache_dir=str(tmp_path / "cache"))
    assert sorted(ds["label"][:]) == [3, 150]
    full = EvalSetSpec(name="val", data_dir=str(tmp_path / "r"))
    assert sorted(load_eval_dataset(full, cache_dir=str(tmp_path / "cache"))["label"][:]) == sorted(picks)

    folders = objectnet_folders()
    for name in (folders[0], "not_in_imagenet", folders[112]):
        (tmp_path / "on" / name).mkdir(parents=True)
        PIL.Image.new("RGB", (8, 8)).save(tmp_path / "on" / name / "x.png")
    on = EvalSetSpec(name="objectnet", data_dir=str(tmp_path / "on"), kind="grouped", class_groups="objectnet",
                     class_folders="objectnet", crop_border=2)
    for streaming in (False, True):
        ds = load_eval_dataset(on, streaming=streaming, cache_dir=str(tmp_path / "cache"))
        assert sorted(ex["label"] for ex in ds) == [0, 112]  # the unmapped folder is dropped


def test_shift_averages() -> None:
    results = {"imagenet": 0.8, "imagenetv2": 0.7, "imagenet_r": 0.6, "imagenet_sketch": 0.5, "objectnet": 0.4,
               "imagenet_a": 0.3}
    out = shift_averages(results)
    assert out["id"] == 0.8 and out["num_shifts"] == 5
    assert out["avg_shift"] == pytest.approx(0.5)
    assert out["avg_shift_no_objectnet"] == pytest.approx(0.525)
    partial = shift_averages({"imagenet": 0.8, "imagenetv2": 0.7, "imagenet_r": 0.5})
    assert partial["avg_shift"] == pytest.approx(0.6) and "avg_shift_no_objectnet" not in partial


# ------------------------------------------------------------------------------------------------------------------
# WiSE-FT
# ------------------------------------------------------------------------------------------------------------------


def test_interpolate_state_dicts_exact_and_pure() -> None:
    theta0 = {"w": torch.zeros(3), "h": torch.full((2,), 2.0, dtype=torch.bfloat16), "steps": torch.tensor(5)}
    theta1 = {"w": torch.full((3,), 2.0), "h": torch.full((2,), 4.0, dtype=torch.bfloat16), "steps": torch.tensor(9)}
    before = copy.deepcopy((theta0, theta1))
    at0, at1, mid = (interpolate_state_dicts(theta0, theta1, a) for a in (0.0, 1.0, 0.5))
    assert torch.equal(at0["w"], theta0["w"]) and torch.equal(at0["h"], theta0["h"])
    assert torch.equal(at1["w"], theta1["w"]) and torch.equal(at1["h"], theta1["h"])
    assert mid["w"].tolist() == [1.0, 1.0, 1.0] and mid["h"].tolist() == [3.0, 3.0]
    assert mid["h"].dtype == torch.bfloat16
    assert all(int(d["steps"]) == 9 for d in (at0, at1, mid))  # non-float buffers come from theta1
    assert at1["w"].data_ptr() != theta1["w"].data_ptr()  # new tensors
    for orig, now in zip(before, (theta0, theta1)):
        assert all(torch.equal(orig[k], now[k]) for k in orig)
    with pytest.raises(ValueError, match="different keys"):
        interpolate_state_dicts({"w": torch.zeros(3)}, {"v": torch.zeros(3)}, 0.5)
    with pytest.raises(ValueError, match="shape"):
        interpolate_state_dicts({"w": torch.zeros(3)}, {"w": torch.zeros(4)}, 0.5)


def test_wise_ft_full_models() -> None:
    pre, ft = tiny_vit(4, seed=0), tiny_vit(4, seed=1)
    ft_before = {k: v.clone() for k, v in ft.state_dict().items()}
    for alpha, target in ((0.0, pre), (1.0, ft)):
        model = wise_ft(pre, ft, alpha)
        assert model is not ft
        assert all(torch.equal(v, target.state_dict()[k]) for k, v in model.state_dict().items())
    half = wise_ft(pre, ft, 0.5).state_dict()
    key = "classifier.weight"
    torch.testing.assert_close(half[key], (pre.state_dict()[key] + ft.state_dict()[key]) / 2)
    assert all(torch.equal(v, ft_before[k]) for k, v in ft.state_dict().items())


def _lora_model(use_dora: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(frozen copy of the base model, LoRA/DoRA PeftModel with a non-zero delta and a changed head copy)."""
    base = tiny_vit(4, seed=2)
    reference = copy.deepcopy(base)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "fc1"], init_lora_weights=False,
                        modules_to_save=["classifier"], use_dora=use_dora)
    peft_model = get_peft_model(base, config).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.5)  # the fine-tuned head differs from the original
    return reference, peft_model


@pytest.mark.parametrize("use_dora", [False, True])
def test_scale_lora_interpolates_between_base_and_adapter(use_dora: bool) -> None:
    reference, peft_model = _lora_model(use_dora)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_out = reference(pixel_values=x).logits
        adapter_out = peft_model(pixel_values=x).logits
        state_before = {k: v.clone() for k, v in peft_model.state_dict().items()}
        assert not torch.allclose(base_out, adapter_out, atol=1e-3)
        with scale_lora(peft_model, 0.0):
            torch.testing.assert_close(peft_model(pixel_values=x).logits, base_out, rtol=0, atol=1e-5)
        with scale_lora(peft_model, 1.0):
            torch.testing.assert_close(peft_model(pixel_values=x).logits, adapter_out, rtol=0, atol=1e-5)
        with scale_lora(peft_model, 0.5):
            half_out = peft_model(pixel_values=x).logits
        assert not torch.allclose(half_out, base_out, atol=1e-4) and not torch.allclose(half_out, adapter_out,
                                                                                        atol=1e-4)
        assert torch.equal(peft_model(pixel_values=x).logits, adapter_out)  # restored exactly
        assert all(torch.equal(v, state_before[k]) for k, v in peft_model.state_dict().items())
        merged = wise_ft(None, peft_model, 0.5)  # a plain model equal to the in-place interpolation
        assert type(merged) is ViTForImageClassification
        torch.testing.assert_close(merged(pixel_values=x).logits, half_out, rtol=0, atol=1e-5)
        assert torch.equal(peft_model(pixel_values=x).logits, adapter_out)


def test_scale_lora_rejects_merged_adapters() -> None:
    _, peft_model = _lora_model(False)
    peft_model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        with scale_lora(peft_model, 0.5):
            pass


def test_select_alpha_ties_and_nan() -> None:
    assert select_alpha([0.0, 0.5, 1.0], [0.2, 0.4, 0.4]) == 0.5  # ties go to the first
    assert select_alpha([0.0, 0.5], [float("nan"), 0.1]) == 0.5
    with pytest.raises(ValueError):
        select_alpha([0.0], [0.1, 0.2])


# ------------------------------------------------------------------------------------------------------------------
# Exact sharded counting, decode-once sweeps, honest selection, fp32 evaluation
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 7, 25, 31])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shards_partition_exactly(n: int, world: int) -> None:
    shards = [shard_range(n, r, world) for r in range(world)]
    assert [i for s in shards for i in s] == list(range(n))  # every index once, in order, no padding
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1


def test_uneven_shards_sum_to_the_full_counts() -> None:
    model = tiny_vit(num_labels=4, seed=3)
    ds = png_dataset(31, num_labels=4, seed=4)
    tf = CLIPImageTransform(16, MEAN3, STD3, train=False)
    sets = {"a": (ds, None), "b": (ds.to_iterable_dataset(num_shards=3), None)}
    full = count_correct({"m": model}, sets, tf, batch_size=4, progress=False)
    assert full["a"]["m"].total == full["b"]["m"].total == 31
    assert full["a"]["m"].correct == round(manual_accuracy(model, ds, tf) * 31)
    for world in (2, 3, 4):
        parts = [count_correct({"m": model}, {name: (shard_dataset(d, r, world), s) for name, (d, s) in sets.items()},
                               tf, batch_size=4, progress=False) for r in range(world)]
        for name in sets:
            assert sum(p[name]["m"].total for p in parts) == 31
            assert sum(p[name]["m"].correct for p in parts) == full[name]["m"].correct


class CountingTransform:
    """The eval transform, counting its calls (one per decoded image)."""

    def __init__(self) -> None:
        self.tf = CLIPImageTransform(16, MEAN3, STD3, train=False)
        self.calls = 0

    def __call__(self, image):
        self.calls += 1
        return self.tf(image)


@pytest.mark.parametrize("lora", [False, True])
def test_wise_ft_sweep_decodes_once_and_equals_per_alpha_evaluation(lora: bool) -> None:
    if lora:
        pre, ft = None, _lora_model(False)[1]
    else:
        pre, ft = tiny_vit(4, seed=0), tiny_vit(4, seed=1)
    sets = {"val": (png_dataset(13, 4, seed=5), None), "shift": (png_dataset(9, 4, seed=6), None)}
    holdout = {"held": (png_dataset(7, 4, seed=7), None)}
    alphas = [0.0, 0.3, 0.7, 1.0]
    tf = CountingTransform()
    report = evaluate_model(ft, sets, tf, id_name="val", shift_names=["shift"], pretrained=pre,
                            wise_ft_alphas=alphas, holdout_sets=holdout, selection="test data", batch_size=4)
    assert tf.calls == 13 + 9 + 7  # each image decoded once for all four alphas
    assert report.num_examples == {"val": 13, "shift": 9, "held": 7}
    for alpha, result in zip(alphas, report.wise_ft.results):
        model = wise_ft(pre, ft, alpha)
        expected = evaluate_sets(model, {**sets, **holdout}, tf.tf, batch_size=5, progress=False)
        assert result == pytest.approx({**expected, "id": expected["val"], "avg_shift": expected["shift"],
                                        "num_shifts": 1.0})
    assert report.wise_ft.select_on == "held" and report.wise_ft.selection == "test data"
    held = [r["held"] for r in report.wise_ft.results]
    assert report.wise_ft.best_alpha == alphas[held.index(max(held))]
    assert report.final == {k: v for k, v in report.wise_ft.results[-1].items() if k != "held"}
    # The chosen model is a plain model equal to wise_ft at the chosen alpha.
    chosen = report.wise_ft_model
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(chosen(pixel_values=x).logits,
                                   wise_ft(pre, ft, report.wise_ft.best_alpha)(pixel_values=x).logits)


def test_selection_never_on_a_reported_id_set() -> None:
    pre, ft = tiny_vit(4, seed=0), tiny_vit(4, seed=1)
    sets = {"val": (png_dataset(5, 4), None)}
    tf = CLIPImageTransform(16, MEAN3, STD3, train=False)
    with pytest.raises(ValueError, match="needs held-out ID data"):
        evaluate_model(ft, sets, tf, id_name="val", pretrained=pre, wise_ft_alphas=[0.0, 1.0])
    with pytest.raises(ValueError, match="reported ID set"):
        evaluate_model(ft, sets, tf, id_name="val", pretrained=pre, wise_ft_alphas=[0.0, 1.0], select_on="val")


def test_holdout_split_is_seeded_disjoint_and_removed() -> None:
    ds = png_dataset(50, 4).map(lambda ex, i: {"row": i}, with_indices=True)
    train, held, description = holdout_split(ds, 0.1, seed=3)
    assert len(held) == 5 and len(train) == 45 and "seed 3" in description
    assert sorted(train["row"][:] + held["row"][:]) == list(range(50))
    assert held["row"][:] != list(range(5)) and holdout_split(ds, 0.1, seed=3)[1]["row"][:] == held["row"][:]
    assert len(holdout_split(ds, 7, seed=0)[1]) == 7
    with pytest.raises(ValueError, match="leaves no training images"):
        holdout_split(ds, 50, seed=0)
    with pytest.raises(ValueError, match="streaming"):
        holdout_split(ds.to_iterable_dataset(), 0.1, seed=0)


def test_evaluation_is_fp32_after_mixed_precision_prepare() -> None:
    """accelerate's bf16 prepare wraps forward in autocast; evaluate_model scores the weights in fp32 anyway."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    model = tiny_vit(4, seed=8)
    clean = copy.deepcopy(model)
    AcceleratorState._reset_state(reset_partial_state=True)  # an earlier test's Accelerator may hold other settings
    try:
        prepared = Accelerator(cpu=True, mixed_precision="bf16").prepare_model(model)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # leave no bf16 state to the tests after this one
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert prepared(pixel_values=x).logits.dtype == torch.float32  # converted back, but computed in bf16
        assert not torch.equal(prepared(pixel_values=x).logits, clean(pixel_values=x).logits)
    sets = {"s": (PixelSet(x, torch.tensor([0, 1, 2, 3])), None)}
    logits = {}

    def record(module, args, kwargs, output):
        logits["last"] = output.logits

    clean.register_forward_hook(record, with_kwargs=True)
    evaluate_model(clean, sets, None)
    expected = logits["last"]
    model.register_forward_hook(record, with_kwargs=True)
    report = evaluate_model(prepared, sets, None)
    assert torch.equal(logits["last"], expected) and report.precision == "fp32"
    evaluate_model(prepared, sets, None, bf16=True)
    assert not torch.equal(logits["last"], expected)  # bf16 on request


def test_model_card_shows_fine_tuned_and_wise_ft_with_paper_numbers() -> None:
    from saeft_hf.hub import build_model_card

    names = ["imagenet", "imagenetv2", "imagenet_r", "imagenet_sketch", "objectnet", "imagenet_a"]
    final = {n: 0.5 + 0.01 * i for i, n in enumerate(names)}
    final.update(shift_averages(final))
    better = {k: v + 0.1 for k, v in final.items()}
    sweep = {"alphas": [0.0, 0.5, 1.0], "results": [final, better, final], "best_alpha": 0.5,
             "select_on": "train_holdout", "selection": "12811 held-out training images"}
    card = str(build_model_card(model_name="m", base_model="openai/clip-vit-base-patch16", results=final,
                                wise_ft=sweep))
    table = card[card.index("## Evaluation"):card.index("## Training")]
    assert "| set | fine-tuned | WiSE-FT (alpha 0.5) | zero-shot (paper) | FT (paper) | WiSE-FT (paper) |" in table
    assert f"| Avg-5 (shifts) | {100 * final['avg_shift']:.2f} | {100 * better['avg_shift']:.2f} | 58.4 | 53.7 | 60.6 |" in table
    assert "`train_holdout` (12811 held-out training images)" in table
    assert 'subfolder="wise_ft"' in card
    # Summary keys are not datasets in the model-index.
    assert "dataset_type: num_shifts" not in card and "dataset_type: id\n" not in card


def test_known_alphas_are_not_scored_again() -> None:
    pre, ft = tiny_vit(4, seed=0), tiny_vit(4, seed=1)
    sets = {"val": (png_dataset(6, 4, seed=5), None), "shift": (png_dataset(5, 4, seed=6), None)}
    holdout = {"held": (png_dataset(4, 4, seed=7), None)}
    tf = CLIPImageTransform(16, MEAN3, STD3, train=False)
    known = {0.0: {"val": 0.125, "shift": 0.25, "held": 2.0}}  # impossible accuracies: they must come from `known`
    report = evaluate_model(ft, sets, tf, id_name="val", shift_names=["shift"], pretrained=pre,
                            wise_ft_alphas=[0.0, 1.0], holdout_sets=holdout, known=known)
    assert report.wise_ft.results[0] == {"val": 0.125, "shift": 0.25, "held": 2.0, "id": 0.125, "avg_shift": 0.25,
                                         "num_shifts": 1.0}
    assert report.wise_ft.best_alpha == 0.0
    with pytest.raises(ValueError, match="lack the sets"):
        evaluate_model(ft, sets, tf, pretrained=pre, wise_ft_alphas=[0.0, 1.0], holdout_sets=holdout,
                       known={0.0: {"val": 0.5}})


def test_class_folders_are_labelled_by_the_heads_classes(tmp_path) -> None:
    """A `full` eval set of class folders scores against any head: each folder gets the head position of its class
    (by name, or a wnid by its curated name), not its ImageNet index; without a head, ImageNet indices as before."""
    from helpers import make_image_folder

    wnids = ["n01443537", "n02119022", "n02123045"]  # goldfish, red fox, tabby cat
    root = make_image_folder(tmp_path / "shift", per_class=2, names=wnids)
    spec = EvalSetSpec(name="shift", data_dir=str(root))

    def label_of_folder(ds) -> dict[str, int]:
        paths = ds.cast_column("image", datasets.Image(decode=False))["image"]
        return {Path(im["path"]).parent.name: label for im, label in zip(paths, ds["label"])}

    head = ["tabby cat", "goldfish", "red fox"]  # another order than the folders'
    ds, _ = load_eval_sets([spec], head_labels=head, cache_dir=str(tmp_path / "c"))["shift"]
    assert label_of_folder(ds) == {"n01443537": 1, "n02119022": 2, "n02123045": 0}
    imagenet, _ = load_eval_sets([spec], cache_dir=str(tmp_path / "c2"))["shift"]
    assert label_of_folder(imagenet) == {"n01443537": 1, "n02119022": 277, "n02123045": 281}


def test_a_set_smaller_than_the_process_count_leaves_some_ranks_empty() -> None:
    """A 1-image holdout under 2 processes: rank 1 scores nothing (it used to raise IndexError in datasets)."""
    import datasets

    from saeft_hf.evaluation.accuracy import shard_dataset

    one = datasets.Dataset.from_dict({"label": [3]})
    assert [list(shard_dataset(one, rank, 2)["label"]) for rank in (0, 1)] == [[3], []]
    five = datasets.Dataset.from_dict({"label": list(range(5))})
    assert sum((list(shard_dataset(five, rank, 8)["label"]) for rank in range(8)), []) == list(range(5))
