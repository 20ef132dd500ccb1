"""Evaluating a model the way the recipes do: load it (run directory, local or Hub model, full or adapter), score the
eval sets sharded over all processes, sweep WiSE-FT with alpha chosen on held-out data, save the chosen model.

``recipes/evaluate.py`` and the training pipeline (:func:`saeft_hf.pipeline.run_saeft`) both call
:func:`evaluate_model` on a model loaded by :func:`load_for_evaluation`, so a training run's own numbers and a
later evaluation of the saved run are the same computation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from torch import nn

from ..atomic import write_dir_atomic
from ..data import AnyDataset, random_subset
from .accuracy import count_correct, shift_averages
from .specs import EvalSetSpec
from .wise_ft import INITIAL_HEAD_FILE, WiseFTResult, load_initial_head, select_alpha, wise_ft, wise_ft_variants

logger = logging.getLogger(__name__)

WISE_FT_SUBFOLDER = "wise_ft"
HOLDOUT_NAME = "train_holdout"
# Files a Hub download of a run skips: what evaluation never reads.
_DOWNLOAD_IGNORE = ["checkpoint-*", f"{WISE_FT_SUBFOLDER}/*", "sae/*", "*.bin", "*.pt", "*.pth", "runs/*"]


# ----------------------------------------------------------------------------------------------------------------
# Held-out selection data
# ----------------------------------------------------------------------------------------------------------------


def holdout_split(dataset: AnyDataset, holdout: float, seed: int) -> tuple[AnyDataset, AnyDataset, str]:
    """``(train, held_out, description)``: a seeded random slice of a map-style training set, removed from it.

    ``holdout`` >= 1 is a number of images, below 1 a fraction (at least one image). The held-out images choose
    WiSE-FT's alpha, so no reported set (ImageNet validation included) selects anything.
    """
    if isinstance(dataset, datasets.IterableDataset) or not hasattr(dataset, "__len__"):
        raise ValueError("A WiSE-FT hold-out cannot be cut from a streaming training set (no random access). Give "
                         "held-out ID data as an eval set with `role: holdout` (e.g. a folder of training images "
                         "you keep out of the stream) and pass its name as wise_ft_select_on, or set "
                         "wise_ft_holdout=0 and sweep later with recipes/evaluate.py.")
    n_total = len(dataset)
    n = int(holdout) if holdout >= 1 else max(1, int(round(holdout * n_total)))
    if holdout <= 0 or n >= n_total:
        raise ValueError(f"wise_ft_holdout={holdout} leaves no training images (the training set has {n_total}); "
                         "use a fraction in (0, 1) or fewer images.")
    perm = np.random.default_rng(seed).permutation(n_total)
    held, kept = np.sort(perm[:n]), np.sort(perm[n:])
    description = (f"{n} of the {n_total} training images held out at random (seed {seed}) before training; "
                   "they are not used for training and not reported")
    return dataset.select(kept.tolist()), dataset.select(held.tolist()), description


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A model ready to evaluate, and how to get its pre-trained counterpart for WiSE-FT."""

    model: nn.Module
    path: str
    base_model: str | None
    is_adapter: bool
    kind: str  # "run" (our classifier), "adapter" or "clip" (a CLIP checkpoint with a zero-shot head)
    _pretrained: Callable[[], nn.Module | None] = field(repr=False, default=lambda: None)

    def wise_ft_pretrained(self) -> nn.Module | None:
        """theta_0 for :func:`evaluate_model`: the pre-trained model (full runs), None for an adapter (its base
        weights are inside it). Raises a ValueError saying why when this model cannot be swept."""
        return self._pretrained()


