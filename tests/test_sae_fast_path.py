"""The TopK training fast path (`SparseAutoencoder.forward`: sparse decode, cheaper encoder backward) matches the
plain dense computation, values and gradients, and the sync-free BatchTopK threshold update matches the old rule."""

import pytest
import torch

from saeft_hf import SAEConfig, SparseAutoencoder, train_sae


def dense_forward(sae, x):
    x = sae.preprocess(x)
    codes = sae.activate(sae.pre_activations(x))
    return x, codes, sae.decode(codes)


@pytest.mark.parametrize("activation", ["topk_signed", "topk"])
@pytest.mark.parametrize("input_grad", [False, True])
@pytest.mark.parametrize("pre_in_loss", [False, True], ids=["sparse-backward", "dense-backward"])
def test_fast_forward_matches_dense_values_and_gradients(activation, input_grad, pre_in_loss):
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=24, d_sae=96, k=6, activation=activation, input_normalization="none"))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    sae.b_enc.requires_grad_(True)
    x = torch.randn(40, 24)
    grads = []
    def fast(x):
        out = sae(x)
        return out.pre_activations, out.codes, out.reconstruction

    def dense(x):
        x = sae.preprocess(x)
        pre = sae.pre_activations(x)
        codes = sae.activate(pre)
        return pre, codes, sae.decode(codes)

    for fn in (fast, dense):
        xin = x.clone().requires_grad_(input_grad)
        pre, codes, recon = fn(xin)
        loss = (recon - xin.detach()).pow(2).mean() + 0.1 * codes.abs().mean()
        if pre_in_loss:  # like AuxK: the dense pre-activations get a gradient too
            loss = loss + 0.01 * pre.pow(2).mean()
        wanted = [*sae.parameters()] + ([xin] if input_grad else [])
        grads.append((codes.detach(), recon.detach(), torch.autograd.grad(loss, wanted)))
    (c1, r1, g1), (c2, r2, g2) = grads
    torch.testing.assert_close(c1, c2)
    torch.testing.assert_close(r1, r2, atol=1e-5, rtol=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_fast_forward_under_bf16_autocast_matches_dense():
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=32, d_sae=128, k=8, activation="topk"))
    x = torch.randn(16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae(x)
        _, codes, recon = dense_forward(sae, x)
        out.reconstruction.float().pow(2).mean().backward()
    torch.testing.assert_close(out.codes.float(), codes.float())
    torch.testing.assert_close(out.reconstruction.float(), recon.float(), atol=2e-2, rtol=2e-2)
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in sae.parameters())


def test_batchtopk_threshold_update_without_sync(planted_data):
    x, _ = planted_data
    batch = x[:256]
    config = SAEConfig(d_in=64, d_sae=128, k=4, activation="batchtopk", input_normalization="none")
    # One step: the threshold is the smallest kept code of that batch (codes from the initial weights).
    torch.manual_seed(0)
    initial = SparseAutoencoder(config).train()
    with torch.no_grad():
        codes = initial(batch).codes
    result = train_sae([batch], config, epochs=1, progress=False, seed=0)
    torch.testing.assert_close(result.sae.threshold, codes[codes > 0].min())
    # A batch with nothing kept leaves it unchanged (and finite).
    torch.manual_seed(0)
    dead = SparseAutoencoder(config)
    with torch.no_grad():
        dead.b_enc.fill_(-1e3)
        dead.threshold.fill_(0.25)
    result = train_sae([batch, batch], epochs=1, progress=False, sae=dead, lr=1e-6)
    assert result.sae.threshold.item() == 0.25
