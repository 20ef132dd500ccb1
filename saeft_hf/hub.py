"""Model cards and pushing a training run (model or adapter, its SAE, results, card) to the Hub in one commit.

A failed push never touches the local outputs, and its message says how to retry; tokens are never printed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

from .atomic import write_text_atomic
from .environment import framework_versions

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

{{ summary }}

## Quick start
{{ quick_start_intro }}

```python
{{ usage }}
```

## Evaluation
{{ eval_table }}

## WiSE-FT
{{ wise_ft_section }}

## Training
{{ training_table }}

## Framework versions
{{ versions }}

## Citation
Trained with [saeft-hf](https://github.com/saeft-hf/saeft-hf): SAE-FT
([arXiv 2605.15961](https://arxiv.org/abs/2605.15961)) penalises sparse-autoencoder features that fine-tuning adds or
removes, and embedding drift the SAE dictionary cannot explain. The SAE is in the `sae/` folder of this repository.

```bibtex
{{ citation }}
```
"""

#: The paper, as its arXiv page lists it (title, authors in order, identifier).
CITATION_BIBTEX = """@misc{morelli2026saeft,
  title         = {Sparse Autoencoders enable Robust and Interpretable Fine-tuning of {CLIP} models},
  author        = {Morelli, Fabian and Uselis, Arnas and Sonthalia, Ankit and Oh, Seong Joon},
  year          = {2026},
  eprint        = {2605.15961},
  archivePrefix = {arXiv},
  primaryClass  = {cs.CV},
  url           = {https://arxiv.org/abs/2605.15961}
}"""

#: The first line of a card's quick start; replace the string with a repo id or a local folder to run it.
QUICK_START_PATH_LINE = 'path = "{target}"  # this repository, or the local folder it was saved to'

PRETTY_NAMES = {
    "imagenet": "ImageNet", "imagenetv2": "ImageNet-V2", "imagenet_v2": "ImageNet-V2", "imagenet_r": "ImageNet-R",
    "imagenet_a": "ImageNet-A", "imagenet_sketch": "ImageNet-Sketch", "objectnet": "ObjectNet",
}


# Published CLIP ViT-B/16 numbers (top-1 %, METHOD.md section 6), shown beside a run's own for reference only.
PAPER_REFERENCE = {
    "zero-shot": {"imagenet": 68.3, "imagenetv2": 61.9, "imagenet_r": 77.7, "imagenet_a": 50.0,
                  "imagenet_sketch": 48.3, "objectnet": 54.2, "avg_shift": 58.4},
    "FT": {"imagenet": 81.3, "imagenetv2": 70.6, "imagenet_r": 65.6, "imagenet_a": 36.6, "imagenet_sketch": 45.1,
           "objectnet": 50.5, "avg_shift": 53.7},
    "WiSE-FT": {"imagenet": 82.5, "imagenetv2": 73.1, "imagenet_r": 75.1, "imagenet_a": 47.6,
                "imagenet_sketch": 51.6, "objectnet": 55.7, "avg_shift": 60.6},
}
# Summary entries of a results mapping that are not eval sets.
_SUMMARY_KEYS = ("id", "avg_shift", "avg_shift_no_objectnet", "num_shifts")


