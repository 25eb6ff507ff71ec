"""General prompt sets: plain prompts, one per line (Flow-GRPO's PickScore prompt files), or JSON lines with a
``prompt`` field; no target text, so each record's ``target`` is ''."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gdro_core.data.prompt_checks import (
    PromptError, check_unique, drop_held_out_from_train, fold_repeats, hold_out_val,
)
from gdro_core.data.store import atomic_write, jsonl_records, text_lines

HELD_OUT = ("test", "val")


@dataclass(frozen=True)
class GeneralPrompt:
    prompt: str
    target: str = ""


def read_prompt_file(path: Path) -> list[GeneralPrompt]:
    """One prompt per non-blank line; a ``.jsonl`` file holds objects with a ``prompt`` field."""
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"prompt file not found: {path} (prompts.source names a directory with train.txt and "
                          "test.txt, one prompt per line)")
    if path.suffix == ".jsonl":
        rows = jsonl_records(path, PromptError, f"prompt file not found: {path}")
        out = []
        for where, row in rows:
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
                raise PromptError(f"{where}: not a prompt record: each line must be an object with a non-empty "
                                  "'prompt' string")
            out.append(GeneralPrompt(row["prompt"].strip()))
    else:
        out = [GeneralPrompt(line.strip()) for line in text_lines(path, PromptError) if line.strip()]
    if not out:
        raise PromptError(f"prompt file {path} holds no prompts")
    return fold_repeats(out, path)


def load_prompt_source(source: Path, n_val: int) -> dict[str, list[GeneralPrompt]]:
    """``train`` and ``test`` (``.txt`` or ``.jsonl``), and ``val`` (else the last ``n_val`` train prompts)."""
    def find(split: str) -> Path:
        for suffix in (".txt", ".jsonl"):
            if (Path(source) / f"{split}{suffix}").is_file():
                return Path(source) / f"{split}{suffix}"
        return Path(source) / f"{split}.txt"

    sets = {split: read_prompt_file(find(split)) for split in ("train", "test")}
    if find("val").is_file():
        sets["val"] = read_prompt_file(find("val"))
    return drop_held_out_from_train(hold_out_val(sets, n_val, source), lambda p: p.prompt.lower(), source)


def validate_prompt_sets(sets: dict[str, list[GeneralPrompt]], where: str) -> None:
    """Unique prompts in each set, and no held-out prompt among the training prompts."""
    for split, prompts in sets.items():
        check_unique(prompts, f"{where} ({split})")
    train = {p.prompt.lower() for p in sets.get("train", [])}
    for split in HELD_OUT:
        leaked = sorted({p.prompt for p in sets.get(split, []) if p.prompt.lower() in train})
        if leaked:
            raise PromptError(f"{where}: {len(leaked)} {split} prompt(s) also occur in train, e.g. {leaked[0]!r}: "
                              "held-out prompts must never be trained on; remove them from train")


def write_prompts(path: Path, prompts: list[GeneralPrompt]) -> None:
    """JSON lines, one prompt per line, written atomically."""
    text = "".join(json.dumps({"prompt": p.prompt, "target": p.target}) + "\n" for p in prompts)
    atomic_write(Path(path), lambda tmp: tmp.write_text(text))


def read_prompts(path: Path) -> list[GeneralPrompt]:
    """A prompt file the prompts stage wrote; checked as it was when written."""
    path = Path(path)
    rows = jsonl_records(path, PromptError, f"prompt file not found: {path}: run `gdro prompts` first")
    out = []
    for where, row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise PromptError(f"{where}: not a prompt record; rerun `gdro prompts`")
        out.append(GeneralPrompt(row["prompt"], row.get("target", "")))
    if not out:
        raise PromptError(f"prompt file {path} is empty")
    check_unique(out, str(path))
    return out
