"""Starting and recognising data-parallel training processes (torchrun / accelerate launch)."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence


def launched(env: Mapping[str, str] = os.environ) -> bool:
    """True inside a process started by torchrun or ``accelerate launch`` (they set WORLD_SIZE)."""
    return "WORLD_SIZE" in env


def is_main_rank(env: Mapping[str, str] = os.environ) -> bool:
    """Rank 0 (or no launcher at all): the process that writes checkpoints, evaluates and reports."""
    return int(env.get("RANK", "0")) == 0


def torchrun_command(num_processes: int, module: str, args: Sequence[str]) -> list[str]:
    """``python -m torch.distributed.run`` running ``python -m module args`` on this machine in N processes."""
    if num_processes < 2:
        raise ValueError(f"a data-parallel launch needs at least 2 processes, got {num_processes}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(num_processes),
            "-m", module, *args]
