import datasets
import pytest
import torch

from saeft_hf import SAEConfig, SparseAutoencoder, evaluate_sae, train_sae


def test_recovers_planted_sparse_dictionary(planted_data, tmp_path):
    x, _atoms = planted_data
    config = SAEConfig(d_in=64, d_sae=128, k=4, activation="topk")
    result = train_sae(x, config, epochs=8, batch_size=256, lr=3e-3, aux_k=32, progress=False)
    m = result.metrics
    assert m["fvu"] < 0.15, m
    assert m["l0"] <= 4.0
    assert {"mse", "fvu", "l0", "dead_fraction", "dense_fraction"} <= set(m)
    assert result.history and result.history[-1]["fvu"] < 0.3
    # The metrics travel with the weights, and the round trip is exact.
    result.sae.save_pretrained(tmp_path)
    loaded = SparseAutoencoder.from_pretrained(tmp_path)
    assert loaded.config.training_metrics["fvu"] == pytest.approx(m["fvu"], abs=1e-6)
    assert torch.equal(loaded(x[:50]).reconstruction, result.sae(x[:50]).reconstruction)


def test_paper_default_reports_metrics_and_exact_k(planted_data):
    x, _ = planted_data
    result = train_sae(x[:4000], SAEConfig(d_in=64, d_sae=256, k=8), epochs=5, batch_size=128, progress=False)
    assert result.metrics["l0"] == 8.0  # topk_signed keeps exactly k
    assert 0 < result.metrics["fvu"] < 1


def test_accepts_datasets_and_iterables(planted_data):
    x, _ = planted_data
    x = x[:2048]
    ds = datasets.Dataset.from_dict({"embedding": x.numpy()})
    cfg = SAEConfig(d_in=64, d_sae=128, k=4, activation="topk")
    a = train_sae(ds, cfg, epochs=1, batch_size=256, progress=False)
    b = train_sae([x[i:i + 256] for i in range(0, 2048, 256)], cfg, epochs=1, batch_size=256, progress=False)
    assert a.metrics["num_vectors"] == b.metrics["num_vectors"] == 2048
    with pytest.raises(ValueError, match="d_in=32 but the embeddings have width 64"):
        train_sae(x, SAEConfig(d_in=32, d_sae=64, k=4), progress=False)
    with pytest.raises(ValueError, match="empty"):
        train_sae(torch.empty(0, 64), progress=False)


def test_dead_fraction_on_a_constructed_case():
    # Latents 0..3 are the only ones that ever win: the other 12 never fire.
    sae = SparseAutoencoder(SAEConfig(d_in=4, d_sae=16, k=1, activation="topk", input_normalization="none"))
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[:, :4] = torch.eye(4)
    x = torch.eye(4).repeat(10, 1)
    metrics = evaluate_sae(sae, x)
    assert metrics["dead_fraction"] == pytest.approx(12 / 16)
    assert metrics["l0"] == 1.0
    assert metrics["dense_fraction"] == pytest.approx(4 / 16)  # each live latent fires on 25% > 10%


def test_relu_and_batchtopk_train(planted_data):
    x, _ = planted_data
    relu = train_sae(x[:4000], SAEConfig(d_in=64, d_sae=128, k=None, activation="relu", l1_coefficient=1e-3),
                     epochs=5, batch_size=128, lr=3e-3, progress=False)
    assert relu.metrics["fvu"] < 0.5
    btk = train_sae(x[:4000], SAEConfig(d_in=64, d_sae=128, k=4, activation="batchtopk"),
                    epochs=3, batch_size=256, lr=3e-3, progress=False, init_b_dec="mean")
    assert btk.sae.threshold.item() > 0  # the learned inference threshold
    assert 1.0 < btk.metrics["l0"] < 12.0
