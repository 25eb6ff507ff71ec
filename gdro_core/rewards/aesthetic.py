"""The LAION aesthetic predictor ("improved-aesthetic-predictor", sac+logos+ava1-l14-linearMSE): how much people
like an image, about 1-10, from its CLIP ViT-L/14 embedding alone (the prompt is not read).

    reward = MLP(E_I / ‖E_I‖)

``E_I`` is CLIP ViT-L/14's image embedding (the vision tower's pooled output through the visual projection,
768-d); MLP is the predictor's head, linear layers without activations: Linear(768, 1024), Dropout(0.2),
Linear(1024, 128), Dropout(0.2), Linear(128, 64), Dropout(0.1), Linear(64, 16), Linear(16, 1) (dropout is off
when scoring). This follows github.com/christophschuhmann/improved-aesthetic-predictor (simple_inference.py:
OpenAI CLIP ViT-L/14 embeddings, L2-normalised, through that MLP) and Flow-GRPO's aesthetic scorer, which does
the same with transformers' ``CLIPModel`` openai/clip-vit-large-patch14.

Needs on disk: the CLIP checkpoint (``clip_dir``: openai/clip-vit-large-patch14, config.json, safetensors
weights and the image processor config) and the head's weights (``head_path``): a ``.safetensors`` file with the
published state dict's keys (``layers.0.weight``, ``layers.0.bias``, ``layers.2.*``, ``layers.4.*``,
``layers.6.*``, ``layers.7.*``), or the published ``sac+logos+ava1-l14-linearMSE.pth`` itself, read with
``torch.load(weights_only=True)`` (tensors only; no code runs). To convert it once::

    import torch, safetensors.torch
    sd = torch.load("sac+logos+ava1-l14-linearMSE.pth", map_location="cpu", weights_only=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, "aesthetic_head.safetensors")
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from PIL import Image
from pydantic import Field
from torch import nn

from gdro_core.rewards import clip_common
from gdro_core.rewards.base import Progress, RewardError, RewardRecord

HEAD_SUFFIXES = (".safetensors", ".pth", ".pt")


class AestheticHead(nn.Module):
    """The predictor's MLP, with the published checkpoint's module names (``layers.<i>``)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(embedding)


def read_head(path: str) -> dict[str, torch.Tensor]:
    """The head's state dict from a ``.safetensors`` file, or from a ``.pth``/``.pt`` by
    ``torch.load(weights_only=True)``."""
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def head_problems(path: str, root: Path) -> list[str]:
    if not path:
        return [("head_path is empty: set it to the aesthetic head's weights (a .safetensors file, or the published "
                 "sac+logos+ava1-l14-linearMSE.pth)")]
    p = Path(path).expanduser()
    p = p if p.is_absolute() else Path(root) / p
    if not p.is_file():
        return [(f"head_path: no file {p} (the aesthetic predictor's MLP weights); download it there first "
                 "(nothing is fetched at run time)")]
    if p.suffix not in HEAD_SUFFIXES:
        return [f"head_path: {p} is not a {' / '.join(HEAD_SUFFIXES)} file"]
    return []


class AestheticReward:
    name = "aesthetic"
    needs_world = False

    class Options(clip_common.Options):
        clip_dir: str = Field(description="Local directory of CLIP ViT-L/14 (openai/clip-vit-large-patch14: "
                                          "config.json, *.safetensors, image processor config).")
        head_path: str = Field(description="The predictor's MLP weights: a .safetensors file (or the published "
                                           ".pth, read with torch.load(weights_only=True)).")

    def __init__(self, clip_dir: str, head_path: str, batch_size: int = 16, device: str = "auto"):
        clip_common.require(self.name, self.check(clip_dir, head_path, Path(".")))
        self.batch_size = batch_size
        self.model = clip_common.load_clip(self.name, clip_dir, device)
        self.image_processor = clip_common.load_image_processor(self.name, clip_dir)
        self.head = AestheticHead(self.model.config.projection_dim)
        state = clip_common.load(self.name, f"the aesthetic head {head_path}", lambda: read_head(head_path))
        try:
            self.head.load_state_dict(state)
        except RuntimeError as err:
            raise RewardError(f"reward 'aesthetic': {head_path} is not the aesthetic predictor's MLP for a "
                              f"{self.model.config.projection_dim}-d CLIP embedding "
                              f"({' '.join(str(err).split())[:300]})") from None
        self.head = self.head.to(self.model.device).eval()

    @staticmethod
    def check(clip_dir: str, head_path: str, root: Path) -> list[str]:
        return (clip_common.dir_problems("clip_dir", clip_dir, root, "CLIP ViT-L/14 (config.json, *.safetensors, "
                                         "image processor)", clip_common.MODEL_FILES + clip_common.IMAGE_PROCESSOR)
                + head_problems(head_path, root))

    @classmethod
    def preflight(cls, options: dict, root: Path) -> list[str]:
        return cls.check(options["clip_dir"], options["head_path"], root)

    def _score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict:
        embedding = clip_common.image_embeddings(self.model, self.image_processor, images)
        with torch.no_grad():
            return {"reward": self.head(embedding).squeeze(-1).cpu().numpy()}

    def score(self, images: list[Image.Image], records: Sequence[RewardRecord],
              progress: Progress | None = None) -> pd.DataFrame:
        """One row per image: ``reward`` (the predicted aesthetic score) and ``error``."""
        return clip_common.score_in_batches(images, [""] * len(images), self.batch_size, self._score, [], progress)