def _eval_table(results: Mapping[str, Any], wise_ft: Mapping[str, Any] | None) -> str:
    """Fine-tuned (and WiSE-FT) top-1 per set and the shift average, with the published ViT-B/16 numbers when the
    sets are ImageNet's (Avg-5 only when all five shifts were evaluated)."""
    sets = [k for k, v in results.items() if k not in _SUMMARY_KEYS and isinstance(v, (int, float))]
    if not sets:
        return "Not recorded."
    best = None
    if wise_ft:
        best = wise_ft["results"][wise_ft["alphas"].index(wise_ft["best_alpha"])]
    rows = list(sets)
    num_shifts = int(results.get("num_shifts", 0))
    if "avg_shift" in results:
        rows.append("avg_shift")
    refs = [name for name, ref in PAPER_REFERENCE.items() if set(sets) <= set(ref)]
    header = ["set", "fine-tuned"] + ([f"WiSE-FT (alpha {wise_ft['best_alpha']:g})"] if best else [])
    header += [f"{name} (paper)" for name in refs]

    def cell(values: Mapping[str, Any] | None, key: str, scale: float = 100.0, digits: int = 2) -> str:
        value = (values or {}).get(key)
        return "" if value is None else f"{scale * float(value):.{digits}f}"

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in rows:
        label = PRETTY_NAMES.get(key, key) if key != "avg_shift" else (
            "Avg-5 (shifts)" if num_shifts == 5 else f"shift average ({num_shifts} sets)")
        row = [label, cell(results, key)] + ([cell(best, key)] if best else [])
        row += [cell(PAPER_REFERENCE[name], key, 1.0, 1) if key != "avg_shift" or num_shifts == 5 else ""
                for name in refs]
        lines.append("| " + " | ".join(row) + " |")
    notes = ["Top-1 accuracy (%)."]
    if best:
        notes.append(f"WiSE-FT alpha chosen on `{wise_ft['select_on']}`"
                     + (f" ({wise_ft['selection']})" if wise_ft.get("selection") else "")
                     + ", never on a reported set; the model at that alpha is in the `wise_ft/` folder.")
    if refs:
        notes.append("Paper columns: published CLIP ViT-B/16 numbers (WiSE-FT lineage), for reference only.")
    return "\n".join(lines) + "\n\n" + " ".join(notes)


_INFERENCE = """inputs = processor(images=Image.new("RGB", (256, 256), "white"), return_tensors="pt")  # your image here
with torch.no_grad():
    out = model(**inputs)
print(model.config.id2label[int(out.logits.argmax(-1))])"""


def _quick_start(target: str, base_model: str | None, is_adapter: bool, wise_ft: Mapping[str, Any] | None
                 ) -> tuple[str, str]:
    """(a sentence, a runnable snippet) loading the model or adapter, classifying an image, and loading the SAE.

    The snippet's first line is `QUICK_START_PATH_LINE`: replacing its string with a local folder or repo id is all it
    takes to run it (the tests do exactly that on a saved run)."""
    base = base_model or "<the pre-trained CLIP checkpoint>"
    lines = [QUICK_START_PATH_LINE.format(target=target), "import torch", "from PIL import Image"]
    if is_adapter:
        intro = (f"A LoRA adapter (PEFT) on the vision tower of `{base}`, with the trained classification head. "
                 "PEFT loads it onto the pre-trained CLIP that `adapter_config.json` records; the classifier around "
                 "it (classes, head, representation) is described by `base/config.json`.")
        lines += [
            "from peft import PeftConfig, PeftModel",
            "from transformers import AutoConfig, AutoImageProcessor",
            "",
            "from saeft_hf import SAEFTCLIPForImageClassification, SparseAutoencoder",
            "",
            "base_model = PeftConfig.from_pretrained(path).base_model_name_or_path  # the pre-trained CLIP",
            "config = AutoConfig.from_pretrained(path, subfolder=\"base\")  # classes, head and representation",
            "base = SAEFTCLIPForImageClassification.from_pretrained(base_model, config=config)",
            "model = PeftModel.from_pretrained(base, path).eval()  # model.merge_and_unload() folds the adapter in",
            "processor = AutoImageProcessor.from_pretrained(base_model)",
        ]
    else:
        intro = (f"A CLIP image classifier (vision tower, visual projection, and a head on the L2-normalised image "
                 f"embedding) fine-tuned from `{base}`. With saeft-hf installed it loads through transformers' Auto "
                 "classes; without it, the vision tower loads as `CLIPVisionModelWithProjection` and the head is "
                 "`classifier.weight` / `classifier.bias` in `model.safetensors` (both shown below).")
        lines += [
            "from transformers import AutoImageProcessor, AutoModelForImageClassification",
            "",
            "import saeft_hf  # registers the SAE-FT classifier with transformers' Auto classes",
            "from saeft_hf import SAEFTCLIPForImageClassification, SparseAutoencoder",
            "",
            "model = AutoModelForImageClassification.from_pretrained(path).eval()",
            f"processor = AutoImageProcessor.from_pretrained(\"{base}\")  # the pre-trained CLIP's preprocessing",
        ]
    lines += _INFERENCE.splitlines()
    if not is_adapter:
        lines += [
            "",
            "# The same logits with transformers alone:",
            "import os",
            "from huggingface_hub import hf_hub_download",
            "from safetensors.torch import load_file",
            "from transformers import CLIPVisionModelWithProjection",
            "",
            "vision = CLIPVisionModelWithProjection.from_pretrained(path).eval()  # `classifier.*` is left out",
            "weights = load_file(os.path.join(path, \"model.safetensors\") if os.path.isdir(path)",
            "                    else hf_hub_download(path, \"model.safetensors\"))",
            "with torch.no_grad():",
            "    image_embeds = torch.nn.functional.normalize(vision(**inputs).image_embeds, dim=-1)",
            "logits = image_embeds @ weights[\"classifier.weight\"].T + weights[\"classifier.bias\"]",
        ]
    if wise_ft:
        lines += ["", f"# WiSE-FT at alpha {float(wise_ft['best_alpha']):g}, chosen on `{wise_ft['select_on']}` "
                      "(a full model):",
                  # The class itself, not the Auto class: next to an adapter, transformers' Auto loading would
                  # look for the adapter's base model in the subfolder.
                  "wise = SAEFTCLIPForImageClassification.from_pretrained(path, subfolder=\"wise_ft\")"]
    lines += ["", "# The SAE of the pre-trained model (the SAE-FT dictionary) and this image's features in it:",
              "sae = SparseAutoencoder.from_pretrained(path, subfolder=\"sae\")",
              "codes = sae(out.representation).codes  # [1, d_sae], the input as the SAE was trained on"]
    return intro, "\n".join(lines)


