"""The model rewards (clip_score, pickscore, aesthetic, vlm) on tiny random-weight checkpoints saved to local
directories: each built by name and in a weighted sum, each equal to the formula computed here with transformers
directly, batch size not changing a value, incomplete directories refused in one line before any stage, and VLM
answers without scores counted as errors, never fatal."""

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image
from test_vlm_judge import tiny_judge_dir  # noqa: F401 - the tiny Qwen2.5-VL judge checkpoint fixture
from tiny_clip import save_tiny_clip, save_tiny_clip_processor

from gdro_core import preflight
from gdro_core.data.scoring import ScoringError, check_errors
from gdro_core.evaluation.vlm_judge import UnifiedRewardJudge
from gdro_core.params import parse_params
from gdro_core.rewards.base import RewardError
from gdro_core.rewards.registry import BUILTIN, make_reward, task_reward
from gdro_core.rewards.vlm import VlmReward

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red apple", "a dog in fog", "a red apple", "an owl at night", "a cat"]


@dataclass(frozen=True)
class Rec:
    prompt: str
    target: str = ""


RECORDS = [Rec(p) for p in PROMPTS]


def images(n=5):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40 + 4 * i, 48, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward-models")
    save_tiny_clip(root / "clip")
    save_tiny_clip(root / "pick", seed=1, processor=False)  # PickScore: model and processor in separate dirs
    save_tiny_clip_processor(root / "pick-processor")
    save_tiny_clip(root / "clip-l14", projection_dim=768, seed=2)  # the aesthetic head reads 768-d embeddings
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(root / "pick")
    model.logit_scale.data.fill_(math.log(100.0))  # PickScore's learnt temperature is about 100
    model.save_pretrained(root / "pick", safe_serialization=True)
    torch.manual_seed(3)
    head = {}
    for i, (a, b) in zip((0, 2, 4, 6, 7), ((768, 1024), (1024, 128), (128, 64), (64, 16), (16, 1))):
        head[f"layers.{i}.weight"] = torch.randn(b, a) / math.sqrt(a)
        head[f"layers.{i}.bias"] = torch.randn(b)
    from safetensors.torch import save_file

    save_file(head, root / "head.safetensors")
    torch.save(head, root / "head.pth")
    return root


def options(dirs, batch_size=2):
    return {
        "clip_score": {"model_dir": str(dirs / "clip"), "batch_size": batch_size, "device": "cpu"},
        "pickscore": {"model_dir": str(dirs / "pick"), "processor_dir": str(dirs / "pick-processor"),
                      "batch_size": batch_size, "device": "cpu"},
        "aesthetic": {"clip_dir": str(dirs / "clip-l14"), "head_path": str(dirs / "head.safetensors"),
                      "batch_size": batch_size, "device": "cpu"},
    }


def build(name, opts):
    return make_reward(name, parse_params({"rewards": {"weights": {name: 1.0}, "options": {name: opts}}}))


