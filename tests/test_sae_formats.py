"""SAEs from and for other tools: SAELens and EleutherAI sparsify (saeft_hf.sae_formats).

The fixtures under tests/fixtures/ were written by the real packages (sae-lens 6.54.12, eai-sparsify 1.3.3) with
tests/fixtures/make_saelens_fixtures.py, together with the codes their own `encode` returns on stored inputs; two
(`topk_trained`, `batchtopk`) were trained by SAELens's own training step. These tests need neither package. The
one mock is the Hub's network edge (`hf_hub_download`, `snapshot_download`), served from a local folder.

Tolerance: the codes of `standard`, `topk`, `batchtopk` and sparsify come from the same float32 products as the
package's, so they must match exactly. Where a SAELens option is folded into the weights (`rescale_acts_by_decoder_norm`,
`apply_b_dec_to_input: false`; SAELens's trainer saves TopK with the norms folded but the flag still on, so
`topk_trained` too) the products are rounded differently: a few float32 ulps of the largest term, so a relative
tolerance of 1e-5 of the largest code; the set of active latents must still be identical.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import EntryNotFoundError
from safetensors.torch import load_file, save_file

from saeft_hf import SAEConfig, SAEFTConfig, SparseAutoencoder, sae_ft_penalty
from saeft_hf.sae import SAELoadError, SAEMismatchError
from saeft_hf.validation import check_sae

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SAELENS, SPARSIFY = FIXTURES / "saelens", FIXTURES / "sparsify"
EXACT = ("standard", "topk", "batchtopk")
FOLDED = ("standard_no_b_dec_in", "topk_rescaled", "topk_trained")
ACTIVATION = {"standard": "relu", "standard_no_b_dec_in": "relu", "topk": "topk", "topk_rescaled": "topk",
              "topk_trained": "topk", "batchtopk": "batchtopk"}


def samples(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_file(path)
    return data["inputs"], data["codes"]


def assert_same_codes(ours: torch.Tensor, theirs: torch.Tensor, *, exact: bool) -> None:
    assert torch.equal(ours != 0, theirs != 0), "another set of active latents"
    if exact:
        assert torch.equal(ours, theirs)
    else:
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * float(theirs.abs().max()))


# ----------------------------------------------------------------------------------------------------------------
# Reading what SAELens and sparsify wrote
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", EXACT + FOLDED)
def test_saelens_sae_gives_saelens_codes(name, caplog):
    with caplog.at_level(logging.WARNING, logger="saeft_hf.sae_formats"):
        sae = SparseAutoencoder.from_pretrained(SAELENS / name)
    inputs, codes = samples(SAELENS / f"{name}.samples.safetensors")
    assert not sae.training  # BatchTopK encodes with its inference threshold
    assert sae.config.activation == ACTIVATION[name] and sae.config.input_normalization == "none"
    assert sae.config.source_model == "openai/clip-vit-base-patch32"  # SAELens metadata.model_name
    # Its hook `vision_model.post_layernorm` is no representation of ours: image_embeds, said out loud.
    assert sae.config.representation == "image_embeds" and "does not say which saeft-hf representation" in caplog.text
    assert sae.config.provenance["imported_from"]["format"] == "saelens"
    with torch.no_grad():
        assert_same_codes(sae.encode(inputs), codes, exact=name in EXACT)
    if name == "batchtopk":  # SAELens's k and the one threshold it learned, saved per latent
        assert sae.config.k == 4
        assert torch.equal(load_file(SAELENS / name / "sae_weights.safetensors")["threshold"], sae.threshold.expand(32))


@pytest.mark.parametrize("hookpoint", ["layers.2", "layers.5"])
def test_sparsify_sae_gives_sparsify_codes(hookpoint):
    sae = SparseAutoencoder.from_pretrained(SPARSIFY / "repo", subfolder=hookpoint)
    inputs, codes = samples(SPARSIFY / f"{hookpoint}.samples.safetensors")
    assert (sae.config.activation, sae.config.k, sae.config.d_sae) == ("topk", 4, 32)
    assert sae.config.source_model == "openai/clip-vit-base-patch32"  # the run's config.json `model`
    with torch.no_grad():
        assert_same_codes(sae.encode(inputs), codes, exact=True)
    # The hookpoint's folder itself loads the same SAE.
    direct = SparseAutoencoder.from_pretrained(SPARSIFY / "repo" / hookpoint)
    assert torch.equal(direct.W_enc, sae.W_enc)


def test_a_folder_of_several_saes_lists_the_choices():
    with pytest.raises(SAELoadError, match=r"holds several SAEs, one per hookpoint: pass `subfolder=`.*layers\.2, layers\.5"):
        SparseAutoencoder.from_pretrained(SPARSIFY / "repo")
    with pytest.raises(SAELoadError, match=r"has no sub-folder 'layers\.9'.*layers\.2, layers\.5"):
        SparseAutoencoder.from_pretrained(SPARSIFY / "repo", subfolder="layers.9")


@pytest.mark.parametrize("where,message", [
    (SAELENS / "jumprelu", r"JumpReLU SAE with per-latent thresholds .*no per-latent JumpReLU"),
    (SAELENS / "standard_layer_norm", r"normalize_activations='layer_norm' normalises inputs outside the weights"),
    (SPARSIFY / "transcoder", r"a transcoder .*; a linear skip connection"),
])
def test_what_cannot_be_mapped_is_refused_with_the_reason(where, message):
    with pytest.raises(SAELoadError, match=message):
        SparseAutoencoder.from_pretrained(where)


def edited_copy(tmp_path: Path, name: str, edit) -> Path:
    folder = shutil.copytree(SAELENS / name, tmp_path / f"{name}-{len(list(tmp_path.iterdir()))}")
    cfg = json.loads((folder / "cfg.json").read_text())
    edit(cfg)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def test_unknown_architectures_and_other_settings_are_refused(tmp_path):
    gated = edited_copy(tmp_path, "standard", lambda c: c.update(architecture="gated"))
    with pytest.raises(SAELoadError, match="SAELens architecture 'gated' has no saeft-hf equivalent.*reads `standard`"):
        SparseAutoencoder.from_pretrained(gated)
    scaled = edited_copy(tmp_path, "topk", lambda c: c.update(normalize_activations="expected_average_only_in"))
    with pytest.raises(SAELoadError, match=r"dataset-wide factor .*fold_activation_norm_scaling_factor"):
        SparseAutoencoder.from_pretrained(scaled)
    heads = edited_copy(tmp_path, "topk", lambda c: c.update(reshape_activations="hook_z"))
    with pytest.raises(SAELoadError, match="reshape_activations='hook_z'"):
        SparseAutoencoder.from_pretrained(heads)
    no_k = edited_copy(tmp_path, "batchtopk", lambda c: c["metadata"].pop("training_architecture_details"))
    with pytest.raises(SAELoadError, match="does not record the training k"):
        SparseAutoencoder.from_pretrained(no_k)
    # A tensor the architecture does not have (e.g. a gated SAE's) would be ignored by our encode: refused.
    extra = edited_copy(tmp_path, "standard", lambda c: None)
    state = load_file(extra / "sae_weights.safetensors")
    save_file({**state, "b_gate": torch.zeros(32)}, extra / "sae_weights.safetensors")
    with pytest.raises(SAELoadError, match=r"unexpected \['b_gate'\]"):
        SparseAutoencoder.from_pretrained(extra)


def test_legacy_saelens_config_reads_as_saelens_reads_it(tmp_path):
    """SAELens < 6 wrote flat metadata and `activation_fn_str`; a TopK written so is the same SAE."""
    def legacy(cfg):
        meta = cfg.pop("metadata")
        cfg.pop("architecture")
        cfg.update(activation_fn_str="topk", activation_fn_kwargs={"k": cfg.pop("k")}, hook_point=meta["hook_name"],
                   model_name=meta["model_name"], normalize_activations=False)
    folder = edited_copy(tmp_path, "topk", legacy)
    sae = SparseAutoencoder.from_pretrained(folder)
    inputs, codes = samples(SAELENS / "topk.samples.safetensors")
    assert (sae.config.activation, sae.config.k, sae.config.source_model) == ("topk", 4, "openai/clip-vit-base-patch32")
    assert_same_codes(sae.encode(inputs), codes, exact=True)


# ----------------------------------------------------------------------------------------------------------------
# Writing SAELens folders
# ----------------------------------------------------------------------------------------------------------------


def random_sae(activation: str, **kw) -> SparseAutoencoder:
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=16, d_sae=32, k=None if activation == "relu" else 4, activation=activation,
                                      input_normalization="none",
                                      source_model="openai/clip-vit-base-patch32", **kw))
    with torch.no_grad():
        sae.b_enc.normal_(std=0.3)
        sae.b_dec.normal_(std=0.3)
        sae.threshold.fill_(0.2)
    return sae.eval()


@pytest.mark.parametrize("activation,architecture", [("relu", "standard"), ("topk", "topk"), ("batchtopk", "jumprelu")])
def test_ours_to_saelens_to_ours_gives_identical_codes(tmp_path, activation, architecture):
    sae = random_sae(activation, representation="hidden_states.1.cls", l1_coefficient=0.5 if activation == "relu" else 0)
    sae.save_pretrained(tmp_path / "saelens", format="saelens")
    assert sorted(p.name for p in (tmp_path / "saelens").iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    cfg = json.loads((tmp_path / "saelens" / "cfg.json").read_text())
    assert cfg["architecture"] == architecture and cfg["apply_b_dec_to_input"] is True
    assert cfg["metadata"]["model_name"] == "openai/clip-vit-base-patch32"
    back = SparseAutoencoder.from_pretrained(tmp_path / "saelens")
    for name in ("d_in", "d_sae", "k", "activation", "input_normalization", "source_model", "representation",
                 "l1_coefficient"):
        assert getattr(back.config, name) == getattr(sae.config, name), name
    for name, tensor in sae.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    x = torch.randn(64, 16) * 2
    with torch.no_grad():
        assert torch.equal(back.encode(x), sae.encode(x))
        assert int((sae.encode(x) != 0).sum()) > 0


def test_what_saelens_cannot_express_is_refused_with_the_reason(tmp_path):
    signed = SparseAutoencoder(SAEConfig(d_in=16, d_sae=32, k=4, input_normalization="none"))  # topk_signed
    with pytest.raises(ValueError, match=r"activation='topk_signed' .*SAELens cannot express it: its `topk` applies "
                                         r"a ReLU .*activation='topk'"):
        signed.save_pretrained(tmp_path / "a", format="saelens")
    unit = SparseAutoencoder(SAEConfig(d_in=16, d_sae=32, k=4, activation="topk"))  # unit_norm inputs by default
    with pytest.raises(ValueError, match=r"unit L2 norm .*SAELens's encode reads the raw activation .*"
                                         r"input_normalization='none'"):
        unit.save_pretrained(tmp_path / "b", format="saelens")
    with pytest.raises(ValueError, match="Unknown SAE format 'sparsify'"):
        random_sae("topk").save_pretrained(tmp_path / "c", format="sparsify")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ----------------------------------------------------------------------------------------------------------------
# The Hub
# ----------------------------------------------------------------------------------------------------------------


class FakeHub:
    """The Hub's network edge served from local folders: repo id -> folder, as `hf_hub_download`/`snapshot_download`."""

    def __init__(self, repos: dict[str, Path], cache: Path) -> None:
        self.repos, self.cache, self.snapshots = repos, cache, []

    def hf_hub_download(self, repo_id, filename, *, subfolder=None, **kwargs):
        path = self.repos[repo_id] / (subfolder or "") / filename
        if not path.is_file():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(path)

    def snapshot_download(self, repo_id, *, allow_patterns=None, **kwargs):
        self.snapshots.append(list(allow_patterns or ["*"]))
        src, dst = self.repos[repo_id], self.cache / repo_id.replace("/", "--")
        for path in src.rglob("*"):
            rel = path.relative_to(src).as_posix()
            if path.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns or ["*"]):
                (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, dst / rel)
        dst.mkdir(parents=True, exist_ok=True)
        return str(dst)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    fake = FakeHub({"org/saelens-topk": SAELENS / "topk", "org/sparsify-run": SPARSIFY / "repo"}, tmp_path / "cache")
    monkeypatch.setattr("saeft_hf.sae.hf_hub_download", fake.hf_hub_download)
    monkeypatch.setattr("saeft_hf.sae_formats.snapshot_download", fake.snapshot_download)
    return fake


