"""The feature pages of the interpretation report, with real tiny CLIP models: the numbers they show, the HTML
parsed with html.parser (every page has its parts), every inline image decoded, and patch heatmaps for an SAE on
hidden states."""

from __future__ import annotations

import base64
import copy
import io
import json
from dataclasses import dataclass, field
from html.parser import HTMLParser

import PIL.Image
import pytest
import torch

from helpers import CLASSNAMES, TEMPLATES, make_image_folder, make_tiny_clip
from saeft_hf import SAEConfig, SparseAutoencoder
from saeft_hf.data import load_image_dataset, transforms_from_pretrained, with_image_transform
from saeft_hf.embeddings import compute_embeddings
from saeft_hf.interpret import (
    PRETRAINED_NAME,
    PROFILES_FILENAME,
    FeatureChangeReport,
    compare_codes,
    interpret_runs,
    load_model_for_interpretation,
    load_profiles,
    patch_activations,
    profile_features,
    select_features,
)
from saeft_hf.lora import add_lora
from saeft_hf.zeroshot import from_clip

# ---------------------------------------------------------------------------------------------------------------
# A small DOM from html.parser (no new dependency)
# ---------------------------------------------------------------------------------------------------------------

VOID = {"img", "meta", "br", "hr", "link", "input"}


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node] = field(default_factory=list)
    text: list[str] = field(default_factory=list)

    def iter(self, tag: str | None = None, cls: str | None = None):
        for child in self.children:
            if (tag is None or child.tag == tag) and (cls is None or cls in child.attrs.get("class", "").split()):
                yield child
            yield from child.iter(tag, cls)

    def all_text(self) -> str:
        return "".join(self.text) + "".join(c.all_text() for c in self.children)


class DomBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.root = Node("root", {})
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        # Well-formed output: every end tag closes the innermost open element of that name.
        assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>"
        self.stack.pop()

    def handle_data(self, data):
        self.stack[-1].text.append(data)


def parse(page: str) -> Node:
    builder = DomBuilder()
    builder.feed(page)
    builder.close()
    assert builder.stack == [builder.root], "unclosed elements: " + ", ".join(n.tag for n in builder.stack[1:])
    return builder.root


def decode_all_images(root: Node) -> int:
    """Decode every <img> (base64 PNG only: the file is self-contained); returns how many."""
    count = 0
    for img in root.iter("img"):
        src = img.attrs["src"]
        assert src.startswith("data:image/png;base64,"), src[:40]
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        # A whole PNG: signature first, the IEND chunk (with its CRC) last; verify() checks every chunk's CRC, and
        # load() decodes the pixels (PIL's decoder alone accepts a file cut after its image data).
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(b"IEND\xaeB`\x82")
        PIL.Image.open(io.BytesIO(data)).verify()
        image = PIL.Image.open(io.BytesIO(data))
        image.load()
        assert image.format == "PNG" and image.size[0] > 0 and image.size[1] > 0
        count += 1
    return count


def check_self_contained(root: Node) -> None:
    for node in root.iter():
        for key in ("src", "href"):
            value = node.attrs.get(key)
            if value is not None:
                assert value.startswith(("data:", "#")), f"<{node.tag} {key}={value[:60]!r}> fetches something"
    assert not list(root.iter("script")) and not list(root.iter("link"))


# ---------------------------------------------------------------------------------------------------------------
# Real tiny models
# ---------------------------------------------------------------------------------------------------------------


def perturbed_models(pretrained):
    """A full fine-tune (noise on the vision tower) and a LoRA one (non-zero B), both really different."""
    full = copy.deepcopy(pretrained)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in full.vision_model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    lora = add_lora(copy.deepcopy(pretrained), r=4, alpha=8)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)
    return full, lora


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("feature_report")
    clip = make_tiny_clip(tmp / "clip")
    dataset = load_image_dataset(train_dir=str(make_image_folder(tmp / "images", per_class=4)), split="train")
    _, eval_tf = transforms_from_pretrained(str(clip))
    return tmp, clip, dataset, eval_tf


