"""params.yaml validation: every bad key is named."""

from pathlib import Path

import pytest

from gdro_core.params import ParamsError, check_train_eval_seeds, load_params, parse_params, round_params

ROOT = Path(__file__).resolve().parents[1]


def test_repository_params_are_valid():
    p = load_params(ROOT / "params.yaml")
    assert p.train.objective == "gdro" and p.train.group_size <= p.rollout.images_per_prompt


def test_code_defaults_are_the_repository_params():
    # a key left out of a params file means what params.yaml documents; only the sweep section is an example
    shipped = load_params(ROOT / "params.yaml").model_dump()
    defaults = parse_params({}).model_dump()
    assert shipped.pop("sweep")["grid"] and not defaults.pop("sweep")["grid"]
    assert defaults == shipped


def test_unknown_key_is_named():
    with pytest.raises(ParamsError, match=r"unknown key 'train.betta'"):
        parse_params({"train": {"betta": 1.0}})


def test_wrong_type_is_named():
    with pytest.raises(ParamsError, match=r"'train.beta'"):
        parse_params({"train": {"beta": "big"}})


def test_bad_choice_is_named():
    with pytest.raises(ParamsError, match=r"'reward.backend'"):
        parse_params({"reward": {"backend": "tesseract"}})


def test_group_larger_than_pool_is_rejected():
    with pytest.raises(ParamsError, match="group_size"):
        parse_params({"train": {"group_size": 8}, "rollout": {"images_per_prompt": 4}})


def test_template_without_quoted_placeholder_is_rejected():
    with pytest.raises(ParamsError, match="placeholder"):
        parse_params({"prompts": {"templates": ["a sign saying {text}"]}})


def test_overrides_use_dotted_keys(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("train:\n  beta: 3.0\n")
    assert load_params(f, {"train.beta": 6.0, "rollout.seed": 7}).train.beta == 6.0


def test_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_a_tab_in_params_yaml_names_the_file_the_line_and_the_fix(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  beta: 6\n\tgamma: 0.5\n")
    with pytest.raises(ParamsError, match=r"params.yaml line 3, column 1 .*indent with spaces"):
        load_params(bad)


def test_a_section_or_key_written_twice_is_refused_with_both_lines_not_silently_replaced(tmp_path):
    """PyYAML keeps the last of two equal keys (DVC refuses the file): a `train:` added at the bottom would have reset
    every train setting above it to its default without a word."""
    f = tmp_path / "params.yaml"
    f.write_text("train:\n  beta: 6\n  group_size: 4\nsampler:\n  steps: 10\ntrain:\n  lr: 0.001\n")
    with pytest.raises(ParamsError, match=r"params.yaml line 6, column 1 .*'train' appears twice, first at line 1\)"
                                          r": .*merge them into one"):
        load_params(f)
    f.write_text("train:\n  beta: 6\n  beta: 7\n")
    with pytest.raises(ParamsError, match=r"line 3, column 3 .*'beta' appears twice, first at line 2"):
        load_params(f)
    f.write_text("x-defaults: &d\n  beta: 6\n  gamma: 0.5\ntrain:\n  <<: *d\n  beta: 7\n")  # a merge key's own
    with pytest.raises(ParamsError, match="unknown key 'x-defaults'"):  # override is no duplicate: only the anchor's
        load_params(f)  # section itself is refused, as any unknown key


def test_params_saved_with_a_byte_order_mark_load_and_another_encoding_is_named(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_bytes("\ufefftrain:\n  beta: 7.0\n".encode("utf-8"))
    assert load_params(f).train.beta == 7.0
    f.write_bytes("train:\n  beta: 7.0\n# caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ParamsError, match=r"params.yaml:3: not UTF-8 text \(byte 0xe9\): save the file as UTF-8"):
        load_params(f)


def test_an_override_below_a_value_names_the_key_instead_of_crashing(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("train:\n  beta: 3.0\n")
    with pytest.raises(ParamsError, match=r"cannot set 'train.beta.x': 'train.beta' is a value \(3.0\)"):
        load_params(f, {"train.beta.x": 1})
    with pytest.raises(ParamsError, match=r"unknown key 'train.betta'"):
        load_params(f, {"train.betta": 1})


@pytest.mark.parametrize("source", ["/home/me/ocr", "../ocr", "prompt_files/../../ocr", "ocr", "prompt_files"])
def test_a_prompt_source_dvc_cannot_track_is_refused(source):
    with pytest.raises(ParamsError, match=r"'prompts.source'.*under prompt_files/.*copy your train.txt"):
        parse_params({"prompts": {"source": source}})


def test_a_prompt_source_under_prompt_files_is_accepted():
    assert parse_params({"prompts": {"source": "prompt_files/ocr"}}).prompts.source == "prompt_files/ocr"


def test_the_training_prompt_evaluation_refuses_seeds_a_rollout_drew():
    p = parse_params({"rollout": {"seed": 1000, "images_per_prompt": 8}, "evaluate": {"images_per_prompt": 2}})
    check_train_eval_seeds(p, n_train=64, round=1)  # 9000.. misses 1000..1511
    clash = p.model_copy(update={"evaluate": p.evaluate.model_copy(update={"train_seed": 1500})})
    with pytest.raises(ParamsError, match=r"evaluate.train_seed \(1500\) reuses round 1's rollout seeds \(1000..1511\)"):
        check_train_eval_seeds(clash, n_train=64, round=1)
    # round 2 draws from rollout.seed + rounds.seed_offset: a seed there clashes only once round 2 has run
    later = p.model_copy(update={"evaluate": p.evaluate.model_copy(update={"train_seed": 1_001_100})})
    check_train_eval_seeds(later, n_train=64, round=1)
    with pytest.raises(ParamsError, match="round 2's rollout seeds"):
        check_train_eval_seeds(round_params(later, 2), n_train=64, round=2)


def test_stage_threads_default_to_one_unless_told(monkeypatch):
    from gdro_core.params import stage_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert stage_threads(0) == 1  # never torch's every-core default, which thrashes a loaded machine
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert stage_threads(0) == 3 and stage_threads(2) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "many")
    assert stage_threads(0) == 1


def test_a_yes_no_value_is_not_taken_for_a_number():
    """pydantic reads ``true`` as 1: ``train.steps: yes`` would have trained one step and ``train.lr: true`` at 1.0."""
    for section, key in (("train", "steps"), ("train", "lr"), ("evaluate", "bootstrap_samples")):
        with pytest.raises(ParamsError, match=rf"'{section}\.{key}': a yes/no value is not a number"):
            parse_params({section: {key: True}})
    assert parse_params({"train": {"steps": 3}}).train.steps == 3
