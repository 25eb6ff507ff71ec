"""The rewards seam: rewards found by name (built-in, entry point, module:Class), weighted sums that keep every
part as a column, errors that name the reward, the general task, and code keys that follow the configured rewards."""

import math
import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from gdro_core import preflight
from gdro_core.code_closure import code_record
from gdro_core.params import ParamsError, parse_params
from gdro_core.rewards.base import RewardError
from gdro_core.rewards.registry import ENTRY_POINT_GROUP, make_reward, resolve, reward_names
from gdro_core.rewards.weighted import WeightedReward
from gdro_core.tasks.ocr.task import OcrTask
from gdro_core.tasks.registry import make_task

USER_REWARDS = '''
import pandas as pd

class Brightness:
    """Mean pixel value in [0, 1]."""
    name, needs_world = "brightness", False

    def __init__(self, scale=1.0):
        self.scale = scale

    def score(self, images, records, progress=None):
        values = [self.scale * sum(im.convert("L").getdata()) / (255 * im.width * im.height) for im in images]
        return pd.DataFrame({"reward": values, "pixels": [im.width * im.height for im in images]})


class Length:
    """Prompt length in characters; fails on prompts that contain 'boom'."""
    name, needs_world = "length", False

    def score(self, images, records, progress=None):
        rows = [{"reward": float("nan"), "error": "boom"} if "boom" in r.prompt else
                {"reward": float(len(r.prompt)), "error": ""} for r in records]
        return pd.DataFrame(rows)
'''


class FixedReader:
    def __init__(self, reads):
        self.reads = list(reads)

    def read(self, images):
        out, self.reads = self.reads[: len(images)], self.reads[len(images):]
        return out


