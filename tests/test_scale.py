"""The recipe at scale: defined by global batch and epochs, the same optimisation on 1 or 2 processes, streams read
by every rank from its own shards with epochs of known length, exact streaming resume past the first pass, L2-SP
under DDP, seeded subsets.

The end-to-end tests run the real recipe (`recipes/imagenet.py`) on a tiny CLIP, a 3-class folder of 48 training
images and the same images as 4 webdataset tars. The 1-process runs call the recipe's `main()` in this process (no
interpreter start-up); the 2-process runs use torchrun on the CPU with gloo and no extra flags, as a user would.
Every run uses one thread per process, so the 1- and 2-process runs execute the same kernels on the same shapes.
Runs are made once per module and shared by the tests that read them; the multi-process tests are marked `slow`.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file

from helpers import make_image_folder, make_tiny_clip, torchrun

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "imagenet.py"
WNIDS = (ROOT / "saeft_hf" / "resources" / "imagenet_wnids.txt").read_text().split()[:3]
# Machines with an accelerator compare CPU runs too (the 2-process runs use gloo); without one, no flag is needed.
CPU_FLAGS = ["--use_cpu"] if torch.accelerator.is_available() else []
COMMON = ["--global_batch_size", "8", "--per_device_train_batch_size", "4", "--num_train_epochs", "2",
          "--warmup_steps", "0", "--learning_rate", "1e-3", "--lambda_reg", "70", "--sae_epochs", "5",
          "--sae_k", "4", "--logging_steps", "1", "--report_to", "none", "--seed", "0", *CPU_FLAGS]
STEPS_PER_EPOCH, STEPS = 6, 12  # 48 images, global batch 8, 2 epochs

# torchrun entry point: the unmodified recipe, logging every training image a rank decodes (rank, epoch, key).
SPY = textwrap.dedent("""
    import os, runpy, sys
    import saeft_hf.data as data

    log, original = os.environ["SAEFT_TEST_DECODE_LOG"], data._ExampleTransform.__call__

    def call(self, example, index):
        if getattr(self.transform, "train", False):
            with open(log, "a") as fh:
                fh.write(f"{os.environ['RANK']} {example.get('__key__')}\\n")
        return original(self, example, index)

    data._ExampleTransform.__call__ = call
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")


def write_webdataset_shards(folder: Path, out: Path, num_shards: int) -> list[str]:
    """The class folder as `num_shards` webdataset tars (`<key>.png` + `<key>.cls`), classes spread over the shards."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    items = [(image, label) for label, d in enumerate(classes) for image in sorted(d.iterdir())]
    out.mkdir(parents=True)
    keys = []
    for shard in range(num_shards):
        with tarfile.open(out / f"train-{shard:04d}.tar", "w") as tar:
            for i, (image, label) in enumerate(items[shard::num_shards]):
                key = f"s{shard}_{i:03d}"
                keys.append(key)
                for name, data in ((f"{key}.png", image.read_bytes()), (f"{key}.cls", str(label).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return keys


class Workspace:
    """Data, model and the recipe runs, each made once on first use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.clip = make_tiny_clip(root / "clip")
        make_image_folder(root / "D" / "train", per_class=16, names=WNIDS, seed=0)
        make_image_folder(root / "D" / "val", per_class=2, names=WNIDS, seed=1)
        self.keys = write_webdataset_shards(root / "D" / "train", root / "shards", num_shards=4)
        (root / "classes.txt").write_text("goldfish\ntabby cat\nred fox\n")
        (root / "templates.txt").write_text("a photo of a {}.\n")
        (root / "spy.py").write_text(SPY)
        spec = importlib.util.spec_from_file_location("imagenet_recipe_under_test_scale", RECIPE)
        self.recipe = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = self.recipe  # dataclasses resolve their annotations through sys.modules
        spec.loader.exec_module(self.recipe)
        self.outputs: dict[str, Path] = {}
        self.stderr: dict[str, str] = {}

    def folder_args(self) -> list[str]:
        return ["--model_name_or_path", str(self.clip), "--train_dir", str(self.root / "D" / "train"),
                "--validation_dir", str(self.root / "D" / "val"), "--templates_file", str(self.root / "templates.txt")]

    def stream_args(self) -> list[str]:
        # A relative glob, as users type it (resolved from the working directory; runs start in self.root).
        return ["--model_name_or_path", str(self.clip), "--streaming", "--train_files", "shards/train-*.tar",
                "--num_train_examples", "48", "--classnames_file", "classes.txt", "--templates_file", "templates.txt"]

    def in_process(self, name: str, *argv: str) -> Path:
        """The recipe's main() here, on one thread like each torchrun rank."""
        out = self.root / name
        threads, cwd = torch.get_num_threads(), os.getcwd()
        torch.set_num_threads(1)
        os.chdir(self.root)
        try:
            self.recipe.main([*argv, "--output_dir", str(out)])
        finally:
            torch.set_num_threads(threads)
            os.chdir(cwd)
        self.outputs[name] = out
        return out

    def torchrun(self, name: str, *argv: str) -> Path:
        out = self.root / name
        cmd = [*torchrun(2),
               str(self.root / "spy.py"), str(RECIPE), *argv, "--output_dir", str(out)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT),
               "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               "SAEFT_TEST_DECODE_LOG": str(self.root / f"{name}.decoded")}
        proc = subprocess.run(cmd, cwd=self.root, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        self.outputs[name], self.stderr[name] = out, proc.stderr
        return out

    def run(self, name: str) -> Path:
        if name not in self.outputs:
            if name == "folder-1":
                self.in_process(name, *self.folder_args(), *COMMON, "--save_strategy", "no")
            elif name == "folder-2":
                self.torchrun(name, *self.folder_args(), *COMMON, "--save_strategy", "no")
            elif name == "stream-1":  # checkpoints for the resume test: every 4 steps, so one at step 8 (epoch 2)
                self.in_process(name, *self.stream_args(), *COMMON, "--save_steps", "4")
            elif name == "stream-2-l2sp":
                self.torchrun(name, *self.stream_args(), *COMMON, "--save_strategy", "no", "--regularizer", "l2sp")
            else:
                raise KeyError(name)
        return self.outputs[name]


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("scale"))


