"""The SAE-FT penalty on several representations at once (e.g. the CLS token of the last two blocks), one SAE each.

What is checked: the specs parse (comma-separated or a list) and are validated before the first step; the model
returns every representation from ONE vision forward; the penalty is exactly the sum of the single-representation
penalties, each term logged per representation; a recipe run with two hidden-state representations trains and saves
two SAEs (one embedding pass), resumes bit-identically, and its SAE folder round-trips through --sae_name_or_path; a set
of SAEs that does not match the representations fails with a clear error; 2 processes give the 1-process SAEs.

The runs use the real recipe (`recipes/imagenet.py`) on the tiny CLIP of `helpers` (2 blocks, width 32, projection
16) and a 3-class folder of 24 images; each is made once per module.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file

from helpers import CLASSNAMES, TEMPLATES, make_image_folder, make_tiny_clip, tiny_run_config, torchrun
from saeft_hf import SAEConfig, SAEFTTrainer, SAEMismatchError, SparseAutoencoder, train_sae
from saeft_hf.embeddings import compute_representations
from saeft_hf.modeling import parse_representations
from saeft_hf.penalty import sae_ft_penalty
from saeft_hf.pipeline import ModelArguments, parse_args, run_saeft
from saeft_hf.sae import SAELoadError
from saeft_hf.sae_set import as_sae_set, load_sae_set, save_sae_set
from saeft_hf.validation import SAEFTConfigError, check_model_args, representation_widths
from saeft_hf.zeroshot import from_clip

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "imagenet.py"
WNIDS = (ROOT / "saeft_hf" / "resources" / "imagenet_wnids.txt").read_text().split()[:3]
LAST, PREV = "hidden_states.-1.cls", "hidden_states.-2.cls"
TWO = f"{LAST},{PREV}"
CPU_FLAGS = ["--use_cpu"] if torch.accelerator.is_available() else []
# 24 images, global batch 8: 3 steps per epoch, 6 steps; a checkpoint every 2 steps for the resume test.
COMMON = ["--representation", TWO, "--global_batch_size", "8", "--per_device_train_batch_size", "4",
          "--num_train_epochs", "2", "--warmup_steps", "0", "--learning_rate", "1e-3", "--lambda_reg", "70",
          "--sae_epochs", "3", "--sae_k", "4", "--logging_steps", "1", "--report_to", "none", "--seed", "0",
          *CPU_FLAGS]


class Workspace:
    """Tiny CLIP, image folders and the recipe runs, each made once on first use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.clip = make_tiny_clip(root / "clip")
        make_image_folder(root / "D" / "train", per_class=8, names=WNIDS, seed=0)
        make_image_folder(root / "D" / "val", per_class=2, names=WNIDS, seed=1)
        (root / "templates.txt").write_text("a photo of a {}.\n")
        spec = importlib.util.spec_from_file_location("imagenet_recipe_under_test_multi_layer", RECIPE)
        self.recipe = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = self.recipe  # dataclasses resolve their annotations through sys.modules
        spec.loader.exec_module(self.recipe)
        self.outputs: dict[str, Path] = {}

    def args(self) -> list[str]:
        return ["--model_name_or_path", str(self.clip), "--train_dir", str(self.root / "D" / "train"),
                "--validation_dir", str(self.root / "D" / "val"), "--templates_file", str(self.root / "templates.txt")]

    def in_process(self, name: str, *argv: str) -> Path:
        """The recipe's main() here, on one thread like each torchrun rank (so both runs use the same kernels)."""
        out = self.root / name
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            self.recipe.main([*self.args(), *COMMON, *argv, "--output_dir", str(out)])
        finally:
            torch.set_num_threads(threads)
        return out

    def run(self, name: str) -> Path:
        if name not in self.outputs:
            if name == "one":
                self.outputs[name] = self.in_process(name, "--save_steps", "2")
            elif name == "two":
                out = self.root / name
                env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT),
                       "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
                proc = subprocess.run([*torchrun(2), str(RECIPE), *self.args(), *COMMON, "--save_strategy", "no",
                                       "--output_dir", str(out)], cwd=self.root, capture_output=True, text=True,
                                      env=env, timeout=600)
                assert proc.returncode == 0, proc.stderr[-4000:]
                self.outputs[name] = out
            else:
                raise KeyError(name)
        return self.outputs[name]


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("multi_layer"))


