"""The VLM judge's answer parser on recorded model outputs, and its clear error on a missing model."""

import pytest

from gdro_core.evaluation.vlm_judge import JudgeOutputError, UnifiedRewardJudge, parse_scores

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


# A real UnifiedReward checkpoint is a multi-GB download, so the loading, chat-template, image and generate
# path of UnifiedRewardJudge is exercised on a tiny random-weight Qwen2.5-VL built and saved here instead.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IMAGE_SIDE = 56  # 4x4 patches of 14 px, merged 2x2: 4 <|image_pad|> tokens
IMAGE_TOKENS = (IMAGE_SIDE // 14) ** 2 // 2**2
MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def tiny_judge_dir(tmp_path_factory):
    """A random-weight Qwen2.5-VL checkpoint (bfloat16, like released ones) with a byte-level BPE tokenizer,
    the Qwen2-VL image processor and chat template, saved the way hub checkpoints are."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    from gdro_core.evaluation.vlm_judge import PROMPT

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [PROMPT.format(prompt="a red sign that says OPEN"), "You are a helpful assistant. system user assistant"]
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = dict(zip(SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)))
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                                    video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN2_VL_CHAT_TEMPLATE)

    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1,
            # head_dim 16: the 8 rotary frequencies split over (temporal, height, width) positions
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 32,
                       "patch_size": 14, "spatial_merge_size": 2, "fullatt_block_indexes": [0]},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("tiny-qwen2_5_vl-judge")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _image(seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8))


def test_tiny_qwen2_5_vl_judge_answers_from_image_and_prompt(tiny_judge_dir, monkeypatch):
    """The judge loads a saved checkpoint, puts the image and the scoring prompt through the chat template
    into generate, and decodes at most max_new_tokens new tokens."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from gdro_core.evaluation.vlm_judge import PROMPT

    judge = UnifiedRewardJudge.from_pretrained(str(tiny_judge_dir), max_new_tokens=MAX_NEW_TOKENS)
    assert isinstance(judge.model, Qwen2_5_VLForConditionalGeneration)
    assert judge.model.dtype == torch.bfloat16  # dtype="auto" keeps the checkpoint's dtype
    tokenizer = judge.processor.tokenizer

    calls = []
    generate = judge.model.generate

    def recording_generate(**kwargs):
        out = generate(**kwargs)
        calls.append((kwargs, out))
        return out

    monkeypatch.setattr(judge.model, "generate", recording_generate)
    answer = judge.answer(_image(0), "a red sign that says OPEN")

    (kwargs, out), = calls
    assert kwargs["max_new_tokens"] == MAX_NEW_TOKENS and kwargs["do_sample"] is False
    input_ids = kwargs["input_ids"]
    assert (input_ids == judge.model.config.image_token_id).sum().item() == IMAGE_TOKENS
    assert kwargs["image_grid_thw"].tolist() == [[1, IMAGE_SIDE // 14, IMAGE_SIDE // 14]]
    assert kwargs["pixel_values"].shape[0] == (IMAGE_SIDE // 14) ** 2
    rendered = tokenizer.decode(input_ids[0], skip_special_tokens=False)
    assert "<|vision_start|>" + "<|image_pad|>" * IMAGE_TOKENS + "<|vision_end|>" in rendered
    assert PROMPT.format(prompt="a red sign that says OPEN") in rendered
    assert rendered.endswith("<|im_start|>assistant\n")

    new_tokens = out[0, input_ids.shape[1]:]
    assert 1 <= len(new_tokens) <= MAX_NEW_TOKENS
    assert isinstance(answer, str)
    assert answer == tokenizer.decode(new_tokens, skip_special_tokens=True)

    # the pixels reach the language model: another image changes the next-token logits
    judge.answer(_image(1), "a red sign that says OPEN")
    with torch.no_grad():
        logits = [judge.model(**{k: v for k, v in kw.items() if k not in ("max_new_tokens", "do_sample")}).logits[0, -1]
                  for kw, _ in calls]
    assert not torch.allclose(logits[0], logits[1])


def test_tiny_random_judge_answers_are_missing_not_made_up(tiny_judge_dir, caplog):
    """A model that does not answer in the score format yields missing scores (and a warning), never made-up ones."""
    judge = UnifiedRewardJudge.from_pretrained(str(tiny_judge_dir), max_new_tokens=MAX_NEW_TOKENS)
    (scores,) = judge.score([_image(0)], ["a red sign that says OPEN"], ["OPEN"])
    assert all(v != v for v in scores.as_dict().values())  # NaN
    assert "lacks ['alignment', 'coherence', 'style'] scores" in caplog.text


def test_an_unparseable_answer_is_recorded_missing_and_counted(caplog):
    import math

    from PIL import Image

    from gdro_core.evaluation.heldout import summarise
    from gdro_core.evaluation.vlm_judge import UnifiedRewardJudge

    answers = iter(["Alignment Score (1-5): 4\nCoherence Score (1-5): 5\nStyle Score (1-5): 3", "I cannot judge this."])

    class Scripted(UnifiedRewardJudge):
        def answer(self, image, prompt):
            return next(answers)

    images = [Image.new("L", (8, 8))] * 2
    scores = Scripted(None, None, 8).score(images, ['"1" on a sign', '"2" on a sign'], ["1", "2"])
    assert scores[0].as_dict() == {"alignment": 4.0, "coherence": 5.0, "style": 3.0}
    assert all(math.isnan(v) for v in scores[1].as_dict().values())
    assert "recorded as missing" in caplog.text
    import pandas as pd

    table = pd.DataFrame([{"reward": 1.0, "u_hat": 4.0, "corrected": 1.2}, {"reward": 0.5, "u_hat": math.nan,
                                                                             "corrected": math.nan}])
    summary = summarise(table)
    assert summary["judge_missing"] == 1.0 and summary["u_hat"] == 4.0 and summary["reward"] == 0.75
