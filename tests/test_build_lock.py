"""Model builds in one process happen one at a time.

While diffusers loads a model it makes ``torch.nn.init`` a no-op and puts new parameters on the meta device,
process-wide. A sweep's configs run as threads of one process: a LoRA another config attaches meanwhile must
still come out real and seeded, which it does only because it waits for the load to finish.
"""

import threading

import torch
from diffusers import SD3Transformer2DModel

from conftest import TINY
from gdro_core.models import load_model
from gdro_core.models.builtin import build_builtin_pipeline
from gdro_core.models.families import add_lora
from gdro_core.models.lora import lora_state
from gdro_core.params import parse_params
from gdro_core.training.loop import seed_lora_init


def attach(model, cfg, seed):
    add_lora(model.transformer, cfg)
    seed_lora_init(model.transformer, seed)
    return {k: v.clone() for k, v in lora_state(model.transformer).items()}


def test_a_lora_attached_while_another_thread_loads_a_model_is_real_and_seeded(tmp_path, monkeypatch):
    p = parse_params(TINY)
    build_builtin_pipeline(p.model.builtin, p.image_shape, 1.0, 0).save_pretrained(tmp_path / "base")
    expected = attach(load_model(p, tmp_path / "base"), p.train.lora, seed=7)
    target = load_model(p, tmp_path / "base")

    inside, release = threading.Event(), threading.Event()
    build = SD3Transformer2DModel.from_config.__func__

    def paused(cls, *args, **kwargs):  # runs inside diffusers' process-wide init patches
        model = build(cls, *args, **kwargs)
        inside.set()
        release.wait(60)
        return model

    monkeypatch.setattr(SD3Transformer2DModel, "from_config", classmethod(paused))
    loaded, attached = {}, {}
    loader = threading.Thread(target=lambda: loaded.update(model=load_model(p, tmp_path / "base")))
    loader.start()
    assert inside.wait(60), "the load never reached the model build"
    other = threading.Thread(target=lambda: attached.update(state=attach(target, p.train.lora, seed=7)))
    other.start()
    other.join(3)
    waited = other.is_alive()  # the attach waits for the build in progress
    release.set()
    loader.join(60)
    other.join(60)

    assert waited, "a LoRA was attached while another thread was inside a model build"
    state = attached["state"]
    assert not any(v.is_meta for v in state.values())
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    assert not any(v.is_meta for v in loaded["model"].transformer.parameters())