def test_hub_repos_of_saelens_and_sparsify_load(hub):
    sae = SparseAutoencoder.from_pretrained("org/saelens-topk", default_representation="pooler_output")
    inputs, codes = samples(SAELENS / "topk.samples.safetensors")
    assert_same_codes(sae.encode(inputs), codes, exact=True)
    assert sae.config.representation == "pooler_output"
    with pytest.raises(SAELoadError, match=r"The Hub repo `org/sparsify-run` holds several SAEs.*layers\.2, layers\.5"):
        SparseAutoencoder.from_pretrained("org/sparsify-run")
    sae = SparseAutoencoder.from_pretrained("org/sparsify-run", subfolder="layers.5")
    inputs, codes = samples(SPARSIFY / "layers.5.samples.safetensors")
    assert_same_codes(sae.encode(inputs), codes, exact=True)
    assert sae.config.source_model == "openai/clip-vit-base-patch32"  # the run's config.json came along
    # Only JSON to find the layout, then one hookpoint's weights: never the whole repo.
    assert hub.snapshots[-2:] == [["layers.5/cfg.json", "layers.5/*/cfg.json", "config.json"],
                                  ["layers.5/sae_weights.safetensors", "layers.5/sae.safetensors"]]
    assert not (hub.cache / "org--sparsify-run" / "layers.2" / "sae.safetensors").exists()


