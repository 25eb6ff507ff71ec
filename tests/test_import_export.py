"""Bring your own images: `gdro export` writes the rollouts and reward table as a manifest, `gdro import` reads one
back into the same rollout store and reward table, and bad input is refused naming its row with nothing written."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import TINY, gdro_env, tiny_project
from PIL import Image

from gdro_core.cache_keys import import_fingerprint
from gdro_core.data.manifest import LATENTS_FILE, ManifestError, export_manifest, import_manifest, read_manifest
from gdro_core.data.pool import open_rollouts
from gdro_core.data.rollout import MANIFEST, generate_rollouts, is_complete, load_rollouts
from gdro_core.data.scoring import read_table, reward_matrix, write_table
from gdro_core.data.store import read_json
from gdro_core.dvc_files import dvc_stage_problem, render_dvc_yaml
from gdro_core.layout import Layout
from gdro_core.models import load_model
from gdro_core.models.identity import base_fingerprint
from gdro_core.params import parse_params
from gdro_core.tasks.registry import make_task
from gdro_core.training.loop import train

BIN = Path(sys.executable).parent
COLUMNS = ["prompt_index", "member", "prompt", "target", "seed", "image", "reward"]


@pytest.fixture(scope="module")
def project(tmp_path_factory, prefect_server, one_thread):
    """A tiny project with native rollouts (4 prompts x 4 images) and a reward table of distinct random rewards,
    exported once to ``export/manifest.jsonl``."""
    root = tiny_project(tmp_path_factory.mktemp("byo"), TINY)
    p = parse_params(TINY)
    lay = Layout(root, p)
    model = load_model(p, lay.base_dir)
    prompts = make_task(p).read_prompts(lay.prompts("train"))
    n = p.rollout.images_per_prompt
    manifest = generate_rollouts(model, prompts, n, p.rollout.seed, p.sampler.steps, p.sampler.guidance,
                                 max(1, p.sampler.batch_size // n), lay.rollout_dir, "native")
    table = pd.DataFrame.from_records(manifest["rows"])
    table["reward"] = torch.rand(len(table), generator=torch.Generator().manual_seed(0)).double().numpy()
    write_table(table, lay.rewards, "native")
    base = base_fingerprint(p.model.source, lay.base_dir)
    export_manifest(lay.rollout_dir, lay.rewards, root / "export", "jsonl", {}, base)
    return root, p, lay, model, base


def do_import(p, model, base, manifest: Path, out: Path):
    return import_manifest(manifest, p, lambda: model, out / "rollouts", out / "rewards.parquet", "imported", base,
                           log=lambda line: None)


def trained(p, model_dir: Path, data_dir: Path, rewards: Path, fp: str, ckpt: Path) -> dict[str, torch.Tensor]:
    data = open_rollouts(data_dir)
    r = reward_matrix(read_table(rewards, fp), *data.shape)
    return train(load_model(p, model_dir), data, r, p.train, ckpt, lambda step, metrics: None)


def test_export_then_import_gives_the_same_table_store_and_adapter(project, tmp_path):
    root, p, lay, model, base = project
    lines = [json.loads(x) for x in (root / "export/manifest.jsonl").read_text().splitlines()]
    assert list(lines[0]) == ["prompt", "image", "reward", "group", "target", "seed"]
    assert (root / "export" / lines[0]["image"]).is_file() and (root / "export" / LATENTS_FILE).is_file()

    result = do_import(p, model, base, root / "export/manifest.jsonl", tmp_path)
    assert (result.encoded, result.reused, result.rows) == (0, 16, 16)  # unchanged PNGs: their stored latents
    native, imported = read_table(lay.rewards, "native"), read_table(tmp_path / "rewards.parquet", "imported")
    pd.testing.assert_frame_equal(native[COLUMNS], imported[COLUMNS])  # values, order, groups
    a, b = load_rollouts(lay.rollout_dir), load_rollouts(tmp_path / "rollouts")
    assert a.rows == b.rows and torch.equal(a.latents, b.latents)
    assert all(torch.equal(a.cond[k], b.cond[k]) for k in a.cond)
    assert read_json(lay.rollout_dir / MANIFEST)["images"] == read_json(tmp_path / "rollouts" / MANIFEST)["images"]

    one = trained(p, lay.base_dir, lay.rollout_dir, lay.rewards, "native", tmp_path / "ckpt-native")
    two = trained(p, lay.base_dir, tmp_path / "rollouts", tmp_path / "rewards.parquet", "imported",
                  tmp_path / "ckpt-imported")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


def test_without_the_stored_latents_the_pngs_are_encoded(project, tmp_path):
    """The built-in model's 'VAE' is its pixels: an encoded PNG is the sampled latent to within 8-bit rounding."""
    root, p, lay, model, base = project
    src = tmp_path / "export"
    shutil.copytree(root / "export", src)
    (src / LATENTS_FILE).unlink()
    result = do_import(p, model, base, src / "manifest.jsonl", tmp_path)
    assert (result.encoded, result.reused) == (16, 0)
    a, b = load_rollouts(lay.rollout_dir), load_rollouts(tmp_path / "rollouts")
    assert (a.latents.clamp(-1, 1) - b.latents).abs().max() <= 0.5 / 127.5 + 1e-6
    pd.testing.assert_frame_equal(read_table(lay.rewards, "native")[COLUMNS],
                                  read_table(tmp_path / "rewards.parquet", "imported")[COLUMNS])


