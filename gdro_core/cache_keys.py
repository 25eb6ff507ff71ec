"""Cache keys of the work a stage keeps between runs: rollouts and training checkpoints.

A key holds every input that can change the bytes the stage writes: the params its declaration names
(:mod:`gdro_core.stages`), the hash of the code it runs, and the hashes of the data it reads. Work made
under another key is never reused, so a changed image size, dtype or timestep shift remakes the rollouts
instead of finding old images "complete".
"""

from __future__ import annotations

import pandas as pd

from gdro_core.data.rollout import MANIFEST, is_complete
from gdro_core.data.store import dir_hash, fingerprint, read_json, sha256_file
from gdro_core.layout import Layout
from gdro_core.models.identity import base_fingerprint
from gdro_core.code_closure import stage_code_hash
from gdro_core.stages import param_values, stage_params
from gdro_core.sweep import SweepError

TRAIN_LAYOUT_PARAMS = ("train.num_processes", "train.gradient_accumulation_steps", "train.gradient_checkpointing")
"""How each step's batch is computed (processes, micro-batches, recomputation): the same run either way, so an
interrupted run resumes on another process count."""


def keyed_params(lay: Layout, stage: str) -> dict:
    """The stage's declared params as its key holds them. A checkpoint's path is left out: its content is in the key
    (``base_fingerprint``), so a project moved elsewhere keeps its rollouts and checkpoints."""
    values = param_values(lay.params, stage_params(stage, lay.round))
    if "model" in values and values["model"]["source"] != "builtin":
        values["model"] = {**values["model"], "source": "checkpoint"}
    return values


def rollout_fingerprint(lay: Layout) -> str:
    """Base weights, training prompts, the rollout stage's params and code (and in a later round, the previous
    round's adapter the images are sampled with)."""
    p = lay.params
    later = {"round": lay.round, "adapter": dir_hash(lay.previous_adapter())} if lay.round > 1 else {}
    return fingerprint({
        "params": keyed_params(lay, "rollout"),
        "code": stage_code_hash("rollout", p),
        "base": dir_hash(lay.base_dir),
        "base_fingerprint": base_fingerprint(p.model.source, lay.base_dir),
        "prompts": sha256_file(lay.prompts("train")),
        **later,
    })


def import_fingerprint(lay: Layout) -> str:
    """The import stage's key, and the fingerprint of the rollout store it writes: the base, the import params and
    code, and every file of the manifest's folder (the manifest, its images, exported latents)."""
    p = lay.params
    return fingerprint({
        "source": "import",
        "params": keyed_params(lay, "import"),
        "code": stage_code_hash("import", p),
        "base": dir_hash(lay.base_dir),
        "base_fingerprint": base_fingerprint(p.model.source, lay.base_dir),
        "manifest": lay.import_manifest.name,
        "folder": dir_hash(lay.import_dir),
    })


def train_fingerprint(lay: Layout) -> str:
    """The train stage's params (less how a batch is split) and code, the rollouts, reward table and prompts it
    trains on, and in a later round the adapter it starts from."""
    p = lay.params
    later = {"round": lay.round, "init_adapter": dir_hash(lay.previous_adapter())} if lay.round > 1 else {}
    values = keyed_params(lay, "train")
    values["train"] = {k: v for k, v in values["train"].items() if f"train.{k}" not in TRAIN_LAYOUT_PARAMS}
    return fingerprint({
        "params": values,
        "code": stage_code_hash("train", p),
        "rollouts": read_json(lay.rollout_dir / "manifest.json")["fingerprint"],
        "rewards": sha256_file(lay.rewards),
        "prompts": {split: sha256_file(lay.prompts(split)) for split in ("train", "val") if lay.prompts(split).is_file()},
        **later,
    })


def pretrain_fingerprint(lay: Layout) -> str:
    """The base stage's params and code: pretraining checkpoints made by other params or code are never resumed."""
    p = lay.params
    return fingerprint({"params": keyed_params(lay, "base"), "code": stage_code_hash("base", p)})


def missing_inputs(lay: Layout) -> list[str]:
    """Cached inputs a sweep needs and does not make itself."""
    needed = [
        lay.prompts("train"), lay.prompts("val"), lay.prompts("test"), lay.base_dir, lay.rollout_dir / MANIFEST,
        lay.rewards,
    ]
    return [str(p.relative_to(lay.root) if p.is_relative_to(lay.root) else p) for p in needed if not p.exists()]


def stale_stages(lay: Layout) -> list[str]:
    """Stages whose cached output no longer matches its params: ``[]``, ``["score"]``, ``["rollout", "score"]`` or
    (``data.source: import``) ``["import"]``.

    Missing cached data is an error (a sweep never makes it from scratch); rollouts made with other rollout,
    sampler or base params are remade, and a reward table that does not cover the rollouts is rescored.
    """
    missing = missing_inputs(lay)
    if missing:
        raise SweepError(
            f"a sweep trains on the cached rollouts and reward table, and these are missing: {', '.join(missing)}; "
            "make them first with `dvc repro score` (or `gdro prompts && gdro base && gdro rollout && gdro score`)"
        )
    if lay.params.data.source == "import":  # written together with its reward table
        return [] if is_complete(lay.rollout_dir, import_fingerprint(lay)) else ["import"]
    if not is_complete(lay.rollout_dir, rollout_fingerprint(lay)):
        return ["rollout", "score"]
    seeds = sorted(r["seed"] for r in read_json(lay.rollout_dir / MANIFEST)["rows"])
    scored = sorted(pd.read_parquet(lay.rewards, columns=["seed"])["seed"].tolist())
    return [] if seeds == scored else ["score"]
