"""Checkpoints that are complete or absent: completeness checks, leftovers of killed saves, choosing what to resume.

The Trainer writes `checkpoint-N` file by file in place, so a run killed (or out of disk) mid-save leaves a folder that
looks like a checkpoint but lacks `trainer_state.json`, `scheduler.pt` or `rng_state.pth`. `SAEFTTrainer` instead
writes each checkpoint into `.tmp-checkpoint-N/checkpoint-N`, syncs it to disk and renames it to `checkpoint-N`
only when it is complete (`saeft_hf.atomic.publish_dir`); a killed save leaves only the hidden `.tmp-*` folder,
which nothing reads and the next run removes. `checkpoint_problems` tells a complete checkpoint from an incomplete
one (also for checkpoints written by plain Trainers), and `resolve_resume_checkpoint` turns `resume_from_checkpoint`
into the checkpoint to load: the newest complete one for `True`, saying which incomplete ones it skipped.

Each checkpoint also records what it was trained with (`saeft_checkpoint.json`: model, representation, regulariser,
SAE, global batch, ...), so that resuming a run with other settings is refused instead of silently mixing two runs.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from typing import Any

from .atomic import RETIRED_PREFIX, STAGING_PREFIX

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
RUN_INFO_NAME = "saeft_checkpoint.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors", "pytorch_model.bin",
                "pytorch_model.bin.index.json", "adapter_model.bin")
# Settings a resumed run must share with its checkpoint: any difference would make it another run.
MUST_MATCH = {
    "model": "the pre-trained model (--model_name_or_path)",
    "representation": "the representation (--representation)",
    "num_labels": "the number of classes",
    "lora": "LoRA (--use_lora and its settings)",
    "regularizer": "the regulariser (--regularizer)",
    "lambda_reg": "--lambda_reg", "lambda_add": "--lambda_add", "lambda_remove": "--lambda_remove", "mu": "--mu",
    "sae_normalize": "--sae_normalize",
    "sae": "the SAE (its weights)",
    "global_batch_size": "the global batch (per-device batch x processes x gradient accumulation)",
}


class ResumeError(ValueError):
    """The checkpoint to resume from is missing, incomplete, or from another run."""


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed; the previous checkpoints are intact."""


def list_checkpoints(folder: str) -> list[tuple[int, str]]:
    """`[(step, path)]` of the `checkpoint-N` folders in `folder`, oldest first."""
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        match = CHECKPOINT_RE.match(name)
        if match and os.path.isdir(os.path.join(folder, name)):
            found.append((int(match.group(1)), os.path.join(folder, name)))
    return sorted(found)


