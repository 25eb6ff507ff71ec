"""GenEval detectors behind one interface: images in, :class:`Detection` lists per class out (unfiltered).

- ``exact``: the built-in world's detector (:class:`ExactDetector`): because the world is synthetic it can
  read a scene back from the pixels: each pixel takes its nearest palette colour, connected blobs of one
  colour are objects, and each blob's class is the shape whose clean drawing at the blob's box overlaps it best.
- ``mask2former``: GenEval's family for real images: Mask2Former instance segmentation with COCO-instance
  weights, and CLIP ViT-L/14 zero-shot colour classification of each masked, cropped object on grey
  (GenEval's ``#999`` background and its three colour templates). Both load from local paths.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from gdro_core.build_lock import building

from gdro_core.tasks.geneval.rules import Detection
from gdro_core.tasks.geneval.shapes import BACKGROUND, PALETTE, shape_mask

CROP_BACKGROUND = (153, 153, 153)  # GenEval's "#999"
COCO_TO_GENEVAL = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}
"""transformers' COCO labels where GenEval's object names differ: without the map, the 33 GenEval prompts that
name these objects could never be correct."""


def geneval_name(label: str) -> str:
    """A detector's COCO label as GenEval's prompts name the object."""
    return COCO_TO_GENEVAL.get(label, label)


COLOR_TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")


class DetectorError(ValueError):
    """A detector that cannot be built as configured."""


ColourCheck = Callable[[Mapping[str, Sequence[Detection]]], Mapping[str, Sequence[Detection]]]
"""Given an image's detections (colour not yet known), the ones whose colour a prompt checks
(:func:`gdro_core.tasks.geneval.rules.colour_targets`)."""


class Detector(Protocol):
    def detect(self, images: list[Image.Image], colour_checks: Sequence[ColourCheck] | None = None
               ) -> list[dict[str, list[Detection]]]:
        """Per image, detections by class; colours at least for what ``colour_checks[i]`` picks (all without)."""
        ...


class ExactDetector:
    """The built-in world's detector: palette colours, connected blobs, best-overlapping shape.

    Confidence is the blob's overlap (IoU) with the clean drawing of its class at its box: 1 for a clean
    render, lower for a smeared or misshapen one, so GenEval's confidence thresholds keep their meaning.
    """

    def __init__(self, classes: Sequence[str], colors: Sequence[str], min_pixels: int, tolerance: float):
        self.classes, self.colors = tuple(classes), tuple(colors)
        self.min_pixels, self.tolerance = min_pixels, tolerance
        self.refs = np.array([BACKGROUND, *(PALETTE[c] for c in self.colors)], dtype=np.float32)

    def detect(self, image: Image.Image) -> dict[str, list[Detection]]:
        x = np.asarray(image.convert("RGB"), dtype=np.float32)
        dist = np.linalg.norm(x[:, :, None, :] - self.refs[None, None], axis=-1)
        nearest = dist.argmin(-1)
        nearest[dist.min(-1) > self.tolerance] = 0  # off-palette pixels are not part of any object
        out: dict[str, list[Detection]] = {}
        for k, color in enumerate(self.colors, start=1):
            labels, n = ndimage.label(nearest == k)
            for i, sl in enumerate(ndimage.find_objects(labels), start=1):
                blob = labels[sl] == i
                if blob.sum() < self.min_pixels:
                    continue
                h, w = blob.shape
                ious = [self._iou(blob, shape_mask(c, w, h)) for c in self.classes]
                best = int(np.argmax(ious))
                box = (sl[1].start, sl[0].start, sl[1].stop - 1, sl[0].stop - 1)
                out.setdefault(self.classes[best], []).append(Detection(box, float(ious[best]), color))
        return out

    @staticmethod
    def _iou(a: np.ndarray, b: np.ndarray) -> float:
        union = np.logical_or(a, b).sum()
        return float(np.logical_and(a, b).sum() / union) if union else 0.0


class ExactWorldDetector:
    """The exact detector over a batch."""

    def __init__(self, exact):
        self.exact = exact

    def detect(self, images: list[Image.Image], colour_checks: Sequence[ColourCheck] | None = None
               ) -> list[dict[str, list[Detection]]]:
        return [self.exact.detect(im) for im in images]  # palette colours cost nothing: every object has one


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Mask2FormerClipDetector:
    """Mask2Former instances (class, score, mask, box) with CLIP zero-shot colours."""

    def __init__(self, model, processor, clip_model, clip_processor, colors: Sequence[str], batch_size: int,
                 device: str = "auto"):
        self.device = _device(device)
        self.model, self.processor = model.to(self.device).eval(), processor
        self.clip, self.clip_processor = clip_model.to(self.device).eval(), clip_processor
        self.colors, self.batch_size = list(colors), batch_size
        self._text: dict[str, torch.Tensor] = {}

    @classmethod
    def from_paths(cls, mask2former_path: str, clip_path: str, colors: Sequence[str], batch_size: int,
                   device: str = "auto") -> Mask2FormerClipDetector:
        from transformers import AutoImageProcessor, CLIPModel, CLIPProcessor, Mask2FormerForUniversalSegmentation

        for key, path in (("geneval.detector.mask2former_path", mask2former_path),
                          ("geneval.detector.clip_path", clip_path)):
            if not path or not (Path(path) / "config.json").is_file():
                raise DetectorError(
                    f"{key} is {path!r}, which is not a local checkpoint directory (no config.json). Download the "
                    "weights elsewhere (Mask2Former COCO instance segmentation, e.g. "
                    "facebook/mask2former-swin-small-coco-instance; CLIP ViT-L/14, openai/clip-vit-large-patch14), "
                    "copy them here and set that path, or use geneval.detector.kind: exact in the built-in world"
                )
        with building():
            return cls(
                Mask2FormerForUniversalSegmentation.from_pretrained(mask2former_path),
                AutoImageProcessor.from_pretrained(mask2former_path),
                CLIPModel.from_pretrained(clip_path), CLIPProcessor.from_pretrained(clip_path), colors, batch_size,
                device,
            )

    @torch.no_grad()
    def _color_texts(self, cls_name: str) -> torch.Tensor:
        """Unit text embeddings per colour, averaged over GenEval's templates (zero-shot classifier weights)."""
        if cls_name not in self._text:
            rows = []
            for c in self.colors:
                tok = self.clip_processor.tokenizer([t.format(c=c, cls=cls_name) for t in COLOR_TEMPLATES],
                                                    padding=True, return_tensors="pt").to(self.device)
                out = self.clip.text_model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
                e = self.clip.text_projection(out.pooler_output)
                e = e / e.norm(dim=-1, keepdim=True)
                rows.append(e.mean(0) / e.mean(0).norm())
            self._text[cls_name] = torch.stack(rows)
        return self._text[cls_name]

    @torch.no_grad()
    def classify_colors(self, image: Image.Image, masks: list[np.ndarray], boxes: list[tuple], cls_names: list[str]
                        ) -> list[str]:
        """Each object cropped to its box with everything off its mask painted grey, then CLIP's nearest colour."""
        if not masks:
            return []
        crops = []
        for mask, box in zip(masks, boxes):
            x0, y0, x1, y1 = (int(v) for v in box)
            crop = image.crop((x0, y0, x1 + 1, y1 + 1))
            m = Image.fromarray((mask[y0 : y1 + 1, x0 : x1 + 1] * 255).astype(np.uint8), mode="L")
            crops.append(Image.composite(crop, Image.new("RGB", crop.size, CROP_BACKGROUND), m))
        pix = self.clip_processor(images=crops, return_tensors="pt")["pixel_values"].to(self.device)
        feats = self.clip.visual_projection(self.clip.vision_model(pixel_values=pix).pooler_output)
        feats = feats / feats.norm(dim=-1, keepdim=True)
        return [self.colors[int((self._color_texts(c) @ f).argmax())] for f, c in zip(feats, cls_names)]

    @torch.no_grad()
    def detect(self, images: list[Image.Image], colour_checks: Sequence[ColourCheck] | None = None
               ) -> list[dict[str, list[Detection]]]:
        """Instances per image; CLIP colours only for the detections ``colour_checks[i]`` picks, as GenEval's
        script classifies only the kept objects a colour clause names (all detections when no checks are given)."""
        out: list[dict[str, list[Detection]]] = []
        labels = self.model.config.id2label
        for start in range(0, len(images), self.batch_size):
            chunk = [im.convert("RGB") for im in images[start : start + self.batch_size]]
            inputs = self.processor(images=chunk, return_tensors="pt").to(self.device)
            outputs = self.model(**inputs)
            results = self.processor.post_process_instance_segmentation(
                outputs, threshold=0.0, target_sizes=[(im.height, im.width) for im in chunk], return_binary_maps=True,
            )
            for im, res in zip(chunk, results):
                seg = res["segmentation"]
                maps = [] if seg is None else [m.cpu().numpy().astype(bool) for m in seg]
                kept = [(info, m) for info, m in zip(res["segments_info"], maps) if m.any()]
                boxes = []
                for _, m in kept:
                    ys, xs = np.nonzero(m)
                    boxes.append((float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())))
                names = [geneval_name(labels[int(info["label_id"])]) for info, _ in kept]
                dets: dict[str, list[Detection]] = {}
                found = []
                for (info, m), box, name in zip(kept, boxes, names):
                    d = Detection(box, float(info["score"]))
                    dets.setdefault(name, []).append(d)
                    found.append((d, m, name))
                if colour_checks is None:
                    wanted = {id(d) for d, _, _ in found}
                else:
                    wanted = {id(d) for ds in colour_checks[len(out)](dets).values() for d in ds}
                todo = [(d, m, name) for d, m, name in found if id(d) in wanted]
                colors = self.classify_colors(im, [m for _, m, _ in todo], [d.box for d, _, _ in todo],
                                              [name for _, _, name in todo])
                coloured = {id(d): dataclasses.replace(d, color=c) for (d, _, _), c in zip(todo, colors)}
                out.append({name: [coloured.get(id(d), d) for d in ds] for name, ds in dets.items()})
        return out


def make_detector(geneval) -> Detector:
    """The detector ``geneval.detector.kind`` names."""
    d = geneval.detector
    if d.kind == "exact":
        return ExactWorldDetector(ExactDetector(geneval.classes, geneval.colors, d.min_pixels, d.palette_tolerance))
    if d.kind == "mask2former":
        return Mask2FormerClipDetector.from_paths(d.mask2former_path, d.clip_path, d.clip_colors, d.batch_size,
                                                  d.device)
    raise DetectorError(f"unknown geneval.detector.kind {d.kind!r}; choose 'exact' or 'mask2former'")