def features(out):
    """``get_*_features`` returns the tensor (transformers 4) or an output whose pooler_output it is (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def by_hand(model_dir, processor_dir, imgs, prompts):
    """Cosine of image and prompt CLIP embeddings as CLIP's (and PickScore's) reference code computes them:
    the processor, get_image_features / get_text_features, L2 norms; one image and its prompt at a time."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(model_dir).eval()
    processor = CLIPProcessor.from_pretrained(processor_dir)
    out = []
    with torch.no_grad():
        for im, prompt in zip(imgs, prompts):
            e_i = features(model.get_image_features(**processor(images=[im.convert("RGB")], return_tensors="pt")))
            text = processor(text=[prompt], padding=True, truncation=True, max_length=64, return_tensors="pt")
            e_t = features(model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"]))
            e_i, e_t = e_i / e_i.norm(dim=-1, keepdim=True), e_t / e_t.norm(dim=-1, keepdim=True)
            out.append((e_t @ e_i.T)[0, 0].item())
    return np.array(out), model.logit_scale.exp().item()


def test_clip_score_is_torchmetrics_clipped_100_cosine(dirs):
    reward = build("clip_score", options(dirs)["clip_score"])
    table = reward.score(images(), RECORDS)
    cosine, _ = by_hand(dirs / "clip", dirs / "clip", images(), PROMPTS)
    assert list(table.columns) == ["reward", "cosine", "error"] and (table["error"] == "").all()
    assert table["cosine"].to_numpy() == pytest.approx(cosine, abs=1e-5)
    assert table["reward"].to_numpy() == pytest.approx(np.maximum(100 * cosine, 0), abs=1e-3)
    assert len(set(np.round(cosine, 6))) == len(PROMPTS)  # the images differ, so their scores do


def test_pickscore_is_its_temperature_times_the_cosine(dirs):
    reward = build("pickscore", options(dirs)["pickscore"])
    table = reward.score(images(), RECORDS)
    cosine, scale = by_hand(dirs / "pick", dirs / "pick-processor", images(), PROMPTS)
    assert scale == pytest.approx(100.0)
    assert table["cosine"].to_numpy() == pytest.approx(cosine, abs=1e-5)
    assert table["reward"].to_numpy() == pytest.approx(scale * cosine, abs=1e-3)
    assert (table["reward"] < 0).any()  # not clipped, unlike clip_score


def test_aesthetic_is_the_mlp_head_of_the_unit_image_embedding(dirs):
    from safetensors.torch import load_file
    from transformers import CLIPModel, CLIPProcessor

    table = build("aesthetic", options(dirs)["aesthetic"]).score(images(), RECORDS)
    model = CLIPModel.from_pretrained(dirs / "clip-l14").eval()
    processor = CLIPProcessor.from_pretrained(dirs / "clip-l14")
    head = load_file(dirs / "head.safetensors")
    with torch.no_grad():
        e = features(model.get_image_features(**processor(images=[im.convert("RGB") for im in images()],
                                                          return_tensors="pt")))
        x = e / torch.linalg.vector_norm(e, dim=-1, keepdim=True)
        for i in (0, 2, 4, 6, 7):  # no activations; dropout is off when scoring
            x = x @ head[f"layers.{i}.weight"].T + head[f"layers.{i}.bias"]
    assert list(table.columns) == ["reward", "error"]
    assert table["reward"].to_numpy() == pytest.approx(x[:, 0].numpy(), abs=1e-4)
    pth = build("aesthetic", {**options(dirs)["aesthetic"], "head_path": str(dirs / "head.pth")})
    assert pth.score(images(), RECORDS)["reward"].to_numpy() == pytest.approx(table["reward"].to_numpy(), abs=1e-6)


@pytest.mark.parametrize("name", ["clip_score", "pickscore", "aesthetic"])
def test_batch_size_does_not_change_the_values(dirs, name):
    one = build(name, options(dirs, batch_size=1)[name]).score(images(), RECORDS)
    steps = []
    five = build(name, options(dirs, batch_size=5)[name]).score(images(), RECORDS, lambda d, n: steps.append((d, n)))
    three = build(name, options(dirs, batch_size=3)[name]).score(images(), RECORDS)
    assert five["reward"].to_numpy() == pytest.approx(one["reward"].to_numpy(), abs=1e-4)
    assert three["reward"].to_numpy() == pytest.approx(one["reward"].to_numpy(), abs=1e-4)
    assert steps == [(5, 5)]


def scripted(answers):
    class Scripted(UnifiedRewardJudge):
        def answer(self, image, prompt):
            item = next(answers)
            if isinstance(item, Exception):
                raise item
            return item

    return Scripted(None, None, 8)


FULL = "Alignment Score (1-5): 4\nCoherence Score (1-5): 5\nStyle Score (1-5): 2.5"
NO_STYLE = "Alignment Score (1-5): 2\nCoherence Score (1-5): 3"


def test_vlm_reward_is_the_mean_of_the_chosen_dimensions_and_missing_answers_count():
    answers = [FULL, NO_STYLE, "I cannot judge this image.", RuntimeError("CUDA error: device-side assert"),
               "Alignment Score (1-5): 9\nCoherence Score (1-5): 1\nStyle Score (1-5): 1"]
    reward = VlmReward("", judge=scripted(iter(answers)))
    table = reward.score(images(), RECORDS)
    assert list(table.columns) == ["reward", "alignment", "coherence", "style", "error"]
    assert table["reward"].tolist() == pytest.approx([11.5 / 3, 0.0, 0.0, 0.0, 7 / 3])  # 9 is clipped to 5
    assert table["alignment"].tolist()[:2] == [4.0, 2.0] and math.isnan(table["style"][1])
    errors = table["error"].tolist()
    assert errors[0] == errors[4] == ""
    assert errors[1].startswith("judge answer lacks ['style'] scores")
    assert errors[2].startswith("judge answer lacks ['alignment', 'coherence', 'style'] scores")
    assert errors[3] == "judge failed: RuntimeError: CUDA error: device-side assert"
    assert check_errors(table, 0.6) == 3
    with pytest.raises(ScoringError, match="3 of 5 images"):
        check_errors(table, 0.5)
    two = VlmReward("", dimensions=["alignment", "coherence"], judge=scripted(iter(answers))).score(images(), RECORDS)
    assert two["reward"].tolist() == pytest.approx([4.5, 2.5, 0.0, 0.0, 3.0])  # no style needed: NO_STYLE scores


def test_every_reward_by_name_and_in_a_weighted_sum_with_a_vlm_that_never_answers(dirs, tiny_judge_dir):  # noqa: F811
    opts = {**options(dirs), "vlm": {"model_path": str(tiny_judge_dir), "max_new_tokens": 8, "device": "cpu"}}
    weights = {"clip_score": 0.5, "pickscore": 0.25, "aesthetic": 2.0, "vlm": 1.0}
    p = parse_params({"rewards": {"weights": weights, "options": opts}})
    assert preflight.problems(p, dirs) == []
    alone = {n: make_reward(n, p).score(images(2), RECORDS[:2]) for n in weights}
    assert all(BUILTIN[n].endswith(type(make_reward(n, p)).__name__) for n in ("clip_score", "vlm"))
    table = task_reward(p, own=None).score(images(2), RECORDS[:2])
    for n in weights:
        assert table[n].to_numpy() == pytest.approx(alone[n]["reward"].to_numpy(), abs=1e-5)
    assert table["reward"].to_numpy() == pytest.approx(sum(w * table[n].to_numpy() for n, w in weights.items()))
    assert (table["vlm"] == 0).all()  # a random tiny VLM answers without scores: counted, not fatal
    assert all(e.startswith("vlm: judge answer lacks") for e in table["error"])
    assert "clip_score.cosine" in table and "pickscore.cosine" in table and "vlm.alignment" in table
    with pytest.raises(ScoringError, match="2 of 2 images"):
        check_errors(table, 0.5)


def one_line(lines):
    assert all("\n" not in line for line in lines)
    return lines


def test_preflight_names_a_missing_or_incomplete_directory_in_one_line(dirs, tmp_path):
    opts = options(dirs)
    opts["clip_score"]["model_dir"] = str(tmp_path / "absent")
    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / "config.json").write_text("{}")
    opts["pickscore"]["processor_dir"] = str(tmp_path / "no-weights")
    opts["aesthetic"]["head_path"] = str(tmp_path / "head.safetensors")
    opts["vlm"] = {"model_path": str(tmp_path / "no-weights")}
    p = parse_params({"rewards": {"weights": dict.fromkeys(opts, 1.0), "options": opts}})
    problems = one_line(preflight.problems(p, tmp_path))
    assert problems == [
        (f"rewards.options.clip_score: model_dir: no directory {tmp_path / 'absent'} (a CLIP checkpoint (config.json, "
         "*.safetensors, tokenizer and image processor)); download it there first (nothing is fetched at run time)"),
        (f"rewards.options.pickscore: processor_dir: {tmp_path / 'no-weights'} is incomplete (the CLIP-H/14 processor "
         "(tokenizer and image processor files)): no preprocessor_config.json or processor_config.json or "
         "image_processor_config.json"),
        (f"rewards.options.pickscore: processor_dir: {tmp_path / 'no-weights'} is incomplete (the CLIP-H/14 processor "
         "(tokenizer and image processor files)): no tokenizer.json or tokenizer_config.json or vocab.json or "
         "spiece.model or tokenizer.model"),
        (f"rewards.options.aesthetic: head_path: no file {tmp_path / 'head.safetensors'} (the aesthetic predictor's "
         "MLP weights); download it there first (nothing is fetched at run time)"),
        (f"rewards.options.vlm: model_path: {tmp_path / 'no-weights'} is incomplete (the UnifiedReward-style VLM): no "
         "*.safetensors or *.safetensors.index.json or *.bin or *.bin.index.json or *.pt or *.pth"),
        (f"rewards.options.vlm: model_path: {tmp_path / 'no-weights'} is incomplete (the UnifiedReward-style VLM): no "
         "preprocessor_config.json or processor_config.json or image_processor_config.json or tokenizer.json or "
         "tokenizer_config.json or vocab.json or spiece.model or tokenizer.model"),
    ]
    for name in opts:  # building the reward refuses the same, in one line
        with pytest.raises(RewardError) as err:
            build(name, opts[name])
        assert "\n" not in str(err.value) and "rewards.options." in str(err.value)


