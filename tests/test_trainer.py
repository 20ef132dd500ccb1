"""SAEFTTrainer through the real Trainer: loss composition, frozen reference, LoRA reference, accumulation, errors."""

import copy
from unittest import mock

import datasets
import pytest
import torch
import torch.nn.functional as F

from helpers import CLASSNAMES, TEMPLATES, make_tiny_clip
from saeft_hf import SAEConfig, SAEFTConfig, SAEFTTrainer, SAEMismatchError, train_sae
from saeft_hf.hub import push_run_to_hub
from saeft_hf.lora import add_lora
from saeft_hf.zeroshot import from_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture(scope="module")
def pixel_data():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(16, 3, 30, 30, generator=gen), torch.randint(0, 4, (16,), generator=gen)


def model_and_sae(clip_dir, pixel_data):
    model = from_clip(str(clip_dir), CLASSNAMES, TEMPLATES, progress=False)
    with torch.no_grad():
        emb = model.get_representation(pixel_data[0])
    sae = train_sae(emb, SAEConfig(d_in=16, d_sae=64, k=4, source_model=str(clip_dir)), epochs=3, batch_size=8,
                    progress=False).sae
    return model, sae


def dataset(pixel_data):
    px, labels = pixel_data
    return datasets.Dataset.from_dict({"pixel_values": px.numpy(), "labels": labels.numpy()}).with_format("torch")


def make_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=2, learning_rate=1e-3,
                warmup_steps=0, logging_steps=1, use_cpu=True, report_to="none", save_strategy="no",
                dataloader_num_workers=0, seed=0)
    return SAEFTConfig(**{**base, **kw})


def test_lambda_zero_is_plain_cross_entropy(clip_dir, pixel_data, tmp_path):
    model, sae = model_and_sae(clip_dir, pixel_data)
    trainer = SAEFTTrainer(model=model, args=make_args(tmp_path, lambda_reg=0.0), sae=sae, train_dataset=dataset(pixel_data))
    assert trainer.ref_model is None and trainer.sae is None  # nothing extra is built for plain FT
    px, labels = pixel_data
    loss = trainer.compute_loss(model, {"pixel_values": px[:8], "labels": labels[:8]})
    torch.testing.assert_close(loss, F.cross_entropy(model(pixel_values=px[:8]).logits, labels[:8]))


def test_loss_is_ce_plus_weighted_penalty_and_reference_and_sae_stay_frozen(clip_dir, pixel_data, tmp_path):
    model, sae = model_and_sae(clip_dir, pixel_data)
    pretrained = copy.deepcopy(model.state_dict())
    sae_before = copy.deepcopy(sae.state_dict())
    trainer = SAEFTTrainer(model=model, args=make_args(tmp_path, lambda_reg=5.0, lambda_remove=1.0), sae=sae,
                           train_dataset=dataset(pixel_data))
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    for entry in logs:
        assert entry["penalty"] == pytest.approx(10 * entry["add"] + entry["remove"] + entry["residual"], rel=1e-4)
    for name, tensor in trainer.ref_model.state_dict().items():
        assert torch.equal(tensor, pretrained[name]), name
    for name, tensor in trainer.sae.state_dict().items():
        assert torch.equal(tensor.cpu(), sae_before[name]), name
    assert not any(torch.equal(p, pretrained[n]) for n, p in model.state_dict().items() if "layers.0.mlp.fc1.weight" in n)


def test_lora_reference_is_the_base_with_adapters_disabled(clip_dir, pixel_data, tmp_path):
    model, sae = model_and_sae(clip_dir, pixel_data)
    px = pixel_data[0][:4]
    with torch.no_grad():
        z_pretrained = model.get_representation(px)
    lora = add_lora(model, r=4, alpha=8)
    trainer = SAEFTTrainer(model=lora, args=make_args(tmp_path, learning_rate=1e-2), sae=sae, train_dataset=dataset(pixel_data))
    assert trainer.ref_model is None  # no second copy of the weights
    trainer.train()
    with torch.no_grad():
        z_trained = lora.get_base_model().get_representation(px)
    assert not torch.allclose(z_trained, z_pretrained, atol=1e-4)  # the adapters did move the model
    torch.testing.assert_close(trainer.reference_representation(lora, px), z_pretrained)