def _wise_ft_section(wise_ft: Mapping[str, Any] | None) -> str:
    """How WiSE-FT's alpha was chosen, and the sweep it was chosen from."""
    if not wise_ft:
        return "No WiSE-FT sweep was run with this model (`--wise_ft_alphas`)."
    select_on, best = wise_ft["select_on"], float(wise_ft["best_alpha"])
    text = (f"theta = (1 - alpha) theta_0 + alpha theta_fine-tuned, over all weights including the head (for an "
            f"adapter, alpha scales its delta). Chosen: **alpha {best:g}**, the best accuracy on `{select_on}`"
            + (f" ({wise_ft['selection']})" if wise_ft.get("selection") else "")
            + ", never on a reported set; that model is in the `wise_ft/` folder.")
    header = ["alpha", f"{select_on} (selection)", "ID", "shift average"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for alpha, values in zip(wise_ft["alphas"], wise_ft["results"]):
        cells = [f"{100 * values[k]:.2f}" if isinstance(values.get(k), (int, float)) else ""
                 for k in (select_on, "id", "avg_shift")]
        mark = " (chosen)" if float(alpha) == best else ""
        lines.append(f"| {float(alpha):g}{mark} | " + " | ".join(cells) + " |")
    return text + "\n\n" + "\n".join(lines) + "\n\nTop-1 accuracy (%); alpha 0 is the pre-trained model with its initial head."


def _redact(text: str, token: str | None = None) -> str:
    """Remove anything that looks like a Hugging Face token, and the given token whatever its form."""
    if token:
        text = text.replace(token, "***")
    return re.sub(r"hf_[A-Za-z0-9]{8,}", "hf_***", text)


def _table(rows: Mapping[str, Any], header: tuple[str, str]) -> str:
    if not rows:
        return "Not recorded."
    body = "\n".join(
        f"| {key} | {f'{value:.4g}' if isinstance(value, float) else value} |" for key, value in rows.items()
    )
    return f"| {header[0]} | {header[1]} |\n|---|---|\n{body}"


def build_model_card(
    *,
    model_name: str,
    base_model: str | None,
    results: Mapping[str, float] | None = None,
    wise_ft: Any = None,
    hyperparameters: Mapping[str, Any] | None = None,
    dataset_id: str | None = None,
    is_adapter: bool = False,
    repo_id: str | None = None,
) -> ModelCard:
    """A card with `model-index` evaluation results (accuracies in [0, 1], reported in percent) and a table of the
    fine-tuned and (with `wise_ft`, a `WiseFTResult` or its dict) the chosen WiSE-FT model's numbers."""
    results = dict(results or {})
    if wise_ft is not None and not isinstance(wise_ft, Mapping):
        wise_ft = wise_ft.to_dict()
    eval_results = [
        EvalResult(
            task_type="image-classification",
            dataset_type=name,
            dataset_name=PRETTY_NAMES.get(name, name),
            metric_type="accuracy",
            metric_value=round(100 * value, 2),
        )
        for name, value in results.items()
        if isinstance(value, float) and name not in _SUMMARY_KEYS and not name.startswith("avg")
    ]
    card_data = ModelCardData(
        library_name="peft" if is_adapter else "transformers",
        license="apache-2.0",
        base_model=base_model if base_model and not os.path.isdir(base_model) else None,
        datasets=[dataset_id] if dataset_id and not os.path.isdir(dataset_id) else None,
        pipeline_tag="image-classification",
        tags=["clip", "sae-ft", "sparse-autoencoder", "robust-fine-tuning"] + (["lora"] if is_adapter else []),
        model_name=model_name,
        eval_results=eval_results or None,
    )
    target = repo_id or "<this repo id or local folder>"
    intro, usage = _quick_start(target, base_model, is_adapter, wise_ft)
    return ModelCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE,
        model_name=model_name,
        summary=f"A CLIP image classifier fine-tuned from `{base_model}` with saeft-hf"
        f"{' (LoRA adapter)' if is_adapter else ''}.",
        quick_start_intro=intro,
        usage=usage,
        eval_table=_eval_table(results, wise_ft),
        wise_ft_section=_wise_ft_section(wise_ft),
        training_table=_table(dict(hyperparameters or {}), ("hyper-parameter", "value")),
        versions="\n".join(f"- {name}: {version}" for name, version in framework_versions().items()),
        citation=CITATION_BIBTEX,
    )


