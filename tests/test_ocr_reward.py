"""The OCR reward formula (Flow-GRPO's) and the reader on the world's own clean renders."""

import random

import numpy as np
import pytest

from gdro_core.tasks.ocr.reader import EasyOcrReader, ink_box, prepare
from gdro_core.tasks.ocr.reward import normalise, ocr_reward
from gdro_core.tasks.ocr.prompts import random_strings
from gdro_core.tasks.ocr.world import render_text


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


def test_ink_box_is_the_ink_bounding_box_grown_by_the_margin():
    grey = np.full((20, 40), 255, dtype=np.uint8)
    grey[5:15, 10:30] = 0  # ink rows 5..14 (height 10), columns 10..29
    assert ink_box(grey, 0.25, 0.0) == [10, 30, 5, 15]
    assert ink_box(grey, 0.25, 0.2) == [8, 32, 3, 17]  # grown by 0.2 x height = 2 px on every side
    assert ink_box(np.full((20, 40), 128, dtype=np.uint8), 0.25, 0.1) == [0, 40, 0, 20]  # blank: whole image


def test_unknown_reader_mode_is_rejected():
    with pytest.raises(ValueError, match="reader_mode"):
        EasyOcrReader(2, 16, "0123456789", mode="detector")


def test_reader_modes_read_the_same_clean_renders(default_params):
    """Batched full reader, recognizer alone and easyocr's per-image readtext agree on the world's renders."""
    w, r = default_params.world, default_params.reward
    targets = ["407", "918", "235", "805", "661"]
    images = [render_text(t, w.height, w.width, w.font_size) for t in targets]
    full = EasyOcrReader(r.upscale, r.pad, w.alphabet, mode="full")
    per_image = []
    for im in images:
        parts = full.reader.readtext(prepare(im, r.upscale, r.pad), detail=1, allowlist=w.alphabet, paragraph=False)
        per_image.append("".join(q[1] for q in sorted(parts, key=lambda q: min(pt[0] for pt in q[0]))))
    assert full.read(images) == per_image
    assert EasyOcrReader(r.upscale, r.pad, w.alphabet, mode="recognizer").read(images) == per_image
    assert [normalise(x) for x in per_image] == targets


def test_reading_on_a_cpu_prints_no_pinned_memory_or_quantization_warning(default_params, recwarn):
    """easyocr asks torch's DataLoader for pinned memory on every read, and quantizes its recognizer with an API
    torch deprecates; on a CPU torch warned about both, which buried the stages' own output."""
    from gdro_core.tasks.ocr.reader import _easyocr_reader

    _easyocr_reader.cache_clear()  # built afresh here, as in a new stage process
    w, r = default_params.world, default_params.reward
    images = [render_text("407", w.height, w.width, w.font_size)]
    for mode in ("full", "recognizer"):
        assert normalise(EasyOcrReader(r.upscale, r.pad, w.alphabet, mode=mode).read(images)[0]) == "407"
    assert not [str(x.message) for x in recwarn if "pin_memory" in str(x.message) or "quantize" in str(x.message)]
