"""Evaluate a saved run, a local model or a Hub model on the eval sets of a YAML config: `saeft evaluate`.

    torchrun --nproc_per_node 8 recipes/evaluate.py --model_name_or_path outputs/vit-b16-saeft \
        --eval_sets_config recipes/configs/imagenet_eval_sets.yaml --output_dir outputs/vit-b16-saeft/eval

The code (and its one parser) is `saeft_hf.commands.evaluate`; this file runs it from a clone.
"""

import sys

from saeft_hf.commands.evaluate import EvaluateArguments, main  # noqa: F401

if __name__ == "__main__":
    main(sys.argv[1:])
