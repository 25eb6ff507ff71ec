"""The corrected score and its judge (method page §6)."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from gdro_core.evaluation.corrected_score import corrected_score, judge_mean, mean_corrected
from gdro_core.evaluation.curves import best_step, hacking_trend, plot_curves
from gdro_core.tasks.ocr.judge import JudgeConfig, PixelJudge
from gdro_core.tasks.ocr.world import render_text

# The paper's Table 3 (FLUX.1-dev): (reward, corrected) for OCR and GenEval.
TABLE3 = {
    "FLUX.1 base": ((0.5843, 0.4486), (0.6178, 0.4646)),
    "Flow-GRPO": ((0.8714, 0.5482), (0.8520, 0.4757)),
    "Flow-GRPO longer": ((0.9540, 0.4810), (0.8934, 0.4642)),
    "DanceGRPO": ((0.8719, 0.5406), (0.8549, 0.4831)),
    "Diffusion-DPO": ((0.8158, 0.5341), (0.6488, 0.4162)),
    "GDRO": ((0.8721, 0.5701), (0.8517, 0.5148)),
}


@pytest.mark.parametrize("method", TABLE3)
def test_table3_rows_round_trip(method):
    for reward, published in TABLE3[method]:
        u_hat = (published - 0.2) / reward + 3  # the judge mean the row implies
        assert 1.0 <= u_hat <= 5.0
        assert corrected_score(reward, u_hat) == pytest.approx(published, abs=5e-4)


def test_table3_implied_judge_means_rank_gdro_first_on_ocr():
    u = {m: (c - 0.2) / r + 3 for m, ((r, c), _) in TABLE3.items()}
    assert max(u, key=u.get) == "FLUX.1 base"  # the untrained model has the best quality ...
    assert sorted(u, key=u.get)[-2] == "GDRO"  # ... and GDRO keeps the most of it among trained models


def test_corrected_score_by_hand():
    assert corrected_score(0.5, 4.0) == pytest.approx(0.7)
    assert corrected_score(1.0, 3.0) == pytest.approx(0.2)  # a judge at the midpoint cancels the reward
    assert corrected_score(0.9, 2.0) == pytest.approx(-0.7)  # poor quality turns a high reward negative
    assert mean_corrected([0.5, 1.0], [4.0, 3.0]) == pytest.approx(0.45)


def test_judge_mean_dimensions_per_task():
    s = {"alignment": 5.0, "coherence": 2.0, "style": 3.0}
    assert judge_mean(s, "ocr") == pytest.approx(10 / 3)
    assert judge_mean(s, "geneval") == pytest.approx(2.5)


@pytest.fixture(scope="module")
def judge():
    return PixelJudge(JudgeConfig(24, 48, 17, 1, "0123456789", 3, 3, reference_images=64))


def test_clean_renders_score_high_and_noise_scores_low(judge):
    clean = [render_text(t, 24, 48, 17) for t in ("123", "907")]
    noise = Image.fromarray((np.random.default_rng(0).random((24, 48)) * 255).astype("uint8"))
    good = judge.score(clean, ["", ""], ["123", "907"])
    bad = judge.score([noise], [""], ["123"])[0]
    for s in good:
        assert s.alignment > 4.5 and s.coherence > 4.5 and s.style > 3.5
    assert bad.alignment < 2 and bad.coherence < 2 and bad.style < 2


def test_alignment_needs_the_prompts_text(judge):
    img = render_text("123", 24, 48, 17)
    right, wrong = judge.score([img, img], ["", ""], ["123", "456"])
    assert right.alignment > wrong.alignment + 1


def test_oversized_text_loses_style_and_alignment(judge):
    """The OCR hack of the paper: giant text filling the frame still reads, but is not the world's style."""
    normal, giant = render_text("123", 24, 48, 17), render_text("123", 24, 48, 26)
    n, g = judge.score([normal, giant], ["", ""], ["123", "123"])
    assert g.style < n.style - 1 and g.alignment < n.alignment - 1


def test_smear_costs_coherence(judge):
    img = render_text("123", 24, 48, 17)
    smeared = img.resize((12, 6)).resize((48, 24))
    c, s = judge.score([img, smeared], ["", ""], ["123", "123"])
    assert s.coherence < c.coherence - 1


def _curve(rewards, corrected):
    return pd.DataFrame({"step": range(0, 100 * len(rewards), 100), "reward": rewards, "corrected": corrected})


