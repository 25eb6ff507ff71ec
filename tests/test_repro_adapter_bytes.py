"""The same adapter weights give the same file bytes in any process (safetensors metadata order, peft's sets)."""

import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from gdro_core.data.store import sha256_file

SAVE = """
import sys
from conftest import TINY
from gdro_core.params import parse_params
from gdro_core.models.families import add_lora, save_adapter
from training_fixtures import tiny_model
p = parse_params(TINY)
model = tiny_model(p)
add_lora(model.transformer, p.train.lora)
print(save_adapter(model.transformer, __import__("pathlib").Path(sys.argv[1])))
"""


def test_an_adapter_saved_in_two_processes_has_the_same_bytes(tmp_path):
    tests = Path(__file__).parent
    files = []
    for seed in ("1", "2"):  # string hashing (and so set and hash-map order) differs between these processes
        env = {**os.environ, "PYTHONHASHSEED": seed,
               "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent), os.environ.get("PYTHONPATH", "")])}
        out = subprocess.run([sys.executable, "-c", SAVE, str(tmp_path / seed)], env=env, capture_output=True,
                             text=True, cwd=tests)
        assert out.returncode == 0, out.stderr[-2000:]
        files.append(Path(out.stdout.strip().splitlines()[-1]))
    assert sha256_file(files[0]) == sha256_file(files[1])
    assert load_file(files[0]).keys() == load_file(files[1]).keys()
