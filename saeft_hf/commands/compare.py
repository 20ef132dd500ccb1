"""`saeft compare RUN --config FILE`: a run's eval_results.json beside the numbers its config should reproduce.

    saeft compare outputs/clip-vit-b16-saeft --config recipes/configs/imagenet_vit_b16.yaml

Exits 1 when the alpha = 0 end of the run's WiSE-FT sweep is off the config's expected zero-shot numbers by more than
its tolerance (a model, head or evaluation-protocol problem), 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from saeft_hf.expected import Comparison, compare_run, load_expected


def main(argv: Sequence[str]) -> Comparison:
    parser = argparse.ArgumentParser(description="Compare a run's eval_results.json with the `expected:` numbers of a "
                                                 "recipe config.")
    parser.add_argument("run", help="A run's output_dir (holding eval_results.json) or an eval_results.json file.")
    parser.add_argument("--config", required=True,
                        help="A recipe config with an `expected:` section, e.g. recipes/configs/imagenet_vit_b16.yaml.")
    args = parser.parse_args(list(argv))
    path = os.path.join(args.run, "eval_results.json") if os.path.isdir(args.run) else args.run
    if not os.path.isfile(path):
        parser.error(f"no eval_results.json at {path}: give a finished run's output_dir or the file itself.")
    with open(path, encoding="utf-8") as fh:
        results = json.load(fh)
    comparison = compare_run(results, load_expected(args.config))
    print(comparison.table)
    if comparison.failed:
        print("\nOff the expected zero-shot numbers:\n  " + "\n  ".join(comparison.failed))
        raise SystemExit(1)
    return comparison


if __name__ == "__main__":
    main(sys.argv[1:])
