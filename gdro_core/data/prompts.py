"""OCR prompt sets: templates around a quoted target string."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from gdro_core.data.store import atomic_write

_QUOTED = re.compile(r'"([^"]+)"')


class PromptError(ValueError):
    """A prompt the OCR task cannot score."""


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


def read_prompts(path: Path) -> list[OcrPrompt]:
    """Read a prompt file; each prompt's target is re-derived from its quotes and must agree."""
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"prompt file not found: {path}: run `gdro prompts` first")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        target = extract_target(row["prompt"])
        if row.get("target", target) != target:
            raise PromptError(f"{path}:{n}: target {row['target']!r} differs from the quoted text {target!r}")
        out.append(OcrPrompt(row["prompt"], target))
    if not out:
        raise PromptError(f"prompt file {path} is empty")
    return out
