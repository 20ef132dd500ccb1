"""The rendering half of `saeft_hf.interpret`: image strips, PNG grids, charts and the self-contained HTML report."""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import PIL.ImageOps

from ..data import decode_image
from .analysis import DIRECTIONS, PRETRAINED_NAME, FeatureChange, FeatureChangeReport, FeatureProfile

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------


def _thumbnail(image: Any, size: int) -> PIL.Image.Image:
    img = decode_image(image).convert("RGB")
    # Small images (28 px digits) are enlarged with NEAREST so strokes stay crisp instead of blurred.
    resample = PIL.Image.Resampling.NEAREST if min(img.size) < size else PIL.Image.Resampling.BICUBIC
    return PIL.ImageOps.fit(img, (size, size), method=resample)


def feature_image_strip(dataset: datasets.Dataset, indices: Sequence[int], *, size: int = 56, pad: int = 2,
                        slots: int | None = None) -> PIL.Image.Image:
    """Images `dataset[i]["image"]` for i in `indices`, left to right, as one RGB image [size, slots * (size+pad)].

    Empty slots (fewer indices than `slots`) stay light grey, so strips of one table line up.
    """
    slots = max(slots or len(indices), 1)
    strip = PIL.Image.new("RGB", (slots * (size + pad) - pad, size), (235, 235, 235))
    for pos, index in enumerate(list(indices)[:slots]):
        strip.paste(_thumbnail(dataset[int(index)]["image"], size), (pos * (size + pad), 0))
    return strip


def _font(size: int) -> PIL.ImageFont.ImageFont:
    try:
        return PIL.ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return PIL.ImageFont.load_default()


def _describe(change: FeatureChange, class_names: Sequence[str] | None) -> list[str]:
    """Short text lines for one feature (used in the PNG grids)."""
    sign = "+" if change.direction == "added" else "-"
    lines = [f"#{change.feature}  {sign}{change.count} img ({100 * change.image_fraction:.1f}%)",
             f"|a|={change.mean_abs_activation:.3g}  freq {change.frequency_before:.2f}->{change.frequency_after:.2f}"]
    if change.top_classes:
        names = [class_names[c] if class_names and c < len(class_names) else str(c) for c, _ in change.top_classes]
        lines.append("classes: " + ", ".join(names))
    if change.text:
        lines.append("text: " + ", ".join(f"{t['prompt']} ({t['cosine']:.2f})" for t in change.text[:2]))
    return lines


def feature_grid(
    report: FeatureChangeReport,
    dataset: datasets.Dataset,
    direction: str = "added",
    *,
    max_features: int | None = None,
    size: int = 48,
    text_width: int = 300,
    title: str | None = None,
) -> PIL.Image.Image:
    """One combined figure: a row per reported feature with its text label and the images where it changed.

    `dataset` is the raw dataset the report's indices refer to. Returns an RGB PIL image (save it as PNG).
    """
    changes = report.top(direction)[:max_features]
    slots = max([len(c.example_indices) for c in changes] + [1])
    pad, line_h = 4, 13
    row_h = max(size, 4 * line_h + 2) + pad
    header = 22
    width = text_width + slots * (size + 2)
    canvas = PIL.Image.new("RGB", (width, header + max(len(changes), 1) * row_h), "white")
    draw = PIL.ImageDraw.Draw(canvas)
    draw.text((4, 4), title or f"{len(changes)} most {direction} features (images where {direction})",
              fill="black", font=_font(14))
    if not changes:
        draw.text((4, header), f"No feature was {direction}.", fill="black", font=_font(12))
    for row, change in enumerate(changes):
        top = header + row * row_h
        for i, line in enumerate(_describe(change, report.class_names)):
            line = line if len(line) <= 58 else line[:57] + "..."  # the full text is in the JSON and HTML
            draw.text((4, top + i * line_h), line, fill="black", font=_font(11))
        canvas.paste(feature_image_strip(dataset, change.example_indices, size=size, slots=slots),
                     (text_width, top))
    return canvas


