"""Training state: restored onto its parameters' devices, fallback past a truncated checkpoint, explicit seeds,
no-signal groups, optimiser and memory options."""

import importlib.util
import threading
import warnings
from pathlib import Path

import pytest
import torch

from gdro_core.models.lora import lora_state
from gdro_core.objectives.implicit_reward import ranking_counts
from gdro_core.objectives.offline import group_objective
from gdro_core.training.checkpoint import checkpoints, load_checkpoint, to_devices
from gdro_core.training.loop import make_optimizer, start_training, train
from training_fixtures import tiny_data, tiny_model

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _cfg(p, **update):
    return p.train.model_copy(update=update)


def _run(p, ckpt, **update):
    logs = {}
    data, rewards = tiny_data(p)
    ema = train(tiny_model(p), data, rewards, _cfg(p, **update), ckpt, lambda s, m: logs.__setitem__(s, m))
    return logs, ema


# --- devices ------------------------------------------------------------------------------------------------------

def test_to_devices_places_each_tensor_by_key():
    tensors = {"lora.a": torch.ones(2), "ema.a": torch.zeros(2)}
    by_key = to_devices(tensors, {"lora.a": torch.device("meta"), "ema.a": torch.device("cpu")})
    assert by_key["lora.a"].device.type == "meta" and by_key["ema.a"].device.type == "cpu"
    assert all(v.device.type == "meta" for v in to_devices(tensors, lambda k: torch.device("meta")).values())
    assert all(v.device.type == "meta" for v in to_devices(tensors, "meta").values())
    with pytest.raises(KeyError, match="no device given"):
        to_devices(tensors, {"lora.a": torch.device("cpu")})


def test_load_checkpoint_maps_weights_to_the_given_devices(tiny_params, tmp_path):
    _run(tiny_params, tmp_path, steps=2)
    path = checkpoints(tmp_path)[-1]
    weights, state = load_checkpoint(path, map_location=lambda k: torch.device("meta" if k.startswith("ema.") else "cpu"))
    assert {v.device.type for k, v in weights.items() if k.startswith("ema.")} == {"meta"}
    assert {v.device.type for k, v in weights.items() if k.startswith("lora.")} == {"cpu"}
    assert state["step"] == 2


@pytest.mark.parametrize("device", DEVICES)
def test_resumed_state_sits_on_the_device_of_its_parameters(tiny_params, tmp_path, device):
    p = tiny_params
    _run(p, tmp_path, steps=2)
    model = tiny_model(p)
    model.transformer.to(device)
    model.device = torch.device(device)
    params, opt, _, _, ema, start = start_training(model, _cfg(p), tmp_path)
    assert start == 2
    live = lora_state(model.transformer)  # the adapter's parameters, under the EMA's keys
    assert ema.shadow.keys() == live.keys()
    for k, v in ema.shadow.items():
        assert v.device == live[k].device, k
    for q in params:
        assert all(s.device == q.device for s in opt.state[q].values() if torch.is_tensor(s) and s.dim() > 0)
    assert {v.device.type for v in ema.shadow.values()} == {torch.device(device).type}


# --- checkpoints --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("part", ["weights.safetensors", "state.pt"])
def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(tiny_params, tmp_path, one_thread, part):
    p = tiny_params  # steps 4, checkpoint_every 2: step-2 and step-4 are kept
    _, full = _run(p, tmp_path / "full")
    _run(p, tmp_path / "cut", steps=3)  # step-2 and step-3 on disk
    newest = checkpoints(tmp_path / "cut")[-1] / part
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with pytest.warns(UserWarning, match=r"step-0000003.*unreadable.*falling back"):
        logs, resumed = _run(p, tmp_path / "cut")
    assert min(logs) == 3  # resumed after step 2
    for k in full:
        assert torch.allclose(full[k], resumed[k], atol=1e-6), k


def test_a_changed_global_batch_cannot_resume(tiny_params, tmp_path):
    _run(tiny_params, tmp_path, steps=2)
    with pytest.raises(ValueError, match=r"global batch of 2 groups per step.*groups_per_step is 1"):
        _run(tiny_params, tmp_path, groups_per_step=1)


# --- randomness ---------------------------------------------------------------------------------------------------

def _lora_a(p, seed):
    model = tiny_model(p)
    start_training(model, _cfg(p, seed=seed), Path("/nonexistent"))
    return {n: q.detach().clone() for n, q in model.transformer.named_parameters() if "lora_A" in n}


def test_the_lora_init_follows_train_seed_and_not_the_global_rng(tiny_params):
    torch.manual_seed(1)
    a = _lora_a(tiny_params, 0)
    torch.manual_seed(2)
    b = _lora_a(tiny_params, 0)
    c = _lora_a(tiny_params, 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a)


