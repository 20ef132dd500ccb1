"""Property tests (hypothesis) for the SAE and the SAE-FT penalty over random shapes, k, scales and dtypes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from saeft_hf import SAEConfig, SparseAutoencoder, sae_ft_penalty

DTYPES = (torch.float32, torch.bfloat16, torch.float64)
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None)


@dataclass
class Case:
    sae: SparseAutoencoder
    x: torch.Tensor  # [B, d_in] in `dtype`, generic (no exact zeros, no ties by construction)
    k: int
    dtype: torch.dtype

    def __repr__(self) -> str:  # what hypothesis prints for a failing example
        c = self.sae.config
        return (f"Case(d_in={c.d_in}, d_sae={c.d_sae}, k={c.k}, activation={c.activation}, "
                f"input_normalization={c.input_normalization}, B={self.x.shape[0]}, dtype={self.dtype}, "
                f"|x|max={self.x.abs().max().item():.3g})")


@st.composite
def cases(draw: st.DrawFn, activations: tuple[str, ...] = ("topk_signed", "topk")) -> Case:
    d_in = draw(st.integers(1, 24))
    d_sae = draw(st.integers(1, 64))
    k = draw(st.integers(1, d_sae))
    batch = draw(st.integers(1, 9))
    dtype = draw(st.sampled_from(DTYPES))
    config = SAEConfig(d_in=d_in, d_sae=d_sae, k=k, activation=draw(st.sampled_from(activations)),
                       input_normalization=draw(st.sampled_from(["unit_norm", "none"])))
    seed = draw(st.integers(0, 2**31 - 1))
    with torch.random.fork_rng():  # the SAE's init draws from the global RNG: leave it untouched
        torch.manual_seed(seed)
        sae = SparseAutoencoder(config)
        with torch.no_grad():
            sae.b_dec.normal_(0, 0.1)
        x = draw(st.sampled_from([1e-3, 1.0, 1e3])) * torch.randn(batch, d_in, dtype=torch.float64)
    return Case(sae=sae.to(dtype), x=x.to(dtype), k=k, dtype=dtype)


@SETTINGS
@given(cases())
def test_sae_forward_is_finite_and_keeps_k_codes(case: Case) -> None:
    out = case.sae(case.x)
    for name in ("x", "pre_activations", "codes", "reconstruction"):
        tensor = getattr(out, name)
        assert tensor.dtype == case.dtype and torch.isfinite(tensor).all(), name
    assert out.codes.shape == (case.x.shape[0], case.sae.config.d_sae)
    assert out.reconstruction.shape == case.x.shape
    nonzero = (out.codes != 0).sum(-1)
    if case.sae.config.activation == "topk_signed":
        # Exactly k, whatever their sign, and they are the k largest pre-activations of each row.
        assert (nonzero == case.k).all(), nonzero
        kept = out.codes != 0
        pre = out.pre_activations
        lowest_kept = torch.where(kept, pre, torch.full_like(pre, float("inf"))).amin(-1)
        highest_dropped = torch.where(kept, torch.full_like(pre, float("-inf")), pre).amax(-1)
        assert (lowest_kept >= highest_dropped).all()
        torch.testing.assert_close(out.codes[kept], pre[kept], rtol=0, atol=0)
    else:
        assert (nonzero <= case.k).all() and (out.codes >= 0).all()


@SETTINGS
@given(cases(), st.booleans())
def test_penalty_is_zero_when_nothing_changed(case: Case, normalize: bool) -> None:
    z = case.x
    out = sae_ft_penalty(case.sae, z, z.clone(), lambda_add=10.0, lambda_remove=1.0, mu=1.0, normalize=normalize)
    for name in ("add", "remove", "residual", "total", "features_added", "features_removed"):
        assert getattr(out, name).item() == 0.0, name


@SETTINGS
@given(cases(), st.booleans(), st.floats(0.01, 1.0))
def test_penalty_is_finite_and_its_gradients_reach_z_only(case: Case, normalize: bool, drift: float) -> None:
    sae = case.sae.requires_grad_(True)  # even a trainable SAE must get nothing from the penalty
    z0 = case.x.clone().requires_grad_(True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        noise = torch.randn(z0.shape, dtype=torch.float64).to(case.dtype)
    scale = case.x.abs().max().to(case.dtype)
    z = (case.x + drift * scale * noise).detach().requires_grad_(True)
    out = sae_ft_penalty(sae, z, z0, lambda_add=10.0, lambda_remove=1.0, mu=1.0, normalize=normalize)
    for name in ("add", "remove", "residual", "total", "features_added", "features_removed"):
        value = getattr(out, name)
        assert value.dim() == 0 and torch.isfinite(value), name
        assert value.item() >= 0, name
    out.total.backward()
    assert z.grad is not None and z.grad.dtype == case.dtype and torch.isfinite(z.grad).all()
    assert z0.grad is None
    assert all(p.grad is None for p in sae.parameters())