def write_rows(folder: Path, rows: list[dict]) -> Path:
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def own(project, tmp_path):
    """A folder of exported images and a function writing a manifest of rows (default: the export's) into it."""
    root = project[0]
    folder = tmp_path / "mine"
    shutil.copytree(root / "export", folder)
    (folder / LATENTS_FILE).unlink()
    rows = [json.loads(x) for x in (root / "export/manifest.jsonl").read_text().splitlines()]
    return folder, rows


def assert_refused(project, folder: Path, rows: list[dict], match: str, out: Path, **data) -> None:
    _, _, _, model, base = project
    p = parse_params({**TINY, "data": data}) if data else project[1]
    with pytest.raises(ManifestError, match=match) as err:
        do_import(p, model, base, write_rows(folder, rows), out)
    assert "\n" not in str(err.value)
    assert not (out / "rollouts").exists() and not (out / "rewards.parquet").exists()
    assert not [f.name for f in out.iterdir() if f.name.startswith(".")], "temporary files left behind"


def test_bad_rows_are_refused_by_file_and_line_and_nothing_is_written(project, own, tmp_path):
    folder, rows = own
    out = tmp_path / "out"
    out.mkdir()
    m = str(folder / "manifest.jsonl")
    missing = [*rows[:2], {**rows[2], "image": "images/nope.png"}]
    assert_refused(project, folder, missing, rf"{m}:3: image .*nope.png is missing", out)
    (folder / "images/bad.png").write_bytes(b"not a png")
    assert_refused(project, folder, [{**rows[0], "image": "images/bad.png"}, *rows[1:3]],
                   rf"{m}:1: image .*bad.png is not a readable image", out)
    Image.new("L", (10, 10)).save(folder / "images/small.png")
    assert_refused(project, folder, [*rows[:2], {**rows[2], "image": "images/small.png"}],
                   rf"{m}:3: image is 10x10, the task's images are 48x24", out)
    nan = [*rows[:1], {**rows[1], "reward": float("nan")}]
    assert_refused(project, folder, nan, rf"{m}:2: reward is nan", out)
    assert_refused(project, folder, [*rows[:3], rows[1]], rf"{m}:4: duplicate row: .* already at {m}:2", out)
    long = {**rows[0], "prompt": "9" * 40, "group": "long"}
    assert_refused(project, folder, [*rows[:4], long], rf"{m}:5: prompt .* over the text encoder's limit of 32", out)
    small = [r for r in rows if r["group"] == 0][:2] + rows[4:]
    assert_refused(project, folder, small, rf"{m}:1: group '0' has 2 images, fewer than train.group_size 3",
                   out, small_groups="refuse")
    assert_refused(project, folder, [{**rows[0], "image": "../x.png"}], rf"{m}:1: image '../x.png' must be", out)
    assert_refused(project, folder, [{**rows[0], "image": "C:\\data\\x.png"}], rf"{m}:1: image 'C:.*' must be", out)