@contextlib.contextmanager
def _quiet_loading(report: bool) -> Iterator[None]:
    """No weight-loading progress bars; with ``report=False`` also no load report. Loading our classifier from a
    CLIPModel checkpoint leaves the text tower unused and the head to fill, by construction: that report is noise."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    if not report:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _local_dir(name_or_path: str, token: str | bool | None) -> str:
    if os.path.isdir(name_or_path):
        return name_or_path
    from huggingface_hub import snapshot_download

    return snapshot_download(name_or_path, token=token, ignore_patterns=_DOWNLOAD_IGNORE)


def load_for_evaluation(
    name_or_path: str,
    *,
    classnames: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    token: str | bool | None = None,
) -> LoadedModel:
    """Load a saved run (full model or LoRA adapter), or a CLIP checkpoint (with a zero-shot head), in fp32.

    Runs saved by saeft-hf record their source CLIP checkpoint (``config.source_model``) and the head their
    fine-tuning started from (``initial_head.safetensors``); together they are the pre-trained model WiSE-FT
    interpolates from (``LoadedModel.pretrained()``; for an adapter the base weights inside it are used). A CLIP
    checkpoint gets a zero-shot head for ``classnames`` / ``templates`` (default: the ImageNet ones).
    """
    from ..lora import load_classifier
    from ..modeling import SAEFTCLIPForImageClassification

    path = _local_dir(name_or_path, token)
    config_file = os.path.join(path, "config.json")
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as fh:
            model_type = json.load(fh).get("model_type")
        if model_type == "clip":
            from ..imagenet_classes import IMAGENET_TEMPLATES, imagenet_classnames
            from ..zeroshot import from_clip

            model = from_clip(path, list(classnames or imagenet_classnames()), list(templates or IMAGENET_TEMPLATES),
                              progress=False)

            def zero_shot() -> nn.Module | None:
                raise ValueError(f"{name_or_path} is a CLIP checkpoint: it is the pre-trained model, there is no "
                                 "fine-tuned model to interpolate with.")

            return LoadedModel(model=model, path=path, base_model=name_or_path, is_adapter=False, kind="clip",
                               _pretrained=zero_shot)
    is_adapter = os.path.isfile(os.path.join(path, "adapter_config.json"))
    with _quiet_loading(report=not is_adapter):  # an adapter's base comes from the CLIP checkpoint
        model = load_classifier(path, dtype=torch.float32)
    base = model.get_base_model() if is_adapter else model
    source = base.config.source_model
    has_head = os.path.isfile(os.path.join(path, INITIAL_HEAD_FILE))

    def unavailable() -> nn.Module | None:
        raise ValueError(f"{name_or_path} has no {INITIAL_HEAD_FILE} (the head its fine-tuning started from), so "
                         "its pre-trained end cannot be rebuilt for WiSE-FT. Runs saved by this version of saeft-hf "
                         "record it; otherwise sweep WiSE-FT in the training run.")

    pretrained: Callable[[], nn.Module | None] = unavailable
    if is_adapter and has_head:
        from peft.utils import ModulesToSaveWrapper

        # The adapter holds the trained head only; its `original_module` is a placeholder until the initial head is
        # written in (WiSE-FT's alpha 0 end). scale_lora then interpolates inside the adapter: no theta_0 model.
        head = base.classifier
        load_initial_head(_HeadHolder(head.original_module if isinstance(head, ModulesToSaveWrapper) else head), path)
        pretrained = lambda: None  # noqa: E731
    elif has_head and source:
        config = base.config

        def pretrained() -> nn.Module | None:
            with _quiet_loading(report=False):  # the source is a CLIPModel checkpoint; the head is written next
                theta0 = SAEFTCLIPForImageClassification.from_pretrained(source, config=config, dtype=torch.float32)
            load_initial_head(theta0, path)
            return theta0

    return LoadedModel(model=model, path=path, base_model=source, is_adapter=is_adapter,
                       kind="adapter" if is_adapter else "run", _pretrained=pretrained)


class _HeadHolder(nn.Module):
    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier


def transform_for(loaded: LoadedModel) -> Callable[[Any], torch.Tensor]:
    """The eval transform: the run's own preprocessor config, else its source checkpoint's."""
    from ..data import transforms_from_pretrained

    own = os.path.isfile(os.path.join(loaded.path, "preprocessor_config.json"))
    source = loaded.path if own or not loaded.base_model else loaded.base_model
    return transforms_from_pretrained(source)[1]


# ----------------------------------------------------------------------------------------------------------------
# Evaluating
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class EvalReport:
    """What :func:`evaluate_model` measured. ``final``: the model's accuracy per reported set plus ``id``,
    ``avg_shift`` (mean over ``role: shift`` sets only), ...; ``num_examples``: images counted per set (all
    processes); ``wise_ft``: the sweep; ``wise_ft_model``: the model at the chosen alpha (a plain model)."""

    final: dict[str, float]
    num_examples: dict[str, int]
    precision: str
    wise_ft: WiseFTResult | None = None
    wise_ft_model: nn.Module | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"final": self.final, "num_examples": self.num_examples, "precision": self.precision}
        if self.wise_ft is not None:
            out["wise_ft"] = self.wise_ft.to_dict()
        return out


def _unwrap(model: nn.Module) -> nn.Module:
    """The bare module: no DDP container and no mixed-precision autocast wrapper on ``forward`` (accelerate leaves
    one on a model prepared with bf16/fp16, and deep copies inherit it), so evaluation runs in its own precision."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_fp32_wrapper=False)