# ----------------------------------------------------------------------------------------------------------------
# As the SAE-FT dictionary
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["topk_trained", "batchtopk"])  # both trained by SAELens
def test_a_saelens_sae_is_a_working_saeft_dictionary(name):
    sae = SparseAutoencoder.from_pretrained(SAELENS / name, default_representation="hidden_states.2.cls")
    # What run_saeft checks for `--sae_name_or_path`: width, representation and (unless allowed) the source model.
    check_sae(sae, width=16, representation="hidden_states.2.cls", source_model=None)
    sae.check_compatible(d_in=16)
    with pytest.raises(SAEMismatchError, match="SAE width mismatch"):
        check_sae(sae, width=32, representation="hidden_states.2.cls", source_model=None)
    with pytest.raises(SAEMismatchError, match="trained on `openai/clip-vit-base-patch32` but .*allow_sae_source_mismatch"):
        check_sae(sae, width=16, representation="hidden_states.2.cls", source_model="someone/other-clip")
    inputs, _ = samples(SAELENS / f"{name}.samples.safetensors")
    z0 = inputs.clone()
    z = (inputs + 0.3 * torch.randn_like(inputs)).requires_grad_(True)
    out = sae_ft_penalty(sae, z, z0)
    out.total.backward()
    assert torch.isfinite(out.total) and z.grad is not None and z.grad.abs().sum() > 0
    assert all(p.grad is None for p in sae.parameters())  # the dictionary stays frozen