def test_a_missing_or_bad_manifest_is_named_before_the_model_loads(project, own, tmp_path, monkeypatch):
    """A missing manifest or a bad row is named at once, not after the base checkpoint (minutes for a real one) and
    a temporary server have loaded."""
    import flows.import_manifest as stage

    root, p, _, _, base = project
    folder, rows = own

    def never(*args):
        raise AssertionError("the model was loaded before the manifest was read")

    monkeypatch.setattr(stage, "load_model", never)
    monkeypatch.setenv("GDRO_ROOT", str(root))
    with pytest.raises(ManifestError, match=f"no manifest at {tmp_path / 'nope.jsonl'}"):
        stage.import_flow(overrides={"data.manifest": str(tmp_path / "nope.jsonl")})
    bad = write_rows(folder, [*rows[:2], {**rows[2], "reward": "high"}])
    with pytest.raises(ManifestError, match=":3: reward"):
        import_manifest(bad, p, never, tmp_path / "rollouts", tmp_path / "rewards.parquet", "fp", base)


def test_a_manifest_written_on_windows_names_its_images_with_backslashes(project, own, tmp_path):
    _, p, _, model, base = project
    folder, rows = own
    windows = [{**r, "image": r["image"].replace("/", "\\")} for r in rows]
    result = do_import(p, model, base, write_rows(folder, windows), tmp_path)
    assert result.rows == len(rows)
    pd.testing.assert_frame_equal(read_table(project[2].rewards, "native")[COLUMNS],
                                  read_table(tmp_path / "rewards.parquet", "imported")[COLUMNS])


def test_a_failed_import_keeps_the_previous_outputs(project, own, tmp_path):
    _, p, _, model, base = project
    folder, rows = own
    do_import(p, model, base, write_rows(folder, rows), tmp_path)
    before = (read_json(tmp_path / "rollouts" / MANIFEST), (tmp_path / "rewards.parquet").read_bytes())
    with pytest.raises(ManifestError, match="is missing"):
        do_import(p, model, base, write_rows(folder, [*rows[:-1], {**rows[-1], "image": "images/gone.png"}]),
                  tmp_path)
    assert (read_json(tmp_path / "rollouts" / MANIFEST), (tmp_path / "rewards.parquet").read_bytes()) == before


def test_groups_without_a_ranking_or_too_small_are_dropped_and_counted(project, own, tmp_path):
    _, p, _, model, base = project
    folder, rows = own
    by = {g: [r for r in rows if r["group"] == g] for g in range(4)}
    tied = [{**r, "reward": 0.5} for r in by[1]]
    rows2 = by[0] + tied + by[2][:2] + by[3][:1]
    result = do_import(p, model, base, write_rows(folder, rows2), tmp_path)
    assert result.groups.dropped == {"with one image": 1, "with all rewards equal": 1,
                                     "under train.group_size 3": 1}
    assert len(result.groups.kept) == 1 and "1 with one image" in result.summary()
    # sizes differ: every group is cut to the smallest kept one (the store holds P x N), the rest counted
    result = do_import(p, model, base, write_rows(folder, by[0] + by[2][:3]), tmp_path)
    assert (result.groups.per_group, result.groups.trimmed, result.rows) == (3, 1, 6)


def test_resize_policies_fit_other_sizes(project, own, tmp_path):
    _, _, _, model, base = project
    folder, rows = own
    Image.open(folder / rows[0]["image"]).resize((96, 60)).save(folder / "images/big.png")
    rows2 = [{**rows[0], "image": "images/big.png"}, *rows[1:4]]
    for policy in ("resize", "center_crop"):
        p = parse_params({**TINY, "data": {"resize": policy}})
        do_import(p, model, base, write_rows(folder, rows2), tmp_path / policy)
        stored = read_json(tmp_path / policy / "rollouts" / MANIFEST)["rows"][0]["image"]
        assert Image.open(tmp_path / policy / "rollouts" / stored).size == (48, 24)


