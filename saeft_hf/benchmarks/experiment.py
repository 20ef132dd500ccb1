"""The digit-shift experiment: every method of BENCHMARK.md through the same `run_saeft` path, side by side.

Same data, steps and seeds for every method; the SAE is trained once on the bundled model's embeddings of the
pre-training pool. Writes `results.json`, `results.md` and `robustness.png` into the output directory.
"""

from __future__ import annotations

import copy
import json
import re
import functools
import hashlib
import dataclasses
import importlib.metadata
import logging
import os
import platform
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import datasets
import torch
import yaml

from ..config import SAEFTConfig
from ..data import transforms_from_pretrained, with_image_transform
from ..embeddings import compute_embeddings, compute_representations
from ..evaluation import evaluate_sets, pretransform, shift_averages
from ..evaluation.accuracy import PixelSet
from ..hub import save_results
from ..pipeline import ModelArguments, run_saeft
from ..sae import SAEConfig, SparseAutoencoder
from ..sae_set import load_sae_set, save_sae_set
from ..sae_training import train_sae
from ..zeroshot import fit_linear_probe, from_clip, set_head
from .curves import GAIN_RULE, curve_points, gain_over_wise_curve
from .digits import split_sizes
from .worlds import WORLD_MODULES, World, get_world

logger = logging.getLogger(__name__)

ALL_METHODS: tuple[str, ...] = (
    "zeroshot", "linear_probe", "ft", "lp_ft", "wise_ft", "l2sp", "feature_distill", "sae_ft", "sae_ft_wise",
    "sae_ft_paper", "lora_ft", "lora_sae_ft",
)
#: What `make demo` runs: the paper's comparison (zero-shot, FT, WiSE-FT, SAE-FT, SAE-FT + WiSE-FT) and the
#: feature report, in under 4 minutes on 2 cores. `--methods all` runs every method.
DEMO_METHODS: tuple[str, ...] = ("zeroshot", "ft", "wise_ft", "sae_ft", "sae_ft_wise")
WISE_ALPHAS: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
#: The fine-tuning methods a variant can build on (methods with a run of their own).
RUN_METHODS: tuple[str, ...] = tuple(m for m in ALL_METHODS if m not in ("zeroshot", "linear_probe", "wise_ft", "sae_ft_wise"))
#: Name of the alpha-selection set built from `validation` and the tuning families (`wise_select_on: tuning`).
SELECTION_SET = "selection"


