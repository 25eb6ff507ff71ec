"""PickScore (Kirstain et al., 2023, "Pick-a-Pic"): a CLIP-H/14 fine-tuned on human preferences between images
generated for one prompt.

    reward = exp(logit_scale) · cos(E_I, E_T)

the score of PickScore's reference code (github.com/yuvalkirstain/PickScore; the PickScore_v1 model card): image
and prompt embeddings of the fine-tuned ``CLIPModel``, each L2-normalised, their dot product times the model's
learnt temperature ``logit_scale.exp()`` (about 100). The prompt is truncated to 77 tokens, as there. Values are
around 18-24 for typical images; Flow-GRPO's PickScore reward divides this by 26 (give the reward weight 1/26 for
its scale). The cosine is kept as the part ``cosine``.

Needs on disk: the model (``model_dir``: yuvalkirstain/PickScore_v1, config.json and safetensors weights) and the
processor it was trained with (``processor_dir``: laion/CLIP-ViT-H-14-laion2B-s32B-b79K's tokenizer and image
processor files; the reference code loads the processor from there, not from the model's repository). An empty
``processor_dir`` reads the processor from ``model_dir``. A checkpoint with only ``pytorch_model.bin`` converts
once with ``CLIPModel.from_pretrained(d).save_pretrained(d, safe_serialization=True)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from PIL import Image
from pydantic import Field

from gdro_core.rewards import clip_common
from gdro_core.rewards.base import Progress, RewardRecord


class PickScoreReward:
    name = "pickscore"
    needs_world = False

    class Options(clip_common.Options):
        model_dir: str = Field(description="Local directory of PickScore_v1 (a CLIPModel: config.json, "
                                           "*.safetensors).")
        processor_dir: str = Field("", description="Local directory of the CLIP-ViT-H-14-laion2B-s32B-b79K "
                                                   "processor (tokenizer and image processor files); '': model_dir.")

    def __init__(self, model_dir: str, processor_dir: str = "", batch_size: int = 16, device: str = "auto"):
        processor_dir = processor_dir or model_dir
        clip_common.require(self.name, self.check(model_dir, processor_dir, Path(".")))
        self.batch_size = batch_size
        self.model = clip_common.load_clip(self.name, model_dir, device)
        self.image_processor = clip_common.load_image_processor(self.name, processor_dir)
        self.texts = clip_common.PromptEmbeddings(self.model, clip_common.load_tokenizer(self.name, processor_dir),
                                                  batch_size)

    @staticmethod
    def check(model_dir: str, processor_dir: str, root: Path) -> list[str]:
        if processor_dir == model_dir:
            return clip_common.dir_problems("model_dir", model_dir, root, "PickScore with its processor (config.json, "
                                            "*.safetensors, tokenizer and image processor files)",
                                            clip_common.MODEL_FILES + clip_common.TEXT_AND_IMAGE_PROCESSOR)
        return (clip_common.dir_problems("model_dir", model_dir, root, "the PickScore model (config.json, "
                                         "*.safetensors)", clip_common.MODEL_FILES)
                + clip_common.dir_problems("processor_dir", processor_dir, root, "the CLIP-H/14 processor "
                                           "(tokenizer and image processor files)",
                                           clip_common.TEXT_AND_IMAGE_PROCESSOR))

    @classmethod
    def preflight(cls, options: dict, root: Path) -> list[str]:
        return cls.check(options["model_dir"], options["processor_dir"] or options["model_dir"], root)

    def _score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict:
        cosine = (clip_common.image_embeddings(self.model, self.image_processor, images)
                  * self.texts(prompts)).sum(-1)
        scale = self.model.logit_scale.detach().float().exp()
        return {"reward": (scale * cosine).cpu().numpy(), "cosine": cosine.cpu().numpy()}

    def score(self, images: list[Image.Image], records: Sequence[RewardRecord],
              progress: Progress | None = None) -> pd.DataFrame:
        """One row per image: ``reward`` (exp(logit_scale)·cos), ``cosine`` and ``error``."""
        return clip_common.score_in_batches(images, [r.prompt for r in records], self.batch_size, self._score,
                                            ["cosine"], progress)
