"""Speed and memory of SAE-FT: step time and peak memory against plain fine-tuning, LoRA and a hand-written loop,
and SAE training throughput and FVU against SAELens. `recipes/benchmark.py` is the command line.

Fine-tuning (one process, one run; every configuration starts from the same weights, sees the same images and runs
the same number of steps):

* `ft` plain fine-tuning, `sae_ft` SAE-FT with the live frozen reference (the paper), `sae_ft_cached` SAE-FT with
  `z0` read from the batch (`reference_mode="cached"`), `lora`, `lora_sae_ft` (the reference is the same model with
  its adapters disabled), and `loop`: a minimal hand-written PyTorch loop doing plain fine-tuning (fused AdamW like
  the Trainer's default, gradient clipping at 1.0, the same cosine schedule with warm-up).
* A step is one optimizer step through the real `SAEFTTrainer.train()` loop, timed from the Trainer's
  `on_step_begin` to its `on_step_end` callback: `training_step` (forward, frozen reference, penalty, backward),
  gradient clipping, optimizer and scheduler steps, `zero_grad`. Fetching the next batch and logging happen outside
  that window; they are in the "cycle" time (`on_step_begin` to the next one).
* Interleaving: every configuration trains in its own thread, and a round-robin baton lets exactly one of them run
  at a time, one step per turn. Machine noise (other jobs on a shared machine) therefore hits every configuration
  alike, and ratios are also given per round (`*_paired`: the median over rounds of the ratio within a round).
  Step times are medians over the measured steps after warm-up. CUDA is synchronised around every timing.
* Peak memory of one step, per configuration: the persistent tensors at the start of the step (weights, optimizer
  state, frozen reference, SAE; counted by storage, shared storage once) plus the transient peak during the step
  (CUDA: `torch.cuda.max_memory_allocated` minus what was allocated at the start of the step; CPU: the torch
  profiler's CPU-allocator accounting, `profile_memory=True`, i.e. bytes allocated by torch during the step and
  still live; no tracemalloc, no RSS). That step is not timed.

SAE training: the same planted-dictionary embeddings (sparse positive mixtures of random unit atoms plus a common
offset and noise, unit-normalised, so FVU is meaningful), the same batches in the same order, the same width, k,
batch, steps and learning rate, for `saeft_hf.train_sae` (`activation="topk"`, AdamW with weight decay 0, i.e.
Adam; `init_encoder="tied"` like SAELens, and once more with our default independent init) and SAELens'
`TopKTrainingSAE` through its own `SAETrainer` (Adam, its default clipping at 1.0, AuxK off like ours). All train in
threads under the same round-robin baton, one step per turn; throughput is measured between consecutive batch
requests (the training step), and FVU on the same held-out vectors.
"""

from __future__ import annotations

import copy
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, TrainerCallback, get_cosine_schedule_with_warmup

from ..config import SAEFTConfig
from ..data import ImageClassificationCollator
from ..lora import add_lora
from ..modeling import SAEFTCLIPConfig, SAEFTCLIPForImageClassification
from ..sae import SAEConfig, SparseAutoencoder
from ..sae_training import train_sae
from ..trainer import SAEFTTrainer

FT_CONFIGS: tuple[str, ...] = ("ft", "sae_ft", "sae_ft_cached", "lora", "lora_sae_ft", "loop")
MODELS: tuple[str, ...] = ("vit_b32", "vit_b16", "digits", "tiny")
PARTS: tuple[str, ...] = ("finetune", "sae", "input")
DEFAULT_BATCH = {"vit_b32": 8, "vit_b16": 8, "digits": 64, "tiny": 4}


@dataclass
class BenchmarkOptions:
    """What to run. Defaults: the full CPU benchmark (about 5-10 minutes on 2 cores)."""

    output: str = "outputs/benchmark/benchmark.json"
    device: str = "auto"  # auto (CUDA if available), cpu, cuda, cuda:N
    bf16: bool = False  # bf16 autocast (Trainer `bf16=True`; the loop and SAE training under autocast)
    models: tuple[str, ...] | None = None  # default: vit_b32 + digits on CPU, vit_b16 + digits on CUDA
    batch_size: int | None = None  # per-model default; on CUDA None searches the largest batch that fits
    max_batch_size: int = 1024  # upper end of the CUDA batch search
    warmup: int = 2  # steps per configuration not measured
    steps: int = 12  # measured steps per configuration
    configs: tuple[str, ...] = FT_CONFIGS
    parts: tuple[str, ...] = PARTS
    sae_vectors: int = 200_000  # training vectors for the SAE comparison
    sae_heldout: int = 20_000  # held-out vectors for FVU
    sae_d_in: int = 512
    sae_width: int = 2048
    sae_k: int = 32
    sae_batch_size: int = 1024
    sae_steps: int | None = None  # None: one epoch (sae_vectors // sae_batch_size)
    sae_lr: float = 1e-3
    threads: int | None = None  # torch intra-op threads (default: torch's)
    seed: int = 0
    quick: bool = False  # tiny everything, for tests
    input_images: int = 400  # 300-500 px JPEGs for the input-pipeline part
    input_large_images: int = 8  # 1920x1440 JPEGs (the large-JPEG case)
    input_rounds: int = 5  # passes over the images, pipelines interleaved chunk by chunk
    embedding_model: str = "vit_b32"  # the vision tower of the embedding-pass throughput ("" skips it)

    def __post_init__(self) -> None:
        for name, allowed in (("models", MODELS), ("configs", FT_CONFIGS), ("parts", PARTS)):
            value = getattr(self, name)
            if value is not None:
                bad = [v for v in value if v not in allowed]
                if bad:
                    raise ValueError(f"Unknown {name} {bad}; choose from {list(allowed)}.")
        if self.warmup < 0 or self.steps < 1:
            raise ValueError(f"Need warmup >= 0 and steps >= 1, got {self.warmup} and {self.steps}.")
        if self.quick:
            self.models = self.models or ("tiny",)
            self.steps, self.warmup = min(self.steps, 2), min(self.warmup, 1)
            self.sae_vectors, self.sae_heldout = min(self.sae_vectors, 2048), min(self.sae_heldout, 512)
            self.sae_d_in, self.sae_width, self.sae_k = 16, 64, 4
            self.sae_batch_size = min(self.sae_batch_size, 256)
            self.input_images, self.input_large_images, self.input_rounds = 8, 2, 1
            self.embedding_model = "tiny"


