"""Claiming an output directory for one run, before anything expensive happens.

A run owns its `output_dir`: it checks that the directory is writable, takes a lock file (`.saeft.lock`, holding the
pid, host and start time) so that a second run started on the same directory fails at once instead of overwriting
the first's model, checkpoints, SAE and results, and refuses a directory that holds another run's results unless it
is told to overwrite them or to resume. All of this happens in milliseconds, before the model is loaded or the SAE's
embedding pass starts, so a mistake costs nothing.

The lock is an `fcntl.flock` on the lock file: the kernel releases it when its process dies, however it dies, so a
run killed with SIGKILL never blocks the next one. Its file stays behind with the dead run's pid; the next run on the
same host takes it over with a warning. On another host the liveness of that pid cannot be checked, so the next run
refuses and says which file to delete once that run is known to be gone.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import functools
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from .checkpoints import list_checkpoints, recover_leftovers, wants_resume

logger = logging.getLogger(__name__)

LOCK_NAME = ".saeft.lock"
# What a training run leaves in its output_dir: a directory holding any of these holds another run's results.
RUN_RESULT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "adapter_model.safetensors",
    "adapter_model.bin", "trainer_state.json", "eval_results.json",
)
# run_saeft writes the results, then the card, last: with both there, the run finished (a run killed between the two
# is resumed, which writes them again).
FINISHED_MARKERS = ("eval_results.json", "README.md")


class OutputDirError(RuntimeError):
    """The output directory cannot be used for this run; the message says why and what to do."""


class OutputDirNotWritableError(OutputDirError):
    """The output directory cannot be created or written."""


class OutputDirLockedError(OutputDirError):
    """Another run holds the output directory's lock."""


class OutputDirNotEmptyError(OutputDirError):
    """The output directory holds another run's results (or a finished run, when resuming)."""


_ERRORS = {cls.__name__: cls for cls in (OutputDirError, OutputDirNotWritableError, OutputDirLockedError,
                                         OutputDirNotEmptyError)}


def _describe_os_error(err: OSError) -> str:
    reason = err.strerror or str(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{reason}: the disk (or your quota) is full"
    return reason


def _not_writable(output_dir: str, err: OSError) -> OutputDirNotWritableError:
    return OutputDirNotWritableError(
        f"Cannot write to output_dir {output_dir!r} ({type(err).__name__}: {_describe_os_error(err)}). Pick a "
        "directory you can write to with --output_dir, or fix its permissions (or free space) and run again. "
        "Nothing was loaded or trained."
    )


@dataclass
class RunLock:
    """The lock of a claimed output directory; `release()` (or leaving the `with` block) gives it up."""

    path: str
    fd: int | None

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            # Unlink while still holding the lock, and only our own file: a racing run then finds no file (and
            # makes its own) or our unlinked one (and notices, see `_lock`), never a lock it shares with us.
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 4096).decode("utf-8", errors="replace")
        holder = json.loads(text) if text.strip() else {}
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _holder_text(holder: dict[str, Any]) -> str:
    if not holder:
        return "a run that has not yet written its details"
    return f"pid {holder.get('pid')} on host {holder.get('host')!r}, started {holder.get('started')}"


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _lock(output_dir: str) -> RunLock:
    """Take `output_dir/.saeft.lock` (non-blocking) or raise `OutputDirLockedError` naming its holder."""
    path = os.path.join(output_dir, LOCK_NAME)
    host = socket.gethostname()
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise _not_writable(output_dir, err) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            # The holder writes its pid just after taking the flock: a run that lost the race by microseconds may
            # look before it does. Give it a moment, so that the error names the run that holds the directory.
            for _ in range(40):
                if holder:
                    break
                time.sleep(0.05)
                holder = _read_holder(fd)
            os.close(fd)
            raise OutputDirLockedError(
                f"output_dir {output_dir!r} is in use by another run ({_holder_text(holder)}; lock file {path}). "
                "Two runs in one directory would overwrite each other's model, checkpoints and results: wait for "
                "that run to finish, or give this one another --output_dir."
            ) from None
        try:
            same_file = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            break
        # The previous holder removed the file between our open and our flock: the lock we got is on a file nobody
        # else can see. Start again on the file now at `path`.
        os.close(fd)

    previous = _read_holder(fd)
    if previous:
        if previous.get("host") != host:
            os.close(fd)
            raise OutputDirLockedError(
                f"output_dir {output_dir!r} was locked by a run on another host ({_holder_text(previous)}; lock file "
                f"{path}), whose liveness cannot be checked from {host!r}. If that run is no longer running, delete "
                f"{path} and run again; otherwise give this run another --output_dir."
            )
        # flock is free, so on this host its holder is gone (a pid that is alive now was reused by another process).
        logger.warning("Taking over the stale lock %s of a run that is no longer running (%s).", path,
                       _holder_text(previous) + ("" if not _pid_alive(previous.get("pid")) else ", pid since reused"))
    info = {"pid": os.getpid(), "host": host,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(info).encode())
        os.fsync(fd)
    except OSError as err:
        lock = RunLock(path, fd)
        lock.release()
        raise _not_writable(output_dir, err) from None
    return RunLock(path, fd)


