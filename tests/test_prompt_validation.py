"""Prompt sets that would silently train or evaluate on the wrong thing are refused with the reason."""

import json

import pytest

from gdro_core.params import parse_params
from gdro_core.tasks.ocr.prompts import (
    OcrPrompt, PromptError, load_prompt_source, read_prompt_file, read_prompts, validate_prompt_sets, write_prompts,
)


def sets(train, test, val=()):
    mk = lambda ts: [OcrPrompt(f'"{t}" on a sign', t) for t in ts]  # noqa: E731
    out = {"train": mk(train), "test": mk(test)}
    if val:
        out["val"] = mk(val)
    return out


def test_valid_sets_pass(tiny_params):
    validate_prompt_sets(sets(["123", "456"], ["789"], ["012"]), tiny_params, "here")


def test_long_prompt_is_refused_naming_it(tiny_params):
    long = "a" * 90 + ' "123"'
    with pytest.raises(PromptError, match="over the text encoder's limit of 32") as err:
        validate_prompt_sets({"train": [OcrPrompt(long, "123")], "test": []}, tiny_params, "here")
    assert f"prompt 1 '{'a' * 80}'... (96 characters) is" in str(err.value)  # its start, not the whole paragraph


def test_characters_outside_the_vocabulary_are_named(tiny_params):
    bad = tiny_params.model_copy(update={"reward": tiny_params.reward.model_copy(update={"restrict_to_alphabet": False})})
    with pytest.raises(PromptError, match="cannot read: '.*é"):
        validate_prompt_sets(sets(["4😀é"], ["789"]), bad, "here")


def test_targets_outside_the_alphabet_are_named(tiny_params):
    with pytest.raises(PromptError, match="outside world.alphabet: 'ab'"):
        validate_prompt_sets(sets(["12ab"], ["789"]), tiny_params, "here")


def test_duplicates_and_held_out_leakage_are_refused(tiny_params):
    with pytest.raises(PromptError, match="duplicate"):
        validate_prompt_sets(sets(["123", "123"], ["789"]), tiny_params, "here")
    with pytest.raises(PromptError, match="test target.*also occur in train.*'789'"):
        validate_prompt_sets(sets(["123", "789"], ["789"]), tiny_params, "here")


def test_a_held_out_target_placed_in_train_jsonl_is_refused_when_read(tmp_path):
    for split, items in sets(["123", "456"], ["789"], ["012"]).items():
        write_prompts(tmp_path / f"{split}.jsonl", items)
    read_prompts(tmp_path / "train.jsonl")
    with open(tmp_path / "train.jsonl", "a") as f:  # a careless hand edit
        f.write(json.dumps({"prompt": '"012" as a label', "target": "012"}) + "\n")
    with pytest.raises(PromptError, match="val target.*'012'"):
        read_prompts(tmp_path / "train.jsonl")


def test_flow_grpo_prompt_files_load_and_malformed_lines_are_located(tmp_path):
    src = tmp_path / "ocr"
    src.mkdir()
    (src / "train.txt").write_text(
        'A bustling street market where a wooden sign reads "Fresh Bread Daily" in chalk\n'
        '\n'
        'An old lighthouse with the words "Keep The Light" painted on its side at dusk\n'
        'A neon sign that says "Open 24 Hours" above a diner door\n'
    )
    (src / "test.txt").write_text('A chalkboard menu with "Soup of the Day" written at the top\n')
    got = load_prompt_source(src, n_val=1)
    assert [p.target for p in got["train"]] == ["Fresh Bread Daily", "Keep The Light"]
    assert [p.target for p in got["val"]] == ["Open 24 Hours"]
    assert got["test"][0].target == "Soup of the Day"
    (src / "test.txt").write_text('fine "ok"\nno quotes on this line\n')
    with pytest.raises(PromptError, match=r"test.txt:2: no target text between double quotes"):
        read_prompt_file(src / "test.txt")


def source_dirs(tmp_path):
    """Empty prompt-source directories for the OCR and the general task."""
    ocr, general = tmp_path / "ocr", tmp_path / "general"
    ocr.mkdir()
    general.mkdir()
    return ocr, general


