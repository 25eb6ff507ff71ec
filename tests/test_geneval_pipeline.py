"""The real flows end to end with task: geneval on a very small configuration (real Prefect server, MLflow store)."""

import json

import pandas as pd
import pytest
import yaml

from conftest import TINY, in_project, load_benchmark

GENEVAL_TINY = {
    **TINY,
    "task": "geneval",
    "prompts": {"n_train": 6, "n_test": 6, "n_val": 6},
    "model": {**TINY["model"], "builtin": {**TINY["model"]["builtin"], "max_tokens": 64}},
    "judge": {**TINY["judge"], "task": "geneval"},
    "evaluate": {**TINY["evaluate"], "train_prompts": 4, "save_images": True},
}


@pytest.fixture(scope="module")
def piped(tmp_path_factory, prefect_server):
    """A tiny GenEval project after the whole pipeline flow, and the metrics it returned."""
    from flows.pipeline import pipeline_flow

    root = tmp_path_factory.mktemp("geneval")
    (root / "params.yaml").write_text(yaml.safe_dump(GENEVAL_TINY))
    (metrics,) = in_project(root, pipeline_flow)
    return root, metrics


def test_geneval_pipeline_reports_the_per_tag_table_and_its_ceiling(piped):
    project, metrics = piped
    assert json.loads((project / "reports" / "metrics.json").read_text()) == metrics
    assert metrics["ceiling"]["geneval"] >= 0.95
    for name in ("base", "trained"):
        assert 0.0 <= metrics[name]["geneval"] <= 1.0 and 0.0 <= metrics[name]["score"] <= 1.0
        assert {"tag.single_object", "tag.position", "tag.color_attr"} <= set(metrics[name])
    # intervals: the held-out prompts resampled within their tags, the same draws for both models
    ci = metrics["ci"]
    assert sum(ci["prompts"].values()) == 6 and ci["samples"] == 200 and ci["level"] == 0.95
    for name in ("base", "trained"):
        for key in ("geneval", "score", "compositional", "clean_share"):
            low, high = ci[name][key]
            assert low <= metrics[name][key] <= high
    low, high = ci["delta"]["score"]
    assert low <= metrics["trained"]["score"] - metrics["base"]["score"] <= high
    # the training-prompt evaluation: both models on 4 training prompts, noise no rollout drew
    for name in ("base_train", "trained_train"):
        assert metrics[name]["score"] <= 1.0 and 0.0 <= metrics[name]["geneval"] <= 1.0
    assert metrics["delta_train"]["reward"] == pytest.approx(
        metrics["trained_train"]["reward"] - metrics["base_train"]["reward"])
    assert metrics["base_train"] != metrics["base"]  # other prompts, other seeds
    per_image = pd.read_csv(project / "reports" / "eval_scores.csv")
    assert {"reward", "score", "correct", "strict", "tag", "u_hat", "corrected"} <= set(per_image.columns)
    # judge.task geneval: û is the mean of coherence and style only
    assert per_image["u_hat"].to_numpy() == pytest.approx(((per_image["coherence"] + per_image["style"]) / 2).to_numpy())
    rewards = pd.read_parquet(project / "data" / "rewards.parquet")
    # Flow-GRPO's partial credit is at most 1, below 0 where far more objects than asked were found
    assert (rewards["reward"] <= 1).all() and (rewards["reward"] == rewards["score"]).all()
    first = json.loads((project / "data" / "prompts" / "train.jsonl").read_text().splitlines()[0])
    assert set(first) == {"tag", "include", "exclude", "prompt"}  # Flow-GRPO's metadata format


def test_held_out_images_are_written_as_geneval_lays_them_out_and_are_the_images_scored(piped):
    """One folder per prompt, metadata.jsonl and samples/<n>.png, as GenEval's generator writes them for its
    evaluate_images.py; scored again by the task reward they give the evaluate stage's per-image rewards."""
    from PIL import Image

    from gdro_core.params import parse_params
    from gdro_core.tasks.registry import make_task

    project, _ = piped
    task = make_task(parse_params(GENEVAL_TINY))
    prompts = task.read_prompts(project / "data" / "prompts" / "test.jsonl")
    per_prompt = parse_params(GENEVAL_TINY).evaluate.images_per_prompt
    scores = pd.read_csv(project / "reports" / "eval_scores.csv")
    for name in ("base", "trained"):
        root = project / "reports" / "heldout_images" / name
        assert sorted(p.name for p in root.iterdir()) == [f"{i:05d}" for i in range(len(prompts))]
        images, records = [], []
        for i, q in enumerate(prompts):
            meta = json.loads((root / f"{i:05d}" / "metadata.jsonl").read_text())
            assert meta == {**q.metadata, "prompt": q.prompt} and set(meta) == {"tag", "include", "exclude", "prompt"}
            files = sorted((root / f"{i:05d}" / "samples").iterdir())
            assert [f.name for f in files] == [f"{n:05d}.png" for n in range(per_prompt)]
            images += [Image.open(f) for f in files]
            records += [q] * per_prompt
        rescored = task.reward(images, records)
        assert list(rescored["reward"]) == pytest.approx(list(scores.loc[scores["model"] == name, "reward"]))


