"""Train the SAE that SAE-FT needs on a pre-trained CLIP's embeddings, and save (or push) it: `saeft train-sae`.

    accelerate launch --num_processes 8 recipes/train_sae.py --model_name_or_path ... --output_dir ... --bf16

The code (and its one parser) is `saeft_hf.commands.train_sae`; this file runs it from a clone.
"""

import sys

from saeft_hf.commands.train_sae import SAERunArguments, main, train_and_save  # noqa: F401

if __name__ == "__main__":
    main(sys.argv[1:])
