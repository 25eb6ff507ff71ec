"""The GenEval task: metadata files (GenEval and Flow-GRPO formats), generated prompt sets, the shapes world,
its exact detector's ceiling, the reward table and per-tag summary, the pixel judge, and pretraining batches."""

import json
import random

import numpy as np
import pytest
import torch

from gdro_core.models.builtin import pixel_images
from gdro_core.params import parse_params
from gdro_core.tasks.geneval.prompts import (
    TAGS,
    GenEvalPrompt,
    GenEvalPromptError,
    all_prompts,
    generate_sets,
    metadata_sets,
    position,
    read_metadata,
)
from gdro_core.tasks.geneval.world import WorldError, WorldSpec
from gdro_core.tasks.registry import make_task

# Flow-GRPO's train_metadata.jsonl / test_metadata.jsonl lines (GenEval's evaluation_metadata.jsonl format)
FLOW_GRPO_LINES = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "counting", "include": [{"class": "clock", "count": 3}], "exclude": [{"class": "clock", "count": 4}],
     "prompt": "a photo of three clocks"},
    {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "pink"}], "exclude": [],
     "prompt": "a photo of a pink car"},
    {"tag": "position", "include": [{"class": "cup", "count": 1},
                                    {"class": "umbrella", "count": 1, "position": ["right of", 0]}],
     "prompt": "a photo of an umbrella right of a cup"},
    {"tag": "color_attr", "include": [{"class": "bus", "count": 1, "color": "white"},
                                      {"class": "kite", "count": 1, "color": "orange"}],
     "prompt": "a photo of a white bus and an orange kite"},
    {"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}],
     "exclude": [], "prompt": "a photo of a dog and a cat"},
]

GENEVAL = {"task": "geneval", "prompts": {"n_train": 40, "n_test": 24, "n_val": 8}, "model": {"builtin": {"max_tokens": 52}}}


