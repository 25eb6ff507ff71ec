"""Bring your own images: a manifest of (prompt, image, reward) rows in, the project's rollouts and rewards out.

``gdro export`` writes the project's rollouts and reward table as a manifest (JSON lines, CSV or Parquet) with the
PNGs under ``images/`` beside it and the stored latents in ``latents.safetensors``; ``gdro import`` reads such a
manifest (edited, rescored elsewhere, or made by another tool) into the same sharded, hashed rollout store that
``gdro rollout`` writes, and the reward table tied to its fingerprint, so train, evaluate, rounds and sweeps use
it unchanged. An image whose bytes and base match an exported latent takes that latent (an export imported back
trains exactly as the native store); any other image is encoded by the model family's VAE (the built-in model:
its pixels). Everything is written to temporary paths and moved into place at the end: bad input leaves the
previous outputs as they were. See docs/import-export.md.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import pandas as pd
from PIL import ExifTags, Image, ImageOps

from gdro_core.data.rollout import MANIFEST, RECORDS, Shard, write_manifest
from gdro_core.data.scoring import ORDER, read_table, write_table
from gdro_core.data.store import TMP_SUFFIX, atomic_write, read_json, sha256_file, text_lines, write_json

FORMATS = {".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}
LATENTS_FILE = "latents.safetensors"
"""Beside an exported manifest: each image's stored latent, keyed by its path, with the PNG's sha256 and the base
fingerprint in the metadata (an import reuses a latent only while both still match)."""
BASE_KEY = "gdro.base_fingerprint"
REQUIRED = ("prompt", "image")
Log = Callable[[str], None]


class ManifestError(ValueError):
    """A manifest that cannot be imported; the message names the file and row."""


# --- export ---------------------------------------------------------------------------------------------------
def reward_parts(table: pd.DataFrame, weights: dict[str, float]) -> list[str]:
    """The reward table's columns of the named rewards (a weighted reward keeps each part under its name)."""
    return [name for name in weights if name in table.columns and name != "reward"]


def export_rows(table: pd.DataFrame, rows: list[dict], weights: dict[str, float]) -> pd.DataFrame:
    """The manifest's rows: prompt, image, reward, the named parts, group (prompt_index), target, seed."""
    store = pd.DataFrame.from_records(rows)
    scored = table.drop(columns=[c for c in ("prompt", "target", "seed", "image") if c in table])
    merged = store.merge(scored, on=ORDER, how="left", validate="one_to_one").sort_values(ORDER, kind="stable")
    if merged["reward"].isna().any():
        raise ManifestError("the reward table does not score every rollout image: rerun `gdro score`")
    parts = reward_parts(table, weights)
    out = merged[["prompt", "image", "reward", *parts, "prompt_index", "target", "seed"]]
    return out.rename(columns={"prompt_index": "group"}).reset_index(drop=True)


def write_manifest_file(frame: pd.DataFrame, path: Path) -> Path:
    fmt = FORMATS[path.suffix.lower()]
    if fmt == "jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in frame.to_dict(orient="records"))
        return atomic_write(path, lambda p: p.write_text(text))
    if fmt == "csv":
        return atomic_write(path, lambda p: frame.to_csv(p, index=False))
    return atomic_write(path, lambda p: frame.to_parquet(p, index=False))


