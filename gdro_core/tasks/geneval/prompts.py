"""GenEval prompt records: read from GenEval / Flow-GRPO metadata files, or generated with GenEval's templates.

A record is GenEval's metadata line: ``tag``, ``include`` (a list of ``{class, count, color?, position?}``),
``exclude`` and ``prompt``. GenEval's evaluation_metadata.jsonl and Flow-GRPO's train_metadata.jsonl /
test_metadata.jsonl share this format.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from gdro_core.data.prompt_checks import (
    PromptError, check_builtin_encodable, check_unique, drop_held_out_from_train, fold_repeats,
)
from gdro_core.data.store import atomic_write, jsonl_records
from gdro_core.tasks.base import words_of

RELATIONS = ("left of", "right of", "above", "below")
"""GenEval's relative positions (what a ``position`` clause may ask; :mod:`.rules` reads them from boxes)."""
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
SPLITS = ("train", "test", "val")


class GenEvalPromptError(ValueError):
    """A metadata line or a prompt-set request that cannot be used."""


@dataclass(frozen=True)
class GenEvalPrompt:
    prompt: str
    tag: str
    include: tuple[Mapping, ...]
    exclude: tuple[Mapping, ...] = ()

    @property
    def metadata(self) -> dict:
        return {"tag": self.tag, "include": [dict(r) for r in self.include], "exclude": [dict(r) for r in self.exclude]}

    @property
    def target(self) -> str:
        """The metadata as canonical JSON: what rollout rows carry and the reward reads back."""
        return json.dumps(self.metadata, sort_keys=True, separators=(",", ":"))

    @property
    def caption(self) -> str:
        return self.prompt.removeprefix("a photo of ")

    @classmethod
    def from_target(cls, prompt: str, target: str) -> GenEvalPrompt:
        return from_metadata({**json.loads(target), "prompt": prompt})


def _check_clause(req: object, where: str, n_before: int, is_include: bool) -> dict:
    if not isinstance(req, Mapping) or "class" not in req or "count" not in req:
        raise GenEvalPromptError(f"{where}: each clause needs 'class' and 'count', got {req!r}")
    if not isinstance(req["count"], int) or req["count"] < 1:
        raise GenEvalPromptError(f"{where}: 'count' must be a positive integer, got {req['count']!r}")
    unknown = set(req) - {"class", "count", "color", "position"}
    if unknown:
        raise GenEvalPromptError(f"{where}: unknown clause keys {sorted(unknown)}")
    if "position" in req:
        pos = req["position"]
        if not is_include:
            raise GenEvalPromptError(f"{where}: only include clauses may have a position")
        if (not isinstance(pos, Sequence) or len(pos) != 2 or pos[0] not in RELATIONS or not isinstance(pos[1], int)
                or not 0 <= pos[1] < n_before):
            raise GenEvalPromptError(
                f"{where}: position must be [relation, index of an earlier include clause] with relation one of "
                f"{list(RELATIONS)}, got {pos!r}"
            )
    return dict(req)


def from_metadata(row: Mapping, where: str = "metadata") -> GenEvalPrompt:
    """A record from one metadata line, validated."""
    for key in ("tag", "include", "prompt"):
        if key not in row:
            raise GenEvalPromptError(f"{where}: missing '{key}' (GenEval metadata lines have tag, include, prompt)")
    if row["tag"] not in TAGS:
        raise GenEvalPromptError(f"{where}: unknown tag {row['tag']!r}; GenEval's tags are {list(TAGS)}")
    include = [_check_clause(r, where, i, True) for i, r in enumerate(row["include"])]
    if not include:
        raise GenEvalPromptError(f"{where}: 'include' is empty")
    exclude = [_check_clause(r, where, 0, False) for r in row.get("exclude", [])]
    return GenEvalPrompt(str(row["prompt"]), row["tag"], tuple(include), tuple(exclude))


def read_metadata(path: Path) -> list[GenEvalPrompt]:
    """GenEval's evaluation_metadata.jsonl or Flow-GRPO's train/test_metadata.jsonl (one JSON object a line)."""
    path = Path(path)
    missing = f"GenEval metadata file not found: {path}; set geneval.metadata_dir or run `gdro prompts`"
    out = [from_metadata(row, where) for where, row in jsonl_records(path, GenEvalPromptError, missing)]
    if not out:
        raise GenEvalPromptError(f"GenEval metadata file {path} is empty")
    return out


