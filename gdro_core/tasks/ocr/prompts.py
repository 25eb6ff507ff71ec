"""OCR prompt sets: templates around a quoted target string; their files, their checks, the caption words."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from gdro_core.data.prompt_checks import (
    PromptError, check_builtin_encodable, check_unique, drop_held_out_from_train, fold_repeats, hold_out_val,
)
from gdro_core.data.store import atomic_write, jsonl_records, text_lines
from gdro_core.tasks.base import words_of

_QUOTED = re.compile(r'"([^"]+)"')


@dataclass(frozen=True)
class OcrPrompt:
    prompt: str
    target: str


def extract_target(prompt: str) -> str:
    """The text between the first pair of double quotes: what the image must show."""
    match = _QUOTED.search(prompt)
    if match is None:
        raise PromptError(
            f"prompt has no quoted target text: {prompt!r}; write the text to render between double quotes, "
            'e.g. a sign that says "OPEN"'
        )
    return match.group(1)


def random_string(alphabet: str, min_len: int, max_len: int, rng: random.Random) -> str:
    """One random string over ``alphabet`` with a length drawn from [min_len, max_len]."""
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(min_len, max_len)))


def random_strings(alphabet: str, min_len: int, max_len: int, n: int, rng: random.Random) -> list[str]:
    """n distinct random strings over ``alphabet``."""
    capacity = sum(len(alphabet) ** L for L in range(min_len, max_len + 1))
    if n > capacity:
        raise PromptError(f"asked for {n} distinct strings but the world only has {capacity}; widen world.alphabet or lengths")
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        s = random_string(alphabet, min_len, max_len, rng)
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def make_prompt_sets(
    alphabet: str, min_len: int, max_len: int, templates: list[str], n_train: int, n_test: int, seed: int,
    n_val: int = 0,
) -> dict[str, list[OcrPrompt]]:
    """Train, held-out test and (when ``n_val``) validation prompt sets whose target strings do not overlap."""
    rng = random.Random(seed)
    targets = random_strings(alphabet, min_len, max_len, n_train + n_test + n_val, rng)
    sets = {"train": targets[:n_train], "test": targets[n_train : n_train + n_test]}
    if n_val:
        sets["val"] = targets[n_train + n_test :]
    return {
        name: [OcrPrompt(templates[i % len(templates)].format(text=t), t) for i, t in enumerate(ts)]
        for name, ts in sets.items()
    }


def write_prompts(path: Path, prompts: list[OcrPrompt]) -> None:
    """JSON lines, one prompt per line, written atomically."""
    text = "".join(json.dumps({"prompt": p.prompt, "target": p.target}) + "\n" for p in prompts)
    atomic_write(Path(path), lambda tmp: tmp.write_text(text))


HELD_OUT = ("test", "val")


def read_prompts(path: Path) -> list[OcrPrompt]:
    """Read a prompt file; each prompt's target is re-derived from its quotes and must agree.

    A training file is checked against the held-out files beside it: a held-out target in train is refused.
    """
    path = Path(path)
    out = []
    for where, row in jsonl_records(path, PromptError, f"prompt file not found: {path}: run `gdro prompts` first"):
        try:
            target = extract_target(row["prompt"])
        except (KeyError, TypeError, PromptError) as err:
            raise PromptError(f"{where}: not a prompt record ({err}); rerun `gdro prompts`") from None
        if row.get("target", target) != target:
            raise PromptError(f"{where}: target {row['target']!r} differs from the quoted text {target!r}")
        out.append(OcrPrompt(row["prompt"], target))
    if not out:
        raise PromptError(f"prompt file {path} is empty")
    check_unique(out, str(path))
    if path.stem == "train":
        held = {s: read_prompts(path.with_name(f"{s}.jsonl")) for s in HELD_OUT if path.with_name(f"{s}.jsonl").is_file()}
        check_disjoint({"train": out, **held}, str(path.parent))
    return out


def read_prompt_file(path: Path) -> list[OcrPrompt]:
    """Flow-GRPO's OCR prompt format: one prompt per line, the target text between double quotes."""
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"prompt file not found: {path} (prompts.source names a directory with train.txt and test.txt)")
    out = []
    for n, line in enumerate(text_lines(path, PromptError), 1):
        if not line.strip():
            continue
        match = _QUOTED.search(line)
        if match is None or not match.group(1).strip():
            raise PromptError(f'{path}:{n}: no target text between double quotes in {line.strip()!r}: write it as '
                              'a sign that says "OPEN"')
        out.append(OcrPrompt(line.strip(), match.group(1)))
    if not out:
        raise PromptError(f"prompt file {path} holds no prompts")
    return fold_repeats(out, path)


def load_prompt_source(source: Path, n_val: int) -> dict[str, list[OcrPrompt]]:
    """User prompt sets from ``train.txt`` and ``test.txt`` (and ``val.txt``, else the last ``n_val`` train prompts)."""
    sets = {split: read_prompt_file(Path(source) / f"{split}.txt") for split in ("train", "test")}
    if (Path(source) / "val.txt").is_file():
        sets["val"] = read_prompt_file(Path(source) / "val.txt")
    return drop_held_out_from_train(hold_out_val(sets, n_val, source), target_key, source)


def target_key(p: OcrPrompt) -> str:
    """A target as the reward reads it: lower case, no spaces."""
    return "".join(p.target.lower().split())


def check_disjoint(sets: dict[str, list[OcrPrompt]], where: str) -> None:
    """No held-out target (normalised as the reward reads it) may occur among the training prompts."""
    train = {target_key(p) for p in sets.get("train", [])}
    for split in HELD_OUT:
        leaked = sorted({p.target for p in sets.get(split, []) if target_key(p) in train})
        if leaked:
            raise PromptError(
                f"{where}: {len(leaked)} {split} target(s) also occur in train, e.g. {leaked[0]!r}: held-out "
                "targets must never be trained on; remove them from train"
            )


def check_targets_in_alphabet(prompts: list[OcrPrompt], alphabet: str, where: str) -> None:
    for p in prompts:
        bad = sorted(set(p.target) - set(alphabet) - {" "})
        if bad:
            raise PromptError(f"{where}: target {p.target!r} has characters outside world.alphabet: "
                              f"{''.join(bad)!r}; the reader cannot score them (widen world.alphabet or set "
                              "reward.restrict_to_alphabet: false)")


def validate_prompt_sets(sets: dict[str, list[OcrPrompt]], params, where: str) -> None:
    """Everything a prompt set must satisfy before anything is generated from it."""
    for split, prompts in sets.items():
        check_unique(prompts, f"{where} ({split})")
    check_disjoint(sets, where)
    every = [p for prompts in sets.values() for p in prompts]
    if params.reward.restrict_to_alphabet:
        check_targets_in_alphabet(every, params.world.alphabet, where)
    if params.model.source == "builtin":
        check_builtin_encodable(every, params.model.builtin.max_tokens, tokenizer_words(params), where)


def caption_words(params) -> list[str]:
    """The words of the built-in world's captions: the templates' words (the quoted text is spelt out)."""
    return words_of([t.format(text="") for t in params.prompts.templates])


def tokenizer_words(params) -> list[str]:
    """The words the built-in tokenizer reads whole: none (``model.builtin.tokenizer: char``) or the captions'."""
    return caption_words(params) if params.model.builtin.tokenizer == "word" else []
