"""Iterated offline rounds: round 2 samples from round 1's adapter, trains it further, and never resumes round 1."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY, tiny_project
from gdro_core.data.rollout import load_rollouts
from gdro_core.data.store import write_json
from gdro_core.layout import Layout, RoundError
from gdro_core.models import load_model
from gdro_core.models.families import add_lora
from gdro_core.models.lora import lora_state, set_lora_state
from gdro_core.params import ParamsError, parse_params, round_params
from gdro_core.training.loop import start_training

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def world(tmp_path_factory, prefect_server):
    """Tiny params, prompts and a small random base in a project root of their own."""
    return tiny_project(tmp_path_factory.mktemp("rounds"), TINY)


def save_round_adapter(root: Path, scale: float, rank: int = TINY["train"]["lora"]["rank"]) -> dict[str, torch.Tensor]:
    """A round-1 adapter on the base at models/adapter: lora_B = ``scale`` x noise (0: the base's own policy)."""
    p = parse_params({**TINY, "train": {**TINY["train"], "lora": {"rank": rank, "alpha": 4.0}}})
    model = load_model(p, root / "models" / "base")
    add_lora(model.transformer, p.train.lora)
    g = torch.Generator().manual_seed(1)
    state = {k: (torch.randn(v.shape, generator=g) * (scale if "lora_B" in k else 1.0)) for k, v in
             lora_state(model.transformer).items()}
    set_lora_state(model.transformer, state)
    model.save_adapter(root / "models" / "adapter")
    return state


def test_round_params_draw_new_seeds_and_keep_round_1_unchanged():
    p = parse_params({**TINY, "rounds": {"seed_offset": 500, "steps": 7}})
    assert round_params(p, 1) is p
    r2, r3 = round_params(p, 2), round_params(p, 3)
    assert (r2.rollout.seed, r3.rollout.seed) == (p.rollout.seed + 500, p.rollout.seed + 1000)
    assert r2.train.steps == 7 and r2.rollout.images_per_prompt == p.rollout.images_per_prompt
    with pytest.raises(ParamsError, match="rounds.images_per_prompt"):
        parse_params({**TINY, "rounds": {"images_per_prompt": 2}})  # below train.group_size (3)


def test_a_later_round_has_its_own_paths_and_round_1_keeps_the_defaults(tmp_path):
    p = parse_params(TINY)
    one, two = Layout(tmp_path, p), Layout(tmp_path, p, round=2)
    assert one.rollout_dir == tmp_path / "data" / "rollouts" and one.adapter_dir == tmp_path / "models" / "adapter"
    assert one.metrics == tmp_path / "reports" / "metrics.json"
    assert two.rollout_dir == tmp_path / "data" / "rounds" / "2" / "rollouts"
    assert two.rewards == tmp_path / "data" / "rounds" / "2" / "rewards.parquet"
    assert two.adapter_dir == tmp_path / "models" / "rounds" / "2" / "adapter"
    assert two.metrics == tmp_path / "reports" / "rounds" / "2" / "metrics.json"
    assert two.prompts_dir == one.prompts_dir and two.base_dir == one.base_dir
    with pytest.raises(RoundError, match=r"run `gdro train` first"):
        two.previous_adapter()
    with pytest.raises(RoundError, match=r"run `gdro train --round 2` first"):
        Layout(tmp_path, p, round=3).previous_adapter()


def _rollout(root: Path, round: int, overrides: dict | None = None) -> torch.Tensor:
    from flows.rollout import rollout_flow

    mp = pytest.MonkeyPatch()
    mp.setenv("GDRO_ROOT", str(root))
    try:
        rollout_flow(params_path="params.yaml", overrides=overrides or {}, round=round)
    finally:
        mp.undo()
    return load_rollouts(Layout(root, parse_params(TINY), round=round).rollout_dir).latents


def test_round_2_samples_from_round_1s_adapter(world, one_thread):
    p = round_params(parse_params(TINY), 2)
    base = _rollout(world, 1, {"rollout.seed": p.rollout.seed})  # the base's images at round 2's seeds
    save_round_adapter(world, scale=0.0)  # B = 0: the adapted policy is the base
    assert torch.equal(_rollout(world, 2), base)
    save_round_adapter(world, scale=0.5)
    adapted = _rollout(world, 2)  # the adapter changed: the rollouts are sampled again, from the new policy
    assert adapted.shape == base.shape and not torch.allclose(adapted, base, atol=1e-4)
    round_1 = _rollout(world, 1)  # round 1's own seeds: round 2's noise is new
    assert not torch.allclose(round_1, base, atol=1e-4)


def test_round_2_training_starts_from_round_1s_adapter_and_never_resumes_its_checkpoint(world, tmp_path):
    from gdro_core.cache_keys import train_fingerprint

    saved = save_round_adapter(world, scale=0.3)
    p = parse_params(TINY)
    model = load_model(p, world / "models" / "base")
    init = world / "models" / "adapter"
    _, _, _, _, ema, start = start_training(model, p.train, tmp_path / "ckpt", init_adapter=init)
    live = lora_state(model.transformer)
    assert start == 0 and set(live) == set(saved)
    assert all(torch.equal(live[k], saved[k]) and torch.equal(ema.shadow[k], saved[k]) for k in saved)

    # the checkpoint directory: the same params and data files, round 1 against round 2 (and another init adapter)
    for lay in (Layout(world, p), Layout(world, round_params(p, 2), round=2)):
        write_json(lay.rollout_dir / "manifest.json", {"fingerprint": "same"})
        lay.rewards.parent.mkdir(parents=True, exist_ok=True)
        lay.rewards.write_bytes(b"same table")
    one, two = Layout(world, p), Layout(world, round_params(p.model_copy(update={"rounds": p.rounds.model_copy(
        update={"steps": p.train.steps})}), 2), round=2)
    keys = {one.checkpoints("train", train_fingerprint(one)), two.checkpoints("train", train_fingerprint(two))}
    save_round_adapter(world, scale=0.6)
    keys.add(two.checkpoints("train", train_fingerprint(two)))
    assert len(keys) == 3


def test_an_adapter_with_other_lora_settings_cannot_start_a_round(world, tmp_path):
    save_round_adapter(world, scale=0.3, rank=2)
    p = parse_params(TINY)
    model = load_model(p, world / "models" / "base")
    with pytest.raises(ValueError, match="set train.lora as that adapter was trained"):
        start_training(model, p.train, tmp_path / "ckpt", init_adapter=world / "models" / "adapter")


def test_bad_rounds_are_one_line_naming_the_fix(tmp_path, prefect_server):
    from prefect.settings import PREFECT_API_URL

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY))
    env = {**os.environ, "GDRO_ROOT": str(tmp_path), "PREFECT_API_URL": PREFECT_API_URL.value()}
    one = subprocess.run([BIN / "gdro", "rollout", "--round", "1"], cwd=tmp_path, env=env, capture_output=True,
                         text=True)
    assert one.returncode == 2 and "round 1 is the default pipeline, run the stage without --round" in one.stderr
    three = subprocess.run([BIN / "gdro", "train", "--round", "3"], cwd=tmp_path, env=env, capture_output=True,
                           text=True)
    assert three.returncode == 2, three.stderr[-2000:]
    assert "gdro train: round 3 starts from round 2's adapter, which is missing" in three.stderr
    assert "run `gdro train --round 2` first" in three.stderr and "Traceback" not in three.stdout + three.stderr


