"""Faults that must never lose a run: busy, unwritable or occupied output directories, checkpoint saves that are killed
or run out of disk, resumes from incomplete or foreign checkpoints, and a NaN on one process of several.

The recipe runs reuse tests/test_resume.py's forkserver (`Run`), so that each costs a fork, not a fresh interpreter.
"""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file

from helpers import CLASSNAMES, TEMPLATES, make_image_folder, make_tiny_clip, torchrun
from saeft_hf import SAEConfig, SAEFTConfig, SAEFTTrainer, train_sae
from saeft_hf.checkpoints import (
    RUN_INFO_NAME,
    CheckpointSaveError,
    ResumeError,
    checkpoint_problems,
    resolve_resume_checkpoint,
)
from saeft_hf.pipeline import ModelArguments, run_saeft
from saeft_hf.run_dir import (
    LOCK_NAME,
    OutputDirError,
    OutputDirLockedError,
    OutputDirNotEmptyError,
    OutputDirNotWritableError,
    claim_output_dir,
)
from saeft_hf.zeroshot import from_clip
from test_resume import ENV, WNIDS, Run, assert_same_weights, recipe_args, step_logs


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


# ---------------------------------------------------------------------------------------------------------------------
# The output directory
# ---------------------------------------------------------------------------------------------------------------------


def _claim_and_hold(path: str, barrier, results, hold: float) -> None:
    barrier.wait()
    try:
        with claim_output_dir(path):
            results.put(("won", os.getpid()))
            time.sleep(hold)
    except OutputDirLockedError as err:
        results.put(("locked", str(err)))


def test_racing_claims_let_exactly_one_run_proceed(tmp_path):
    """Eight processes claim one directory at the same instant: one wins, seven fail at once naming the winner."""
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(8), ctx.Queue()
    procs = [ctx.Process(target=_claim_and_hold, args=(str(tmp_path / "out"), barrier, results, 1.5)) for _ in range(8)]
    start = time.monotonic()
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(30)
    winners = [pid for kind, pid in outcomes if kind == "won"]
    losers = [msg for kind, msg in outcomes if kind == "locked"]
    assert len(winners) == 1 and len(losers) == 7
    assert all(f"in use by another run (pid {winners[0]} on host" in msg and "another --output_dir" in msg
               for msg in losers), losers[0]
    assert time.monotonic() - start < 1.5 + 10  # the losers did not wait for the winner
    assert not (tmp_path / "out" / LOCK_NAME).exists()  # released (and removed) by the winner


def _claim_then_sleep(path: str, ready) -> None:
    claim_output_dir(path)
    ready.set()
    time.sleep(60)


def test_lock_of_a_killed_run_is_taken_over_and_one_from_another_host_is_not(tmp_path, caplog):
    out = tmp_path / "out"
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    holder = ctx.Process(target=_claim_then_sleep, args=(str(out), ready))
    holder.start()
    assert ready.wait(30)
    with pytest.raises(OutputDirLockedError, match=f"pid {holder.pid} on host"):
        claim_output_dir(out)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(30)
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == holder.pid  # SIGKILL left the file behind
    with caplog.at_level(logging.WARNING, logger="saeft_hf.run_dir"):
        claim_output_dir(out).release()
    assert f"stale lock {out / LOCK_NAME} of a run that is no longer running (pid {holder.pid}" in caplog.text

    (out / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "node-17", "started": "2026-01-01T00:00:00+00:00"}))
    with pytest.raises(OutputDirLockedError, match=r"another host .*node-17.* delete .*\.saeft\.lock"):
        claim_output_dir(out)


def _args(out: Path, **kw) -> SAEFTConfig:
    base = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-3, warmup_steps=0,
                logging_steps=1, use_cpu=True, report_to="none", save_strategy="no", dataloader_num_workers=0, seed=0)
    return SAEFTConfig(**{**base, **kw})