def write_metadata(path: Path, records: Sequence[GenEvalPrompt]) -> None:
    """Flow-GRPO's metadata format, written atomically."""
    text = "".join(json.dumps({**r.metadata, "prompt": r.prompt}) + "\n" for r in records)
    atomic_write(Path(path), lambda tmp: tmp.write_text(text))


def metadata_sets(metadata_dir: Path, n_val: int) -> dict[str, list[GenEvalPrompt]]:
    """Train and test from a metadata directory; the last ``n_val`` training prompts become validation."""
    d = Path(metadata_dir)
    test_file = d / "test_metadata.jsonl"
    if not test_file.is_file():
        test_file = d / "evaluation_metadata.jsonl"
    train = fold_repeats(read_metadata(d / "train_metadata.jsonl"), d / "train_metadata.jsonl", GenEvalPromptError)
    if len(train) <= n_val:
        raise GenEvalPromptError(f"{d / 'train_metadata.jsonl'} has {len(train)} prompts, not more than prompts.n_val={n_val}")
    test = fold_repeats(read_metadata(test_file), test_file, GenEvalPromptError)
    sets = {"train": train[: len(train) - n_val], "test": test, "val": train[len(train) - n_val :]}
    return drop_held_out_from_train(sets, lambda r: r.prompt, d)


def check_world_can_draw(sets: Mapping[str, Sequence[GenEvalPrompt]], classes: Sequence[str],
                         colors: Sequence[str], where: str) -> None:
    """The built-in shapes world draws only ``geneval.classes`` in ``geneval.colors``: refuse prompts that name
    anything else before any stage runs (a real checkpoint draws any class)."""
    names = {(r.prompt, c.get("class"), c.get("color")) for rs in sets.values() for r in rs
             for c in (*r.include, *r.exclude)}
    bad_classes = sorted({c for _, c, _ in names if c not in classes})
    bad_colors = sorted({k for _, _, k in names if k is not None and k not in colors})
    if bad_classes or bad_colors:
        n = len({p for p, c, k in names if c in bad_classes or k in bad_colors})
        what = ", ".join(repr(x) for x in (bad_classes + bad_colors)[:3])
        raise PromptError(
            f"{where}: {n} prompt(s) name classes or colours the built-in shapes world cannot draw ({what}); it draws "
            f"geneval.classes {list(classes)} in geneval.colors {list(colors)}: set model.source to a real checkpoint "
            "for these prompts, or clear geneval.metadata_dir to generate prompts over the world's classes"
        )


def validate_sets(sets: Mapping[str, Sequence[GenEvalPrompt]], params, where: str) -> None:
    """No prompt twice in a set, no held-out prompt in train, and (built-in model) every prompt encodable."""
    for split, records in sets.items():
        check_unique(list(records), f"{where} ({split})")
    train = {r.prompt for r in sets.get("train", [])}
    for split in ("test", "val"):
        leaked = sorted({r.prompt for r in sets.get(split, []) if r.prompt in train})
        if leaked:
            raise PromptError(f"{where}: {len(leaked)} {split} prompt(s) also occur in train, e.g. {leaked[0]!r}: "
                              "held-out prompts must never be trained on; remove them from train")
    if params.model.source == "builtin":
        check_world_can_draw(sets, params.geneval.classes, params.geneval.colors, where)
        every = [r for records in sets.values() for r in records]
        check_builtin_encodable(every, params.model.builtin.max_tokens, tokenizer_words(params), where)


# --- generation, as GenEval's prompt generator does it ------------------------------------------------------


