"""Test configuration: everything offline, small and deterministic."""

import os

# Must happen before any Hugging Face import: huggingface_hub reads it once at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def planted_data() -> tuple[torch.Tensor, torch.Tensor]:
    """20k unit-norm vectors, each a positive mix of 4 of 128 random unit atoms in 64 dims. Returns (X, atoms)."""
    gen = torch.Generator().manual_seed(0)
    d, n_atoms, k, n = 64, 128, 4, 20_000
    atoms = torch.nn.functional.normalize(torch.randn(n_atoms, d, generator=gen), dim=-1)
    idx = torch.rand(n, n_atoms, generator=gen).topk(k, dim=-1).indices
    codes = torch.zeros(n, n_atoms).scatter(-1, idx, torch.rand(n, k, generator=gen) + 0.5)
    return codes @ atoms, atoms