def test_images_in_any_mode_or_orientation_import_as_the_task_sees_them(project, own, tmp_path):
    """Users' images come with alpha, palettes, 16-bit levels or a camera's EXIF rotation: each is stored and
    encoded upright in the task's mode (this world: grayscale), equal to the plain image where no level is lost."""
    _, p, _, model, base = project
    folder, rows = own
    plain = Image.open(folder / rows[0]["image"]).convert("L")
    variants = {
        "rgba": plain.convert("RGBA"),
        "sixteen": Image.fromarray(np.asarray(plain).astype(np.uint16) * 257),
        "rotated": plain.transpose(Image.Transpose.ROTATE_90),  # stored as the sensor saw it; EXIF: turn it 90° clockwise
        "palette": plain.convert("RGB").quantize(256),
        "cmyk": plain.convert("CMYK"),
        "clear": Image.new("RGBA", plain.size, (0, 0, 0, 0)),  # fully transparent: white, as a viewer shows it
    }
    for name, im in variants.items():
        extra = {}
        if name == "rotated":
            exif = Image.Exif()
            exif[0x0112] = 6
            extra["exif"] = exif
        im.save(folder / f"images/{name}.{'jpg' if name == 'cmyk' else 'png'}", **extra)
    names = list(variants)
    group = [{**rows[0], "image": f"images/{n}.{'jpg' if n == 'cmyk' else 'png'}", "reward": float(i), "seed": i}
             for i, n in enumerate(names)]
    do_import(p, model, base, write_rows(folder, group), tmp_path / "out")
    stored = load_rollouts(tmp_path / "out" / "rollouts")
    images = {n: Image.open(tmp_path / "out" / "rollouts" / r["image"]) for n, r in zip(names, stored.rows)}
    assert all(im.mode == "L" and im.size == plain.size for im in images.values())
    for n in ("rgba", "sixteen", "rotated"):
        assert np.array_equal(np.asarray(images[n]), np.asarray(plain)), n
    assert np.abs(np.asarray(images["palette"], dtype=int) - np.asarray(plain, dtype=int)).max() <= 8
    assert np.asarray(images["clear"]).min() == 255
    latents = stored.latents.reshape(-1, *stored.latents.shape[2:])
    assert torch.equal(latents[0], model.encode_images([plain])[0])


def test_named_rewards_are_summed_with_their_weights(tmp_path):
    rows = [{"prompt": "a", "image": "x.png", "ocr": 1.0, "clip": 0.0}, {"prompt": "a", "image": "y.png", "ocr": 0.0,
                                                                        "clip": 1.0, "reward": 0.3}]
    path = write_rows(tmp_path, rows)
    read = read_manifest(path, {"ocr": 0.7, "clip": 0.3})
    assert [r.reward for r in read] == [0.7, 0.3] and read[0].parts == {"ocr": 1.0, "clip": 0.0}
    path = write_rows(tmp_path, [{**rows[1], "reward": 0.9}])
    with pytest.raises(ManifestError, match=r":1: reward 0.9 is not the rewards.weights sum .*drop the columns ocr, "
                                            r"clip .* drop the reward column"):  # both ways out, the user's reward kept
        read_manifest(path, {"ocr": 0.7, "clip": 0.3})
    alone = write_rows(tmp_path, [{"prompt": "a", "image": "y.png", "reward": 0.9}])  # a rescored export, parts dropped
    assert [r.reward for r in read_manifest(alone, {"ocr": 0.7, "clip": 0.3})] == [0.9]
    with pytest.raises(ManifestError, match=r":1: no reward \(or ocr, clip"):
        read_manifest(write_rows(tmp_path, [{"prompt": "a", "image": "x.png", "ocr": 1}]), {"ocr": 0.7, "clip": 0.3})


def test_dvc_yaml_follows_data_source():
    imported = parse_params({"data": {"source": "import"}})
    stages = yaml.safe_load(render_dvc_yaml(imported))["stages"]
    assert list(stages) == ["check", "prompts", "base", "import", "train", "evaluate"]
    assert stages["import"]["outs"] == ["data/rollouts", "data/rewards.parquet"]
    assert "data/import" in stages["import"]["deps"] and "data" in stages["import"]["params"]
    root = Path(__file__).resolve().parents[1]
    assert dvc_stage_problem(root, parse_params({})) == ""
    assert "run `gdro stages --write`" in dvc_stage_problem(root, imported)


def test_the_export_and_import_commands(project, tmp_path):
    root, _, lay, _, _ = project
    env = {**gdro_env(root), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([BIN / "gdro", "export", "--out", str(tmp_path / "csv"), "--format", "csv"], cwd=root,
                         env=env, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    shutil.copytree(lay.rollout_dir, tmp_path / "native-rollouts")
    manifest = str(tmp_path / "csv/manifest.csv")
    out = subprocess.run([BIN / "gdro", "import", "--manifest", manifest], cwd=root, env=env, capture_output=True,
                         text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    fp = import_fingerprint(Layout(root, parse_params({**TINY, "data": {"manifest": manifest}})))
    assert is_complete(lay.rollout_dir, fp)
    assert torch.equal(load_rollouts(lay.rollout_dir).latents, load_rollouts(tmp_path / "native-rollouts").latents)
    assert read_table(lay.rewards, fp)["reward"].tolist() == pd.read_csv(manifest)["reward"].tolist()