def step_logs(out: Path) -> list[dict]:
    return [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]


def random_sae(d_in: int, representation: str, source: str, seed: int) -> SparseAutoencoder:
    torch.manual_seed(seed)
    return SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=4 * d_in, k=4, source_model=source,
                                       representation=representation))


# ---------------------------------------------------------------------------------------------------------------------
# Specs, the model's forward, the penalty
# ---------------------------------------------------------------------------------------------------------------------


def test_specs_parse_comma_separated_or_as_a_list_and_are_checked_before_the_first_step():
    assert parse_representations("image_embeds") == ["image_embeds"]
    assert parse_representations(f" {LAST} , {PREV}") == [LAST, PREV] == parse_representations([LAST, PREV])
    shape = {"num_hidden_layers": 2, "hidden_size": 32, "projection_dim": 16}
    assert representation_widths(f"{TWO},image_embeds", shape) == {LAST: 32, PREV: 32, "image_embeds": 16}
    with pytest.raises(SAEFTConfigError, match=r"reads hidden state 5, but the vision tower has 2 layers"):
        representation_widths(f"{LAST},hidden_states.5.cls", shape)
    with pytest.raises(SAEFTConfigError, match=r"names \['hidden_states.-1.cls'\] more than once"):
        check_model_args(ModelArguments(representation=f"{LAST},{LAST}"))
    with pytest.raises(SAEFTConfigError, match="has an empty entry"):
        check_model_args(ModelArguments(representation=f"{LAST},,{PREV}"))
    with pytest.raises(SAEFTConfigError, match="Unknown representation 'hidden_states.-1.first'"):
        check_model_args(ModelArguments(representation=f"{LAST},hidden_states.-1.first"))
    assert ModelArguments(representation=[LAST, PREV]).representation == TWO  # a YAML list


def test_yaml_list_and_cli_comma_forms_parse_to_the_same_representation(tmp_path):
    (tmp_path / "c.yaml").write_text(f"representation: [{LAST}, {PREV}]\n")
    (margs,) = parse_args((ModelArguments,), ["--config", str(tmp_path / "c.yaml")])
    (cli,) = parse_args((ModelArguments,), ["--representation", TWO])
    assert margs.representation == cli.representation == TWO


def test_every_representation_comes_from_one_forward(tmp_path):
    clip = make_tiny_clip(tmp_path / "clip")
    px = torch.randn(3, 3, 30, 30, generator=torch.Generator().manual_seed(0))
    specs = [LAST, "hidden_states.1.mean", "image_embeds", "pooler_output"]
    model = from_clip(str(clip), CLASSNAMES, TEMPLATES, representation=",".join(specs), progress=False).eval()
    forwards = []
    model.vision_model.register_forward_hook(lambda *a: forwards.append(1))
    with torch.no_grad():
        out = model(pixel_values=px)
    assert len(forwards) == 1 and out.representation.shape == (3, 32 + 32 + 16 + 32)
    assert model.representation_dims() == [32, 32, 16, 32] and model.representation_dim() == 112
    parts = model.split_representation(out.representation)
    with torch.no_grad():
        for spec in specs:  # each equals the single-representation model's output, bit for bit
            model.config.representation = spec
            assert torch.equal(parts[spec], model.get_representation(px)), spec
            assert torch.equal(out.logits, model(pixel_values=px).logits)
        hidden = model.vision_model(pixel_values=px, output_hidden_states=True).hidden_states
    assert torch.equal(parts[LAST], hidden[2][:, 0])
    assert torch.equal(parts["hidden_states.1.mean"], hidden[1][:, 1:].mean(1))


