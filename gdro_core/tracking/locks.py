"""One writer per stage output: a lock file per stage and output location, held with ``flock``.

The operating system releases an ``flock`` when its process dies (kill -9 included), so a lock left by a
killed run is simply free: there is no window in which two runs both decide the owner is dead. The file
holds the owner's pid and host, only to say who holds it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger("gdro")
LOCK_DIR = ".gdro/locks"
_held: dict[Path, int] = {}  # locks this process holds, with their nesting depth
_held_guard = threading.Lock()


class LockError(RuntimeError):
    """Another live process holds the stage's lock."""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_path(root: Path, stage: str, outputs: dict[str, Any]) -> Path:
    key = hashlib.sha256(json.dumps(outputs, sort_keys=True).encode()).hexdigest()[:12]
    return Path(root) / LOCK_DIR / f"{stage}-{key}.lock"


def _owner(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _acquire(path: Path, stage: str) -> int:
    """An open descriptor holding the ``flock`` of the file now at ``path``."""
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            owner = _owner(path)
            raise LockError(
                f"another `gdro {stage}` (pid {owner.get('pid', '?')}) is writing the same outputs in this workspace: "
                f"wait for it to finish or stop it (lock {path})"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the previous owner removed the file between our open and our lock: lock the new one


@contextmanager
def stage_lock(root: Path, stage: str, outputs: dict[str, Any]) -> Iterator[Path]:
    """Hold ``stage``'s lock for the outputs named by ``outputs`` (the paths params) in this workspace.

    Re-entrant within one process (a sweep's threads each hold their own outputs' lock)."""
    path = lock_path(root, stage, outputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _held_guard:
        if path in _held:
            _held[path] += 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield path
        finally:
            with _held_guard:
                if path in _held:
                    _held[path] -= 1
        return
    fd = _acquire(path, stage)
    previous = _owner(path)
    if previous.get("pid") and previous.get("pid") != os.getpid():
        log.warning("taking over the lock of a `gdro %s` that ended without releasing it (pid %s)", stage,
                    previous.get("pid"))
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
    with _held_guard:
        _held[path] = 1
    try:
        yield path
    finally:
        with _held_guard:
            del _held[path]
        path.unlink(missing_ok=True)  # before the release: a waiting opener then finds a new file (see _acquire)
        os.close(fd)
