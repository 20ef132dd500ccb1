"""Benchmark worlds: a data world (its splits, class names, prompts) and the tiny CLIP pre-trained on its pool.

The experiment (`experiment.py`) and the pre-training recipe run on any world through this one interface:

- ``digits``: MNIST, UCI and printed digits (PyPI data; `digits.py`), the default and the demo;
- ``fashion``: Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (`fashion.py`), a second data world
  to test whether a conclusion drawn on digits transfers.

Worlds are imported lazily, so ``import saeft_hf.benchmarks.worlds`` stays cheap and a missing optional data
source only matters to the world that needs it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

#: World name -> the module that defines its `WORLD`.
WORLD_MODULES: dict[str, str] = {"digits": "saeft_hf.benchmarks.digits", "fashion": "saeft_hf.benchmarks.fashion"}


@dataclass(frozen=True)
class World:
    """Everything the experiment needs to know about one data world.

    ``build(seed)`` returns a DatasetDict with splits ``pretrain`` (with ``caption`` and ``source`` columns),
    ``finetune``, ``validation``, ``id_test_split``, every ``shift_splits`` and ``tuning_splits`` entry; every
    split has ``image`` (28x28 mode "L") and ``label`` (ClassLabel of ``classnames``).
    """

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    shift_splits: tuple[str, ...]
    tuning_splits: tuple[str, ...]
    build: Callable[[int], datasets.DatasetDict]
    clip_path: Callable[[], str]  # the bundled pre-trained tiny CLIP of this world
    build_tokenizer: Callable[[], PreTrainedTokenizerBase]
    collator: Callable[..., Any]  # (tokenizer, seed=...) -> a CLIPModel batch collator for `pretrain` rows
    id_test_split: str = "id_test"
    tune_shift_split: str | None = None  # the earlier protocol's single tuning shift (digits only)
    title: str = ""  # for plots


def get_world(name: str) -> World:
    """The world called `name` (``digits`` or ``fashion``)."""
    if name not in WORLD_MODULES:
        raise ValueError(f"Unknown benchmark world {name!r}; choose one of {sorted(WORLD_MODULES)}.")
    return importlib.import_module(WORLD_MODULES[name]).WORLD
