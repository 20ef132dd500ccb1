"""Exact resume and multi-process equivalence of the real recipe (recipes/imagenet.py), in subprocesses.

For full SAE-FT, LoRA SAE-FT and a streaming dataset: an uninterrupted run to N steps, and a run that checkpoints every
k steps and is SIGKILLed after checkpoint-k exists (while it is already training past it), then resumed with
`--resume_from_checkpoint`. The resumed run must end with bit-identical weights and the same logged losses, reuse the
SAE trained at the start, and get the frozen reference back as it was (any other reference or SAE would change the
penalty and so the losses).

The kill is a real SIGKILL sent from this process. Training steps on the tiny model take milliseconds, so a poll for
`checkpoint-k` would race the end of the run: the child (the unmodified recipe run through `runpy`, with one hook)
therefore blocks at the start of step k+2, after step k+1's work, which is lost with the kill.

Speed: a fresh interpreter spends ~5 s importing torch, transformers, datasets and peft, and these tests need nine
single-process runs. They are therefore separate processes forked from a multiprocessing forkserver that imported
those libraries once; each child starts from the same clean state, runs the recipe's `__main__` and exits (or is
killed). The multi-process run uses torchrun, as users do.

A 2-process gloo run (4 images per rank) must follow the loss trajectory of the 1-process run (8 images), and only
rank 0 may write the SAE, results and card.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import make_image_folder, make_tiny_clip, torchrun

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "imagenet.py"
WNIDS = (ROOT / "saeft_hf" / "resources" / "imagenet_wnids.txt").read_text().split()[:4]
N_STEPS, SAVE_EVERY, STALL_AT = 6, 3, 4  # killed after step 4 (checkpoint-3 exists, step 4 is lost)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}

# Runs the recipe unmodified, with two hooks: it logs which rank calls the library's writers and the SAE training
# (to SAEFT_TEST_CALLS_LOG), and with SAEFT_TEST_STALL_AT it blocks once `global_step` reaches that step.
SPY = textwrap.dedent("""
    import os, runpy, sys, time
    import saeft_hf.pipeline as pipeline
    from saeft_hf.sae import SparseAutoencoder
    from saeft_hf.trainer import SAEFTTrainer

    log = os.environ["SAEFT_TEST_CALLS_LOG"]

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            with open(log, "a") as fh:
                fh.write(f"{os.environ.get('RANK', '0')} {name}\\n")
            return fn(*args, **kwargs)
        return wrapped

    SparseAutoencoder.save_pretrained = spy("sae.save_pretrained", SparseAutoencoder.save_pretrained)
    for name in ("train_sae_for_model", "save_results", "write_model_card", "save_base_config"):
        setattr(pipeline, name, spy(name, getattr(pipeline, name)))

    if os.environ.get("SAEFT_TEST_STALL_AT"):
        stall_at, marker = int(os.environ["SAEFT_TEST_STALL_AT"]), os.environ["SAEFT_TEST_STALL_MARKER"]
        original = SAEFTTrainer.training_step

        def training_step(self, *args, **kwargs):
            if self.state.global_step >= stall_at:
                open(marker, "w").close()
                time.sleep(600)
            return original(self, *args, **kwargs)

        SAEFTTrainer.training_step = training_step
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")