def test_a_run_fine_tunes_with_an_sae_saelens_wrote(tmp_path):
    """`--sae_name_or_path` an SAELens folder: two SAE-FT steps of the tiny CLIP (image_embeds, width 16)."""
    from helpers import CLASSNAMES, TEMPLATES, make_image_folder, make_tiny_clip, tiny_run_config
    from saeft_hf.data import load_image_dataset
    from saeft_hf.pipeline import ModelArguments, run_saeft

    clip = make_tiny_clip(tmp_path / "clip")
    root = make_image_folder(tmp_path / "train", per_class=2)
    train = load_image_dataset(train_dir=root, split="train", cache_dir=str(tmp_path / "cache"))
    model_args = ModelArguments(model_name_or_path=str(clip), embedding_batch_size=8)
    with pytest.raises(SAEMismatchError, match="trained on `openai/clip-vit-base-patch32`"):  # its metadata's model
        run_saeft(model_args, tiny_run_config(tmp_path / "refused", sae_name_or_path=str(SAELENS / "topk")),
                  train_dataset=train, eval_dataset=None, classnames=CLASSNAMES, templates=TEMPLATES)
    args = tiny_run_config(tmp_path / "out", sae_name_or_path=str(SAELENS / "topk"), allow_sae_source_mismatch=True,
                           max_steps=2)
    result = run_saeft(model_args, args, train_dataset=train, eval_dataset=None, classnames=CLASSNAMES,
                       templates=TEMPLATES)
    assert result.sae.config.provenance["imported_from"]["format"] == "saelens"
    steps = [h for h in result.trainer.state.log_history if "residual" in h]
    # Step 1: z = z0, nothing drifted; step 2: the SAELens dictionary sees the drift the first step made.
    assert len(steps) == 2 and steps[0]["penalty"] == 0 and steps[1]["residual"] > 0


def test_the_trainer_takes_a_foreign_sae_as_reading_the_models_representation(tmp_path):
    """`SAEFTTrainer(args.sae_name_or_path=...)`: a foreign SAE for hidden states is recorded on the model's one."""
    from helpers import CLASSNAMES, TEMPLATES, make_tiny_clip
    from saeft_hf import SAEFTTrainer
    from saeft_hf.zeroshot import from_clip

    model = from_clip(str(make_tiny_clip(tmp_path / "clip")), CLASSNAMES, TEMPLATES,
                      representation="hidden_states.1.cls", progress=False)  # width 32
    folder = tmp_path / "from-another-tool"
    SparseAutoencoder(SAEConfig(d_in=32, d_sae=64, k=4, activation="topk", input_normalization="none")).save_pretrained(
        folder, format="saelens")
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = "blocks.1.hook_resid_post"  # a TransformerLens hook, none of ours
    (folder / "cfg.json").write_text(json.dumps(cfg))
    args = SAEFTConfig(output_dir=str(tmp_path / "out"), sae_name_or_path=str(folder), use_cpu=True, report_to="none")
    trainer = SAEFTTrainer(model=model, args=args)
    assert trainer.sae.config.representation == "hidden_states.1.cls" and not trainer.sae.training