def test_gradient_accumulation_matches_one_big_batch(clip_dir, pixel_data, tmp_path):
    finals = []
    for bs, ga in ((8, 1), (4, 2)):
        model, sae = model_and_sae(clip_dir, pixel_data)
        args = make_args(tmp_path / f"{bs}", per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                         max_steps=1, optim="sgd", max_grad_norm=0.0, lambda_remove=0.5)
        data = dataset((pixel_data[0][:8], pixel_data[1][:8]))
        trainer = SAEFTTrainer(model=model, args=args, sae=sae, train_dataset=data)
        trainer.train()
        finals.append({k: v.clone() for k, v in model.state_dict().items()})
    for name in finals[0]:
        torch.testing.assert_close(finals[0][name], finals[1][name], atol=2e-5, rtol=1e-4)


def test_errors_are_clear(clip_dir, pixel_data, tmp_path):
    model, sae = model_and_sae(clip_dir, pixel_data)
    with pytest.raises(ValueError, match="needs an SAE"):
        SAEFTTrainer(model=model, args=make_args(tmp_path), train_dataset=dataset(pixel_data))
    wide = train_sae(torch.randn(64, 32), SAEConfig(d_in=32, d_sae=64, k=4), epochs=1, progress=False).sae
    with pytest.raises(SAEMismatchError, match="width"):
        SAEFTTrainer(model=model, args=make_args(tmp_path), sae=wide, train_dataset=dataset(pixel_data))
    sae.config.source_model = "openai/clip-vit-large-patch14"
    with pytest.raises(SAEMismatchError, match="clip-vit-large-patch14"):
        SAEFTTrainer(model=model, args=make_args(tmp_path), sae=sae, train_dataset=dataset(pixel_data))
    SAEFTTrainer(model=model, args=make_args(tmp_path, allow_sae_source_mismatch=True), sae=sae,
                 train_dataset=dataset(pixel_data))
    with pytest.raises(ValueError, match="lambda_add must be >= 0"):
        make_args(tmp_path, lambda_add=-1.0)
    with pytest.raises(ValueError, match="match no linear layer"):
        add_lora(model, target_modules=["query_proj"])


@pytest.mark.parametrize("regularizer", ["feature_distill", "l2sp"])
def test_baseline_regularisers_train(clip_dir, pixel_data, tmp_path, regularizer):
    model, _ = model_and_sae(clip_dir, pixel_data)
    trainer = SAEFTTrainer(model=model, args=make_args(tmp_path, regularizer=regularizer, lambda_reg=1.0),
                           train_dataset=dataset(pixel_data))
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs[0]["penalty"] >= 0 and logs[-1]["loss"] == pytest.approx(logs[-1]["ce"] + logs[-1]["penalty"], rel=1e-4)


def test_push_uploads_everything_and_failure_keeps_outputs(tmp_path):
    out = tmp_path / "run"
    (out / "sae").mkdir(parents=True)
    for name in ("model.safetensors", "config.json", "README.md", "eval_results.json", "sae/model.safetensors"):
        (out / name).write_text("x")
    with mock.patch("saeft_hf.hub.HfApi") as api_cls:
        api = api_cls.return_value
        api.create_repo.return_value.repo_id = "me/run"
        push_run_to_hub(out, "me/run", token="hf_abcdefghijklmnop")
        kwargs = api.upload_folder.call_args.kwargs
        assert kwargs["repo_id"] == "me/run" and kwargs["folder_path"] == str(out)
        assert "checkpoint-*" in kwargs["ignore_patterns"]
        api.upload_folder.side_effect = OSError("401 for token hf_abcdefghijklmnop")
        with pytest.raises(RuntimeError) as err:
            push_run_to_hub(out, "me/run", token="hf_abcdefghijklmnop")
    message = str(err.value)
    assert "hf_abcdefghijklmnop" not in message and "hf upload me/run" in message and "intact" in message
    assert (out / "model.safetensors").is_file() and (out / "sae" / "model.safetensors").is_file()


@pytest.mark.parametrize("use_lora", [False, True])
def test_bf16_autocast_and_activation_checkpointing(clip_dir, pixel_data, tmp_path, use_lora):
    """bf16 mixed precision (CPU autocast) with activation checkpointing: the penalty terms stay finite and logged."""
    model, sae = model_and_sae(clip_dir, pixel_data)
    if use_lora:
        model = add_lora(model, r=4, alpha=8)
    args = make_args(tmp_path, bf16=True, activation_checkpointing=True, lambda_remove=0.5)
    trainer = SAEFTTrainer(model=model, args=args, sae=sae, train_dataset=dataset(pixel_data))
    trainer.train()
    base = model.get_base_model() if use_lora else model
    assert base.is_activation_checkpointing
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs and all(torch.isfinite(torch.tensor([e["loss"], e["penalty"], e["residual"]])).all() for e in logs)