# ----------------------------------------------------------------------------------------------------------------
# Models and data
# ----------------------------------------------------------------------------------------------------------------


def _vit_config(patch_size: int) -> SAEFTCLIPConfig:
    vision = CLIPVisionConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        patch_size=patch_size, image_size=224, num_channels=3, projection_dim=512,
    )
    return SAEFTCLIPConfig(vision_config=vision, projection_dim=512, num_labels=1000)


def build_model(name: str, seed: int = 0) -> tuple[SAEFTCLIPForImageClassification, str]:
    """The benchmark model `name` (random weights unless the bundled digit checkpoint exists) and where it came from."""
    torch.manual_seed(seed)
    if name in ("vit_b32", "vit_b16"):
        config, source = _vit_config(32 if name == "vit_b32" else 16), f"{name} config, random weights, 224 px"
        model = SAEFTCLIPForImageClassification(config)
    elif name == "digits":
        from .digits import build_tokenizer, tiny_clip_config, tiny_clip_path

        path = Path(tiny_clip_path())
        if (path / "model.safetensors").is_file():
            model = SAEFTCLIPForImageClassification.from_pretrained(str(path), num_labels=10)
            source = f"bundled checkpoint {path}"
        else:
            clip = tiny_clip_config(build_tokenizer())
            config = SAEFTCLIPConfig(vision_config=clip.vision_config.to_dict(), projection_dim=clip.projection_dim,
                                     num_labels=10)
            model = SAEFTCLIPForImageClassification(config)
            source = "digit benchmark config (no bundled model.safetensors), random weights"
    elif name == "tiny":
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                  patch_size=6, image_size=30, num_channels=3, projection_dim=16)
        model = SAEFTCLIPForImageClassification(SAEFTCLIPConfig(vision_config=vision, projection_dim=16, num_labels=4))
        source = "tiny test config, random weights"
    else:
        raise ValueError(f"Unknown model {name!r}; choose from {list(MODELS)}.")
    with torch.no_grad():  # a non-zero head, so that the cross-entropy reaches the backbone as in real training
        nn.init.normal_(model.classifier.weight, std=0.02)
    return model, source


def random_sae(d_in: int, seed: int = 0) -> SparseAutoencoder:
    """The paper's SAE shape for width d_in (F = 4 d, k = 32, signed TopK), random weights: speed does not depend
    on what the SAE learned."""
    torch.manual_seed(seed)
    return SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=4 * d_in, k=min(32, 4 * d_in)))


class TensorImages(torch.utils.data.Dataset):
    """Examples `{"pixel_values", "labels"[, "z0"]}` from tensors, for `ImageClassificationCollator`."""

    def __init__(self, pixel_values: torch.Tensor, labels: torch.Tensor, z0: torch.Tensor | None = None) -> None:
        self.pixel_values, self.labels, self.z0 = pixel_values, labels, z0

    def __len__(self) -> int:
        return self.pixel_values.shape[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {"pixel_values": self.pixel_values[index], "labels": int(self.labels[index])}
        if self.z0 is not None:
            item["z0"] = self.z0[index]
        return item


def make_images(config: SAEFTCLIPConfig, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    vision = config.vision_config
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, vision.num_channels, vision.image_size, vision.image_size, generator=gen)
    return pixels, torch.randint(0, config.num_labels, (n,), generator=gen)


@torch.no_grad()
def reference_embeddings(model: SAEFTCLIPForImageClassification, pixels: torch.Tensor, device: torch.device,
                         bf16: bool, batch_size: int = 64) -> torch.Tensor:
    """z0 of the pre-trained model for every image (what `add_reference_embeddings` stores), float32 on CPU."""
    model = model.to(device).eval()
    out = []
    for start in range(0, pixels.shape[0], batch_size):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out.append(model.get_representation(pixels[start:start + batch_size].to(device)).float().cpu())
    model.to("cpu")
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------------------------
# Round-robin scheduling, timing and memory
# ----------------------------------------------------------------------------------------------------------------


class RoundRobin:
    """Lets exactly one of several threads run at a time, in a fixed cyclic order, one turn each."""

    def __init__(self, names: Sequence[str]) -> None:
        self.order = list(names)
        self.active = set(names)
        self.turn: str | None = self.order[0] if self.order else None
        self._cond = threading.Condition()

    def _next(self, name: str) -> str | None:
        i = self.order.index(name)
        for offset in range(1, len(self.order) + 1):
            candidate = self.order[(i + offset) % len(self.order)]
            if candidate in self.active:
                return candidate
        return None

    def acquire(self, name: str) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.turn == name)

    def handover(self, name: str) -> None:
        """End this turn and wait for the next one."""
        with self._cond:
            self.turn = self._next(name)
            self._cond.notify_all()
            self._cond.wait_for(lambda: self.turn == name)

    def finish(self, name: str) -> None:
        with self._cond:
            self.active.discard(name)
            if self.turn == name:
                self.turn = self._next(name)
            self._cond.notify_all()