@pytest.fixture()
def user_rewards(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(USER_REWARDS)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    sys.modules.pop("my_rewards", None)


def grey(value: int, size=(8, 4)) -> Image.Image:
    return Image.new("L", size, value)


def test_weighted_sum_keeps_every_part_and_names_each_failure(user_rewards):
    p = parse_params({"rewards": {"weights": {"my_rewards:Brightness": 0.25, "my_rewards.py:Length": 2.0},
                                  "options": {"my_rewards:Brightness": {"scale": 2.0}}}})
    task = OcrTask(p)
    records = [task.record('"AB" on a sign', "AB"), task.record('"boom" on a sign', "boom")]
    table = task.reward([grey(255), grey(0)], records)
    assert table["my_rewards:Brightness"].tolist() == pytest.approx([2.0, 0.0])
    assert table["my_rewards.py:Length"].tolist() == pytest.approx([14.0, 0.0])  # NaN scored 0, error kept
    assert table["reward"].tolist() == pytest.approx([0.25 * 2.0 + 2.0 * 14.0, 0.0])
    assert table["my_rewards:Brightness.pixels"].tolist() == [32, 32]
    assert table["error"].tolist() == ["", "my_rewards.py:Length: boom"]
    summary = task.summarise(table)
    assert summary["reward_my_rewards:Brightness"] == pytest.approx(1.0) and summary["reward"] == pytest.approx(14.25)


def test_the_task_reward_in_a_sum_keeps_its_own_columns(user_rewards):
    p = parse_params({"rewards": {"weights": {"ocr": 0.5, "my_rewards:Brightness": 0.5}}})
    task = OcrTask(p, reader=FixedReader(["AB", "A"]))
    records = [task.record('"AB" on a sign', "AB"), task.record('"AB" on a sign', "AB")]
    table = task.reward([grey(255), grey(255)], records)
    assert table["ocr"].tolist() == pytest.approx([1.0, 0.5])
    assert table["exact"].tolist() == [True, False] and "read" in table  # OCR's parts under their own names
    assert table["reward"].tolist() == pytest.approx([1.0, 0.75])
    assert OcrTask(p).summarise(table)["exact"] == pytest.approx(0.5)


def test_no_weights_is_the_task_reward_alone():
    p = parse_params({})
    task = OcrTask(p, reader=FixedReader(["AB"]))
    table = task.reward([grey(0)], [task.record('"AB" on a sign', "AB")])
    assert list(table.columns) == ["read", "reward", "exact", "similarity", "error"]


class Returns:
    """A reward that returns ``out`` whatever it is given: what a user's reward might return."""
    needs_world = False

    def __init__(self, name: str, out):
        self.name, self.out = name, out

    def score(self, images, records, progress=None):
        return self.out


def test_a_reward_that_returns_the_wrong_rows_is_named():
    with pytest.raises(RewardError, match="'short' returned 1 rows for 2 images: it must return one row per image"):
        WeightedReward([("short", 1.0, Returns("short", pd.DataFrame({"reward": [1.0]})))]).score(
            [grey(0), grey(0)], [None, None])
    with pytest.raises(RewardError, match=r"'unnamed' returned a table without a 'reward' column \(columns: \['score'\]\)"):
        WeightedReward([("unnamed", 1.0, Returns("unnamed", pd.DataFrame({"score": [1.0, 1.0]})))]).score(
            [grey(0), grey(0)], [None, None])


def test_values_that_are_not_finite_numbers_are_scored_0_and_named_in_full():
    """A user's reward may return NaN, inf or text: each such image scores 0 and its error says what came back (the
    error column's text was cut to one character); an error column with None on the good rows flags nothing."""
    images, records = [grey(0)] * 4, [None] * 4
    odd = Returns("odd", pd.DataFrame({"reward": [float("nan"), 0.5, float("inf"), "high"]}))
    table = WeightedReward([("odd", 1.0, odd)]).score(images, records)
    assert list(table["reward"]) == [0.0, 0.5, 0.0, 0.0]
    assert list(table["error"]) == ["odd: reward nan is not a finite number", "",
                                    "odd: reward inf is not a finite number",
                                    "odd: reward 'high' is text, not a number: score must return numbers"]
    odd = Returns("odd", pd.DataFrame({"reward": [0.5, float("nan")], "error": [None, "blurred"]}))
    table = WeightedReward([("odd", 1.0, odd)]).score(images[:2], records[:2])
    assert list(table["error"]) == ["", "odd: blurred"]


def test_a_reward_may_return_its_rewards_as_a_sequence_and_a_failing_one_is_named():
    import torch

    images, records = [grey(0), grey(0)], [None, None]
    for out in ([0.25, 0.5], np.array([0.25, 0.5]), torch.tensor([0.25, 0.5]), {"reward": [0.25, 0.5], "x": [1, 2]}):
        table = WeightedReward([("plain", 2.0, Returns("plain", out))]).score(images, records)
        assert list(table["reward"]) == [0.5, 1.0] and list(table["error"]) == ["", ""], type(out)
    with pytest.raises(RewardError, match="'plain' returned ndarray: it must return a pandas DataFrame"):
        WeightedReward([("plain", 1.0, Returns("plain", np.zeros((2, 2))))]).score(images, records)

    class Broken:
        name, needs_world = "broken", False

        def score(self, images, records, progress=None):
            raise KeyError("no such layer")

    line = Broken.score.__code__.co_firstlineno + 1
    with pytest.raises(RewardError, match=rf"'broken' failed on a batch of 2 images \(KeyError: 'no such layer'\) at "
                                          rf"test_rewards.py:{line};"):  # where in the user's code to look
        WeightedReward([("broken", 1.0, Broken())]).score(images, records)


def test_a_score_method_without_the_progress_argument_is_called_without_it():
    """The README's prose says `score(images, records)`: a user's method of that shape works, as does one that takes
    the progress callback by name, positionally or through *args."""
    seen = []

    class Plain:
        name, needs_world = "plain", False

        def score(self, images, records):
            return [0.5] * len(images)

    class Keyword(Plain):
        def score(self, images, records, *, progress=None):
            seen.append(progress)
            return [0.25] * len(images)

    class Star(Plain):
        def score(self, *args):
            seen.append(len(args))
            return [1.0] * len(args[0])

    parts = [("plain", 1.0, Plain()), ("keyword", 1.0, Keyword()), ("star", 1.0, Star())]
    table = WeightedReward(parts).score([grey(0)] * 2, [None] * 2, progress=lambda done, n: None)
    assert list(table["reward"]) == [1.75, 1.75] and callable(seen[0]) and seen[1] == 3


def test_unknown_and_broken_rewards_say_what_to_do(user_rewards):
    with pytest.raises(RewardError, match=r"unknown reward 'pickscor'.*'ocr'.*module:Class"):
        resolve("pickscor")
    p = parse_params({"rewards": {"weights": {"my_rewards:Nope": 1.0}}})
    with pytest.raises(RewardError, match="has no class 'Nope'"):
        make_reward("my_rewards:Nope", p)
    p = parse_params({"rewards": {"weights": {"gone.py:X": 1.0}}})
    with pytest.raises(RewardError, match="no file gone.py"):
        make_reward("gone.py:X", p)
    p = parse_params({"rewards": {"weights": {"my_rewards:Length": 1.0}, "options": {"my_rewards:Length": {"x": 1}}}})
    with pytest.raises(RewardError, match="does not take these options"):
        make_reward("my_rewards:Length", p)


def test_options_are_validated_by_the_rewards_own_model(user_rewards):
    (user_rewards / "typed.py").write_text(textwrap.dedent('''
        import pandas as pd
        from pydantic import BaseModel

        class Typed:
            name, needs_world = "typed", False

            class Options(BaseModel):
                model_dir: str
                batch_size: int = 4

            def __init__(self, model_dir, batch_size):
                self.batch_size = batch_size

            @classmethod
            def preflight(cls, options, root):
                return [] if (root / options["model_dir"]).is_dir() else [f"no directory {options['model_dir']}"]

            def score(self, images, records, progress=None):
                return pd.DataFrame({"reward": [1.0] * len(images)})
    '''))
    p = parse_params({"rewards": {"weights": {"typed:Typed": 1.0}, "options": {"typed:Typed": {"batch_size": "x"}}}})
    with pytest.raises(RewardError) as err:
        make_reward("typed:Typed", p)
    assert "rewards.options.typed:Typed.model_dir" in str(err.value)
    assert "rewards.options.typed:Typed.batch_size" in str(err.value)
    p = parse_params({"rewards": {"weights": {"typed:Typed": 1.0}, "options": {"typed:Typed": {"model_dir": "m"}}}})
    assert preflight.problems(p, user_rewards) == ["rewards.options.typed:Typed: no directory m"]
    (user_rewards / "m").mkdir()
    assert preflight.problems(p, user_rewards) == []
    assert make_reward("typed:Typed", p).batch_size == 4
    bad = parse_params({"rewards": {"weights": {"pickscor": 1.0}}})
    [line] = preflight.problems(bad, user_rewards)
    assert line.startswith("unknown reward 'pickscor'")


def test_options_a_rewards_init_does_not_take_are_refused_by_check_before_any_stage(user_rewards):
    """Built as ``Class(**options)``: a misspelt or missing option fails in `gdro check`, not in `score` after DVC has
    deleted the old reward table."""
    name = "my_rewards.py:Brightness"
    for options, said in (({"scael": 2.0}, "unexpected keyword argument 'scael'"), ({}, None)):
        p = parse_params({"rewards": {"weights": {name: 1.0}, "options": {name: options} if options else {}}})
        problems = preflight.problems(p, user_rewards)
        if said is None:
            assert problems == []  # scale has a default
            continue
        [line] = problems
        assert line.startswith(f"reward '{name}': Brightness does not take these options (") and said in line
        assert line.endswith(f"set rewards.options['{name}'] to what its __init__ takes")
        with pytest.raises(RewardError, match=said):  # what `score` would have said, later
            make_reward(name, p)
    (user_rewards / "needs.py").write_text(USER_REWARDS.replace("scale=1.0", "scale"))
    p = parse_params({"rewards": {"weights": {"needs.py:Brightness": 1.0}}})
    [line] = preflight.problems(p, user_rewards)
    assert "missing a required argument: 'scale'" in line


def test_an_installed_package_adds_rewards_through_the_entry_point(tmp_path, monkeypatch):
    pkg = tmp_path / "site"
    (pkg / "acme_rewards").mkdir(parents=True)
    (pkg / "acme_rewards" / "__init__.py").write_text(USER_REWARDS)
    info = pkg / "acme_rewards-1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-rewards\nVersion: 1.2\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nbright = acme_rewards:Brightness\n")
    monkeypatch.syspath_prepend(str(pkg))
    assert reward_names()["bright"] == "acme_rewards:Brightness"
    p = parse_params({"rewards": {"weights": {"bright": 1.0}}})
    assert make_reward("bright", p).score([grey(255)], [None])["reward"].tolist() == [1.0]
    record = code_record("score", p)
    assert record["external"] == [{"reward": "bright", "entry_point": "acme_rewards:Brightness",
                                   "version": "acme-rewards==1.2"}]
    sys.modules.pop("acme_rewards", None)


