"""benchmarks/gpu_train_step.py run in-process on its toy configs (CPU, float32), plus its full-size configs
checked on the meta device (shapes and parameter counts, no memory, no compute)."""

import json

import pytest
import torch

from conftest import load_benchmark
from gdro_core.params import Lora, Train

MODELS = ("sd3.5-medium", "flux.1-dev")
FAST = ["--sample-steps", "5", "--repeats", "1", "--warmup", "0"]  # keeps the file well under 20 s on a shared CPU

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("gpu_train_step")


@pytest.fixture(scope="module")
def toy_report(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "gpu_benchmark.json"
    report = bench.main(["--toy", *FAST, "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    return report


def test_toy_run_reports_positive_times_flops_and_ratio(toy_report):
    assert toy_report["device"] == "cpu" and toy_report["toy"] is True
    assert set(toy_report["models"]) == set(MODELS)
    for name in MODELS:
        r = toy_report["models"][name]
        gdro, grpo, ratio = r["gdro"], r["grpo"], r["grpo_over_gdro"]
        assert gdro["step_s"] > 0 and gdro["flops_per_step"] > 0 and gdro["mfu"] > 0
        assert gdro["images_per_s"] == pytest.approx(6 / gdro["step_s"])
        assert grpo["sampling_s"] > 0 and grpo["training_s"] > 0 and grpo["flops_per_iteration"] > 0
        assert grpo["train_steps"] == 3 and grpo["sample_steps"] == 5  # floor(5 x 0.6)
        assert ratio["time"] > 0 and ratio["flops"] > 0
        assert ratio["time"] == pytest.approx(grpo["iteration_s"] / gdro["step_s"])
        # CPU: no allocator statistics, and the report says so
        assert gdro["peak_memory_gib"] is None and grpo["peak_memory_gib"] is None
    assert any("null" in note for note in toy_report["notes"])
    # SD3 samples and trains through CFG (doubled batch), FLUX through its guidance embedding
    assert toy_report["models"]["sd3.5-medium"]["grpo"]["sampling_batch"] == 12
    assert toy_report["models"]["flux.1-dev"]["grpo"]["training_batch"] == 6


def test_flop_count_on_two_members_scales_to_the_full_group(bench, toy_report, tmp_path):
    # with checkpointing on, FLOPs are counted on 2 members (checkpointing off) and scaled by 6 / 2:
    # that must equal the direct count on all 6 members of the run without checkpointing
    report = bench.main(["--toy", *FAST, "--gradient-checkpointing", "--out", str(tmp_path / "ckpt.json")])
    for name in MODELS:
        direct, scaled = toy_report["models"][name], report["models"][name]
        assert direct["flop_count_members"] == 6 and scaled["flop_count_members"] == 2
        assert scaled["gdro"]["flops_per_step"] == pytest.approx(direct["gdro"]["flops_per_step"], rel=1e-9)
        assert scaled["grpo"]["flops_per_iteration"] == pytest.approx(direct["grpo"]["flops_per_iteration"], rel=1e-9)


@pytest.mark.parametrize("name", MODELS)
def test_both_procedures_train_the_lora_under_gradient_checkpointing(bench, name):
    spec = bench.TOY_SPECS[name]
    cpu = torch.device("cpu")
    transformer, params = bench.build_transformer(spec, cpu, torch.float32, Lora(rank=4, alpha=4.0), True, seed=0)
    assert transformer.is_gradient_checkpointing
    opt = torch.optim.SGD(params, lr=1.0)
    gen = torch.Generator().manual_seed(0)
    batch = bench.make_batch(spec, 3, 64, 3.5, cpu, torch.float32, gen)

    before = [p.detach().clone() for p in params]
    bench.gdro_step(spec, transformer, opt, batch, Train(), gen)
    assert any(not torch.equal(a, p) for a, p in zip(before, params))

    settings = bench.GrpoSettings(sample_steps=2, train_fraction=0.5, eta=0.7, clip_range=0.2, kl_beta=0.04,
                                  adv_eps=1e-4, adv_clip_max=5.0, shift=3.0,
                                  cfg_scale=4.5 if spec.family == "sd3" else None, train_cfg=True)
    sigmas = bench.sigma_schedule(settings.sample_steps, settings.shift)
    traj = bench.grpo_sample(spec, transformer, batch, sigmas, settings, gen)
    assert len(traj.log_probs) == 2 and all(torch.isfinite(lp).all() for lp in traj.log_probs)
    before = [p.detach().clone() for p in params]
    bench.grpo_train(spec, transformer, opt, batch, traj, sigmas, settings)
    assert any(not torch.equal(a, p) for a, p in zip(before, params))


@pytest.mark.parametrize(("name", "published"), [("sd3.5-medium", 2.5e9), ("flux.1-dev", 12e9)])
def test_full_size_configs_match_the_published_models(bench, name, published):
    # built on the meta device: shapes only, no memory or compute
    spec = bench.FULL_SPECS[name]
    meta = torch.device("meta")
    transformer = bench.build_base(spec, meta, torch.bfloat16, seed=0)
    weights = sum(t.numel() for t in [*transformer.parameters(), *transformer.buffers()])
    assert weights == pytest.approx(published, rel=0.05)
    # 512 px: a 64 x 64 latent; SD3 patches 2 x 2, FLUX packs 2 x 2: 1024 image tokens either way
    assert bench.image_tokens(spec, 512) == 1024
    batch = bench.make_batch(spec, 2, 512, 3.5, meta, torch.bfloat16, torch.Generator().manual_seed(0))
    expected_text = {"sd3.5-medium": (333, 4096, 2048), "flux.1-dev": (512, 4096, 768)}[name]
    cond = batch.cond
    assert (cond["encoder_hidden_states"].shape[1:], cond["pooled_projections"].shape[1]) == (
        expected_text[:2], expected_text[2])
    with torch.no_grad():
        v = bench.predict(spec, transformer, batch.x0, torch.full((2,), 0.5, device=meta), cond, batch.extra)
    assert v.shape == batch.x0.shape
