"""benchmarks/gpu_train_step.py run in-process on its toy configs (CPU, float32), plus its full-size configs
checked on the meta device (shapes and parameter counts, no memory, no compute)."""

import json

import pytest
import torch

from conftest import load_benchmark
from gdro_core.models.flux import FluxModel
from gdro_core.models.lora import lora_state
from gdro_core.models.sd3 import StableDiffusion3Model
from gdro_core.training import loop, online_grpo

MODELS = ("sd3.5-medium", "flux.1-dev")
FAST = ["--sample-steps", "5", "--repeats", "1", "--warmup", "0"]  # keeps the file well under 30 s on a shared CPU
CPU = torch.device("cpu")

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
        assert r["params_total"] > r["params_lora"] > 0
        assert gdro["step_s"] > 0 and gdro["flops_per_step"] > 0 and gdro["mfu"] > 0
        assert gdro["achieved_tflops"] == pytest.approx(gdro["flops_per_step"] / gdro["step_s"] / 1e12)
        assert gdro["images_per_s"] == pytest.approx(6 / gdro["step_s"])
        assert grpo["sampling_s"] > 0 and grpo["training_s"] > 0 and grpo["flops_per_iteration"] > 0
        assert grpo["mfu"] > 0 and grpo["images_per_s"] == pytest.approx(6 / grpo["iteration_s"])
        assert grpo["train_steps"] == 3 and grpo["sample_steps"] == 5  # floor(5 x 0.6)
        # sampling 5 steps and training 3 (forward + backward + reference forward) costs more than one GDRO step
        assert ratio["flops"] > 1 and ratio["time"] > 0
        assert ratio["time"] == pytest.approx(grpo["iteration_s"] / gdro["step_s"])
        # CPU: no allocator statistics, and the report says so
        assert gdro["peak_memory_gib"] is None and grpo["peak_memory_gib"] is None
    assert any("null" in note for note in toy_report["notes"])
    # the family's guidance, as measured at the transformer: SD3 samples and trains through CFG (a doubled
    # batch), FLUX.1-dev through its guidance embedding
    sd3, flux = toy_report["models"]["sd3.5-medium"]["grpo"], toy_report["models"]["flux.1-dev"]["grpo"]
    assert (sd3["sampling_batch"], sd3["training_batch"]) == (12, 12)
    assert (flux["sampling_batch"], flux["training_batch"]) == (6, 6)


def test_flop_count_on_two_members_scales_to_the_full_group(bench, toy_report, tmp_path):
    # with checkpointing on, FLOPs are counted on 2 members (checkpointing off) and scaled by 6 / 2:
    # that must equal the direct count on all 6 members of the run without checkpointing
    report = bench.main(["--toy", *FAST, "--gradient-checkpointing", "--out", str(tmp_path / "ckpt.json")])
    for name in MODELS:
        direct, scaled = toy_report["models"][name], report["models"][name]
        assert direct["flop_count_members"] == 6 and scaled["flop_count_members"] == 2
        assert scaled["gdro"]["flops_per_step"] == pytest.approx(direct["gdro"]["flops_per_step"], rel=1e-9)
        assert scaled["grpo"]["flops_per_iteration"] == pytest.approx(direct["grpo"]["flops_per_iteration"], rel=1e-9)


def test_the_benchmark_times_the_library_training_functions(bench):
    # the very functions `gdro train` and the online baseline run, not copies
    assert bench.train_step is loop.train_step
    assert bench.start_training is loop.start_training
    assert bench.sample_trajectories is online_grpo.sample_trajectories
    assert bench.update_policy is online_grpo.update_policy
    assert bench.TOY_SPECS["sd3.5-medium"].family is StableDiffusion3Model
    assert bench.TOY_SPECS["flux.1-dev"].family is FluxModel


