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


PIXEL_JUDGE_NOTE = ("the pixel judge compares images with the built-in world's clean renders, so with a real checkpoint "
                    "the corrected score rests on a judge that does not know these images; set judge.kind: "
                    "unified_reward and judge.model_path for a VLM judge")


def corrected_score_judge(params) -> dict[str, str]:
    """Which judge produced the corrected score (``corrected_score_judge``: ``judge.kind``), with a
    ``corrected_score_note`` when that is the pixel judge on a real checkpoint's images: metrics.json's ``judge``
    section and the evaluate run's tags."""
    out = {"corrected_score_judge": params.judge.kind}
    if params.judge.kind == "pixel" and params.model.source != "builtin":
        out["corrected_score_note"] = PIXEL_JUDGE_NOTE
    return out
