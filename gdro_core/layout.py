"""Where each stage reads and writes, relative to the project root (mirrors dvc.yaml)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from gdro_core.code_version import code_hash
from gdro_core.params import Params


@dataclass(frozen=True)
class Layout:
    root: Path
    params: Params

    def _p(self, base: str, *parts: str) -> Path:
        b = Path(base)
        return (b if b.is_absolute() else self.root / b).joinpath(*parts)

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
        return self._p(self.params.paths.data_dir, "rollouts")

    @property
    def rewards(self) -> Path:
        return self._p(self.params.paths.data_dir, "rewards.parquet")

    @property
    def adapter_dir(self) -> Path:
        return self._p(self.params.paths.adapter_dir)

    @property
    def reports_dir(self) -> Path:
        return self._p(self.params.paths.reports_dir)

    @property
    def metrics(self) -> Path:
        return self.reports_dir / "metrics.json"

    def checkpoints(self, stage: str, fingerprint: str) -> Path:
        """Per-configuration and per-code checkpoints: a changed config or changed stage code never resumes
        another's state."""
        key = hashlib.sha256(f"{fingerprint}:{code_hash(stage)}".encode()).hexdigest()
        return self.root / "checkpoints" / stage / key[:16]