@pytest.mark.parametrize("name", MODELS)
def test_a_benchmark_step_changes_the_lora_exactly_as_the_library_step(bench, name):
    spec = bench.TOY_SPECS[name]
    args = bench.parse_args(["--toy", "--group-size", "3", "--lora-rank", "4"])
    cfg = bench.train_config(args)

    model = bench.build_model(spec, CPU, torch.float32, args.resolution, args.seed)
    tr = bench.start(model, cfg)
    data, rewards = bench.make_group(spec, model, 3, tr.gen)
    before = {k: v.clone() for k, v in lora_state(model.transformer).items()}
    bench.gdro_step(tr, data, rewards)
    via_bench = lora_state(model.transformer)

    # the same seeds, straight through the library: start_training, then train_step
    direct_model = bench.build_model(spec, CPU, torch.float32, args.resolution, args.seed)
    params, opt, gen, _, ema, _ = loop.start_training(direct_model, cfg, None)
    direct_data, direct_rewards = bench.make_group(spec, direct_model, 3, gen)
    assert torch.equal(direct_data.latents, data.latents) and torch.equal(direct_rewards, rewards)
    loop.train_step(direct_model, direct_data, direct_rewards, cfg, 1, params, opt, ema, gen,
                    loop.make_accelerator(direct_model))
    direct = lora_state(direct_model.transformer)

    assert any(not torch.equal(before[k], via_bench[k]) for k in before)  # the step did train
    assert via_bench.keys() == direct.keys()
    assert all(torch.equal(via_bench[k], direct[k]) for k in direct)
    assert all(torch.equal(tr.ema.shadow[k], ema.shadow[k]) for k in ema.shadow)


@pytest.mark.parametrize("name", MODELS)
def test_both_procedures_train_the_lora_under_gradient_checkpointing(bench, name):
    spec = bench.TOY_SPECS[name]
    args = bench.parse_args(["--toy", "--group-size", "3", "--lora-rank", "4", "--gradient-checkpointing",
                             "--sample-steps", "2", "--train-timesteps", "0.5"])
    model = bench.build_model(spec, CPU, torch.float32, args.resolution, args.seed)
    tr = bench.start(model, bench.train_config(args))
    assert model.transformer.is_gradient_checkpointing

    data, rewards = bench.make_group(spec, model, 3, tr.gen)
    before = [p.detach().clone() for p in tr.params]
    parts = bench.gdro_step(tr, data, rewards)
    assert parts["grad_norm"] > 0
    assert any(not torch.equal(a, p) for a, p in zip(before, tr.params))

    guidance = bench.guidance_for(spec, args)
    sigmas = online_grpo.sigma_schedule(model, 2)
    cond = {k: v.repeat_interleave(3, 0) for k, v in bench.make_cond(spec, 1, tr.gen, model.dtype).items()}
    null = bench.make_cond(spec, 1, tr.gen, model.dtype)
    traj = bench.grpo_sample(tr, cond, null, sigmas, guidance)
    assert traj.log_probs.shape == (2, 3) and torch.isfinite(traj.log_probs).all()
    before = [p.detach().clone() for p in tr.params]
    means = bench.grpo_update(tr, traj, cond, null, torch.tensor([0.1, 0.5, 0.9]), sigmas, guidance)
    assert means["grad_norm"] > 0
    assert any(not torch.equal(a, p) for a, p in zip(before, tr.params))


@pytest.mark.parametrize(("name", "published"), [("sd3.5-medium", 2.5e9), ("flux.1-dev", 12e9)])
def test_full_size_configs_match_the_published_models(bench, name, published):
    # built on the meta device: shapes only, no memory or compute
    spec = bench.FULL_SPECS[name]
    meta = torch.device("meta")
    model = bench.build_model(spec, meta, torch.bfloat16, 512, seed=0)
    weights = sum(t.numel() for t in [*model.transformer.parameters(), *model.transformer.buffers()])
    assert weights == pytest.approx(published, rel=0.05)
    # 512 px: a 64 x 64 latent of 16 channels; SD3 patches 2 x 2, FLUX packs 2 x 2: 1024 image tokens either way
    assert model.latent_shape == (16, 64, 64)
    assert bench.image_tokens(spec, 512) == 1024
    cond = {k: v.to(meta) for k, v in bench.make_cond(spec, 2, torch.Generator().manual_seed(0), model.dtype).items()}
    expected_text = {"sd3.5-medium": (333, 4096, 2048), "flux.1-dev": (512, 4096, 768)}[name]
    assert (cond["encoder_hidden_states"].shape[1:], cond["pooled_projections"].shape[1]) == (
        expected_text[:2], expected_text[2])
    x = torch.zeros((2, *model.latent_shape), device=meta)
    with torch.no_grad():
        v = model.velocity(x, torch.full((2,), 0.5, device=meta), cond)
    assert v.shape == x.shape


def test_a_resolution_the_families_cannot_take_is_refused(bench):
    with pytest.raises(ValueError, match="multiple of 16"):
        bench.build_model(bench.TOY_SPECS["sd3.5-medium"], CPU, torch.float32, 72, seed=0)
