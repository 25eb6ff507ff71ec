"""One writer per stage output: a lock file per stage and output location, taken over when its owner died."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger("gdro")
LOCK_DIR = ".gdro/locks"


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


@contextmanager
def stage_lock(root: Path, stage: str, outputs: dict[str, Any]) -> Iterator[Path]:
    """Hold ``stage``'s lock for the outputs named by ``outputs`` (the paths params) in this workspace.

    Re-entrant within one process (a sweep's threads each hold their own outputs' lock)."""
    path = lock_path(root, stage, outputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = json.loads(path.read_text() or "{}")
            except (OSError, ValueError):
                owner = {}
            if owner.get("pid") == me["pid"] and owner.get("host") == me["host"]:
                yield path  # already ours: a nested call in the same process
                return
            if owner.get("host") == me["host"] and owner.get("pid") and pid_alive(int(owner["pid"])):
                raise LockError(
                    f"another `gdro {stage}` (pid {owner['pid']}) is writing the same outputs in this workspace: "
                    f"wait for it to finish or stop it (lock {path})"
                ) from None
            if owner.get("host") not in (None, me["host"]):
                raise LockError(f"{path} is held by pid {owner.get('pid')} on {owner['host']}: if that run is gone, "
                                "delete the lock file") from None
            log.warning("taking over the lock of a `gdro %s` that died (pid %s)", stage, owner.get("pid"))
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