def test_round_2_fanned_out_over_dask_samples_the_same_images(world, tmp_path):
    pytest.importorskip("prefect_dask", reason="prefect-dask is not installed: `pip install -e '.[scale]'`",
                        exc_type=ModuleNotFoundError)
    import shutil

    save_round_adapter(world, scale=0.5)
    serial = _rollout(world, 2)
    root = tmp_path / "dask"
    root.mkdir()
    shutil.copy(world / "params.yaml", root / "params.yaml")
    for part in ("data/prompts", "models/base", "models/adapter"):
        shutil.copytree(world / part, root / part)
    fanned = _rollout(root, 2, {"scale.runner": "dask", "scale.workers": 2, "scale.threads_per_worker": 1})
    assert torch.equal(fanned, serial)  # each worker applied round 1's adapter too


def test_pipeline_runs_the_later_rounds_rounds_count_asks_for_after_round_1(tmp_path, monkeypatch):
    import flows.pipeline as pipeline

    calls = []
    for name in pipeline.STAGES:
        monkeypatch.setitem(pipeline.STAGES, name, lambda name=name, **kw: calls.append((name, kw.get("round", 1))))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**TINY, "rounds": {"count": 3}}))
    monkeypatch.setenv("GDRO_ROOT", str(tmp_path))
    pipeline.pipeline_flow.fn(params_path="params.yaml")
    later = [(s, r) for r in (2, 3) for s in ("rollout", "score", "train", "evaluate")]
    assert calls == [(s, 1) for s in ("prompts", "base", "rollout", "score", "train", "evaluate")] + later

    calls.clear()
    pipeline.pipeline_flow.fn(params_path="params.yaml", overrides={"rounds.count": 1})  # the default: round 1 only
    assert [r for _, r in calls] == [1] * 6