def step_logs(out: Path) -> list[dict]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [e for e in state["log_history"] if "loss" in e]


# ---------------------------------------------------------------------------------------------------------------------
# End to end through the recipe
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_run_the_one_process_recipe(ws):
    """Global batch 8 of per-device 4: accumulation 2 on 1 process, 1 on 2; the same 12 steps, losses and weights."""
    one, two = ws.run("folder-1"), ws.run("folder-2")
    assert ("global batch 8 = 4 per device x 2 process(es) x 1 accumulation step(s); 6 optimizer steps per epoch; "
            "12 total steps (2 epochs)") in ws.stderr["folder-2"]
    logs1, logs2 = step_logs(one), step_logs(two)
    assert [e["step"] for e in logs1] == [e["step"] for e in logs2] == list(range(1, STEPS + 1))
    assert [e["epoch"] for e in logs2] == pytest.approx([s / STEPS_PER_EPOCH for s in range(1, STEPS + 1)])
    assert logs1[-1]["penalty"] > 0
    # The same images per step (the 2 ranks' batches are the 1-process micro-batches) and the same kernels: the
    # trajectories agree far inside these bounds (bitwise here); the bounds are the acceptance check.
    for a, b in zip(logs1, logs2):
        for key in ("loss", "ce", "penalty", "grad_norm", "learning_rate"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-7), (a["step"], key)
    for weights, atol in (("model.safetensors", 1e-4), ("sae/model.safetensors", 1e-3)):
        w1, w2 = load_file(one / weights), load_file(two / weights)
        assert w1.keys() == w2.keys()
        for name in w1:
            torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=atol, msg=f"{weights}: {name}")


@pytest.mark.slow
def test_streamed_shards_every_rank_decodes_its_own_and_epochs_are_counted(ws):
    """webdataset tars + num_train_examples: 12 steps, epoch 2.0, each rank reads only its own shards; L2-SP on DDP."""
    one, two = ws.run("stream-1"), ws.run("stream-2-l2sp")
    for out in (one, two):
        logs = step_logs(out)
        assert [e["step"] for e in logs] == list(range(1, STEPS + 1))
        assert [e["epoch"] for e in logs] == pytest.approx([s / STEPS_PER_EPOCH for s in range(1, STEPS + 1)])
        assert logs[-1]["epoch"] == 2.0
    l2sp = step_logs(two)
    assert l2sp[0]["penalty"] == 0 and all(e["penalty"] > 0 for e in l2sp[1:])  # the weights' drift from step 2
    assert "6 optimizer steps per epoch; 12 total steps (2 epochs)" in ws.stderr["stream-2-l2sp"]

    decoded: dict[str, list[str]] = {"0": [], "1": []}
    for line in (ws.root / "stream-2-l2sp.decoded").read_text().splitlines():
        rank, key = line.split()
        decoded[rank].append(key)
    per_rank_epoch = STEPS_PER_EPOCH * 4  # 6 steps x 4 images per rank
    first_pass = {rank: keys[:per_rank_epoch] for rank, keys in decoded.items()}
    # Each rank's first epoch is 24 distinct images of its own 2 shards: disjoint, and together the whole set.
    assert all(len(set(keys)) == per_rank_epoch for keys in first_pass.values())
    assert not set(first_pass["0"]) & set(first_pass["1"])
    assert set(first_pass["0"]) | set(first_pass["1"]) == set(ws.keys)
    assert {k.split("_")[0] for k in first_pass["0"]}.isdisjoint({k.split("_")[0] for k in first_pass["1"]})
    # No rank decodes for the other: 2 epochs of 24, plus at most one look-ahead batch per epoch (accelerate reads
    # one batch ahead to detect the end). Dispatching from rank 0 (accelerate's default for streams) decodes all there.
    for keys in decoded.values():
        assert 2 * per_rank_epoch <= len(keys) <= 2 * (per_rank_epoch + 4)


