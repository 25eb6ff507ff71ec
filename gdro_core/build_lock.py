"""One model build at a time in a process.

diffusers, transformers and accelerate build a model by patching process-wide state for the length of the
build: ``torch.nn.init`` becomes a no-op, ``nn.Module.register_parameter`` puts new parameters on the meta
device, the default dtype changes. A module another thread builds meanwhile (a LoRA layer, a reward model)
comes out uninitialised or on the meta device, and two overlapping builds can leave the patch in place.
Threads of one process (a sweep's configs, a thread-pool fan-out) therefore build under :func:`building`;
what runs on the built models (training, sampling, scoring) stays parallel.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_LOCK = threading.RLock()


@contextmanager
def building() -> Iterator[None]:
    """Hold the process's build lock (re-entrant: a build may call another that takes it)."""
    with _LOCK:
        yield