@dataclass
class DigitExperimentConfig:
    """Every knob of the digit experiment (the defaults are the committed, tuned settings)."""

    output_dir: str = field(default="outputs/demo", metadata={"help": "Where results.json/.md and robustness.png go."})
    world: str = field(
        default="digits",
        metadata={"help": f"Benchmark world: {', '.join(WORLD_MODULES)} (data, class names, prompts and the bundled "
                          "tiny CLIP; saeft_hf/benchmarks/worlds.py)."},
    )
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "Fine-tuning seeds."})
    methods: list[str] = field(
        default_factory=lambda: list(DEMO_METHODS),
        metadata={"help": "Methods (and variants of --variants_file) to run; `all` = every built-in method."},
    )
    variants_file: str | None = field(
        default=None,
        metadata={"help": "YAML of named variants, `{variants: {name: {base: sae_ft, wise: false, settings: {...}}}}`; "
                          "settings are fields of this config (e.g. sae_ft_lambda_reg, representation, sae_d_sae)."},
    )
    wise_alphas: list[float] = field(
        default_factory=lambda: list(WISE_ALPHAS), metadata={"help": "WiSE-FT sweep alphas (0 and 1 included)."}
    )
    wise_select_on: str = field(
        default="validation",
        metadata={"help": "What chooses WiSE-FT's alpha: `validation` (held-out clean ID) or `tuning` (accuracy on "
                          "validation + the --tuning_splits families, docs/tuning_protocol.md)."},
    )
    tuning_splits: list[str] | None = field(
        default=None,
        metadata={"help": "Held-out tuning shift families (evaluated with --wise_select_on tuning; never reported); "
                          "default: all of the world's."},
    )
    representation: str = field(
        default="image_embeds",
        metadata={"help": "What the SAE-FT penalty and its SAE see (ModelArguments.representation), e.g. "
                          "hidden_states.-1.cls."},
    )
    sae_data: str = field(
        default="pretrain", metadata={"help": "What the SAE is trained on: `pretrain` (the broad pool) or `finetune`."}
    )
    clip_name_or_path: str | None = field(
        default=None,
        metadata={"help": "The pre-trained tiny CLIP (default: the bundled one); e.g. a second pre-training seed from "
                          "recipes/pretrain_tiny_clip.py --seed 1 (same data seed, so the splits stay disjoint)."},
    )
    collect_only: bool = field(
        default=False,
        metadata={"help": "Train nothing: rebuild results.json/.md/.png from the finished runs in output_dir/runs "
                          "(a benchmark that was stopped, or split over processes)."},
    )
    sae_cache_dir: str | None = field(
        default=None, metadata={"help": "Keep trained SAEs here, one folder per SAE setting, and reuse them."}
    )
    epochs: float = field(default=5.0, metadata={"help": "Fine-tuning epochs (every method)."})
    max_steps: int = field(default=-1, metadata={"help": "If > 0, overrides epochs (quick runs)."})
    batch_size: int = field(default=64, metadata={"help": "Fine-tuning batch size."})
    learning_rate: float = field(default=3e-4, metadata={"help": "Full fine-tuning learning rate."})
    lora_learning_rate: float = field(default=3e-3, metadata={"help": "LoRA learning rate."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "Warm-up as a fraction of the steps."})
    sae_name_or_path: str | None = field(
        default=None, metadata={"help": "Reuse this SAE instead of training one (it must come from the bundled model)."}
    )
    sae_d_sae: int = field(default=256, metadata={"help": "SAE latents."})
    sae_k: int = field(default=16, metadata={"help": "SAE active latents."})
    sae_epochs: int = field(default=100, metadata={"help": "SAE epochs over the pool embeddings."})
    sae_batch_size: int = field(default=256, metadata={"help": "SAE batch size."})
    sae_lr: float = field(default=1e-3, metadata={"help": "SAE learning rate."})
    sae_activation: str = field(default="topk_signed", metadata={"help": "SAE activation (paper: topk_signed)."})
    # Tuned with recipes/tune_digits.py (selection on validation + tune_shift; outputs/tuning/tuning.json).
    sae_ft_lambda_reg: float = field(default=3.0, metadata={"help": "SAE-FT lambda_reg (sae_ft_paper uses 70)."})
    sae_ft_lambda_add: float = field(default=10.0, metadata={"help": "SAE-FT lambda_add."})
    sae_ft_lambda_remove: float = field(default=0.0, metadata={"help": "SAE-FT lambda_remove."})
    sae_ft_mu: float = field(default=1.0, metadata={"help": "SAE-FT mu."})
    sae_ft_normalize: bool = field(default=False, metadata={"help": "SAE-FT: unit-norm embeddings into the SAE."})
    feature_distill_lambda: float = field(default=0.1, metadata={"help": "Feature-distillation lambda_reg."})
    l2sp_lambda: float = field(default=0.01, metadata={"help": "L2-SP lambda_reg."})
    eval_splits: list[str] | None = field(
        default=None, metadata={"help": "Evaluate only these splits (tuning needs validation and tune_shift only)."}
    )
    interpret: bool = field(default=True, metadata={"help": "Write the FT vs SAE-FT feature report (interpret/)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Cap every evaluation set (quick runs)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Cap the fine-tuning set (quick runs)."})


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "datasets", "peft", "accelerate", "huggingface_hub", "saeft-hf"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def train_benchmark_sae(model: Any, data: Any, eval_transform: Any, cfg: DigitExperimentConfig, out_dir: str,
                        source_model: str) -> SparseAutoencoder | dict[str, SparseAutoencoder]:
    """The SAE on the pre-trained model's representation (`model.config.representation`) of `cfg.sae_data`: the broad
    pre-training pool (like ImageNet-train for a web-pretrained CLIP) or the fine-tuning images. Several
    representations (comma-separated) give one SAE each, from one embedding pass, saved as `out_dir/<spec>/`."""
    if cfg.sae_data not in ("pretrain", "finetune"):
        raise ValueError(f"sae_data={cfg.sae_data!r}: use `pretrain` (the pool) or `finetune` (the fine-tuning set).")
    specs = model.config.representation
    embeddings = compute_representations(model, with_image_transform(data[cfg.sae_data], eval_transform), specs,
                                         batch_size=512, progress=False)
    saes = {}
    for spec, x in embeddings.items():
        config = SAEConfig(d_in=x.shape[1], d_sae=cfg.sae_d_sae, k=cfg.sae_k, activation=cfg.sae_activation,
                           source_model=source_model, representation=spec)
        saes[spec] = train_sae(x, config, epochs=cfg.sae_epochs, batch_size=cfg.sae_batch_size, lr=cfg.sae_lr,
                               progress=False).sae
    if len(saes) == 1:
        (sae,) = saes.values()
        sae.save_pretrained(out_dir)
        return sae
    save_sae_set(saes, out_dir)
    return saes


