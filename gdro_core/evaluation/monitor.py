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
from gdro_core.evaluation.judge_scores import Judge
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
    """Called at each checkpoint with the EMA adapter; keeps the curve, each image's scores and each checkpoint's
    weights on disk (resumable), so the adapter to keep can be chosen from all of them at the end."""

    def __init__(
        self, model: FlowModel, prompts: Sequence[PromptRecord], task: Task, judge: Judge, *, judge_task: str,
        seed: int, steps: int, guidance: float, batch_size: int, keep: str, workdir: Path, log: Logger,
        per_prompt: int = 1, tie_se: float = 0.0,
    ):
        self.model, self.prompts, self.task, self.judge = model, list(prompts), task, judge
        self.kw = dict(per_prompt=per_prompt, base_seed=seed, steps=steps, guidance=guidance, batch_size=batch_size)
        self.records = [q for q in self.prompts for _ in range(per_prompt)]  # generate's prompt-major order
        self.judge_task, self.keep, self.tie_se = judge_task, keep, tie_se
        self.probe_prompts = self.prompts[:PROBE_PROMPTS]
        self.probe_seeds = eval_seeds(seed, len(self.probe_prompts), 1)
        self.workdir, self.log = Path(workdir), log
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / "curve.csv"
        self.curve = pd.read_csv(path) if path.is_file() else pd.DataFrame()
        path = self.workdir / "images.csv"
        self.images = pd.read_csv(path) if path.is_file() else pd.DataFrame()

    def _measure(self, adapter: bool = True) -> tuple[dict[str, float], pd.DataFrame]:
        images = generate(self.model, self.prompts, **self.kw)
        scores = assess(images, self.records, self.task, self.judge, self.judge_task)
        ratio = velocity_norm_probe(self.model, self.probe_prompts, self.probe_seeds, PROBE_STEPS) if adapter else 1.0
        return {**self.task.summarise(scores), "velocity_norm_ratio": ratio}, scores

    def _record(self, step: int, measured: tuple[dict[str, float], pd.DataFrame]) -> None:
        metrics, scores = measured
        row = pd.DataFrame([{"step": step, **metrics}])
        self.curve = pd.concat([self.curve[self.curve.get("step", pd.Series(dtype=int)) != step], row], ignore_index=True)
        per_image = pd.DataFrame({"step": step, "image": range(len(scores)), "corrected": scores["corrected"]})
        self.images = pd.concat([self.images[self.images.get("step", pd.Series(dtype=int)) != step], per_image],
                                ignore_index=True)
        atomic_write(self.workdir / "images.csv", lambda p: self.images.to_csv(p, index=False))
        atomic_write(self.workdir / "curve.csv", lambda p: self.curve.to_csv(p, index=False))
        self.log(step, {f"checkpoint/{k}": v for k, v in metrics.items()})

    def _weights(self, step: int) -> Path:
        return self.workdir / f"adapter-{step}.safetensors"

    def kept_step(self) -> int:
        return best_step(self.curve, self.keep, self.images, self.tie_se)

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
        # saved before it is recorded: a recorded checkpoint always has its weights (a later tie may choose it)
        atomic_write(self._weights(step), lambda p: save_file(
            {k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(p), metadata={"step": str(step)}))
        try:
            with torch.no_grad():
                self._record(step, self._measure())
        finally:
            set_lora_state(transformer, live)
            transformer.train()

    def kept(self) -> tuple[int, dict[str, torch.Tensor]]:
        """The step and adapter weights selected by ``keep`` (and ``tie_se``)."""
        step = self.kept_step()
        path = self._weights(step)
        if not path.is_file():
            raise FileNotFoundError(f"no weights for the kept checkpoint (step {step}) in {self.workdir}")
        return step, load_file(path)