def _run_saeft_nothing_to_load(out: Path, **kw) -> None:
    """run_saeft with a model path that does not exist: any error but the output_dir's would be a load error."""
    train = datasets.Dataset.from_dict({"image": [None], "label": [0]})
    run_saeft(ModelArguments(model_name_or_path=str(out.parent / "no-such-model")), _args(out, **kw),
              train_dataset=train, eval_dataset=None, classnames=CLASSNAMES, templates=TEMPLATES)


def test_unwritable_output_dir_fails_before_anything_is_loaded(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(OutputDirNotWritableError, match=r"Cannot write to output_dir .*a-file/out.*Pick a directory"):
        _run_saeft_nothing_to_load(tmp_path / "a-file" / "out")
    if os.geteuid() != 0:  # root writes through permissions
        (tmp_path / "ro").mkdir(mode=0o555)
        with pytest.raises(OutputDirNotWritableError, match="Permission denied"):
            _run_saeft_nothing_to_load(tmp_path / "ro")


@pytest.mark.parametrize("left", ["eval_results.json", "model.safetensors", "adapter_model.safetensors",
                                  "checkpoint-3"])
def test_another_runs_results_are_refused_unless_overwritten(tmp_path, left):
    out = tmp_path / "out"
    out.mkdir()
    (out / left).mkdir() if left.startswith("checkpoint") else (out / left).write_text("{}")
    (out / "sae").mkdir()  # an SAE (a cache of this run) is not another run's results
    with pytest.raises(OutputDirNotEmptyError, match=f"already holds .*{left}.*--overwrite_output_dir") as info:
        _run_saeft_nothing_to_load(out)
    if left.startswith("checkpoint"):
        assert "unfinished run" in str(info.value) and "--resume_from_checkpoint true" in str(info.value)
    assert (out / left).exists()
    claim_output_dir(out, overwrite=True).release()
    assert not (out / left).exists() and (out / "sae").exists()


def test_resuming_a_finished_run_says_it_is_finished(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("eval_results.json", "model.safetensors", "trainer_state.json"):
        (out / name).write_text("{}")
    (out / "checkpoint-3").mkdir()
    claim_output_dir(out, resume=True).release()  # no card yet: killed between the results and the card
    (out / "README.md").write_text("# run")
    with pytest.raises(OutputDirNotEmptyError, match="holds a finished run .*nothing to resume"):
        _run_saeft_nothing_to_load(out, resume_from_checkpoint="true")
    # Passing the finished run's folder itself as the checkpoint is refused too (no optimizer state in it).
    with pytest.raises(ResumeError, match="is the output directory of a run .*not a checkpoint"):
        resolve_resume_checkpoint(str(out), str(tmp_path / "elsewhere"))


def test_train_sae_recipe_refuses_an_existing_sae_before_loading_anything(tmp_path):
    import runpy

    from saeft_hf.checkpoints import wants_resume

    main = runpy.run_path(str(Path(__file__).resolve().parents[1] / "recipes" / "train_sae.py"))["main"]
    out = tmp_path / "sae"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_text("")
    argv = ["--model_name_or_path", str(tmp_path / "no-such-model"), "--train_dir", str(tmp_path), "--output_dir",
            str(out)]
    with pytest.raises(OutputDirNotEmptyError, match=r"already holds another run's results \(model.safetensors, "
                                                     r"config.json\).*--overwrite_output_dir"):
        main(argv)
    with pytest.raises(Exception) as info:  # with the flag it gets past the directory, to loading the data
        main([*argv, "--overwrite_output_dir"])
    assert not isinstance(info.value, OutputDirError)
    # resume_from_checkpoint from a command line: "false" does not resume
    assert [wants_resume(v) for v in (None, False, "false", "", "true", "out/checkpoint-3", True)] == \
        [False, False, False, False, True, True, True]


def test_a_second_recipe_run_on_a_busy_output_dir_fails_fast_and_the_first_finishes(tmp_path, clip_dir):
    make_image_folder(tmp_path / "train", per_class=8, names=WNIDS, seed=0)
    (tmp_path / "templates.txt").write_text("a photo of a {}.\n")
    out = tmp_path / "shared"
    first = Run(recipe_args(tmp_path, clip_dir, out, "--per_device_train_batch_size", "8", "--save_steps", "2"),
                tmp_path / "first.out")
    deadline = time.monotonic() + 120
    while not (out / LOCK_NAME).is_file():
        assert first.running() and time.monotonic() < deadline, first.output()
        time.sleep(0.02)
    t0 = time.monotonic()
    second = Run(recipe_args(tmp_path, clip_dir, out, "--per_device_train_batch_size", "8"), tmp_path / "second.out")
    second.process.join(120)
    assert second.process.exitcode == 1
    assert time.monotonic() - t0 < 30  # failed at the lock, before loading anything
    assert f"OutputDirLockedError: output_dir '{out}' is in use by another run (pid {first.pid}" in second.output()
    first.finish()
    assert (out / "eval_results.json").is_file() and (out / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------------


def _pixel_dataset(n: int = 16) -> datasets.Dataset:
    gen = torch.Generator().manual_seed(0)
    px, labels = torch.randn(n, 3, 30, 30, generator=gen), torch.randint(0, 4, (n,), generator=gen)
    return datasets.Dataset.from_dict({"pixel_values": px.numpy(), "labels": labels.numpy()}).with_format("torch")


def _model_and_sae(clip_dir):
    model = from_clip(str(clip_dir), CLASSNAMES, TEMPLATES, progress=False)
    with torch.no_grad():
        embeds = model.get_representation(torch.randn(32, 3, 30, 30, generator=torch.Generator().manual_seed(1)))
    sae = train_sae(embeds, SAEConfig(d_in=16, d_sae=64, k=4, source_model=str(clip_dir)), epochs=1, batch_size=8,
                    progress=False, seed=0).sae
    return model, sae


def _trainer(clip_dir, out, eval_dataset=None, **kw) -> SAEFTTrainer:
    model, sae = _model_and_sae(clip_dir)
    kw = {"save_strategy": "steps", "save_steps": 1, **kw}
    return SAEFTTrainer(model=model, sae=sae, train_dataset=_pixel_dataset(), eval_dataset=eval_dataset,
                        args=_args(out, **kw))


def test_checkpoints_are_published_whole_and_rotation_still_works(clip_dir, tmp_path):
    out = tmp_path / "run"
    _trainer(clip_dir, out, max_steps=4, save_total_limit=2).train()
    assert sorted(os.listdir(out)) == ["checkpoint-3", "checkpoint-4"]  # rotated; no staging folder left
    for name in ("checkpoint-3", "checkpoint-4"):
        assert checkpoint_problems(str(out / name)) == []
        info = json.loads((out / name / RUN_INFO_NAME).read_text())
        assert info["regularizer"] == "sae_ft" and info["global_batch_size"] == 4 and info["world_size"] == 1
        assert (out / name / "sae" / "model.safetensors").is_file()


def test_best_model_tracking_sees_published_checkpoints(clip_dir, tmp_path):
    """load_best_model_at_end records (and keeps through rotation) the published path, never the staging one."""
    out = tmp_path / "run"
    trainer = _trainer(clip_dir, out, max_steps=3, eval_strategy="steps", eval_steps=1, save_total_limit=1,
                       load_best_model_at_end=True, metric_for_best_model="eval_loss", per_device_eval_batch_size=8,
                       eval_dataset=_pixel_dataset(8))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and os.path.dirname(best) == str(out) and os.path.isdir(best)
    for path in out.glob("checkpoint-*"):
        state = json.loads((path / "trainer_state.json").read_text())
        assert ".tmp-" not in str(state["best_model_checkpoint"]), state["best_model_checkpoint"]
    assert not list(out.glob(".tmp-*"))


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: "
                 "file write failed"),
], ids=["ENOSPC", "torch-zip-writer"])
def test_disk_full_during_a_save_keeps_the_previous_checkpoint(clip_dir, tmp_path, monkeypatch, failure):
    """The scheduler's torch.save fails at step 2, after the weights and optimizer of checkpoint-2 were written."""
    import transformers.trainer

    out = tmp_path / "run"
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if str(f).endswith(os.path.join("checkpoint-2", "scheduler.pt")):
            with open(f, "wb") as fh:
                fh.write(b"PK\x03\x04 half a zip")  # what a full disk leaves: a truncated file
            raise failure
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(transformers.trainer.torch, "save", save)
    trainer = _trainer(clip_dir, out, max_steps=4)
    with pytest.raises(CheckpointSaveError) as info:
        trainer.train()
    assert str(info.value).startswith("Saving checkpoint-2 failed: the disk is full (")
    assert f"the previous checkpoint {out / 'checkpoint-1'} is intact" in str(info.value)
    assert "--resume_from_checkpoint true" in str(info.value)
    assert sorted(os.listdir(out)) == ["checkpoint-1"]  # no incomplete checkpoint-2, no staging folder
    assert checkpoint_problems(str(out / "checkpoint-1")) == []
    monkeypatch.setattr(transformers.trainer.torch, "save", real_save)
    # ...and the run resumes from it once there is space again.
    resumed = _trainer(clip_dir, out, max_steps=4)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 4 and (out / "checkpoint-4").is_dir()


