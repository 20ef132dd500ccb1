"""saeft_hf.interpret and recipes/interpret.py: counting definitions, CKA/FVU, the HTML report, LoRA models."""

import base64
import copy
import importlib.util
import io
import json
import re
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from helpers import CLASSNAMES, TEMPLATES, make_image_folder, make_tiny_clip
from saeft_hf import SAEConfig, SAEMismatchError, SparseAutoencoder
from saeft_hf.data import load_image_dataset, transforms_from_pretrained, with_image_transform
from saeft_hf.embeddings import compute_embeddings
from saeft_hf.interpret import (
    FeatureChangeReport,
    build_text_vocabulary,
    compare_codes,
    compute_feature_changes,
    describe_with_text,
    feature_grid,
    fraction_of_variance_unexplained,
    interpret_runs,
    linear_cka,
    write_report,
)
from saeft_hf.lora import add_lora, save_base_config
from saeft_hf.zeroshot import from_clip

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# A constructed case where the answer is known
# ---------------------------------------------------------------------------------------------------------------


def identity_sae(d: int = 8, k: int = 2, normalization: str = "none") -> SparseAutoencoder:
    """Encoder = decoder = identity: feature j is coordinate j, and TopK keeps the k largest coordinates."""
    sae = SparseAutoencoder(SAEConfig(d_in=d, d_sae=d, k=k, input_normalization=normalization))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
        sae.b_dec.zero_()
    return sae