def run_with_baton(baton: RoundRobin, jobs: dict[str, Callable[[], Any]], threads: int | None = None,
                   device: torch.device | None = None) -> dict[str, Any]:
    """Run each job in its own thread, one at a time under `baton` (jobs call `baton.handover` between steps).

    Returns the jobs' results; re-raises the first error once every thread has ended.
    """
    results: dict[str, Any] = {}
    errors: dict[str, BaseException] = {}
    n_threads = threads or torch.get_num_threads()

    def target(name: str) -> None:
        torch.set_num_threads(n_threads)  # the intra-op thread count is per calling thread
        if device is not None and device.type == "cuda":
            torch.cuda.set_device(device)  # so is the current CUDA device
        baton.acquire(name)
        try:
            results[name] = jobs[name]()
        except BaseException as err:  # noqa: BLE001 - re-raised in the calling thread
            errors[name] = err
        finally:
            baton.finish(name)

    workers = [threading.Thread(target=target, args=(name,), name=f"bench-{name}", daemon=True) for name in jobs]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        name, err = next(iter(errors.items()))
        raise RuntimeError(f"benchmark job {name!r} failed: {err!r}") from err
    return results


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tensor_bytes(tensors: Any, seen: set | None = None) -> int:
    """Bytes of the distinct storages behind `tensors` (a storage shared by several tensors counts once)."""
    seen = set() if seen is None else seen
    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        storage = t.untyped_storage()
        key = (storage.data_ptr(), str(t.device))
        if key in seen or storage.nbytes() == 0:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def module_bytes(module: nn.Module | None, seen: set | None = None) -> int:
    if module is None:
        return 0
    return tensor_bytes([*module.parameters(), *module.buffers()], seen)


def optimizer_state_tensors(optimizer: Any) -> list[torch.Tensor]:
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def persistent_bytes(model: nn.Module, optimizer: Any, trainer: SAEFTTrainer | None = None) -> dict[str, int]:
    """What a configuration holds between steps, by category (each storage counted once, in this order)."""
    seen: set = set()
    out = {
        "model_weights": module_bytes(model, seen),
        "reference_model": module_bytes(getattr(trainer, "ref_model", None), seen),
        "sae": module_bytes(getattr(trainer, "sae", None), seen),
        "optimizer_state": tensor_bytes(optimizer_state_tensors(optimizer), seen) if optimizer is not None else 0,
        "gradients": tensor_bytes([p.grad for p in model.parameters()], seen),
    }
    out["total"] = sum(out.values())
    return out


class MemoryProbe:
    """Transient peak bytes of a code region: CUDA allocator stats, or the torch profiler's CPU-allocator accounting."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._prof: Any = None
        self._base = 0

    def start(self) -> None:
        _sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()

    def stop(self) -> int | None:
        _sync(self.device)
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device) - self._base)
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        return _profiler_peak_bytes(prof)


def _profiler_peak_bytes(prof: Any) -> int | None:
    """Largest `total_allocated` over the allocation events of a profile (bytes allocated during it, still live)."""
    try:
        from torch._C._profiler import _EventType

        stack = list(prof.profiler.kineto_results.experimental_event_tree())
    except Exception:  # noqa: BLE001 - private API; report "unknown" rather than fail the benchmark
        return None
    peak = 0
    while stack:
        event = stack.pop()
        if event.typed[0] == _EventType.Allocation:
            peak = max(peak, int(event.extra_fields.total_allocated))
        stack.extend(event.children)
    return peak


class StepRecorder:
    """Times steps between `begin` and `end`, hands the turn over between steps, and probes one step's memory."""

    def __init__(self, name: str, baton: RoundRobin, device: torch.device, memory_step: int | None,
                 holdings: Callable[[], dict[str, int]]) -> None:
        self.name, self.baton, self.device = name, baton, device
        self.memory_step = memory_step
        self.holdings = holdings
        self.step_times: dict[int, float] = {}
        self.cycle_times: dict[int, float] = {}
        self.memory: dict[str, Any] = {}
        self._t0: float | None = None
        self._begun = -1
        self._probe: MemoryProbe | None = None

    def begin(self, step: int) -> None:
        if self._t0 is not None:
            _sync(self.device)
            self.cycle_times[self._begun] = time.perf_counter() - self._t0
            self.baton.handover(self.name)
        if step == self.memory_step:
            self.memory["persistent_bytes"] = self.holdings()
            self._probe = MemoryProbe(self.device)
            self._probe.start()
        _sync(self.device)
        self._begun = step
        self._t0 = time.perf_counter()

    def end(self, step: int) -> None:
        _sync(self.device)
        elapsed = time.perf_counter() - self._t0
        if self._probe is not None:
            transient = self._probe.stop()
            self._probe = None
            persistent = self.memory["persistent_bytes"]["total"]
            self.memory["transient_peak_bytes"] = transient
            self.memory["peak_bytes"] = None if transient is None else persistent + transient
        else:
            self.step_times[step] = elapsed


