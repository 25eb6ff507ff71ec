"""CLIP score of any CLIP checkpoint: how well an image matches its prompt.

    reward = max(100 · cos(E_I, E_T), 0)

with ``E_I`` the image embedding (the vision tower's pooled output through the visual projection) and ``E_T`` the
prompt's text embedding (the text tower's pooled output through the text projection, the prompt truncated to
77 tokens). This is torchmetrics' ``CLIPScore`` (scaled by 100 and clipped at 0, so in [0, 100]), the usual
definition in text-to-image papers; Hessel et al. (2021) weigh the clipped cosine by 2.5 instead of 100, which is
the same reward times 0.025 (set it through the weight). The unscaled, unclipped cosine is kept as the part
``cosine``.

Needs on disk (``model_dir``): a transformers CLIP checkpoint, e.g. openai/clip-vit-large-patch14: config.json,
safetensors weights, the tokenizer and the image processor config, as ``save_pretrained`` writes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from PIL import Image
from pydantic import Field

from gdro_core.rewards import clip_common
from gdro_core.rewards.base import Progress, RewardRecord


class ClipScoreReward:
    name = "clip_score"
    needs_world = False

    class Options(clip_common.Options):
        model_dir: str = Field(description="Local directory of a transformers CLIP checkpoint (config.json, "
                                           "*.safetensors, tokenizer and image processor files).")

    WHAT = "a CLIP checkpoint (config.json, *.safetensors, tokenizer and image processor)"

    def __init__(self, model_dir: str, batch_size: int = 16, device: str = "auto"):
        clip_common.require(self.name, self.check(model_dir, Path(".")))
        self.batch_size = batch_size
        self.model = clip_common.load_clip(self.name, model_dir, device)
        self.image_processor = clip_common.load_image_processor(self.name, model_dir)
        self.texts = clip_common.PromptEmbeddings(self.model, clip_common.load_tokenizer(self.name, model_dir),
                                                  batch_size)

    @classmethod
    def check(cls, model_dir: str, root: Path) -> list[str]:
        return clip_common.dir_problems("model_dir", model_dir, root, cls.WHAT,
                                        clip_common.MODEL_FILES + clip_common.TEXT_AND_IMAGE_PROCESSOR)

    @classmethod
    def preflight(cls, options: dict, root: Path) -> list[str]:
        return cls.check(options["model_dir"], root)

    def _score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict:
        cosine = (clip_common.image_embeddings(self.model, self.image_processor, images)
                  * self.texts(prompts)).sum(-1)
        return {"reward": (100 * cosine).clamp(min=0).cpu().numpy(), "cosine": cosine.cpu().numpy()}

    def score(self, images: list[Image.Image], records: Sequence[RewardRecord],
              progress: Progress | None = None) -> pd.DataFrame:
        """One row per image: ``reward`` (max(100·cos, 0)), ``cosine`` and ``error``."""
        return clip_common.score_in_batches(images, [r.prompt for r in records], self.batch_size, self._score,
                                            ["cosine"], progress)