def _check_contents(output_dir: str, *, overwrite: bool, resume: bool, result_files: Sequence[str],
                    checkpoints: bool) -> None:
    """Refuse another run's results (or a finished run when resuming); with `overwrite`, remove them."""
    for name in recover_leftovers(output_dir):  # what checkpoint saves killed midway left; never results
        logger.warning("Cleaned up %s, left by a checkpoint save that was killed midway.", name)
    entries = set(os.listdir(output_dir))
    results = [name for name in result_files if name in entries]
    ckpts = [os.path.basename(path) for _, path in list_checkpoints(output_dir)] if checkpoints else []
    if not results and not ckpts:
        return
    found = ", ".join(results + ckpts[-3:] + (["..."] if len(ckpts) > 3 else []))
    if overwrite:
        logger.warning("overwrite_output_dir: removing the previous run's results in %s: %s", output_dir,
                       ", ".join(results + ckpts))
        for name in ckpts:
            shutil.rmtree(os.path.join(output_dir, name))
        for name in results:
            os.remove(os.path.join(output_dir, name))
        return
    if resume:
        if all(os.path.isfile(os.path.join(output_dir, name)) for name in FINISHED_MARKERS):
            raise OutputDirNotEmptyError(
                f"output_dir {output_dir!r} holds a finished run (its eval_results.json and card are written): there is nothing to "
                "resume. To train it further, start a new run with another --output_dir and --resume_from_checkpoint "
                "pointing at one of its checkpoints; to start this run over, pass --overwrite_output_dir."
            )
        return
    unfinished = ckpts and "eval_results.json" not in results
    what = "the checkpoints of an unfinished run" if unfinished else "another run's results"
    fixes = "pick another --output_dir, or pass --overwrite_output_dir to replace them."
    if ckpts:
        fixes = "Resume it with --resume_from_checkpoint true (the newest complete checkpoint), " + fixes
    else:
        fixes = fixes[0].upper() + fixes[1:]
    raise OutputDirNotEmptyError(
        f"output_dir {output_dir!r} already holds {what} ({found}); running here would overwrite them. {fixes}"
    )


def claim_output_dir(
    output_dir: str,
    *,
    overwrite: bool = False,
    resume: bool = False,
    result_files: Sequence[str] = RUN_RESULT_FILES,
    checkpoints: bool = True,
) -> RunLock:
    """Create `output_dir` if needed, take its lock, and check that this run may write there.

    Args:
        overwrite: remove another run's results (`result_files`, `checkpoint-*`) instead of refusing them.
        resume: the run resumes from a checkpoint: checkpoints and partial results are expected, but a finished run
            (`eval_results.json`) is refused, since there is nothing left to resume.
        result_files: file names that mark another run's results.
        checkpoints: whether `checkpoint-*` folders count as results (Trainer runs).

    Returns the held `RunLock`; release it when the run ends (it is a context manager).
    Raises `OutputDirNotWritableError`, `OutputDirLockedError` or `OutputDirNotEmptyError` (all `OutputDirError`).
    """
    output_dir = os.path.abspath(output_dir)
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as err:
        raise _not_writable(output_dir, err) from None
    if not os.path.isdir(output_dir):
        raise _not_writable(output_dir, NotADirectoryError(errno.ENOTDIR, "it exists and is not a directory"))
    lock = _lock(output_dir)
    try:
        _check_contents(output_dir, overwrite=overwrite, resume=resume, result_files=result_files,
                        checkpoints=checkpoints)
    except BaseException:
        lock.release()
        raise
    return lock


def _all_gather(value: Any, world_size: int) -> list[Any]:
    import torch.distributed as dist

    if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


@contextlib.contextmanager
def claimed_output_dir(training_args: Any) -> Iterator[RunLock | None]:
    """`claim_output_dir(training_args.output_dir, ...)` for a (possibly multi-process) Trainer run.

    The processes that write (`should_save`: the main process, or one per node with `save_on_each_node`) take the
    lock and check the directory; every process then learns every verdict, so all of them fail the same way at the
    same point, before any model is built (none waits at a later collective for one that already failed).
    """
    with claimed_by_writers(
        training_args.output_dir, writes=training_args.should_save, world_size=training_args.world_size,
        overwrite=bool(getattr(training_args, "overwrite_output_dir", False)),
        resume=wants_resume(training_args.resume_from_checkpoint),
    ) as lock:
        yield lock


@contextlib.contextmanager
def claimed_by_writers(output_dir: str, *, writes: bool, world_size: int, **claim_kwargs: Any
                       ) -> Iterator[RunLock | None]:
    """`claim_output_dir(output_dir, **claim_kwargs)` on the processes that `writes`, with every verdict shared
    among all `world_size` processes (an initialised process group when > 1), so all fail together."""
    lock: RunLock | None = None
    verdict: tuple[str, str] | None = None
    error: BaseException | None = None
    if writes:
        try:
            lock = claim_output_dir(output_dir, **claim_kwargs)
        except Exception as err:  # noqa: BLE001 -- forwarded to every process, then re-raised
            error, verdict = err, (type(err).__name__, str(err))
    verdicts = [v for v in _all_gather(verdict, world_size) if v is not None]
    if verdicts:
        if lock is not None:
            lock.release()
        if error is not None:
            raise error
        name, message = verdicts[0]
        raise _ERRORS.get(name, OutputDirError)(message)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


F = TypeVar("F", bound=Callable[..., Any])


def claims_output_dir(fn: F) -> F:
    """Decorate `fn(model_args, training_args, ...)` to run inside `claimed_output_dir(training_args)`."""

    @functools.wraps(fn)
    def wrapper(model_args: Any, training_args: Any, *args: Any, **kwargs: Any) -> Any:
        with claimed_output_dir(training_args):
            return fn(model_args, training_args, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
