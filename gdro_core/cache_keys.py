"""Cache keys of the work a stage keeps between runs: rollouts and training checkpoints.

A key holds every input that can change the bytes the stage writes: the params its declaration names
(:mod:`gdro_core.stages`), the hash of the code it runs, and the hashes of the data it reads. Work made
under another key is never reused, so a changed image size, dtype or timestep shift remakes the rollouts
instead of finding old images "complete".
"""

from __future__ import annotations

from gdro_core.data.store import dir_hash, fingerprint, read_json, sha256_file
from gdro_core.layout import Layout
from gdro_core.models.identity import base_fingerprint
from gdro_core.stages import param_values, stage_code_hash, stage_params

TRAIN_LAYOUT_PARAMS = ("train.num_processes", "train.gradient_accumulation_steps", "train.gradient_checkpointing")
"""How each step's batch is computed (processes, micro-batches, recomputation): the same run either way, so an
interrupted run resumes on another process count."""


def rollout_fingerprint(lay: Layout) -> str:
    """Base weights, training prompts, the rollout stage's params and code (and in a later round, the previous
    round's adapter the images are sampled with)."""
    p = lay.params
    later = {"round": lay.round, "adapter": dir_hash(lay.previous_adapter())} if lay.round > 1 else {}
    return fingerprint({
        "params": param_values(p, stage_params("rollout", lay.round)),
        "code": stage_code_hash("rollout", p),
        "base": dir_hash(lay.base_dir),
        "base_fingerprint": base_fingerprint(p.model.source, lay.base_dir),
        "prompts": sha256_file(lay.prompts("train")),
        **later,
    })


def train_fingerprint(lay: Layout) -> str:
    """The train stage's params (less how a batch is split), the rollouts and reward table it trains on, and in a
    later round the adapter it starts from. The code hash is added by :meth:`Layout.checkpoints`."""
    p = lay.params
    later = {"round": lay.round, "init_adapter": dir_hash(lay.previous_adapter())} if lay.round > 1 else {}
    values = param_values(p, stage_params("train", lay.round))
    values["train"] = {k: v for k, v in values["train"].items() if f"train.{k}" not in TRAIN_LAYOUT_PARAMS}
    return fingerprint({
        "params": values,
        "rollouts": read_json(lay.rollout_dir / "manifest.json")["fingerprint"],
        "rewards": sha256_file(lay.rewards),
        "prompts": {split: sha256_file(lay.prompts(split)) for split in ("train", "val") if lay.prompts(split).is_file()},
        **later,
    })
