import pytest
import torch
import torch.nn.functional as F

from saeft_hf import SAEConfig, SparseAutoencoder, feature_distillation_penalty, l2sp_penalty, sae_ft_penalty


def make_sae(d_in=8, d_sae=32, k=3, activation="topk_signed"):
    torch.manual_seed(1)
    sae = SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=d_sae, k=k, activation=activation))
    with torch.no_grad():
        sae.b_dec.normal_(std=0.1)
    return sae


def reference_penalty(W_enc, b_dec, W_dec, k, z, z0, lambda_add, lambda_remove, mu, normalize):
    """An independent, loop-free transcription of METHOD.md section 3 (no saeft_hf code)."""
    if normalize:
        z, z0 = z / z.norm(dim=-1, keepdim=True), z0 / z0.norm(dim=-1, keepdim=True)

    def topk(v):
        pre = (v - b_dec) @ W_enc
        thresh = pre.topk(k, dim=-1).values[:, -1:]
        return torch.where(pre >= thresh, pre, torch.zeros_like(pre))

    s, s0 = topk(z), topk(z0).detach()
    m = (s0 != 0).float()
    add = ((1 - m) * s.abs()).sum() / s.numel()
    rem = (m * torch.clamp(s0 - s, min=0)).sum() / s.numel()
    res = (((z - z0) - (s - s0) @ W_dec) ** 2).sum() / z.numel()
    return add, rem, res, lambda_add * add + lambda_remove * rem + mu * res


def test_hand_computed_example():
    # d_in=2, d_sae=3, k=1, identity-like encoder so the codes can be read off by hand.
    sae = SparseAutoencoder(SAEConfig(d_in=2, d_sae=3, k=1, input_normalization="none"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]))
        sae.b_dec.zero_()
    z0 = torch.tensor([[2.0, 1.0]])  # pre = [2, 1, 1.5] -> s0 = [2, 0, 0]
    z = torch.tensor([[1.0, 3.0]], requires_grad=True)  # pre = [1, 3, 2] -> s = [0, 3, 0]
    out = sae_ft_penalty(sae, z, z0, lambda_add=10.0, lambda_remove=2.0, mu=1.0)
    # add: feature 1 is new with |3| -> 3 / (B*F = 3) = 1
    assert out.add.item() == pytest.approx(1.0)
    # remove: feature 0 dropped from 2 to 0 -> relu(2 - 0) / 3
    assert out.remove.item() == pytest.approx(2 / 3)
    # residual: (z - z0) - W_dec^T (s - s0) = [-1, 2] - [-2, 3] = [1, -1] -> mean of squares = 1
    assert out.residual.item() == pytest.approx(1.0)
    assert out.total.item() == pytest.approx(10 * 1 + 2 * 2 / 3 + 1)
    assert out.features_added.item() == 1 and out.features_removed.item() == 1


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("lambda_remove", [0.0, 0.5])
def test_matches_independent_implementation_with_gradients(normalize, lambda_remove):
    sae = make_sae()
    gen = torch.Generator().manual_seed(3)
    z0 = 3 * torch.randn(16, 8, generator=gen)
    z_init = z0 + 0.7 * torch.randn(16, 8, generator=gen)
    z_ours = z_init.clone().requires_grad_(True)
    z_ref = z_init.clone().requires_grad_(True)
    ours = sae_ft_penalty(sae, z_ours, z0, lambda_add=10.0, lambda_remove=lambda_remove, mu=1.0, normalize=normalize)
    ref = reference_penalty(
        sae.W_enc.detach(), sae.b_dec.detach(), sae.W_dec.detach(), 3, z_ref, z0, 10.0, lambda_remove, 1.0, normalize
    )
    for mine, theirs in zip((ours.add, ours.remove, ours.residual, ours.total), ref):
        torch.testing.assert_close(mine, theirs)
    ours.total.backward()
    ref[3].backward()
    torch.testing.assert_close(z_ours.grad, z_ref.grad)


def test_gradients_reach_z_only():
    sae = make_sae()
    z0 = torch.randn(4, 8, requires_grad=True)
    z = (z0.detach() + torch.randn(4, 8)).requires_grad_(True)
    sae_ft_penalty(sae, z, z0, lambda_remove=1.0).total.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert z0.grad is None
    assert all(p.grad is None for p in sae.parameters())


def test_zero_when_nothing_changed_and_lambda_checks():
    sae = make_sae()
    z = torch.randn(5, 8)
    out = sae_ft_penalty(sae, z, z.clone(), lambda_remove=1.0)
    assert out.total.item() == 0.0
    with pytest.raises(ValueError, match="lambda_add must be >= 0"):
        sae_ft_penalty(sae, z, z, lambda_add=-1.0)
    with pytest.raises(ValueError, match=r"\[B, d\]"):
        sae_ft_penalty(sae, z, z[:2])


def test_bf16_inputs_are_computed_in_fp32():
    sae = make_sae()
    z0 = torch.randn(4, 8)
    z = (z0 + 0.1 * torch.randn(4, 8)).bfloat16().requires_grad_(True)
    out = sae_ft_penalty(sae, z, z0.bfloat16())
    assert out.total.dtype == torch.float32 and torch.isfinite(out.total)
    out.total.backward()
    assert z.grad.dtype == torch.bfloat16


def test_baseline_regularisers():
    z0 = torch.randn(4, 8)
    z = z0 + 1.0
    assert feature_distillation_penalty(z, z0).item() == pytest.approx(1.0)
    torch.testing.assert_close(
        feature_distillation_penalty(z, z0, normalize=True), (F.normalize(z, dim=-1) - F.normalize(z0, dim=-1)).pow(2).mean()
    )
    layer = torch.nn.Linear(3, 2)
    ref = {name: p.detach().clone() for name, p in layer.named_parameters()}
    assert l2sp_penalty(layer.named_parameters(), ref).item() == 0.0
    with torch.no_grad():
        layer.weight.add_(1.0)
    assert l2sp_penalty(layer.named_parameters(), ref).item() == pytest.approx(6.0)
