"""One run per output folder: train.py and analyze.py hold a lock on --out for their whole run.

Without it two runs on one --out both finish and print "done", and the second's files silently
replace the first's. The lock is an flock on `--out/.lock`: the kernel releases it when its process
ends, however it ends, so a lock left by a killed run is taken over by the next one (which says
so); the file also names its holder (pid, command, start time) for the run that is refused. The
file stays, empty, when a run ends (removing it could let two later runs lock two different files).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

LOCK_NAME = ".lock"


class LockError(RuntimeError):
    """--out is in use by another run; the message names it."""


def check_free(folder) -> None:
    """LockError if another run holds `folder`'s lock; reads only (creates and writes nothing)."""
    path = Path(folder) / LOCK_NAME
    if not path.is_file():
        return
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the file closes
        except BlockingIOError:
            raise LockError(_in_use(folder, handle.read().strip())) from None


def _in_use(folder, holder: str) -> str:
    return f"{folder} is in use by another run ({holder or 'another process'}); wait for it to finish, or pass another --out"


@contextlib.contextmanager
def hold(folder, command: str):
    """Create `folder` if needed and hold its lock until the block ends; LockError if another run
    holds it. A folder this call created and that is left empty (a run that failed its checks) is
    removed again."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise LockError(f"--out {folder}: is a file, not a folder")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise LockError(_in_use(folder, handle.read().strip())) from None
        handle.seek(0)
        earlier = handle.read().strip()
        if earlier:
            print(f"note: {folder}: taking over the lock of a run that ended without releasing it ({earlier})")
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}, {command}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()  # an empty lock file: released cleanly
    finally:
        handle.close()  # closing the file releases the flock
        if created and {p.name for p in folder.iterdir()} <= {LOCK_NAME}:
            path.unlink(missing_ok=True)
            folder.rmdir()