def export_manifest(rollout_dir: Path, rewards: Path, out_dir: Path, fmt: str, weights: dict[str, float],
                    base_fingerprint: str) -> Path:
    """The rollouts and their reward table as ``out_dir/manifest.<fmt>`` with ``images/`` and the latents."""
    import torch
    from safetensors.torch import save_file

    from gdro_core.data.rollout import load_rollouts

    rollout_dir, out_dir = Path(rollout_dir), Path(out_dir)
    if not (rollout_dir / MANIFEST).is_file():
        raise ManifestError(f"no rollouts at {rollout_dir}: run `gdro rollout` and `gdro score` (or `gdro import`) "
                            "first")
    store = read_json(rollout_dir / MANIFEST)
    frame = export_rows(read_table(rewards, store["fingerprint"]), store["rows"], weights)
    data = load_rollouts(rollout_dir)
    tensors, meta = {}, {BASE_KEY: base_fingerprint}
    for row in store["rows"]:
        dest = out_dir / row["image"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.unlink(missing_ok=True)
        try:
            os.link(rollout_dir / row["image"], dest)  # the store's files are never edited in place
        except OSError:
            shutil.copyfile(rollout_dir / row["image"], dest)
        tensors[row["image"]] = data.latents[row["prompt_index"], row["member"]].contiguous()
        meta[row["image"]] = store["images"][row["image"]]
    atomic_write(out_dir / LATENTS_FILE, lambda p: save_file({k: v.to(torch.float32) for k, v in tensors.items()},
                                                             str(p), metadata=meta))
    return write_manifest_file(frame, out_dir / f"manifest.{fmt}")


# --- reading a manifest ---------------------------------------------------------------------------------------
@dataclass
class Row:
    where: str  # file:line
    prompt: str
    image: str
    reward: float
    group: str
    target: str
    seed: int
    parts: dict[str, float] = field(default_factory=dict)


def _lines(path: Path) -> list[tuple[str, dict]]:
    """``(file:line, record)`` of every row; CSV counts its header as line 1, Parquet names the row number."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ManifestError(f"{path}: unknown manifest format {path.suffix!r}: use .jsonl, .csv or .parquet")
    if not path.is_file():
        raise ManifestError(f"no manifest at {path}: set data.manifest or pass --manifest (docs/import-export.md)")
    if fmt == "jsonl":
        out = []
        for n, line in enumerate(text_lines(path, ManifestError), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ManifestError(f"{path}:{n}: not JSON ({err.msg})") from None
                if not isinstance(record, dict):
                    raise ManifestError(f"{path}:{n}: a row must be a JSON object with prompt, image and reward")
                out.append((f"{path}:{n}", record))
        return out
    try:
        frame = pd.read_csv(path, dtype={"prompt": str, "image": str, "group": str, "target": str},
                            keep_default_na=False, na_values={"reward": ["", "nan", "NaN"]}) if fmt == "csv" \
            else pd.read_parquet(path)
    except Exception as err:  # noqa: BLE001 - any parser failure is a manifest that cannot be read
        raise ManifestError(f"{path}: cannot read the {fmt} manifest ({type(err).__name__}: {err})") from None
    first, name = (2, "") if fmt == "csv" else (1, "row ")
    return [(f"{path}:{name}{i + first}", r) for i, r in enumerate(frame.to_dict(orient="records"))]


def _number(value: Any, where: str, column: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ManifestError(f"{where}: {column} {value!r} is not a number") from None
    if math.isnan(x) or math.isinf(x):
        raise ManifestError(f"{where}: {column} is {value!r}: every image needs a finite reward (drop the row, or "
                            "score it)")
    return x


def _text(record: dict, key: str, default: str = "") -> str:
    value = record.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return default
    return str(value)


def read_manifest(path: Path, weights: dict[str, float]) -> list[Row]:
    """Every row, checked one by one: columns present, rewards finite (or the weighted sum of the named columns),
    image paths inside the manifest's folder, no (prompt, image) twice."""
    path = Path(path)
    rows, seen = [], {}
    for where, rec in _lines(path):
        missing = [c for c in REQUIRED if _text(rec, c) == ""]
        if missing:
            raise ManifestError(f"{where}: no {' or '.join(missing)}: every row needs prompt, image and reward")
        named = [n for n in weights if n in rec]
        if "reward" not in rec and (not weights or len(named) < len(weights)):
            need = f"reward (or {', '.join(weights)}, summed with rewards.weights)" if weights else "reward"
            raise ManifestError(f"{where}: no {need} column")
        parts = {n: _number(rec[n], where, n) for n in named} if len(named) == len(weights) and weights else {}
        if parts:
            total = sum(weights[n] * v for n, v in parts.items())
            if "reward" in rec and not math.isclose(_number(rec["reward"], where, "reward"), total, abs_tol=1e-6):
                raise ManifestError(
                    f"{where}: reward {rec['reward']} is not the rewards.weights sum of {', '.join(parts)} ({total:g}): "
                    f"to train on your reward column as it is, drop the columns {', '.join(parts)} (`gdro export` "
                    "writes them); to have it computed from them, drop the reward column")
            reward = total
        else:
            reward = _number(rec["reward"], where, "reward")
        written = _text(rec, "image")
        image = written.replace("\\", "/")  # a manifest written on Windows separates with backslashes
        pure = PurePosixPath(image)
        if pure.is_absolute() or ".." in pure.parts or PureWindowsPath(written).drive:
            raise ManifestError(f"{where}: image {written!r} must be a path relative to the manifest, inside its folder "
                                "(the import stage depends on that folder)")
        prompt = _text(rec, "prompt")
        if (prompt, image) in seen:
            raise ManifestError(f"{where}: duplicate row: prompt {prompt!r} with image {image!r} is already at "
                                f"{seen[(prompt, image)]}")
        seen[(prompt, image)] = where
        seed = _text(rec, "seed", "-1")
        try:
            seed = int(float(seed))
        except ValueError:
            raise ManifestError(f"{where}: seed {seed!r} is not an integer") from None
        rows.append(Row(where, prompt, image, reward, _text(rec, "group", prompt), _text(rec, "target"), seed, parts))
    if not rows:
        raise ManifestError(f"{path}: the manifest has no rows")
    return rows


@dataclass
class Groups:
    kept: list[list[Row]]
    per_group: int
    dropped: dict[str, int]  # reason -> groups
    trimmed: int  # rows beyond per_group in larger groups

    def summary(self) -> str:
        drops = ", ".join(f"{n} {why}" for why, n in self.dropped.items() if n) or "none"
        return (f"{len(self.kept)} groups of {self.per_group} images kept; groups dropped: {drops}; "
                f"{self.trimmed} rows over {self.per_group} per group left out")


def group_rows(rows: list[Row], group_size: int, small: str) -> Groups:
    """Rows by group, in order of first appearance. Dropped (counted): groups of one image, groups whose rewards
    are all equal, and (``small`` drop) groups under ``group_size``. Every kept group is cut to the smallest kept
    size N (the store holds P x N images); rows past N in manifest order are counted."""
    groups: dict[str, list[Row]] = {}
    for r in rows:
        members = groups.setdefault(r.group, [])
        if members and (members[0].prompt, members[0].target) != (r.prompt, r.target):
            first = members[0]
            what = "prompt" if first.prompt != r.prompt else "target"
            raise ManifestError(f"{r.where}: group {r.group!r} has another {what} than its first row ({first.where}): "
                                "a group is the images of one prompt")
        members.append(r)
    dropped = {"with one image": 0, "with all rewards equal": 0, f"under train.group_size {group_size}": 0}
    kept = []
    for name, members in groups.items():
        if len(members) == 1:
            dropped["with one image"] += 1
        elif len({m.reward for m in members}) == 1:
            dropped["with all rewards equal"] += 1
        elif len(members) < group_size:
            if small == "refuse":
                raise ManifestError(f"{members[0].where}: group {name!r} has {len(members)} images, fewer than "
                                    f"train.group_size {group_size} (data.small_groups: refuse; `drop` skips it)")
            dropped[f"under train.group_size {group_size}"] += 1
        else:
            kept.append(members)
    if not kept:
        raise ManifestError(f"no group is left to train on: {Groups([], 0, dropped, 0).summary()}")
    n = min(len(g) for g in kept)
    return Groups([g[:n] for g in kept], n, dropped, sum(len(g) - n for g in kept))


# --- images --------------------------------------------------------------------------------------------------
def open_image(base: Path, row: Row) -> Image.Image:
    path = base / row.image
    try:
        im = Image.open(path)
        im.load()
        return im
    except FileNotFoundError:
        problem = "is missing"
    except (OSError, SyntaxError, ValueError) as err:
        problem = f"is not a readable image ({type(err).__name__})"
    raise ManifestError(f"{row.where}: image {path} {problem}")


def as_task_image(im: Image.Image, mode: str) -> Image.Image:
    """``im`` as the task's images are: upright (its EXIF orientation applied, as viewers show a photo), in
    ``mode`` (``RGB``, or ``L`` for a grayscale world), transparency composited on white, 16-bit levels scaled to
    8-bit. Returns ``im`` itself when nothing changes, so an image already in that form is stored as it is."""
    out = ImageOps.exif_transpose(im) if im.getexif().get(ExifTags.Base.Orientation, 1) != 1 else im
    if out.mode in ("I", "F") or out.mode.startswith("I;16"):
        levels = np.asarray(out, dtype=np.float64)
        top = levels.max(initial=0)
        # 16-bit PNGs open as I / I;16 (0..65535); float images hold 0..1
        scale = 1 / 257 if top > 255 else 255.0 if out.mode == "F" and top <= 1 else 1.0
        out = Image.fromarray(np.clip(np.round(levels * scale), 0, 255).astype(np.uint8), "L")
    if out.mode == "P" and "transparency" in out.info:
        out = out.convert("RGBA")
    if out.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = out.convert("RGBA")
        out = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return out if out.mode == mode else out.convert(mode)


def fit_size(im: Image.Image, size: tuple[int, int], policy: str, where: str) -> Image.Image:
    """``im`` at ``size`` (width, height) under ``data.resize``; refuse names the row and the sizes."""
    if im.size == size:
        return im
    if policy == "refuse":
        raise ManifestError(f"{where}: image is {im.size[0]}x{im.size[1]}, the task's images are {size[0]}x{size[1]} "
                            "(width x height): resize it, or set data.resize: resize or center_crop")
    if policy == "resize":
        return im.resize(size, Image.Resampling.BICUBIC)
    return ImageOps.fit(im, size, Image.Resampling.BICUBIC)


def stored_latents(folder: Path, base_fingerprint: str) -> tuple[dict[str, str], Path | None]:
    """The exported latents beside the manifest (image -> PNG sha256) when they were made with this base."""
    from safetensors import safe_open

    path = folder / LATENTS_FILE
    if not path.is_file():
        return {}, None
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get(BASE_KEY) != base_fingerprint:
        return {}, None
    return {k: v for k, v in meta.items() if k != BASE_KEY}, path


# --- the token limit ------------------------------------------------------------------------------------------
def prompt_checker(params, model, words: Sequence[str] = ()) -> Callable[[str, str], None]:
    """A check that a prompt fits the text encoder: the built-in tokenizer's vocabulary (its whole ``words``, the
    task's caption words) and model.builtin.max_tokens, or a real family's longest tokenizer's model_max_length."""
    from gdro_core.data.prompt_checks import check_encodable

    if params.model.source == "builtin":
        from gdro_core.models.builtin_tokenizer import CHARACTERS, build_tokenizer

        tok = build_tokenizer(list(words))
        limit = params.model.builtin.max_tokens

        def check(prompt: str, where: str) -> None:
            check_encodable([_Prompt(prompt)], set(CHARACTERS), limit, lambda s: len(tok(s).input_ids), where)

        return check
    pipe = model.pipe
    tok = next(t for t in (getattr(pipe, n, None) for n in ("tokenizer_3", "tokenizer_2", "tokenizer")) if t)
    limit = int(tok.model_max_length)

    def check_real(prompt: str, where: str) -> None:
        n = len(tok(prompt).input_ids)
        if n > limit:
            raise ManifestError(f"{where}: prompt {prompt[:60]!r} is {n} tokens, over the text encoder's limit of "
                                f"{limit} ({type(tok).__name__}.model_max_length): shorten it")

    return check_real


@dataclass(frozen=True)
class _Prompt:
    prompt: str


# --- import ---------------------------------------------------------------------------------------------------
@dataclass
class ImportResult:
    rows: int
    groups: Groups
    encoded: int
    reused: int
    fingerprint: str

    def summary(self) -> str:
        return (f"imported {self.rows} images: {self.groups.summary()}; {self.encoded} encoded by the model, "
                f"{self.reused} stored latents reused")


def _tmp_dir(path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.import{TMP_SUFFIX}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def import_manifest(
    manifest: Path, params, load_model: Callable[[], Any], rollout_dir: Path, rewards: Path, fp: str,
    base_fingerprint: str, log: Log = print, words: Sequence[str] = (),
) -> ImportResult:
    """Read, check and encode ``manifest``; write the rollout store at ``rollout_dir`` (fingerprint ``fp``: see
    :func:`gdro_core.cache_keys.import_fingerprint`) and the reward table at ``rewards`` tied to it. Nothing is
    moved into place before every row has passed. The model (``load_model()``) is loaded only once every row has
    read well, so a missing file or a bad row is named at once, not after a checkpoint's load."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    manifest, rollout_dir, rewards = Path(manifest), Path(rollout_dir), Path(rewards)
    folder = manifest.parent
    weights = dict(params.rewards.weights)
    rows = read_manifest(manifest, weights)
    model = load_model()
    check_prompt = prompt_checker(params, model, words)
    for r in rows:
        try:
            check_prompt(r.prompt, r.where)
        except ValueError as err:
            raise ManifestError(str(err)) from None
    groups = group_rows(rows, params.train.group_size, params.data.small_groups)
    for why, n in groups.dropped.items():
        if n:
            log(f"import: dropped {n} group(s) {why}")
    if groups.trimmed:
        log(f"import: left out {groups.trimmed} row(s) past {groups.per_group} images in larger groups")
    if params.train.noise == "prior" and any(r.seed < 0 for g in groups.kept for r in g):
        bad = next(r for g in groups.kept for r in g if r.seed < 0)
        raise ManifestError(f"{bad.where}: no seed: train.noise prior regenerates each image's sampler noise from its "
                            "seed; give a seed column or use train.noise fresh")

    height, width, channels = params.image_shape
    mode = "L" if channels == 1 else "RGB"
    known, latents_path = stored_latents(folder, base_fingerprint)
    n = groups.per_group
    per_shard = max(1, params.sampler.batch_size // n)
    image_hashes: dict[str, str] = {}
    prepared: list[tuple[dict, Image.Image | None, str]] = []  # store row, image to save (None: copy), source
    for i, members in enumerate(groups.kept):
        for m, r in enumerate(members):
            src = folder / r.image
            im = open_image(folder, r)
            fitted = fit_size(as_task_image(im, mode), (width, height), params.data.resize, r.where)
            image_hashes[r.image] = sha256_file(src)
            row = {"prompt_index": i, "member": m, "prompt": r.prompt, "target": r.target, "seed": r.seed,
                   "image": f"images/{i:05d}_{m:03d}.png"}
            copy = fitted is im and im.format == "PNG"
            prepared.append((row, None if copy else fitted, r.image))

    tmp = _tmp_dir(rollout_dir)
    table_tmp = rewards.with_name(f".{rewards.name}.import{TMP_SUFFIX}")
    encoded = reused = 0
    try:
        (tmp / "images").mkdir()
        (tmp / RECORDS).mkdir()
        shards = []
        for s, start in enumerate(range(0, len(groups.kept), per_shard)):
            part = prepared[start * n:(start + per_shard) * n]
            shard = Shard(s, tuple(row for row, _, _ in part))
            images, lat = {}, []
            for row, fitted, source in part:
                dest = tmp / row["image"]
                if fitted is None:
                    shutil.copyfile(folder / source, dest)
                else:
                    fitted.save(dest, format="PNG")
                images[row["image"]] = sha256_file(dest)
                if latents_path is not None and fitted is None and known.get(source) == image_hashes[source]:
                    with safe_open(str(latents_path), "pt") as f:
                        lat.append(f.get_tensor(source))
                    reused += 1
                else:
                    with torch.no_grad():
                        lat.append(model.encode_images([Image.open(dest)])[0].float().cpu())
                    encoded += 1
            x0 = torch.stack(lat)
            if tuple(x0.shape[1:]) != tuple(model.latent_shape):
                raise ManifestError(f"{part[0][2]}: latent of shape {tuple(x0.shape[1:])}, the model's is "
                                    f"{tuple(model.latent_shape)}")
            with torch.no_grad():
                cond = model.encode(shard.prompts)
            k = len(shard.prompts)
            tensors = {"latents": x0.reshape(k, n, *x0.shape[1:]).contiguous()}
            tensors |= {f"cond.{key}": v.float().cpu().contiguous() for key, v in cond.items()}
            save_file(tensors, str(tmp / shard.name))
            write_json(tmp / shard.record, {"fingerprint": fp, "shard": shard.name,
                                            "sha256": sha256_file(tmp / shard.name), "images": images,
                                            "rows": list(shard.rows)})
            shards.append(shard)
        store = write_manifest(tmp, shards, n, fp)
        table = pd.DataFrame.from_records(store["rows"])
        kept = [r for g in groups.kept for r in g]
        table["reward"] = [r.reward for r in kept]
        for name in weights:
            if all(name in r.parts for r in kept):
                table[name] = [r.parts[name] for r in kept]
        write_table(table, table_tmp, fp)
        if rollout_dir.exists():
            shutil.rmtree(rollout_dir)
        tmp.rename(rollout_dir)
        os.replace(table_tmp, rewards)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        table_tmp.unlink(missing_ok=True)
    return ImportResult(len(prepared), groups, encoded, reused, fp)
