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


def call_score(score: Callable, images, records, progress: Progress | None):
    """``score(images, records, progress)`` as the reward's method takes it: the protocol's third argument
    positionally, by name where it is keyword-only, and not at all for a user's ``score(self, images, records)``."""
    import inspect

    try:
        params = list(inspect.signature(score).parameters.values())
    except (TypeError, ValueError):  # a builtin or C callable: call it as the protocol says
        return score(images, records, progress)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params):
        return score(images, records, progress)
    if any(p.kind == p.VAR_KEYWORD or (p.kind == p.KEYWORD_ONLY and p.name == "progress") for p in params):
        return score(images, records, progress=progress)
    return score(images, records)


def where_it_failed(err: BaseException) -> str:
    """`` at file.py:line`` of the innermost frame of the raising code that is not an installed package or Python
    itself: where in a user's reward to look ('' when every frame is library code)."""
    import sys
    import traceback

    library = (sys.base_prefix, sys.prefix)
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if "site-packages" not in f.filename and not f.filename.startswith(library)]
    return f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""


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