def test_editing_a_local_reward_changes_the_scoring_stages_code_key_only(user_rewards):
    p = parse_params({"rewards": {"weights": {"ocr": 1.0, "my_rewards.py:Brightness": 1.0}}})
    before = {s: code_record(s, p)["sha256"] for s in ("rollout", "score", "train", "evaluate")}
    assert "gdro_core/rewards/weighted.py" in code_record("score", p)["files"]
    (user_rewards / "my_rewards.py").write_text(USER_REWARDS.replace("255 *", "255.0 *"))
    after = {s: code_record(s, p)["sha256"] for s in ("rollout", "score", "train", "evaluate")}
    assert after["rollout"] == before["rollout"]
    assert all(after[s] != before[s] for s in ("score", "train", "evaluate"))


def test_an_edit_to_a_module_the_reward_imports_reruns_scoring_and_dvc_tracks_it(tmp_path, monkeypatch):
    """A reward file that imports the project's own helpers (at the top, inside a function, relatively) scores with
    them: editing one changes the scoring stages' code key and is a dep of dvc.yaml's check stage, as the file is."""
    from gdro_core.dvc_files import render_dvc_yaml
    from gdro_core.rewards.registry import local_reward_files

    (tmp_path / "my_helpers.py").write_text("SCALE = 127.5\n")
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "__init__.py").write_text("")
    (tmp_path / "lib" / "ink.py").write_text("from .norms import clip\n")
    (tmp_path / "lib" / "norms.py").write_text("def clip(x):\n    return min(x, 1.0)\n")
    (tmp_path / "unused.py").write_text("")
    (tmp_path / "my_rewards.py").write_text(
        "import numpy as np\nimport my_helpers\n\nclass Contrast:\n    name, needs_world = 'contrast', False\n\n"
        "    def score(self, images, records, progress=None):\n        from lib.ink import clip\n"
        "        return [clip(np.asarray(im.convert('L')).std() / my_helpers.SCALE) for im in images]\n")
    monkeypatch.chdir(tmp_path)
    p = parse_params({"rewards": {"weights": {"ocr": 1.0, "my_rewards.py:Contrast": 1.0}}})
    files = ["my_rewards.py", "lib/__init__.py", "lib/ink.py", "lib/norms.py", "my_helpers.py"]
    assert sorted(local_reward_files(p, tmp_path)) == sorted(files)  # numpy, gdro and unused.py are not its code
    deps = yaml.safe_load(render_dvc_yaml(p, tuple(local_reward_files(p, tmp_path))))["stages"]["check"]["deps"]
    assert set(files) <= set(deps)
    for helper in ("my_helpers.py", "lib/norms.py"):
        before = {s: code_record(s, p)["sha256"] for s in ("rollout", "score")}
        (tmp_path / helper).write_text((tmp_path / helper).read_text() + "# edited\n")
        after = {s: code_record(s, p)["sha256"] for s in ("rollout", "score")}
        assert after["rollout"] == before["rollout"] and after["score"] != before["score"], helper
    before = code_record("score", p)["sha256"]
    (tmp_path / "unused.py").write_text("# edited\n")
    assert code_record("score", p)["sha256"] == before


