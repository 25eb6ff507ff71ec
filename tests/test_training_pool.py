"""Lazy rollout reading: the pool answers every draw as the eagerly loaded rollouts do, and training on it matches."""

import pytest
import torch
from safetensors.torch import save_file

from conftest import load_benchmark
from gdro_core.data.pool import open_rollouts
from gdro_core.data.rollout import MANIFEST, RolloutError, load_rollouts
from gdro_core.data.store import read_json, sha256_file, write_json
from gdro_core.training.loop import train
from training_fixtures import tiny_data, tiny_model


def _write(out, data, shard_prompts, dtype=torch.float32):
    """``data`` as a rollout directory of shards of ``shard_prompts`` prompts (the layout `gdro rollout` writes)."""
    out.mkdir()
    shards = {}
    for s, start in enumerate(range(0, data.shape[0], shard_prompts)):
        name = f"shard-{s:04d}.safetensors"
        part = {"latents": data.latents[start : start + shard_prompts].to(dtype).contiguous()}
        part |= {f"cond.{k}": v[start : start + shard_prompts].contiguous() for k, v in data.cond.items()}
        save_file(part, str(out / name))
        shards[name] = sha256_file(out / name)
    write_json(out / MANIFEST, {"fingerprint": "test", "per_prompt": data.shape[1], "shards": shards, "rows": data.rows})
    return out


@pytest.fixture()
def pool_dir(tiny_params, tmp_path):
    data, rewards = tiny_data(tiny_params, n_prompts=5)
    return _write(tmp_path / "rollouts", data, shard_prompts=2), data, rewards  # shards of 2, 2 and 1 prompts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: what a bf16 model's rollout stores
def test_the_pool_answers_every_draw_as_the_loaded_rollouts(tiny_params, tmp_path, dtype):
    data, _ = tiny_data(tiny_params, n_prompts=5)
    out = _write(tmp_path / "rollouts", data, shard_prompts=2, dtype=dtype)
    pool, eager = open_rollouts(out), load_rollouts(out)
    assert eager.latents.dtype == dtype
    assert pool.shape == eager.shape == (5, 4) and pool.item_shape == eager.item_shape
    prompts = torch.tensor([4, 0, 3, 1, 2, 3])
    members = torch.tensor([[3, 0], [1, 2], [0, 1], [2, 3], [1, 1], [3, 2]])
    x0, cond = pool.take(prompts, members)
    ex0, econd = eager.take(prompts, members)
    assert x0.dtype == dtype and torch.equal(x0, ex0) and torch.equal(x0[0, 0], data.latents[4, 3].to(dtype))
    assert cond.keys() == econd.keys() and all(torch.equal(cond[k], econd[k]) for k in cond)
    with pytest.raises(IndexError, match="pool of 5 prompts"):
        pool.take(torch.tensor([5]), torch.tensor([[0, 1]]))


def test_a_shard_that_does_not_match_its_hash_is_refused(pool_dir):
    out, _, _ = pool_dir
    manifest = read_json(out / MANIFEST)
    manifest["shards"]["shard-0001.safetensors"] = "0" * 64
    write_json(out / MANIFEST, manifest)
    with pytest.raises(RolloutError, match="shard-0001.*does not match its hash"):
        open_rollouts(out)
    with pytest.raises(RolloutError, match="run `gdro rollout` first"):
        open_rollouts(out / "missing")


def test_training_on_the_lazy_pool_equals_training_on_the_loaded_rollouts(tiny_params, pool_dir, tmp_path, one_thread):
    out, _, rewards = pool_dir
    runs = []
    for data in (open_rollouts(out), load_rollouts(out)):
        logs = {}
        ema = train(tiny_model(tiny_params), data, rewards, tiny_params.train, tmp_path / str(len(runs)),
                    lambda s, m: logs.__setitem__(s, m))
        runs.append((logs, ema))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


def test_pool_memory_benchmark_prints_both_ways_of_reading(capsys, one_thread):
    bench = load_benchmark("pool_memory")
    results = bench.main(["--prompts", "40", "--images", "4", "--channels", "4", "--size", "8", "--shard-prompts", "16",
                          "--steps", "2"])
    assert [r["mode"] for r in results] == ["lazy", "eager"]
    assert all(r["peak_rss_mib"] >= r["rss_before_mib"] > 0 for r in results)
    printed = capsys.readouterr().out
    assert "40 prompts x 4 images of 4x8x8 latents" in printed and "lazy" in printed and "eager" in printed
