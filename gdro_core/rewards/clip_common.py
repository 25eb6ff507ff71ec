"""What the CLIP-based rewards share: their options, their disk checks, loading a CLIP checkpoint from a local
directory, unit image and text embeddings, and scoring in batches where one failing batch costs only its images.

Every checkpoint is read from a local directory with ``local_files_only=True`` and safetensors weights (nothing
is fetched at run time); a directory that is missing or incomplete is refused in one line, by ``gdro check``
before any stage (each reward's ``preflight``) and again when the reward is built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from gdro_core.preflight import PROCESSOR_FILES, TOKENIZER_FILES, pretrained_dir
from gdro_core.rewards.base import Progress, RewardError

if TYPE_CHECKING:
    import torch
    from PIL import Image

SAFETENSORS = ("*.safetensors", "*.safetensors.index.json")
MODEL_FILES = (("config.json",), SAFETENSORS)
"""A transformers checkpoint loaded with ``use_safetensors=True``: its config and safetensors weights."""
IMAGE_PROCESSOR = (PROCESSOR_FILES,)
TEXT_AND_IMAGE_PROCESSOR = (PROCESSOR_FILES, TOKENIZER_FILES)


class Options(BaseModel):
    """Options every CLIP-based reward takes."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(16, ge=1, description="Images (and prompts) per forward pass; does not change scores.")
    device: str = Field("auto", description="'auto': this process's accelerator, else the CPU; or e.g. 'cuda:1'.")


def dir_problems(key: str, path: str, root: Path, what: str, needs: tuple[tuple[str, ...], ...]) -> list[str]:
    """One line per problem of the local checkpoint directory option ``key`` (nothing is loaded)."""
    return pretrained_dir(key, path, Path(root), what, needs)


def require(reward: str, problems: list[str]) -> None:
    """Refuse to build reward ``reward`` when its directories have problems (the lines ``preflight`` gives)."""
    if problems:
        raise RewardError(f"reward {reward!r}: " + "; ".join(f"rewards.options.{reward}.{p}" for p in problems))


def load(reward: str, what: str, loader: Callable[[], Any]) -> Any:
    """``loader()``, its failure (a corrupt or foreign checkpoint) refused in one line naming the reward."""
    try:
        return loader()
    except Exception as err:  # noqa: BLE001 - a corrupt, foreign or pickled-code file: one line, not a traceback
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise RewardError(f"reward {reward!r}: cannot load {what} ({type(err).__name__}: {first})") from None


def load_clip(reward: str, model_dir: str, device: str) -> torch.nn.Module:
    """A ``CLIPModel`` from a local directory (float32, eval mode) on ``device``."""
    import torch
    from transformers import CLIPModel

    from gdro_core.build_lock import building
    from gdro_core.models.base import pick_device

    with building():
        model = load(reward, f"the CLIP model in {model_dir}", lambda: CLIPModel.from_pretrained(
            model_dir, local_files_only=True, use_safetensors=True, dtype=torch.float32))
        return model.to(pick_device(device)).eval()


def load_image_processor(reward: str, processor_dir: str):
    from transformers import AutoImageProcessor

    return load(reward, f"the image processor in {processor_dir}",
                lambda: AutoImageProcessor.from_pretrained(processor_dir, local_files_only=True))


def load_tokenizer(reward: str, processor_dir: str):
    from transformers import AutoTokenizer

    return load(reward, f"the tokenizer in {processor_dir}",
                lambda: AutoTokenizer.from_pretrained(processor_dir, local_files_only=True))


def _unit(e: torch.Tensor) -> torch.Tensor:
    e = e.float()
    return e / e.norm(dim=-1, keepdim=True)


def image_embeddings(model, image_processor, images: Sequence[Image.Image]) -> torch.Tensor:
    """Unit CLIP image embeddings (n, d), float32: the vision tower's pooled output through the visual
    projection (what ``CLIPModel.get_image_features`` returns)."""
    import torch

    pixels = image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        pooled = model.vision_model(pixel_values=pixels.to(model.device, model.dtype)).pooler_output
        return _unit(model.visual_projection(pooled))


def text_embeddings(model, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Unit CLIP text embeddings (n, d), float32, of prompts padded and truncated to the text tower's length
    (77 tokens for CLIP checkpoints; what ``CLIPModel.get_text_features`` returns)."""
    import torch

    length = min(int(tokenizer.model_max_length), int(model.config.text_config.max_position_embeddings))
    tok = tokenizer(list(prompts), padding=True, truncation=True, max_length=length, return_tensors="pt")
    with torch.no_grad():
        out = model.text_model(input_ids=tok["input_ids"].to(model.device),
                               attention_mask=tok["attention_mask"].to(model.device))
        return _unit(model.text_projection(out.pooler_output))


class PromptEmbeddings:
    """Unit text embeddings of prompts, each distinct prompt encoded once (a group's images share their prompt)."""

    def __init__(self, model, tokenizer, batch_size: int):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        import torch

        new = list(dict.fromkeys(p for p in prompts if p not in self.cache))
        for start in range(0, len(new), self.batch_size):
            chunk = new[start:start + self.batch_size]
            for p, e in zip(chunk, text_embeddings(self.model, self.tokenizer, chunk)):
                self.cache[p] = e
        return torch.stack([self.cache[p] for p in prompts])


def score_in_batches(images: Sequence[Image.Image], prompts: Sequence[str], batch_size: int,
                     score: Callable[[Sequence[Image.Image], Sequence[str]], dict[str, np.ndarray]],
                     columns: Sequence[str], progress: Progress | None = None) -> pd.DataFrame:
    """``score(images, prompts)`` (``reward`` and its parts, one value per image) over batches of
    ``batch_size``; a batch that fails is scored image by image, so an image that fails costs only itself:
    its row has the error text, reward 0 and NaN parts."""
    rows: list[dict[str, Any]] = []
    for start in range(0, len(images), batch_size):
        chunk, texts = list(images[start:start + batch_size]), list(prompts[start:start + batch_size])
        try:
            rows += _rows(score(chunk, texts), len(chunk))
        except Exception:  # noqa: BLE001 - the failing image is found below and its error kept in its row
            for im, text in zip(chunk, texts):
                try:
                    rows += _rows(score([im], [text]), 1)
                except Exception as err:  # noqa: BLE001 - recorded in the image's row, counted by check_errors
                    rows.append({**{c: np.nan for c in columns}, "reward": 0.0,
                                 "error": f"{type(err).__name__}: {err}".splitlines()[0]})
        if progress:
            progress(min(start + batch_size, len(images)), len(images))
    return pd.DataFrame.from_records(rows, columns=["reward", *columns, "error"])


def _rows(values: dict[str, np.ndarray], n: int) -> list[dict[str, Any]]:
    cols = {k: np.asarray(v, dtype=float).reshape(-1) for k, v in values.items()}
    return [{**{k: float(v[i]) for k, v in cols.items()}, "error": ""} for i in range(n)]