def test_report_pages_parse_and_every_image_decodes(tiny, tmp_path):
    _, clip, dataset, eval_tf = tiny
    pretrained = from_clip(str(clip), CLASSNAMES, TEMPLATES, progress=False).eval()
    full, lora = perturbed_models(pretrained)
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=16, d_sae=32, k=4, source_model=str(clip)))
    reports = interpret_runs(pretrained, {"FT": full, "SAE-FT": lora}, sae, dataset, eval_tf, output_dir=tmp_path,
                             text_model=str(clip), templates=TEMPLATES, vocabulary=["red fox"], max_samples=12,
                             top_features=5, top_images=3, max_features=3, progress=False)
    profiles = load_profiles(tmp_path / PROFILES_FILENAME)
    models = [PRETRAINED_NAME, "FT", "SAE-FT"]
    assert profiles and all(p.models == models for p in profiles)
    # The pages show exactly the features select_features lists, in its order, with the same roles.
    assert [(p.feature, p.roles) for p in profiles] == select_features(reports, per_direction=3)
    for p in profiles:  # profile numbers are the reports' numbers (same codes, same definition of "active")
        assert p.frequency[PRETRAINED_NAME] == reports["FT"].frequency_before[p.feature]
        assert p.frequency["SAE-FT"] == reports["SAE-FT"].frequency_after[p.feature]
        for m in models:
            assert sum(p.histogram_counts[m]) == round(p.frequency[m] * 12)
            assert all(0 <= i < len(dataset) for i in p.top_indices[m])  # rows of `dataset`, not of the subset

    root = parse((tmp_path / "report.html").read_text(encoding="utf-8"))
    check_self_contained(root)
    pages = {n.attrs["id"]: n for n in root.iter("div", "page")}
    assert list(pages) == [f"feature-{p.feature}" for p in profiles]
    index_links = [a.attrs["href"] for a in next(t for t in root.iter("table") if "why listed" in t.all_text())
                   .iter("a")]
    assert index_links == [f"#{anchor}" for anchor in pages]
    for p in profiles:
        page = pages[f"feature-{p.feature}"]
        stats = next(page.iter("table"))
        rows = {r.children[0].all_text(): [c.all_text() for c in r.children[1:]] for r in stats.iter("tr")
                if r.children[0].tag == "td"}
        assert list(rows) == models
        for m in models:  # frequency and mean activation under each model, as the profile says
            assert rows[m][:2] == [f"{p.frequency[m]:.2%}", f"{p.mean_activation[m]:.3g}"]
        assert [img.attrs["alt"] for img in page.iter("img") if "histogram" in img.attrs["alt"]] == \
            [f"feature {p.feature} activation histogram"]
        strips = {n.attrs["data-model"]: n for n in page.iter("div", "topimgs")}
        assert list(strips) == models  # the top-activating images under every model, side by side
        for m in models:
            has_strip = any("top images" in img.attrs["alt"] for img in strips[m].iter("img"))
            assert has_strip == bool(p.top_indices[m]), (p.feature, m)
            assert has_strip or "never active" in strips[m].all_text()
        prompts = next(page.iter("div", "prompts"))
        assert [t.all_text() for t in prompts.iter("span", "tag")] == \
            [f"{t['prompt']} ({t['cosine']:.2f})" for t in p.text] and len(p.text) == 3
    assert decode_all_images(root) >= 4 * len(profiles)


def test_profiles_match_an_independent_count():
    gen = torch.Generator().manual_seed(0)
    z0 = torch.randn(50, 16, generator=gen)
    z1 = z0 + torch.randn(50, 16, generator=gen)
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=16, d_sae=24, k=3, activation="topk_signed"))
    report = compare_codes(sae, z0, z1, top_features=4)
    chosen = select_features({"FT": report}, per_direction=4, by_frequency=2)
    profiles = profile_features(sae, {"pre": z0, "FT": z1}, chosen, top_images=5, bins=7)
    with torch.no_grad():
        codes = {"pre": sae(z0).codes, "FT": sae(z1).codes}
    assert len(chosen) == len({j for j, _ in chosen}) >= 4
    for p in profiles:
        for m, s in codes.items():
            col = s[:, p.feature]
            active = col[col != 0]
            assert p.frequency[m] == active.numel() / 50
            assert p.mean_activation[m] == pytest.approx(float(active.double().mean()) if active.numel() else 0.0)
            assert sum(p.histogram_counts[m]) == active.numel() and len(p.histogram_counts[m]) == 7
            assert sorted(p.top_activations[m], key=abs, reverse=True) == p.top_activations[m]
            assert [float(col[i]) for i in p.top_indices[m]] == p.top_activations[m]
            if active.numel():
                assert abs(p.top_activations[m][0]) == float(active.abs().max())
        assert p.histogram_edges[0] <= min(min(v for v in p.top_activations[m]) for m in codes if p.top_indices[m])
    assert report.to_dict() == FeatureChangeReport.from_dict(json.loads(json.dumps(report.to_dict()))).to_dict()
    with pytest.raises(ValueError, match="Feature indices"):
        profile_features(sae, {"pre": z0}, [24])