def evaluate_model(
    model: nn.Module,
    sets: Mapping[str, tuple[AnyDataset, EvalSetSpec | None]],
    transform: Callable[[Any], torch.Tensor] | None,
    *,
    id_name: str | None = None,
    shift_names: Sequence[str] = (),
    pretrained: nn.Module | None = None,
    wise_ft_alphas: Sequence[float] | None = None,
    holdout_sets: Mapping[str, tuple[AnyDataset, EvalSetSpec | None]] | None = None,
    select_on: str | None = None,
    selection: str = "",
    known: Mapping[float, Mapping[str, float]] | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    bf16: bool = False,
    max_samples: int | None = None,
    seed: int = 0,
    skip_corrupt_images: bool = False,
    device: torch.device | str | None = None,
    process_index: int = 0,
    num_processes: int = 1,
    progress: bool = False,
) -> EvalReport:
    """Score ``model`` on every reported set and, with ``wise_ft_alphas``, sweep WiSE-FT in the same pass.

    Args:
        sets: reported sets ``{name: (raw dataset, spec or None)}``; ``id_name`` / ``shift_names`` say which is the
            ID set and which are averaged into ``avg_shift`` (``role: other`` sets are neither).
        pretrained: theta_0 for a fully fine-tuned model (a LoRA ``PeftModel`` carries its own base).
        holdout_sets: held-out ID data that is scored only to choose alpha (never reported).
        select_on: the set that chooses alpha: a ``holdout_sets`` name (default when there is exactly one) or a
            reported set (then it is held-out data by the caller's word, e.g. the demo's validation split).
        selection: how the selection data was obtained, in words (recorded with the sweep and on the card).
        known: accuracies already measured for some alphas other than 1 on these very sets (e.g. alpha 0 = the
            zero-shot model, scored once for many runs); those alphas are not scored again.
        bf16: score under bf16 autocast (default fp32, whatever precision the model trained in).
        max_samples: a seeded random subset (``seed``) of each reported set.
        device: where to score (the models are moved there); default: where the model is.
        process_index / num_processes: this rank and the world size; every rank scores its shard, the counts are
            summed exactly (all ranks must call this together).

    Every batch is decoded once and scored by the fine-tuned model and every alpha's model. A model prepared by
    accelerate with mixed precision loses its autocast wrapper here (in place), so it is scored in fp32.
    """
    model = _unwrap(model)
    if device is not None:
        model.to(device)
    holdout_sets = dict(holdout_sets or {})
    sweep = bool(wise_ft_alphas)
    if sweep:
        candidates = list(holdout_sets) + list(sets)
        if select_on is None:
            if len(holdout_sets) != 1:
                raise ValueError("A WiSE-FT sweep needs held-out ID data to choose alpha: give one holdout set (a "
                                 "training hold-out, or an eval set with `role: holdout`) or name it with "
                                 f"select_on; got holdout sets {sorted(holdout_sets)}.")
            select_on = next(iter(holdout_sets))
        if select_on not in candidates:
            raise ValueError(f"select_on={select_on!r} is not one of the evaluated sets {candidates}.")
        if select_on in sets and select_on == id_name:
            raise ValueError(f"select_on={select_on!r} is the reported ID set: choosing alpha on it overstates the "
                             "result. Choose on held-out data (a training hold-out or a `role: holdout` set).")
        if pretrained is not None:
            pretrained = _unwrap(pretrained).to(next(model.parameters()).device)
        alphas = [float(a) for a in wise_ft_alphas or ()]
        known = {float(a): dict(m) for a, m in (known or {}).items() if float(a) in alphas and float(a) != 1.0}
        for alpha, values in known.items():
            missing = sorted((set(sets) | set(holdout_sets)) - set(values))
            if missing:
                raise ValueError(f"known results for alpha {alpha} lack the sets {missing}.")
        variants: dict[float, Any] = {a: v for a, v in wise_ft_variants(pretrained, model, alphas).items()
                                      if a not in known}
    else:
        alphas, known, variants = [], {}, {}
    variants.setdefault(1.0, model)  # alpha 1 is the fine-tuned model: the "final" numbers
    reported = {name: (random_subset(ds, max_samples, seed), spec) for name, (ds, spec) in sets.items()}
    scored = {**reported, **(holdout_sets if sweep else {})}
    counts = count_correct(variants, scored, transform, batch_size=batch_size, num_workers=num_workers,
                           autocast_dtype=torch.bfloat16 if bf16 else None, skip_corrupt_images=skip_corrupt_images,
                           process_index=process_index, num_processes=num_processes, progress=progress)

    def accuracies(alpha: float, names: Sequence[str]) -> dict[str, float]:
        if alpha in known:
            return {name: float(known[alpha][name]) for name in names}
        return {name: counts[name][alpha].accuracy for name in names}

    def metrics(alpha: float, names: Sequence[str]) -> dict[str, float]:
        accs = accuracies(alpha, names)
        return {**accs, **shift_averages(accs, id_name, [n for n in shift_names if n in accs])}

    final = metrics(1.0, list(reported))
    num_examples = {name: counts[name][1.0].total for name in scored}
    report = EvalReport(final=final, num_examples=num_examples, precision="bf16" if bf16 else "fp32")
    if sweep:
        results = [{**metrics(a, list(reported)), **accuracies(a, list(holdout_sets))} for a in alphas]
        best = select_alpha(alphas, [r[select_on] for r in results])
        report.wise_ft = WiseFTResult(alphas=alphas, results=results, best_alpha=best, select_on=str(select_on),
                                      selection=selection)
        report.wise_ft_model = wise_ft(pretrained, model, best)
        logger.info("WiSE-FT: alpha %.3g chosen on %s (%s)", best, select_on, selection or "held-out data")
    for name, value in final.items():
        logger.info("%s: %.4f", name, value)
    return report


