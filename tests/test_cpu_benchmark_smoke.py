"""benchmarks/cpu_objectives.py run in-process on a tiny project (random-weight base, tiny rollouts) with a tiny
budget: every method is trained, timed and evaluated (the final evaluation also by the second reader), gdro_rounds
re-samples and pays for it, and the report, the plot and the ratio lines appear.
benchmarks/checkpoint_choice.py on the same project: every checkpoint scored, every rule's choice reported."""

import json
import statistics
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import TINY, load_benchmark
from gdro_core.models import load_model
from gdro_core.models.builtin import build_builtin_pipeline
from gdro_core.layout import Layout
from gdro_core.tasks.ocr.reader import make_reader
from gdro_core.params import parse_params
from gdro_core.tasks.ocr.prompts import make_prompt_sets, read_prompts, write_prompts
from gdro_core.data.rollout import generate_rollouts
from gdro_core.data.scoring import write_table
from gdro_core.tasks.ocr.reward import score_rollouts
from gdro_core.tasks.ocr.task import OcrTask

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
    build_builtin_pipeline(p.model.builtin, p.image_shape, p.sampler.shift, seed=0).save_pretrained(lay.base_dir)
    model = load_model(p, lay.base_dir, device="cpu")
    manifest = generate_rollouts(model, read_prompts(lay.prompts("train")), p.rollout.images_per_prompt, p.rollout.seed,
                                 p.sampler.steps, p.sampler.guidance, 2, lay.rollout_dir, "tiny")
    reader = make_reader(p.reward.backend, p.reward.upscale, p.reward.pad, p.world.alphabet, p.reward.reader_mode)
    table = score_rollouts(manifest["rows"], lay.rollout_dir, reader, False, p.reward.batch_size)
    # a random-weight base reads as nothing (all rewards 0): spread them so every objective has preferences
    table["reward"] = [(7 * i % 5) / 4 for i in range(len(table))]
    write_table(table, lay.rewards, manifest["fingerprint"])
    return lay


