"""The digit-shift experiment: every method of BENCHMARK.md through the same `run_saeft` path, side by side.

Same data, steps and seeds for every method; the SAE is trained once on the bundled model's embeddings of the
pre-training pool. Writes `results.json`, `results.md` and `robustness.png` into the output directory.
"""

from __future__ import annotations

import copy
import importlib.metadata
import logging
import os
import platform
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..config import SAEFTConfig
from ..data import transforms_from_pretrained, with_image_transform
from ..embeddings import compute_embeddings
from ..evaluation import evaluate_sets, pretransform, shift_averages
from ..hub import save_results
from ..pipeline import ModelArguments, run_saeft
from ..sae import SAEConfig, SparseAutoencoder
from ..sae_training import train_sae
from ..zeroshot import fit_linear_probe, from_clip, set_head
from .digits import CLASSNAMES, ID_TEST_SPLIT, SHIFT_SPLITS, TEMPLATES, TUNE_SHIFT_SPLIT, build_digit_benchmark, split_sizes, tiny_clip_path

logger = logging.getLogger(__name__)

ALL_METHODS: tuple[str, ...] = (
    "zeroshot", "linear_probe", "ft", "lp_ft", "wise_ft", "l2sp", "feature_distill", "sae_ft", "sae_ft_wise",
    "sae_ft_paper", "lora_ft", "lora_sae_ft",
)
WISE_ALPHAS: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


@dataclass
class DigitExperimentConfig:
    """Every knob of the digit experiment (the defaults are the committed, tuned settings)."""

    output_dir: str = field(default="outputs/demo", metadata={"help": "Where results.json/.md and robustness.png go."})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "Fine-tuning seeds."})
    methods: list[str] = field(default_factory=lambda: list(ALL_METHODS), metadata={"help": "Methods to run."})
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


def train_benchmark_sae(model: Any, pool: Any, eval_transform: Any, cfg: DigitExperimentConfig, out_dir: str) -> SparseAutoencoder:
    """The SAE on the pre-trained model's embeddings of the broad pre-training pool (like ImageNet-train)."""
    embeddings = compute_embeddings(model, with_image_transform(pool, eval_transform), batch_size=512, progress=False)
    config = SAEConfig(d_in=embeddings.shape[1], d_sae=cfg.sae_d_sae, k=cfg.sae_k, activation=cfg.sae_activation,
                       source_model=tiny_clip_path(), representation="image_embeds")
    result = train_sae(embeddings, config, epochs=cfg.sae_epochs, batch_size=cfg.sae_batch_size, lr=cfg.sae_lr,
                       progress=False)
    result.sae.save_pretrained(os.path.join(out_dir, "sae"))
    return result.sae


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