def planted(d: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image 0: {0,1} -> {0,5} (adds 5, removes 1); image 1 unchanged {2,3}; image 2: {0,4} -> {4,6} (adds 6,
    removes 0). Labels 0, 1, 0."""
    before = torch.zeros(3, d)
    after = torch.zeros(3, d)
    before[0, [0, 1]] = torch.tensor([3.0, 2.0])
    after[0, [0, 5]] = torch.tensor([3.0, 2.0])
    before[1, [2, 3]] = after[1, [2, 3]] = torch.tensor([3.0, 2.0])
    before[2, [0, 4]] = torch.tensor([3.0, 2.0])
    after[2, [4, 6]] = torch.tensor([2.0, 3.0])
    return before, after, torch.tensor([0, 1, 0])


def test_known_added_and_removed_features():
    before, after, labels = planted()
    report = compare_codes(identity_sae(), before, after, labels, class_names=["even", "odd"])
    assert report.added_count == [0, 0, 0, 0, 0, 1, 1, 0]
    assert report.removed_count == [1, 1, 0, 0, 0, 0, 0, 0]
    assert report.added_per_image == pytest.approx(2 / 3) and report.removed_per_image == pytest.approx(2 / 3)
    assert (report.distinct_added, report.distinct_removed) == (2, 2)
    assert report.images_with_added == pytest.approx(2 / 3)
    # Ranked by mass (images x mean |a|): feature 6 was added with |a| = 3, feature 5 with 2.
    assert [c.feature for c in report.top_added] == [6, 5]
    assert [c.feature for c in report.top_removed] == [0, 1]
    six = report.top_added[0]
    assert (six.count, six.mean_abs_activation, six.example_indices, six.top_classes) == (1, 3.0, [2], [[0, 1]])
    assert (six.frequency_before, six.frequency_after) == (0.0, pytest.approx(1 / 3))
    zero = report.top_removed[0]
    assert zero.example_indices == [2] and zero.mean_abs_activation == 3.0
    assert sorted(zero.exemplar_indices) == [0, 2]  # feature 0 is active in the pre-trained codes of images 0, 2
    assert report.frequency_before[0] == pytest.approx(2 / 3) and report.mean_activation_before[0] == 3.0
    by_class = {c.name: c for c in report.per_class}
    assert by_class["even"].n_images == 2 and by_class["even"].added_per_image == 1.0
    assert by_class["odd"].added_per_image == 0.0 and by_class["odd"].top_added == []
    assert {e["feature"] for e in by_class["even"].top_added} == {5, 6}
    # Two non-zeros per row and k = 2: the identity SAE reconstructs everything exactly.
    assert report.fvu_before == pytest.approx(0.0, abs=1e-12) and report.fvu_after == pytest.approx(0.0, abs=1e-12)
    assert report.k == 2


def test_unchanged_embeddings_change_nothing():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(64, 16, generator=gen)
    sae = SparseAutoencoder(SAEConfig(d_in=16, d_sae=48, k=4))
    report = compare_codes(sae, z, z.clone(), torch.zeros(64, dtype=torch.long))
    assert report.added_per_image == 0.0 and report.distinct_added == 0 and report.top_added == []
    assert report.cka == pytest.approx(1.0) and report.fvu_before == pytest.approx(report.fvu_after)


# ---------------------------------------------------------------------------------------------------------------
# Agreement with an independent count
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [None, False])
def test_matches_independent_count(normalize):
    gen = torch.Generator().manual_seed(0)
    n, d, n_classes = 300, 16, 5
    z0 = 3.0 * torch.randn(n, d, generator=gen)
    z = z0 + 1.5 * torch.randn(n, d, generator=gen)
    labels = torch.randint(0, n_classes, (n,), generator=gen)
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=d, d_sae=64, k=4))
    report = compare_codes(sae, z0, z, labels, normalize=normalize, top_features=64, top_images=5, chunk_size=128)

    with torch.no_grad():
        prep = sae.preprocess if normalize is None else (lambda x: x)
        s0, s = sae.encode(prep(z0)), sae.encode(prep(z))
    added, removed = (s != 0) & (s0 == 0), (s0 != 0) & (s == 0)
    assert report.added_count == added.sum(0).tolist()
    assert report.removed_count == removed.sum(0).tolist()
    assert report.added_per_image == pytest.approx(added.sum(1).double().mean().item())
    assert report.removed_per_image == pytest.approx(removed.sum(1).double().mean().item())
    assert report.distinct_added == int(added.any(0).sum()) and report.distinct_removed == int(removed.any(0).sum())
    assert report.frequency_after == pytest.approx((s != 0).double().mean(0).tolist())
    mean_abs = (s.abs() * added).sum(0) / added.sum(0).clamp(min=1)
    assert report.added_mean_abs == pytest.approx(mean_abs.tolist(), rel=1e-5, abs=1e-7)
    # TopK: exactly k active codes per image, so each addition displaces one feature.
    assert report.added_per_image == pytest.approx(report.removed_per_image)
    for c in report.per_class:
        rows = labels == c.label
        assert c.n_images == int(rows.sum())
        assert c.added_per_image == pytest.approx(added[rows].sum(1).double().mean().item())
    # Ranked list: every feature with a count, by mass; the examples are images where the change happened.
    assert {c.feature for c in report.top_added} == set(torch.nonzero(added.any(0)).flatten().tolist())
    masses = [c.mass for c in report.top_added]
    assert masses == sorted(masses, reverse=True)
    for change in report.top_added:
        assert change.example_indices and all(added[i, change.feature] for i in change.example_indices)
        assert change.example_activations == sorted(change.example_activations, reverse=True)
    for change in report.top_removed:
        assert all(removed[i, change.feature] for i in change.example_indices)
    # FVU as sae(x) defines it, and a JSON round trip.
    if normalize is None:
        out = sae(z)
        expected = ((out.x - out.reconstruction) ** 2).sum() / ((out.x - out.x.mean(0)) ** 2).sum()
        assert report.fvu_after == pytest.approx(expected.item(), rel=1e-5)
        assert fraction_of_variance_unexplained(sae, sae.preprocess(z)) == pytest.approx(expected.item(), rel=1e-5)
    again = FeatureChangeReport.from_dict(json.loads(json.dumps(report.to_dict(), allow_nan=False)))
    assert again == report


def test_width_mismatch_is_a_clear_error():
    sae = SparseAutoencoder(SAEConfig(d_in=16, d_sae=32, k=4))
    with pytest.raises(SAEMismatchError, match="d_in=16"):
        compare_codes(sae, torch.randn(4, 12), torch.randn(4, 12))
    with pytest.raises(ValueError, match="same shape"):
        compare_codes(sae, torch.randn(4, 16), torch.randn(5, 16))


# ---------------------------------------------------------------------------------------------------------------
# CKA
# ---------------------------------------------------------------------------------------------------------------


def test_linear_cka_properties():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=gen)
    y = x @ torch.randn(12, 12, generator=gen) + 0.5 * torch.randn(200, 12, generator=gen)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=gen))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0)
    base = linear_cka(x, y)
    assert 0.0 < base < 1.0
    assert linear_cka(2.5 * x @ q, y) == pytest.approx(base)
    assert linear_cka(x, 0.1 * y @ q.T + 7.0) == pytest.approx(base)  # translation: removed by centring
    assert linear_cka(x, torch.randn(200, 5, generator=gen)) < 0.2
    assert linear_cka(x, torch.ones(200, 3)) is None


# ---------------------------------------------------------------------------------------------------------------
# The HTML report
# ---------------------------------------------------------------------------------------------------------------


def digit_like_dataset(n: int) -> datasets.Dataset:
    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8), "L") for _ in range(n)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["even", "odd"])})
    return datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(n)]}, features=features)


def test_html_report_renders(tmp_path):
    before, after, labels = planted()
    sae = identity_sae()
    ft = compare_codes(sae, before, after, labels, class_names=["even", "odd"])
    same = compare_codes(sae, before, before.clone(), labels, class_names=["even", "odd"])
    ft.top_added[0].text = [{"prompt": "a blurry <seven>", "cosine": 0.42, "kind": "vocabulary"}]
    path = write_report({"FT": ft, "SAE-FT": same}, tmp_path / "out" / "report.html", dataset=digit_like_dataset(3))
    page = path.read_text()
    assert page.startswith("<!DOCTYPE html>") and "SAE-FT" in page and "<th>FT</th>" in page
    assert "0.667" in page  # features added per image of FT
    assert "a blurry &lt;seven&gt; (0.42)" in page  # text labels, escaped
    assert "feature #6" in page and "No feature was added." in page
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) >= 5  # 2 charts + strips of features
    assert PIL.Image.open(io.BytesIO(base64.b64decode(images[-1]))).format == "PNG"
    assert not re.search(r'(src|href)="(?!data:|#)', page)  # self-contained: nothing fetched (in-page anchors only)
    grid = feature_grid(ft, digit_like_dataset(3), "added")
    assert grid.size[0] > 300 and grid.mode == "RGB"


# ---------------------------------------------------------------------------------------------------------------
# Real (tiny) models: LoRA through compute_feature_changes, text descriptions, the recipe
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interpret")
    clip = make_tiny_clip(tmp / "clip")
    pretrained = from_clip(str(clip), CLASSNAMES, TEMPLATES, progress=False).eval()
    lora = add_lora(copy.deepcopy(pretrained), r=4, alpha=8)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)  # LoRA B starts at zero: perturb it so the adapter changes the model
    sae = SparseAutoencoder(SAEConfig(d_in=16, d_sae=32, k=4, source_model=str(clip)))
    folder = make_image_folder(tmp / "images", per_class=4)
    dataset = load_image_dataset(train_dir=str(folder), split="train")
    return tmp, clip, pretrained, lora, sae, dataset


def test_lora_model_through_compute_feature_changes(tiny, tmp_path):
    _, clip, pretrained, lora, sae, dataset = tiny
    _, eval_tf = transforms_from_pretrained(str(clip))
    out = tmp_path / "changes.json"
    report = compute_feature_changes(pretrained, lora, sae, dataset, eval_tf, max_samples=12, batch_size=8,
                                     top_images=3, output_path=out, progress=False)
    assert report.n_images == 12 and out.is_file()
    assert FeatureChangeReport.load_json(out).summary() == report.summary()
    assert report.added_per_image > 0 and report.cka < 1.0
    assert all(0 <= i < len(dataset) for c in report.top_added for i in c.example_indices)
    # Independent check on the full dataset (no subset): counts equal the raw definition.
    full = compute_feature_changes(pretrained, lora, sae, dataset, eval_tf, batch_size=8, progress=False)
    transformed = with_image_transform(dataset, eval_tf)
    z0 = compute_embeddings(pretrained, transformed, batch_size=8, progress=False)
    z = compute_embeddings(lora, transformed, batch_size=8, progress=False)
    with torch.no_grad():
        s0, s = sae.encode(sae.preprocess(z0)), sae.encode(sae.preprocess(z))
    assert full.added_count == ((s != 0) & (s0 == 0)).sum(0).tolist()
    # Class folders are ids (n0...); the head's readable id2label names the classes.
    assert [c.name for c in full.per_class] == CLASSNAMES
    # The same model on both sides changes nothing.
    with lora.disable_adapter():
        same = compute_feature_changes(pretrained, lora, sae, dataset, eval_tf, batch_size=8, progress=False)
    assert same.added_per_image == 0.0 and same.cka == pytest.approx(1.0)


def test_text_descriptions(tiny):
    _, clip, _, _, sae, _ = tiny
    vocab = build_text_vocabulary(str(clip), classnames=CLASSNAMES, templates=TEMPLATES, vocabulary=["red fox"])
    assert vocab.prompts == [*CLASSNAMES, "red fox"] and vocab.embeddings.shape == (5, 16)
    gen = torch.Generator().manual_seed(0)
    z0 = torch.randn(40, 16, generator=gen)
    report = compare_codes(sae, z0, z0 + torch.randn(40, 16, generator=gen), top_features=3)
    describe_with_text(report, sae, vocab, top_prompts=2)
    change = report.top_added[0]
    assert len(change.text) == 2 and change.text[0]["cosine"] >= change.text[1]["cosine"]
    atom = torch.nn.functional.normalize(sae.W_dec[change.feature].detach(), dim=0)
    sign = -1.0 if change.mean_signed_activation < 0 else 1.0
    best = int((sign * vocab.embeddings @ atom).argmax())
    assert change.text[0]["prompt"] == vocab.prompts[best]
    wrong = SparseAutoencoder(SAEConfig(d_in=16, d_sae=32, k=4, representation="pooler_output"))
    with pytest.raises(ValueError, match="image_embeds"):
        describe_with_text(report, wrong, vocab)


def test_interpret_runs_in_memory_streaming(tiny, tmp_path):
    """What the benchmark calls: in-memory models, a streaming dataset (materialised: max_samples), text."""
    _, clip, pretrained, lora, sae, dataset = tiny
    _, eval_tf = transforms_from_pretrained(str(clip))
    reports = interpret_runs(pretrained, {"LoRA SAE-FT": lora}, sae, dataset.to_iterable_dataset(), eval_tf,
                             output_dir=tmp_path, text_model=str(clip), templates=TEMPLATES,
                             vocabulary=["red fox"], max_samples=8, top_features=3, top_images=2, progress=False)
    report = reports["LoRA SAE-FT"]
    assert report.n_images == 8 and report.top_added and report.top_added[0].text
    assert all(0 <= i < 8 for c in report.top_added for i in c.example_indices)
    assert (tmp_path / "report.html").is_file() and (tmp_path / "LoRA_SAE-FT" / "grid_removed.png").is_file()
    with pytest.raises(ValueError, match="max_samples"):
        interpret_runs(pretrained, {"x": lora}, sae, dataset.to_iterable_dataset(), eval_tf, output_dir=tmp_path)


def test_recipe_end_to_end(tiny, tmp_path):
    tmp, clip, pretrained, lora, sae, _ = tiny
    full = copy.deepcopy(pretrained)
    with torch.no_grad():
        full.visual_projection.weight.add_(0.3 * torch.randn_like(full.visual_projection.weight))
    full.save_pretrained(tmp_path / "ft")
    lora.save_pretrained(tmp_path / "lora")
    save_base_config(lora, str(tmp_path / "lora"))
    sae.save_pretrained(tmp_path / "sae")
    spec = importlib.util.spec_from_file_location("interpret_recipe", ROOT / "recipes" / "interpret.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    out = tmp_path / "report"
    summary = recipe.main([
        "--pretrained_model", str(clip), "--finetuned", f"FT={tmp_path / 'ft'}", "--finetuned",
        f"LoRA={tmp_path / 'lora'}", "--sae", str(tmp_path / "sae"), "--train_dir", str(tmp / "images"),
        "--max_samples", "10", "--top_features", "4", "--top_images", "3", "--batch_size", "8",
        "--templates", *TEMPLATES, "--vocabulary", "goldfish", "--output_dir", str(out),
    ])
    assert set(summary) == {"FT", "LoRA"} and summary["FT"]["n_images"] == 10
    page = (out / "report.html").read_text()
    assert "LoRA" in page and "FT" in page and "data:image/png;base64," in page
    saved = FeatureChangeReport.load_json(out / "LoRA" / "feature_changes.json")
    assert saved.metadata["finetuned"] == str(tmp_path / "lora")
    assert saved.top_added and saved.top_added[0].text  # described with the tiny CLIP's text tower
    assert (out / "FT" / "grid_added.png").is_file() and json.loads((out / "summary.json").read_text())