def _json_or_none(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def read_run_info(checkpoint: str) -> dict[str, Any] | None:
    """The settings `SAEFTTrainer` recorded in `checkpoint` (None for checkpoints of other trainers)."""
    info = _json_or_none(os.path.join(checkpoint, RUN_INFO_NAME))
    return info if isinstance(info, dict) else None


def checkpoint_problems(checkpoint: str) -> list[str]:
    """What `checkpoint` lacks to be resumed exactly: [] when it is complete.

    Complete means: a readable `trainer_state.json`, the model (or adapter) weights, the optimizer and scheduler
    states, and one RNG state per process. Without the optimizer and scheduler a resume would silently restart
    Adam's moments and the learning-rate schedule, so their absence is a problem too.
    """
    if not os.path.isdir(checkpoint):
        return ["it does not exist"]
    names = set(os.listdir(checkpoint))
    problems = []
    if "trainer_state.json" not in names:
        problems.append("no trainer_state.json")
    elif not isinstance(_json_or_none(os.path.join(checkpoint, "trainer_state.json")), dict):
        problems.append("trainer_state.json is unreadable (truncated?)")
    if not names.intersection(WEIGHT_FILES):
        problems.append("no model weights")
    for state in ("optimizer.pt", "scheduler.pt"):
        if state not in names and not (state == "optimizer.pt" and "optimizer.bin" in names):
            problems.append(f"no {state}")
    info = read_run_info(checkpoint)
    world = info.get("world_size") if info else None
    if isinstance(world, int) and world > 1:
        missing = [f"rng_state_{i}.pth" for i in range(world) if f"rng_state_{i}.pth" not in names]
        if missing:
            problems.append(f"no {', '.join(missing)}")
    elif not any(n.startswith("rng_state") and n.endswith(".pth") for n in names):
        problems.append("no rng_state.pth")
    return problems


def _describe_incomplete(checkpoint: str, problems: list[str]) -> str:
    names = set(os.listdir(checkpoint)) if os.path.isdir(checkpoint) else set()
    if "eval_results.json" in names or (not CHECKPOINT_RE.match(os.path.basename(os.path.normpath(checkpoint)))
                                        and names.intersection(WEIGHT_FILES)):
        return (f"{checkpoint} is the output directory of a run (its final model), not a checkpoint: it has no "
                "optimizer or scheduler state to resume. Pass one of its checkpoint-N folders")
    states = ("no optimizer.pt", "no scheduler.pt")
    others = [p for p in problems if p not in states and not p.startswith("no rng_state")]
    if not others and ("no optimizer.pt" in problems or "no scheduler.pt" in problems):
        return (f"{checkpoint} has {', '.join(problems)}: it was saved without optimizer and scheduler state "
                "(save_only_model=True?) or its save was interrupted; resuming from it would silently restart the "
                "optimizer and the learning-rate schedule")
    return f"{checkpoint} is incomplete ({', '.join(problems)}): its save was interrupted"


def newest_complete_checkpoint(folder: str) -> tuple[str | None, dict[str, list[str]]]:
    """The newest complete `checkpoint-N` in `folder` (or None), and `{path: problems}` of newer incomplete ones."""
    skipped: dict[str, list[str]] = {}
    for _, path in reversed(list_checkpoints(folder)):
        problems = checkpoint_problems(path)
        if not problems:
            return path, skipped
        skipped[path] = problems
    return None, skipped


def wants_resume(resume: str | bool | None) -> bool:
    """Whether a `resume_from_checkpoint` value asks to resume ("false"/"no"/"" from a command line do not)."""
    if isinstance(resume, str):
        return resume.strip().lower() not in ("false", "no", "none", "")
    return bool(resume)


def resolve_resume_checkpoint(resume: str | bool | None, output_dir: str) -> str | None:
    """The checkpoint to resume from, checked complete; None to start fresh.

    `resume`: None/False (start fresh), True or "true"/"last" (the newest complete checkpoint of `output_dir`, logging
    the incomplete ones it skips), or a checkpoint path. Raises `ResumeError` naming the problem and the fix.
    """
    if not wants_resume(resume):
        return None
    if resume is True or (isinstance(resume, str) and resume.strip().lower() in ("true", "yes", "last", "latest")):
        path, skipped = newest_complete_checkpoint(output_dir)
        for bad, problems in skipped.items():
            logger.warning("Not resuming from %s: it is incomplete (%s), its save was interrupted.", bad,
                           ", ".join(problems))
        if path is None:
            found = "; ".join(f"{os.path.basename(p)}: {', '.join(v)}" for p, v in skipped.items())
            raise ResumeError(
                f"No complete checkpoint to resume from in {output_dir!r}"
                + (f" (incomplete: {found})" if found else " (it has no checkpoint-N folder)")
                + ". Start the run over with --overwrite_output_dir (and without --resume_from_checkpoint), or pass "
                "the path of a complete checkpoint."
            )
        logger.info("Resuming from %s, the newest complete checkpoint in %s.", path, output_dir)
        return path
    path = os.fspath(resume)
    problems = checkpoint_problems(path)
    if problems:
        if problems == ["it does not exist"]:
            raise ResumeError(f"resume_from_checkpoint {path!r} does not exist. Pass a checkpoint-N folder, or "
                              "`true` for the newest complete checkpoint of output_dir.")
        alternative, _ = newest_complete_checkpoint(os.path.dirname(os.path.normpath(path)))
        hint = (f"Resume from {alternative}, the newest complete checkpoint next to it, " if alternative
                else "Resume from a complete checkpoint ")
        raise ResumeError(f"{_describe_incomplete(path, problems)}. {hint}or start over.")
    return path


def check_run_matches(checkpoint: str, current: Mapping[str, Any]) -> None:
    """Refuse to resume `checkpoint` under settings (`current`, see `SAEFTTrainer.run_info`) that differ from its own.

    A difference in the number of processes alone (same global batch) is allowed with a warning: the steps mean the
    same, but the data order and the per-process random streams differ from the uninterrupted run's.
    """
    saved = read_run_info(checkpoint)
    if saved is None:
        logger.warning("%s records no saeft-hf run settings (an older or a plain Trainer checkpoint): cannot check "
                       "that it belongs to this run's model, regulariser and batch.", checkpoint)
        return
    differences = [
        f"{label}: checkpoint {saved.get(key)!r}, this run {current.get(key)!r}"
        for key, label in MUST_MATCH.items()
        if key in saved and saved.get(key) != current.get(key)
    ]
    if differences:
        raise ResumeError(
            f"{checkpoint} belongs to a run with other settings, so resuming it would mix two runs:\n  "
            + "\n  ".join(differences)
            + "\nResume with the settings it was trained with, or start a new run in another --output_dir."
        )
    if saved.get("world_size") != current.get("world_size"):
        logger.warning(
            "%s was written by %s process(es), this run has %s: the global batch is the same, but the data order and "
            "random augmentations will differ from those of an uninterrupted run.", checkpoint, saved.get("world_size"),
            current.get("world_size"),
        )


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC/EDQUOT, also when torch's zip writer reports it (`enforce fail at inline_container.cc`)."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(err)
        if "No space left" in text or "Disk quota exceeded" in text or "inline_container.cc" in text:
            return True
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return False


def recover_leftovers(folder: str) -> list[str]:
    """Remove what killed saves left in `folder`; returns the names removed (or restored).

    `.tmp-checkpoint-N` is never complete and goes. `.old-checkpoint-N` is a complete earlier checkpoint: it is put
    back when the kill came between the two renames of `publish_dir` (no `checkpoint-N`), and removed otherwise.
    """
    done = []
    if not os.path.isdir(folder):
        return done
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(STAGING_PREFIX + "checkpoint-"):
            shutil.rmtree(path, ignore_errors=True)
            done.append(name)
        elif name.startswith(RETIRED_PREFIX + "checkpoint-"):
            final = os.path.join(folder, name[len(RETIRED_PREFIX):])
            if os.path.exists(final):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.rename(path, final)
            done.append(name)
    return done
