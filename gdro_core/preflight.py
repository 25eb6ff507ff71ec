"""What `gdro check` verifies on disk before any stage spends time: every path and checkpoint directory the
configured stages will load exists and is complete.

A wrong judge or detector path used to fail at `train` or `score`, after the rollouts (the expensive part on a
GPU); a placeholder ``/path/to/...`` passed. Each problem is one line naming the param, what is missing and the
fix. Nothing here loads weights: it reads directory listings and small JSON files only.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

from gdro_core.params import Params

WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.pth")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model", "tokenizer.model")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "image_processor_config.json")
PIPELINE_PARTS = {  # model_index.json component class -> the files it needs (any one of each group)
    "scheduler": (("scheduler_config.json",),),
    "tokenizer": (TOKENIZER_FILES,),
    "model": (("config.json",), WEIGHT_FILES),
}


class PreflightError(ValueError):
    """Paths the configured stages need that are missing or incomplete; one line each."""


def _has_any(directory: Path, patterns: tuple[str, ...]) -> bool:
    return any(next(directory.glob(p), None) is not None for p in patterns)


def _resolve(path: str, root: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else root / p


def pretrained_dir(key: str, path: str, root: Path, what: str, needs: tuple[tuple[str, ...], ...]) -> list[str]:
    """A transformers-style directory (config, weights, processor/tokenizer files); ``needs`` are groups of
    file patterns of which each group needs one."""
    if not path:
        return [f"{key} is empty: set it to the local directory of {what}"]
    directory = _resolve(path, root)
    if not directory.is_dir():
        return [f"{key}: no directory {directory} ({what}); download it there first (nothing is fetched at run time)"]
    missing = [" or ".join(group) for group in needs if not _has_any(directory, group)]
    return [f"{key}: {directory} is incomplete ({what}): no {m}" for m in missing]


def model_source(params: Params, root: Path) -> list[str]:
    """``model.source``: ``builtin``, a complete diffusers checkpoint directory, or a hub id in the local cache."""
    source = params.model.source
    if source == "builtin":
        return []
    path = _resolve(source, root)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            return [f"model.source: no model_index.json in {path}: give the diffusers checkpoint directory "
                    "(the folder holding model_index.json, transformer/, vae/, ...)"]
        problems = []
        for part, spec in json.loads(index.read_text()).items():
            if part.startswith("_") or not isinstance(spec, list) or spec[0] is None:
                continue
            kind = ("scheduler" if "Scheduler" in str(spec[1]) else
                    "tokenizer" if "Tokenizer" in str(spec[1]) else "model")
            sub = path / part
            if not sub.is_dir():
                problems.append(f"model.source: {path} is incomplete: model_index.json names {part}/ but it is missing")
                continue
            for group in PIPELINE_PARTS[kind]:
                if not _has_any(sub, group):
                    problems.append(f"model.source: {sub} is incomplete: no {' or '.join(group)}")
        return problems
    if path.exists():
        hint = (": a single-file checkpoint needs its diffusers folder; on a machine with its configs, "
                "`StableDiffusion3Pipeline.from_single_file(file).save_pretrained(dir)` (FluxPipeline for FLUX.1) "
                "writes one" if path.suffix in (".safetensors", ".ckpt", ".sft") else "")
        return [f"model.source: {path} is a file, not a diffusers checkpoint directory{hint}"]
    from gdro_core.models.checkpoint_files import read_model_index

    looks_like_hub_id = source.count("/") == 1 and not source.startswith((".", "/", "~"))
    if looks_like_hub_id and read_model_index(source) is not None:
        return []
    return [f"model.source: no directory {path}" + (" and no hub id of that name in the local cache" if looks_like_hub_id
                                                     else "") +
            ": set model.source to your local diffusers checkpoint directory (or 'builtin')"]


def prompt_files(params: Params, root: Path) -> list[str]:
    if params.task == "geneval":
        m = params.geneval.metadata_dir
        if not m:
            return []
        d = _resolve(m, root)
        if not d.is_dir():
            return [f"geneval.metadata_dir: no directory {d}: copy the GenEval / Flow-GRPO metadata files there"]
        if not any(d.glob("*_metadata.jsonl")) and not (d / "evaluation_metadata.jsonl").is_file():
            return [f"geneval.metadata_dir: {d} holds no *_metadata.jsonl (train_metadata.jsonl, test_metadata.jsonl)"]
        return []
    if not params.prompts.source:
        return []
    d = _resolve(params.prompts.source, root)
    if not d.is_dir():
        return [f"prompts.source: no directory {d}: put your train.txt and test.txt there"]
    if params.task == "general":
        return [f"prompts.source: {d} has no {name}.txt (or {name}.jsonl): one prompt per line"
                for name in ("train", "test") if not any((d / f"{name}{s}").is_file() for s in (".txt", ".jsonl"))]
    return [f"prompts.source: {d} has no {name}: one prompt per line, target in double quotes"
            for name in ("train.txt", "test.txt") if not (d / name).is_file()]


def judge(params: Params, root: Path) -> list[str]:
    if params.judge.kind != "unified_reward":
        return []
    return pretrained_dir("judge.model_path", params.judge.model_path, root, "the UnifiedReward-style VLM judge",
                          (("config.json",), WEIGHT_FILES, PROCESSOR_FILES + TOKENIZER_FILES))


def detector(params: Params, root: Path) -> list[str]:
    d = params.geneval.detector
    if params.task != "geneval" or d.kind != "mask2former":
        return []
    return (pretrained_dir("geneval.detector.mask2former_path", d.mask2former_path, root,
                           "the Mask2Former COCO instance-segmentation checkpoint",
                           (("config.json",), WEIGHT_FILES, PROCESSOR_FILES))
            + pretrained_dir("geneval.detector.clip_path", d.clip_path, root, "the CLIP checkpoint for colours",
                             (("config.json",), WEIGHT_FILES, PROCESSOR_FILES, TOKENIZER_FILES)))


def rewards(params: Params, root: Path) -> list[str]:
    """Each reward ``rewards.weights`` names: importable, its options valid, and what its ``preflight`` classmethod
    finds missing on disk (a reward's cheap checks; nothing is loaded)."""
    from gdro_core.rewards.base import RewardError
    from gdro_core.rewards.registry import reward_class, reward_options

    out: list[str] = []
    for name in params.rewards.weights:
        if name == params.task:
            continue  # the task's own reward: its paths are the sections above
        try:
            cls = reward_class(name, root)
            options = reward_options(name, cls, params.rewards.options.get(name, {}))
        except RewardError as err:
            out.append(" ".join(str(err).split()))
            continue
        if not hasattr(cls, "from_params"):  # built as Class(**options): a mismatch fails here, not after DVC has
            try:  # deleted the old reward table
                inspect.signature(cls).bind(**options)
            except TypeError as err:
                out.append(f"reward {name!r}: {cls.__name__} does not take these options ({err}); set "
                           f"rewards.options['{name}'] to what its __init__ takes")
                continue
            except ValueError:  # no signature to read (a C type): building it will tell
                pass
        check = getattr(cls, "preflight", None)
        if callable(check):
            out += [f"rewards.options.{name}: {line}" for line in check(options, root)]
    return out


def world_text_fits(params: Params) -> list[str]:
    """The built-in OCR world's longest target, drawn in its widest character and moved by the jitter, inside the
    image: a clipped render scores low however well the model draws it."""
    if params.task != "ocr" or params.model.source != "builtin":
        return []
    from PIL import Image, ImageDraw

    from gdro_core.tasks.ocr.world import font

    w = params.world
    draw, face = ImageDraw.Draw(Image.new("L", (1, 1))), font(w.font_size)
    boxes = [draw.textbbox((0, 0), c * w.max_len, font=face) for c in w.alphabet]
    wide, high = max(right - left for left, _, right, _ in boxes), max(bottom - top for _, top, _, bottom in boxes)
    out = []
    if wide + 2 * w.jitter > w.width:
        out.append(f"world.max_len {w.max_len}: a target of {w.max_len} characters is up to {wide} px wide at "
                   f"world.font_size {w.font_size}, and with world.jitter {w.jitter} needs {wide + 2 * w.jitter} px, "
                   f"but world.width is {w.width}: its renders are clipped; raise world.width to at least "
                   f"{wide + 2 * w.jitter}, or lower world.max_len or world.font_size")
    if high + 2 * w.jitter > w.height:
        out.append(f"world.font_size {w.font_size}: text is up to {high} px high, and with world.jitter {w.jitter} "
                   f"needs {high + 2 * w.jitter} px, but world.height is {w.height}: its renders are clipped; raise "
                   "world.height or lower world.font_size")
    return out


def warnings(params: Params) -> list[str]:
    """What runs but means little: the built-in pixel judge knows only the built-in world's images."""
    if params.model.source != "builtin" and params.judge.kind == "pixel":
        return ["judge.kind is 'pixel' with a real checkpoint: the pixel judge compares images with the built-in "
                "world's clean renders, so the corrected score and the kept checkpoint rest on a judge that does not "
                "know these images (metrics.json says so: judge.corrected_score_judge is pixel); set judge.kind: "
                "unified_reward and judge.model_path for a VLM judge"]
    return []


def import_manifest(params: Params, root: Path) -> list[str]:
    """``data.manifest`` under ``data.source: import``: the file the import stage reads in place of rollout and score
    (its rows are checked by the stage itself)."""
    if params.data.source != "import":
        return []
    path = _resolve(params.data.manifest, root)
    if path.is_file():
        return []
    return [f"data.manifest: no manifest at {path}: write your images' manifest there (`gdro export` writes one of the "
            "project's own) or point data.manifest at yours (docs/import-export.md)"]


def problems(params: Params, root: Path) -> list[str]:
    """Every path problem of these params, one line each (empty: all there)."""
    return [*model_source(params, root), *prompt_files(params, root), *judge(params, root), *detector(params, root),
            *rewards(params, root), *world_text_fits(params), *import_manifest(params, root)]
