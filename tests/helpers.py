"""Tiny, real Hugging Face CLIP checkpoints and image folders built in code (no network)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

CLASSNAMES = ["goldfish", "tabby cat", "red fox", "school bus"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]
IMAGE_SIZE = 30


def make_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    vocab = {"[PAD]": 0, "[BOS]": 1, "[UNK]": 2, "[EOS]": 3}
    for word in sorted(set(words)):
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 1), ("[EOS]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]",
        model_max_length=16,
    )


def make_tiny_clip(path: Path, *, seed: int = 0, classnames=CLASSNAMES, templates=TEMPLATES) -> Path:
    """Save a random tiny CLIPModel (30 px, patch 6), its tokenizer and a CLIP-style preprocessor config."""
    torch.manual_seed(seed)
    words = " ".join(t.format(c) for t in templates for c in classnames).replace(".", " ").split()
    tokenizer = make_tokenizer(words)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, projection_dim=16, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=37, max_position_embeddings=16,
                         bos_token_id=1, eos_token_id=3, pad_token_id=0),
        vision_config=dict(image_size=IMAGE_SIZE, patch_size=6, num_channels=3, hidden_size=32, projection_dim=16,
                           num_hidden_layers=2, num_attention_heads=4, intermediate_size=37),
        projection_dim=16,
        logit_scale_init_value=float(np.log(100.0)),
    )
    model = CLIPModel(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor",
        "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "size": {"shortest_edge": IMAGE_SIZE},
        "do_center_crop": True, "do_normalize": True, "do_resize": True, "do_rescale": True,
        "rescale_factor": 1 / 255, "resample": 3,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    }))
    return path


def make_image_folder(root: Path, *, per_class: int = 6, size: int = 36, seed: int = 0, names=None) -> Path:
    """An ImageNet-shaped folder root/<class>/<i>.png; each class has its own colour so it is learnable."""
    rng = np.random.default_rng(seed)
    names = names or [f"n0{i:07d}" for i in range(len(CLASSNAMES))]
    for label, name in enumerate(names):
        (root / name).mkdir(parents=True, exist_ok=True)
        base = np.zeros(3)
        base[label % 3] = 200
        for i in range(per_class):
            pixels = np.clip(base + rng.normal(0, 40, (size, size, 3)) + 30 * (label // 3), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def torchrun(nproc: int = 2) -> list[str]:
    """The start of a `torchrun --nproc_per_node N` command. `--standalone` makes torchrun pick a free rendezvous
    port itself: other suites may run torchrun on this machine at the same time, and a port probed free here could
    be taken before torchrun binds it."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]


@contextlib.contextmanager
def recipe_module(name: str, module_name: str) -> Iterator[object]:
    """Import `recipes/<name>.py` as `module_name` (registered while in use: dataclasses resolve annotations through
    `sys.modules`), and forget it afterwards."""
    path = Path(__file__).resolve().parents[1] / "recipes" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(module_name, None)


def tiny_run_config(output_dir, **overrides):
    """An `SAEFTConfig` for a few CPU steps of a tiny run in `output_dir` (batch 4, lr 1e-3, no saving, no workers)."""
    from saeft_hf import SAEFTConfig

    base = dict(output_dir=str(output_dir), per_device_train_batch_size=4, max_steps=1, learning_rate=1e-3,
                warmup_steps=0, logging_steps=1, use_cpu=True, report_to="none", save_strategy="no",
                dataloader_num_workers=0, seed=0)
    return SAEFTConfig(**{**base, **overrides})