def test_resume_takes_the_newest_complete_checkpoint_and_refuses_incomplete_ones(clip_dir, tmp_path, caplog):
    out = tmp_path / "run"
    _trainer(clip_dir, out, max_steps=3).train()
    (out / "checkpoint-3" / "scheduler.pt").unlink()  # a save interrupted in place (a plain Trainer's)
    (out / "checkpoint-4").mkdir()
    (out / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4, "log_hist')  # truncated
    with caplog.at_level(logging.WARNING, logger="saeft_hf.checkpoints"):
        assert resolve_resume_checkpoint(True, str(out)) == str(out / "checkpoint-2")
        assert resolve_resume_checkpoint("true", str(out)) == str(out / "checkpoint-2")
    assert f"Not resuming from {out / 'checkpoint-4'}: it is incomplete (trainer_state.json is unreadable" \
        in caplog.text
    assert f"Not resuming from {out / 'checkpoint-3'}: it is incomplete (no scheduler.pt)" in caplog.text

    with pytest.raises(ResumeError, match=r"checkpoint-3 has no scheduler.pt: it was saved without optimizer .* "
                                          r"silently restart .*Resume from .*checkpoint-2"):
        _trainer(clip_dir, out, max_steps=3).train(resume_from_checkpoint=str(out / "checkpoint-3"))
    (out / "checkpoint-2" / "optimizer.pt").unlink()
    with pytest.raises(ResumeError, match=r"checkpoint-2 has no optimizer.pt"):
        resolve_resume_checkpoint(str(out / "checkpoint-2"), str(out))
    shutil.rmtree(out / "checkpoint-1")
    with pytest.raises(ResumeError, match=r"No complete checkpoint to resume from .*checkpoint-4: .*checkpoint-2: no "
                                          r"optimizer.pt.*--overwrite_output_dir"):
        resolve_resume_checkpoint(True, str(out))
    with pytest.raises(ResumeError, match="does not exist"):
        resolve_resume_checkpoint(str(out / "checkpoint-9"), str(out))


def test_resuming_from_the_last_checkpoint_trains_no_extra_step(clip_dir, tmp_path):
    """Killed after its last checkpoint, before its final outputs: the resumed run must not step past max_steps."""
    out = tmp_path / "run"
    _trainer(clip_dir, out, max_steps=2).train()
    resumed = _trainer(clip_dir, out, max_steps=2)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 2
    assert [e["step"] for e in resumed.state.log_history if "loss" in e] == [1, 2]
    saved = load_file(out / "checkpoint-2" / "model.safetensors")
    assert all(torch.equal(saved[n], t.cpu()) for n, t in resumed.model.state_dict().items() if n in saved)


@pytest.mark.parametrize("change", [
    {"lambda_reg": 5.0}, {"regularizer": "l2sp"}, {"per_device_train_batch_size": 8},
    {"gradient_accumulation_steps": 2},
], ids=lambda c: next(iter(c)))
def test_resume_refuses_a_checkpoint_of_another_run(clip_dir, tmp_path, change):
    out = tmp_path / "run"
    _trainer(clip_dir, out, max_steps=1).train()
    other = _trainer(clip_dir, out, max_steps=2, **change)
    with pytest.raises(ResumeError, match=r"belongs to a run with other settings") as info:
        other.train(resume_from_checkpoint=True)
    key = next(iter(change))
    label = "global batch" if key in ("per_device_train_batch_size", "gradient_accumulation_steps") else key
    assert label in str(info.value)
    assert other.state.global_step == 0  # refused before any step


def test_sae_folder_and_result_files_are_replaced_whole(clip_dir, tmp_path, monkeypatch):
    """A failure while `sae/`, eval_results.json or the card is rewritten leaves the previous version as it was."""
    from saeft_hf import hub
    from saeft_hf.atomic import write_dir_atomic

    _, sae = _model_and_sae(clip_dir)
    sae_dir = tmp_path / "sae"
    write_dir_atomic(sae_dir, sae.save_pretrained)
    before = {p.name: p.read_bytes() for p in sae_dir.iterdir()}

    def dies_midway(tmp: Path) -> None:
        sae.save_pretrained(tmp)
        (tmp / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_dir_atomic(sae_dir, dies_midway)
    assert {p.name: p.read_bytes() for p in sae_dir.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["sae"]  # no temporary folder left

    hub.save_results(tmp_path / "eval_results.json", {"final": {"validation": 0.5}})
    card = hub.write_model_card(tmp_path, model_name="run", base_model="clip", results={"validation": 0.5})
    saved = card.read_text(), (tmp_path / "eval_results.json").read_text()

    import builtins

    real_open = builtins.open

    def open_on_full_disk(file, mode="r", *args, **kwargs):
        if "w" in mode and os.path.basename(str(file)).startswith(".tmp-"):
            fh = real_open(file, mode, *args, **kwargs)
            fh.write("{ half")
            fh.close()
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_on_full_disk)
    with pytest.raises(OSError, match="No space left"):
        hub.save_results(tmp_path / "eval_results.json", {"final": {"validation": 0.9}})
    with pytest.raises(OSError, match="No space left"):
        hub.write_model_card(tmp_path, model_name="run", base_model="clip", results={"validation": 0.9})
    monkeypatch.undo()
    assert (card.read_text(), (tmp_path / "eval_results.json").read_text()) == saved
    assert sorted(os.listdir(tmp_path)) == ["README.md", "eval_results.json", "sae"]


# ---------------------------------------------------------------------------------------------------------------------
# SIGKILL anywhere: the newest complete checkpoint always resumes to the uninterrupted run's weights
# ---------------------------------------------------------------------------------------------------------------------

# Blocks inside the save of checkpoint-SAEFT_TEST_STALL_SAVE (after its weights, optimizer and scheduler are written,
# before the RNG and trainer states) so that a kill is sure to land in the middle of a checkpoint write.
STALL_IN_SAVE = textwrap.dedent("""
    import os, runpy, sys, time
    from transformers import Trainer

    step, marker = int(os.environ["SAEFT_TEST_STALL_SAVE"]), os.environ["SAEFT_TEST_STALL_MARKER"]
    original = Trainer._save_rng_state

    def _save_rng_state(self, output_dir):
        if self.state.global_step == step:
            open(marker, "w").close()
            time.sleep(600)
        return original(self, output_dir)

    Trainer._save_rng_state = _save_rng_state
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")


def _all_checkpoints_complete(out: Path) -> None:
    for path in out.glob("checkpoint-*"):
        assert checkpoint_problems(str(path)) == [], (path, checkpoint_problems(str(path)))


def test_sigkill_at_random_points_always_resumes_to_the_same_weights(tmp_path, clip_dir):
    make_image_folder(tmp_path / "train", per_class=8, names=WNIDS, seed=0)
    (tmp_path / "templates.txt").write_text("a photo of a {}.\n")
    (tmp_path / "stall.py").write_text(STALL_IN_SAVE)
    extra = ["--per_device_train_batch_size", "8"]
    ref_out, out = tmp_path / "uninterrupted", tmp_path / "killed"

    def args(resume: bool) -> list[str]:
        return recipe_args(tmp_path, clip_dir, out, *extra, "--save_steps", "1",
                           *(["--resume_from_checkpoint", "true"] if resume else []))

    def resumable() -> bool:  # what a user does after a kill: resume if a checkpoint exists, else start again
        return any(checkpoint_problems(str(p)) == [] for p in out.glob("checkpoint-*"))

    # 1. Killed while checkpoint-3 is half written: checkpoint-3 must not exist, checkpoint-2 must be complete.
    marker = tmp_path / "stalled"
    run = Run([str(tmp_path / "stall.py"), *args(False)], tmp_path / "stall.out", SAEFT_TEST_STALL_SAVE="3",
              SAEFT_TEST_STALL_MARKER=str(marker))
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert run.running() and time.monotonic() < deadline, run.output()
        time.sleep(0.02)
    os.kill(run.pid, signal.SIGKILL)
    run.process.join(30)
    assert (out / ".tmp-checkpoint-3" / "checkpoint-3" / "scheduler.pt").is_file()  # it was mid-write
    assert not (out / "checkpoint-3").exists() and checkpoint_problems(str(out / "checkpoint-2")) == []

    # The uninterrupted reference, timed now that the forkserver is warm: the window the kills are drawn from.
    t0 = time.monotonic()
    Run(recipe_args(tmp_path, clip_dir, ref_out, *extra, "--save_strategy", "no"), tmp_path / "ref.out").finish()
    duration = time.monotonic() - t0

    def steps_seen() -> int:  # the newest step with a checkpoint, complete or being written
        return max((int(p.name.rsplit("-", 1)[1]) for p in out.glob("*checkpoint-*")), default=0)

    # 2. Then killed at random instants (seeded, so a failure replays), resuming after each kill: on even attempts
    # anywhere in the run (set-up included), on odd ones within the first ~0.5 s after training got going again.
    rng = random.Random(14)
    kills = []
    for attempt in range(6):
        if (out / "README.md").is_file():  # the last kill came after the run had finished
            break
        before = steps_seen()
        run = Run(args(resumable()), tmp_path / f"attempt{attempt}.out")
        if attempt % 2:
            while steps_seen() == before and run.running():
                time.sleep(0.005)
            delay = rng.uniform(0.0, 0.5)
        else:
            delay = rng.uniform(0.0, duration)
        run.process.join(delay)
        if not run.running():
            assert run.process.exitcode == 0, run.output()
            break
        os.kill(run.pid, signal.SIGKILL)
        run.process.join(30)
        kills.append(f"attempt {attempt}: +{delay:.2f} s, at step {steps_seen()}")
        _all_checkpoints_complete(out)  # a kill never leaves a checkpoint-N that is not whole
    if not (out / "README.md").is_file():
        Run(args(resumable()), tmp_path / "last.out").finish()
    _all_checkpoints_complete(out)
    assert not list(out.glob(".tmp-*")) and not list(out.glob(".old-*"))
    assert_same_weights(ref_out / "model.safetensors", out / "model.safetensors")
    assert step_logs(out) == step_logs(ref_out), f"kills: {kills}"
    print(f"uninterrupted run {duration:.1f} s; kills: {kills}")


# ---------------------------------------------------------------------------------------------------------------------
# Several processes: one verdict for all
# ---------------------------------------------------------------------------------------------------------------------

DDP_SCRIPT = textwrap.dedent("""
    import math, os, sys
    import datasets, torch
    from saeft_hf import SAEConfig, SAEFTConfig, SAEFTTrainer, train_sae
    from saeft_hf.run_dir import OutputDirError, claimed_output_dir
    from saeft_hf.zeroshot import from_clip

    clip, work = sys.argv[1], sys.argv[2]
    rank = int(os.environ["RANK"])

    def report(name, text):
        with open(os.path.join(work, f"{name}.rank{rank}"), "w") as fh:
            fh.write(text)

    def args(out, **kw):
        return SAEFTConfig(output_dir=os.path.join(work, out), per_device_train_batch_size=4, learning_rate=1e-3,
                           warmup_steps=0, use_cpu=True, report_to="none", ddp_backend="gloo", seed=0,
                           dataloader_num_workers=0, **kw)

    # 1. An output_dir holding another run's results: every process fails the same way, before anything is built.
    try:
        with claimed_output_dir(args("busy")):
            report("claim", "proceeded")
    except OutputDirError as err:
        report("claim", f"{type(err).__name__}: {err}")

    class NaNOnProcess1(SAEFTTrainer):
        def compute_loss(self, model, inputs, *a, **kw):
            if rank == 1 and self.state.global_step == 1:
                inputs = {**inputs, "pixel_values": inputs["pixel_values"] * math.nan}
            return super().compute_loss(model, inputs, *a, **kw)

    gen = torch.Generator().manual_seed(0)
    px, labels = torch.randn(32, 3, 30, 30, generator=gen), torch.randint(0, 4, (32,), generator=gen)
    data = datasets.Dataset.from_dict({"pixel_values": px.numpy(), "labels": labels.numpy()}).with_format("torch")
    model = from_clip(clip, ["goldfish", "tabby cat", "red fox", "school bus"], ["a photo of a {}."], progress=False)
    with torch.no_grad():
        embeds = model.get_representation(px)
    sae = train_sae(embeds, SAEConfig(d_in=16, d_sae=64, k=4, source_model=clip), epochs=1, batch_size=8,
                    progress=False, seed=0).sae

    # 2. Checkpoints written by two processes (each its RNG state) are published whole, and rotated.
    from saeft_hf.checkpoints import checkpoint_problems
    import copy
    SAEFTTrainer(model=copy.deepcopy(model), sae=sae, train_dataset=data,
                 args=args("ckpt", max_steps=3, save_steps=1, save_total_limit=2)).train()
    if rank == 0:
        out = os.path.join(work, "ckpt")
        report("ckpt", repr({n: checkpoint_problems(os.path.join(out, n)) for n in sorted(os.listdir(out))
                             if n.startswith(("checkpoint-", ".tmp-"))}))

    # 3. A NaN loss on process 1 only, at step 2 (a logging step): both processes stop there with the same error.
    trainer = NaNOnProcess1(model=model, sae=sae, train_dataset=data,
                            args=args("nan", max_steps=4, logging_steps=2, save_strategy="no"))
    try:
        trainer.train()
        report("nan", "finished")
    except FloatingPointError as err:
        report("nan", str(err))
        raise
""")


def test_two_processes_fail_together_on_a_busy_dir_and_on_a_nan_of_one(tmp_path, clip_dir):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "eval_results.json").write_text("{}")
    (tmp_path / "ddp.py").write_text(DDP_SCRIPT)
    cmd = [*torchrun(2),
           str(tmp_path / "ddp.py"), str(clip_dir), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=240)  # a hang fails here
    assert proc.returncode != 0

    claims = [(tmp_path / f"claim.rank{r}").read_text() for r in (0, 1)]
    assert claims[0] == claims[1] and claims[0].startswith("OutputDirNotEmptyError: output_dir ")
    assert "already holds another run's results (eval_results.json)" in claims[0]

    assert (tmp_path / "ckpt.rank0").read_text() == "{'checkpoint-2': [], 'checkpoint-3': []}"
    assert {p.name for p in (tmp_path / "ckpt" / "checkpoint-3").glob("rng_state*")} == {"rng_state_0.pth",
                                                                                       "rng_state_1.pth"}

    errors = [(tmp_path / f"nan.rank{r}").read_text() for r in (0, 1)]
    assert errors[0] == errors[1], errors  # the same step, the same message, on both
    assert errors[0].startswith("The training loss became NaN or inf on 1 of 2 processes at or before step 2;")