def test_every_method_is_timed_evaluated_and_compared(bench, tmp_path, capsys):
    lay = make_project(tmp_path)
    report = bench.main(["--root", str(tmp_path), "--seeds", "3", "--train-budget", "0", "--budget-steps", "2",
                         "--eval-every", "0", "--eval-prompts", "2", "--rollout-prompts", "2", "--round-steps", "1",
                         "--set", "evaluate.second_reader=rapidocr"])
    out = capsys.readouterr().out

    saved = json.loads((lay.reports_dir / "benchmark" / "cpu_objectives.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert (lay.reports_dir / "benchmark" / "cpu_objectives.png").stat().st_size > 0
    assert saved["complete"] and not (lay.reports_dir / "benchmark" / "cpu_objectives.partial.json").exists()
    runs = saved["per_seed"]["3"]
    assert set(runs) == set(bench.METHODS) == set(saved["aggregate"]["methods"])
    offline = saved["offline_runs"][0]
    assert min(offline[k] for k in ("generation_s", "scoring_s", "generation_cpu_s", "scoring_cpu_s")) > 0
    per_batch = PARAMS["sampler"]["batch_size"] // PARAMS["rollout"]["images_per_prompt"]
    n_train = PARAMS["prompts"]["n_train"]
    assert offline["measured_prompts"] == min(max(2, per_batch), n_train)  # never less than one full sampler batch
    assert offline["total_prompts"] == n_train
    for name, r in runs.items():
        t = r["time"]
        assert r["seed"] == 3 and r["steps"] == 2, name  # the step budget stopped every method, none untrained
        assert t["generation_s"] > 0 and t["scoring_s"] > 0 and t["training_s"] > 0 and t["training_cpu_s"] > 0
        curve = r["curve"]
        assert [q["step"] for q in curve] == [0, 2]  # the base, then the final evaluation
        assert curve[0]["reward"] == saved["base"]["reward"] and curve[0]["velocity_norm_ratio"] == 1.0
        assert curve[-1]["seconds"] == pytest.approx(t["total_s"])
        assert curve[-1]["cpu_seconds"] == pytest.approx(t["total_cpu_s"])
        if r["online"]:
            assert curve[0]["seconds"] == 0.0 and curve[0]["cpu_seconds"] == 0.0
        else:  # an offline method's clocks start at the cost of its rollouts and rewards
            assert curve[0]["seconds"] == pytest.approx(offline["generation_s"] + offline["scoring_s"])
            assert curve[0]["cpu_seconds"] == pytest.approx(offline["generation_cpu_s"] + offline["scoring_cpu_s"])
            assert t["total_s"] == pytest.approx(t["generation_s"] + t["scoring_s"] + t["training_s"])
        for key in ("reward", "corrected", "velocity_norm_ratio"):
            assert r["final"][key] == curve[-1][key]
            assert saved["aggregate"]["methods"][name][key]["mean"] == pytest.approx(curve[-1][key])
    assert runs["gdro_top1"]["train"] == {"objective": "gdro", "positions": 1}
    assert runs["gdro_prior"]["train"] == {"objective": "gdro", "noise": "prior"}
    assert runs["dpo"]["train"] == {"objective": "dpo"}
    assert runs["flow_grpo"]["train"] == {"objective": "flow_grpo"}
    assert runs["diffusion_nft"]["online"] and runs["awm"]["online"] and not runs["lair"]["online"]
    assert "train/pairs_kept" in runs["dpo"]["last_parts"] and "train/velocity_norm_ratio" in runs["gdro"]["last_parts"]
    assert "time to Flow-GRPO's final reward" in out and "base+0.05" in out

    # the second reader read the base's and every final evaluation's held-out images
    assert saved["settings"]["second_reader"] == "rapidocr" and 0.0 <= saved["base"]["second_reward"] <= 1.0
    for name, r in runs.items():
        assert 0.0 <= r["final"]["second_reward"] <= 1.0, name
        mean = saved["aggregate"]["methods"][name]["second_reward"]["mean"]
        assert mean == pytest.approx(r["final"]["second_reward"])
        assert "second_reward" not in r["curve"][0]  # not at the intermediate evaluations
    assert "reward 2" in out and "(rapidocr)" in out

    # gdro_rounds re-sampled after step 1 from its policy, with new seeds, and paid for it on both clocks
    rounds = runs["gdro_rounds"]
    [again] = rounds["rounds"]
    p = parse_params(PARAMS)
    assert again["round"] == 2 and again["after_step"] == 1
    assert again["first_seed"] == p.rollout.seed + p.rounds.seed_offset
    assert again["images"] == n_train * PARAMS["rollout"]["images_per_prompt"]  # every training prompt, not scaled
    assert again["latent_change"] > 0  # its data changed
    paid = {"seconds": again["generation_s"] + again["scoring_s"],
            "cpu_seconds": again["generation_cpu_s"] + again["scoring_cpu_s"]}
    assert min(paid.values()) > 0
    for clock in ("seconds", "cpu_seconds"):
        start = rounds["curve"][0][clock]  # the offline data cost, as every offline method starts
        assert rounds["clock_offset"][clock] == pytest.approx(start + paid[clock])  # its clock offset grew
        assert runs["gdro"]["clock_offset"][clock] == pytest.approx(start)  # the others' did not
        assert rounds["curve"][-1][clock] >= rounds["clock_offset"][clock]
    assert rounds["time"]["generation_s"] == pytest.approx(offline["generation_s"] + again["generation_s"])
    assert rounds["time"]["scoring_s"] == pytest.approx(offline["scoring_s"] + again["scoring_s"])
    assert all(not r["rounds"] for name, r in runs.items() if name != "gdro_rounds")
    assert "gdro_rounds: 1 re-samples" in out

    # GDRO and GDRO rounds against every online method
    vs = saved["aggregate"]["vs_online"]
    assert {k: set(v) for k, v in vs.items()} == {o: {"flow_grpo", "diffusion_nft", "awm"} for o in bench.RACERS}
    assert saved["aggregate"]["gdro_vs_flow_grpo"]["to_flow_grpo_final"] == vs["gdro"]["flow_grpo"]["to_final"]
    for ours in bench.RACERS:
        for online in ("flow_grpo", "diffusion_nft", "awm"):
            assert f"time to {bench.LABELS[online]}'s final reward, {online} / {ours}" in out

    # seeds run in separate processes merge into one report, aggregated as one run's; other settings are refused
    other = json.loads(json.dumps(saved))
    other["per_seed"] = {"4": {name: {**r, "seed": 4, "final": {**r["final"], "reward": r["final"]["reward"] + 0.5}}
                               for name, r in saved["per_seed"]["3"].items()}}
    (tmp_path / "seed4.json").write_text(json.dumps(other))
    merged = bench.main(["--merge", str(lay.reports_dir / "benchmark" / "cpu_objectives.json"),
                         str(tmp_path / "seed4.json"), "--out-dir", str(tmp_path / "merged")])
    assert merged["settings"]["seeds"] == [3, 4] and len(merged["offline_runs"]) == 2
    gdro = merged["aggregate"]["methods"]["gdro"]["reward"]
    assert gdro["n"] == 2 and gdro["mean"] == pytest.approx(runs["gdro"]["final"]["reward"] + 0.25)
    assert gdro["sd"] == pytest.approx(statistics.stdev([0.0, 0.5]))
    assert json.loads((tmp_path / "merged" / "cpu_objectives.json").read_text()) == json.loads(json.dumps(merged))
    assert merged["complete"]
    other["complete"] = False  # a stopped run's .partial.json: merged, and the merge says it is partial
    (tmp_path / "stopped.json").write_text(json.dumps(other))
    assert not bench.merge_reports([lay.reports_dir / "benchmark" / "cpu_objectives.json", tmp_path / "stopped.json"])["complete"]
    # the same seed with other methods (run later) joins that seed's runs; a method of a seed twice is refused
    first, later = json.loads(json.dumps(saved)), json.loads(json.dumps(saved))
    del first["per_seed"]["3"]["lair"]
    first["settings"]["methods"] = [m for m in first["settings"]["methods"] if m != "lair"]
    later["settings"]["methods"] = ["lair"]
    later["per_seed"] = {"3": {"lair": {**saved["per_seed"]["3"]["lair"], "final": {**runs["lair"]["final"], "reward": 0.0}}}}
    (tmp_path / "first.json").write_text(json.dumps(first))
    (tmp_path / "lair.json").write_text(json.dumps(later))
    joined = bench.merge_reports([tmp_path / "first.json", tmp_path / "lair.json"])
    assert set(joined["per_seed"]["3"]) == set(runs) and joined["settings"]["methods"] == list(bench.METHODS)
    assert joined["aggregate"]["methods"]["lair"]["reward"]["mean"] == 0.0
    assert joined["aggregate"]["methods"]["gdro"] == saved["aggregate"]["methods"]["gdro"]
    assert joined["settings"]["seeds"] == [3] and len(joined["offline_runs"]) == 2
    with pytest.raises(SystemExit, match="seed 3 of awm, .*gdro, .* is in more than one report"):
        bench.merge_reports([lay.reports_dir / "benchmark" / "cpu_objectives.json"] * 2)
    other["settings"]["train_budget"] = 99.0
    (tmp_path / "budget.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="differs .* in train_budget"):
        bench.main(["--merge", str(lay.reports_dir / "benchmark" / "cpu_objectives.json"), str(tmp_path / "budget.json")])


def _run(curve_points):
    return {"curve": [{"seconds": 2 * c, "cpu_seconds": c, "step": i, "reward": r} for i, (c, r) in enumerate(curve_points)],
            "final": {"reward": curve_points[-1][1]}}


def test_targets_lie_above_the_base_and_a_flow_grpo_below_base_plus_delta_is_not_raced_to(bench):
    base = 0.40
    gdro = _run([(100, base), (150, 0.46), (200, 0.52)])
    grpo = _run([(0, base), (100, 0.38), (300, 0.43)])  # ends below base + 0.05
    c = bench.compare({"gdro": gdro, "flow_grpo": grpo}, base, [0.05, 0.10], "cpu_seconds")
    assert c["ratio"] is None and "below base + 0.05" in c["reason"]
    assert c["ratio_at_target"] == {"+0.05": None, "+0.10": None}
    assert bench.targets_reached(gdro, base, [0.05, 0.10])["+0.05"] == {"seconds": 300, "cpu_seconds": 150, "step": 1}


def test_ratio_is_flow_grpos_time_over_gdros_to_flow_grpos_final_reward(bench):
    base = 0.40
    gdro = _run([(100, base), (150, 0.47), (200, 0.56)])
    grpo = _run([(0, base), (200, 0.46), (400, 0.55), (500, 0.55)])
    c = bench.compare({"gdro": gdro, "flow_grpo": grpo}, base, [0.05, 0.10], "cpu_seconds")
    assert c["target_reward"] == 0.55
    assert c["ratio"] == pytest.approx(400 / 200)  # Flow-GRPO first reached 0.55 at 400 s, GDRO at 200 s
    assert c["ratio_at_target"] == {"+0.05": pytest.approx(200 / 150), "+0.10": pytest.approx(400 / 200)}


def test_every_offline_racer_is_compared_with_every_online_method(bench):
    base = 0.40
    gdro = _run([(100, base), (150, 0.47), (200, 0.56)])
    rounds = _run([(100, base), (250, 0.50), (300, 0.60)])
    awm = _run([(0, base), (300, 0.50)])
    c = bench.compare({"gdro_rounds": rounds, "awm": awm}, base, [0.05, 0.10], "cpu_seconds", "gdro_rounds", "awm")
    assert c["ratio"] == pytest.approx(300 / 250)  # AWM reached its final 0.50 at 300 s, GDRO rounds at 250 s
    assert c["ratio_at_target"] == {"+0.05": pytest.approx(300 / 250), "+0.10": pytest.approx(300 / 250)}
    assert c["gdro_rounds"]["cpu_seconds"] == 250 and c["awm"]["cpu_seconds"] == 300
    assert bench.compare({"gdro": gdro, "awm": awm}, base, [0.05], "cpu_seconds", "gdro", "awm")["ratio"] == 1.5
    high = _run([(0, base), (300, 0.65)])  # higher than GDRO rounds ever got
    c = bench.compare({"gdro_rounds": rounds, "awm": high}, base, [0.05], "cpu_seconds", "gdro_rounds", "awm")
    assert c["ratio"] is None and c["reason"] == "GDRO rounds did not reach AWM's final reward within its budget"
    assert bench.compare({"gdro": gdro}, base, [0.05], "cpu_seconds", "gdro", "awm") is None  # AWM did not run


def test_vs_online_gives_each_pair_mean_and_sd_over_seeds_and_prints_a_line_for_each(bench):
    base, deltas = 0.40, [0.05, 0.10]
    curves = {  # per seed: cpu seconds and held-out reward of each evaluation
        0: {"gdro": [(100, base), (150, 0.47), (200, 0.56)], "gdro_rounds": [(100, base), (250, 0.50), (300, 0.60)],
            "flow_grpo": [(0, base), (200, 0.46), (400, 0.55), (500, 0.55)], "awm": [(0, base), (300, 0.50)],
            "diffusion_nft": [(0, base), (300, 0.42)]},
        1: {"gdro": [(100, base), (150, 0.52), (200, 0.56)], "gdro_rounds": [(100, base), (250, 0.50), (300, 0.60)],
            "flow_grpo": [(0, base), (300, 0.55)], "awm": [(0, base), (600, 0.50)],
            "diffusion_nft": [(0, base), (300, 0.42)]},
    }
    runs = {s: {name: {**_run(points), "steps": len(points), "time": {"total_cpu_s": points[-1][0],
                                                                       "total_s": 2.0 * points[-1][0]}}
                for name, points in seed.items()} for s, seed in curves.items()}
    for seed in runs.values():
        for r in seed.values():
            r["final"] |= {"corrected": 0.0, "velocity_norm_ratio": 1.0, "second_reward": None}
    agg = bench.aggregate(runs, base, deltas, "cpu_seconds")
    vs = agg["vs_online"]
    expected = {("gdro", "flow_grpo"): [400 / 200, 300 / 200], ("gdro", "awm"): [300 / 200, 600 / 150],
                ("gdro_rounds", "flow_grpo"): [400 / 300, 300 / 300], ("gdro_rounds", "awm"): [300 / 250, 600 / 250]}
    for (ours, online), ratios in expected.items():
        got = vs[ours][online]["to_final"]
        assert got["mean"] == pytest.approx(statistics.fmean(ratios)), (ours, online)
        assert got["sd"] == pytest.approx(statistics.stdev(ratios)) and got["n"] == 2, (ours, online)
        assert [c["ratio"] for c in vs[ours][online]["per_seed"]] == pytest.approx(ratios)
    at = vs["gdro"]["awm"]["at_target"]  # +0.05: AWM at 300 and 600 s, GDRO at 150 s both times
    assert at["+0.05"]["mean"] == pytest.approx((300 / 150 + 600 / 150) / 2)
    for ours in bench.RACERS:  # DiffusionNFT ended below base + 0.05: not meaningful, and said why
        nft = vs[ours]["diffusion_nft"]
        assert (nft["to_final"]["n"], nft["to_final"]["of"]) == (0, 2)
        assert nft["reasons"] == ["DiffusionNFT's final reward 0.420 is below base + 0.05 (0.450): no improvement to "
                                  "race to"]
    legacy = agg["gdro_vs_flow_grpo"]
    assert legacy["to_flow_grpo_final"] == vs["gdro"]["flow_grpo"]["to_final"]
    assert agg["per_seed_comparison"] == vs["gdro"]["flow_grpo"]["per_seed"]

    p = parse_params(PARAMS)  # evaluate.second_reader: none
    args = bench.parse_args(["--seeds", "0", "1", "--budget-steps", "2", "--target-deltas", *map(str, deltas)])
    offline = {k: 1.0 for k in ("generation_s", "scoring_s", "generation_cpu_s", "scoring_cpu_s")}
    report = bench.build_report(args, p, p, OcrTask(p), {"reward": base, "corrected": 0.0, "second_reward": None},
                                [offline], runs, deltas, bench.Stopwatch(), complete=True)
    assert report["aggregate"]["vs_online"] == vs and report["settings"]["second_reader"] == "none"
    assert report["settings"]["task"] == "ocr"
    lines = bench.summary_lines(report)
    pairs = [line for line in lines if line.startswith("time to ")]
    assert len(pairs) == 2 * 3  # one line per (offline racer, online method)
    assert "time to AWM's final reward, awm / gdro_rounds (cpu s): 1.80±0.85" in pairs
    table = {line.split()[0]: line.split() for line in lines[2:8]}
    assert table["gdro"][2:4] == ["0.560±0.000", "n/a"] and table["base"][2:4] == ["0.400", "n/a"]


def test_round_steps_must_be_positive(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--budget-steps", "2", "--round-steps", "0"])
    assert "--round-steps must be positive" in capsys.readouterr().err


def test_aggregate_gives_mean_and_sd_over_seeds(bench):
    base = 0.40
    runs = {s: {"gdro": {**_run([(100, base), (200, 0.40 + d)]), "steps": 5,
                         "time": {"total_cpu_s": 200.0, "total_s": 400.0}},
                "flow_grpo": {**_run([(0, base), (300, 0.46)]), "steps": 3,
                              "time": {"total_cpu_s": 300.0, "total_s": 600.0}}}
            for s, d in ((0, 0.10), (1, 0.20), (2, 0.30))}
    for seed in runs.values():
        for r in seed.values():
            r["final"] |= {"corrected": 0.0, "velocity_norm_ratio": 1.0}
    agg = bench.aggregate(runs, base, [0.05, 0.25], "cpu_seconds")
    reward = agg["methods"]["gdro"]["reward"]
    assert reward["mean"] == pytest.approx(0.60) and reward["sd"] == pytest.approx(0.10) and reward["n"] == 3
    late = agg["methods"]["gdro"]["time_to_target"]["+0.25"]["cpu_seconds"]
    assert (late["mean"], late["n"], late["of"]) == (200, 1, 3)  # only the seed that gained 0.30 reached +0.25
    ratio = agg["gdro_vs_flow_grpo"]["to_flow_grpo_final"]
    assert ratio["mean"] == pytest.approx(1.5) and ratio["sd"] == pytest.approx(0.0) and ratio["n"] == 3


def test_missing_pipeline_outputs_say_what_to_run(bench, tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    with pytest.raises(SystemExit, match=r"make demo.*dvc repro score"):
        bench.main(["--root", str(tmp_path)])


def test_the_online_method_can_train_as_long_in_total_as_the_offline_ones(bench):
    import argparse

    args = argparse.Namespace(clock="cpu", train_budget=10.0, online_budget=50.0, budget_steps=0, eval_every=0)
    data_cost = {"seconds": 3.0, "cpu_seconds": 40.0}
    none = {"seconds": 0.0, "cpu_seconds": 0.0}
    assert bench.Tracker(None, None, None, {}, data_cost, args).budget == 50.0  # training budget after data cost
    assert bench.Tracker(None, None, None, {}, none, args, online=True).budget == 50.0  # its own, same total
    args.online_budget = 0.0
    assert bench.Tracker(None, None, None, {}, none, args, online=True).budget == 10.0  # default: --train-budget


def test_checkpoint_choice_scores_every_checkpoint_and_each_rule_keeps_one(tmp_path, capsys):
    bench = load_benchmark("checkpoint_choice")
    lay = make_project(tmp_path)
    report = bench.main(["--root", str(tmp_path), "--seeds", "0", "1", "--steps", "4", "--val-prompts", "3",
                         "--val-sizes", "2", "3", "9"])
    out = capsys.readouterr().out
    scores = pd.read_csv(lay.reports_dir / "benchmark" / "checkpoint_choice.csv")
    n_test = PARAMS["prompts"]["n_test"] * 2  # evaluate.images_per_prompt
    for seed in (0, 1):
        run = scores[scores["seed"] == seed]
        assert sorted(run["step"].unique()) == [0, 2, 4]  # the base, then every evaluate.checkpoint_every steps
        for step in (0, 2, 4):
            at = run[run["step"] == step]
            assert (at["split"] == "val").sum() == 3 and (at["split"] == "test").sum() == n_test
    rows = report["choices"]
    assert {(r["seed"], r["val_prompts"], r["rule"]) for r in rows} == {
        (s, n, rule) for s in (0, 1) for n in (2, 3) for rule in bench.RULES}  # 9 > --val-prompts is left out
    test = scores[scores["split"] == "test"].groupby(["seed", "step"])["reward"].mean()
    for r in rows:
        assert r["step"] in (2, 4)
        assert r["heldout_gain"] == pytest.approx(test[(r["seed"], r["step"])] - test[(r["seed"], 0)])
        if r["rule"] == "last":
            assert r["step"] == 4
    assert "kept step and its held-out gain" in out


def test_training_data_made_another_way_is_raced_on_the_same_evaluation(bench, tmp_path, capsys, monkeypatch):
    """--data-set: the offline methods train on (and pay for) data of other settings and the online methods on its
    reader; everyone is read by the held-out reader as before."""
    lay = make_project(tmp_path)
    p = parse_params(PARAMS)
    cheap = Layout(root=tmp_path, params=parse_params({**PARAMS, "paths": {"data_dir": "data-cheap"}}))
    for split in ("train", "test", "val"):
        write_prompts(cheap.prompts(split), read_prompts(lay.prompts(split)))
    manifest = generate_rollouts(load_model(p, lay.base_dir, device="cpu"), read_prompts(cheap.prompts("train")), 3,
                                 p.rollout.seed, 2, p.sampler.guidance, 2, cheap.rollout_dir, "cheap")
    table = pd.DataFrame([{**row, "reward": float(i % 3) / 2} for i, row in enumerate(manifest["rows"])])
    write_table(table, cheap.rewards, manifest["fingerprint"])
    argv = ["--root", str(tmp_path), "--seeds", "0", "--train-budget", "0", "--budget-steps", "1", "--eval-every", "0",
            "--eval-prompts", "2", "--rollout-prompts", "2", "--data-set", "paths.data_dir=data-cheap",
            "--data-set", "rollout.images_per_prompt=3", "--data-set", "rollout.steps=2",
            "--data-set", "reward.reader_mode=recognizer"]
    task_reward, online_readers = bench.task_reward, []
    monkeypatch.setattr(bench, "task_reward", lambda task, prompts: online_readers.append(task.params.reward.reader_mode)
                        or task_reward(task, prompts))
    report = bench.main([*argv, "--methods", "gdro", "flow_grpo"])
    assert online_readers == ["recognizer"]  # Flow-GRPO scored its own samples with the training data's reader
    settings = report["settings"]
    assert (settings["data_dir"], settings["rollout_steps"], settings["data_reader_mode"]) == ("data-cheap", 2, "recognizer")
    assert settings["reader_mode"] == p.reward.reader_mode and settings["sampler_steps"] == p.sampler.steps
    [offline] = report["offline_runs"]  # the cheap data's cost: its pool of 3, not the default data's 4
    assert offline["images_per_prompt"] == 3 and offline["total_prompts"] == PARAMS["prompts"]["n_train"]
    runs = report["per_seed"]["0"]
    assert runs["gdro"]["curve"][0]["cpu_seconds"] == pytest.approx(offline["generation_cpu_s"] + offline["scoring_cpu_s"])
    assert runs["flow_grpo"]["curve"][0]["reward"] == runs["gdro"]["curve"][0]["reward"] == report["base"]["reward"]

    # online methods alone pay for no data, so none is measured
    capsys.readouterr()
    online = bench.main([*argv, "--methods", "flow_grpo", "--out-dir", str(tmp_path / "online")])
    assert online["offline_runs"] == [] and "offline rollout + score" not in capsys.readouterr().out

    # data rolled out for other prompts is refused before anything runs
    write_prompts(cheap.prompts("train"), read_prompts(lay.prompts("train"))[:-1])
    with pytest.raises(SystemExit, match="made for other training prompts"):
        bench.main([*argv, "--methods", "gdro"])


def test_race_overlay_puts_runs_of_other_settings_side_by_side(tmp_path, capsys):
    """benchmarks/race_overlay.py: runs from reports --merge would refuse, each ratio by hand, another base refused."""
    overlay = load_benchmark("race_overlay")
    base = {"reward": 0.375, "corrected": 0.7, "second_reward": None}

    def write(name, method, seed, points, budget):
        run = _run(points)
        run["final"] |= {"corrected": 0.9, "second_reward": 0.4}
        for point in run["curve"]:
            point["corrected"] = 2 * point["reward"]
        report = {"base": base, "settings": {"clock": "cpu", "train_budget": budget}, "per_seed": {str(seed): {method: run}}}
        (tmp_path / f"{name}-s{seed}.json").write_text(json.dumps(report))

    for seed, late in ((0, 120), (1, 200)):
        write("cheap", "gdro", seed, [(40, 0.375), (100, 0.50), (160, 0.60)], 300)
        write("online", "flow_grpo", seed, [(0, 0.375), (60, 0.45), (late, 0.50)], 720)
    lines = overlay.main(["--seeds", "0", "1", "--target-deltas", "0.05", "0.2", "--out", str(tmp_path / "o.png"),
                          "--run", f"GDRO cheap={tmp_path}/cheap-s{{seed}}.json:gdro",
                          "--run", f"Flow-GRPO={tmp_path}/online-s{{seed}}.json:flow_grpo"])
    assert (tmp_path / "o.png").stat().st_size > 0
    rows = {line.split()[0]: line for line in lines if not line.startswith(" ")}  # indented: a race's reasons
    assert "0.600±0.000" in rows["GDRO"] and "100±0" in rows["GDRO"] and "160±0" in rows["GDRO"]
    assert "60±0" in rows["Flow-GRPO"] and "n/a (0/2)" in rows["Flow-GRPO"]  # never reached base + 0.2
    # Flow-GRPO reaches its final 0.50 at 120 and 200 s, GDRO at 100 s: 1.2 and 2.0
    assert f"to Flow-GRPO's final reward, Flow-GRPO / GDRO cheap: {1.6:.2f}±{statistics.stdev([1.2, 2.0]):.2f} " \
           "(seeds: 1.20, 2.00)" in lines
    assert "to GDRO cheap's final reward, GDRO cheap / Flow-GRPO: n/a (0/2) (seeds: never, never)" in lines
    assert "  Flow-GRPO did not reach GDRO cheap's final reward within its budget" in lines  # as the benchmark says it

    base["reward"] = 0.4
    write("other", "flow_grpo", 0, [(0, 0.4), (60, 0.45)], 720)
    with pytest.raises(SystemExit, match="evaluated another base"):
        overlay.main(["--seeds", "0", "--run", f"a={tmp_path}/cheap-s{{seed}}.json:gdro",
                      "--run", f"b={tmp_path}/other-s{{seed}}.json:flow_grpo"])
    with pytest.raises(SystemExit, match="holds no awm run of seed 0"):
        overlay.main(["--seeds", "0", "--run", f"a={tmp_path}/cheap-s{{seed}}.json:gdro",
                      "--run", f"b={tmp_path}/cheap-s{{seed}}.json:awm"])


def test_kept_reports_the_held_out_reading_of_the_checkpoint_gdro_train_would_keep(bench, tmp_path, capsys,
                                                                                    monkeypatch):
    """--kept: gdro train's monitor reads the validation prompts at every evaluation, and the held-out reading of the
    step it keeps is reported (a random-weight base scores every step alike, so the spy keeps step 2)."""
    lay = make_project(tmp_path)
    monitors, real = [], bench.make_val_monitor

    def spy(model, shared, workdir):
        monitor = real(model, shared, workdir)
        monitor.kept_step = lambda: 2
        monitors.append(monitor)
        return monitor

    monkeypatch.setattr(bench, "make_val_monitor", spy)
    report = bench.main(["--root", str(tmp_path), "--seeds", "0", "--methods", "gdro", "gdro_rounds", "flow_grpo",
                         "--train-budget", "0", "--budget-steps", "3", "--eval-every", "0.001", "--eval-prompts", "2",
                         "--rollout-prompts", "2", "--round-steps", "2", "--kept", "--set", "evaluate.tie_se=0.5",
                         "--set", "evaluate.checkpoint_prompts=2", "--set", "evaluate.checkpoint_images_per_prompt=2"])
    assert "gdro: kept by validation corrected score (as gdro train keeps): step 2±0" in capsys.readouterr().out
    val = [q.prompt for q in read_prompts(lay.prompts("val"))[:2]]
    assert len(monitors) == 4  # one per run, and gdro_rounds' again after its re-sample
    for monitor in monitors:  # gdro train's monitor: the validation prompts, its images per prompt and keeping rule
        assert [q.prompt for q in monitor.prompts] == val and monitor.kw["per_prompt"] == 2
        assert (monitor.keep, monitor.tie_se) == ("best_corrected", 0.5)
    for name, run in report["per_seed"]["0"].items():
        steps = [q["step"] for q in run["curve"]]
        assert steps == [0, 1, 2, 3], name  # an evaluation after every step, the base first
        assert [q["step"] for q in run["val_curve"]] == steps, name  # validation read at each of them too
        assert run["kept"] == run["curve"][2] != run["curve"][-1], name  # the kept step's held-out reading
        agg = report["aggregate"]["methods"][name]["kept"]
        assert agg["step"]["mean"] == 2 and agg["reward"]["mean"] == pytest.approx(run["kept"]["reward"])

    lay.prompts("val").unlink()
    with pytest.raises(SystemExit, match="val.jsonl"):
        bench.main(["--root", str(tmp_path), "--seeds", "0", "--methods", "gdro", "--budget-steps", "1", "--kept"])
