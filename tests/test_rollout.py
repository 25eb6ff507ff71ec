"""Rollouts: determinism, hashed caching, resumption, and rebuild of corrupt or missing shards and images."""

import subprocess
from pathlib import Path

import pytest
import torch

from gdro_core.models.builtin import BuiltinModelAdapter, build_builtin_pipeline
from gdro_core.tasks.ocr.prompts import make_prompt_sets
from gdro_core.data.rollout import RolloutError, generate_rollouts, is_complete, load_rollouts
from gdro_core.data.store import TMP_SUFFIX, read_json
from gdro_core.models.sampling import sample


@pytest.fixture()
def model(tiny_params):
    p = tiny_params
    pipe = build_builtin_pipeline(p.model.builtin, p.image_shape, p.sampler.shift, seed=0)
    return BuiltinModelAdapter(pipe, (p.world.height, p.world.width))


@pytest.fixture()
def prompts(tiny_params):
    w = tiny_params.world
    return make_prompt_sets(w.alphabet, w.min_len, w.max_len, tiny_params.prompts.templates, 3, 1, seed=0)["train"]


def test_same_seed_same_latents_regardless_of_batching(model):
    cond, null = model.encode(['a sign "123"'] * 3), model.encode([""])
    full = sample(model, cond, null, [5, 6, 7], steps=3, guidance=3.0)
    alone = sample(model, {k: v[1:2] for k, v in cond.items()}, null, [6], steps=3, guidance=3.0)
    again = sample(model, cond, null, [5, 6, 7], steps=3, guidance=3.0)
    assert torch.equal(full, again)
    assert torch.allclose(full[1:2], alone, atol=1e-5)
    assert not torch.allclose(full[0], full[2])


def _generate(model, prompts, out, fp="fp-1", calls=None):
    return generate_rollouts(
        model, prompts, per_prompt=4, base_seed=100, steps=2, guidance=2.0, batch_prompts=2, out_dir=out,
        fingerprint=fp, progress=(lambda i, n: calls.append((i, n))) if calls is not None else None,
    )


def test_rollouts_are_stored_and_reused(model, prompts, tmp_path, monkeypatch):
    out = tmp_path / "rollouts"
    manifest = _generate(model, prompts, out)
    assert len(manifest["rows"]) == 12 and is_complete(out, "fp-1")
    data = load_rollouts(out)
    assert data.latents.shape == (3, 4, *model.latent_shape)
    assert data.cond["encoder_hidden_states"].shape[0] == 3
    assert len({r["seed"] for r in manifest["rows"]}) == 12

    import gdro_core.models.sampling as sampling_mod

    def fail(*a, **k):
        raise AssertionError("a complete, verified cache must not be sampled again")

    monkeypatch.setattr(sampling_mod, "sample", fail)
    assert _generate(model, prompts, out) == manifest


def test_changed_fingerprint_rebuilds(model, prompts, tmp_path):
    out = tmp_path / "rollouts"
    _generate(model, prompts, out, fp="fp-1")
    assert not is_complete(out, "fp-2")
    _generate(model, prompts, out, fp="fp-2")
    assert is_complete(out, "fp-2")


def test_corrupt_shard_is_regenerated_not_trusted(model, prompts, tmp_path):
    out = tmp_path / "rollouts"
    _generate(model, prompts, out)
    before = load_rollouts(out).latents.clone()
    shard = out / "shard-0001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8] + b"garbage!")
    assert not is_complete(out, "fp-1")
    with pytest.raises(RolloutError, match="hash"):
        load_rollouts(out)
    calls = []
    _generate(model, prompts, out, calls=calls)
    assert calls == [(1, 1)]  # only the corrupt shard is sampled again
    assert torch.equal(load_rollouts(out).latents, before)


