"""Offline training keeps only the transformer on the device: prompts are encoded before the encoders leave."""

import pytest
import torch

from gdro_core.evaluation.heldout import generate
from gdro_core.tasks.ocr.prompts import OcrPrompt
from gdro_core.models.offload import PreEncoded, offload_unused
from training_fixtures import tiny_model


def test_offloaded_encoders_are_never_called_again(tiny_params):
    model = tiny_model(tiny_params)
    prompts = [OcrPrompt(prompt='"123" on a sign', target="123"), OcrPrompt(prompt='"456" on a wall', target="456")]
    before = generate(model, prompts, per_prompt=1, base_seed=0, steps=2, guidance=1.0, batch_size=4)
    view = PreEncoded(model, [p.prompt for p in prompts])
    assert offload_unused(model, "meta") == ["text_encoder"]  # on "meta" any further encoder call would fail
    assert model.pipe.text_encoder.device.type == "meta"
    after = generate(view, prompts, per_prompt=1, base_seed=0, steps=2, guidance=1.0, batch_size=4)
    assert [list(a.getdata()) for a in after] == [list(b.getdata()) for b in before]
    with pytest.raises(ValueError, match="not encoded before"):
        view.encode(['"789" as a label'])


class _Vae(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1, device="meta"))


class _Pipe:
    vae = _Vae()


class _Model:
    pipe = _Pipe()
    seen = None

    def encode(self, prompts):
        return {"pooled_projections": torch.zeros(len(prompts), 2)}

    def decode(self, latents):
        self.seen = latents.device
        return []


def test_decoding_runs_on_the_vae_device():
    model = _Model()
    PreEncoded(model, ["a"]).decode(torch.zeros(1, 4))
    assert model.seen.type == "meta"