def write_model_card(output_dir: str | Path, **kwargs: Any) -> Path:
    """Render `build_model_card(**kwargs)` into `output_dir/README.md`."""
    return write_text_atomic(Path(output_dir) / "README.md", str(build_model_card(**kwargs)))


# What a push leaves out (fnmatch on paths relative to output_dir, where `*` also matches `/`): checkpoints, pickles,
# logs, hidden files, and every cache (`saeft_hf.cache.CACHE_DIRNAME`, plus the `sae_embeddings.safetensors` and
# `reference_embeddings_<split>.safetensors` that older versions wrote at the top level): caches are large,
# rebuildable, and hold tensors derived from the training data.
PUSH_IGNORE_PATTERNS: tuple[str, ...] = (
    "checkpoint-*", "checkpoint-*/**", "*.pt", "*.pth", "*.bin", "runs/**", ".*",
    "cache/*", "cache/**", "*_embeddings*.safetensors",
)


def push_run_to_hub(
    output_dir: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload SAE-FT model, SAE and results",
    revision: str | None = None,
) -> str:
    """Upload `output_dir` (model or adapter, `sae/`, results JSON, README) to `repo_id` in one commit.

    Checkpoints, optimizer states, pickled training args and caches (`cache/`, any `*_embeddings*.safetensors`) stay
    local (`PUSH_IGNORE_PATTERNS`). On failure, local files are untouched and
    the raised error says how to retry.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise FileNotFoundError(f"Nothing to push: {output_dir} does not exist.")
    api = HfApi(token=token)
    try:
        repo = api.create_repo(repo_id=repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=getattr(repo, "repo_id", repo_id),
            folder_path=str(output_dir),
            commit_message=commit_message,
            revision=revision,
            ignore_patterns=list(PUSH_IGNORE_PATTERNS),
        )
    except Exception as err:
        raise RuntimeError(
            f"Pushing {output_dir} to the Hub repo {repo_id} failed "
            f"({type(err).__name__}: {_redact(str(err), token)}). "
            f"Your local outputs are intact. Log in with `hf auth login` (or set HF_TOKEN), check the network, then "
            f"retry with: hf upload {repo_id} {output_dir} --exclude 'checkpoint-*' '*.pt' '*.bin' 'cache/*' "
            "'*_embeddings*.safetensors'"
        ) from None
    return str(getattr(commit, "commit_url", commit))


def save_results(path: str | Path, results: Mapping[str, Any]) -> Path:
    """Write results JSON atomically (a temporary file, synced, then `os.replace`)."""
    return write_text_atomic(path, json.dumps(results, indent=2, sort_keys=True))