def test_interrupted_rollout_resumes_from_finished_shards(model, prompts, tmp_path, monkeypatch):
    out = tmp_path / "rollouts"
    import gdro_core.models.sampling as sampling_mod

    real, count = sampling_mod.sample, {"n": 0}

    def crash_second(*a, **k):
        count["n"] += 1
        if count["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sampling_mod, "sample", crash_second)
    with pytest.raises(KeyboardInterrupt):
        _generate(model, prompts, out)
    assert (out / "shard-0000.safetensors").is_file() and not (out / "manifest.json").exists()
    count["n"] = 10  # later calls succeed; only the missing shard may be sampled
    calls = []
    _generate(model, prompts, out, calls=calls)
    assert count["n"] == 11 and is_complete(out, "fp-1")
    assert calls == [(1, 1)]  # the progress counts the one shard sampled, not the one reused


def _count_samples(monkeypatch):
    import gdro_core.models.sampling as sampling_mod

    real, seen = sampling_mod.sample, []

    def counting(*a, **k):
        seen.append(a[3])  # the seeds sampled
        return real(*a, **k)

    monkeypatch.setattr(sampling_mod, "sample", counting)
    return seen


def test_deleted_png_is_remade_by_its_shard_only(model, prompts, tmp_path, monkeypatch):
    out = tmp_path / "rollouts"
    manifest = _generate(model, prompts, out)
    png = out / "images" / "00002_001.png"  # prompt 2 lives in shard 1 (2 prompts per shard)
    original = png.read_bytes()
    png.unlink()
    assert not is_complete(out, "fp-1")  # a missing image is never reported as present
    seen = _count_samples(monkeypatch)
    assert _generate(model, prompts, out) == manifest
    assert png.read_bytes() == original
    assert seen == [[r["seed"] for r in manifest["rows"] if r["prompt_index"] == 2]]


def test_altered_png_is_detected_and_remade(model, prompts, tmp_path, monkeypatch):
    out = tmp_path / "rollouts"
    manifest = _generate(model, prompts, out)
    png = out / "images" / "00000_000.png"
    original = png.read_bytes()
    png.write_bytes(original[:-4] + b"oops")
    assert not is_complete(out, "fp-1")
    seen = _count_samples(monkeypatch)
    _generate(model, prompts, out)
    assert png.read_bytes() == original and len(seen) == 1
    assert manifest["images"]["images/00000_000.png"] == read_json(out / "records" / "shard-0000.json")["images"][
        "images/00000_000.png"
    ]


def test_every_image_and_shard_has_its_hash_in_a_shard_record(model, prompts, tmp_path):
    out = tmp_path / "rollouts"
    manifest = _generate(model, prompts, out)
    records = [read_json(p) for p in sorted((out / "records").glob("shard-*.json"))]
    assert [r["shard"] for r in records] == sorted(manifest["shards"])
    assert {k: v for r in records for k, v in r["images"].items()} == manifest["images"]
    assert [row for r in records for row in r["rows"]] == manifest["rows"]
    assert set(manifest["images"]) == {r["image"] for r in manifest["rows"]}


def test_temp_files_of_a_killed_write_are_ignored_by_dvc_and_cleaned(model, prompts, tmp_path):
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "rollouts"
    (out / "images").mkdir(parents=True)
    stale = out / "images" / f".00000_000.png.k1ll3d{TMP_SUFFIX}"  # what a kill mid-write leaves
    stale.write_bytes(b"half a png")
    probe = f"data/rollouts/images/.00000_000.png.k1ll3d{TMP_SUFFIX}"
    ignored = subprocess.run([Path(__import__("sys").executable).parent / "dvc", "check-ignore", probe], cwd=root,
                             capture_output=True, text=True)
    assert ignored.returncode == 0, f".dvcignore must ignore {probe}: {ignored.stdout}{ignored.stderr}"
    _generate(model, prompts, out)
    assert not stale.exists()
    assert not list(out.rglob(f"*{TMP_SUFFIX}"))


def test_missing_rollouts_name_the_fix(tmp_path):
    with pytest.raises(RolloutError, match="gdro rollout"):
        load_rollouts(tmp_path)
