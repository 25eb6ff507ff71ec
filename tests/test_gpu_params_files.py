"""The shipped paper-setting params files validate against their family (only the checkpoint path is the user's)."""

import pytest

from conftest import ROOT
from gdro_core.models import ModelError, check_image_size
from gdro_core.models.tiny import save_tiny_pipeline
from gdro_core.params import load_params


@pytest.mark.parametrize("name, variant", [("params-flux1-dev-ocr.yaml", "flux-dev"),
                                           ("params-sd35-medium-ocr.yaml", "sd35")])
def test_paper_settings_load_for_their_family(tmp_path, name, variant):
    source = save_tiny_pipeline(variant, tmp_path / variant)
    p = load_params(ROOT / name, {"model.source": str(source)})
    assert (p.world.height, p.world.width, p.rollout.images_per_prompt, p.train.group_size) == (512, 512, 16, 6)
    assert (p.train.beta, p.train.gamma, p.train.tau, p.train.lora.rank) == (12.0, 0.5, 0.05, 32)
    assert (p.train.ema_rate, p.train.ema_max_decay, p.model.dtype) == (0.001, 0.5, "bfloat16")
    with pytest.raises(ModelError, match="16"):  # a size the family cannot take is named at load
        check_image_size(load_params(ROOT / name, {"model.source": str(source), "world.height": 500}))
