"""On-disk caches of expensive passes (SAE / linear-probe / reference embeddings, zero-shot heads), keyed on what
made them.

A run keeps all its caches in one folder, `output_dir/cache/` (`cache_dir`): easy to exclude, never pushed
(`saeft_hf.hub.push_run_to_hub` leaves it out), safe to delete. A cache file is a safetensors file whose metadata
holds the JSON of its key: a dict of everything the tensors depend on (model and weights fingerprint, data
fingerprint, split, sample count, transform, representation, dtype, ...). On load the stored key is compared with
the expected one: equal, the tensors are reused; different, the differing fields are logged and the cache is
rebuilt; unreadable (truncated, not safetensors), logged and rebuilt. A stale cache is never reused silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Subset

from .atomic import write_file_atomic

logger = logging.getLogger(__name__)

CACHE_DIRNAME = "cache"
CACHE_FORMAT = 1  # bump when what a cache holds changes meaning
_META_KEY = "saeft_cache_key"

CacheKey = Mapping[str, Any]


def cache_dir(output_dir: str | os.PathLike[str]) -> Path:
    """`output_dir/cache`: where every cache of a run lives (not created here)."""
    return Path(output_dir) / CACHE_DIRNAME


def _digest(*parts: Any) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(part if isinstance(part, (bytes, bytearray, memoryview)) else str(part).encode())
        h.update(b"\0")
    return h.hexdigest()


def text_fingerprint(values: Sequence[str]) -> str:
    """A short hash of a list of strings (class names, templates), order-sensitive."""
    return _digest(json.dumps(list(values)))


def model_fingerprint(model: nn.Module, parts: Sequence[str] | None = None) -> str:
    """A hash of the model's weights (names, dtypes, shapes, bytes), restricted to the state-dict entries under the
    submodules named in `parts` (e.g. `("vision_model", "visual_projection")`; matched as a dotted path component,
    so a PeftModel's `base_model.model.vision_model...` matches too). One pass over the weights: about a second for
    a ViT-B, nothing next to the pass it keys."""
    h = hashlib.blake2b(digest_size=16)
    matched = 0
    for name, tensor in sorted(model.state_dict().items()):
        if parts is not None and not any(f".{p}." in f".{name}." for p in parts):
            continue
        matched += 1
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    if matched == 0:
        raise ValueError(f"model_fingerprint found no weights under {list(parts or [])} in {type(model).__name__}.")
    return h.hexdigest()


def config_fingerprint(config: Any) -> str | None:
    """A hash of a transformers config's meaningful fields (private fields and the library version left out)."""
    if config is None or not hasattr(config, "to_dict"):
        return None
    values = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
    return _digest(json.dumps(values, sort_keys=True, default=str))


def dataset_fingerprint(dataset: Any) -> str | None:
    """What identifies the rows of `dataset`, or None when nothing does (then do not cache).

    A map-style `datasets.Dataset`: its `_fingerprint` (changes with the data files, `select`, `map`, ...). A
    `torch.utils.data.Subset`: its dataset's fingerprint and the indices. A stream: its builder, config, and the
    chain of its example iterables (data files or URLs, shuffle seed and buffer, `take` / `skip` counts). Best effort:
    a stream has no content fingerprint, so a file rewritten in place under the same name is not noticed.
    """
    if isinstance(dataset, datasets.Dataset):
        return dataset._fingerprint
    if isinstance(dataset, Subset):
        inner = dataset_fingerprint(dataset.dataset)
        return None if inner is None else _digest(inner, list(dataset.indices))
    if isinstance(dataset, datasets.IterableDataset):
        info = dataset.info
        return _digest("stream", info.builder_name, info.config_name, info.version,
                       json.dumps(_describe_examples_iterable(getattr(dataset, "_ex_iterable", None)), default=str))
    return None


def _stable_description(value: Any) -> Any:
    """A stream source's kwargs in a form that is the same in every process: local files by path, size and mtime;
    in-memory shards (`to_iterable_dataset`) by their fingerprint; other objects (e.g. the open archive iterators
    beside a webdataset's `tar_paths`) by their type only, never by a repr that holds a memory address."""
    if isinstance(value, Mapping):
        return {str(k): _stable_description(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_stable_description(v) for v in value]
    if isinstance(value, str):
        if os.path.isfile(value):
            stat = os.stat(value)
            return [value, stat.st_size, stat.st_mtime_ns]
        return value
    if value is None or isinstance(value, (int, float, bool)):
        return value
    fingerprint = getattr(value, "_fingerprint", None)
    return fingerprint if isinstance(fingerprint, str) else f"<{type(value).__name__}>"


def _describe_examples_iterable(it: Any, depth: int = 0) -> Any:
    """A JSON-able description of a stream's example-iterable chain (datasets internals, read defensively)."""
    if it is None or depth > 50:
        return None
    simple = {k: v for k, v in vars(it).items()
              if isinstance(v, (int, float, str, bool, type(None))) and not k.startswith("_")}
    generator = getattr(it, "generator", None)
    if generator is not None and hasattr(generator, "bit_generator"):
        simple["rng"] = generator.bit_generator.state  # the shuffle seed, as a state
    kwargs = getattr(it, "kwargs", None)
    if kwargs is not None:
        simple["source"] = _digest(json.dumps(_stable_description(kwargs), sort_keys=True))
    children = [getattr(it, "ex_iterable", None), *(getattr(it, "ex_iterables", None) or [])]
    return {"type": type(it).__name__, **simple,
            "children": [_describe_examples_iterable(c, depth + 1) for c in children if c is not None]}


def embedding_cache_key(
    model: nn.Module,
    dataset: Any,
    *,
    split: str,
    transform: Any,
    representation: str,
    max_samples: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    **extra: Any,
) -> dict[str, Any] | None:
    """The key of a cache of image embeddings: what the [N, d] rows depend on.

    `model` is the pre-trained model whose representation is taken (its vision tower and projection are
    fingerprinted), `dataset` the raw (untransformed) dataset, `transform` the image transform (keyed by `repr`).
    Returns None when `dataset` cannot be fingerprinted (`dataset_fingerprint`): do not cache then.
    """
    data = dataset_fingerprint(dataset)
    if data is None:
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    return {
        "format": CACHE_FORMAT,
        "model": getattr(config, "source_model", None) or getattr(config, "_name_or_path", None),
        "revision": getattr(config, "_commit_hash", None),
        "vision_config": config_fingerprint(getattr(config, "vision_config", None)),
        "weights": model_fingerprint(base, ("vision_model", "visual_projection")),
        "data": data,
        "rows": len(dataset) if hasattr(dataset, "__len__") and not isinstance(dataset, datasets.IterableDataset)
        else None,
        "split": split,
        "max_samples": max_samples,
        "transform": repr(transform),
        "representation": representation,
        "dtype": str(autocast_dtype or torch.float32),
        **extra,
    }


def save_cached_tensors(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], key: CacheKey) -> None:
    """Write `tensors` with `key` in the metadata, atomically (a temporary file renamed into place).

    A cache is an optimisation: when it cannot be written (disk full, read-only folder) the failure is logged and
    the run goes on with the tensors it has; no partial file is left behind.
    """
    meta = {_META_KEY: json.dumps(dict(key), sort_keys=True, default=str)}
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    try:
        write_file_atomic(path, lambda tmp: save_file(cpu, str(tmp), metadata=meta))
    except OSError as err:
        logger.warning("Could not write the cache %s (%s: %s); continuing without it (the next run recomputes it).",
                       path, type(err).__name__, err)


def load_cached_tensors(path: str | os.PathLike[str], key: CacheKey, *,
                        what: str = "cache") -> dict[str, torch.Tensor] | None:
    """The tensors stored at `path` if its key equals `key`; None (and a log line saying why) otherwise."""
    path = Path(path)
    if not path.is_file():
        return None
    expected = json.loads(json.dumps(dict(key), sort_keys=True, default=str))
    try:
        with safe_open(str(path), framework="pt") as fh:
            stored = json.loads((fh.metadata() or {}).get(_META_KEY, "null"))
            if stored == expected:
                logger.info("Reusing the %s in %s (its key matches).", what, path)
                return {name: fh.get_tensor(name) for name in fh.keys()}
    except Exception as err:  # a truncated or foreign file is rebuilt, never trusted
        logger.warning("Rebuilding the %s: %s is unreadable (%s: %s).", what, path, type(err).__name__, err)
        return None
    if not isinstance(stored, dict):
        logger.warning("Rebuilding the %s: %s has no saeft cache key (an older or foreign file).", what, path)
    else:
        changed = sorted(k for k in set(stored) | set(expected) if stored.get(k) != expected.get(k))
        logger.warning("Rebuilding the %s: %s was made from other inputs (changed: %s).", what, path,
                       ", ".join(f"{k}: {stored.get(k)!r} -> {expected.get(k)!r}" for k in changed))
    return None