VARIANTS = {
    # 2 micro-batches of 4 per step: the batch shapes of each rank of the 2-process run below, so that both run the
    # same kernels on the same shapes (CPU kernels round differently for other batch shapes, and Adam's first,
    # sign-like step turns such float-level differences near a zero gradient into ~lr weight differences).
    "full": ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"],
    "lora": ["--per_device_train_batch_size", "8", "--use_lora", "--lora_r", "4", "--lora_alpha", "8"],
    # 32 images in batches of 4: the 6 steps stay inside one pass over the stream.
    "streaming": ["--per_device_train_batch_size", "4", "--streaming"],
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    clip = make_tiny_clip(tmp / "clip")
    make_image_folder(tmp / "train", per_class=8, names=WNIDS, seed=0)
    (tmp / "templates.txt").write_text("a photo of a {}.\n")
    (tmp / "spy.py").write_text(SPY)
    return tmp, clip


def recipe_args(tmp: Path, clip: Path, out: Path, *extra: str) -> list[str]:
    return [
        str(RECIPE), "--model_name_or_path", str(clip), "--train_dir", str(tmp / "train"),
        "--templates_file", str(tmp / "templates.txt"), "--output_dir", str(out), "--max_steps", str(N_STEPS),
        "--learning_rate", "1e-3", "--warmup_steps", "0", "--logging_steps", "1", "--use_cpu", "--report_to", "none",
        "--sae_epochs", "2", "--sae_batch_size", "8", "--sae_k", "4", "--embedding_batch_size", "16",
        "--dataloader_num_workers", "0", "--seed", "7", *extra,
    ]


_FORKSERVER_PRELOAD = ["torch", "transformers", "datasets", "peft", "saeft_hf.pipeline", "saeft_hf.evaluation",
                       "saeft_hf.imagenet_classes"]


def _child(argv: list[str], env: dict[str, str], log: str) -> None:
    """Runs in the forked process: output to `log`, then `argv[0]` as `__main__` with `sys.argv = argv`."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(env)
    torch.set_num_threads(1)
    sys.argv = list(argv)
    runpy.run_path(argv[0], run_name="__main__")


class Run:
    """A recipe run in a process forked from the forkserver (`argv[0]` is the script: the recipe or the spy)."""

    def __init__(self, argv: list[str], log: Path, **env: str) -> None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(_FORKSERVER_PRELOAD)  # no effect once the server runs
        self.log = log
        self.process = ctx.Process(target=_child, args=(argv, {**ENV, **env}, str(log)), daemon=True)
        self.process.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.exitcode is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.is_file() else ""

    def finish(self, timeout: float = 300) -> None:
        self.process.join(timeout)
        assert self.process.exitcode == 0, f"exit code {self.process.exitcode}:\n{self.output()}"


def start(cmd: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**ENV, **env})


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]
    return err


def calls(log: Path) -> dict[str, set[str]]:
    """{function name: ranks that called it} from a SPY log."""
    out: dict[str, set[str]] = {}
    for line in log.read_text().splitlines() if log.is_file() else []:
        rank, name = line.split()
        out.setdefault(name, set()).add(rank)
    return out


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def step_logs(out: Path) -> list[dict]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [e for e in state["log_history"] if "loss" in e]  # per-step entries (not the train_loss summary)


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys()
    different = [name for name in wa if not torch.equal(wa[name], wb[name])]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:5]}"


_reference_runs: dict[str, Path] = {}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sigkill_then_resume_is_bit_identical(workspace, variant):
    tmp, clip = workspace
    extra = VARIANTS[variant]
    ref_out, out = tmp / f"{variant}-uninterrupted", tmp / f"{variant}-killed"
    marker, killed_log, resumed_log = (tmp / f"{variant}.{n}" for n in ("stalled", "killed.log", "resumed.log"))
    spy = str(tmp / "spy.py")

    # The uninterrupted reference (never checkpoints) and the run to kill, side by side (one core each).
    ref = Run(recipe_args(tmp, clip, ref_out, *extra, "--save_strategy", "no"), tmp / f"{variant}-ref.out")
    victim = Run([spy, *recipe_args(tmp, clip, out, *extra, "--save_steps", str(SAVE_EVERY))],
                 tmp / f"{variant}-killed.out", SAEFT_TEST_CALLS_LOG=str(killed_log),
                 SAEFT_TEST_STALL_AT=str(STALL_AT), SAEFT_TEST_STALL_MARKER=str(marker))
    checkpoint = out / f"checkpoint-{SAVE_EVERY}"
    deadline = time.monotonic() + 300
    try:
        while not ((checkpoint / "trainer_state.json").is_file() and marker.is_file()):
            assert victim.running(), f"the run ended before it could be killed:\n{victim.output()}"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
    finally:  # also when the wait fails: never leave a stalled child behind
        if victim.running():
            os.kill(victim.pid, signal.SIGKILL)
        victim.process.join(60)
    assert victim.process.exitcode == -signal.SIGKILL
    ref.finish()
    _reference_runs[variant] = ref_out
    weights = "adapter_model.safetensors" if variant == "lora" else "model.safetensors"
    assert not (out / weights).exists() and not (out / f"checkpoint-{N_STEPS}").exists()  # really died mid-run
    assert "train_sae_for_model" in calls(killed_log)
    sae_hash = sha(out / "sae" / "model.safetensors")

    Run([spy, *recipe_args(tmp, clip, out, *extra, "--save_steps", str(SAVE_EVERY),
                           "--resume_from_checkpoint", str(checkpoint))],
        tmp / f"{variant}-resumed.out", SAEFT_TEST_CALLS_LOG=str(resumed_log)).finish()

    # The SAE trained before the kill was reused, not retrained.
    assert "train_sae_for_model" not in calls(resumed_log)
    assert sha(out / "sae" / "model.safetensors") == sae_hash == sha(ref_out / "sae" / "model.safetensors")
    # Bit-identical final weights and identical per-step logs (loss, every penalty term, grad norm, lr, epoch).
    assert_same_weights(ref_out / weights, out / weights)
    ref_logs, logs = step_logs(ref_out), step_logs(out)
    assert [e["step"] for e in logs] == list(range(1, N_STEPS + 1))
    assert logs == ref_logs


def test_two_processes_follow_the_one_process_loss_trajectory(workspace):
    """torchrun, 2 gloo ranks x 4 images == 1 process x 2 micro-batches of 4; only rank 0 writes the SAE, results and
    card."""
    tmp, clip = workspace
    ref_out = _reference_runs.get("full")
    if ref_out is None:  # run alone (-k): make the 1-process reference here
        ref_out = tmp / "full-uninterrupted"
        Run(recipe_args(tmp, clip, ref_out, *VARIANTS["full"], "--save_strategy", "no"), tmp / "full-ref.out").finish()
    out, log = tmp / "ddp", tmp / "ddp.log"
    cmd = [*torchrun(2),
           str(tmp / "spy.py"), *recipe_args(tmp, clip, out, "--per_device_train_batch_size", "4",
                                             "--save_strategy", "no", "--ddp_backend", "gloo")]
    finish(start(cmd, SAEFT_TEST_CALLS_LOG=str(log)))

    # Only rank 0 trains and saves the SAE (the other rank loads it) and writes the results and the card.
    assert calls(log) == {"train_sae_for_model": {"0"}, "sae.save_pretrained": {"0"}, "save_results": {"0"},
                          "write_model_card": {"0"}}, calls(log)
    # Rank 0 trained the same SAE as the single process.
    assert sha(out / "sae" / "model.safetensors") == sha(ref_out / "sae" / "model.safetensors")

    ref_logs, logs = step_logs(ref_out), step_logs(out)
    assert len(logs) == len(ref_logs) == N_STEPS
    for ref_entry, entry in zip(ref_logs, logs):
        for key in ("loss", "ce", "penalty", "add", "remove", "residual", "grad_norm", "learning_rate"):
            assert entry[key] == pytest.approx(ref_entry[key], rel=1e-4, abs=1e-6), (entry["step"], key)
    # Weights: Adam (lr 1e-3) turns float-level gradient differences near zero into up to ~lr per step.
    ref_w, w = load_file(ref_out / "model.safetensors"), load_file(out / "model.safetensors")
    for name in ref_w:
        torch.testing.assert_close(w[name], ref_w[name], rtol=1e-3, atol=2e-4)


# ---------------------------------------------------------------------------------------------------------------------
# The pieces that make it exact, in process
# ---------------------------------------------------------------------------------------------------------------------


def test_per_image_crops_depend_only_on_seed_epoch_and_image():
    import numpy as np
    from PIL import Image
    from transformers import TrainerState

    from saeft_hf.data import CLIPImageTransform
    from saeft_hf.trainer import SetEpochCallback

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(4)]

    def crops(seed, epoch, order):
        tf = CLIPImageTransform(16, (0.0,) * 3, (1.0,) * 3, train=True, seed=seed, scale=(0.3, 1.0))
        tf.set_epoch(epoch)
        return {i: tf(images[i]) for i in order}

    a = crops(0, 0, [0, 1, 2, 3])
    b = crops(0, 0, [3, 1, 0, 2, 2])  # another order (another rank's share, a resumed run): the same crops
    assert all(torch.equal(a[i], b[i]) for i in range(4))
    assert not any(torch.equal(a[i], crops(0, 1, [i])[i]) for i in range(4))  # a fresh crop each epoch
    assert not any(torch.equal(a[i], crops(1, 0, [i])[i]) for i in range(4))  # and per seed

    # The callback numbers epochs like the Trainer's loop, also when resuming mid-epoch.
    tf = CLIPImageTransform(16, (0.0,) * 3, (1.0,) * 3, train=True, seed=0)
    callback, state = SetEpochCallback(tf, object()), TrainerState(epoch=2.75)
    callback.on_train_begin(None, state, None)
    seen = []
    for _ in range(3):
        callback.on_epoch_begin(None, state, None)
        seen.append(tf.epoch)
        state.epoch = 2.9  # a streaming epoch that ended early must not hold the count back
    assert seen == [2, 3, 4]