def test_hacking_trend_needs_reward_up_and_corrected_down():
    assert hacking_trend(_curve([0.3, 0.4, 0.5, 0.6], [0.5, 0.5, 0.4, 0.3]), window=3)
    assert not hacking_trend(_curve([0.3, 0.4, 0.5, 0.6], [0.5, 0.6, 0.7, 0.8]), window=3)
    assert not hacking_trend(_curve([0.3, 0.4], [0.5, 0.4]), window=3)  # too few checkpoints


def test_kept_checkpoint_is_best_corrected_or_last():
    curve = _curve([0.3, 0.5, 0.6, 0.7], [0.4, 0.7, 0.6, 0.5])
    assert best_step(curve, "best_corrected") == 100
    assert best_step(curve, "last") == 300
    with pytest.raises(ValueError, match="checkpoint"):
        best_step(curve[curve["step"] == 0], "last")


def test_curve_plot_is_written(tmp_path):
    out = plot_curves(_curve([0.3, 0.5], [0.4, 0.6]), tmp_path / "c.png")
    assert out.stat().st_size > 1000


def _per_image(steps_corrected: dict[int, np.ndarray]) -> pd.DataFrame:
    return pd.concat([pd.DataFrame({"step": s, "image": range(len(c)), "corrected": c})
                      for s, c in steps_corrected.items()], ignore_index=True)


def _centred(rng, n, sd):
    x = rng.normal(0, sd, n)
    return (x - x.mean()) / x.std(ddof=1) * sd  # exactly mean 0 and standard deviation sd


def test_a_corrected_score_within_noise_of_the_best_is_tied_and_the_higher_reward_kept():
    rng = np.random.default_rng(0)
    n = 128
    prompt = rng.normal(1.0, 0.5, n)  # what every checkpoint shares: the prompts and seeds
    noise = _centred(rng, n, 0.3)  # the 450-step adapter differs image by image: SE of the difference 0.3 / sqrt(128)
    images = _per_image({0: prompt - 0.2, 300: prompt, 450: prompt - 0.02 + noise, 600: prompt - 0.3})
    curve = pd.DataFrame({"step": [0, 300, 450, 600], "reward": [0.4, 0.57, 0.60, 0.70],
                          "corrected": [0.8, 1.0, 0.98, 0.7]})
    assert best_step(curve, "best_corrected") == 300  # the best corrected score alone
    assert best_step(curve, "best_corrected", images, tie_se=0.0) == 300
    # 450 is 0.02 below, within one standard error (0.027): tied, and its reward is higher. 600 has the highest
    # reward but is 0.3 below on every image: hacked, never kept.
    assert best_step(curve, "best_corrected", images, tie_se=1.0) == 450
    assert best_step(curve, "best_corrected", images, tie_se=0.5) == 300  # 0.02 is more than half a standard error


@pytest.mark.parametrize("source", ["builtin", "org/real-checkpoint"])
def test_metrics_and_the_evaluate_run_name_the_judge_behind_the_corrected_score(source, tmp_path, monkeypatch,
                                                                               prefect_server):
    import json

    import mlflow
    import yaml
    from conftest import TINY

    from flows import evaluate
    from gdro_core.params import parse_params
    from gdro_core.tracking.registry import version_tags

    numbers = {"base": {"reward": 0.5, "corrected": 0.3}, "trained": {"reward": 0.7, "corrected": 0.4},
               "delta": {"reward": 0.2, "corrected": 0.1}}
    monkeypatch.setattr(evaluate, "score_models", lambda lay: {
        "metrics": json.loads(json.dumps(numbers)), "grid": Image.new("L", (4, 4)),
        "scores": pd.DataFrame({"corrected": [0.4]})})
    monkeypatch.setattr(evaluate, "data_version", lambda lay: {})
    monkeypatch.setattr(evaluate, "register_adapter", lambda *a, **k: None)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**TINY, "model": {**TINY["model"], "source": source}}))
    monkeypatch.setenv("GDRO_ROOT", str(tmp_path))
    returned = evaluate.evaluate_flow(params_path="params.yaml")

    saved = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert saved == returned and saved["trained"] == numbers["trained"]
    assert saved["judge"]["corrected_score_judge"] == "pixel"
    assert version_tags(parse_params(TINY), saved, {})["corrected_score_judge"] == "pixel"  # the registered version
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = mlflow.search_runs(experiment_names=["gdro"], output_format="list")
    assert run.data.tags["corrected_score_judge"] == "pixel"
    assert run.data.metrics["trained.corrected"] == pytest.approx(0.4)
    if source == "builtin":  # the pixel judge is the built-in world's own judge: nothing to say
        assert "corrected_score_note" not in saved["judge"]
    else:
        for note in (saved["judge"]["corrected_score_note"], run.data.tags["corrected_score_note"]):
            assert "built-in world's clean renders" in note and "judge.kind: unified_reward" in note