def run_digit_experiment(cfg: DigitExperimentConfig) -> dict[str, Any]:
    """Run every method for every seed; write results.json, results.md and robustness.png; return the results."""
    start, start_cpu = time.time(), time.process_time()
    unknown = sorted(set(cfg.methods) - set(ALL_METHODS))
    if unknown:
        raise ValueError(f"Unknown methods {unknown}; choose from {list(ALL_METHODS)}.")
    os.makedirs(cfg.output_dir, exist_ok=True)
    data = build_digit_benchmark()
    finetune = data["finetune"]
    if cfg.max_train_samples:
        finetune = finetune.select(range(min(cfg.max_train_samples, len(finetune))))
    eval_names = cfg.eval_splits or ["validation", ID_TEST_SPLIT, *SHIFT_SPLITS, TUNE_SHIFT_SPLIT]
    clip_path = tiny_clip_path()
    _, eval_transform = transforms_from_pretrained(clip_path)
    # The eval transform is deterministic: decode and transform every evaluation image once.
    eval_sets = {}
    for name in eval_names:
        ds = data[name]
        if cfg.max_eval_samples:
            ds = ds.select(range(min(cfg.max_eval_samples, len(ds))))
        eval_sets[name] = (pretransform(ds, eval_transform), None)
    model_args = ModelArguments(model_name_or_path=clip_path, embedding_batch_size=512)

    timing: dict[str, float] = defaultdict(float)  # where the wall time goes (train vs evaluation), summed
    timing["data_s"] = time.time() - start
    timing["data_cpu_s"] = time.process_time() - start_cpu

    def evaluate(model: Any) -> dict[str, float]:
        t0, c0 = time.time(), time.process_time()
        accs = evaluate_sets(model, eval_sets, None, batch_size=512, progress=False)
        timing["eval_s"] += time.time() - t0
        timing["eval_cpu_s"] += time.process_time() - c0
        return {**accs, **shift_averages(accs, ID_TEST_SPLIT, list(SHIFT_SPLITS))}

    pretrained = from_clip(clip_path, CLASSNAMES, TEMPLATES, progress=False)
    t0, c0 = time.time(), time.process_time()
    if cfg.sae_name_or_path:
        sae = SparseAutoencoder.from_pretrained(cfg.sae_name_or_path)
    else:
        sae = train_benchmark_sae(pretrained, data["pretrain"], eval_transform, cfg, cfg.output_dir)
    timing["sae_s"], timing["sae_cpu_s"] = time.time() - t0, time.process_time() - c0
    rows: list[dict[str, Any]] = []
    curves: dict[str, dict[str, Any]] = {}
    timings: dict[str, float] = {}

    def add_rows(method: str, seed: int, accs: dict[str, float]) -> None:
        for name in eval_names:
            rows.append({"method": method, "seed": seed, "eval_set": name, "accuracy": float(accs[name])})

    zeroshot_accs = evaluate(pretrained)
    for seed in cfg.seeds:
        if "zeroshot" in cfg.methods:
            add_rows("zeroshot", seed, zeroshot_accs)  # deterministic: the same for every seed
        if "linear_probe" in cfg.methods:
            probe = copy.deepcopy(pretrained)
            feats, labels = compute_embeddings(probe, with_image_transform(finetune, eval_transform), batch_size=512,
                                               return_labels=True, progress=False)
            weight, bias = fit_linear_probe(feats, labels, len(CLASSNAMES), init_weight=probe.classifier.weight.detach(), seed=seed)
            set_head(probe, weight, bias)
            add_rows("linear_probe", seed, evaluate(probe))
        runs = [m for m in cfg.methods if m not in ("zeroshot", "linear_probe", "wise_ft", "sae_ft_wise")]
        for method in runs:
            t0 = time.time()
            torch.manual_seed(seed)
            out_dir = os.path.join(cfg.output_dir, "runs", f"{method}-seed{seed}")
            args = method_args(method, cfg, seed, out_dir)
            sweep_parent = {"ft": "wise_ft", "sae_ft": "sae_ft_wise"}.get(method)
            wise = sweep_parent in cfg.methods if sweep_parent else False
            result = run_saeft(
                model_args, args, train_dataset=finetune, eval_dataset=None, classnames=CLASSNAMES,
                templates=TEMPLATES, sae=sae, model=copy.deepcopy(pretrained),
                eval_sets=eval_sets, id_name=ID_TEST_SPLIT, shift_names=list(SHIFT_SPLITS),
                wise_ft_alphas=list(WISE_ALPHAS) if wise else None,
                # The validation split is held-out ID data that no table reports: it chooses alpha.
                wise_ft_select_on="validation" if wise else None,
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
                add_rows(sweep_parent, seed, sweep["results"][best])
                curves[f"{sweep_parent}-seed{seed}"] = {
                    "alphas": sweep["alphas"], "best_alpha": sweep["best_alpha"],
                    "id": [r.get(ID_TEST_SPLIT) for r in sweep["results"]],
                    "shift_avg": [float(np.mean([r[s] for s in SHIFT_SPLITS if s in r] or [np.nan]))
                                  for r in sweep["results"]],
                }
            logger.info("%s seed %d done in %.1fs", method, seed, timings[f"{method}-seed{seed}"])

    interpretation = None
    first = cfg.seeds[0]
    t0, c0 = time.time(), time.process_time()
    if cfg.interpret and "ft" in cfg.methods and "sae_ft" in cfg.methods:
        # Which SAE features did FT and SAE-FT add and remove on the ID test set? (report.html + summary.json)
        from ..interpret import interpret_runs

        runs_dir = os.path.join(cfg.output_dir, "runs")
        reports = interpret_runs(
            clip_path,
            {"FT": os.path.join(runs_dir, f"ft-seed{first}"), "SAE-FT": os.path.join(runs_dir, f"sae_ft-seed{first}")},
            sae, data[ID_TEST_SPLIT], eval_transform, output_dir=os.path.join(cfg.output_dir, "interpret"),
            text_model=clip_path, classnames=CLASSNAMES, templates=TEMPLATES,
            max_samples=cfg.max_eval_samples, progress=False,
        )
        interpretation = {name: report.summary() for name, report in reports.items()}
    timing["interpret_s"], timing["interpret_cpu_s"] = time.time() - t0, time.process_time() - c0

    results = {
        "id_set": ID_TEST_SPLIT,
        "shift_sets": list(SHIFT_SPLITS),
        "validation_set": "validation",
        "tuning_shift_set": TUNE_SHIFT_SPLIT,
        "rows": rows,
        "summary": summarize(rows),
        "wise_ft_curves": curves,
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
    save_results(os.path.join(cfg.output_dir, "results.json"), results)
    with open(os.path.join(cfg.output_dir, "results.md"), "w", encoding="utf-8") as fh:
        fh.write(results_markdown(results))
    plot_robustness(results, os.path.join(cfg.output_dir, "robustness.png"))
    return results


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
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
            shifts = [accs[s] for s in SHIFT_SPLITS if s in accs]
            if shifts:
                by_set["shift_avg"].append(float(np.mean(shifts)))
        summary[method] = {
            name: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)} for name, v in by_set.items()
        }
    return summary