def test_streaming_resume_past_the_first_pass_continues_the_same_data(ws):
    """Resume at step 8 (in the second pass over the stream) gives the uninterrupted run's losses and weights."""
    full = ws.run("stream-1")
    resumed = ws.root / "stream-1-resumed"
    resumed.mkdir()
    shutil.copytree(full / "sae", resumed / "sae")  # the SAE trained at the start (as after a crash)
    shutil.copytree(full / "checkpoint-8", resumed / "checkpoint-8")
    ws.in_process("stream-1-resumed", *ws.stream_args(), *COMMON, "--save_steps", "4",
                  "--resume_from_checkpoint", str(resumed / "checkpoint-8"))
    assert step_logs(resumed) == step_logs(full)  # every logged value, steps 1..12, epochs included
    w_full, w_resumed = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(w_full[name], w_resumed[name]) for name in w_full)


# ---------------------------------------------------------------------------------------------------------------------
# The pieces, in process
# ---------------------------------------------------------------------------------------------------------------------


def config(tmp_path: Path, **kw):
    from saeft_hf import SAEFTConfig

    base = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, disable_tqdm=True)
    return SAEFTConfig(**{**base, **kw})


def test_global_batch_size_derives_the_accumulation(tmp_path):
    args = config(tmp_path, global_batch_size=512, per_device_train_batch_size=64)
    assert args.gradient_accumulation_steps == 8 and args.world_size == 1
    assert config(tmp_path, global_batch_size=512, per_device_train_batch_size=64,
                  gradient_accumulation_steps=8).gradient_accumulation_steps == 8  # agreeing is fine
    assert config(tmp_path).gradient_accumulation_steps == 1
    with pytest.raises(ValueError, match=r"global_batch_size=512 is not a multiple of .* = 48"):
        config(tmp_path, global_batch_size=512, per_device_train_batch_size=48)
    with pytest.raises(ValueError, match="gradient_accumulation_steps=2 conflicts with global_batch_size=512"):
        config(tmp_path, global_batch_size=512, per_device_train_batch_size=64, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="auto_find_batch_size"):
        config(tmp_path, global_batch_size=512, auto_find_batch_size=True)


def test_stream_epochs_become_steps(tmp_path):
    # ImageNet-1k at 512: floor(1281167 / 512) = 2502 steps per epoch, 10 epochs = the paper's 25,020 steps.
    imagenet = config(tmp_path, global_batch_size=512, per_device_train_batch_size=64, num_train_examples=1281167,
                      num_train_epochs=10)
    assert (imagenet.stream_steps_per_epoch(), imagenet.stream_max_steps()) == (2502, 25020)
    small = config(tmp_path, global_batch_size=8, per_device_train_batch_size=4, num_train_examples=50,
                   num_train_epochs=1.5)
    assert (small.stream_steps_per_epoch(), small.stream_max_steps()) == (6, 9)  # floor: 2 examples left per pass
    assert config(tmp_path, num_train_examples=50, max_steps=4).stream_max_steps() == 4
    with pytest.raises(ValueError, match="smaller than one global batch of 8"):
        config(tmp_path, global_batch_size=8, per_device_train_batch_size=4, num_train_examples=7).stream_max_steps()


def test_recipes_are_defined_by_global_batch_and_epochs():
    import yaml

    for name in ("imagenet_vit_b16.yaml", "imagenet_vit_b16_lora.yaml"):
        cfg = yaml.safe_load((ROOT / "recipes" / "configs" / name).read_text())
        assert (cfg["global_batch_size"], cfg["num_train_epochs"], cfg["num_train_examples"]) == (512, 10, 1281167)
        assert "max_steps" not in cfg and "gradient_accumulation_steps" not in cfg
        assert cfg["ddp_find_unused_parameters"] is False and cfg["dataloader_drop_last"] is True


