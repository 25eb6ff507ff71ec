"""Model families on tiny random-weight SD3, SD3.5 (qk-norm, dual attention) and FLUX.1 dev / schnell checkpoints.

Each checkpoint is built in code and saved as a diffusers directory, then used as ``model.source``: the
project's sampler must give the family's own pipeline's images, adapters must round-trip through the
pipeline's ``load_lora_weights`` with their alpha, and the registered model and the online baseline must run.
"""

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors import safe_open

from gdro_core.models import check_image_size, load_model
from gdro_core.models.base import ModelError, velocity
from gdro_core.models.families import add_lora
from gdro_core.models.flux import FLUX_DEFAULT_GUIDANCE
from gdro_core.models.lora import ADAPTER
from gdro_core.models.sampling import sample
from gdro_core.models.tiny import VARIANTS, save_tiny_pipeline
from gdro_core.params import Lora, World, parse_params

WORLD = World(height=32, width=48)
PROMPTS = ['"407" on a sign', '"12" as a label']
SEEDS = [3, 4]


def load(source, **sampler):
    """The checkpoint as the stages load it (``load_model``), for WORLD-sized images on the CPU; FLUX.1-dev's
    embedded guidance defaults to FluxPipeline's own unless ``sampler`` says otherwise."""
    params = parse_params({"model": {"source": str(source), "device": "cpu"}, "world": WORLD.model_dump(),
                           "sampler": {"guidance": FLUX_DEFAULT_GUIDANCE, **sampler}})
    return load_model(params, "")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-checkpoints")
    torch.manual_seed(0)
    return {v: save_tiny_pipeline(v, root / v) for v in VARIANTS}


def pipeline_images(source: Path, variant: str, guidance: float, steps: int) -> np.ndarray:
    """The family's own diffusers pipeline (StableDiffusion3Pipeline / FluxPipeline), same seeds, steps, guidance."""
    pipe = DiffusionPipeline.from_pretrained(source)
    pipe.set_progress_bar_config(disable=True)
    # FLUX.1-schnell has no guidance embedding: its classifier-free guidance is FluxPipeline's true CFG
    kw = ({"true_cfg_scale": guidance, "negative_prompt": ""} if variant == "flux-schnell"
          else {"guidance_scale": guidance})
    out = pipe(PROMPTS, num_inference_steps=steps, height=WORLD.height, width=WORLD.width, output_type="pil",
               generator=[torch.Generator().manual_seed(s) for s in SEEDS], **kw).images
    return np.stack([np.asarray(im) for im in out]).astype(int)


@pytest.mark.parametrize("variant", VARIANTS)
def test_sampler_gives_the_pipelines_images(checkpoints, variant, one_thread):
    model = load(str(checkpoints[variant]))
    for guidance in (1.0, 2.5):
        latents = sample(model, model.encode(PROMPTS), model.encode([""]), SEEDS, 2, guidance)
        ours = np.stack([np.asarray(im) for im in model.decode(latents)]).astype(int)
        theirs = pipeline_images(checkpoints[variant], variant, guidance, 2)
        assert ours.shape == theirs.shape == (2, WORLD.height, WORLD.width, 3)
        assert np.abs(ours - theirs).max() <= 1, (variant, guidance)  # float round-off may move a level by one
        assert ours.std() > 1  # real images, not a constant


@pytest.mark.parametrize("variant", VARIANTS)
def test_nothing_but_the_adapter_holds_gradients(checkpoints, variant):
    model = load(str(checkpoints[variant]))
    add_lora(model.transformer, Lora(rank=2, alpha=2.0))
    trainable = {n for n, p in model.pipe.components.items()
                 if isinstance(p, torch.nn.Module) and any(q.requires_grad for q in p.parameters())}
    assert trainable == {"transformer"}
    assert all("lora_" in n for n, p in model.transformer.named_parameters() if p.requires_grad)
    with torch.enable_grad():
        cond = model.encode(PROMPTS)
        images = model.decode(torch.randn(2, *model.latent_shape))  # failed with "Can't call numpy() ..." before
    assert not any(v.requires_grad for v in cond.values())
    assert len(images) == 2


