"""benchmarks/cpu_objectives.py run in-process on a tiny project (random-weight base, tiny rollouts) with a tiny
budget: every method is trained, timed and evaluated, and the report, the plot and the ratio line appear."""

import json
from pathlib import Path

import pytest
import yaml

from conftest import TINY, load_benchmark
from gdro_core.models import load_flow_model
from gdro_core.models.builtin import build_builtin_pipeline
from gdro_core.layout import Layout
from gdro_core.tasks.ocr import make_reader
from gdro_core.params import parse_params
from gdro_core.data.prompts import make_prompt_sets, read_prompts, write_prompts
from gdro_core.data.rollout import generate_rollouts
from gdro_core.data.scoring import score_rollouts, write_table

PARAMS = {**TINY, "train": {**TINY["train"], "grpo_prompts_per_iteration": 2, "grpo_group_size": 3,
                            "grpo_sample_steps": 3}}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("cpu_objectives")


def make_project(root: Path) -> Layout:
    """What `dvc repro score` leaves behind, on the tiny config: prompts, a (random-weight) base, rollouts, rewards."""
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    p = parse_params(PARAMS)
    lay = Layout(root=root, params=p)
    sets = make_prompt_sets(p.world.alphabet, p.world.min_len, p.world.max_len, p.prompts.templates,
                            p.prompts.n_train, p.prompts.n_test, p.prompts.seed, p.prompts.n_val)
    for split, items in sets.items():
        write_prompts(lay.prompts(split), items)
    build_builtin_pipeline(p.model.builtin, p.world, p.sampler.shift, seed=0).save_pretrained(lay.base_dir)
    model = load_flow_model("builtin", lay.base_dir, p.world, "cpu", "float32")
    manifest = generate_rollouts(model, read_prompts(lay.prompts("train")), p.rollout.images_per_prompt, p.rollout.seed,
                                 p.sampler.steps, p.sampler.guidance, 2, lay.rollout_dir, "tiny")
    reader = make_reader(p.reward.backend, p.reward.upscale, p.reward.pad, p.world.alphabet)
    write_table(score_rollouts(manifest["rows"], lay.rollout_dir, reader, False, p.reward.batch_size), lay.rewards,
                manifest["fingerprint"])
    return lay


def test_every_method_is_timed_evaluated_and_compared(bench, tmp_path, capsys):
    lay = make_project(tmp_path)
    report = bench.main(["--root", str(tmp_path), "--budget-seconds", "60", "--budget-steps", "2", "--eval-every", "0",
                         "--eval-prompts", "2", "--rollout-prompts", "2"])
    out = capsys.readouterr().out

    saved = json.loads((lay.reports_dir / "benchmark" / "cpu_objectives.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert (lay.reports_dir / "benchmark" / "cpu_objectives.png").stat().st_size > 0
    assert set(saved["methods"]) == set(bench.METHODS)
    offline = saved["offline"]
    assert offline["generation_s"] > 0 and offline["scoring_s"] > 0
    assert offline["measured_prompts"] == 2 and offline["total_prompts"] == PARAMS["prompts"]["n_train"]
    for name, r in saved["methods"].items():
        t = r["time"]
        assert t["generation_s"] > 0 and t["scoring_s"] > 0 and t["training_s"] > 0, name
        assert t["total_s"] == pytest.approx(t["generation_s"] + t["scoring_s"] + t["training_s"])
        assert r["steps"] == 2  # the step budget stopped it
        curve = r["curve"]
        assert [q["step"] for q in curve] == [0, 2]  # the base, then the final evaluation
        assert curve[0]["reward"] == saved["base"]["reward"]
        assert curve[-1]["seconds"] == pytest.approx(t["total_s"])
        if r["online"]:
            assert curve[0]["seconds"] == 0.0
        else:  # an offline method's clock starts at the cost of its rollouts and rewards
            assert curve[0]["seconds"] == pytest.approx(offline["generation_s"] + offline["scoring_s"])
            assert (t["generation_s"], t["scoring_s"]) == (offline["generation_s"], offline["scoring_s"])
        for key in ("reward", "corrected"):
            assert r["final"][key] == curve[-1][key]
    assert saved["methods"]["gdro_top1"]["train"] == {"objective": "gdro", "positions": 1}
    assert saved["methods"]["flow_grpo"]["train"] == {"objective": "flow_grpo"}

    c = saved["comparison"]
    assert c["target_reward"] == saved["methods"]["flow_grpo"]["final"]["reward"]
    assert c["flow_grpo_seconds"] == pytest.approx(saved["methods"]["flow_grpo"]["time"]["total_s"])
    ratio_line = next(line for line in out.splitlines() if line.startswith("ratio flow_grpo / gdro:"))
    if c["gdro_seconds"] is None:
        assert "n/a" in ratio_line
    else:
        assert c["ratio"] == pytest.approx(c["flow_grpo_seconds"] / c["gdro_seconds"])
        assert ratio_line == f"ratio flow_grpo / gdro: {c['ratio']:.2f}"
    assert "time to Flow-GRPO's final reward" in out


def test_missing_pipeline_outputs_say_what_to_run(bench, tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    with pytest.raises(SystemExit, match=r"make demo.*dvc repro score"):
        bench.main(["--root", str(tmp_path)])
