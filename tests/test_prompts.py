"""Prompt sets and target extraction."""

import pytest

from gdro_core.tasks.ocr.prompts import PromptError, extract_target, make_prompt_sets, read_prompts, write_prompts


def test_target_is_the_quoted_text():
    assert extract_target('a sign that says "OPEN 24"') == "OPEN 24"


def test_prompt_without_quotes_is_a_clear_error():
    with pytest.raises(PromptError, match="no quoted target"):
        extract_target("a sign that says open")


def test_train_val_and_test_targets_are_disjoint_and_deterministic():
    sets = make_prompt_sets("0123456789", 3, 3, ['a sign "{text}"'], 30, 20, seed=1, n_val=10)
    train = {p.target for p in sets["train"]}
    test = {p.target for p in sets["test"]}
    val = {p.target for p in sets["val"]}
    assert len(train) == 30 and len(test) == 20 and len(val) == 10
    assert not train & test and not train & val and not val & test
    again = make_prompt_sets("0123456789", 3, 3, ['a sign "{text}"'], 30, 20, seed=1, n_val=10)
    assert again == sets
    assert all(extract_target(p.prompt) == p.target for p in sets["train"])


def test_too_many_prompts_for_the_world_is_an_error():
    with pytest.raises(PromptError, match="distinct"):
        make_prompt_sets("01", 1, 1, ['"{text}"'], 2, 2, seed=0)


def test_prompt_files_round_trip(tmp_path):
    sets = make_prompt_sets("0123456789", 3, 3, ['a sign "{text}"'], 5, 5, seed=2)
    write_prompts(tmp_path / "train.jsonl", sets["train"])
    assert read_prompts(tmp_path / "train.jsonl") == sets["train"]


def test_prompt_file_with_unquoted_prompt_is_rejected(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "no quotes here"}\n')
    with pytest.raises(PromptError, match="no quoted target"):
        read_prompts(tmp_path / "bad.jsonl")