def method_args(method: str, cfg: DigitExperimentConfig, seed: int, out_dir: str) -> SAEFTConfig:
    """The SAEFTConfig of one fine-tuning method; everything not method-specific is shared."""
    lora = method.startswith("lora")
    common = dict(
        output_dir=out_dir, seed=seed, data_seed=seed, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=256,
        learning_rate=cfg.lora_learning_rate if lora else cfg.learning_rate, weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_ratio, lr_scheduler_type="cosine", logging_steps=20, save_strategy="no",
        eval_strategy="no", use_cpu=not torch.cuda.is_available(), report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, use_lora=lora, lora_r=cfg.lora_r, lora_alpha=2 * cfg.lora_r,
        overwrite_output_dir=True,  # the experiment owns runs/<method>-seed<seed>: a re-run replaces its runs
    )
    sae_ft = dict(regularizer="sae_ft", lambda_reg=cfg.sae_ft_lambda_reg, lambda_add=cfg.sae_ft_lambda_add,
                  lambda_remove=cfg.sae_ft_lambda_remove, mu=cfg.sae_ft_mu, sae_normalize=cfg.sae_ft_normalize)
    specific = {
        "ft": dict(regularizer="none", lambda_reg=0.0),
        "lp_ft": dict(regularizer="none", lambda_reg=0.0, head_init="linear-probe"),
        "l2sp": dict(regularizer="l2sp", lambda_reg=cfg.l2sp_lambda),
        "feature_distill": dict(regularizer="feature_distill", lambda_reg=cfg.feature_distill_lambda),
        "sae_ft": sae_ft,
        # The reference command's setting (lambda_reg 70, lambda_add 10, mu 1, raw embeddings), untuned.
        "sae_ft_paper": dict(sae_ft, lambda_reg=70.0, lambda_add=10.0, lambda_remove=0.0, mu=1.0, sae_normalize=False),
        "lora_ft": dict(regularizer="none", lambda_reg=0.0),
        "lora_sae_ft": sae_ft,
    }[method]
    return SAEFTConfig(**common, **specific)


@dataclass(frozen=True)
class Variant:
    """A named method: a built-in fine-tuning method (`base`) with some experiment settings changed."""

    name: str
    base: str
    settings: dict[str, Any] = field(default_factory=dict)
    wise: bool = False  # also sweep WiSE-FT and report `<name>_wise`


def load_variants(path: str | None) -> dict[str, Variant]:
    """Read a variants YAML (see `DigitExperimentConfig.variants_file`); unknown keys and settings are errors."""
    if not path:
        return {}
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    fields_ = {f.name for f in dataclasses.fields(DigitExperimentConfig)} - {"output_dir", "seeds", "methods",
                                                                           "variants_file"}
    out = {}
    for name, spec in (data.get("variants") or {}).items():
        unknown = sorted(set(spec) - {"base", "settings", "wise"})
        bad = sorted(set(spec.get("settings") or {}) - fields_)
        if unknown or bad or spec.get("base") not in RUN_METHODS or name in ALL_METHODS:
            raise ValueError(f"{path}: variant {name!r} is invalid (unknown keys {unknown}, unknown settings {bad}, "
                             f"base {spec.get('base')!r} must be one of {list(RUN_METHODS)}, and the name must not "
                             "be a built-in method).")
        out[name] = Variant(name, spec["base"], dict(spec.get("settings") or {}), bool(spec.get("wise", False)))
    return out


def _sae_settings(cfg: DigitExperimentConfig) -> tuple:
    """What an experiment SAE depends on (runs with equal settings share one SAE)."""
    return (cfg.representation, cfg.sae_data, cfg.sae_d_sae, cfg.sae_k, cfg.sae_activation, cfg.sae_epochs,
            cfg.sae_batch_size, cfg.sae_lr, cfg.clip_name_or_path, cfg.world)


@functools.lru_cache(maxsize=1)
def _benchmark(world: str) -> datasets.DatasetDict:
    """A world's splits, built once per process (a tuning sweep runs many experiments; datasets are immutable)."""
    return get_world(world).build(0)


def _tuning_splits(cfg: DigitExperimentConfig, world: World) -> list[str]:
    return list(world.tuning_splits) if cfg.tuning_splits is None else list(cfg.tuning_splits)


