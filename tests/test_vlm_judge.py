"""The VLM judge's answer parser on recorded model outputs, and its clear error on a missing model."""

import pytest

from gdro_core.vlm_judge import JudgeOutputError, UnifiedRewardJudge, parse_scores

RECORDED = [
    ("Alignment Score (1-5): 4.5\nCoherence Score (1-5): 3\nStyle Score (1-5): 3.75", (4.5, 3.0, 3.75)),
    ("The caption asks for a sign.\nAlignment Score (1-5): 2.1\n\nCoherence Score (1-5): 4.0\nStyle Score (1-5): 5",
     (2.1, 4.0, 5.0)),
    ("alignment score: 5.0, coherence score: 1.0, style score: 2.5", (5.0, 1.0, 2.5)),
    ("Alignment Score (1-5): 7\nCoherence Score (1-5): 0.2\nStyle Score (1-5): 3", (5.0, 1.0, 3.0)),  # clipped
]


@pytest.mark.parametrize("text, expected", RECORDED)
def test_recorded_answers_parse(text, expected):
    s = parse_scores(text)
    assert (s.alignment, s.coherence, s.style) == pytest.approx(expected)


def test_answer_without_all_scores_is_an_error():
    with pytest.raises(JudgeOutputError, match="style"):
        parse_scores("Alignment Score (1-5): 4\nCoherence Score (1-5): 3")


def test_missing_model_directory_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="judge.model_path"):
        UnifiedRewardJudge.from_pretrained(str(tmp_path / "absent"), max_new_tokens=8)
