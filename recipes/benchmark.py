"""Speed and memory of SAE-FT, side by side in one run: plain FT, SAE-FT (live and cached reference), LoRA, LoRA
SAE-FT and a hand-written PyTorch loop, on a ViT-B/32-sized CLIP (CPU) or ViT-B/16 (CUDA) and on the digit
benchmark's model; plus our SAE training against SAELens. The measuring code is `saeft_hf.benchmarks.speed`.

    python recipes/benchmark.py                                  # full CPU run, outputs/benchmark/benchmark.json
    python recipes/benchmark.py --device cuda --bf16             # ViT-B/16, largest batch that fits, bf16
    python recipes/benchmark.py --parts finetune --models vit_b32 --batch_size 4 --steps 10
    python recipes/benchmark.py --quick                          # seconds: tiny model, for tests
    python recipes/benchmark.py --parts input --output docs/benchmarks/input_pipeline.json   # input pipeline only

SAELens is optional (`pip install saeft-hf[bench]`); without it the SAE comparison reports only our numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys

from saeft_hf.benchmarks.speed import FT_CONFIGS, MODELS, PARTS, BenchmarkOptions, run_benchmark

SUMMARY_KEYS = (
    "ratio_sae_ft_to_ft", "ratio_sae_ft_to_ft_paired", "ratio_cached_to_ft", "ratio_lora_sae_ft_to_lora",
    "lora_sae_ft_extra_weight_bytes", "lora_sae_ft_extra_weight_fraction", "trainer_vs_loop_throughput",
    "sae_train_speedup_vs_saelens", "fvu_ours", "fvu_saelens", "fvu_ours_paper_init", "input_train_ratio_to_pil",
    "input_eval_ratio_to_pil", "input_large_eval_ratio_to_pil", "input_train_images_per_s_per_core",
    "input_workers_per_gpu_2000", "input_workers_per_gpu_4000", "embedding_pass_images_per_s", "wall_time_s",
)


def parse(argv: list[str]) -> BenchmarkOptions:
    defaults = BenchmarkOptions()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=defaults.output, help="JSON file to write.")
    p.add_argument("--device", default=defaults.device, help="auto (CUDA if available), cpu, cuda or cuda:N.")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (the Trainer's bf16=True).")
    p.add_argument("--models", nargs="+", choices=MODELS,
                   help="Models to fine-tune (default: vit_b32 digits on CPU, vit_b16 digits on CUDA).")
    p.add_argument("--batch_size", type=int, default=None,
                   help="Per-step batch (default: 8 for ViT, 64 for digits; on CUDA the largest that fits).")
    p.add_argument("--max_batch_size", type=int, default=defaults.max_batch_size, help="Cap of the CUDA batch search.")
    p.add_argument("--warmup", type=int, default=defaults.warmup, help="Unmeasured steps per configuration.")
    p.add_argument("--steps", type=int, default=defaults.steps, help="Measured steps per configuration.")
    p.add_argument("--configs", nargs="+", choices=FT_CONFIGS, default=list(FT_CONFIGS),
                   help="Fine-tuning configurations to run.")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                   help="finetune (step time / memory), sae (SAE training vs SAELens) and/or input (our transforms "
                        "vs plain PIL on JPEGs, one core, and the embedding pass).")
    p.add_argument("--input_images", type=int, default=defaults.input_images, help="300-500 px JPEGs (input part).")
    p.add_argument("--input_large_images", type=int, default=defaults.input_large_images,
                   help="1920x1440 JPEGs (input part).")
    p.add_argument("--input_rounds", type=int, default=defaults.input_rounds, help="Passes (input part).")
    p.add_argument("--embedding_model", default=defaults.embedding_model, choices=[*MODELS, ""],
                   help="Vision tower for the embedding-pass throughput ('' skips it).")
    p.add_argument("--sae_vectors", type=int, default=defaults.sae_vectors)
    p.add_argument("--sae_heldout", type=int, default=defaults.sae_heldout)
    p.add_argument("--sae_d_in", type=int, default=defaults.sae_d_in)
    p.add_argument("--sae_width", type=int, default=defaults.sae_width)
    p.add_argument("--sae_k", type=int, default=defaults.sae_k)
    p.add_argument("--sae_batch_size", type=int, default=defaults.sae_batch_size)
    p.add_argument("--sae_steps", type=int, default=None, help="Default: one epoch of --sae_vectors.")
    p.add_argument("--sae_lr", type=float, default=defaults.sae_lr)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads.")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--quick", action="store_true", help="Tiny model and data, a few steps (tests).")
    a = p.parse_args(argv)
    return BenchmarkOptions(
        output=a.output, device=a.device, bf16=a.bf16, models=tuple(a.models) if a.models else None,
        batch_size=a.batch_size, max_batch_size=a.max_batch_size, warmup=a.warmup, steps=a.steps,
        configs=tuple(a.configs), parts=tuple(a.parts), sae_vectors=a.sae_vectors, sae_heldout=a.sae_heldout,
        sae_d_in=a.sae_d_in, sae_width=a.sae_width, sae_k=a.sae_k, sae_batch_size=a.sae_batch_size,
        sae_steps=a.sae_steps, sae_lr=a.sae_lr, threads=a.threads, seed=a.seed, quick=a.quick,
        input_images=a.input_images, input_large_images=a.input_large_images, input_rounds=a.input_rounds,
        embedding_model=a.embedding_model,
    )


def main(argv: list[str]) -> dict:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    opts = parse(argv)
    results = run_benchmark(opts, command=shlex.join(["python", "recipes/benchmark.py", *argv]))
    print(json.dumps({k: results.get(k) for k in SUMMARY_KEYS}, indent=2))
    print(f"full results: {opts.output}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
