"""Run the offline loop on the tiny built-in model, as one rank of a `torchrun` job (used by the training tests).

Usage: python -m torch.distributed.run --standalone --nproc_per_node N distributed_train.py OUT_DIR '{"steps": 3}'
The main process writes OUT_DIR/log.json (the logged metrics per step) and OUT_DIR/ema.safetensors.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from training_fixtures import tiny_data, tiny_model  # noqa: E402

from conftest import TINY  # noqa: E402
from gdro_core.params import parse_params  # noqa: E402
from gdro_core.training.loop import make_accelerator, train  # noqa: E402


def main(out: Path, overrides: dict) -> None:
    torch.set_num_threads(1)
    p = parse_params(TINY)
    cfg = p.train.model_copy(update=overrides)
    model = tiny_model(p)
    data, rewards = tiny_data(p)
    acc = make_accelerator(model)
    logs: dict[int, dict[str, float]] = {}
    ema = train(model, data, rewards, cfg, out / f"ckpt-{acc.process_index}", lambda s, m: logs.__setitem__(s, m),
                accelerator=acc)
    if acc.is_main_process:
        (out / "log.json").write_text(json.dumps({"num_processes": acc.num_processes, "logs": logs}))
        save_file({k: v.contiguous() for k, v in ema.items()}, str(out / "ema.safetensors"))


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(sys.argv[2]))
