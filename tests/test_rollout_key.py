"""The rollout cache key holds every input that changes the images: a new size, dtype, device or timestep shift
remakes the rollouts instead of finding the old ones complete (on a real-architecture checkpoint, whose base
directory records only the checkpoint, not the size it is sampled at)."""

import pytest
import torch
import yaml

from conftest import TINY
from gdro_core.cache_keys import rollout_fingerprint
from gdro_core.data.rollout import load_rollouts
from gdro_core.data.store import read_json
from gdro_core.layout import Layout
from gdro_core.models.tiny import save_tiny_pipeline
from gdro_core.params import parse_params


def family_params(source, **world) -> dict:
    return {**TINY, "prompts": {"n_train": 2, "n_test": 2, "n_val": 2}, "rollout": {"images_per_prompt": 3},
            "train": {**TINY["train"], "group_size": 2},
            "world": {"height": 32, "width": 48, **world}, "model": {"source": str(source), "device": "cpu"}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_pipeline("sd35", tmp_path_factory.mktemp("sd35") / "checkpoint")


def test_size_change_remakes_the_rollouts_at_the_new_size(checkpoint, tmp_path, monkeypatch, prefect_server,
                                                         one_thread):
    from flows.base import base_flow
    from flows.prompts import prompts_flow
    from flows.rollout import rollout_flow

    monkeypatch.setenv("GDRO_ROOT", str(tmp_path))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(family_params(checkpoint)))
    prompts_flow(params_path="params.yaml")
    base_flow(params_path="params.yaml")
    rollout_flow(params_path="params.yaml")
    first = load_rollouts(tmp_path / "data" / "rollouts")
    fp = read_json(tmp_path / "data" / "rollouts" / "manifest.json")["fingerprint"]

    rollout_flow(params_path="params.yaml", overrides={"world.height": 48})
    second = load_rollouts(tmp_path / "data" / "rollouts")
    assert read_json(tmp_path / "data" / "rollouts" / "manifest.json")["fingerprint"] != fp
    assert first.item_shape[1:] != second.item_shape[1:]  # latents of the new size, not the old images kept
    assert second.item_shape[1] / second.item_shape[2] == 1.0 and first.item_shape[1] / first.item_shape[2] < 1.0

    # rollout.steps: the pools from fewer sampler steps than sampler.steps (which held-out evaluation keeps)
    from flows.context import load_layout
    from gdro_core.models import load_model
    from gdro_core.models.sampling import sample

    rollout_flow(params_path="params.yaml", overrides={"world.height": 48, "rollout.steps": 1})
    third = load_rollouts(tmp_path / "data" / "rollouts")
    lay = load_layout("params.yaml", {"world.height": 48})
    model = load_model(lay.params, lay.base_dir)
    row = third.rows[1]
    cond, null = model.encode([row["prompt"]]), model.encode([""])
    one_step, all_steps = (sample(model, cond, null, [row["seed"]], n, lay.params.sampler.guidance)
                           for n in (1, lay.params.sampler.steps))
    latent = third.latents[row["prompt_index"], row["member"]]
    torch.testing.assert_close(latent, one_step[0].to(latent.dtype), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(latent, all_steps[0].to(latent.dtype), atol=1e-3)
    torch.testing.assert_close(second.latents[row["prompt_index"], row["member"]], all_steps[0].to(latent.dtype),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("key,value", [
    ("world.height", 48), ("model.dtype", "bfloat16"), ("model.device", "cpu:0"), ("sampler.shift", 2.0),
    ("sampler.steps", 4), ("sampler.guidance", 3.0), ("rollout.seed", 7), ("rollout.steps", 1),
])
def test_every_input_of_the_images_is_in_the_key(key, value, checkpoint, tmp_path):
    (tmp_path / "data" / "prompts").mkdir(parents=True)
    (tmp_path / "data" / "prompts" / "train.jsonl").write_text('{"prompt": "\\"12\\" on a sign", "target": "12"}\n')
    (tmp_path / "models" / "base").mkdir(parents=True)
    base = parse_params(family_params(checkpoint))
    section, _, leaf = key.rpartition(".")
    data = base.model_dump()
    node = data
    for part in section.split("."):
        node = node[part]
    node[leaf] = value
    other = parse_params(data)
    assert rollout_fingerprint(Layout(tmp_path, base)) != rollout_fingerprint(Layout(tmp_path, other)), key


def test_where_shards_run_and_what_training_does_are_not_in_the_key(checkpoint, tmp_path):
    (tmp_path / "data" / "prompts").mkdir(parents=True)
    (tmp_path / "data" / "prompts" / "train.jsonl").write_text('{"prompt": "\\"12\\" on a sign", "target": "12"}\n')
    (tmp_path / "models" / "base").mkdir(parents=True)
    base = family_params(checkpoint)
    for change in ({"scale": {"runner": "dask", "workers": 2}}, {"train": {**TINY["train"], "group_size": 2,
                                                                           "beta": 3.0}}):
        assert rollout_fingerprint(Layout(tmp_path, parse_params(base))) == \
            rollout_fingerprint(Layout(tmp_path, parse_params({**base, **change}))), change


def test_a_relative_checkpoint_path_is_recorded_absolute_and_its_place_is_not_in_the_key(checkpoint, tmp_path,
                                                                                        monkeypatch):
    import shutil

    from flows.context import load_layout
    from gdro_core.models.families import base_identity

    keys = []
    for name in ("here", "moved"):
        project = tmp_path / name
        shutil.copytree(checkpoint, project / "ckpt")
        (project / "data" / "prompts").mkdir(parents=True)
        (project / "data" / "prompts" / "train.jsonl").write_text('{"prompt": "\\"12\\" on a sign", "target": "12"}\n')
        (project / "models" / "base").mkdir(parents=True)
        (project / "params.yaml").write_text(yaml.safe_dump(family_params("ckpt")))
        monkeypatch.setenv("GDRO_ROOT", str(project))
        monkeypatch.chdir(tmp_path)  # another working directory than the project
        lay = load_layout("params.yaml")
        assert lay.params.model.source == str((project / "ckpt").resolve())
        assert base_identity(lay.params.model.source)["source"] == str((project / "ckpt").resolve())
        keys.append(rollout_fingerprint(lay))
    assert keys[0] == keys[1]  # the same checkpoint content in another place: the same rollouts
