"""`train_sae`: fit a `SparseAutoencoder` to a set of embeddings and report FVU, L0 and dead / dense fractions.

`data` may be a tensor [N, d_in], a Hugging Face `datasets.Dataset` (or `IterableDataset`) with one column of
vectors, or any re-iterable of tensors ([d_in] vectors or [b, d_in] batches). The paper's recipe (AdamW lr 1e-3,
weight decay 0.01, batch 1024, no schedule, MSE on unit-norm inputs) is the default; AuxK, a mean-initialised
`b_dec` and unit-norm decoder atoms are opt-in improvements.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .sae import SAEConfig, SparseAutoencoder

TOPK_FAMILY = ("topk_signed", "topk", "batchtopk")


@dataclass
class SAETrainingResult:
    """What `train_sae` returns.

    Attributes:
        sae: the trained SAE (in eval mode, on the training device); its config carries the final metrics.
        metrics: final metrics over one full pass of the data: `mse`, `fvu`, `l0`, `dead_fraction`,
            `dense_fraction`, plus `num_vectors` and `steps`.
        history: the metrics logged every `log_every` steps (running values over the steps since the last log).
    """

    sae: SparseAutoencoder
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)


class _FiringTracker:
    """Counts, per latent, the samples seen since it last fired; dead = not fired in the last `window` samples."""

    def __init__(self, d_sae: int, window: int, device: torch.device) -> None:
        self.window = window
        self.since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)

    def update(self, codes: torch.Tensor) -> None:
        fired = (codes != 0).any(0)
        self.since_fired += codes.shape[0]
        self.since_fired.masked_fill_(fired, 0)  # not `[fired] = 0`: boolean indexing syncs with the GPU

    def dead_mask(self) -> torch.Tensor:
        return self.since_fired >= self.window


def _as_batches(data: Any, batch_size: int, column: str | None, generator: torch.Generator, shuffle: bool) -> Iterator[torch.Tensor]:
    """Yield [b, d_in] float tensors from any supported data source (one epoch)."""
    if isinstance(data, torch.Tensor):
        order = torch.randperm(data.shape[0], generator=generator) if shuffle else torch.arange(data.shape[0])
        for start in range(0, data.shape[0], batch_size):
            yield data[order[start:start + batch_size].to(data.device)]
        return
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        datasets = None
    if datasets is not None and isinstance(data, (datasets.Dataset, datasets.IterableDataset)):
        name = column or _embedding_column(data)
        source = data.select_columns([name]).with_format("torch")
        if shuffle and isinstance(data, datasets.Dataset):
            source = source.shuffle(seed=int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        for batch in source.iter(batch_size=batch_size):
            yield torch.as_tensor(batch[name])
        return
    buffer: list[torch.Tensor] = []
    for item in data:
        item = torch.as_tensor(item)
        if item.dim() == 2:
            yield item
        else:
            buffer.append(item)
            if len(buffer) == batch_size:
                yield torch.stack(buffer)
                buffer = []
    if buffer:
        yield torch.stack(buffer)


def _embedding_column(ds: Any) -> str:
    names = list(ds.column_names or [])
    for preferred in ("embedding", "embeddings", "image_embeds", "z0"):
        if preferred in names:
            return preferred
    if len(names) == 1:
        return names[0]
    raise ValueError(
        f"Cannot tell which column of the dataset holds the embeddings (columns: {names}); pass `column=`."
    )


def _infer_d_in(data: Any, column: str | None) -> int:
    first = next(_as_batches(data, 2, column, torch.Generator().manual_seed(0), shuffle=False), None)
    if first is None:
        raise ValueError("train_sae got an empty dataset: there are no embeddings to train on.")
    return int(first.shape[-1])


@torch.no_grad()
def evaluate_sae(
    sae: SparseAutoencoder,
    data: Any,
    *,
    batch_size: int = 4096,
    column: str | None = None,
    device: torch.device | str | None = None,
    dense_threshold: float = 0.1,
) -> dict[str, float]:
    """One pass over `data`: MSE, FVU, L0, dead fraction (never fired) and dense fraction (fires > threshold).

    FVU is the summed squared error over the summed squared deviation from the data mean, on preprocessed inputs.
    """
    device = torch.device(device) if device is not None else next(sae.parameters()).device
    was_training = sae.training
    sae.eval()
    n = 0
    sse = torch.zeros((), dtype=torch.float64, device=device)
    sum_x = torch.zeros(sae.config.d_in, dtype=torch.float64, device=device)
    sum_x2 = torch.zeros((), dtype=torch.float64, device=device)
    active = torch.zeros((), dtype=torch.float64, device=device)
    fires = torch.zeros(sae.config.d_sae, dtype=torch.float64, device=device)
    for batch in _as_batches(data, batch_size, column, torch.Generator().manual_seed(0), shuffle=False):
        batch = batch.to(device=device, dtype=torch.float32)
        out = sae(batch)
        x = out.x.double()
        sse += (x - out.reconstruction.double()).pow(2).sum()
        sum_x += x.sum(0)
        sum_x2 += x.pow(2).sum()
        nonzero = out.codes != 0
        active += nonzero.sum()
        fires += nonzero.sum(0)
        n += batch.shape[0]
    sae.train(was_training)
    if n == 0:
        raise ValueError("evaluate_sae got an empty dataset.")
    total_var = sum_x2 - sum_x.pow(2).sum() / n  # sum of squared deviations from the mean
    freq = fires / n
    return {
        "mse": float(sse / (n * sae.config.d_in)),
        "fvu": float(sse / total_var.clamp_min(1e-12)),
        "l0": float(active / n),
        "dead_fraction": float((fires == 0).double().mean()),
        "dense_fraction": float((freq > dense_threshold).double().mean()),
        "num_vectors": float(n),
    }


def _aux_k_loss(
    sae: SparseAutoencoder, out: Any, dead: torch.Tensor, aux_k: int
) -> torch.Tensor:
    """AuxK (Gao et al. 2024): dead latents learn to reconstruct the main reconstruction's error.

    The top `aux_k` dead pre-activations decode the detached residual; the loss is normalised by the residual's
    variance so its scale does not depend on how good the main reconstruction already is.
    """
    n_dead = int(dead.sum())
    if n_dead == 0:
        return out.x.new_zeros(())
    residual = (out.x - out.reconstruction).detach()
    pre = out.pre_activations
    if sae.config.activation != "topk_signed":
        pre = F.relu(pre)
    pre = pre.masked_fill(~dead, float("-inf"))
    values, indices = pre.topk(min(aux_k, n_dead), dim=-1)
    values = torch.nan_to_num(values, neginf=0.0)
    aux_codes = torch.zeros_like(out.pre_activations).scatter(-1, indices, values)
    residual_hat = aux_codes @ sae.W_dec
    denom = (residual - residual.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
    return (residual_hat - residual).pow(2).sum(-1).mean() / denom


def train_sae(
    data: Any,
    config: SAEConfig | None = None,
    *,
    epochs: int = 1,
    batch_size: int = 1024,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    column: str | None = None,
    init_b_dec: str = "zeros",
    init_encoder: str = "independent",
    normalize_decoder: bool = False,
    aux_k: int | None = None,
    aux_coefficient: float = 1 / 32,
    dead_window: int | None = None,
    dense_threshold: float = 0.1,
    batchtopk_threshold_momentum: float = 0.99,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    seed: int = 0,
    log_every: int = 50,
    progress: bool = True,
    callback: Callable[[dict[str, float]], None] | None = None,
    sae: SparseAutoencoder | None = None,
) -> SAETrainingResult:
    """Train a sparse autoencoder on embeddings.

    Args:
        data: a tensor [N, d_in], a `datasets.Dataset`/`IterableDataset` of vectors, or a re-iterable of tensors.
        config: the SAE's shape and activation; `d_in` must match the data. Defaults to the paper's SAE
            (d_sae = 4 d_in, k = 32, `topk_signed`, unit-norm inputs).
        epochs: passes over the data (the paper uses 100 on ImageNet).
        batch_size, lr, weight_decay: AdamW settings (the paper: 1024, 1e-3, 0.01), constant learning rate.
        column: the dataset column holding the vectors (auto-detected when there is one).
        init_b_dec: `zeros` (paper) or `mean` (the mean of the first pass's preprocessed inputs; fewer dead latents).
        init_encoder: `independent` (paper: its own Kaiming-uniform init) or `tied` (`W_enc = W_dec.T` at init, as
            Gao et al. 2024 and SAELens; far fewer dead latents and a lower FVU early in training). Applies to a new
            SAE only, not to one passed as `sae`.
        normalize_decoder: keep decoder atoms at unit norm after every step (the paper only does so at init).
        aux_k: number of dead latents used by the AuxK loss (TopK family only); None disables it (paper).
            A common choice is `d_in // 2`.
        aux_coefficient: weight of the AuxK loss.
        dead_window: a latent is dead for AuxK and the running `dead_fraction` if it has not fired in this many
            of the most recent samples. Default: 1M, or one epoch of data if that is shorter.
        dense_threshold: a latent is dense if it fires on more than this fraction of inputs.
        device: where to train (default: CUDA if available, else CPU).
        autocast_dtype: e.g. `torch.bfloat16` to run the matmuls under autocast (parameters stay fp32; no
            GradScaler is needed for bf16).
        seed: seeds the initialisation and the shuffling.
        log_every: steps between entries of `history` (and calls of `callback`).
        progress: show a progress bar.
        sae: continue training this SAE instead of a fresh one (its config wins over `config`).

    Returns:
        `SAETrainingResult` with `.sae`, `.metrics` (final pass: mse, fvu, l0, dead_fraction, dense_fraction) and
        `.history`.
    """
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"train_sae needs epochs >= 1, batch_size >= 1 and lr > 0 (got {epochs}, {batch_size}, {lr}).")
    if init_b_dec not in ("zeros", "mean"):
        raise ValueError(f"init_b_dec must be 'zeros' or 'mean', got {init_b_dec!r}.")
    if init_encoder not in ("independent", "tied"):
        raise ValueError(f"init_encoder must be 'independent' or 'tied', got {init_encoder!r}.")
    d_in = _infer_d_in(data, column)
    if sae is None:
        config = config or SAEConfig(d_in=d_in, d_sae=4 * d_in, k=min(32, 4 * d_in))
        if config.d_in != d_in:
            raise ValueError(
                f"SAEConfig.d_in={config.d_in} but the embeddings have width {d_in}: set d_in={d_in}."
            )
        torch.manual_seed(seed)
        sae = SparseAutoencoder(config)
        if init_encoder == "tied":
            with torch.no_grad():
                sae.W_enc.copy_(sae.W_dec.T)
    elif sae.config.d_in != d_in:
        raise ValueError(f"The given SAE has d_in={sae.config.d_in} but the embeddings have width {d_in}.")
    config = sae.config
    use_aux = aux_k is not None and aux_k > 0
    if use_aux and config.activation not in TOPK_FAMILY:
        raise ValueError(f"AuxK applies to the TopK family {TOPK_FAMILY}, not activation={config.activation!r}.")

    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sae.to(device).train()
    generator = torch.Generator().manual_seed(seed)

    if init_b_dec == "mean":
        total, count = torch.zeros(d_in, dtype=torch.float64), 0
        for batch in _as_batches(data, 8192, column, generator, shuffle=False):
            total += sae.preprocess(batch.float()).double().sum(0).cpu()
            count += batch.shape[0]
        with torch.no_grad():
            sae.b_dec.copy_((total / count).float())

    params = [p for p in sae.parameters() if p.requires_grad]
    optimizer = _adamw(params, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = _num_batches(data, batch_size)
    if dead_window is None:
        n_vectors = _num_vectors(data)
        dead_window = min(1_000_000, n_vectors) if n_vectors else 1_000_000
    tracker = _FiringTracker(config.d_sae, dead_window, device)
    history: list[dict[str, float]] = []
    step = 0
    window: dict[str, torch.Tensor] = {}
    window_steps = 0
    autocast = (
        torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None else None
    )

    bar = tqdm(
        total=steps_per_epoch * epochs if steps_per_epoch else None,
        desc="train_sae",
        disable=not progress,
        unit="step",
    )
    for _epoch in range(epochs):
        for batch in _as_batches(data, batch_size, column, generator, shuffle=True):
            batch = batch.to(device=device, dtype=torch.float32, non_blocking=True)
            if autocast is not None:
                with autocast:
                    out = sae(batch)
            else:
                out = sae(batch)
            recon = out.reconstruction.float()
            x = out.x.float()
            mse = (recon - x).pow(2).mean()
            loss = mse
            if config.activation == "relu" and config.l1_coefficient > 0:
                # L1 weighted by decoder norms, so shrinking codes cannot be undone by growing atoms.
                l1 = (out.codes.float().abs() * sae.W_dec.norm(dim=-1)).sum(-1).mean()
                loss = loss + config.l1_coefficient * l1
            if use_aux:
                loss = loss + aux_coefficient * _aux_k_loss(sae, out, tracker.dead_mask(), aux_k)

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if normalize_decoder:
                sae.normalize_decoder_()

            with torch.no_grad():
                codes = out.codes
                tracker.update(codes)
                if config.activation == "batchtopk":
                    # Inference threshold: running mean of the smallest kept activation per batch (a batch with
                    # none kept leaves it unchanged). Written without boolean indexing, which syncs with the GPU.
                    smallest = torch.where(codes > 0, codes, torch.inf).amin().to(sae.threshold.dtype)
                    m = 0.0 if step == 0 else batchtopk_threshold_momentum
                    updated = sae.threshold * m + (1 - m) * smallest
                    sae.threshold.copy_(torch.where(torch.isfinite(smallest), updated, sae.threshold))
                deviation = (x - x.mean(0)).pow(2).sum()
                stats = {
                    "loss": loss.detach(),
                    "mse": mse.detach(),
                    "fvu": (recon - x).pow(2).sum() / deviation.clamp_min(1e-12),
                    "l0": (codes != 0).sum(-1).float().mean(),
                }
                for key, value in stats.items():
                    window[key] = window.get(key, 0) + value
                window_steps += 1
            step += 1
            bar.update(1)
            if step % log_every == 0:
                entry = _flush(window, window_steps, step, tracker)
                history.append(entry)
                bar.set_postfix(fvu=f"{entry['fvu']:.4f}", l0=f"{entry['l0']:.1f}", dead=f"{entry['dead_fraction']:.3f}")
                if callback is not None:
                    callback(entry)
                window, window_steps = {}, 0
    bar.close()
    if step == 0:
        raise ValueError("train_sae got an empty dataset: there are no embeddings to train on.")
    if window_steps:
        history.append(_flush(window, window_steps, step, tracker))
    if not all(math.isfinite(v) for v in history[-1].values()):
        raise FloatingPointError(
            f"SAE training diverged (last metrics {history[-1]}); lower lr or check the embeddings for NaN/inf."
        )

    sae.eval()
    metrics = evaluate_sae(sae, data, column=column, device=device, dense_threshold=dense_threshold)
    metrics["steps"] = float(step)
    sae.config = replace(config, training_metrics={k: round(v, 6) for k, v in metrics.items()})
    return SAETrainingResult(sae=sae, metrics=metrics, history=history)


def _adamw(params: list[torch.nn.Parameter], *, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, fused (one kernel for all parameters) where the device supports it, else the default implementation."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _flush(window: dict[str, torch.Tensor], n: int, step: int, tracker: _FiringTracker) -> dict[str, float]:
    # One synchronising transfer per log step, not per training step.
    entry = {key: float(value / n) for key, value in window.items()}
    entry["dead_fraction"] = float(tracker.dead_mask().float().mean())
    entry["step"] = float(step)
    return entry


def _num_vectors(data: Any) -> int | None:
    """Vectors per epoch, when the source knows it (tensors and map-style datasets)."""
    if isinstance(data, torch.Tensor):
        return int(data.shape[0])
    num_rows = getattr(data, "num_rows", None)
    return int(num_rows) if isinstance(num_rows, int) else None


def _num_batches(data: Any, batch_size: int) -> int | None:
    n = _num_vectors(data)
    return math.ceil(n / batch_size) if n else None