def _png_base64(image: PIL.Image.Image | bytes) -> str:
    if isinstance(image, PIL.Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        image = buf.getvalue()
    return base64.b64encode(image).decode("ascii")


# ----------------------------------------------------------------------------------------------------------------
# Charts (matplotlib, lazily)
# ----------------------------------------------------------------------------------------------------------------


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or None (logged) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'saeft-hf[demo]'): the report has no charts.")
        return None
    matplotlib.use("Agg")  # headless: never open a window, works on servers
    import matplotlib.pyplot as plt

    return plt


def _figure_png(fig: Any, plt: Any) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def plot_feature_counts(reports: Mapping[str, FeatureChangeReport], *, top: int = 15) -> bytes | None:
    """Bar chart PNG: per model, images on which each top feature was added (up) or removed (down).

    One panel per model, sharing the y axis so the models compare at a glance. None without matplotlib.
    """
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(reports), figsize=(5.5 * len(reports), 3.6), sharey=True, squeeze=False)
    for ax, (name, report) in zip(axes[0], reports.items()):
        added = report.top_added[:top]
        removed = report.top_removed[:top]
        ax.bar(range(len(added)), [c.count for c in added], color="#2a9d8f", label="added (images)")
        ax.bar(range(len(removed)), [-c.count for c in removed], color="#e76f51", label="removed (images)")
        for i, c in enumerate(added):
            ax.text(i, c.count, str(c.feature), ha="center", va="bottom", fontsize=6, rotation=90)
        for i, c in enumerate(removed):
            ax.text(i, -c.count, str(c.feature), ha="center", va="top", fontsize=6, rotation=90)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_title(f"{name}: {report.distinct_added} features added, {report.distinct_removed} removed",
                     fontsize=9)
        ax.set_xlabel(f"feature rank (by {report.rank_by}); labels = feature ids", fontsize=8)
        ax.set_xticks([])
    axes[0][0].set_ylabel("images")
    axes[0][0].legend(fontsize=7, loc="upper right")
    return _figure_png(fig, plt)