def test_penalty_is_the_sum_of_the_single_layer_penalties_each_logged(tmp_path):
    clip = make_tiny_clip(tmp_path / "clip")
    gen = torch.Generator().manual_seed(0)
    px, labels = torch.randn(8, 3, 30, 30, generator=gen), torch.randint(0, 4, (8,), generator=gen)
    model = from_clip(str(clip), CLASSNAMES, TEMPLATES, representation=TWO, progress=False)
    embeddings = compute_representations(model, [{"pixel_values": p} for p in px], TWO, progress=False)
    saes = {spec: train_sae(embeddings[spec], SAEConfig(d_in=32, d_sae=64, k=4, source_model=str(clip),
                                                        representation=spec), epochs=2, batch_size=4,
                            progress=False).sae for spec in (LAST, PREV)}
    weights = dict(lambda_add=10.0, lambda_remove=2.0, mu=1.0)
    args = tiny_run_config(tmp_path / "out", lambda_reg=3.0, **weights)
    train = datasets.Dataset.from_dict({"pixel_values": px.numpy(), "labels": labels.numpy()}).with_format("torch")
    trainer = SAEFTTrainer(model=model, args=args, sae=[saes[PREV], saes[LAST]], train_dataset=train)
    assert list(trainer.saes) == [LAST, PREV] and trainer.sae is None  # a list is matched by recorded representation
    with torch.no_grad():  # move the trained model away from its frozen reference, so every term is non-zero
        for p in model.vision_model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    loss = trainer.compute_loss(model, {"pixel_values": px, "labels": labels})
    logged = {name: float(values[-1]) for name, values in trainer._metrics["train"].items()}

    expected = {}
    with torch.no_grad():
        for spec in (LAST, PREV):  # each layer alone: the model and the reference set to that one representation
            model.config.representation = trainer.ref_model.config.representation = spec
            expected[spec] = sae_ft_penalty(saes[spec], model.get_representation(px),
                                            trainer.ref_model.get_representation(px), **weights)
    # The same kernels on the same inputs: the split concatenation holds the single forwards' values bit for bit,
    # and the sum is the same addition, so the terms agree exactly (the loss adds ce and lambda_reg * total).
    total = expected[LAST].total + expected[PREV].total
    assert logged["penalty"] == float(total), (logged["penalty"], float(total))
    assert float(loss.detach()) == pytest.approx(logged["ce"] + 3.0 * float(total), rel=1e-6)
    for spec in (LAST, PREV):
        assert expected[spec].add > 0 and expected[spec].remove > 0 and expected[spec].residual > 0
        for name, field in (("penalty", "total"), ("add", "add"), ("remove", "remove"), ("residual", "residual"),
                            ("features_added", "features_added"), ("features_removed", "features_removed")):
            assert logged[f"{name}_{spec}"] == float(getattr(expected[spec], field)), (name, spec)
    for name in ("add", "remove", "residual", "features_added"):
        assert logged[name] == pytest.approx(logged[f"{name}_{LAST}"] + logged[f"{name}_{PREV}"], rel=1e-6)


