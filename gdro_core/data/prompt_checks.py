"""Checks every task's prompt sets must pass, whatever a prompt record holds besides its ``prompt``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path


class PromptError(ValueError):
    """A prompt or prompt set the task cannot use."""


def fold_repeats(records: Sequence, where: str | Path, error: type[Exception] = PromptError) -> list:
    """One record per prompt, in first-seen order. Peers' prompt files repeat lines (Flow-GRPO's GenEval
    test_metadata.jsonl lists each prompt four times, one line per image); here images per prompt are
    ``rollout.images_per_prompt`` and ``evaluate.images_per_prompt``, so a repeat folds into one, with a note.
    The same prompt with other metadata (``record.metadata``) raises ``error``."""
    first: dict[str, object] = {}
    for r in records:
        seen = first.setdefault(r.prompt, r)
        if seen != r:
            raise error(f"{where}: prompt {r.prompt!r} occurs with different metadata "
                        f"({getattr(seen, 'metadata', seen)} and {getattr(r, 'metadata', r)}): keep one")
    if len(first) < len(records):
        logging.getLogger("gdro").warning(
            "%s: %d repeated lines folded into %d prompts (images per prompt come from evaluate.images_per_prompt "
            "and rollout.images_per_prompt)", where, len(records) - len(first), len(first))
    return list(first.values())


def drop_held_out_from_train(sets: dict[str, list], key: Callable[[object], str], where: str | Path) -> dict[str, list]:
    """``sets`` with every training prompt whose ``key`` (the task's notion of "the same prompt") a held-out split
    holds left out of train, with a note. Peers' published splits overlap (Flow-GRPO's PickScore train.txt holds 3 of
    its test prompts): the held-out sets stay as published, and no held-out prompt is ever trained on."""
    held = {key(p) for split in ("test", "val") for p in sets.get(split, [])}
    leaked = [p for p in sets.get("train", []) if key(p) in held]
    if not leaked:
        return sets
    logging.getLogger("gdro").warning(
        "%s: %d training prompt(s) also held out, e.g. %r: left out of train (held-out prompts are never trained on)",
        where, len(leaked), leaked[0].prompt)
    return {**sets, "train": [p for p in sets["train"] if key(p) not in held]}


def check_unique(prompts: Sequence, where: str) -> None:
    seen: set[str] = set()
    dup = sorted({p.prompt for p in prompts if p.prompt in seen or seen.add(p.prompt)})
    if dup:
        raise PromptError(f"{where}: {len(dup)} duplicate prompt(s), e.g. {dup[0]!r}: each prompt must occur once")


def check_encodable(prompts: Sequence, vocab: set[str], max_tokens: int, count_tokens: Callable[[str], int],
                    where: str) -> None:
    """Every character must be in the tokenizer's vocabulary and every prompt within its length, or the
    target would silently become end-of-text tokens or be cut off."""
    for i, p in enumerate(prompts, 1):
        bad = sorted({c for c in p.prompt if not c.isspace() and c.lower() not in vocab})
        if bad:
            raise PromptError(f"{where}: prompt {i} {shown(p.prompt)} has characters the text encoder cannot read: "
                              f"{''.join(bad)!r}; use only {''.join(sorted(vocab))!r}")
        n = count_tokens(p.prompt)
        if n > max_tokens:
            raise PromptError(f"{where}: prompt {i} {shown(p.prompt)} is {n} tokens, over the text encoder's limit of "
                              f"{max_tokens} (model.builtin.max_tokens): shorten it or raise the limit")


SHOWN_CHARS = 80  # of a prompt quoted in an error; a pasted paragraph would bury the message


def shown(prompt: str) -> str:
    """``prompt`` quoted for a message: whole when short, else its start and its length."""
    if len(prompt) <= SHOWN_CHARS:
        return repr(prompt)
    return f"{prompt[:SHOWN_CHARS]!r}... ({len(prompt)} characters)"


def check_builtin_encodable(prompts: Sequence, max_tokens: int, words: Sequence[str], where: str) -> None:
    """:func:`check_encodable` against the built-in model's tokenizer (``words`` read whole; none: characters)."""
    from gdro_core.models.builtin_tokenizer import CHARACTERS, build_tokenizer

    tok = build_tokenizer(words)
    check_encodable(prompts, set(CHARACTERS), max_tokens, lambda s: len(tok(s).input_ids), where)


def hold_out_val(sets: dict[str, list], n_val: int, source: Path | str) -> dict[str, list]:
    """``sets`` with a ``val`` split: the file's own when given, else the last ``n_val`` training prompts."""
    if "val" in sets or not n_val:
        return sets
    if n_val >= len(sets["train"]):
        raise PromptError(f"{source}/train.txt has {len(sets['train'])} prompts, too few to hold out "
                          f"prompts.n_val={n_val} for validation: add val.txt or lower prompts.n_val")
    return {**sets, "train": sets["train"][:-n_val], "val": sets["train"][-n_val:]}
