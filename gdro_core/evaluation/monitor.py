"""Held-out evaluation of training checkpoints: reward, judge, corrected score, the adapter to keep."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from gdro_core.evaluation.curves import best_step
from gdro_core.evaluation.heldout import assess, eval_seeds, generate
from gdro_core.models.base import FlowModel, velocity
from gdro_core.evaluation.judge import Judge
from gdro_core.models.lora import lora_state, reference, set_lora_state
from gdro_core.models.sampling import initial_noise
from gdro_core.objectives.implicit_reward import velocity_norm_ratio
from gdro_core.tasks.base import PromptRecord, Task
from gdro_core.data.store import atomic_write

Logger = Callable[[int, dict[str, float]], None]
PROBE_PROMPTS = 8  # held-out prompts the velocity-norm probe follows
PROBE_STEPS = 4  # Euler steps of the probe trajectory


@torch.no_grad()
def velocity_norm_probe(model: FlowModel, prompts: Sequence[PromptRecord], seeds: list[int], steps: int) -> float:
    """Mean ‖v_θ‖ / mean ‖v_ref‖ along the policy's own ``steps``-step Euler trajectories from the given seeds.

    A cheap reward-hacking signal beside the corrected score: a policy drifting to saturated or oversized
    images predicts longer velocities than its reference. Needs an adapter (the reference is the adapter off).
    """
    cond = model.encode([p.prompt for p in prompts])
    x = initial_noise(seeds, model.latent_shape).to(model.device, torch.float32)
    ts = torch.linspace(1.0, 0.0, steps + 1)
    ratios = []
    for t, t_next in zip(ts[:-1], ts[1:]):
        tt = t.expand(len(prompts)).to(model.device)
        v_pol = velocity(model, x, tt, cond).float()
        with reference(model.transformer):
            v_ref = velocity(model, x, tt, cond).float()
        ratios.append(float(velocity_norm_ratio(v_pol, v_ref)))
        x = x + float(t_next - t) * v_pol
    return sum(ratios) / len(ratios)


class CheckpointMonitor:
    """Called at each checkpoint with the EMA adapter; keeps the curve and the best weights on disk (resumable)."""

    def __init__(
        self, model: FlowModel, prompts: Sequence[PromptRecord], task: Task, judge: Judge, *, judge_task: str,
        seed: int, steps: int, guidance: float, batch_size: int, keep: str, workdir: Path, log: Logger,
        per_prompt: int = 1,
    ):
        self.model, self.prompts, self.task, self.judge = model, list(prompts), task, judge
        self.kw = dict(per_prompt=per_prompt, base_seed=seed, steps=steps, guidance=guidance, batch_size=batch_size)
        self.records = [q for q in self.prompts for _ in range(per_prompt)]  # generate's prompt-major order
        self.judge_task, self.keep = judge_task, keep
        self.probe_prompts = self.prompts[:PROBE_PROMPTS]
        self.probe_seeds = eval_seeds(seed, len(self.probe_prompts), 1)
        self.workdir, self.log = Path(workdir), log
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / "curve.csv"
        self.curve = pd.read_csv(path) if path.is_file() else pd.DataFrame()

    def _measure(self, adapter: bool = True) -> dict[str, float]:
        images = generate(self.model, self.prompts, **self.kw)
        metrics = self.task.summarise(assess(images, self.records, self.task, self.judge, self.judge_task))
        ratio = velocity_norm_probe(self.model, self.probe_prompts, self.probe_seeds, PROBE_STEPS) if adapter else 1.0
        return {**metrics, "velocity_norm_ratio": ratio}

    def _record(self, step: int, metrics: dict[str, float]) -> None:
        row = pd.DataFrame([{"step": step, **metrics}])
        self.curve = pd.concat([self.curve[self.curve.get("step", pd.Series(dtype=int)) != step], row], ignore_index=True)
        atomic_write(self.workdir / "curve.csv", lambda p: self.curve.to_csv(p, index=False))
        self.log(step, {f"checkpoint/{k}": v for k, v in metrics.items()})

    def evaluate_base(self) -> None:
        """Step 0: the model before any adapter is attached (skipped when already recorded)."""
        if not self.curve.empty and (self.curve["step"] == 0).any():
            return
        with torch.no_grad():
            self._record(0, self._measure(adapter=False))  # no adapter: the policy is its reference, ratio 1

    def __call__(self, step: int, weights: dict[str, torch.Tensor]) -> None:
        transformer = self.model.transformer
        live = {k: v.detach().clone() for k, v in lora_state(transformer).items()}
        set_lora_state(transformer, weights)
        transformer.eval()
        try:
            with torch.no_grad():
                self._record(step, self._measure())
        finally:
            set_lora_state(transformer, live)
            transformer.train()
        if best_step(self.curve, self.keep) == step:
            atomic_write(self.workdir / "kept.safetensors", lambda p: save_file(
                {k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(p), metadata={"step": str(step)}))

    def kept(self) -> tuple[int, dict[str, torch.Tensor]]:
        """The step and adapter weights selected by ``keep``."""
        path = self.workdir / "kept.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"no kept checkpoint in {self.workdir}")
        return best_step(self.curve, self.keep), load_file(path)