def test_cached_lora_and_feature_distillation_references_split_the_representations_too(tmp_path):
    """The cached `z0` column holds the concatenation; LoRA's reference (adapters off) returns it too; feature
    distillation sums its per-representation terms like SAE-FT."""
    from saeft_hf.lora import add_lora
    from saeft_hf.penalty import feature_distillation_penalty

    clip = make_tiny_clip(tmp_path / "clip")
    gen = torch.Generator().manual_seed(0)
    px, labels = torch.randn(8, 3, 30, 30, generator=gen), torch.randint(0, 4, (8,), generator=gen)
    pretrained = from_clip(str(clip), CLASSNAMES, TEMPLATES, representation=TWO, progress=False)
    with torch.no_grad():
        z0 = pretrained.get_representation(px)
    saes = {spec: random_sae(32, spec, str(clip), i) for i, spec in enumerate((LAST, PREV))}
    rows = {"pixel_values": px.numpy(), "labels": labels.numpy()}
    live_ds = datasets.Dataset.from_dict(rows).with_format("torch")
    cached_ds = datasets.Dataset.from_dict({**rows, "z0": z0.numpy()}).with_format("torch")

    def loss_of(trainer, ds):
        batch = {k: ds[:][k] for k in ds.column_names}
        loss = trainer.compute_loss(trainer.model, batch).detach()
        return loss, {k: float(v[-1]) for k, v in trainer._metrics["train"].items()}

    def drifted(model):  # the same drift for every trainer: the model moves away from its reference
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in sorted(model.named_parameters()):
                if p.requires_grad and "vision_model" in name:
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        return model

    live = SAEFTTrainer(model=copy.deepcopy(pretrained), args=tiny_run_config(tmp_path / "l",
                        lambda_reg=1.0), sae=saes, train_dataset=live_ds)
    cached = SAEFTTrainer(model=copy.deepcopy(pretrained), args=tiny_run_config(
        tmp_path / "c", lambda_reg=1.0, reference_mode="cached"), sae=saes, train_dataset=cached_ds)
    drifted(live.model), drifted(cached.model)
    (l_live, m_live), (l_cached, m_cached) = loss_of(live, live_ds), loss_of(cached, cached_ds)
    assert m_live["penalty"] > 0 and m_cached == m_live and torch.equal(l_cached, l_live)

    lora = add_lora(copy.deepcopy(pretrained), r=4)
    with torch.no_grad():  # LoRA's B starts at zero: move it, so the adapted model differs from its reference
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    lora_trainer = SAEFTTrainer(model=lora, args=tiny_run_config(tmp_path / "r", lambda_reg=1.0, use_lora=True),
                                sae=saes, train_dataset=live_ds)
    with torch.no_grad():
        assert torch.equal(lora_trainer.reference_representation(lora, px), z0)  # adapters off: the pre-trained
        z = lora(pixel_values=px).representation
    _, m_lora = loss_of(lora_trainer, live_ds)
    expected = {spec: sae_ft_penalty(saes[spec], part, z0_part).total for (spec, part), z0_part in
                zip(pretrained.split_representation(z).items(), pretrained.split_representation(z0).values())}
    assert m_lora["penalty"] == pytest.approx(float(sum(expected.values())), rel=1e-6)
    assert m_lora[f"penalty_{LAST}"] == pytest.approx(float(expected[LAST]), rel=1e-6)

    fd = SAEFTTrainer(model=copy.deepcopy(pretrained), args=tiny_run_config(
        tmp_path / "f", lambda_reg=1.0, regularizer="feature_distill"), train_dataset=live_ds)
    drifted(fd.model)  # after the trainer took its frozen copy
    _, m_fd = loss_of(fd, live_ds)
    with torch.no_grad():
        parts = pretrained.split_representation(fd.model(pixel_values=px).representation)
    z0_parts = pretrained.split_representation(z0)
    assert m_fd["penalty"] == pytest.approx(float(sum(feature_distillation_penalty(parts[s], z0_parts[s])
                                                      for s in parts)), rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# End to end through the recipe
# ---------------------------------------------------------------------------------------------------------------------


def test_two_hidden_state_representations_train_and_save_two_saes(ws):
    out = ws.run("one")
    for folder in (out / "sae", out / "checkpoint-6" / "sae"):
        assert sorted(p.name for p in folder.iterdir()) == sorted([LAST, PREV])
        for spec in (LAST, PREV):
            config = json.loads((folder / spec / "config.json").read_text())
            assert (config["representation"], config["d_in"], config["d_sae"]) == (spec, 32, 128)
            assert config["provenance"]["representation"] == spec
    a, b = (load_file(out / "sae" / spec / "model.safetensors") for spec in (LAST, PREV))
    assert not torch.equal(a["W_dec"], b["W_dec"])  # two SAEs, each on its own layer's embeddings
    # One embedding pass for both: one cache of the concatenated [24, 64] embeddings, keyed on both specs.
    cache = load_file(out / "cache" / "sae_embeddings.safetensors")["embeddings"]
    assert cache.shape == (24, 64)
    logs = step_logs(out)
    assert [e["step"] for e in logs] == list(range(1, 7))
    assert logs[0]["penalty"] == 0  # step 1: the model still equals its frozen reference
    for entry in logs:
        assert all(entry[f"penalty_{spec}"] > 0 for spec in (LAST, PREV)) or entry is logs[0]
        assert entry["penalty"] == pytest.approx(entry[f"penalty_{LAST}"] + entry[f"penalty_{PREV}"], rel=1e-5)
    assert json.loads((out / "config.json").read_text())["representation"] == TWO
    # The saved model reloads and evaluates like any other (the evaluation loads it from output_dir).
    assert 0 <= json.loads((out / "eval_results.json").read_text())["final"]["validation"] <= 1


def test_a_multi_layer_run_resumes_bit_identically(ws):
    full = ws.run("one")
    resumed = ws.root / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "sae", resumed / "sae")  # the SAEs trained at the start (as after a crash)
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    ws.in_process("resumed", "--save_steps", "2", "--resume_from_checkpoint", str(resumed / "checkpoint-2"))
    assert step_logs(resumed) == step_logs(full)
    w_full, w_resumed = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(w_full[name], w_resumed[name]) for name in w_full)
    for spec in (LAST, PREV):  # reused, not retrained
        assert (resumed / "sae" / spec / "model.safetensors").read_bytes() == \
            (full / "sae" / spec / "model.safetensors").read_bytes()