def test_params_refuse_rewards_that_cannot_apply():
    with pytest.raises(ParamsError, match="reward 'geneval' .* needs task geneval"):
        parse_params({"rewards": {"weights": {"geneval": 1.0}}})
    with pytest.raises(ParamsError, match="not a finite number"):
        parse_params({"rewards": {"weights": {"ocr": math.nan}}})
    with pytest.raises(ParamsError, match="every weight is 0"):
        parse_params({"rewards": {"weights": {"ocr": 0}}})
    with pytest.raises(ParamsError, match="options for 'clip_score', which rewards.weights does not use"):
        parse_params({"rewards": {"weights": {"ocr": 1}, "options": {"clip_score": {}}}})
    with pytest.raises(ParamsError, match="options for 'clip_scor', but rewards.weights is empty"):  # were ignored
        parse_params({"rewards": {"weights": {}, "options": {"clip_scor": {"model_dir": "models/clip"}}}})


GENERAL = {"task": "general", "model": {"source": "models/mine"}, "judge": {"kind": "unified_reward"},
           "prompts": {"source": "prompt_files/mine", "n_val": 1}, "rewards": {"weights": {"my_rewards:Length": 1}}}


def test_the_general_task_reads_plain_prompt_files_and_needs_no_world(user_rewards):
    with pytest.raises(ParamsError, match="no reward of its own"):
        parse_params({**GENERAL, "rewards": {}})
    with pytest.raises(ParamsError, match="no built-in world"):
        parse_params({**GENERAL, "model": {"source": "builtin"}})
    with pytest.raises(ParamsError, match="pixel judge"):
        parse_params({**GENERAL, "judge": {"kind": "pixel"}})
    p = parse_params(GENERAL)
    assert p.judge_task == "general" and p.image_shape[2] == 3
    src = user_rewards / "prompt_files" / "mine"
    src.mkdir(parents=True)
    (src / "train.txt").write_text("a cat on a mat\n\na dog in fog\nan owl at night\n")
    (src / "test.txt").write_text("a red apple\n")
    task = make_task(p)
    sets = task.make_prompt_sets(user_rewards)
    assert [r.prompt for r in sets["train"]] == ["a cat on a mat", "a dog in fog"]
    assert [r.prompt for r in sets["val"]] == ["an owl at night"] and sets["test"][0].target == ""
    task.write_prompts(user_rewards / "train.jsonl", sets["train"])
    assert task.read_prompts(user_rewards / "train.jsonl") == sets["train"]
    table = task.reward([grey(1), grey(2)], sets["train"])
    assert table["reward"].tolist() == [14.0, 12.0]
    (src / "test.txt").write_text("A cat on a mat\n")  # held out as published; never trained on
    assert [r.prompt for r in task.make_prompt_sets(user_rewards)["train"]] == ["a dog in fog"]
    with pytest.raises(ValueError, match="no built-in world"):
        task.pretrain_batch(1, None, None)
    assert np.isfinite(task.summarise(table)["reward"])