class _RecorderCallback(TrainerCallback):
    def __init__(self, recorder: StepRecorder) -> None:
        self.recorder = recorder

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.recorder.begin(state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.recorder.end(state.global_step - 1)


# ----------------------------------------------------------------------------------------------------------------
# The configurations
# ----------------------------------------------------------------------------------------------------------------


def trainer_args(name: str, *, output_dir: str, batch_size: int, max_steps: int, device: torch.device, bf16: bool,
                 seed: int) -> SAEFTConfig:
    return SAEFTConfig(
        output_dir=output_dir, per_device_train_batch_size=batch_size, max_steps=max_steps,
        regularizer="sae_ft" if "sae_ft" in name else "none",
        reference_mode="cached" if name.endswith("_cached") else "live",
        use_lora=name.startswith("lora"),
        logging_steps=10, save_strategy="no", report_to="none", disable_tqdm=True, seed=seed,
        use_cpu=device.type == "cpu", bf16=bf16, dataloader_num_workers=0,
        dataloader_pin_memory=device.type == "cuda",
    )


def build_trainer(name: str, base: SAEFTCLIPForImageClassification, sae: SparseAutoencoder, dataset: Any,
                  args: SAEFTConfig, callbacks: list[TrainerCallback] | None = None) -> SAEFTTrainer:
    model = copy.deepcopy(base)
    if args.use_lora:
        model = add_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                         target_modules=args.lora_target_modules)
    return SAEFTTrainer(model=model, args=args, sae=copy.deepcopy(sae) if args.regularizer == "sae_ft" else None,
                        train_dataset=dataset, data_collator=ImageClassificationCollator(), callbacks=callbacks)