def test_sae_name_or_path_takes_a_multi_sae_folder(ws, tmp_path):
    saved = ws.run("one") / "sae"
    loaded = load_sae_set(saved, [PREV, LAST])
    assert list(loaded) == [PREV, LAST]  # in the requested order
    assert list(load_sae_set(saved / LAST, [LAST])) == [LAST]  # one SAE's own folder is a plain SAE folder
    train = datasets.load_dataset("imagefolder", data_dir=str(ws.root / "D" / "train"), split="train")
    margs = ModelArguments(model_name_or_path=str(ws.clip), representation=TWO, sae_epochs=1, sae_k=4)
    result = run_saeft(margs, tiny_run_config(tmp_path / "run", lambda_reg=70.0, sae_name_or_path=str(saved)),
                       train_dataset=train, eval_dataset=None, classnames=CLASSNAMES[:3], templates=TEMPLATES)
    assert result.sae is None and list(result.saes) == [LAST, PREV]
    for spec in (LAST, PREV):
        assert torch.equal(result.saes[spec].W_enc, loaded[spec].W_enc)
        assert (tmp_path / "run" / "sae" / spec / "model.safetensors").is_file()  # travels with the model
    assert not (tmp_path / "run" / "cache" / "sae_embeddings.safetensors").exists()  # no SAE was trained
    # The same SAEs as objects, a list in any order (matched by the representation each records): the same run.
    again = run_saeft(margs, tiny_run_config(tmp_path / "again", lambda_reg=70.0), sae=[loaded[PREV], loaded[LAST]],
                      train_dataset=train, eval_dataset=None, classnames=CLASSNAMES[:3], templates=TEMPLATES)
    assert list(again.saes) == [LAST, PREV]
    assert step_logs(tmp_path / "again") == step_logs(tmp_path / "run")