def run_digit_experiment(cfg: DigitExperimentConfig, variants: Mapping[str, Variant] | None = None) -> dict[str, Any]:
    """Run every method for every seed; write results.json, results.md and robustness.png; return the results.

    `variants`: named variants in addition to those of `cfg.variants_file` (e.g. a tuning grid's settings).
    """
    world = get_world(cfg.world)
    tuning_splits = _tuning_splits(cfg, world)
    if cfg.collect_only:
        return collect_run_results(cfg.output_dir, tuning_splits if cfg.wise_select_on == "tuning" else (), cfg.world)
    id_split, shift_splits = world.id_test_split, world.shift_splits
    classnames, templates = list(world.classnames), list(world.templates)
    allowed = [*world.tuning_splits, *([world.tune_shift_split] if world.tune_shift_split else [])]
    unknown_sets = sorted(set(tuning_splits) - set(allowed))
    if unknown_sets:  # a reported set must never choose anything
        raise ValueError(f"tuning_splits {unknown_sets} are not held-out tuning families of the {world.name} world; "
                         f"choose from {allowed}.")
    start, start_cpu = time.time(), time.process_time()
    variants = {**load_variants(cfg.variants_file), **(variants or {})}
    methods = list(ALL_METHODS) if cfg.methods == ["all"] else list(cfg.methods)
    unknown = sorted(set(methods) - set(ALL_METHODS) - set(variants))
    if unknown:
        raise ValueError(f"Unknown methods {unknown}; choose from {list(ALL_METHODS)} (or `all`), or the variants of "
                         f"--variants_file ({sorted(variants)}).")
    if cfg.wise_select_on not in ("validation", "tuning"):
        raise ValueError(f"wise_select_on={cfg.wise_select_on!r}: use `validation` or `tuning`.")
    if not {0.0, 1.0} <= {float(a) for a in cfg.wise_alphas}:
        raise ValueError(f"wise_alphas={cfg.wise_alphas} must include 0 and 1 (the curve's endpoints).")
    os.makedirs(cfg.output_dir, exist_ok=True)
    data = _benchmark(cfg.world)
    finetune = data["finetune"]
    if cfg.max_train_samples:
        finetune = finetune.select(range(min(cfg.max_train_samples, len(finetune))))
    tuning = cfg.wise_select_on == "tuning"
    eval_names = cfg.eval_splits or ["validation", id_split, *shift_splits, *(tuning_splits if tuning else ())]
    clip_path = cfg.clip_name_or_path or world.clip_path()
    _, eval_transform = transforms_from_pretrained(clip_path)
    # The eval transform is deterministic: decode and transform every evaluation image once.
    eval_sets = {}
    for name in eval_names:
        ds = data[name]
        if cfg.max_eval_samples:
            ds = ds.select(range(min(cfg.max_eval_samples, len(ds))))
        eval_sets[name] = (pretransform(ds, eval_transform), None)
    select_on = "validation"
    sweep_sets = eval_sets
    if tuning:
        # One set that chooses alpha: the union of held-out clean ID and the tuning families, never a reported set.
        parts = [eval_sets[n][0] for n in ("validation", *tuning_splits)]
        union = PixelSet(torch.cat([p.pixel_values for p in parts]), torch.cat([p.labels for p in parts]))
        sweep_sets = {**eval_sets, SELECTION_SET: (union, None)}
        select_on = SELECTION_SET

    timing: dict[str, float] = defaultdict(float)  # where the wall time goes (train vs evaluation), summed
    timing["data_s"] = time.time() - start
    timing["data_cpu_s"] = time.process_time() - start_cpu

    def evaluate(model: Any, sets: Mapping[str, Any] = eval_sets) -> dict[str, float]:
        t0, c0 = time.time(), time.process_time()
        accs = evaluate_sets(model, sets, None, batch_size=512, progress=False)
        timing["eval_s"] += time.time() - t0
        timing["eval_cpu_s"] += time.process_time() - c0
        return {**accs, **shift_averages(accs, id_split, list(shift_splits))}

    models: dict[str, Any] = {}  # the pre-trained classifier per representation (same weights)

    def pretrained_for(representation: str) -> Any:
        if representation not in models:
            models[representation] = from_clip(clip_path, classnames, templates, representation=representation,
                                               progress=False)
        return models[representation]

    saes: dict[tuple, SparseAutoencoder] = {}

    def sae_for(run_cfg: DigitExperimentConfig) -> SparseAutoencoder:
        key = _sae_settings(run_cfg)
        if key not in saes:
            t0, c0 = time.time(), time.process_time()
            tag = "-".join(str(v).replace("/", "_") for v in key[:4]) + "-" + hashlib.sha1(repr(key).encode()).hexdigest()[:8]
            cached = os.path.join(cfg.sae_cache_dir, tag) if cfg.sae_cache_dir else None
            if run_cfg.sae_name_or_path:
                saes[key] = SparseAutoencoder.from_pretrained(run_cfg.sae_name_or_path)
            elif cached and os.path.isdir(cached):
                specs = run_cfg.representation.split(",")
                saes[key] = (SparseAutoencoder.from_pretrained(cached) if len(specs) == 1
                             else load_sae_set(cached, specs))
            else:
                # The default SAE keeps its place (output_dir/sae); the others are named by their settings.
                default = key == _sae_settings(dataclasses.replace(DigitExperimentConfig(), world=cfg.world,
                                                                   clip_name_or_path=cfg.clip_name_or_path))
                out = cached or os.path.join(cfg.output_dir, "sae" if default else os.path.join("saes", tag))
                saes[key] = train_benchmark_sae(pretrained_for(run_cfg.representation), data, eval_transform,
                                                run_cfg, out, clip_path)
            timing["sae_s"] += time.time() - t0
            timing["sae_cpu_s"] += time.process_time() - c0
        return saes[key]

    pretrained = pretrained_for("image_embeds")
    sae = sae_for(cfg)
    rows: list[dict[str, Any]] = []
    curves: dict[str, dict[str, Any]] = {}
    ft_curve: list[dict[str, float]] = []
    timings: dict[str, float] = {}

    def add_rows(method: str, seed: int, accs: dict[str, float]) -> None:
        for name in eval_names:
            rows.append({"method": method, "seed": seed, "eval_set": name, "accuracy": float(accs[name])})

    zeroshot_accs = evaluate(pretrained, sweep_sets)
    builtin = {m: Variant(m, m) for m in RUN_METHODS}
    sweep_rows = {"ft": "wise_ft", "sae_ft": "sae_ft_wise"}
    runs = [builtin[m] for m in RUN_METHODS if m in methods or (m in ("ft", "sae_ft") and sweep_rows[m] in methods)]
    runs += [v for name, v in variants.items() if name in methods]
    for seed in cfg.seeds:
        if "zeroshot" in methods:
            add_rows("zeroshot", seed, zeroshot_accs)  # deterministic: the same for every seed
        if "linear_probe" in methods:
            probe = copy.deepcopy(pretrained)
            feats, labels = compute_embeddings(probe, with_image_transform(finetune, eval_transform), batch_size=512,
                                               return_labels=True, progress=False)
            weight, bias = fit_linear_probe(feats, labels, len(classnames), init_weight=probe.classifier.weight.detach(), seed=seed)
            set_head(probe, weight, bias)
            add_rows("linear_probe", seed, evaluate(probe))
        for variant in runs:
            t0 = time.time()
            torch.manual_seed(seed)
            method = variant.name
            run_cfg = dataclasses.replace(cfg, **variant.settings)
            out_dir = os.path.join(cfg.output_dir, "runs", f"{method}-seed{seed}")
            args = method_args(variant.base, run_cfg, seed, out_dir)
            sweep_name = sweep_rows.get(method) if method in builtin else (f"{method}_wise" if variant.wise else None)
            # Plain FT always sweeps: its WiSE-FT curve is what every method's gain is measured against.
            wise = method == "ft" or (sweep_name is not None and (sweep_name in methods or variant.wise))
            uses_sae = args.regularizer == "sae_ft"
            model_args = ModelArguments(model_name_or_path=clip_path, embedding_batch_size=512,
                                        representation=run_cfg.representation if uses_sae else "image_embeds")
            result = run_saeft(
                model_args, args, train_dataset=finetune, eval_dataset=None, classnames=classnames,
                templates=templates, sae=sae_for(run_cfg) if uses_sae else sae,
                model=copy.deepcopy(pretrained_for(model_args.representation)),
                eval_sets=sweep_sets if wise else eval_sets, shift_names=list(shift_splits),
                id_name=id_split if id_split in eval_names else "validation",
                wise_ft_alphas=list(cfg.wise_alphas) if wise else None,
                # Held-out data that no table reports chooses alpha (validation, or validation + tuning families).
                wise_ft_select_on=select_on if wise else None,
                wise_ft_known={0.0: zeroshot_accs},  # alpha 0 is the zero-shot model, scored once above
                eval_batch_size=512,
                max_eval_samples=cfg.max_eval_samples,
            )
            add_rows(method, seed, result.results["final"])
            timings[f"{method}-seed{seed}"] = round(time.time() - t0, 1)
            for key in ("train_s", "eval_s", "train_cpu_s", "eval_cpu_s"):
                timing[key] += result.results["timing"][key]
            if wise:
                sweep = result.results["wise_ft"]
                best = sweep["alphas"].index(sweep["best_alpha"])
                if sweep_name in methods or variant.wise:
                    add_rows(sweep_name, seed, sweep["results"][best])
                reported = all(n in eval_names for n in (id_split, *shift_splits))
                points = curve_points(seed, sweep["alphas"], sweep["results"], id_split, shift_splits) if reported else []
                if method == "ft":
                    ft_curve.extend(points)
                curves[f"{sweep_name}-seed{seed}"] = sweep_entry(sweep, points)
            logger.info("%s seed %d done in %.1fs", method, seed, timings[f"{method}-seed{seed}"])

    interpretation = None
    first = cfg.seeds[0]
    t0, c0 = time.time(), time.process_time()
    if cfg.interpret and "ft" in methods and "sae_ft" in methods:
        # Which SAE features did FT and SAE-FT add and remove on the ID test set? (report.html + summary.json)
        from ..interpret import interpret_runs

        runs_dir = os.path.join(cfg.output_dir, "runs")
        reports = interpret_runs(
            clip_path,
            {"FT": os.path.join(runs_dir, f"ft-seed{first}"), "SAE-FT": os.path.join(runs_dir, f"sae_ft-seed{first}")},
            sae, data[id_split], eval_transform, output_dir=os.path.join(cfg.output_dir, "interpret"),
            text_model=clip_path, classnames=classnames, templates=templates,
            max_samples=cfg.max_eval_samples, progress=False,
        )
        interpretation = {name: report.summary() for name, report in reports.items()}
    timing["interpret_s"], timing["interpret_cpu_s"] = time.time() - t0, time.process_time() - c0

    results = {
        "id_set": id_split,
        "shift_sets": list(shift_splits),
        "validation_set": "validation",
        "world": world.name,
        "tuning_shift_set": world.tune_shift_split,
        "tuning_sets": tuning_splits if tuning else [],
        "wise_select_on": select_on if select_on == "validation" else ["validation", *tuning_splits],
        "rows": rows,
        "summary": summarize(rows, shift_splits),
        "wise_ft_curves": curves,
        # Plain FT's WiSE-FT sweep per seed, and every method's distance above it at its own ID accuracy.
        "wise_ft_curve": ft_curve,
        "gain_over_wise_curve": gain_over_wise_curve(rows, ft_curve, id_split, shift_splits),
        "gain_rule": GAIN_RULE,
        "variants": {name: dataclasses.asdict(v) for name, v in variants.items() if name in methods},
        "interpretation": interpretation,
        "config": asdict(cfg),
        "sae_metrics": sae.config.training_metrics,
        "split_sizes": split_sizes(data),
        "versions": _versions(),
        "timings_s": timings,
        # data_s: building the digit sets and pre-transforming the eval sets; sae_s: the SAE; train_s: the fine-tuning
        # runs up to the end of training; eval_s: every accuracy pass (zero-shot, linear probe, final numbers and
        # WiSE-FT sweeps, model reloads included); interpret_s: the feature report. *_cpu_s: CPU seconds of the
        # process (all threads), steadier than wall time on a shared machine.
        "timing": {k: round(v, 1) for k, v in timing.items()},
        "wall_time_s": round(time.time() - start, 1),
    }
    write_outputs(results, cfg.output_dir)
    return results


