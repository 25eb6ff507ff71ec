"""The reward protocol: images and their prompt records in, a table with ``reward`` and its parts out.

A reward is one class. The registry (:mod:`gdro_core.rewards.registry`) builds it with its options from
``rewards.options.<name>`` in params.yaml: through ``from_params(params, options)`` where the class defines
it (a built-in task reward reads its task's sections), else as ``Class(**options)``, validated first by the
class's ``Options`` pydantic model where it has one. Each image's failure is its row's ``error`` text (the
image scores 0), never an exception: the score stage fails once their share passes ``reward.max_error_share``.
A class may also define ``preflight(options, root) -> list[str]``: cheap checks (paths, files; nothing loaded)
that ``gdro check`` runs before any stage, one problem per line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import pandas as pd
    from PIL import Image

Progress = Callable[[int, int], None]


class RewardRecord(Protocol):
    """What a reward reads of a prompt: its text, and its task's metadata as one string ('' for none)."""

    @property
    def prompt(self) -> str: ...

    @property
    def target(self) -> str: ...


@runtime_checkable
class Reward(Protocol):
    name: str
    """The column its total takes in a weighted sum."""
    needs_world: bool
    """True when it only scores images of a task's built-in world (so only with the built-in model)."""

    def score(self, images: list[Image.Image], records: Sequence[RewardRecord],
              progress: Progress | None = None) -> pd.DataFrame:
        """One row per image, in order: ``reward`` (higher is better), any parts, and ``error`` ('' when scored)."""
        ...


class RewardError(ValueError):
    """A reward that cannot be built or run as configured; the message names the reward and the fix."""


def local_dir(path: str, what: str, needs: Sequence[str] = ()) -> Path:
    """A checkpoint directory a reward loads, refused in one line when missing or incomplete (nothing is
    downloaded at run time). ``needs``: file names of which each must exist (``a|b`` for either)."""
    if not path:
        raise RewardError(f"{what}: no directory given; set it to a local directory holding the checkpoint")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise RewardError(f"{what}: {path} is not a directory; download the checkpoint there first "
                          "(nothing is fetched at run time)")
    for need in needs:
        options = need.split("|")
        if not any((p / n).exists() for n in options):
            raise RewardError(f"{what}: {path} has no {' or '.join(options)}; it is not a complete checkpoint "
                              "directory (save it with save_pretrained)")
    return p
