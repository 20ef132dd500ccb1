import json

import pytest
import torch

from saeft_hf import SAEConfig, SAELoadError, SAEMismatchError, SparseAutoencoder


def make_sae(activation: str = "topk_signed", d_in: int = 16, d_sae: int = 64, k: int = 4, **kw) -> SparseAutoencoder:
    torch.manual_seed(0)
    return SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=d_sae, k=k, activation=activation, **kw))


def test_parameter_names_and_shapes_follow_saelens():
    sae = make_sae()
    shapes = {name: tuple(p.shape) for name, p in sae.named_parameters()}
    assert shapes == {"W_enc": (16, 64), "W_dec": (64, 16), "b_enc": (64,), "b_dec": (16,)}
    # Decoder atoms start at unit norm; the paper's TopK never trains an encoder bias.
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(64))
    assert not sae.b_enc.requires_grad


@pytest.mark.parametrize("activation", ["topk_signed", "topk", "batchtopk", "relu"])
def test_shapes(activation):
    sae = make_sae(activation)
    x = torch.randn(8, 16)
    out = sae(x)
    assert out.codes.shape == (8, 64) and out.reconstruction.shape == (8, 16)
    assert sae.encode(x).shape == (8, 64) and sae.decode(sae.encode(x)).shape == (8, 16)
    torch.testing.assert_close(out.x, sae.preprocess(x))


def test_topk_signed_keeps_exactly_k_including_negatives():
    sae = make_sae("topk_signed", k=5)
    # Push every pre-activation negative: the paper's TopK still keeps exactly k (negative) codes.
    with torch.no_grad():
        sae.b_enc.fill_(-100.0)
    codes = sae.encode(torch.randn(32, 16))
    assert ((codes != 0).sum(-1) == 5).all()
    assert (codes[codes != 0] < 0).all()
    # And they are the k largest raw pre-activations.
    pre = sae.pre_activations(torch.randn(4, 16))
    kept = sae.activate(pre)
    top = pre.topk(5, dim=-1).indices
    assert torch.equal(torch.sort(top).values, torch.sort((kept != 0).nonzero()[:, 1].view(4, 5)).values)


def test_topk_relu_has_no_negative_codes_and_at_most_k():
    sae = make_sae("topk", k=5)
    codes = sae.encode(torch.randn(64, 16))
    assert (codes >= 0).all() and ((codes != 0).sum(-1) <= 5).all()


def test_batchtopk_train_vs_inference():
    sae = make_sae("batchtopk", k=4).train()
    codes = sae.encode(torch.randn(10, 16))
    assert int((codes != 0).sum()) <= 40  # k * B over the whole batch, not per row
    sae.eval()
    with torch.no_grad():
        sae.threshold.fill_(1e9)
    assert (sae.encode(torch.randn(10, 16)) == 0).all()


def test_encode_does_not_normalise_but_preprocess_does():
    sae = make_sae()
    x = 5 * torch.randn(3, 16)
    torch.testing.assert_close(sae.preprocess(x).norm(dim=-1), torch.ones(3))
    assert not torch.allclose(sae.encode(x), sae.encode(sae.preprocess(x)))
    raw = make_sae(input_normalization="none")
    torch.testing.assert_close(raw.preprocess(x), x)


def test_width_mismatch_is_a_clear_error():
    sae = make_sae()
    with pytest.raises(SAEMismatchError, match="d_in=16 but got 32"):
        sae.encode(torch.randn(2, 32))


def test_check_compatible_names_model_and_representation():
    sae = make_sae(source_model="openai/clip-vit-base-patch16", representation="image_embeds")
    sae.check_compatible(d_in=16, source_model="openai/clip-vit-base-patch16", representation="image_embeds")
    with pytest.raises(SAEMismatchError, match="trained on `openai/clip-vit-base-patch16`"):
        sae.check_compatible(source_model="openai/clip-vit-large-patch14")
    with pytest.raises(SAEMismatchError, match="hidden_states.8.cls"):
        sae.check_compatible(representation="hidden_states.8.cls")
    with pytest.raises(SAEMismatchError, match="width 768"):
        sae.check_compatible(d_in=768)


@pytest.mark.parametrize("activation", ["topk_signed", "topk", "batchtopk", "relu"])
def test_save_load_round_trip_is_exact(tmp_path, activation):
    sae = make_sae(activation, source_model="tiny/clip", representation="image_embeds", training_metrics={"fvu": 0.1})
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.threshold.fill_(0.3)
    sae.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors", "README.md"}
    loaded = SparseAutoencoder.from_pretrained(tmp_path)
    assert loaded.config == sae.config
    x = torch.randn(7, 16)
    sae.eval(), loaded.eval()
    assert torch.equal(sae(x).reconstruction, loaded(x).reconstruction)
    for name, tensor in sae.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name])
    card = (tmp_path / "README.md").read_text()
    assert "fvu" in card and "sparse-autoencoder" in card


def test_corrupted_configs_are_refused(tmp_path):
    sae = make_sae()
    sae.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())

    def write(cfg):
        (tmp_path / "config.json").write_text(json.dumps(cfg))

    write({**config, "activation": "jumprelu"})
    with pytest.raises(ValueError, match="Unknown SAE activation 'jumprelu'"):
        SparseAutoencoder.from_pretrained(tmp_path)
    write({**config, "surprise": 1})
    with pytest.raises(SAELoadError, match="unknown keys"):
        SparseAutoencoder.from_pretrained(tmp_path)
    write({**config, "d_sae": 128})  # config disagrees with the weights
    with pytest.raises(SAELoadError, match="do not match its config"):
        SparseAutoencoder.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(SAELoadError, match="not valid JSON"):
        SparseAutoencoder.from_pretrained(tmp_path)
    write({**config, "k": 0})
    with pytest.raises(SAELoadError, match="needs an int k"):
        SparseAutoencoder.from_pretrained(tmp_path)


def test_truncated_weights_and_pickles_are_refused(tmp_path):
    sae = make_sae()
    sae.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(SAELoadError, match="corrupted"):
        SparseAutoencoder.from_pretrained(tmp_path)
    weights.unlink()
    torch.save(sae.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(SAELoadError, match="refuses to load them"):
        SparseAutoencoder.from_pretrained(tmp_path)


def test_push_to_hub_uploads_weights_config_and_card(tmp_path, monkeypatch):
    from unittest import mock

    sae = make_sae(training_metrics={"fvu": 0.05, "l0": 4.0})
    uploaded = {}

    def fake_upload_folder(*, repo_id, folder_path, **kwargs):
        uploaded["repo_id"] = repo_id
        uploaded["files"] = {p.name: p.read_text(errors="ignore") for p in __import__("pathlib").Path(folder_path).iterdir()}
        return "https://hub.test/commit"

    with mock.patch("huggingface_hub.hub_mixin.HfApi") as api_cls:
        api = api_cls.return_value
        api.create_repo.return_value.repo_id = "me/sae"
        api.upload_folder.side_effect = fake_upload_folder
        sae.push_to_hub("me/sae")
    assert uploaded["repo_id"] == "me/sae"
    assert set(uploaded["files"]) >= {"config.json", "model.safetensors", "README.md"}
    assert "0.05" in uploaded["files"]["README.md"] and 'from_pretrained("me/sae")' in uploaded["files"]["README.md"]