def test_weights_only_as_safetensors_and_a_required_directory(dirs, tmp_path):
    import shutil

    bin_only = tmp_path / "bin-only"
    shutil.copytree(dirs / "clip", bin_only)
    (bin_only / "model.safetensors").rename(bin_only / "pytorch_model.bin")
    p = parse_params({"rewards": {"weights": {"clip_score": 1.0}, "options": {"clip_score": {"model_dir": str(bin_only)}}}})
    [line] = preflight.problems(p, tmp_path)
    assert line.endswith("is incomplete (a CLIP checkpoint (config.json, *.safetensors, tokenizer and image processor)):"
                         " no *.safetensors or *.safetensors.index.json")
    p = parse_params({"rewards": {"weights": {"clip_score": 1.0}}})
    [line] = preflight.problems(p, tmp_path)
    assert "rewards.options.clip_score.model_dir" in line and "Field required" in line
    relative = parse_params({"rewards": {"weights": {"aesthetic": 1.0}, "options": {"aesthetic": {
        "clip_dir": "clip-l14", "head_path": "head.pth"}}}})
    assert preflight.problems(relative, dirs) == []  # paths relative to the project root


def test_a_head_of_the_wrong_shape_is_refused_in_one_line(dirs, tmp_path):
    from safetensors.torch import save_file

    save_file({"layers.0.weight": torch.zeros(4, 4)}, tmp_path / "bad.safetensors")
    with pytest.raises(RewardError, match=r"^reward 'aesthetic': .*bad.safetensors is not the aesthetic predictor's "
                                          r"MLP for a 768-d CLIP embedding") as err:
        build("aesthetic", {**options(dirs)["aesthetic"], "head_path": str(tmp_path / "bad.safetensors")})
    assert "\n" not in str(err.value)


def test_a_pth_head_that_pickles_code_is_not_run_but_refused(dirs, tmp_path):
    torch.save(torch.nn.Linear(768, 1), tmp_path / "module.pth")  # a pickled module, not a state dict of tensors
    with pytest.raises(RewardError, match=r"^reward 'aesthetic': cannot load the aesthetic head .*module.pth "
                                          r"\(UnpicklingError") as err:
        build("aesthetic", {**options(dirs)["aesthetic"], "head_path": str(tmp_path / "module.pth")})
    assert "\n" not in str(err.value)
