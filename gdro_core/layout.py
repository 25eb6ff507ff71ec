"""Where each stage reads and writes, relative to the project root (dvc.yaml and rounds/dvc.yaml are generated from it).

Round 1 is the default pipeline's paths; a later round r (``--round r``) keeps the prompts and the base and
writes its rollouts, reward table, adapter and reports under ``rounds/<r>/`` of the data, models and reports
directories."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from gdro_core.params import Params
from gdro_core.stages import ROUND_STAGES


ROUNDS_DIR = "rounds"
__all__ = ["Layout", "RoundError", "ROUND_STAGES", "ROUNDS_DIR"]


class RoundError(ValueError):
    """A round that cannot run: no such round, or the previous round's adapter is missing."""


@dataclass(frozen=True)
class Layout:
    root: Path
    params: Params
    round: int = 1

    def __post_init__(self) -> None:
        if self.round < 1:
            raise RoundError(f"round {self.round} does not exist: rounds count from 1 (the default pipeline)")

    def _p(self, base: str, *parts: str) -> Path:
        b = Path(base)
        return (b if b.is_absolute() else self.root / b).joinpath(*parts)

    def _r(self, base: str, *parts: str) -> Path:
        """``base/parts`` in round 1, ``base/rounds/<r>/parts`` in a later round."""
        return self._p(base, *parts) if self.round == 1 else self._p(base, ROUNDS_DIR, str(self.round), *parts)

    @property
    def prompts_dir(self) -> Path:
        return self._p(self.params.paths.data_dir, "prompts")

    def prompts(self, split: str) -> Path:
        return self.prompts_dir / f"{split}.jsonl"

    @property
    def base_dir(self) -> Path:
        return self._p(self.params.paths.models_dir, "base")

    @property
    def rollout_dir(self) -> Path:
        return self._r(self.params.paths.data_dir, "rollouts")

    @property
    def rewards(self) -> Path:
        return self._r(self.params.paths.data_dir, "rewards.parquet")

    @property
    def import_manifest(self) -> Path:
        """The manifest `gdro import` reads (``data.manifest``)."""
        return self._p(self.params.data.manifest)

    @property
    def import_dir(self) -> Path:
        """The manifest's folder, which holds its images: the import stage's data dependency."""
        return self.import_manifest.parent

    @property
    def adapter_dir(self) -> Path:
        if self.round == 1:
            return self._p(self.params.paths.adapter_dir)
        return self._r(self.params.paths.models_dir, "adapter")

    @property
    def reports_dir(self) -> Path:
        return self._r(self.params.paths.reports_dir)

    def previous_adapter(self) -> Path:
        """Round r-1's adapter directory, which round r samples from and starts training at."""
        from gdro_core.models.lora import WEIGHTS  # not at import: every command loads the layout, few need torch

        if self.round == 1:
            raise RoundError("round 1 trains from the base: it has no previous round")
        previous = Layout(self.root, self.params, self.round - 1)
        if not (previous.adapter_dir / WEIGHTS).is_file():
            command = "gdro train" if self.round == 2 else f"gdro train --round {self.round - 1}"
            raise RoundError(
                f"round {self.round} starts from round {self.round - 1}'s adapter, which is missing at "
                f"{previous.adapter_dir}: run `{command}` first (or `dvc repro rounds/dvc.yaml`)"
            )
        return previous.adapter_dir

    @property
    def metrics(self) -> Path:
        return self.reports_dir / "metrics.json"

    def checkpoints(self, stage: str, fingerprint: str) -> Path:
        """Per-key checkpoints: the key (:mod:`gdro_core.cache_keys`) holds the stage's params, inputs and code
        hash, so a changed config or changed stage code never resumes another's state."""
        key = hashlib.sha256(fingerprint.encode()).hexdigest()
        return self.root / "checkpoints" / stage / key[:16]
