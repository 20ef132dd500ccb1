"""SAE-FT of a Hub CLIP checkpoint on ImageNet (or any image-classification dataset), full or LoRA: `saeft train`.

    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/imagenet.py \
        --config recipes/configs/imagenet_vit_b16.yaml --output_dir outputs/vit-b16-saeft

The code (and its one parser) is `saeft_hf.commands.train`; this file runs it from a clone.
"""

import sys

from saeft_hf.commands.train import DataArguments, classnames_for, main  # noqa: F401 (imported from here by tests)

if __name__ == "__main__":
    main(sys.argv[1:])
