"""Held-out images one folder per prompt, as GenEval's generator writes them, so its own evaluation script (or any
other tool) scores the very images the evaluate stage scored.

``<out>/<prompt index, 5 digits>/metadata.jsonl`` holds the prompt's record as one JSON object (GenEval's fields
``tag``, ``include``, ``exclude``, ``prompt`` for GenEval prompts; ``prompt`` and ``target`` otherwise) and
``samples/<n, 5 digits>.png`` its images in seed order.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from gdro_core.data.store import TMP_SUFFIX
from gdro_core.tasks.base import PromptRecord


def prompt_metadata(record: PromptRecord) -> dict:
    metadata = getattr(record, "metadata", None)
    return {**metadata, "prompt": record.prompt} if isinstance(metadata, dict) else \
        {"prompt": record.prompt, "target": record.target}


def write_prompt_folders(out: Path, images: Sequence[Image.Image], prompts: Sequence[PromptRecord],
                         per_prompt: int) -> None:
    """Replace ``out`` with one folder per prompt (``images`` are ``per_prompt`` per prompt, in prompt order); written
    beside it first and swapped in, so an interrupted write leaves the previous folders whole."""
    if len(images) != len(prompts) * per_prompt:
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts x {per_prompt}")
    out = Path(out)
    tmp = out.with_name(f".{out.name}{TMP_SUFFIX}")
    shutil.rmtree(tmp, ignore_errors=True)
    for i, record in enumerate(prompts):
        folder = tmp / f"{i:05d}"
        (folder / "samples").mkdir(parents=True)
        (folder / "metadata.jsonl").write_text(json.dumps(prompt_metadata(record)) + "\n")
        for n, im in enumerate(images[i * per_prompt:(i + 1) * per_prompt]):
            im.save(folder / "samples" / f"{n:05d}.png", format="PNG")
    old = out.with_name(f".{out.name}.old{TMP_SUFFIX}")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
