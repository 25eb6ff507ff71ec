"""OCR reward, scored as Flow-GRPO does: r = 1 − min(Lev(pred, target), |target|) / |target|.

A reader that fails on an image scores it 0 and keeps the error in its row (the ``error`` column)
instead of ending the run; :func:`gdro_core.data.scoring.check_errors` fails the stage once the
share of such images passes a threshold.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import Levenshtein
import pandas as pd
from PIL import Image

from gdro_core.rewards.base import RewardError
from gdro_core.evaluation.summary import summarise as summarise_columns
from gdro_core.tasks.ocr.reader import Reader

Progress = Callable[[int, int], None]
COLUMNS = ["read", "reward", "exact", "similarity", "error"]
REWARD_SUMMARY = ("reward", "exact", "similarity")


def normalise(text: str) -> str:
    """Lower-case and strip all whitespace, as the Flow-GRPO OCR reward does."""
    return "".join(text.lower().split())


@dataclass(frozen=True)
class OcrScore:
    reward: float
    exact: bool
    similarity: float
    read: str


def ocr_reward(read: str, target: str, substring_full_credit: bool = False) -> OcrScore:
    """Reward for text ``read`` against ``target``; similarity is the plain normalised edit similarity."""
    pred, tgt = normalise(read), normalise(target)
    if not tgt:
        raise ValueError("OCR target is empty after normalisation; the quoted text must contain a character")
    dist = Levenshtein.distance(pred, tgt)
    similarity = 1.0 - min(dist, len(tgt)) / len(tgt)
    reward = 1.0 if substring_full_credit and tgt in pred else similarity
    return OcrScore(reward=reward, exact=pred == tgt, similarity=similarity, read=pred)


def _read_each(reader: Reader, images: list[Image.Image]) -> list[tuple[str, str]]:
    """Read a batch; if the batch fails, read its images one by one so one bad image costs only itself."""
    try:
        return [(text, "") for text in reader.read(images)]
    except Exception:  # noqa: BLE001 - any reader failure is isolated to the image that causes it
        out = []
        for im in images:
            try:
                out.append((reader.read([im])[0], ""))
            except Exception as err:  # noqa: BLE001 - recorded in the image's row, counted by check_errors
                out.append(("", f"{type(err).__name__}: {err}"))
        return out


def score_images(
    images: list[Image.Image], targets: list[str], reader: Reader, substring_full_credit: bool, batch_size: int,
    progress: Progress | None = None,
) -> pd.DataFrame:
    """Columns read, reward, exact, similarity, error for each (image, target); unreadable images score 0."""
    records = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        for (read, error), target in zip(_read_each(reader, chunk), targets[start : start + batch_size]):
            s = ocr_reward(read, target, substring_full_credit)
            reward, similarity = (0.0, 0.0) if error else (s.reward, s.similarity)
            records.append(
                {"read": s.read, "reward": reward, "exact": s.exact and not error, "similarity": similarity,
                 "error": error}
            )
        if progress:
            progress(min(start + batch_size, len(images)), len(images))
    return pd.DataFrame.from_records(records, columns=COLUMNS)


def score_rollouts(rows: list[dict], rollout_dir: Path, reader: Reader, substring_full_credit: bool, batch_size: int,
                   progress: Progress | None = None) -> pd.DataFrame:
    """One row per rollout image: its manifest row plus its scores."""
    images = [Image.open(Path(rollout_dir) / r["image"]) for r in rows]
    scores = score_images(images, [r["target"] for r in rows], reader, substring_full_credit, batch_size, progress)
    return pd.concat([pd.DataFrame.from_records(rows), scores], axis=1)


def summarise(scores: pd.DataFrame) -> dict[str, float]:
    """Means of the reward, exact and similarity columns and of the judge columns (``judge_missing`` counted)."""
    return summarise_columns(scores, REWARD_SUMMARY)


def reader_ceiling(
    images: Sequence[Image.Image], targets: Sequence[str], reader: Reader, substring: bool, batch_size: int
) -> dict[str, float]:
    """The summary of the world's own clean renders of ``targets``: the best any model can score with this reader."""
    return summarise(score_images(list(images), list(targets), reader, substring, batch_size))


class OcrReward:
    """The OCR reward as a reward of the rewards seam (``rewards.weights: {ocr: ...}``); options: the ``reward``
    section of params.yaml."""

    name = "ocr"
    needs_world = False

    def __init__(self, params, reader: Reader | None = None):
        from gdro_core.tasks.ocr.reader import reader_from_params

        self.params = params
        self.reader = reader if reader is not None else reader_from_params(params)

    @classmethod
    def from_params(cls, params, options: dict) -> OcrReward:
        if options:
            raise RewardError("the ocr reward takes its options from the `reward` section, not rewards.options.ocr")
        return cls(params)

    def score(self, images: list[Image.Image], records: Sequence, progress: Progress | None = None) -> pd.DataFrame:
        r = self.params.reward
        return score_images(list(images), [q.target for q in records], self.reader, r.substring_full_credit,
                            r.batch_size, progress)