def save_wise_ft_model(report: EvalReport, output_dir: str | os.PathLike[str]) -> str | None:
    """Save the chosen WiSE-FT model in ``output_dir/wise_ft/`` (a plain classifier; ``config.wise_ft_alpha`` and
    ``wise_ft.json`` record alpha and how it was chosen). Returns the folder, or None without a sweep."""
    if report.wise_ft is None or report.wise_ft_model is None:
        return None
    folder = os.path.join(output_dir, WISE_FT_SUBFOLDER)
    model = report.wise_ft_model
    model.config.wise_ft_alpha = report.wise_ft.best_alpha
    info = {"alpha": report.wise_ft.best_alpha, "select_on": report.wise_ft.select_on,
            "selection": report.wise_ft.selection, "results": report.wise_ft.best_results}

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        (tmp / "wise_ft.json").write_text(json.dumps(info, indent=2), encoding="utf-8")

    write_dir_atomic(folder, write)  # whole or absent, like sae/
    return folder


def process_info() -> tuple[int, int, torch.device]:
    """(process_index, num_processes, device) of this process under ``accelerate launch`` / ``torchrun`` (or 0, 1
    and the default accelerator device in a plain ``python`` run); initialises the process group when launched."""
    from accelerate import PartialState

    # Without an accelerator accelerate needs cpu=True to form a (gloo) process group under torchrun.
    state = PartialState(cpu=not torch.accelerator.is_available())
    return state.process_index, state.num_processes, state.device


def eval_results_payload(report: EvalReport, **extra: Any) -> dict[str, Any]:
    """The ``eval_results.json`` mapping: the report plus ``extra`` keys (model, sets, timing ...)."""
    payload = report.to_dict()
    for key, value in extra.items():
        payload[key] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return payload