def test_prompt_files_saved_with_a_byte_order_mark_read_as_written_and_other_encodings_are_named(tmp_path):
    """Editors on Windows save UTF-8 with a byte-order mark: it must not become part of the first prompt."""
    from gdro_core.data.manifest import ManifestError, read_manifest
    from gdro_core.tasks.general.prompts import load_prompt_source as general_source
    from gdro_core.tasks.geneval.prompts import GenEvalPromptError, read_metadata

    ocr, general = source_dirs(tmp_path)
    bom = "\ufeff"
    (ocr / "train.txt").write_text(f'{bom}A sign that reads "CAF\u00c9"\r\nA card that says "TEA"\r\n', encoding="utf-8")
    (ocr / "test.txt").write_text(f'{bom}A mug that says "MILK"\n', encoding="utf-8")
    got = load_prompt_source(ocr, n_val=0)
    assert [(p.prompt, p.target) for p in got["train"]] == [('A sign that reads "CAF\u00c9"', "CAF\u00c9"),
                                                           ('A card that says "TEA"', "TEA")]
    (general / "train.txt").write_text(f"{bom}a photo of a caf\u00e9\nan owl\n", encoding="utf-8")
    (general / "test.txt").write_text(f"{bom}a cat\n", encoding="utf-8")
    assert [p.prompt for p in general_source(general, n_val=0)["train"]] == ["a photo of a caf\u00e9", "an owl"]
    metadata = tmp_path / "test_metadata.jsonl"
    metadata.write_text(bom + json.dumps({"tag": "single_object", "include": [{"class": "cat", "count": 1}],
                                           "prompt": "a photo of a cat"}) + "\n", encoding="utf-8")
    assert [p.prompt for p in read_metadata(metadata)] == ["a photo of a cat"]

    (ocr / "test.txt").write_text('A mug that says "MILK"\r\n', encoding="utf-16")  # PowerShell's `>`: UTF-16, BOM
    assert [p.target for p in load_prompt_source(ocr, n_val=0)["test"]] == ["MILK"]
    (ocr / "test.txt").write_bytes('A mug that says "OK"\nA sign that reads "CAF\u00c9"\n'.encode("latin-1"))
    with pytest.raises(PromptError, match=r"test.txt:2: not UTF-8 text \(byte 0xc9\): save the file as UTF-8"):
        load_prompt_source(ocr, n_val=0)
    (general / "test.txt").write_bytes("a caf\u00e9\n".encode("latin-1"))
    with pytest.raises(PromptError, match=r"test.txt:1: not UTF-8 text"):
        general_source(general, n_val=0)
    metadata.write_bytes(json.dumps({"prompt": "caf\u00e9"}, ensure_ascii=False).encode("latin-1"))
    with pytest.raises(GenEvalPromptError, match=r"test_metadata.jsonl:1: not UTF-8 text"):
        read_metadata(metadata)
    manifest = tmp_path / "images.jsonl"
    manifest.write_bytes(json.dumps({"prompt": "caf\u00e9", "image": "a.png", "reward": 1.0},
                                    ensure_ascii=False).encode("latin-1"))
    with pytest.raises(ManifestError, match=r"images.jsonl:1: not UTF-8 text"):
        read_manifest(manifest, {})


def test_a_line_repeated_in_a_prompt_file_is_one_prompt_with_a_note(tmp_path, caplog):
    """As with GenEval's metadata files: a peer's file that lists a prompt twice is read, the repeat folded."""
    from gdro_core.tasks.general.prompts import load_prompt_source as general_source

    ocr, general = source_dirs(tmp_path)
    (ocr / "train.txt").write_text('A sign that reads "OPEN"\nA card that says "TEA"\nA sign that reads "OPEN"\n')
    (ocr / "test.txt").write_text('A mug that says "MILK"\n')
    (general / "train.txt").write_text("a cat\nan owl\na cat\na cat\n")
    (general / "test.txt").write_text("a dog\n")
    with caplog.at_level("WARNING", logger="gdro"):
        assert [p.target for p in load_prompt_source(ocr, n_val=0)["train"]] == ["OPEN", "TEA"]
        assert [p.prompt for p in general_source(general, n_val=0)["train"]] == ["a cat", "an owl"]
    assert "1 repeated lines folded into 2 prompts" in caplog.text
    assert "2 repeated lines folded into 2 prompts" in caplog.text


def test_published_splits_that_overlap_keep_their_held_out_prompts_and_train_without_them(tmp_path, caplog):
    """Flow-GRPO's PickScore train.txt holds 3 of its test prompts; its files are read as published: the held-out
    sets stay whole and the overlapping prompts are left out of train, with a note (OCR: by target text)."""
    from gdro_core.tasks.general.prompts import load_prompt_source as general_source

    ocr, general = source_dirs(tmp_path)
    (ocr / "train.txt").write_text('A sign that reads "OPEN"\nA card that says "TEA"\nA mug with "Milk" on it\n')
    (ocr / "test.txt").write_text('A door with "open" painted on it\n')
    (general / "train.txt").write_text("Full body photo of a cat\nan owl\na dog\n")
    (general / "test.txt").write_text("full body photo of a cat\n")
    with caplog.at_level("WARNING", logger="gdro"):
        got = load_prompt_source(ocr, n_val=1)
        assert [p.target for p in got["train"]] == ["TEA"] and [p.target for p in got["val"]] == ["Milk"]
        assert [p.target for p in got["test"]] == ["open"]
        validate_prompt_sets(got, parse_params({"reward": {"restrict_to_alphabet": False}}), "ocr")
        sets = general_source(general, n_val=1)
        assert [p.prompt for p in sets["train"]] == ["an owl"] and [p.prompt for p in sets["test"]] == [
            "full body photo of a cat"]
    assert caplog.text.count("1 training prompt(s) also held out") == 2