def hand_written_loop(model: nn.Module, dataset: Any, *, batch_size: int, max_steps: int, device: torch.device,
                      bf16: bool, recorder: StepRecorder | None = None, lr: float = 1e-5, weight_decay: float = 0.1,
                      warmup_steps: int = 500, max_grad_norm: float = 1.0, seed: int = 0) -> nn.Module:
    """Plain fine-tuning without the Trainer: what the Trainer's overhead is measured against."""
    torch.manual_seed(seed)
    model = model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError, TypeError):
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps, max_steps)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                         collate_fn=ImageClassificationCollator(), pin_memory=device.type == "cuda")
    if recorder is not None:
        recorder.holdings = lambda: persistent_bytes(model, optimizer)
    step = 0
    while step < max_steps:
        for batch in loader:
            if recorder is not None:
                recorder.begin(step)
            pixel_values = batch["pixel_values"].to(device, non_blocking=True)
            labels = batch["labels"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(pixel_values=pixel_values).logits
            loss = F.cross_entropy(logits.float(), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if recorder is not None:
                recorder.end(step)
            step += 1
            if step >= max_steps:
                break
    return model


def _median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def _cleanup(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def search_batch_size(base: SAEFTCLIPForImageClassification, sae: SparseAutoencoder, dataset_fn: Callable[[int], Any],
                      device: torch.device, bf16: bool, configs: Sequence[str], max_batch: int, seed: int,
                      workdir: str) -> int:
    """CUDA: the largest power-of-two batch (<= max_batch) with which two SAE-FT steps fit, while memory for what
    the other configurations keep resident (weights, Adam state) stays reserved."""
    weight_bytes = module_bytes(base)
    resident = {"ft": 3, "sae_ft_cached": 3, "loop": 3, "lora": 1.1, "lora_sae_ft": 1.1, "sae_ft": 0}
    reserve = 1.1 * weight_bytes * sum(resident.get(c, 0) for c in configs)
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(max(0.05, 1.0 - reserve / total), device)
    best, batch = None, 8
    try:
        while batch <= max_batch:
            trainer = None
            try:
                args = trainer_args("sae_ft", output_dir=os.path.join(workdir, "search"), batch_size=batch,
                                    max_steps=2, device=device, bf16=bf16, seed=seed)
                trainer = build_trainer("sae_ft", base, sae, dataset_fn(batch), args)
                trainer.train()
                best, batch = batch, batch * 2
            except torch.cuda.OutOfMemoryError:
                break
            finally:
                if trainer is not None:
                    trainer.accelerator.free_memory()
                del trainer
                _cleanup(device)
    finally:
        _cleanup(device)
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    if best is None:
        raise RuntimeError("Not even a batch of 8 fits for SAE-FT on this GPU.")
    return best


def benchmark_finetuning(model_name: str, opts: BenchmarkOptions, device: torch.device, workdir: str) -> dict[str, Any]:
    """Interleaved step times and per-configuration peak memory for one model."""
    base, source = build_model(model_name, opts.seed)
    sae = random_sae(base.representation_dim(), opts.seed)
    configs = [c for c in FT_CONFIGS if c in opts.configs]

    def dataset_fn(batch: int) -> TensorImages:  # two batches' worth of distinct images
        return TensorImages(*make_images(base.config, 2 * batch, opts.seed))

    batch = opts.batch_size
    searched = False
    if batch is None:
        if device.type == "cuda" and model_name != "tiny":
            batch = search_batch_size(base, sae, dataset_fn, device, opts.bf16, configs, opts.max_batch_size,
                                      opts.seed, workdir)
            searched = True
        else:
            batch = DEFAULT_BATCH[model_name]
    dataset = dataset_fn(batch)
    cached_dataset = (TensorImages(dataset.pixel_values, dataset.labels,
                                   reference_embeddings(base, dataset.pixel_values, device, opts.bf16))
                      if "sae_ft_cached" in configs else None)
    measured = opts.warmup + opts.steps
    max_steps = measured + 1  # the last step probes memory and is not timed
    baton = RoundRobin(configs)
    recorders: dict[str, StepRecorder] = {}
    jobs: dict[str, Callable[[], Any]] = {}
    trainers: dict[str, SAEFTTrainer] = {}
    for name in configs:
        recorder = StepRecorder(name, baton, device, memory_step=measured, holdings=lambda: {"total": 0})
        recorders[name] = recorder
        if name == "loop":
            model = copy.deepcopy(base)
            jobs[name] = (lambda m=model, r=recorder: hand_written_loop(
                m, dataset, batch_size=batch, max_steps=max_steps, device=device, bf16=opts.bf16, recorder=r,
                seed=opts.seed))
            continue
        args = trainer_args(name, output_dir=os.path.join(workdir, model_name, name), batch_size=batch,
                            max_steps=max_steps, device=device, bf16=opts.bf16, seed=opts.seed)
        trainer = build_trainer(name, base, sae, cached_dataset if name == "sae_ft_cached" else dataset, args,
                                callbacks=[_RecorderCallback(recorder)])
        recorder.holdings = (lambda t=trainer: persistent_bytes(t.model, t.optimizer, t))
        trainers[name] = trainer
        jobs[name] = trainer.train
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run_with_baton(baton, jobs, opts.threads, device)  # one step per turn, in the order of `configs`

    steps = {name: [r.step_times[i] for i in range(opts.warmup, measured) if i in r.step_times]
             for name, r in recorders.items()}
    cycles = {name: [r.cycle_times[i] for i in range(opts.warmup, measured) if i in r.cycle_times]
              for name, r in recorders.items()}
    medians = {name: _median(v) for name, v in steps.items()}
    cycle_medians = {name: _median(v) for name, v in cycles.items()}

    def ratio(a: str, b: str, table: dict[str, float | None]) -> float | None:
        return table[a] / table[b] if table.get(a) and table.get(b) else None

    def paired(a: str, b: str) -> float | None:
        if a not in steps or b not in steps:
            return None
        return _median([x / y for x, y in zip(steps[a], steps[b])])

    out: dict[str, Any] = {
        "source": source,
        "batch_size": batch,
        "batch_size_searched": searched,
        "image_size": base.config.vision_config.image_size,
        "parameters": sum(p.numel() for p in base.parameters()),
        "representation_dim": base.representation_dim(),
        "step_time_median_s": medians,
        "cycle_time_median_s": cycle_medians,
        "step_times_s": {k: [round(x, 5) for x in v] for k, v in steps.items()},
        "throughput_images_per_s": {k: (batch / v if v else None) for k, v in medians.items()},
        "ratios": {
            "sae_ft_to_ft": ratio("sae_ft", "ft", medians),
            "sae_ft_to_ft_paired": paired("sae_ft", "ft"),
            "cached_to_ft": ratio("sae_ft_cached", "ft", medians),
            "cached_to_ft_paired": paired("sae_ft_cached", "ft"),
            "lora_to_ft": ratio("lora", "ft", medians),
            "lora_sae_ft_to_lora": ratio("lora_sae_ft", "lora", medians),
            "lora_sae_ft_to_lora_paired": paired("lora_sae_ft", "lora"),
            "trainer_vs_loop_throughput": ratio("loop", "ft", medians),
            "trainer_vs_loop_throughput_paired": (1 / paired("ft", "loop")) if paired("ft", "loop") else None,
            "trainer_vs_loop_throughput_end_to_end": ratio("loop", "ft", cycle_medians),
        },
        "memory": {name: r.memory for name, r in recorders.items()},
    }
    if "lora_sae_ft" in trainers:
        t = trainers["lora_sae_ft"]
        ref_bytes = module_bytes(t.ref_model)
        sae_bytes = module_bytes(t.sae)
        model_bytes = module_bytes(t.model)
        # Model weights LoRA SAE-FT adds over LoRA: a reference copy (0: adapters are disabled instead). The SAE
        # (the method's fixed 2 x d_sae x d_in dictionary, independent of the model's size) is reported beside it.
        out["lora_sae_ft_weights"] = {
            "reference_model_bytes": ref_bytes,
            "sae_bytes": sae_bytes,
            "extra_weight_bytes": ref_bytes,
            "model_weight_bytes": model_bytes,
            "extra_fraction_of_model_weights": ref_bytes / model_bytes,
            "extra_with_sae_fraction_of_model_weights": (ref_bytes + sae_bytes) / model_bytes,
        }
        if "lora" in trainers:
            mem = out["memory"]
            a, b = mem["lora_sae_ft"].get("persistent_bytes"), mem["lora"].get("persistent_bytes")
            if a and b:
                out["lora_sae_ft_weights"]["measured_extra_persistent_bytes"] = a["total"] - b["total"]
    if "sae_ft" in trainers:
        t = trainers["sae_ft"]
        out["sae_ft_weights"] = {"reference_model_bytes": module_bytes(t.ref_model), "sae_bytes": module_bytes(t.sae),
                                 "model_weight_bytes": module_bytes(t.model)}
    del trainers, jobs
    recorders.clear()  # their closures hold the trainers
    _cleanup(device)
    return out


# ----------------------------------------------------------------------------------------------------------------
# SAE training: ours against SAELens
# ----------------------------------------------------------------------------------------------------------------


def planted_embeddings(n: int, d: int, *, n_atoms: int | None = None, active: int = 16, offset: float = 0.5,
                       noise: float = 0.05, seed: int = 0) -> torch.Tensor:
    """[n, d] unit-norm vectors: a common offset plus a positive mix of `active` of `n_atoms` random unit atoms
    (Zipf-like frequencies), plus Gaussian noise. Structured like CLIP embeddings enough for FVU to mean something."""
    n_atoms = n_atoms or 8 * d
    gen = torch.Generator().manual_seed(seed)
    atoms = F.normalize(torch.randn(n_atoms, d, generator=gen), dim=-1)
    mean_direction = F.normalize(torch.randn(d, generator=gen), dim=0)
    freq = 1.0 / torch.arange(1, n_atoms + 1, dtype=torch.float64).sqrt()
    out = torch.empty(n, d)
    chunk = 65536
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        idx = torch.multinomial(freq, m * active, replacement=True, generator=gen).view(m, active)
        weights = torch.empty(m, active).exponential_(1.0, generator=gen)
        x = F.embedding_bag(idx, atoms, per_sample_weights=weights, mode="sum")
        x = F.normalize(x, dim=-1) + offset * mean_direction + noise * torch.randn(m, d, generator=gen)
        out[start:start + m] = F.normalize(x, dim=-1)
    return out


class TimedBatches:
    """A re-iterable of fixed batches that takes turns under a `RoundRobin` at every request and times the work
    between requests (one training step). Each pass over it is recorded separately in `passes`."""

    def __init__(self, batches: list[torch.Tensor], name: str, baton: RoundRobin, device: torch.device) -> None:
        self.batches, self.name, self.baton, self.device = batches, name, baton, device
        self.passes: list[list[float]] = []

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[torch.Tensor]:
        times: list[float] = []
        self.passes.append(times)
        t0 = None
        for batch in self.batches:
            if t0 is not None:
                _sync(self.device)
                times.append(time.perf_counter() - t0)
                self.baton.handover(self.name)
            _sync(self.device)
            t0 = time.perf_counter()
            yield batch

    def training_pass(self) -> list[float]:
        """Step times of the first full pass (train_sae first peeks at one batch to infer the width)."""
        for times in self.passes:
            if len(times) == len(self.batches) - 1:
                return times
        return max(self.passes, key=len) if self.passes else []


def _fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    x, x_hat = x.double(), x_hat.double()
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def benchmark_sae_training(opts: BenchmarkOptions, device: torch.device) -> dict[str, Any]:
    """Our TopK SAE training against SAELens' on the same batches; throughput and held-out FVU."""
    d, width, k, batch = opts.sae_d_in, opts.sae_width, opts.sae_k, opts.sae_batch_size
    data = planted_embeddings(opts.sae_vectors + opts.sae_heldout, d, seed=opts.seed)
    train, heldout = data[:opts.sae_vectors], data[opts.sae_vectors:]
    n_steps = opts.sae_steps or max(2, opts.sae_vectors // batch)
    gen = torch.Generator().manual_seed(opts.seed)
    order = torch.cat([torch.randperm(train.shape[0], generator=gen) for _ in range(math.ceil(n_steps * batch / train.shape[0]))])
    batches = [train[order[i * batch:(i + 1) * batch]].to(device) for i in range(n_steps)]
    heldout = heldout.to(device)
    warm = min(5, max(0, n_steps // 10))
    try:
        from sae_lens.config import LoggingConfig, SAETrainerConfig
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.training.sae_trainer import SAETrainer

        saelens_version = importlib.metadata.version("sae-lens")
    except ImportError:
        saelens_version = None

    names = ["ours"] + (["saelens"] if saelens_version else []) + ["ours_paper_init"]
    baton = RoundRobin(names)
    streams = {name: TimedBatches(batches, name, baton, device) for name in names}

    def ours(name: str, init_encoder: str) -> dict[str, Any]:
        config = SAEConfig(d_in=d, d_sae=width, k=k, activation="topk", input_normalization="none")
        result = train_sae(streams[name], config, epochs=1, batch_size=batch, lr=opts.sae_lr, weight_decay=0.0,
                           init_encoder=init_encoder, device=device,
                           autocast_dtype=torch.bfloat16 if opts.bf16 else None, seed=opts.seed,
                           log_every=max(1, n_steps), progress=False)
        with torch.no_grad():
            out = result.sae(heldout)
        return {"fvu": _fvu(heldout, out.reconstruction), "l0": float((out.codes != 0).sum(-1).float().mean()),
                "alive_fraction_heldout": float((out.codes != 0).any(0).float().mean())}

    def saelens() -> dict[str, Any]:
        torch.manual_seed(opts.seed)
        cfg = TopKTrainingSAEConfig(d_in=d, d_sae=width, k=k, aux_loss_coefficient=0.0,
                                    rescale_acts_by_decoder_norm=False, device=str(device))
        sae = TopKTrainingSAE(cfg)
        trainer_cfg = SAETrainerConfig(
            total_training_samples=n_steps * batch, train_batch_size_samples=batch, lr=opts.sae_lr, lr_end=opts.sae_lr,
            device=str(device),
            autocast=opts.bf16, n_checkpoints=0, save_final_checkpoint=False,
            logger=LoggingConfig(log_to_wandb=False),
        )
        trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=iter(streams["saelens"]))
        trainer.fit()
        sae.eval()
        with torch.no_grad():
            recon = sae(heldout)
            codes = sae.encode(heldout)
        return {"fvu": _fvu(heldout, recon), "l0": float((codes != 0).sum(-1).float().mean()),
                "alive_fraction_heldout": float((codes != 0).any(0).float().mean())}

    jobs: dict[str, Callable[[], Any]] = {"ours": lambda: ours("ours", "tied")}
    if saelens_version:
        jobs["saelens"] = saelens
    jobs["ours_paper_init"] = lambda: ours("ours_paper_init", "independent")
    results = run_with_baton(baton, jobs, opts.threads, device)
    out: dict[str, Any] = {
        "vectors": opts.sae_vectors, "heldout": opts.sae_heldout, "d_in": d, "d_sae": width, "k": k,
        "batch_size": batch, "steps": n_steps, "lr": opts.sae_lr, "warmup_steps_excluded": warm,
        "saelens_version": saelens_version,
        "settings": "same width, k, batch, steps, lr and identical batches in identical order. ours: "
                    "train_sae(activation='topk', input_normalization='none', weight_decay=0 (AdamW = Adam), "
                    "init_encoder='tied' (W_enc = W_dec.T at init, like SAELens)); ours_paper_init: the same with "
                    "the default independent Kaiming encoder init; SAELens: TopKTrainingSAE("
                    "rescale_acts_by_decoder_norm=False, aux_loss_coefficient=0) + SAETrainer (Adam, clip 1.0, "
                    "tied init with decoder norm 0.1, its defaults)",
    }
    for name in names:
        times = streams[name].training_pass()[warm:]
        median = _median(times)
        out[name] = {
            **results[name],
            "step_time_median_s": median,
            "vectors_per_s": batch / median if median else None,
            "vectors_per_s_mean": batch * len(times) / sum(times) if times else None,
        }
    if saelens_version and out["ours"]["vectors_per_s"] and out["saelens"]["vectors_per_s"]:
        out["speedup_vs_saelens"] = out["ours"]["vectors_per_s"] / out["saelens"]["vectors_per_s"]
        steps_ours = streams["ours"].training_pass()[warm:]
        steps_lens = streams["saelens"].training_pass()[warm:]
        out["speedup_vs_saelens_paired"] = _median([b / a for a, b in zip(steps_ours, steps_lens)])
    return out


# ----------------------------------------------------------------------------------------------------------------
# The whole benchmark
# ----------------------------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA if available else CPU; a CUDA device always gets an index (set_device needs one)."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name} but CUDA is not available.")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": {p: _version(p) for p in ("torch", "transformers", "peft", "accelerate", "sae-lens", "saeft-hf")},
    }
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        if names:
            info["cpu_model"] = names[0]
    except OSError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {"name": props.name, "total_memory_bytes": props.total_memory, "cuda": torch.version.cuda}
    return info


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_benchmark(opts: BenchmarkOptions, command: str | None = None) -> dict[str, Any]:
    """Run the parts in `opts` and return the JSON-ready results (also written to `opts.output`)."""
    device = resolve_device(opts.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the Trainer places models on the current CUDA device
    if opts.threads:
        torch.set_num_threads(opts.threads)
    models = opts.models or (("vit_b16", "digits") if device.type == "cuda" else ("vit_b32", "digits"))
    start = time.time()
    out: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "device": str(device),
        "dtype": "bf16 autocast (fp32 weights)" if opts.bf16 else "fp32",
        "machine": machine_info(device),
        "load_average_start": _load(),
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items()},
        "timing_method": ("one optimizer step of the real SAEFTTrainer.train() loop, Trainer on_step_begin -> "
                          "on_step_end (training_step, clipping, optimizer, scheduler, zero_grad); configurations "
                          "interleaved one step per turn (threads under a round-robin baton, one running at a "
                          "time); median over the measured steps after warm-up"
                          + ("; torch.cuda.synchronize() around every timing" if device.type == "cuda" else "")),
        "memory_method": ("persistent tensors at step start (weights, optimizer state, reference, SAE; by storage) + "
                          + ("transient peak = torch.cuda.max_memory_allocated() - memory_allocated() at step start"
                             if device.type == "cuda" else
                             "transient peak of the torch CPU allocator during the step from the torch profiler "
                             "(profile_memory=True; no tracemalloc, no RSS)")),
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="saeft-bench-") as workdir:
        if "finetune" in opts.parts:
            for name in models:
                out["models"][name] = benchmark_finetuning(name, opts, device, workdir)
        if "sae" in opts.parts:
            out["sae_training"] = benchmark_sae_training(opts, device)
        if "input" in opts.parts:
            from .input_pipeline import benchmark_input_pipeline

            out["input_pipeline"] = benchmark_input_pipeline(
                n_images=opts.input_images, n_large=opts.input_large_images, rounds=opts.input_rounds,
                image_size=30 if opts.quick else 224, embedding_model=opts.embedding_model, seed=opts.seed)
    primary = out["models"].get(models[0], {}) if out["models"] else {}
    ratios = primary.get("ratios", {})
    lora_weights = primary.get("lora_sae_ft_weights", {})
    sae_part = out.get("sae_training", {})
    out.update({
        "primary_model": models[0] if out["models"] else None,
        "ratio_sae_ft_to_ft": ratios.get("sae_ft_to_ft"),
        "ratio_sae_ft_to_ft_paired": ratios.get("sae_ft_to_ft_paired"),
        "ratio_cached_to_ft": ratios.get("cached_to_ft"),
        "ratio_cached_to_ft_paired": ratios.get("cached_to_ft_paired"),
        "ratio_lora_sae_ft_to_lora": ratios.get("lora_sae_ft_to_lora"),
        "lora_sae_ft_extra_weight_bytes": lora_weights.get("extra_weight_bytes"),
        "lora_sae_ft_extra_reference_bytes": lora_weights.get("reference_model_bytes"),
        "lora_sae_ft_sae_bytes": lora_weights.get("sae_bytes"),
        "lora_sae_ft_extra_weight_fraction": lora_weights.get("extra_fraction_of_model_weights"),
        "lora_sae_ft_extra_with_sae_fraction": lora_weights.get("extra_with_sae_fraction_of_model_weights"),
        "trainer_vs_loop_throughput": ratios.get("trainer_vs_loop_throughput"),
        "trainer_vs_loop_throughput_end_to_end": ratios.get("trainer_vs_loop_throughput_end_to_end"),
        "sae_train_speedup_vs_saelens": sae_part.get("speedup_vs_saelens"),
        "fvu_ours": sae_part.get("ours", {}).get("fvu"),
        "fvu_saelens": sae_part.get("saelens", {}).get("fvu"),
        "fvu_ours_paper_init": sae_part.get("ours_paper_init", {}).get("fvu"),
        **_input_summary(out.get("input_pipeline")),
        "load_average_end": _load(),
        "wall_time_s": round(time.time() - start, 1),
    })
    if opts.output:
        path = Path(opts.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(out, indent=2, default=_json_default))
        os.replace(tmp, path)
    return out


def _input_summary(part: dict[str, Any] | None) -> dict[str, Any]:
    """Top-level keys of the input-pipeline part (None when it did not run)."""
    part = part or {}
    ratios = part.get("ratios_ours_to_plain_pil", {})
    workers = part.get("workers_for_train_transform", {})
    return {
        "input_train_ratio_to_pil": ratios.get("train", {}).get("ratio_paired"),
        "input_eval_ratio_to_pil": ratios.get("eval", {}).get("ratio_paired"),
        "input_large_eval_ratio_to_pil": ratios.get("large_eval", {}).get("ratio_paired"),
        "input_train_images_per_s_per_core": workers.get("images_per_s_per_core"),
        "input_workers_per_gpu_2000": workers.get("targets_images_per_s", {}).get("2000", {}).get("workers_per_gpu"),
        "input_workers_per_gpu_4000": workers.get("targets_images_per_s", {}).get("4000", {}).get("workers_per_gpu"),
        "embedding_pass_images_per_s": part.get("embedding_pass", {}).get("forward_images_per_s"),
    }


def _json_default(value: Any) -> Any:
    if isinstance(value, (torch.device, torch.dtype)):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"Cannot serialise {type(value).__name__}")
