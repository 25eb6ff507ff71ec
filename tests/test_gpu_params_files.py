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


def test_the_sd35_geneval_file_loads_and_check_names_every_missing_path(tmp_path):
    from gdro_core import preflight

    source = save_tiny_pipeline("sd35", tmp_path / "sd35")
    p = load_params(ROOT / "params-sd35-medium-geneval.yaml", {"model.source": str(source)})
    check_image_size(p)
    assert (p.task, p.image_shape, p.train.beta, p.train.gamma, p.judge_task) == ("geneval", (512, 512, 3), 6.0, 1.0,
                                                                                 "geneval")
    assert p.geneval.detector.kind == "mask2former"
    shipped = load_params(ROOT / "params-sd35-medium-geneval.yaml")
    found = " ".join(preflight.problems(shipped, tmp_path))
    for key in ("model.source", "geneval.metadata_dir", "judge.model_path", "geneval.detector.mask2former_path",
                "geneval.detector.clip_path"):
        assert key in found, key
