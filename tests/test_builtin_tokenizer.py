"""The built-in model's tokenizer: character-level by default (OCR's figures rest on it), or the task's caption
words read whole (``model.builtin.tokenizer: word``), and what a saved base loads back with."""

import pytest
import torch

from gdro_core.data.prompt_checks import PromptError
from gdro_core.models import load_model
from gdro_core.models.builtin import build_builtin_pipeline
from gdro_core.models.builtin_tokenizer import build_tokenizer
from gdro_core.params import load_params
from gdro_core.tasks.geneval.prompts import validate_sets
from gdro_core.tasks.registry import caption_words, make_task


def builtin_tokenizer(params):
    """The tokenizer the built-in model is built with for ``params``: its task's caption words, or characters."""
    return build_tokenizer(caption_words(params))


pytestmark = pytest.mark.usefixtures("one_thread")


def geneval(tokenizer: str, max_tokens: int):
    return load_params("params-geneval.yaml", {"model.builtin.tokenizer": tokenizer, "model.builtin.max_tokens": max_tokens})


def test_character_tokenizer_reads_one_token_per_character():
    tok = build_tokenizer()
    prompt = '"407" written on a wall'
    tokens = tok.convert_ids_to_tokens(tok(prompt).input_ids)
    assert len(tokens) == len(prompt.replace(" ", "")) + 2  # + start and end of text
    assert [t.removesuffix("</w>") for t in tokens[1:-1]] == list(prompt.replace(" ", ""))


def test_word_tokenizer_reads_every_caption_word_whole_and_spells_out_others():
    p = geneval("word", 16)
    tok = builtin_tokenizer(p)
    for record in make_task(p).scene_prompts():
        tokens = tok.convert_ids_to_tokens(tok(record.prompt).input_ids)
        assert tokens[1:-1] == record.prompt.split(), record.prompt
    assert tok.tokenize("A sign 407") == ["a", "s", "##i", "##g", "##n", "4", "##0", "##7"]


def test_ocr_caption_words_come_from_its_templates_and_digits_stay_characters():
    p = load_params("params.yaml", {"model.builtin.tokenizer": "word"})
    assert caption_words(p) == ["a", "as", "label", "on", "poster", "sign", "wall", "written"]
    assert builtin_tokenizer(p).tokenize('"407" on a sign') == ['"', "4", "##0", "##7", '"', "on", "a", "sign"]
    assert caption_words(load_params("params.yaml")) == []  # the default stays character-level


def test_word_tokenizer_refuses_words_it_could_never_match():
    with pytest.raises(Exception, match="letters or digits"):
        build_tokenizer(["two words"])


def test_prompt_limit_counts_the_tokenizer_in_use():
    sets = make_task(geneval("word", 16)).make_prompt_sets()
    validate_sets(sets, geneval("word", 16), "here")  # the longest caption is 10 words + 2
    with pytest.raises(PromptError, match="over the text encoder's limit of 16"):
        validate_sets(sets, geneval("char", 16), "here")


def test_saved_word_level_base_loads_back_with_the_same_encoding(tmp_path):
    p = geneval("word", 16)
    pipe = build_builtin_pipeline(p.model.builtin, p.image_shape, 1.0, 0, words=caption_words(p))
    pipe.save_pretrained(tmp_path / "base")
    model = load_model(p, tmp_path / "base")
    prompts = ["a photo of a red square left of a blue circle", "a photo of four crosses"]
    with torch.no_grad():
        loaded = model.encode(prompts)
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
        direct = pipe.text_encoder(input_ids=ids.input_ids)
    assert torch.equal(loaded["encoder_hidden_states"], direct.last_hidden_state)
    assert torch.equal(loaded["pooled_projections"], direct.text_embeds)
