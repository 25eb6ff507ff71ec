"""Pretraining data: the low-quality (blurred) share and mislabelled captions that make the base imperfect."""

import random

import numpy as np

from gdro_core.params import World
from gdro_core.tasks.ocr.world import mislabel, render_batch
from gdro_core.training.degrade import degrade


def _renders(n: int) -> np.ndarray:
    return render_batch(["123"] * n, 24, 48, 17, 0, random.Random(0))


def test_no_low_quality_share_leaves_renders_untouched():
    clean = _renders(8)
    assert np.array_equal(degrade(clean.copy(), 0.0, 2.0, random.Random(0)), clean)


def test_blurred_share_is_about_the_requested_share_and_blur_softens_the_glyphs():
    clean = _renders(400)
    out = degrade(clean.copy(), 0.3, 2.0, random.Random(0))
    changed = np.array([not np.array_equal(a, b) for a, b in zip(out, clean)])
    assert 0.22 < changed.mean() < 0.38
    # blurred images lose their full-intensity ink and gain mid-grey; the background stays background
    assert out[changed].max(axis=(1, 2, 3)).max() < 0.5
    assert np.array_equal(out[~changed], clean[~changed])
    assert np.isclose(out[changed][:, 0, 0, 0], -1.0, atol=1e-3).all()


def test_mislabelled_caption_is_another_string_of_the_world():
    world = World()
    rng = random.Random(0)
    for _ in range(200):
        other = mislabel("123", world, rng)
        assert other != "123"
        assert world.min_len <= len(other) <= world.max_len and set(other) <= set(world.alphabet)


def test_interrupted_pretraining_resumes_to_the_same_weights_and_schedule(tiny_params, tmp_path):
    """A resumed run restores optimiser, learning-rate schedule and RNGs, so it ends where an unbroken run ends."""
    import shutil

    import torch

    from gdro_core.training.checkpoint import latest_checkpoint, load_checkpoint
    from gdro_core.models.builtin import build_builtin_pipeline
    from gdro_core.tasks.ocr.world import text_batch
    from gdro_core.training.pretrain import pretrain

    p = tiny_params
    cfg = p.pretrain.model_copy(update={"steps": 4, "checkpoint_every": 2, "lr_schedule": "cosine", "warmup_steps": 1})
    logs: dict[str, list[float]] = {"full": [], "resumed": []}

    def run(name: str, ckpt) -> dict[str, torch.Tensor]:
        pipe = build_builtin_pipeline(p.model.builtin, p.image_shape, p.sampler.shift, cfg.seed)
        pretrain(pipe, (p.world.height, p.world.width), text_batch(p.world, p.prompts.templates),
                 cfg.model_copy(update={"log_every": 1}), ckpt, lambda step, m: logs[name].append(m["pretrain/lr"]))
        return {k: v.clone() for k, v in pipe.transformer.state_dict().items()}

    full = run("full", tmp_path / "full")
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    shutil.copytree(tmp_path / "full" / "step-0000002", interrupted / "step-0000002")
    resumed = run("resumed", interrupted)
    assert latest_checkpoint(interrupted).name == "step-0000004"
    assert logs["resumed"] == logs["full"][2:]  # the schedule continued, not restarted
    assert logs["full"][-1] < logs["full"][1]  # cosine anneals
    for k in full:
        torch.testing.assert_close(resumed[k], full[k])
    assert "schedule" in load_checkpoint(interrupted / "step-0000004")[1]


def test_pretraining_draws_its_timesteps_as_pretrain_params_say(tiny_params, tmp_path, monkeypatch):
    """pretrain.timestep_sampling / logit_mean / logit_std reach the sampler: t shifted towards noise is where a
    scene's layout is decided."""
    import torch

    import gdro_core.training.pretrain as pretrain_module
    from gdro_core.models.builtin import build_builtin_pipeline
    from gdro_core.tasks.ocr.world import text_batch

    p = tiny_params
    seen = []
    real = pretrain_module.sample_timesteps

    def spy(n, scheme, mean, std, gen):
        t = real(n, scheme, mean, std, gen)
        seen.append((scheme, mean, std, t))
        return t

    monkeypatch.setattr(pretrain_module, "sample_timesteps", spy)
    for update in ({"timestep_sampling": "logit_normal", "logit_mean": 2.0, "logit_std": 0.5},
                   {"timestep_sampling": "uniform"}):
        cfg = p.pretrain.model_copy(update={"steps": 1, "batch_size": 256, **update})
        pipe = build_builtin_pipeline(p.model.builtin, p.image_shape, p.sampler.shift, cfg.seed)
        pretrain_module.pretrain(pipe, (p.world.height, p.world.width), text_batch(p.world, p.prompts.templates), cfg,
                                 tmp_path / cfg.timestep_sampling, lambda step, m: None)
    (scheme, mean, std, shifted), (uniform, _, _, flat) = seen
    assert (scheme, mean, std, uniform) == ("logit_normal", 2.0, 0.5, "uniform")
    assert torch.logit(shifted).mean() > 1.8 and torch.logit(shifted).std() < 0.6  # sigmoid(N(2, 0.5))
    assert 0.4 < flat.mean() < 0.6 and (flat > 0.9).float().mean() > 0.05