def test_patch_heatmaps_for_a_hidden_state_sae(tiny, tmp_path):
    _, clip, dataset, eval_tf = tiny
    rep = "hidden_states.-1.mean"
    pretrained = from_clip(str(clip), CLASSNAMES, TEMPLATES, representation=rep, progress=False).eval()
    full, lora = perturbed_models(pretrained)
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=32, d_sae=32, k=4, source_model=str(clip), representation=rep,
                                     input_normalization="none"))

    # Mean pooling and raw inputs: the patch map averages exactly to the pooled image's pre-activation.
    pixels = torch.stack([eval_tf(dataset[i]["image"]) for i in range(4)])
    features = [3, 0, 17]
    maps = patch_activations(lora, sae, pixels, features)
    assert maps.shape == (4, 3, 5, 5)  # 30 px images, 6 px patches
    pooled = compute_embeddings(lora, with_image_transform(dataset.select(range(4)), eval_tf), batch_size=4,
                                progress=False)
    with torch.no_grad():
        expected = sae.pre_activations(pooled)[:, features]
    torch.testing.assert_close(maps.mean((2, 3)), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="hidden_states"):
        patch_activations(lora, SparseAutoencoder(SAEConfig(d_in=16, d_sae=8, k=2)), pixels, [0])

    interpret_runs(pretrained, {"FT": full, "LoRA": lora}, sae, dataset, eval_tf, output_dir=tmp_path,
                   text_model=str(clip), templates=TEMPLATES, top_images=3, max_features=2, progress=False)
    profiles = load_profiles(tmp_path / PROFILES_FILENAME)
    root = parse((tmp_path / "report.html").read_text(encoding="utf-8"))
    check_self_contained(root)
    pages = {n.attrs["id"]: n for n in root.iter("div", "page")}
    assert len(pages) == len(profiles) > 0
    for p in profiles:
        strips = {n.attrs["data-model"]: n for n in pages[f"feature-{p.feature}"].iter("div", "topimgs")}
        for m, node in strips.items():
            heatmaps = [img for img in node.iter("img") if "heatmaps" in img.attrs["alt"]]
            assert len(heatmaps) == (1 if p.top_indices[m] else 0), (p.feature, m)
        # No text for an SAE outside CLIP's joint space, and the page says why.
        assert not p.text and "not CLIP's joint image-text space" in \
            next(pages[f"feature-{p.feature}"].iter("div", "prompts")).all_text()
    assert decode_all_images(root) >= 3 * len(profiles)


def test_saved_classifier_is_read_through_the_saes_representation(tiny, tmp_path):
    """A model fine-tuned with an `image_embeds` penalty can be described by an SAE on a hidden state."""
    _, clip, dataset, eval_tf = tiny
    model = from_clip(str(clip), CLASSNAMES, TEMPLATES, progress=False).eval()
    model.save_pretrained(tmp_path / "ft")
    loaded = load_model_for_interpretation(str(tmp_path / "ft"), representation="hidden_states.1.cls")
    assert loaded.config.representation == "hidden_states.1.cls"
    pixels = eval_tf(dataset[0]["image"]).unsqueeze(0)
    with torch.no_grad():
        expected = model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[1][:, 0]
        torch.testing.assert_close(loaded.get_representation(pixels), expected)
    with pytest.raises(ValueError, match="Unknown representation"):
        load_model_for_interpretation(str(tmp_path / "ft"), representation="hidden_states.last")
