"""The OCR reward formula (Flow-GRPO's) and the reader on the world's own clean renders."""

import random

import pytest

from gdro_core.tasks.ocr import EasyOcrReader, normalise, ocr_reward
from gdro_core.data.prompts import random_strings
from gdro_core.tasks.text_render import render_text


def test_normalise_lowercases_and_strips_spaces():
    assert normalise(" Ab 1\tC\n") == "ab1c"


@pytest.mark.parametrize(
    "read, target, reward",
    [
        ("123", "123", 1.0),
        ("12", "123", 1 - 1 / 3),  # one deletion
        ("124", "123", 1 - 1 / 3),  # one substitution
        ("", "123", 0.0),
        ("987654", "123", 0.0),  # distance capped at |target|
        ("O PEN", "open", 1.0),
    ],
)
def test_reward_is_one_minus_capped_normalised_distance(read, target, reward):
    assert ocr_reward(read, target).reward == pytest.approx(reward)


def test_substring_full_credit_is_an_option():
    s = ocr_reward("x123y", "123")
    assert s.reward == pytest.approx(1 - 2 / 3) and not s.exact
    t = ocr_reward("x123y", "123", substring_full_credit=True)
    assert t.reward == 1.0 and not t.exact and t.similarity == pytest.approx(1 - 2 / 3)


def test_exact_match_and_similarity_are_recorded():
    s = ocr_reward("123", "123")
    assert s.exact and s.similarity == 1.0 and s.read == "123"


def test_empty_target_is_rejected():
    with pytest.raises(ValueError, match="empty"):
        ocr_reward("1", "  ")


def test_easyocr_reads_clean_renders(default_params):
    """The reader must be reliable on the world's own renders, or the reward measures the reader."""
    w = default_params.world
    targets = random_strings(w.alphabet, w.min_len, w.max_len, 12, random.Random(3))
    images = [render_text(t, w.height, w.width, w.font_size) for t in targets]
    r = default_params.reward
    reads = EasyOcrReader(r.upscale, r.pad, w.alphabet).read(images)
    mean = sum(ocr_reward(a, t).reward for a, t in zip(reads, targets)) / len(targets)
    assert mean >= 0.95, list(zip(reads, targets))