def with_article(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


def plural(noun: str) -> str:
    return noun + "es" if noun.endswith(("s", "x", "ch", "sh")) else noun + "s"


def single_object(cls: str) -> GenEvalPrompt:
    return GenEvalPrompt(f"a photo of {with_article(cls)}", "single_object", ({"class": cls, "count": 1},))


def two_object(a: str, b: str) -> GenEvalPrompt:
    return GenEvalPrompt(f"a photo of {with_article(a)} and {with_article(b)}", "two_object",
                         ({"class": a, "count": 1}, {"class": b, "count": 1}))


def counting(cls: str, n: int) -> GenEvalPrompt:
    return GenEvalPrompt(f"a photo of {NUMBERS[n]} {plural(cls)}", "counting", ({"class": cls, "count": n},),
                         ({"class": cls, "count": n + 1},))


def colors(cls: str, color: str) -> GenEvalPrompt:
    return GenEvalPrompt(f"a photo of {with_article(f'{color} {cls}')}", "colors",
                         ({"class": cls, "count": 1, "color": color},))


def position(a: str, rel: str, b: str) -> GenEvalPrompt:
    """``a`` is ``rel`` ``b``; ``b`` is the first group, as in GenEval."""
    return GenEvalPrompt(f"a photo of {with_article(a)} {rel} {with_article(b)}", "position",
                         ({"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}))


def color_attr(a: str, ca: str, b: str, cb: str) -> GenEvalPrompt:
    return GenEvalPrompt(f"a photo of {with_article(f'{ca} {a}')} and {with_article(f'{cb} {b}')}", "color_attr",
                         ({"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}))


def all_prompts(tag: str, classes: Sequence[str], palette: Sequence[str], max_count: int) -> list[GenEvalPrompt]:
    """Every distinct prompt of ``tag`` over the classes and colours."""
    if tag == "single_object":
        return [single_object(c) for c in classes]
    if tag == "two_object":
        return [two_object(a, b) for a, b in itertools.combinations(classes, 2)]
    if tag == "counting":
        return [counting(c, n) for c in classes for n in range(2, max_count + 1)]
    if tag == "colors":
        return [colors(c, k) for c in classes for k in palette]
    if tag == "position":
        return [position(a, r, b) for a, b in itertools.permutations(classes, 2) for r in RELATIONS]
    if tag == "color_attr":
        return [color_attr(a, ca, b, cb) for a, b in itertools.combinations(classes, 2)
                for ca, cb in itertools.permutations(palette, 2)]
    raise GenEvalPromptError(f"unknown tag {tag!r}; GenEval's tags are {list(TAGS)}")


def generate_sets(
    classes: Sequence[str], palette: Sequence[str], max_count: int, tags: Sequence[str], sizes: Mapping[str, int],
    seed: int,
) -> dict[str, list[GenEvalPrompt]]:
    """Disjoint prompt sets of the given sizes, the tags taking turns within each set.

    Each tag's distinct prompts are shuffled and shared among the sets in proportion to their sizes
    (at least one each where the tag has enough), so every set holds every tag and no prompt is in two sets.
    """
    rng = random.Random(seed)
    splits = [s for s in SPLITS if sizes.get(s, 0) > 0]
    total = sum(sizes[s] for s in splits)
    pools: dict[str, dict[str, list[GenEvalPrompt]]] = {s: {} for s in splits}
    for tag in tags:
        items = all_prompts(tag, classes, palette, max_count)
        rng.shuffle(items)
        start = 0
        for i, s in enumerate(splits):
            share = len(items) - start if i == len(splits) - 1 else max(
                min(1, len(items) - start), round(len(items) * sizes[s] / total))
            pools[s][tag] = items[start : start + share]
            start += share
    out = {}
    for s in splits:
        chosen: list[GenEvalPrompt] = []
        queues = {t: list(pools[s][t]) for t in tags}
        while len(chosen) < sizes[s] and any(queues.values()):
            for t in tags:
                if queues[t] and len(chosen) < sizes[s]:
                    chosen.append(queues[t].pop(0))
        if len(chosen) < sizes[s]:
            raise GenEvalPromptError(
                f"asked for {sizes[s]} {s} prompts but the classes, colours and tags give only {len(chosen)} for it; "
                "add geneval.classes or geneval.colors, or lower prompts.n_*"
            )
        out[s] = chosen
    return out


# --- the built-in world's captions ---------------------------------------------------------------------------


def scene_prompts(geneval) -> list[GenEvalPrompt]:
    """Every prompt the world can caption (``geneval`` params section): what the built-in model pretrains on."""
    return [r for t in geneval.tags for r in all_prompts(t, geneval.classes, geneval.colors, geneval.max_count)]


def caption_words(params) -> list[str]:
    """The words of the built-in world's captions."""
    return words_of([r.prompt for r in scene_prompts(params.geneval)])


def tokenizer_words(params) -> list[str]:
    """The words the built-in tokenizer reads whole: none (``model.builtin.tokenizer: char``) or the captions'."""
    return caption_words(params) if params.model.builtin.tokenizer == "word" else []