def test_a_set_of_saes_that_does_not_match_the_representations_is_refused(ws, tmp_path):
    source = str(ws.clip)
    last, prev = random_sae(32, LAST, source, 0), random_sae(32, PREV, source, 1)
    save_sae_set({LAST: last, PREV: prev}, tmp_path / "both")
    with pytest.raises(SAEMismatchError, match=r"no SAE for \['hidden_states.0.cls'\]"):
        load_sae_set(tmp_path / "both", [LAST, "hidden_states.0.cls"])
    with pytest.raises(SAEMismatchError, match=r"SAEs for \['hidden_states.-2.cls'\] that the run does not penalise"):
        load_sae_set(tmp_path / "both", [LAST])
    last.save_pretrained(tmp_path / "single")
    with pytest.raises(SAEMismatchError, match=r"holds one SAE \(trained on `hidden_states.-1.cls`\), but the run "
                                               r"penalises 2 representations"):
        load_sae_set(tmp_path / "single", [LAST, PREV])
    shutil.copytree(tmp_path / "both" / PREV, tmp_path / "swapped" / LAST)
    shutil.copytree(tmp_path / "both" / LAST, tmp_path / "swapped" / PREV)
    with pytest.raises(SAEMismatchError, match=r"holds an SAE trained on `hidden_states.-2.cls`, not "
                                               r"`hidden_states.-1.cls`"):
        load_sae_set(tmp_path / "swapped", [LAST, PREV])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SAELoadError, match="No SAE at"):
        load_sae_set(tmp_path / "empty", [LAST, PREV])
    with pytest.raises(SAEMismatchError, match=r"One SAE .* was given, but the run penalises 2"):
        as_sae_set(last, [LAST, PREV])
    with pytest.raises(SAEMismatchError, match="Two of the given SAEs were trained on `hidden_states.-1.cls`"):
        as_sae_set([last, last], [LAST, PREV])

    # Through run_saeft, before any model is built: a missing SAE and a wrong width.
    train = datasets.load_dataset("imagefolder", data_dir=str(ws.root / "D" / "train"), split="train")
    margs = ModelArguments(model_name_or_path=source, representation=TWO)
    kwargs = dict(train_dataset=train, eval_dataset=None, classnames=CLASSNAMES[:3], templates=TEMPLATES)
    with pytest.raises(SAEMismatchError, match=r"The given SAEs do not match .*no SAE for \['hidden_states.-2.cls'\]"):
        run_saeft(margs, tiny_run_config(tmp_path / "a", lambda_reg=1.0), sae={LAST: last}, **kwargs)
    narrow = random_sae(16, PREV, source, 2)
    with pytest.raises(SAEMismatchError, match=r"SAE width mismatch: the SAE has d_in=16 .*hidden_states.-2.cls"):
        run_saeft(margs, tiny_run_config(tmp_path / "b", lambda_reg=1.0), sae={LAST: last, PREV: narrow}, **kwargs)
    with pytest.raises(SAEFTConfigError, match="reads hidden state 3, but the vision tower has 2 layers"):
        run_saeft(ModelArguments(model_name_or_path=source, representation=f"{LAST},hidden_states.3.cls"),
                  tiny_run_config(tmp_path / "c", lambda_reg=1.0), **kwargs)
    with pytest.raises(SAEFTConfigError, match=r"model_args.representation='hidden_states.-1.cls,hidden_states.-2.cls' "
                                               r"but the given model returns 'image_embeds'"):
        run_saeft(margs, tiny_run_config(tmp_path / "d", lambda_reg=1.0), sae={LAST: last, PREV: prev},
                  model=from_clip(source, CLASSNAMES[:3], TEMPLATES, progress=False), **kwargs)
    assert not any((tmp_path / name / "sae").exists() for name in "abcd")


@pytest.mark.slow
def test_two_processes_train_the_one_process_saes(ws):
    """The embedding pass sharded over 2 ranks (whole batches each, gathered in order) gives rank 0 the same
    embeddings, so it trains the same two SAEs as one process (both runs on one thread per process)."""
    one, two = ws.run("one"), ws.run("two")
    for spec in (LAST, PREV):
        a, b = load_file(one / "sae" / spec / "model.safetensors"), load_file(two / "sae" / spec / "model.safetensors")
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=f"{spec}: {name}")
    torch.testing.assert_close(load_file(two / "cache" / "sae_embeddings.safetensors")["embeddings"],
                               load_file(one / "cache" / "sae_embeddings.safetensors")["embeddings"], rtol=0, atol=0)


def test_the_train_sae_command_saves_one_sae_per_representation(ws, tmp_path):
    from saeft_hf.commands.train_sae import main as train_sae_main
    from saeft_hf.sae_set import load_sae_set

    out = tmp_path / "saes"
    train_sae_main(["--model_name_or_path", str(ws.clip), "--train_dir", str(ws.root / "D" / "train"),
                    "--representation", TWO, "--sae_d_sae_multiplier", "2", "--sae_k", "4", "--sae_epochs", "1",
                    "--output_dir", str(out)])
    saes = load_sae_set(out, [LAST, PREV])
    assert [(s.config.representation, s.config.d_in, s.config.d_sae) for s in saes.values()] == \
        [(LAST, 32, 64), (PREV, 32, 64)]