def sweep_entry(sweep: Mapping[str, Any], points: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    """One WiSE-FT sweep as stored in `results.json` `wise_ft_curves` (id / shift_avg None without the reported sets)."""
    return {
        "alphas": sweep["alphas"], "best_alpha": sweep["best_alpha"], "select_on": sweep["select_on"],
        "id": [p["id"] for p in points] or None, "shift_avg": [p["shift_avg"] for p in points] or None,
        "accuracies": sweep["results"],  # every evaluated set at every alpha
    }


def write_outputs(results: Mapping[str, Any], output_dir: str) -> None:
    """results.json (atomically), results.md and robustness.png into `output_dir`."""
    save_results(os.path.join(output_dir, "results.json"), results)
    with open(os.path.join(output_dir, "results.md"), "w", encoding="utf-8") as fh:
        fh.write(results_markdown(results))
    plot_robustness(results, os.path.join(output_dir, "robustness.png"))


def summarize(rows: Sequence[dict[str, Any]], shift_splits: Sequence[str]) -> dict[str, dict[str, dict[str, float]]]:
    """Per method: mean and std over seeds of every set, of `shift_avg` (mean of the reported shifts)."""
    per: dict[str, dict[int, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        per[row["method"]][row["seed"]][row["eval_set"]] = row["accuracy"]
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for method, seeds in per.items():
        by_set: dict[str, list[float]] = defaultdict(list)
        for accs in seeds.values():
            for name, value in accs.items():
                by_set[name].append(value)
            shifts = [accs[s] for s in shift_splits if s in accs]
            if shifts:
                by_set["shift_avg"].append(float(np.mean(shifts)))
        summary[method] = {
            name: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)} for name, v in by_set.items()
        }
    return summary


def results_markdown(results: dict[str, Any]) -> str:
    """The results table: mean (std) in percent over seeds per method and set, and the gain over the WiSE-FT curve."""
    tuning = list(results.get("tuning_sets") or [])
    columns = [results["id_set"], *results["shift_sets"], "shift_avg", *tuning]
    gains = results.get("gain_over_wise_curve") or {}
    lines = [
        "| method | " + " | ".join(columns) + " | gain over WiSE-FT curve |",
        "|---|" + "---|" * (len(columns) + 1),
    ]
    for method, stats in results["summary"].items():
        cells = []
        for col in columns:
            s = stats.get(col)
            cells.append("" if s is None else f"{100 * s['mean']:.1f} ({100 * s['std']:.1f})")
        g = gains.get(method)
        if g is None or g["mean"] is None:
            cells.append("")
        else:
            cells.append(f"{100 * g['mean']:+.2f} ({100 * g['std']:.2f})" + ("" if g["n"] == len(g["per_seed"])
                                                                             else f" [{g['n']} of {len(g['per_seed'])} seeds in range]"))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    n_seeds = max((v["n"] for s in results["summary"].values() for v in s.values()), default=0)
    select = results.get("wise_select_on", "validation")
    lines.append("")
    lines.append(
        f"Top-1 accuracy (%), mean (std) over {n_seeds} fine-tuning seed(s). ID = `{results['id_set']}`; "
        f"shift_avg = mean of {', '.join(results['shift_sets'])}. Gain over WiSE-FT curve = shift_avg minus the same "
        "seed's plain-FT WiSE-FT curve at the method's ID accuracy, in points (`gain_rule` in results.json). "
        f"WiSE-FT alpha chosen on {select if isinstance(select, str) else ' + '.join(select)}"
        + (f"; {', '.join(tuning)} are held-out tuning shifts, never in shift_avg." if tuning else ".")
    )
    return "\n".join(lines) + "\n"


def plot_robustness(results: dict[str, Any], path: str) -> None:
    """ID accuracy vs shift-average accuracy: one marker per method (mean +- std over seeds), and plain FT's WiSE-FT
    curve (mean over seeds per alpha) with the other sweeps as thin lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6))
    id_set = results["id_set"]
    by_alpha: dict[float, list[tuple[float, float]]] = defaultdict(list)
    for p in results.get("wise_ft_curve") or []:
        by_alpha[p["alpha"]].append((p["id"], p["shift_avg"]))
    if by_alpha:
        alphas = sorted(by_alpha)
        xs = [100 * np.mean([v[0] for v in by_alpha[a]]) for a in alphas]
        ys = [100 * np.mean([v[1] for v in by_alpha[a]]) for a in alphas]
        ax.plot(xs, ys, "-", color="0.3", lw=2, zorder=1, label=f"WiSE-FT curve of FT (alpha 0..1, {len(alphas)} pts)")
        ax.plot(xs, ys, ".", color="0.3", zorder=1)
    first = str(results["config"]["seeds"][0])
    for name, curve in results["wise_ft_curves"].items():
        if name.startswith("wise_ft-") or not curve["id"] or not name.endswith("seed" + first):
            continue
        ax.plot(np.array(curve["id"]) * 100, np.array(curve["shift_avg"]) * 100, ":", lw=1, alpha=0.7,
                label=f"{name.rsplit('-', 1)[0]} sweep (seed {first})")
    # Distinct colour AND marker per method (20 colours x 11 markers; no two methods share both).
    markers = "osD^v<>pP*X"
    colours = plt.get_cmap("tab20").colors
    for i, (method, stats) in enumerate(results["summary"].items()):
        if id_set not in stats or "shift_avg" not in stats:
            continue  # a tuning run that evaluated only the selection sets
        x, y = 100 * stats[id_set]["mean"], 100 * stats["shift_avg"]["mean"]
        ax.errorbar(x, y, xerr=100 * stats[id_set]["std"], yerr=100 * stats["shift_avg"]["std"],
                    fmt=markers[i % len(markers)], color=colours[(2 * i) % 20 + (i // 10) % 2], markersize=8,
                    capsize=3, label=method, zorder=3)
    ax.set_xlabel(f"ID accuracy (%, {id_set})")
    ax.set_ylabel("shift-average accuracy (%)")
    title = get_world(results.get("world", "digits")).title
    ax.set_title(f"{title}: robustness vs in-distribution accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


_RUN_NAME = re.compile(r"^(?P<method>.+)-seed(?P<seed>\d+)$")


def collect_run_results(output_dir: str, tuning_sets: Sequence[str] = (), world: str = "digits") -> dict[str, Any]:
    """Rebuild results.json (rows, the plain-FT curve, gains), results.md and robustness.png from the finished runs in
    `output_dir/runs/<method>-seed<seed>/eval_results.json`: a benchmark stopped before its end (or split over several
    processes into one folder) loses only its unfinished runs. Zero-shot rows come from alpha 0 of FT's sweeps (the
    zero-shot model exactly); a run with a sweep also gives its `<method>_wise` row (`wise_ft` for `ft`)."""
    runs_dir = os.path.join(output_dir, "runs")
    bench = get_world(world)
    id_split, shift_splits = bench.id_test_split, bench.shift_splits
    sets = ["validation", id_split, *shift_splits, *tuning_sets]
    rows: list[dict[str, Any]] = []
    curves: dict[str, dict[str, Any]] = {}
    ft_curve: list[dict[str, float]] = []
    seeds: set[int] = set()

    def add(method: str, seed: int, accs: Mapping[str, float]) -> None:
        rows.extend({"method": method, "seed": seed, "eval_set": s, "accuracy": float(accs[s])}
                    for s in sets if s in accs)

    for name in sorted(os.listdir(runs_dir)):
        match = _RUN_NAME.match(name)
        path = os.path.join(runs_dir, name, "eval_results.json")
        if not match or not os.path.isfile(path):
            continue  # unfinished: eval_results.json is written whole, last
        method, seed = match["method"], int(match["seed"])
        seeds.add(seed)
        with open(path, encoding="utf-8") as fh:
            evaluated = json.load(fh)
        add(method, seed, evaluated["final"])
        sweep = evaluated.get("wise_ft")
        if sweep:
            sweep_name = "wise_ft" if method == "ft" else f"{method}_wise"
            add(sweep_name, seed, sweep["results"][sweep["alphas"].index(sweep["best_alpha"])])
            points = curve_points(seed, sweep["alphas"], sweep["results"], id_split, shift_splits)
            curves[f"{sweep_name}-seed{seed}"] = sweep_entry(sweep, points)
            if method == "ft":
                ft_curve.extend(points)
                if 0.0 in sweep["alphas"]:
                    add("zeroshot", seed, sweep["results"][sweep["alphas"].index(0.0)])
    if not rows:
        raise FileNotFoundError(f"No finished run (runs/<method>-seed<N>/eval_results.json) in {output_dir}.")
    first = ["zeroshot", "ft", "wise_ft"]  # the reference points first, then the runs in folder order
    rows.sort(key=lambda r: first.index(r["method"]) if r["method"] in first else len(first))
    results = {
        "world": world, "id_set": id_split, "shift_sets": list(shift_splits), "validation_set": "validation",
        "tuning_sets": list(tuning_sets), "collected_from_runs": True,
        "rows": rows, "summary": summarize(rows, shift_splits), "wise_ft_curves": curves, "wise_ft_curve": ft_curve,
        "gain_over_wise_curve": gain_over_wise_curve(rows, ft_curve, id_split, shift_splits),
        "gain_rule": GAIN_RULE, "config": {"seeds": sorted(seeds), "output_dir": output_dir},
        "versions": _versions(),
    }
    select = {c["select_on"] for c in curves.values()}
    select_on = select.pop() if len(select) == 1 else sorted(select)
    results["wise_select_on"] = ["validation", *tuning_sets] if select_on == SELECTION_SET else select_on
    write_outputs(results, output_dir)
    return results
