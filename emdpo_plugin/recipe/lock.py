"""One writer per run folder: an OS lock on `<run>/.lock`, held by the driver for the whole run.

Two `openrlhf run` into one folder would interleave run.json saves and write over each other's
stage folders. `flock` is released by the kernel when its holder exits or is killed, so a dead
run never leaves a stale lock to clean up by hand; the pid written into the file only names the
holder in the error.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import EmdpoError

LOCK_FILE = ".lock"


@contextmanager
def run_lock(run_dir: str | Path) -> Iterator[Path]:
    """Hold `<run_dir>/.lock` (creating the folder) or fail at once naming the holder's pid."""
    run_dir = Path(run_dir)
    path = run_dir / LOCK_FILE
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:  # --output-dir names a file, or a folder we may not write
        raise EmdpoError(f"{run_dir}: cannot use as the run folder: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise EmdpoError(f"{run_dir}: another openrlhf run (pid {holder}) is writing this run folder "
                             f"(it holds {path}); wait for it to end or choose another --output-dir") from None
        except OSError as exc:  # e.g. a file system without flock
            raise EmdpoError(f"{path}: cannot lock the run folder: {exc.strerror or exc}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock
