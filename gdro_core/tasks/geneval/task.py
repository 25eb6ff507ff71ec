"""The GenEval task behind the task seam: compositional prompts, GenEval's rules over a detector, the shapes world.

The reward table and its summary are :mod:`.reward`'s. Each method imports the part it needs
(:mod:`.prompts`, :mod:`.world`, :mod:`.reward` with its detectors and rules, :mod:`.judge`) when it runs,
so a stage that only reads prompts never loads a detector or the judge.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gdro_core.tasks.base import Progress

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    from PIL import Image

    from gdro_core.rewards.base import Reward
    from gdro_core.tasks.geneval.detectors import Detector
    from gdro_core.tasks.geneval.prompts import GenEvalPrompt
    from gdro_core.tasks.geneval.rules import Rules
    from gdro_core.tasks.geneval.world import WorldSpec


class GenEvalTask:
    name = "geneval"
    channels = 3

    def __init__(self, params, detector: Detector | None = None):
        self.params, self.cfg = params, params.geneval
        self.spec: WorldSpec | None = None
        self._rules: Rules | None = None
        self._detector = detector
        self._scenes: list[GenEvalPrompt] | None = None
        self._scorer: Reward | None = None

    @property
    def position_threshold(self) -> float:
        """GenEval's relative-position threshold, which the world lays scenes out by and the rules check."""
        return self.cfg.detector.position_threshold

    @property
    def rules(self) -> Rules:
        if self._rules is None:
            from gdro_core.tasks.geneval.reward import make_rules

            self._rules = make_rules(self.cfg)
        return self._rules

    @property
    def detector(self) -> Detector:
        """Built on first use: real detectors load their weights only when something is scored."""
        if self._detector is None:
            from gdro_core.tasks.geneval.detectors import make_detector

            self._detector = make_detector(self.cfg)
        return self._detector

    # prompt records
    def make_prompt_sets(self, root: Path = Path(".")) -> dict[str, list[GenEvalPrompt]]:
        """Read from ``geneval.metadata_dir`` (under ``root``) or generated; validated either way."""
        from gdro_core.tasks.geneval.prompts import generate_sets, metadata_sets, validate_sets

        p = self.params.prompts
        if self.cfg.metadata_dir:
            where = self.cfg.metadata_dir
            sets = metadata_sets(Path(root) / self.cfg.metadata_dir, p.n_val)
        else:
            where = "generated GenEval prompt sets"
            sizes = {"train": p.n_train, "test": p.n_test, "val": p.n_val}
            sets = generate_sets(self.cfg.classes, self.cfg.colors, self.cfg.max_count, self.cfg.tags, sizes, p.seed)
        validate_sets(sets, self.params, where)
        return sets

    def write_prompts(self, path: Path, records: Sequence[GenEvalPrompt]) -> None:
        from gdro_core.tasks.geneval.prompts import write_metadata

        write_metadata(path, records)

    def read_prompts(self, path: Path) -> list[GenEvalPrompt]:
        from gdro_core.tasks.geneval.prompts import read_metadata

        return read_metadata(path)

    def record(self, prompt: str, target: str) -> GenEvalPrompt:
        from gdro_core.tasks.geneval.prompts import GenEvalPrompt

        return GenEvalPrompt.from_target(prompt, target)

    def scene_prompts(self) -> list[GenEvalPrompt]:
        """Every prompt the world can caption: what the built-in model pretrains on."""
        if self._scenes is None:
            from gdro_core.tasks.geneval.prompts import scene_prompts

            self._scenes = scene_prompts(self.cfg)
        return self._scenes

    def caption_words(self) -> list[str]:
        from gdro_core.tasks.geneval.prompts import caption_words

        return caption_words(self.params)

    # reward
    @property
    def scorer(self) -> Reward:
        """The GenEval reward, or the weighted sum ``rewards.weights`` names (built on first use)."""
        if self._scorer is None:
            from gdro_core.rewards.registry import task_reward
            from gdro_core.tasks.geneval.reward import GenEvalReward

            self._scorer = task_reward(self.params, lambda: GenEvalReward(self.params, self.detector))
        return self._scorer

    def reward(self, images: list[Image.Image], records: Sequence[GenEvalPrompt],
               progress: Progress | None = None) -> pd.DataFrame:
        return self.scorer.score(images, records, progress)

    def summarise(self, scores: pd.DataFrame) -> dict[str, float]:
        from gdro_core.rewards.weighted import part_means
        from gdro_core.tasks.geneval.reward import summarise

        return summarise(scores, self.cfg.clean_coherence) | part_means(scores, list(self.params.rewards.weights))

    def second_opinion(self, images: list[Image.Image], records: Sequence) -> dict[str, float]:
        return {}  # no second scorer configured for this task

    def ceiling(self, records: Sequence[GenEvalPrompt]) -> dict[str, float]:
        """The summary of the world's clean scenes for ``records``."""
        from gdro_core.tasks.geneval.world import clean_images

        images = clean_images(records, self._world(), self.position_threshold)
        return self.summarise(self.reward(images, records))

    # the built-in world
    def _world(self) -> WorldSpec:
        """Built on first use, so a real model with real classes never needs the shapes world."""
        if self.spec is None:
            from gdro_core.tasks.geneval.world import world_spec

            self.spec = world_spec(self.cfg)
        return self.spec

    def render(self, record: GenEvalPrompt, rng: random.Random) -> Image.Image:
        """A clean scene for ``record``."""
        from gdro_core.tasks.geneval.world import render

        return render(record, self._world(), rng, self.position_threshold)

    @property
    def world_shape(self) -> tuple[int, int]:
        return self.cfg.world.height, self.cfg.world.width

    def pretrain_batch(self, n: int, cfg, rng: random.Random) -> tuple[np.ndarray, list[str]]:
        """Scenes of random prompts (tags equally likely), captioned with their prompts; some dropped, some
        misstating one attribute (``attribute_errors``), some mislabelled (``caption_noise``), some blurred
        (``low_quality_share``)."""
        from gdro_core.tasks.geneval.world import scene_batch

        return scene_batch(self.scene_prompts(), self._world(), self.position_threshold, n, cfg, rng,
                           self.cfg.max_count)

    def pixel_judge(self, judge_params):
        """The scene judge: references are the world's scenes (half anti-aliased, ``judge.reference_supersample``);
        alignment is the reward's partial credit, shape fidelity the detector's confidence."""
        from gdro_core.tasks.geneval.judge import SceneJudge, scene_judge_config
        from gdro_core.tasks.geneval.reward import GenEvalReward, shape_fidelity
        from gdro_core.tasks.geneval.world import reference_images

        spec = self._world()
        refs = reference_images(self.scene_prompts(), spec, judge_params.reference_images,
                                judge_params.reference_supersample, self.position_threshold)
        geneval = GenEvalReward(self.params, self.detector)  # alignment is GenEval's, whatever rewards.weights says

        def align(images: list[Image.Image], targets: list[str]) -> list[float]:
            return list(geneval.score(images, [self.record("", t) for t in targets])["score"])

        return SceneJudge(scene_judge_config(spec, self.cfg, judge_params), refs, align,
                          lambda images: shape_fidelity(self.detector, images))
