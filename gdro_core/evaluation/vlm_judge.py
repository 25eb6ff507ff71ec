"""A UnifiedReward-style vision-language judge (the paper's judge), loaded from a local directory."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

from PIL import Image

from gdro_core.evaluation.judge_scores import SCORE_MAX, SCORE_MIN, JudgeScores

PROMPT = (
    "You are given a text caption and a generated image based on that caption. Evaluate the image on three "
    "criteria, each from 1 to 5: Alignment (does the image show what the caption asks for, including any text "
    "exactly), Coherence (is the image free of artefacts, distortions and broken structure) and Style (is it "
    "aesthetically consistent and natural rather than flat or exaggerated). Answer exactly in this format:\n"
    "Alignment Score (1-5): X\nCoherence Score (1-5): X\nStyle Score (1-5): X\n"
    "Your task is provided as follows:\nText Caption: [{prompt}]"
)
_SCORE = re.compile(r"(Alignment|Coherence|Style)\s*Score\s*(?:\(1-5\))?\s*:\s*([0-9]*\.?[0-9]+)", re.IGNORECASE)


log = logging.getLogger("gdro")
MISSING = JudgeScores(math.nan, math.nan, math.nan)


class JudgeOutputError(ValueError):
    """The judge's answer does not contain all three scores."""


def parse_scores(text: str) -> JudgeScores:
    """Scores from 'Alignment Score (1-5): 4.5' style lines, clipped to [1, 5]."""
    found = {name.lower(): float(value) for name, value in _SCORE.findall(text)}
    missing = {"alignment", "coherence", "style"} - found.keys()
    if missing:
        raise JudgeOutputError(f"judge answer lacks {sorted(missing)} scores: {text[:200]!r}")
    clip = lambda v: min(max(v, SCORE_MIN), SCORE_MAX)  # noqa: E731
    return JudgeScores(clip(found["alignment"]), clip(found["coherence"]), clip(found["style"]))


class UnifiedRewardJudge:
    """transformers image-text-to-text model (e.g. UnifiedReward-qwen on Qwen2.5-VL) with its chat template."""

    def __init__(self, model, processor, max_new_tokens: int):
        self.model, self.processor, self.max_new_tokens = model, processor, max_new_tokens

    @classmethod
    def from_pretrained(cls, path: str, max_new_tokens: int, device: str = "auto") -> UnifiedRewardJudge:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if not path or not Path(path).is_dir():
            raise FileNotFoundError(
                f"judge.model_path {path!r} is not a local directory: download a UnifiedReward checkpoint "
                "(e.g. UnifiedReward-qwen-7b) and point judge.model_path at it, or use judge.kind: pixel"
            )
        from gdro_core.build_lock import building
        from gdro_core.models.base import pick_device

        with building():
            model = AutoModelForImageTextToText.from_pretrained(path, dtype="auto").to(pick_device(device)).eval()
            return cls(model, AutoProcessor.from_pretrained(path), max_new_tokens)

    def answer(self, image: Image.Image, prompt: str) -> str:
        messages = [{"role": "user", "content": [
            {"type": "image", "image": image.convert("RGB")},
            {"type": "text", "text": PROMPT.format(prompt=prompt)},
        ]}]
        inputs = self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        ).to(self.model.device)
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return self.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]

    def score(self, images: list[Image.Image], prompts: list[str], targets: list[str]) -> list[JudgeScores]:
        """One answer per image; an answer without the three scores is recorded as missing (NaN), never fatal."""
        out = []
        for im, p in zip(images, prompts):
            try:
                out.append(parse_scores(self.answer(im, p)))
            except JudgeOutputError as err:
                log.warning("judge answer unusable for prompt %r, recorded as missing: %s", p, err)
                out.append(MISSING)
        return out
