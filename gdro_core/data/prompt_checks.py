"""Checks every task's prompt sets must pass, whatever a prompt record holds besides its ``prompt``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path


class PromptError(ValueError):
    """A prompt or prompt set the task cannot use."""


def check_unique(prompts: Sequence, where: str) -> None:
    seen: set[str] = set()
    dup = sorted({p.prompt for p in prompts if p.prompt in seen or seen.add(p.prompt)})
    if dup:
        raise PromptError(f"{where}: {len(dup)} duplicate prompt(s), e.g. {dup[0]!r}: each prompt must occur once")


def check_encodable(prompts: Sequence, vocab: set[str], max_tokens: int, count_tokens: Callable[[str], int],
                    where: str) -> None:
    """Every character must be in the tokenizer's vocabulary and every prompt within its length, or the
    target would silently become end-of-text tokens or be cut off."""
    for p in prompts:
        bad = sorted({c for c in p.prompt if not c.isspace() and c.lower() not in vocab})
        if bad:
            raise PromptError(f"{where}: prompt {p.prompt!r} has characters the text encoder cannot read: "
                              f"{''.join(bad)!r}; use only {''.join(sorted(vocab))!r}")
        n = count_tokens(p.prompt)
        if n > max_tokens:
            raise PromptError(f"{where}: prompt {p.prompt!r} is {n} tokens, over the text encoder's limit of "
                              f"{max_tokens} (model.builtin.max_tokens): shorten it or raise the limit")


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