def plot_class_changes(reports: Mapping[str, FeatureChangeReport]) -> bytes | None:
    """Grouped bar chart PNG: mean features added per image, per class, one bar per model. None if no classes."""
    if not any(r.per_class for r in reports.values()):
        return None
    plt = _pyplot()
    if plt is None:
        return None
    labels = sorted({c.label for r in reports.values() for c in r.per_class})
    names = {c.label: c.name for r in reports.values() for c in r.per_class}
    width = 0.8 / len(reports)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(labels) * len(reports)), 3.4))
    for m, (name, report) in enumerate(reports.items()):
        by_label = {c.label: c.added_per_image for c in report.per_class}
        xs = [i + (m - (len(reports) - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, [by_label.get(lab, 0.0) for lab in labels], width=width, label=name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels([names[lab] for lab in labels], rotation=45 if len(labels) > 12 else 0, fontsize=8)
    ax.set_ylabel("features added per image")
    ax.set_title("Features added per image, by class", fontsize=10)
    ax.legend(fontsize=8)
    return _figure_png(fig, plt)


# ----------------------------------------------------------------------------------------------------------------
# Feature pages: histograms, captioned strips, patch heatmaps (PIL only: fast, no matplotlib needed)
# ----------------------------------------------------------------------------------------------------------------

#: Colours of the models on a feature page: the pre-trained model first, then the fine-tuned ones in order.
MODEL_COLORS: tuple[str, ...] = ("#6c757d", "#2a9d8f", "#e76f51", "#7b5ea7", "#e9c46a", "#264653")


def _model_colors(models: Sequence[str]) -> dict[str, str]:
    return {m: MODEL_COLORS[i % len(MODEL_COLORS)] for i, m in enumerate(models)}


def activation_histogram(profile: FeatureProfile, *, width: int = 320, height: int = 120) -> PIL.Image.Image:
    """The feature's activation histogram under every model, overlaid as coloured step outlines on shared bins.

    x: the signed code on images where the feature is active (`profile.histogram_edges`); y: images per bin,
    square-root scaled so a rare model's bins stay visible next to a frequent one's. Colours: `MODEL_COLORS`.
    """
    colors = _model_colors(profile.models)
    left, right, top, bottom = 34, 8, 6, 20
    canvas = PIL.Image.new("RGB", (width, height), "white")
    draw = PIL.ImageDraw.Draw(canvas)
    plot_w, plot_h = width - left - right, height - top - bottom
    draw.rectangle((left, top, left + plot_w, top + plot_h), outline=(190, 190, 190))
    peak = max([max(c) for c in profile.histogram_counts.values() if c] + [1])
    bins = len(profile.histogram_edges) - 1
    for model in profile.models:
        counts = profile.histogram_counts.get(model) or [0] * bins
        if not any(counts):
            continue
        points = []
        for b, count in enumerate(counts):
            y = top + plot_h - plot_h * math.sqrt(count / peak)
            x0, x1 = left + plot_w * b / bins, left + plot_w * (b + 1) / bins
            points += [(x0, y), (x1, y)]
        points = [(left, top + plot_h), *points, (left + plot_w, top + plot_h)]
        draw.line(points, fill=colors[model], width=2)
    font = _font(10)
    low, high = profile.histogram_edges[0], profile.histogram_edges[-1]
    draw.text((left, top + plot_h + 4), f"{low:.3g}", fill="black", font=font)
    label = f"{high:.3g}"
    draw.text((left + plot_w - 6 * len(label), top + plot_h + 4), label, fill="black", font=font)
    draw.text((left + plot_w // 2 - 30, top + plot_h + 4), "activation", fill=(90, 90, 90), font=font)
    draw.text((2, top), str(peak), fill="black", font=font)
    draw.text((2, top + plot_h - 10), "0", fill="black", font=font)
    return canvas


def heatmap_overlay(image: Any, grid: np.ndarray, *, vmax: float, vmin: float = 0.0,
                    size: int = 72) -> PIL.Image.Image:
    """`image` (centre-cropped square thumbnail, the crop the model sees) with `grid` [gh, gw] overlaid.

    Values <= `vmin` are transparent; values up to `vmax` go from translucent red to opaque yellow. The image is
    shown in dimmed grey underneath so the colours read as the feature, not the picture.
    """
    base = PIL.ImageOps.grayscale(_thumbnail(image, size)).convert("RGB")
    level = np.asarray(grid, dtype=np.float32) - vmin
    level = np.clip(level / max(vmax - vmin, 1e-12), 0.0, 1.0)
    # Bilinear upsampling of the patch grid: smooth, and each patch's value is exact at its centre.
    level = np.asarray(PIL.Image.fromarray(level, mode="F").resize((size, size), PIL.Image.Resampling.BILINEAR))
    level = np.clip(level, 0.0, 1.0)
    color = np.stack([np.full_like(level, 255.0), 255.0 * level, np.zeros_like(level)], axis=-1)
    alpha = (0.75 * np.sqrt(level))[..., None]
    mixed = (1.0 - alpha) * 0.7 * np.asarray(base, dtype=np.float32) + alpha * color
    return PIL.Image.fromarray(mixed.round().astype(np.uint8), "RGB")


def captioned_strip(dataset: datasets.Dataset, indices: Sequence[int], captions: Sequence[str], *, size: int = 56,
                    slots: int | None = None, maps: np.ndarray | None = None, vmax: float | None = None,
                    vmin: float = 0.0) -> PIL.Image.Image:
    """Like `feature_image_strip`, with a caption (e.g. the activation) under each image, and optionally the
    patch heatmaps `maps` [n, gh, gw] overlaid (`heatmap_overlay`, shared `vmin` / `vmax`)."""
    pad, caption_h = 3, 13
    slots = max(slots or len(indices), 1)
    strip = PIL.Image.new("RGB", (slots * (size + pad) - pad, size + caption_h), "white")
    draw = PIL.ImageDraw.Draw(strip)
    font = _font(10)
    for pos, index in enumerate(list(indices)[:slots]):
        image = dataset[int(index)]["image"]
        if maps is not None and pos < len(maps):
            top = float(np.max(maps)) if vmax is None else vmax
            tile = heatmap_overlay(image, maps[pos], vmax=top, vmin=vmin, size=size)
        else:
            tile = _thumbnail(image, size)
        strip.paste(tile, (pos * (size + pad), 0))
        if pos < len(captions):
            draw.text((pos * (size + pad) + 1, size + 1), captions[pos], fill=(60, 60, 60), font=font)
    for pos in range(len(indices), slots):
        draw.rectangle((pos * (size + pad), 0, pos * (size + pad) + size - 1, size - 1), fill=(235, 235, 235))
    return strip


def plot_feature_density(reports: Mapping[str, FeatureChangeReport], *, bins: int = 30) -> bytes | None:
    """Histogram PNG of log10(firing frequency) across all features: pre-trained vs every fine-tuned model.

    The standard SAE density plot (SAELens, saev): how many features fire on which fraction of images. Features
    that never fire are counted in the legend (log10 of 0 has no bin). None without matplotlib or reports.
    """
    if not reports:
        return None
    plt = _pyplot()
    if plt is None:
        return None
    first = next(iter(reports.values()))
    series = {PRETRAINED_NAME: np.asarray(first.frequency_before)}
    series.update({name: np.asarray(r.frequency_after) for name, r in reports.items()})
    floor = 1.0 / max(first.n_images, 1)
    edges = np.linspace(math.log10(floor), 0.0, bins + 1)
    colors = _model_colors(list(series))
    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    for name, freq in series.items():
        alive = freq[freq > 0]
        ax.hist(np.log10(alive), bins=edges, histtype="step", linewidth=1.6, color=colors[name],
                label=f"{name} ({int((freq == 0).sum())} never fire)")
    ax.set_xlabel("log10(fraction of images where the feature is active)", fontsize=8)
    ax.set_ylabel("features", fontsize=8)
    ax.set_title("Feature density", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    return _figure_png(fig, plt)


# ----------------------------------------------------------------------------------------------------------------
# The HTML report
# ----------------------------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1600px}
h1{font-size:1.5em} h2{margin-top:1.6em;border-bottom:1px solid #ddd} table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ddd;padding:4px 8px;font-size:13px;vertical-align:top} th{background:#f4f4f4}
td.num{text-align:right;font-variant-numeric:tabular-nums} .models{display:flex;gap:24px;align-items:flex-start}
.model{flex:1;min-width:0} .feat{border:1px solid #e3e3e3;border-radius:6px;padding:8px;margin:8px 0}
.feat h4{margin:0 0 4px 0} .muted{color:#666;font-size:12px} img{image-rendering:pixelated;max-width:100%}
.strip{margin:3px 0} .tag{display:inline-block;background:#eef;border-radius:3px;padding:0 4px;margin:1px;font-size:12px}
nav{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;padding:6px 0;z-index:1;font-size:13px}
nav a{margin-right:14px} a{color:#1d5fa7;text-decoration:none} a:hover{text-decoration:underline}
.page{border:1px solid #d5d5d5;border-radius:8px;padding:10px 14px;margin:14px 0;scroll-margin-top:40px}
.page h3{margin:0 0 6px 0} .cols{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
.col{min-width:0} .prompts{margin:4px 0;font-size:13px} .sw{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:4px}
.added{background:#dff3ee} .removed{background:#fbe4dc} .frequency{background:#eee8f6}
"""

_SUMMARY_ROWS: tuple[tuple[str, str, str], ...] = (
    ("n_images", "images analysed", "{:d}"),
    ("added_per_image", "features added per image (mean)", "{:.3f}"),
    ("removed_per_image", "features removed per image (mean)", "{:.3f}"),
    ("images_with_added", "images with at least one added feature", "{:.1%}"),
    ("distinct_added", "distinct features added (on at least one image)", "{:d}"),
    ("distinct_removed", "distinct features removed", "{:d}"),
    ("fvu_before", "SAE FVU, pre-trained embeddings", "{:.4f}"),
    ("fvu_after", "SAE FVU, fine-tuned embeddings", "{:.4f}"),
    ("cka", "linear CKA(pre-trained, fine-tuned)", "{:.4f}"),
)


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "n/a"
    try:
        return spec.format(value)
    except (ValueError, TypeError):
        return str(value)


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _img_tag(data: PIL.Image.Image | bytes, alt: str) -> str:
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{_png_base64(data)}">'


def _feature_html(change: FeatureChange, report: FeatureChangeReport, dataset: datasets.Dataset | None,
                  size: int, *, linked: bool = False) -> str:
    verb = change.direction
    page = f' <a class="muted" href="#feature-{change.feature}">feature page &rarr;</a>' if linked else ""
    parts = [f'<div class="feat"><h4>feature #{change.feature}{page}</h4>',
             f'<div>{verb} on <b>{change.count}</b> images ({change.image_fraction:.1%}); mean |activation| '
             f'{change.mean_abs_activation:.3g}; mass {change.mass:.3g}</div>',
             f'<div class="muted">active before on {change.frequency_before:.1%} of images '
             f'(mean {change.mean_activation_before:.3g}), after on {change.frequency_after:.1%} '
             f'(mean {change.mean_activation_after:.3g})</div>']
    if change.top_classes:
        names = report.class_names or []
        tags = "".join(f'<span class="tag">{_esc(names[c] if c < len(names) else c)}: {n}</span>'
                       for c, n in change.top_classes)
        parts.append(f"<div>classes: {tags}</div>")
    if change.text:
        tags = "".join(f'<span class="tag">{_esc(t["prompt"])} ({t["cosine"]:.2f})</span>' for t in change.text)
        parts.append(f"<div>text (cosine with decoder atom): {tags}</div>")
    if dataset is not None:
        if change.example_indices:
            strip = feature_image_strip(dataset, change.example_indices, size=size)
            parts.append(f'<div class="strip"><div class="muted">images where it was {verb}, strongest first</div>'
                         f'{_img_tag(strip, f"feature {change.feature} {verb}")}</div>')
        if change.exemplar_indices:
            strip = feature_image_strip(dataset, change.exemplar_indices, size=size)
            parts.append('<div class="strip"><div class="muted">top-activating images under the pre-trained '
                         f'model</div>{_img_tag(strip, f"feature {change.feature} exemplars")}</div>')
    parts.append("</div>")
    return "".join(parts)


class _CachedImages:
    """`dataset[i]["image"]` decoded once: a feature's top images recur across pages, strips and models."""

    def __init__(self, dataset: datasets.Dataset) -> None:
        self.dataset = dataset.select_columns(["image"]) if "image" in (dataset.column_names or []) else dataset
        self.cache: dict[int, dict[str, Any]] = {}

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index not in self.cache:
            self.cache[index] = {"image": decode_image(self.dataset[index]["image"])}
        return self.cache[index]


def _role_tag(role: Mapping[str, Any]) -> str:
    kind = role["direction"]
    what = {"added": f"added on {role['count']}", "removed": f"removed on {role['count']}",
            "frequency": f"active on {abs(role['count'])} {'more' if role['count'] > 0 else 'fewer'} images"}[kind]
    return f'<span class="tag {kind}">{_esc(role["model"])}: {what} (#{role["rank"]})</span>'


def _swatch(color: str) -> str:
    return f'<span class="sw" style="background:{color}"></span>'


def _index_html(profiles: Sequence[FeatureProfile]) -> str:
    models = profiles[0].models
    head = "".join(f"<th>{_esc(m)}</th>" for m in models)
    out = ['<h2 id="index">Feature index</h2><p class="muted">One page per feature below. Frequency = fraction of '
           "images where the feature is active; mean = mean signed activation over those images.</p>",
           f'<table><tr><th rowspan="2">feature</th><th rowspan="2">why listed</th><th colspan="{len(models)}">'
           f'frequency</th><th colspan="{len(models)}">mean activation</th><th rowspan="2">closest prompt</th></tr>'
           f"<tr>{head}{head}</tr>"]
    for p in profiles:
        freq = "".join(f'<td class="num">{p.frequency[m]:.1%}</td>' for m in models)
        mean = "".join(f'<td class="num">{p.mean_activation[m]:.3g}</td>' for m in models)
        prompt = _esc(p.text[0]["prompt"]) if p.text else ""
        out.append(f'<tr><td><a href="#feature-{p.feature}">#{p.feature}</a></td>'
                   f'<td>{"".join(_role_tag(r) for r in p.roles)}</td>{freq}{mean}<td>{prompt}</td></tr>')
    out.append("</table>")
    return "".join(out)


def _profile_html(p: FeatureProfile, reports: Mapping[str, FeatureChangeReport], dataset: datasets.Dataset | None,
                  patch_maps: Mapping[int, Mapping[str, np.ndarray]] | None, size: int, text_note: str) -> str:
    colors = _model_colors(p.models)
    out = [f'<div class="page" id="feature-{p.feature}"><h3>Feature #{p.feature} '
           f'<a class="muted" href="#index">&uarr; index</a></h3>',
           f'<div>{"".join(_role_tag(r) for r in p.roles)}</div><div class="cols"><div class="col">',
           "<table><tr><th>model</th><th>frequency</th><th>mean activation</th><th>max |activation|</th>"
           "<th>added on</th><th>removed on</th></tr>"]
    for m in p.models:
        report = reports.get(m)
        added = f"{report.added_count[p.feature]}" if report else "-"
        removed = f"{report.removed_count[p.feature]}" if report else "-"
        out.append(f"<tr><td>{_swatch(colors[m])}{_esc(m)}</td><td class='num'>{p.frequency[m]:.2%}</td>"
                   f"<td class='num'>{p.mean_activation[m]:.3g}</td><td class='num'>{p.max_activation[m]:.3g}</td>"
                   f"<td class='num'>{added}</td><td class='num'>{removed}</td></tr>")
    out.append("</table>")
    out.append('</div><div class="col"><div class="muted">activation histogram (active images; sqrt scale)</div>'
               f'{_img_tag(activation_histogram(p), f"feature {p.feature} activation histogram")}</div></div>')
    if p.text:
        tags = "".join(f'<span class="tag">{_esc(t["prompt"])} ({t["cosine"]:.2f})</span>' for t in p.text)
        out.append(f'<div class="prompts">closest prompts (cosine with the decoder atom): {tags}</div>')
    else:
        out.append(f'<div class="prompts muted">closest prompts: {_esc(text_note)}</div>')
    if dataset is not None:
        maps = (patch_maps or {}).get(p.feature)
        # One colour scale per feature, shared by every model's maps: the lowest patch shown is transparent, the
        # highest yellow, so the maps compare across models and show where in the image the feature responds.
        shown = [np.asarray(v) for v in (maps or {}).values() if np.size(v)]
        vmin = min(float(v.min()) for v in shown) if shown else 0.0
        vmax = max(float(v.max()) for v in shown) if shown else 0.0
        out.append('<div class="cols">')
        for m in p.models:
            rows = p.top_indices.get(m, [])
            captions = [f"{v:.3g}" for v in p.top_activations.get(m, [])]
            slots = max(len(v) for v in p.top_indices.values()) or 1
            body = (_img_tag(captioned_strip(dataset, rows, captions, size=size, slots=slots),
                             f"feature {p.feature} top images {m}") if rows else "<div class='muted'>never active</div>")
            heat = ""
            if maps is not None and rows and m in maps:
                heat = (f'<div class="muted" title="SAE encoder pre-activation of each patch token; colour scale '
                        f'shared by the models">patch heatmap ({vmin:.3g} clear, {vmax:.3g} yellow)</div>'
                        + _img_tag(captioned_strip(dataset, rows, captions, size=size, slots=slots, maps=maps[m],
                                                   vmax=vmax, vmin=vmin), f"feature {p.feature} heatmaps {m}"))
            out.append(f'<div class="col topimgs" data-model="{_esc(m)}"><div>{_swatch(colors[m])}<b>{_esc(m)}</b>: '
                       f"top-activating images</div>{body}{heat}</div>")
        out.append('</div><div class="cols">')
        for name, report in reports.items():
            for direction in DIRECTIONS:
                change = next((c for c in report.top(direction) if c.feature == p.feature), None)
                if change is not None and change.example_indices:
                    captions = [f"{v:.3g}" for v in change.example_activations]
                    strip = captioned_strip(dataset, change.example_indices, captions, size=size)
                    out.append(f'<div class="col strip"><div class="muted">{_esc(name)}: images where it was '
                               f"{direction} (|activation|)</div>"
                               f"{_img_tag(strip, f'feature {p.feature} {direction} {name}')}</div>")
        out.append("</div>")
    out.append("</div>")
    return "".join(out)


def write_report(
    reports: Mapping[str, FeatureChangeReport],
    path: str | Path,
    *,
    dataset: datasets.Dataset | None = None,
    title: str = "What fine-tuning changed, in SAE features",
    description: str | None = None,
    max_features: int = 12,
    image_size: int = 48,
    profiles: Sequence[FeatureProfile] | None = None,
    patch_maps: Mapping[int, Mapping[str, np.ndarray]] | None = None,
    text_note: str = "none (no text model given)",
) -> Path:
    """Write ONE self-contained HTML file (charts and images embedded as base64 PNG) comparing `reports`.

    Args:
        reports: {model name: report}, e.g. {"FT": ..., "SAE-FT": ...}; models are shown side by side in this order.
            All must come from the same images (same dataset rows) for the image strips to be meaningful.
        path: the .html file to write (parent directories are created).
        dataset: the raw dataset (`image` column) the reports' indices refer to; without it, no image strips.
        description: a free-text paragraph under the title (e.g. the models' paths and the split).
        max_features: features shown per model and direction.
        profiles: feature pages (`profile_features`): an index and, per feature, its frequency / mean activation
            under every model, activation histogram, top-activating images under every model side by side, the
            images where it was added / removed, and its closest prompts.
        patch_maps: {feature: {model: [n, gh, gw]}} patch heatmaps aligned with `profile.top_indices[model]`
            (`patch_activations`; SAEs on hidden states), overlaid on the top images.
        text_note: what the pages say when a feature has no prompts (e.g. why there is no text).
    """
    if not reports:
        raise ValueError("write_report needs at least one report.")
    if dataset is not None:
        dataset = _CachedImages(dataset)  # type: ignore[assignment]  # duck-typed: rows are read as dataset[i]["image"]
    names = list(reports)
    first = reports[names[0]]
    out = ['<!DOCTYPE html><html><head><meta charset="utf-8">', f"<title>{_esc(title)}</title>",
           f"<style>{_CSS}</style></head><body>", f"<h1>{_esc(title)}</h1>"]
    nav = [("summary", "Summary"), ("density", "Feature density")]
    if any(r.per_class for r in reports.values()):
        nav.append(("per-class", "Per class"))
    if profiles:
        nav.append(("index", "Feature index"))
    nav += [(f"most-{d}", f"Most {d}") for d in DIRECTIONS]
    out.append("<nav>" + "".join(f'<a href="#{a}">{_esc(t)}</a>' for a, t in nav) + "</nav>")
    if description:
        out.append(f"<p>{_esc(description)}</p>")
    out.append(
        f'<p class="muted">SAE: d_sae={first.d_sae}, k={first.k}; SAE inputs: {_esc(first.input_regime)}. A feature is '
        "<i>added</i> on an image when its code is non-zero for the fine-tuned model and zero for the pre-trained "
        "one, <i>removed</i> for the reverse. Features are ranked by "
        f"{_esc(first.rank_by)} (mass = images x mean |activation|). FVU = sum of squared reconstruction errors / "
        "sum of squared deviations from the mean; CKA is linear CKA on the raw embeddings.</p>")

    out.append("<h2 id='summary'>Summary</h2><table><tr><th></th>" + "".join(f"<th>{_esc(n)}</th>" for n in names) + "</tr>")
    for key, label, spec in _SUMMARY_ROWS:
        cells = "".join(f'<td class="num">{_fmt(getattr(reports[n], key), spec)}</td>' for n in names)
        out.append(f"<tr><td>{_esc(label)}</td>{cells}</tr>")
    out.append("</table>")

    counts_png, class_png = plot_feature_counts(reports), plot_class_changes(reports)
    if counts_png or class_png:
        out.append("<h2>Added and removed features</h2>")
        for png, alt in ((counts_png, "feature counts"), (class_png, "changes per class")):
            if png:
                out.append(f"<div>{_img_tag(png, alt)}</div>")

    density_png = plot_feature_density(reports)
    if density_png:
        out.append("<h2 id='density'>Feature density</h2><p class='muted'>How many features fire on which fraction "
                   "of the images, before and after fine-tuning.</p>" + _img_tag(density_png, "feature density"))

    if any(r.per_class for r in reports.values()):
        out.append("<h2 id='per-class'>Per class</h2><table><tr><th>class</th><th>images</th>")
        out.extend(f"<th>{_esc(n)}: added / removed per image</th><th>{_esc(n)}: top added</th>"
                   f"<th>{_esc(n)}: top removed</th>" for n in names)
        out.append("</tr>")
        by_model = {n: {c.label: c for c in reports[n].per_class} for n in names}
        for label in sorted({lab for rows in by_model.values() for lab in rows}):
            ref = next(rows[label] for rows in by_model.values() if label in rows)
            cells = [f"<td>{_esc(ref.name)}</td><td class='num'>{ref.n_images}</td>"]
            for n in names:
                c = by_model[n].get(label)
                if c is None:
                    cells.append("<td>-</td><td>-</td><td>-</td>")
                    continue
                fmt = lambda items: ", ".join(f"#{e['feature']} ({e['fraction']:.0%})" for e in items)  # noqa: E731
                cells.append(f"<td class='num'>{c.added_per_image:.2f} / {c.removed_per_image:.2f}</td>"
                             f"<td>{_esc(fmt(c.top_added))}</td><td>{_esc(fmt(c.top_removed))}</td>")
            out.append("<tr>" + "".join(cells) + "</tr>")
        out.append("</table>")

    if profiles:
        out.append(_index_html(profiles))
        out.append("<h2>Feature pages</h2>")
        out.extend(_profile_html(p, reports, dataset, patch_maps, image_size, text_note) for p in profiles)

    paged = {p.feature for p in profiles or ()}
    for direction in DIRECTIONS:
        out.append(f"<h2 id='most-{direction}'>Most {direction} features</h2><div class='models'>")
        for n in names:
            report = reports[n]
            changes = report.top(direction)[:max_features]
            out.append(f"<div class='model'><h3>{_esc(n)}</h3>")
            if not changes:
                out.append(f"<p>No feature was {direction}.</p>")
            out.extend(_feature_html(c, report, dataset, image_size, linked=c.feature in paged) for c in changes)
            out.append("</div>")
        out.append("</div>")
    out.append("</body></html>")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(out), encoding="utf-8")
    os.replace(tmp, path)
    return path