def test_two_runs_in_parallel_threads_equal_each_run_alone(tiny_params, tmp_path, one_thread):
    p = tiny_params
    configs = {"a": {"seed": 0, "beta": 6.0}, "b": {"seed": 1, "beta": 24.0}}
    alone = {name: _run(p, tmp_path / f"alone-{name}", **u) for name, u in configs.items()}
    data, rewards = tiny_data(p)
    models = {name: tiny_model(p) for name in configs}  # built first: the built-in init seeds the global RNG
    together, errors = {}, []

    def worker(name):
        logs = {}
        try:
            ema = train(models[name], data, rewards, _cfg(p, **configs[name]), tmp_path / f"thread-{name}",
                        lambda s, m: logs.__setitem__(s, m))
            together[name] = (logs, ema)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(n,)) for n in configs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for name in configs:
        assert together[name][0] == alone[name][0], name
        for k, v in alone[name][1].items():
            assert torch.equal(v, together[name][1][k]), (name, k)
    assert alone["a"][0][1]["train/loss"] != alone["b"][0][1]["train/loss"]


# --- ranking signal -----------------------------------------------------------------------------------------------

def test_ranking_counts_skip_groups_whose_rewards_are_all_equal():
    s = torch.tensor([[3.0, 2.0, 1.0], [0.0, 5.0, 1.0]])
    rewards = torch.tensor([[1.0, 0.5, 0.0], [0.2, 0.2, 0.2]])
    assert ranking_counts(s, rewards) == (3.0, 3.0)
    assert ranking_counts(s, torch.tensor([[1.0, 0.0, 0.5], [0.2, 0.2, 0.2]])) == (2.0, 3.0)
    assert ranking_counts(s, torch.full((2, 3), 0.7)) == (0.0, 0.0)


def test_all_equal_rewards_warn_once_and_log_no_ranking_accuracy(tiny_params, tmp_path):
    p = tiny_params
    data, rewards = tiny_data(p)
    logs = {}
    with pytest.warns(UserWarning, match=r"3 of 3 prompts have the same reward for all 4 images") as caught:
        train(tiny_model(p), data, torch.full_like(rewards, 0.5), _cfg(p), tmp_path / "flat",
              lambda s, m: logs.__setitem__(s, m))
    assert sum("same reward" in str(w.message) for w in caught) == 1
    assert logs and all("train/ranking_accuracy" not in m for m in logs.values())
    assert all(v == v for m in logs.values() for v in m.values())  # no NaN anywhere
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # distinct rewards: no warning
        ranked = _run(p, tmp_path / "ranked")[0]
    assert all(0.0 <= m["train/ranking_accuracy"] <= 1.0 for m in ranked.values())


# --- optimiser and memory options ---------------------------------------------------------------------------------

def test_fused_adamw_is_built_and_8bit_needs_bitsandbytes(tiny_params):
    params = [torch.nn.Parameter(torch.ones(3))]
    assert make_optimizer(params, _cfg(tiny_params, optimizer="adamw_fused")).defaults["fused"] is True
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ImportError, match=r"needs bitsandbytes.*pip install bitsandbytes.*'adamw'"):
            make_optimizer(params, _cfg(tiny_params, optimizer="adamw_8bit"))
    else:
        assert type(make_optimizer(params, _cfg(tiny_params, optimizer="adamw_8bit"))).__name__ == "AdamW8bit"


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_params, tmp_path):
    p = tiny_params
    data, rewards = tiny_data(p)
    out = []
    for checkpointing in (False, True):
        model = tiny_model(p)
        params, *_ = start_training(model, _cfg(p, gradient_checkpointing=checkpointing), tmp_path / "none")
        model.transformer.train()
        assert model.transformer.is_gradient_checkpointing is checkpointing
        loss, _ = group_objective(model, data.latents[:2, :3], {k: v[:2] for k, v in data.cond.items()},
                                  rewards[:2, :3], _cfg(p), torch.Generator().manual_seed(0))
        loss.backward()
        out.append((loss.item(), [q.grad.clone() for q in params]))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(out[0][1], out[1][1]))


def test_bf16_weights_train_fp32_adapters(tiny_params, tmp_path):
    p = tiny_params
    model = tiny_model(p)
    model.transformer.to(torch.bfloat16)
    model.dtype = torch.bfloat16
    data, rewards = tiny_data(p)
    logs = {}
    ema = train(model, data, rewards, _cfg(p, steps=2), tmp_path, lambda s, m: logs.__setitem__(s, m))
    dtypes = {n: q.dtype for n, q in model.transformer.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    assert {v.dtype for v in ema.values()} == {torch.float32}
    assert all(torch.isfinite(torch.tensor(v)) for m in logs.values() for v in m.values())


def test_allow_tf32_turns_tf32_matmuls_on(tiny_params, tmp_path):
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        _run(tiny_params, tmp_path, steps=1, allow_tf32=True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
