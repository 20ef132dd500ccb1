"""Writing files and folders so that readers see the old version or the new one, never half of one.

A file is written next to its target and `os.replace`d onto it; a folder is built under a hidden temporary name and
renamed into place (see `publish_dir`). Both are flushed to disk first, so that the rename publishes durable data.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

STAGING_PREFIX = ".tmp-"  # .tmp-<name>: being written
RETIRED_PREFIX = ".old-"  # .old-<name>: an earlier <name> being replaced by a new one


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a directory; the data itself is synced
        pass
    finally:
        os.close(fd)


def fsync_tree(path: str | Path) -> None:
    """Flush every file under `path` (and the folders themselves) to disk."""
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def publish_dir(staged: str | Path, final: str | Path) -> None:
    """Make the complete folder `staged` appear as `final` in one rename, replacing an older `final`.

    `rename` cannot replace a non-empty folder, so an older `final` is first renamed to `.old-<name>` (one more
    atomic rename): at every instant a complete old or new folder exists, under a name the next run knows how to
    recover (`saeft_hf.checkpoints.recover_leftovers`).
    """
    staged, final = os.fspath(staged), os.fspath(final)
    parent = os.path.dirname(os.path.abspath(final))
    retired = None
    if os.path.exists(final):
        retired = os.path.join(parent, RETIRED_PREFIX + os.path.basename(final))
        if os.path.exists(retired):
            shutil.rmtree(retired)
        os.rename(final, retired)
    os.rename(staged, final)
    fsync_dir(parent)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def write_file_atomic(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp_file)` to write a file next to `path`, flush it, then `os.replace` it onto `path`.

    On failure the temporary file is removed and an existing `path` is left as it was. The temporary name carries
    the process id, so two processes never write the same temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{STAGING_PREFIX}{path.name}.{os.getpid()}")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary file and `os.replace`."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    return write_file_atomic(path, write)


def write_dir_atomic(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp_dir)` to fill a fresh folder, then publish it as `path` (replacing any older one).

    On failure the temporary folder is removed and an existing `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{STAGING_PREFIX}{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        write(tmp)
        fsync_tree(tmp)
        publish_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