def randomise_lora(transformer: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_adapter_round_trips_with_alpha_through_load_lora_weights(checkpoints, variant, tmp_path, one_thread):
    source = str(checkpoints[variant])
    model = load(source)
    add_lora(model.transformer, Lora(rank=4, alpha=12.0, target_modules=[]))  # alpha != rank, family targets
    randomise_lora(model.transformer)
    gen = torch.Generator().manual_seed(2)
    x, t = torch.randn((2, *model.latent_shape), generator=gen), torch.tensor([0.3, 0.8])
    cond = model.encode(PROMPTS)
    with torch.no_grad():
        trained = velocity(model, x, t, cond)
    path = model.save_adapter(tmp_path / "adapter")
    with safe_open(str(path), "pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
        saved = {k.removeprefix("transformer.") for k in f.keys()}
    assert (metadata["transformer.r"], metadata["transformer.lora_alpha"]) == (4, 12.0)
    assert json.loads((tmp_path / "adapter" / "base.json").read_text())["family"] == model.family

    # the family's own pipeline loads it with no missing or unexpected key, at the trained alpha
    pipe = DiffusionPipeline.from_pretrained(source)
    pipe.load_lora_weights(tmp_path / "adapter", adapter_name="loaded")
    assert set(get_peft_model_state_dict(pipe.transformer, adapter_name="loaded")) == saved
    assert pipe.transformer.peft_config["loaded"].lora_alpha == 12.0
    fresh = type(model)(pipe, WORLD.height, WORLD.width, source)
    with torch.no_grad():
        torch.testing.assert_close(velocity(fresh, x, t, cond), trained)

    # and so does evaluate / the registry (model.load_adapter)
    again = load(source)
    again.load_adapter(tmp_path / "adapter")
    assert again.transformer.peft_config[ADAPTER].lora_alpha == 12.0
    with torch.no_grad():
        torch.testing.assert_close(velocity(again, x, t, cond), trained)
        base_v = velocity(load(source), x, t, cond)
    assert (base_v - trained).abs().max() > 1e-3  # the adapter changes the velocity: the comparison is not vacuous


def test_flux_default_targets_include_feed_forward_and_single_block_projections(checkpoints):
    model = load(str(checkpoints["flux-dev"]))
    add_lora(model.transformer, Lora(rank=2, alpha=2.0))
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.transformer.named_parameters() if ".lora_A" in n}
    for name in ("transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff_context.net.2",
                 "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.proj_out",
                 "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj"):
        assert name in adapted
    blocks = len(model.transformer.single_transformer_blocks)
    assert {f"single_transformer_blocks.{i}.proj_out" for i in range(blocks)} <= adapted
    assert "proj_out" not in adapted  # the transformer's output layer stays as the base has it


def test_flux_dev_uses_dynamic_shift_and_embedded_guidance(checkpoints):
    dev = load(str(checkpoints["flux-dev"]))
    schnell = load(str(checkpoints["flux-schnell"]))
    assert dev.embedded_guidance and not schnell.embedded_guidance
    # mu from the image length (6 packed tokens) gives a schedule other than schnell's unshifted one
    assert not torch.allclose(dev.sampling_scheduler(4).sigmas, schnell.sampling_scheduler(4).sigmas)
    torch.testing.assert_close(schnell.sampling_scheduler(4).sigmas[:-1].double(),
                               torch.linspace(1.0, 0.25, 4, dtype=torch.float64), atol=1e-6, rtol=0)
    x, t, cond = torch.randn(1, *dev.latent_shape), torch.tensor([0.5]), dev.encode(PROMPTS[:1])
    with torch.no_grad():
        assert (dev.velocity(x, t, cond, guidance=1.0) - dev.velocity(x, t, cond, guidance=5.0)).abs().max() > 0


@pytest.mark.parametrize("variant", ["sd35", "flux-dev"])
def test_model_from_a_bare_transformer_predicts_as_the_whole_checkpoint(checkpoints, variant):
    whole = load(str(checkpoints[variant]))
    bare = type(whole).from_transformer(whole.transformer, whole.scheduler, WORLD.height, WORLD.width)
    assert (bare.family, bare.latent_shape, bare.embedded_guidance) == (
        whole.family, whole.latent_shape, whole.embedded_guidance)
    torch.testing.assert_close(bare.sampling_scheduler(4).sigmas, whole.sampling_scheduler(4).sigmas, rtol=0, atol=0)
    cond, null = whole.encode(PROMPTS[:1]), whole.encode([""])
    x, t = torch.randn(1, *whole.latent_shape, generator=torch.Generator().manual_seed(0)), torch.tensor([0.3])
    with torch.no_grad():
        assert torch.equal(bare.guided_velocity(x, t, cond, null, 4.0), whole.guided_velocity(x, t, cond, null, 4.0))
    # it has no encoders or VAE, and says so instead of failing inside diffusers
    with pytest.raises(ModelError, match="from_transformer"):
        bare.encode(PROMPTS[:1])
    with pytest.raises(ModelError, match="no vae"):
        bare.decode(x)


def test_sampler_shift_replaces_the_checkpoints_shift(checkpoints):
    own = load(str(checkpoints["sd35"]))
    shifted = load(str(checkpoints["sd35"]), shift=1.0)
    assert own.sampling_scheduler(4).config.shift == 3.0
    assert shifted.sampling_scheduler(4).config.shift == 1.0
    assert not torch.allclose(own.sampling_scheduler(4).sigmas, shifted.sampling_scheduler(4).sigmas)


def test_adapter_for_another_base_is_refused(checkpoints, tmp_path):
    flux = load(str(checkpoints["flux-schnell"]))
    add_lora(flux.transformer, Lora(rank=2, alpha=2.0))
    flux.save_adapter(tmp_path / "flux")
    sd3 = load(str(checkpoints["sd3"]))
    with pytest.raises(ModelError, match="trained on flux"):
        sd3.load_adapter(tmp_path / "flux")
    # same architecture, other weights: the fingerprint tells them apart
    other = save_tiny_pipeline("sd3", tmp_path / "sd3-other", seed=7)
    add_lora(sd3.transformer, Lora(rank=2, alpha=2.0))
    sd3.save_adapter(tmp_path / "sd3")
    with pytest.raises(ModelError, match="fingerprint"):
        load(str(other)).load_adapter(tmp_path / "sd3")


@pytest.mark.parametrize("variant", ["sd3", "flux-dev"])
def test_image_size_the_family_cannot_take_fails_at_params_load(checkpoints, variant):
    with pytest.raises(ModelError, match="multiples of 16"):
        check_image_size(parse_params({"model": {"source": str(checkpoints[variant])}}))  # the default 24x48 world
    check_image_size(parse_params({"model": {"source": str(checkpoints[variant])},
                                   "world": {"height": 32, "width": 48}}))
    with pytest.raises(ModelError, match="multiples of 4"):
        check_image_size(parse_params({"world": {"height": 26, "width": 48}}))  # built-in model, patch size 4


def test_unsupported_family_names_the_supported_ones(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ModelError, match="StableDiffusionXLPipeline is not supported; supported: builtin, "
                                         "StableDiffusion3Pipeline.*FluxPipeline"):
        load(str(tmp_path))


@pytest.mark.parametrize("variant", ["sd35", "flux-dev"])
def test_registered_model_takes_seed_steps_guidance_and_refuses_another_base(checkpoints, variant, tmp_path):
    from gdro_core.tracking.registry import log_adapter_model

    source = str(checkpoints[variant])
    params = parse_params({"model": {"source": source, "device": "cpu"}, "world": {"height": 32, "width": 48},
                           "sampler": {"steps": 2}, "tracking": {"registered_model": "fam"}})
    model = load_model(params, "")
    add_lora(model.transformer, Lora(rank=2, alpha=4.0))
    randomise_lora(model.transformer)
    model.save_adapter(tmp_path / "adapter")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("families")
    with mlflow.start_run():
        info = log_adapter_model(params, tmp_path / "adapter", tmp_path / "unused", "fam")
    assert {p.name for p in info.signature.params.params} == {"seed", "steps", "guidance"}
    pyfunc = mlflow.pyfunc.load_model(f"models:/fam/{info.registered_model_version}")
    a = pyfunc.predict(PROMPTS, params={"seed": 7})
    b = pyfunc.predict(PROMPTS, params={"seed": 7, "steps": 2})
    c = pyfunc.predict(PROMPTS)
    assert a[0].shape == (32, 48, 3) and np.array_equal(a[0], b[0]) and not np.array_equal(a[0], c[0])
    with torch.no_grad():
        expected = model.decode(sample(model, model.encode(PROMPTS), model.encode([""]), [7, 8], 2, 1.0))
    assert np.abs(a[0].astype(int) - np.asarray(expected[0]).astype(int)).max() <= 1

    # the checkpoint at that path changed: the registered model refuses it instead of loading the adapter onto it
    save_tiny_pipeline(variant, checkpoints[variant].parent / f"{variant}-changed", seed=9)
    backup = tmp_path / "backup"
    shutil.copytree(source, backup)
    try:
        shutil.rmtree(source)
        shutil.copytree(checkpoints[variant].parent / f"{variant}-changed", source)
        with pytest.raises(Exception, match="fingerprint"):
            mlflow.pyfunc.load_model(f"models:/fam/{info.registered_model_version}")
    finally:
        shutil.rmtree(source)
        shutil.copytree(backup, source)


@pytest.mark.parametrize("variant", VARIANTS)
def test_online_flow_grpo_and_offline_gdro_train_every_family(checkpoints, variant, tmp_path, one_thread):
    from gdro_core.data.rollout import Rollouts
    from gdro_core.models.lora import lora_state
    from gdro_core.tasks.ocr.prompts import OcrPrompt
    from gdro_core.training.loop import train
    from gdro_core.training.online_grpo import encode_prompts, train_online

    cfg = parse_params({"train": {"grpo_prompts_per_iteration": 2, "grpo_group_size": 2, "grpo_sample_steps": 2,
                                  "steps": 2, "checkpoint_every": 1, "log_every": 1, "lr": 1e-2, "group_size": 2,
                                  "groups_per_step": 2, "lora": {"rank": 2, "alpha": 4.0}},
                        "rollout": {"images_per_prompt": 2}}).train
    prompts = [OcrPrompt(text, text.split('"')[1]) for text in PROMPTS]

    def brightness(images, targets):
        return torch.tensor([float(np.asarray(im, dtype=np.float32).mean() / 255) for im in images])

    model = load(str(checkpoints[variant]))
    cond, null = encode_prompts(model, prompts, batch_size=2)
    logs = []
    weights = train_online(model, prompts, cond, null, brightness, cfg, tmp_path / "online",
                           lambda s, m: logs.append(m), guidance=2.0)
    assert len(logs) == 2 and all(np.isfinite(m["train/loss"]) for m in logs)
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)

    model = load(str(checkpoints[variant]))
    latents = torch.stack([sample(model, {k: v[i:i + 1].expand(2, *v.shape[1:]) for k, v in cond.items()}, null,
                                  [10 * i, 10 * i + 1], 2, 1.0) for i in range(2)])
    data = Rollouts(latents, cond, [])
    logs = []
    train(model, data, torch.tensor([[1.0, 0.0], [0.2, 0.7]]), cfg, tmp_path / "offline", lambda s, m: logs.append(m))
    assert len(logs) == 2 and all(np.isfinite(m["train/loss"]) for m in logs)
    assert any(v.abs().sum() > 0 for k, v in lora_state(model.transformer).items() if "lora_B" in k)