def write_lines(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_flow_grpo_metadata_loads(tmp_path):
    write_lines(tmp_path / "train_metadata.jsonl", FLOW_GRPO_LINES[2:])
    write_lines(tmp_path / "test_metadata.jsonl", FLOW_GRPO_LINES[:2])
    recs = read_metadata(tmp_path / "test_metadata.jsonl") + read_metadata(tmp_path / "train_metadata.jsonl")
    assert [r.tag for r in recs] == [r["tag"] for r in FLOW_GRPO_LINES]
    assert recs[1].include == ({"class": "clock", "count": 3},) and recs[1].exclude == ({"class": "clock", "count": 4},)
    assert recs[3].include[1]["position"] == ["right of", 0]
    # a record survives the rollout row's (prompt, target) round trip
    assert GenEvalPrompt.from_target(recs[4].prompt, recs[4].target) == recs[4]
    sets = metadata_sets(tmp_path, n_val=2)
    assert [len(sets[s]) for s in ("train", "test", "val")] == [2, 2, 2]
    p = parse_params({**GENEVAL, "geneval": {"metadata_dir": tmp_path.name}, "prompts": {"n_val": 2}})
    task = make_task(p)
    task.write_prompts(tmp_path / "out.jsonl", recs)
    assert read_metadata(tmp_path / "out.jsonl") == recs
    # COCO classes on the built-in shapes world: refused before anything runs, naming what it cannot draw
    from gdro_core.data.prompt_checks import PromptError

    with pytest.raises(PromptError, match=r"6 prompt\(s\) name classes or colours the built-in shapes world cannot "
                                          r"draw \('bench', 'bus', 'car'\).*model.source"):
        task.make_prompt_sets(tmp_path.parent)


def test_repeated_prompts_as_flow_grpo_publishes_them_fold_into_one(tmp_path, caplog):
    shapes = [{"tag": "counting", "include": [{"class": "square", "count": n}], "prompt": f"a photo of {w} squares"}
              for n, w in ((2, "two"), (3, "three"), (4, "four"))]
    write_lines(tmp_path / "train_metadata.jsonl", shapes[:2] + shapes[:1])
    write_lines(tmp_path / "test_metadata.jsonl", [shapes[2]] * 4)  # test_metadata.jsonl: each prompt four times
    with caplog.at_level("WARNING", logger="gdro"):
        sets = metadata_sets(tmp_path, n_val=1)
    assert [r.prompt for r in sets["test"]] == ["a photo of four squares"]
    assert [r.prompt for r in sets["train"] + sets["val"]] == ["a photo of two squares", "a photo of three squares"]
    assert "3 repeated lines folded into 1 prompts" in caplog.text
    p = parse_params({**GENEVAL, "geneval": {"metadata_dir": tmp_path.name}, "prompts": {"n_val": 1}})
    assert len(make_task(p).make_prompt_sets(tmp_path.parent)["test"]) == 1  # the shapes world draws squares
    write_lines(tmp_path / "test_metadata.jsonl", [shapes[2], {**shapes[2], "tag": "single_object"}])
    with pytest.raises(GenEvalPromptError, match="occurs with different metadata"):
        metadata_sets(tmp_path, n_val=1)


def test_held_out_metadata_that_also_is_in_train_is_left_out_of_train(tmp_path, caplog):
    write_lines(tmp_path / "train_metadata.jsonl", FLOW_GRPO_LINES)
    write_lines(tmp_path / "test_metadata.jsonl", FLOW_GRPO_LINES[:1])
    from gdro_core.tasks.geneval.prompts import metadata_sets

    with caplog.at_level("WARNING", logger="gdro"):
        sets = metadata_sets(tmp_path, n_val=1)  # COCO classes: a real checkpoint's prompts
    test_prompt = sets["test"][0].prompt
    assert test_prompt not in {r.prompt for r in sets["train"]}
    assert len(sets["train"]) == len(FLOW_GRPO_LINES) - 2  # the validation prompt and the held-out one
    assert "1 training prompt(s) also held out" in caplog.text


def test_geneval_evaluation_metadata_is_the_test_set(tmp_path):
    write_lines(tmp_path / "train_metadata.jsonl", FLOW_GRPO_LINES[3:])
    write_lines(tmp_path / "evaluation_metadata.jsonl", FLOW_GRPO_LINES[2:3])
    assert [r.prompt for r in metadata_sets(tmp_path, 1)["test"]] == ["a photo of a pink car"]


@pytest.mark.parametrize("row, words", [
    ({"include": [{"class": "a", "count": 1}], "prompt": "x"}, "missing 'tag'"),
    ({"tag": "shapes", "include": [{"class": "a", "count": 1}], "prompt": "x"}, "unknown tag"),
    ({"tag": "counting", "include": [{"class": "a", "count": 0}], "prompt": "x"}, "positive integer"),
    ({"tag": "position", "include": [{"class": "a", "count": 1, "position": ["near", 0]}], "prompt": "x"}, "relation"),
])
def test_bad_metadata_is_named(tmp_path, row, words):
    write_lines(tmp_path / "m.jsonl", [row])
    with pytest.raises(GenEvalPromptError, match=words):
        read_metadata(tmp_path / "m.jsonl")


def test_templates_are_genevals():
    assert all_prompts("counting", ["cross"], ["red"], 3)[-1].prompt == "a photo of three crosses"
    pos = all_prompts("position", ["square", "circle"], ["red"], 2)[0]
    assert pos.prompt == "a photo of a square left of a circle"
    assert pos.include == ({"class": "circle", "count": 1}, {"class": "square", "count": 1, "position": ["left of", 0]})
    ca = all_prompts("color_attr", ["square", "circle"], ["red", "blue"], 2)[0]
    assert ca.prompt == "a photo of a red square and a blue circle"
    assert all_prompts("colors", ["egg"], ["orange"], 2)[0].prompt == "a photo of an orange egg"


def test_generated_sets_are_disjoint_and_hold_every_tag():
    sets = generate_sets(["square", "circle", "triangle", "cross"], ["red", "green", "blue", "yellow"], 4, TAGS,
                         {"train": 64, "test": 40, "val": 16}, seed=0)
    assert [len(sets[s]) for s in ("train", "test", "val")] == [64, 40, 16]
    prompts = {s: {r.prompt for r in v} for s, v in sets.items()}
    assert not prompts["train"] & prompts["test"] and not prompts["train"] & prompts["val"]
    assert not prompts["test"] & prompts["val"]
    assert all({r.tag for r in v} == set(TAGS) for v in sets.values())
    with pytest.raises(GenEvalPromptError, match="add geneval.classes"):
        generate_sets(["square", "circle"], ["red", "blue"], 2, TAGS, {"train": 100}, seed=0)


def test_exact_detector_ceiling_on_clean_renders():
    p = parse_params({**GENEVAL, "prompts": {"n_train": 8, "n_test": 60, "n_val": 4}})
    task = make_task(p)
    test = task.make_prompt_sets()["test"]
    ceiling = task.ceiling(test * 2)
    assert ceiling["geneval"] >= 0.95 and ceiling["correct"] >= 0.95 and ceiling["score"] >= 0.95
    assert {f"tag.{t}" for t in TAGS} <= set(ceiling)


def test_reward_table_parts_and_per_tag_summary():
    task = make_task(parse_params(GENEVAL))
    rec = all_prompts("counting", ["square"], ["red"], 3)[-1]  # three squares, fewer than four
    rng = random.Random(0)
    good = task.render(rec, rng)
    two = task.render(all_prompts("counting", ["square"], ["red"], 2)[0], rng)
    table = task.reward([good, two], [rec, rec])
    assert list(table.columns[:4]) == ["reward", "score", "correct", "strict"]
    assert table["correct"].tolist() == [1.0, 0.0] and table["reward"].tolist() == table["score"].tolist()
    assert table["score"][1] == pytest.approx(2 / 3)
    summary = task.summarise(table)
    assert summary["tag.counting"] == 0.5 and summary["geneval"] == 0.5
    strict = make_task(parse_params({**GENEVAL, "geneval": {"reward": "correct"}}))
    assert strict.reward([two], [rec])["reward"].tolist() == [0.0]


def test_world_draws_only_its_shapes_and_colours():
    with pytest.raises(WorldError, match="cannot draw"):
        WorldSpec(32, 32, 9, 1, ("square", "giraffe"), ("red",))
    with pytest.raises(WorldError, match="colours"):
        WorldSpec(32, 32, 9, 1, ("square",), ("teal",))


def test_grid_world_keeps_each_object_inside_one_cell_and_its_ceiling():
    from gdro_core.params import load_params
    from gdro_core.tasks.geneval.world import layout

    p = load_params("params-geneval.yaml")  # the demo's world: a grid of cells
    w = p.geneval.world
    assert w.grid > 0
    task = make_task(p)
    spec, rng = task._world(), random.Random(3)
    four = all_prompts("counting", ["square"], ["red"], 4)[-1]
    for _ in range(20):
        objs = layout(four.metadata, spec, rng)
        cells = {(o.box[0] // w.grid, o.box[1] // w.grid) for o in objs}
        assert len(objs) == len(cells) == 4  # one object per cell
        for o in objs:  # inside its cell, its last row and column free
            assert o.box[2] % w.grid < w.grid - 1 and o.box[3] % w.grid < w.grid - 1
            assert o.box[2] // w.grid == o.box[0] // w.grid and o.box[3] // w.grid == o.box[1] // w.grid
    test = task.make_prompt_sets()["test"]
    assert task.ceiling(test)["geneval"] >= 0.95
    with pytest.raises(WorldError, match="grid"):
        WorldSpec(16, 16, 8, 0, ("square",), ("red",), grid=8)


def test_pretrain_batches_are_colour_scenes_under_their_captions():
    p = parse_params(GENEVAL)
    task = make_task(p)
    assert p.image_shape[2] == 3 and p.image_shape[0] == 32
    images, captions = task.pretrain_batch(8, p.pretrain.model_copy(update={"cond_dropout": 0.0}), random.Random(0))
    assert images.shape == (8, 3, 32, 32) and images.dtype == np.float32
    assert images.min() == -1.0 and images.max() <= 1.0
    assert all(c.startswith("a photo of ") for c in captions)


def test_low_quality_share_blurs_every_channel_of_that_share_of_scenes():
    """The low-quality part of the data: blurred scenes the exact detector no longer reads (a flaw GDRO can remove).
    On the GenEval demo's world (params-geneval.yaml)."""
    world = {"height": 16, "width": 16, "grid": 8, "object_size": 7, "jitter": 0}
    p = parse_params({**GENEVAL, "geneval": {"world": world}})
    task = make_task(p)
    clean_cfg = p.pretrain.model_copy(update={"cond_dropout": 0.0})
    blur_cfg = clean_cfg.model_copy(update={"low_quality_share": 0.5, "low_quality_blur": 1.5})
    clean, captions = task.pretrain_batch(64, clean_cfg, random.Random(0))
    blurred, same_captions = task.pretrain_batch(64, blur_cfg, random.Random(0))
    assert same_captions == captions
    changed = np.array([not np.array_equal(a, b) for a, b in zip(blurred, clean)])
    assert 0.3 < changed.mean() < 0.7
    assert np.array_equal(blurred[~changed], clean[~changed])
    # every drawn channel of a blurred scene is soft: none keeps its full palette value
    drawn = clean[changed].max(axis=(2, 3)) > -1.0
    assert drawn[:, 1:].any() and (blurred[changed].max(axis=(2, 3))[drawn] < clean[changed].max(axis=(2, 3))[drawn]).all()
    by_prompt = {r.prompt: r for r in task.scene_prompts()}
    records = [by_prompt[c] for c in captions]
    scores = task.reward(pixel_images(torch.from_numpy(blurred)), records)["score"].to_numpy()
    assert scores[~changed].mean() == 1.0 and scores[changed].mean() < 0.2


def test_attribute_errors_draw_scenes_their_captions_misstate_by_one_attribute():
    """pretrain.attribute_errors: a base that binds badly (wrong colour, count or side), never a worse image. Every
    such scene is read back as drawn and fails its caption in one attribute; object-only tags stay right."""
    world = {"height": 16, "width": 16, "grid": 8, "object_size": 7, "jitter": 0}
    p = parse_params({**GENEVAL, "geneval": {"world": world}})
    task = make_task(p)
    cfg = p.pretrain.model_copy(update={"cond_dropout": 0.0})
    clean, captions = task.pretrain_batch(96, cfg, random.Random(3))
    wrong, same = task.pretrain_batch(96, cfg.model_copy(update={"attribute_errors": 1.0}), random.Random(3))
    assert same == captions and clean.shape == wrong.shape
    by_prompt = {r.prompt: r for r in task.scene_prompts()}
    records = [by_prompt[c] for c in captions]
    table = task.reward(pixel_images(torch.from_numpy(wrong)), records)
    compositional = np.array([r.tag in ("counting", "colors", "position", "color_attr") for r in records])
    assert compositional.sum() > 40 and (~compositional).sum() > 10
    assert table["correct"][compositional].sum() == 0  # every attribute scene misstated
    assert table["correct"][~compositional].mean() == 1.0  # object-only scenes drawn as captioned
    assert table["score"][compositional].mean() > 0.4  # one attribute wrong, the rest right: partial credit
    assert task.reward(pixel_images(torch.from_numpy(clean)), records)["correct"].mean() == 1.0


def test_misstated_changes_exactly_one_attribute():
    from gdro_core.tasks.geneval.world import misstated, world_spec

    p = parse_params(GENEVAL)
    spec, rng = world_spec(p.geneval), random.Random(0)
    red = all_prompts("colors", ["square"], ["red"], 4)[0]
    assert misstated(red, spec, 4, rng).include[0]["color"] in {"green", "blue", "yellow"}
    pair = all_prompts("color_attr", ["square", "circle"], ["red", "blue"], 4)[0]
    swapped = misstated(pair, spec, 4, rng)
    assert [c["color"] for c in swapped.include] == [c["color"] for c in pair.include][::-1]
    four = all_prompts("counting", ["circle"], ["red"], 4)[-1]
    assert {misstated(four, spec, 4, random.Random(s)).include[0]["count"] for s in range(20)} == {3}
    two = all_prompts("counting", ["circle"], ["red"], 4)[0]
    assert {misstated(two, spec, 4, random.Random(s)).include[0]["count"] for s in range(20)} == {1, 3}
    left = position("square", "left of", "circle")
    assert misstated(left, spec, 4, rng).include[1]["position"] == ["right of", 0]
    assert misstated(left, spec, 4, rng).prompt == left.prompt
    single = all_prompts("single_object", ["square"], ["red"], 4)[0]
    assert misstated(single, spec, 4, rng) == single


def test_attribute_errors_need_the_geneval_task():
    with pytest.raises(ValueError, match="attribute_errors.*task 'ocr'"):
        parse_params({"pretrain": {"attribute_errors": 0.3}})


def test_held_out_intervals_resample_prompts_within_tags_paired():
    """The paired bootstrap: intervals hold the point figure, the delta's is paired (a constant gain on every image
    gives a zero-width interval), and each tag keeps its size."""
    import pandas as pd

    from gdro_core.evaluation.intervals import prompt_bootstrap

    task = make_task(parse_params(GENEVAL))
    rng = np.random.default_rng(0)
    n_prompts, per = 24, 4
    tags = np.repeat(["colors"] * 12 + ["counting"] * 8 + ["position"] * 4, per)
    base = pd.DataFrame({"tag": tags, "correct": rng.integers(0, 2, len(tags)).astype(float),
                         "score": rng.random(len(tags)), "coherence": rng.uniform(0, 5, len(tags))})
    trained = base.assign(score=base["score"] + 0.1)
    ci = prompt_bootstrap(base, trained, np.repeat(np.arange(n_prompts), per), task.summarise, 300, 0.9, 0)
    assert ci["prompts"] == {"colors": 12, "counting": 8, "position": 4} and ci["level"] == 0.9
    point = task.summarise(base)
    for key in ("score", "geneval", "compositional", "tag.colors", "geneval_clean", "clean_share"):
        lo, hi = ci["base"][key]
        assert lo <= point[key] <= hi and lo < hi
    assert ci["delta"]["score"] == pytest.approx([0.1, 0.1])
    assert ci["delta"]["geneval"] == [0.0, 0.0]
    assert point["compositional"] == pytest.approx(np.mean([point[f"tag.{t}"] for t in ("colors", "counting", "position")]))
    clean = base["coherence"] >= 2.5
    assert point["clean_share"] == pytest.approx(clean.mean())
    with pytest.raises(ValueError, match="row for row"):
        prompt_bootstrap(base, trained.iloc[:-1], np.repeat(np.arange(n_prompts), per), task.summarise, 10, 0.9, 0)


def test_pixel_judge_prefers_clean_scenes_to_noise():
    p = parse_params({**GENEVAL, "judge": {"reference_images": 32, "task": "geneval"}})
    task = make_task(p)
    judge = task.pixel_judge(p.judge)
    rec = all_prompts("colors", ["circle"], ["red"], 2)[0]
    clean = task.render(rec, random.Random(1))
    noise = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    from PIL import Image

    c, n = judge.score([clean, Image.fromarray(noise)], [rec.prompt] * 2, [rec.target] * 2)
    assert c.coherence > 4.5 and c.alignment == 5.0
    assert n.coherence < c.coherence - 1 and n.style < c.style


def test_report_is_genevals_summary_table(tmp_path, capsys):
    from gdro_core.tasks.geneval.report import main

    metrics = {"base": {"tag.counting": 0.25, "geneval": 0.3, "score": 0.5},
               "trained": {"tag.counting": 0.5, "geneval": 0.45, "score": 0.6},
               "ceiling": {"tag.counting": 1.0, "geneval": 1.0, "score": 1.0}}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert main([str(tmp_path / "metrics.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["base", "trained", "ceiling", "delta"]
    assert lines[1].split() == ["counting", "0.250", "0.500", "1.000", "+0.250"]
    assert lines[2].split()[0] == "geneval" and lines[2].split()[-1] == "+0.150"
    metrics |= {"base_train": {"geneval": 0.2, "score": 0.3}, "trained_train": {"geneval": 0.35, "score": 0.25}}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert main([str(tmp_path / "metrics.json")]) == 0
    tail = capsys.readouterr().out.splitlines()[-3:]
    assert tail[0].startswith("on training prompts")
    assert tail[1].split() == ["geneval", "0.200", "0.350", "+0.150"]
    assert tail[2].split() == ["score", "0.300", "0.250", "-0.050"]
    metrics["ci"] = {"level": 0.95, "samples": 100, "prompts": {"counting": 16},
                     "delta": {"tag.counting": [0.1, 0.4], "geneval": [0.05, 0.25]}}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert main([str(tmp_path / "metrics.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[-3:] == ["95", "%", "interval"]
    assert lines[1].split() == ["counting", "0.250", "0.500", "1.000", "+0.250", "[+0.100,", "+0.400]"]
    assert "held-out prompts per tag: counting 16" in lines
    assert main([str(tmp_path / "none.json")]) == 1 and "make demo-geneval" in capsys.readouterr().err
