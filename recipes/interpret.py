"""Read what fine-tuning changed, in SAE features, as one HTML report: `saeft interpret`.

    python recipes/interpret.py --digits_split id_test \
        --finetuned FT=outputs/demo/runs/ft-seed0 --finetuned SAE-FT=outputs/demo/runs/sae_ft-seed0 \
        --sae outputs/demo/sae --output_dir outputs/demo/interpret

The code (and its one parser) is `saeft_hf.commands.interpret`; this file runs it from a clone.
"""

import sys

from saeft_hf.commands.interpret import DIGIT_VOCABULARY, build_parser, main, parse_finetuned  # noqa: F401

if __name__ == "__main__":
    main(sys.argv[1:])