def test_the_cpu_benchmark_races_gdro_and_the_online_methods_on_the_geneval_world(piped, one_thread, capsys):
    project, _ = piped
    bench = load_benchmark("cpu_objectives")
    report = bench.main(["--root", str(project), "--methods", "gdro", "flow_grpo", "diffusion_nft", "--seeds", "1",
                         "--train-budget", "0", "--budget-steps", "2", "--eval-every", "0", "--eval-prompts", "4",
                         "--rollout-prompts", "2"])
    out = capsys.readouterr().out
    assert report["settings"]["task"] == "geneval" and report["settings"]["second_reader"] == "none"
    runs = report["per_seed"]["1"]
    assert set(runs) == {"gdro", "flow_grpo", "diffusion_nft"}
    for name, r in runs.items():
        assert r["steps"] == 2 and [q["step"] for q in r["curve"]] == [0, 2], name
        assert r["curve"][0]["reward"] == report["base"]["reward"]  # the task's reward: GenEval's partial credit
        assert -1.0 <= r["final"]["reward"] <= 1.0 and r["final"]["second_reward"] is None
    offline = report["offline_runs"][0]  # rollouts and scores re-made as the stages make them: by the detector
    assert offline["scoring_cpu_s"] > 0 and offline["total_prompts"] == GENEVAL_TINY["prompts"]["n_train"]
    assert (project / "reports" / "benchmark" / "cpu_objectives.json").is_file()
    assert "time to Flow-GRPO's final reward" in out and "(none)" in out


def test_pretrain_probe_reads_every_tag_and_the_pooled_contrast_at_each_reading(tmp_path, capsys):
    probe = load_benchmark("geneval_pretrain_probe")
    params = {**GENEVAL_TINY, "pretrain": {**GENEVAL_TINY.get("pretrain", TINY["pretrain"]), "steps": 4,
                                           "log_every": 2}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    readings = probe.main(["--params", str(tmp_path / "params.yaml"), "--every", "2", "--per-tag", "2",
                           "--images-per-prompt", "1", "--set", "pretrain.logit_mean=2.0"])
    assert [r["step"] for r in readings] == [2, 4]  # it trained on after the first reading
    for r in readings:
        assert {"colors", "counting", "position", "color_attr", "two_object"} <= set(r)
        assert all(0.0 <= r[t] <= 1.0 for t in probe.TAGS) and -1.0 <= r["pooled_cos"] <= 1.0
    assert readings[0]["loss"] != readings[1]["loss"]
    assert [json.loads(line)["step"] for line in capsys.readouterr().out.splitlines()] == [2, 4]
    with pytest.raises(SystemExit, match="multiple of pretrain.log_every"):
        probe.main(["--params", str(tmp_path / "params.yaml"), "--every", "3"])


def test_oracle_probe_starts_at_the_base_and_trains_only_what_it_names(piped, one_thread, capsys, tmp_path):
    """Step 0 of the ceiling probe is the evaluate stage's base reading (a fresh LoRA is the base); then each
    adapter trains on the world's correct scenes: the LoRA alone, or every transformer weight."""
    project, metrics = piped
    probe = load_benchmark("geneval_oracle_ceiling")
    import numpy as np
    from PIL import Image

    from gdro_core.layout import Layout
    from gdro_core.params import parse_params

    per_prompt = str(parse_params(GENEVAL_TINY).evaluate.images_per_prompt)
    common = ["--root", str(project), "--params", "params.yaml", "--steps", "2", "--every", "1", "--batch", "4",
              "--images-per-prompt", per_prompt]
    lora = probe.main([*common, "--adapter", "lora", "--renders-per-prompt", "1"])
    full = probe.main([*common, "--adapter", "full", "--prompts", "all"])
    stored = probe.main([*common, "--scenes", "rollouts", "--renders-per-prompt", "1"])  # each prompt's best rollout
    for readings in (lora, full, stored):
        assert [r["step"] for r in readings] == [0, 1, 2]
        assert readings[0]["geneval"] == pytest.approx(metrics["base"]["geneval"], abs=5e-4)  # rounded
        assert readings[0]["compositional"] == pytest.approx(metrics["base"]["compositional"], abs=5e-4)
        assert {"train_geneval", "train_compositional", "tag.position"} <= set(readings[0])
    assert 0 < lora[0]["trainable"] < full[0]["trainable"]
    assert lora[0]["renders"] == 1 and full[0]["renders"] == 0  # one fixed scene per prompt, or a fresh one each draw
    assert [json.loads(line)["scenes"] for line in capsys.readouterr().out.splitlines()] == ["world"] * 6 + ["rollouts"] * 3
    best = probe.best_rollouts(Layout(project, parse_params(GENEVAL_TINY)))
    rewards = pd.read_parquet(project / "data" / "rewards.parquet")
    assert set(best) == set(rewards["prompt"])
    for prompt, group in rewards.sort_values(["prompt_index", "member"]).groupby("prompt", sort=False):
        top = group.loc[group["reward"].idxmax()]  # the first of tied best members, as argmax picks
        png = np.asarray(Image.open(project / "data" / "rollouts" / top["image"]).convert("RGB"), dtype=np.float32)
        (image,) = best[prompt]
        # the stored latent, as filtering trains on it; its PNG is the clamped 8-bit decoding
        assert np.abs(np.clip(image, -1, 1).transpose(1, 2, 0) - (png / 127.5 - 1)).max() <= 0.5 / 127.5 + 1e-6
    with pytest.raises(SystemExit):  # one stored image per prompt only
        probe.main([*common, "--scenes", "rollouts"])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(GENEVAL_TINY))  # a project before `gdro base`
    with pytest.raises(SystemExit, match="run `gdro prompts`"):
        probe.main(["--root", str(tmp_path), "--params", "params.yaml"])
