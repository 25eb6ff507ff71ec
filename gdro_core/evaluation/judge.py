"""The judge ``judge.kind`` names (method page §6): the task's pixel judge, or the VLM judge.

Every judge scores images 1–5 on alignment, coherence and style (:mod:`gdro_core.evaluation.judge_scores`).
The pixel judge belongs to the task's built-in world (its ``pixel_judge``); the VLM judge
(:mod:`gdro_core.evaluation.vlm_judge`) reads any image.
"""

from __future__ import annotations

from gdro_core.evaluation.judge_scores import Judge
from gdro_core.tasks.base import Task


def make_task_judge(task: Task, judge) -> Judge:
    """The judge ``judge.kind`` names; the pixel judge takes its references from the task's world."""
    return task.pixel_judge(judge) if judge.kind == "pixel" else _vlm_judge(judge)


def _vlm_judge(judge) -> Judge:
    from gdro_core.evaluation.vlm_judge import UnifiedRewardJudge

    return UnifiedRewardJudge.from_pretrained(judge.model_path, max_new_tokens=judge.max_new_tokens, device=judge.device)
