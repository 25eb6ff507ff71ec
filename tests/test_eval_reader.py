"""``evaluate.reader_mode``: the stored groups (and an online method's own samples) are scored by ``reward``'s
reader, every reported number (validation checkpoints, held-out images, the ceiling) by the evaluation's."""

import pytest
from conftest import TINY, in_project, scored_copy

from flows.evaluate import evaluate_flow
from flows.train import train_flow
from gdro_core.params import ParamsError, parse_params, reading_params
from gdro_core.tasks.ocr.reader import EasyOcrReader


def test_reading_params_swap_only_the_reader_mode():
    p = parse_params(TINY)
    assert reading_params(p) is p  # null: the reward's own reader
    cheap = parse_params({**TINY, "reward": {"reader_mode": "recognizer"}, "evaluate": {"reader_mode": "full"}})
    read = reading_params(cheap)
    assert read.reward.reader_mode == "full" and cheap.reward.reader_mode == "recognizer"
    assert read.reward.model_dump(exclude={"reader_mode"}) == cheap.reward.model_dump(exclude={"reader_mode"})
    assert read.model_dump(exclude={"reward"}) == cheap.model_dump(exclude={"reward"})


@pytest.fixture()
def reads(monkeypatch) -> list[tuple[str, int]]:
    """Each easyocr read: (its mode, how many images)."""
    calls: list[tuple[str, int]] = []
    real = EasyOcrReader.read

    def spy(self, images):
        calls.append((self.mode, len(images)))
        return real(self, images)

    monkeypatch.setattr(EasyOcrReader, "read", spy)
    return calls


def test_validation_and_held_out_images_are_read_with_the_evaluation_reader(scored, tmp_path, reads):
    # the scored project's groups were read by the full reader; its evaluation reads with the recognizer alone
    params = {**TINY, "evaluate": {**TINY["evaluate"], "reader_mode": "recognizer"}}
    root = tmp_path / "project"
    scored_copy(scored, root, params)
    in_project(root, train_flow)
    assert reads and {mode for mode, _ in reads} == {"recognizer"}, reads  # the monitor's validation images
    reads.clear()
    (metrics,) = in_project(root, evaluate_flow)
    assert {mode for mode, _ in reads} == {"recognizer"}, reads
    held_out = TINY["prompts"]["n_test"] * 2 * 2  # base and trained, evaluate.images_per_prompt 2 each
    assert sum(n for _, n in reads) >= held_out, reads
    assert 0 <= metrics["trained"]["reward"] <= 1


def test_an_online_method_learns_from_the_reward_reader_and_is_read_by_the_evaluation_one(scored, tmp_path, reads):
    params = {**TINY, "train": {**TINY["train"], "objective": "flow_grpo", "steps": 1, "grpo_prompts_per_iteration": 2,
                                "grpo_group_size": 3, "grpo_sample_steps": 2},
              "evaluate": {**TINY["evaluate"], "reader_mode": "recognizer", "checkpoint_every": 1}}
    root = tmp_path / "project"
    scored_copy(scored, root, params)
    in_project(root, train_flow)
    n_val = TINY["evaluate"]["checkpoint_prompts"]
    assert ("full", 2 * 3) in reads, reads  # one iteration's samples: 2 prompts x 3, scored by reward.reader_mode
    assert sum(n for mode, n in reads if mode == "recognizer") >= 2 * n_val, reads  # base and step 1 validation
    assert sum(n for mode, n in reads if mode == "full") == 2 * 3, reads


def recognizer_in(section: str, **reward) -> dict:
    """Params with ``section``'s reader_mode set to recognizer, and ``reward`` settings beside it."""
    if section == "reward":
        return {"reward": {**reward, "reader_mode": "recognizer"}}
    return {"reward": reward, section: {"reader_mode": "recognizer"}}


@pytest.mark.parametrize("section", ["reward", "evaluate"])
def test_the_recognizer_is_refused_where_it_would_misread(section):
    with pytest.raises(ParamsError, match=rf"{section}.reader_mode: recognizer is easyocr's mode.*reward.backend"):
        parse_params(recognizer_in(section, backend="rapidocr"))
    with pytest.raises(ParamsError, match=rf"{section}.reader_mode: recognizer .*real checkpoint.*set it to full"):
        parse_params({**recognizer_in(section), "model": {"source": "/ckpt/sd35"}})
    assert parse_params(recognizer_in(section)).model.source == "builtin"