def results_markdown(results: dict[str, Any]) -> str:
    """The results table: mean (std) in percent over seeds, per method and evaluation set."""
    columns = [results["id_set"], *results["shift_sets"], "shift_avg", results["tuning_shift_set"]]
    lines = [
        "| method | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for method, stats in results["summary"].items():
        cells = []
        for col in columns:
            s = stats.get(col)
            cells.append("" if s is None else f"{100 * s['mean']:.1f} ({100 * s['std']:.1f})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    n_seeds = max((v["n"] for s in results["summary"].values() for v in s.values()), default=0)
    lines.append("")
    lines.append(
        f"Top-1 accuracy (%), mean (std) over {n_seeds} fine-tuning seed(s). ID = `{results['id_set']}`; "
        f"shift_avg = mean of {', '.join(results['shift_sets'])}; `{results['tuning_shift_set']}` is the held-out "
        "shift used only for tuning. WiSE-FT alpha chosen on `validation`."
    )
    return "\n".join(lines) + "\n"


def plot_robustness(results: dict[str, Any], path: str) -> None:
    """ID accuracy vs shift-average accuracy: one marker per method (mean over seeds), WiSE-FT curves as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5.5))
    id_set = results["id_set"]
    for name, curve in results["wise_ft_curves"].items():
        if None in curve["id"]:
            continue
        if name.endswith("seed" + str(results["config"]["seeds"][0])):
            ax.plot(np.array(curve["id"]) * 100, np.array(curve["shift_avg"]) * 100, "-", alpha=0.5,
                    label=f"{name.split('-')[0]} curve (alpha 0..1)")
    markers = "osD^v<>pP*Xh"
    for i, (method, stats) in enumerate(results["summary"].items()):
        if id_set not in stats or "shift_avg" not in stats:
            continue  # a tuning run that evaluated only the selection sets
        x, y = 100 * stats[id_set]["mean"], 100 * stats["shift_avg"]["mean"]
        ax.errorbar(x, y, xerr=100 * stats[id_set]["std"], yerr=100 * stats["shift_avg"]["std"],
                    fmt=markers[i % len(markers)], markersize=8, capsize=3, label=method)
    ax.set_xlabel(f"ID accuracy (%, {id_set})")
    ax.set_ylabel("shift-average accuracy (%)")
    ax.set_title("Digit-shift benchmark: robustness vs in-distribution accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