def test_a_machine_without_accelerator_trains_on_the_cpu(tmp_path):
    from saeft_hf import SAEFTConfig

    args = SAEFTConfig(output_dir=str(tmp_path), report_to="none")
    assert args.ddp_find_unused_parameters is False
    if not torch.accelerator.is_available():
        # What makes `torchrun --nproc_per_node N` on a CPU machine one gloo job rather than N separate runs.
        assert args.use_cpu and args.device.type == "cpu"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from helpers import CLASSNAMES, TEMPLATES
    from saeft_hf.zeroshot import from_clip

    clip = make_tiny_clip(tmp_path_factory.mktemp("tiny") / "clip")
    return from_clip(str(clip), CLASSNAMES, TEMPLATES, progress=False)


def test_l2sp_reads_the_reference_through_a_parallel_wrapper(tiny, tmp_path):
    """DDP/DataParallel prefix parameter names with `module.`; the L2-SP reference is keyed by the model's own."""
    import copy

    from saeft_hf import SAEFTTrainer

    trainer = SAEFTTrainer(model=copy.deepcopy(tiny), args=config(tmp_path, regularizer="l2sp", lambda_reg=1.0))
    with torch.no_grad():
        next(trainer.model.vision_model.parameters()).add_(0.5)  # drift, so the penalty is not 0
    batch = {"pixel_values": torch.randn(2, 3, 30, 30), "labels": torch.tensor([0, 1])}
    wrapped = torch.nn.DataParallel(trainer.model)  # on the CPU: calls the module, names carry `module.`
    assert next(iter(dict(wrapped.named_parameters()))).startswith("module.")
    torch.testing.assert_close(trainer.compute_loss(wrapped, batch), trainer.compute_loss(trainer.model, batch))
    assert trainer._metrics["train"]["penalty"][-1] > 0


def test_a_stream_gets_per_rank_reading_and_needs_a_length(tiny, tmp_path, caplog):
    from saeft_hf import SAEFTTrainer

    stream = datasets.Dataset.from_dict({"image": [b"x"] * 8, "label": [0] * 8}).to_iterable_dataset(num_shards=1)
    with pytest.raises(ValueError, match="set num_train_examples .* or set max_steps"):
        SAEFTTrainer(model=tiny, args=config(tmp_path, regularizer="none"), train_dataset=stream)
    args = config(tmp_path, regularizer="none", num_train_examples=8, per_device_train_batch_size=2,
                  num_train_epochs=3, dataloader_num_workers=2)
    with caplog.at_level(logging.WARNING, logger="saeft_hf.trainer"):
        SAEFTTrainer(model=tiny, args=args, train_dataset=stream)
    assert "1 shard(s) for 1 process(es) x 2 dataloader worker(s)" in caplog.text and "idle" in caplog.text
    assert args.accelerator_config.dispatch_batches is False  # each rank reads its own shards
    assert args.max_steps == 12  # 3 epochs of floor(8 / 2) steps


def test_random_subset_is_seeded_and_not_the_first_rows():
    from saeft_hf.data import random_subset

    ds = datasets.Dataset.from_dict({"i": list(range(100))})
    a, b, c = (random_subset(ds, 10, seed=s)["i"] for s in (0, 0, 1))
    assert list(a) == list(b) != list(c)
    assert list(a) == sorted(a) and len(set(a)) == 10 and list(a) != list(range(10))
    assert random_subset(ds, None, seed=0) is ds and random_subset(ds, 500, seed=0) is ds
    assert len(random_subset(ds, 0, seed=0)) == 0
    stream = ds.to_iterable_dataset(num_shards=10)
    taken = [e["i"] for e in random_subset(stream, 10, seed=0)]
    assert len(taken) == 10 and taken != list(range(10))
    assert taken == [e["i"] for e in random_subset(stream, 10, seed=0)]  # seeded (at a given epoch)


def test_a_local_folder_streams_in_class_mixed_shards(tmp_path):
    from saeft_hf.data import load_image_dataset

    folder = make_image_folder(tmp_path / "train", per_class=6, names=WNIDS)
    stream = load_image_dataset(train_dir=folder, split="train", streaming=True, num_shards=6)
    assert isinstance(stream, datasets.IterableDataset) and stream.num_shards == 6
    rows = list(stream)
    assert sorted(r["image"]["path"] for r in rows) == sorted(str(p) for p in folder.glob("*/*.png"))
    shard_labels = [[r["label"] for r in stream.shard(num_shards=6, index=i)] for i in range(6)]
    assert sum(len(set(labels)) > 1 for labels in shard_labels) >= 3  # not one class per shard
    assert stream.features["label"].names == WNIDS