def test_base_fingerprint_follows_the_checkpoint_content_not_its_path(checkpoints, tmp_path):
    from gdro_core.models.families import base_identity
    from gdro_core.models.identity import base_fingerprint

    source = checkpoints["flux-schnell"]
    copy = shutil.copytree(source, tmp_path / "moved")
    assert base_fingerprint(str(copy)) == base_fingerprint(str(source))
    expected = {"family": "flux", "source": str(copy), "fingerprint": base_fingerprint(str(source))}
    assert base_identity(str(copy)) == expected
    weights = next((copy / "transformer").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert base_fingerprint(str(copy)) != base_fingerprint(str(source))
    with pytest.raises(ModelError, match="not in the local cache|neither a local directory"):
        base_fingerprint("no-such-org/no-such-model")


@pytest.mark.parametrize("variant", ["sd35", "flux-dev"])
def test_images_in_any_mode_encode_as_their_rgb(checkpoints, variant):
    """The VAE reads three channels: a grayscale, palette, alpha or CMYK image is encoded as its RGB conversion."""
    model = load(checkpoints[variant])
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (WORLD.height, WORLD.width, 3), dtype=np.uint8))
    with torch.no_grad():
        for mode in ("L", "P", "RGBA", "CMYK"):
            im = rgb.convert(mode)
            assert torch.equal(model.encode_images([im]), model.encode_images([im.convert("RGB")])), mode