def readme_blocks() -> dict[str, str]:
    """The code blocks of the README's "Your own reward" section, by language."""
    import re

    from conftest import ROOT

    section = (ROOT / "README.md").read_text().split("### Your own reward", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"```(\w+)\n(.*?)```", section, re.DOTALL))


def test_the_readme_reward_example_runs_beside_the_ocr_reward(tmp_path, prefect_server):
    import subprocess

    from conftest import ROOT, TINY, gdro_env, in_project, tiny_project
    from flows.rollout import rollout_flow

    from gdro_core.data.rollout import MANIFEST
    from gdro_core.data.store import read_json
    from gdro_core.layout import Layout

    blocks = readme_blocks()
    params = {**TINY, **yaml.safe_load(blocks["yaml"])}
    root = tiny_project(tmp_path / "project", params)
    (root / "my_rewards.py").write_text(blocks["python"])
    shutil.copy(ROOT / "dvc.yaml", root)
    (root / "rounds").mkdir()
    env = {**gdro_env(root), "OMP_NUM_THREADS": "1"}
    gdro = Path(sys.executable).parent / "gdro"

    def run(*args):
        return subprocess.run([gdro, *args], cwd=root, env=env, capture_output=True, text=True)

    refused = run("check")
    assert refused.returncode == 2 and "dvc.yaml does not track my_rewards.py" in refused.stderr, refused.stderr
    assert run("stages", "--write").returncode == 0
    assert "my_rewards.py" in yaml.safe_load((root / "dvc.yaml").read_text())["stages"]["check"]["deps"]
    assert run("check").returncode == 0
    in_project(root, rollout_flow)  # the images to score (made in this process: the reward is what is tested)
    out = run("score")  # the command loads my_rewards.py from the project, as a user's would
    assert out.returncode == 0, f"gdro score: {out.stderr[-2000:]}"

    lay = Layout(root, parse_params(params))
    table = pd.read_parquet(lay.rewards)
    spread = [np.asarray(Image.open(lay.rollout_dir / name).convert("L"), dtype=float).std() / 127.5
              for name in table["image"]]
    assert table["my_rewards.py:Contrast"].tolist() == pytest.approx(spread)
    assert table["reward"].tolist() == pytest.approx((0.8 * table["ocr"] + 0.2 * table["my_rewards.py:Contrast"]))
    assert {"exact", "read", "similarity"} <= set(table.columns)
    assert len(table) == len(read_json(lay.rollout_dir / MANIFEST)["rows"])
