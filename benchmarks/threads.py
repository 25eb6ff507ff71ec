"""Torch threads per stage process: pretraining and sampling steps per second with 1, 2, ... threads.

Runs the built-in model's pretraining (``gdro_core.training.pretrain.pretrain``) and the rollout sampler for a few
steps at each thread count, in fresh subprocesses so no thread pool carries over, and prints wall and CPU seconds
per step side by side with the machine's load. Run it on a quiet machine, then beside other work (e.g. another
copy of itself) to see what a loaded machine does to each count; the default ``scale.threads`` comes from it::

    python benchmarks/threads.py                       # 1 and 2 threads, default params
    python benchmarks/threads.py --threads 1 2 4 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, random, resource, sys, tempfile, time
from pathlib import Path
import torch
torch.set_num_threads(int(sys.argv[1]))
from gdro_core.evaluation.heldout import generate
from gdro_core.models.builtin import BuiltinModelAdapter, build_builtin_pipeline
from gdro_core.params import load_params
from gdro_core.tasks.registry import caption_words, make_task
from gdro_core.training.pretrain import pretrain

p = load_params(sys.argv[3])
steps = int(sys.argv[2])
cfg = p.pretrain.model_copy(update={"steps": steps, "checkpoint_every": steps + 1, "log_every": steps + 1})
pipe = build_builtin_pipeline(p.model.builtin, p.image_shape, p.sampler.shift, 0, words=caption_words(p))
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
t0, c0 = time.perf_counter(), cpu()
pretrain(pipe, p.image_shape[:2], make_task(p).pretrain_batch, cfg, Path(tempfile.mkdtemp()), lambda *a: None)
t1, c1 = time.perf_counter(), cpu()
model = BuiltinModelAdapter(pipe, p.image_shape[:2])
records = make_task(p).make_prompt_sets()["test"][: p.sampler.batch_size]
with torch.no_grad():
    generate(model, records, 1, 0, p.sampler.steps, p.sampler.guidance, p.sampler.batch_size)
t2, c2 = time.perf_counter(), cpu()
print(json.dumps({"pretrain_wall": (t1 - t0) / steps, "pretrain_cpu": (c1 - c0) / steps,
                  "sample_wall": t2 - t1, "sample_cpu": c2 - c1}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=10, help="pretraining steps timed at each count")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    root = Path(__file__).resolve().parents[1]
    rows = []
    for n in args.threads:
        load = os.getloadavg()[0]
        env = {**os.environ, "OMP_NUM_THREADS": str(n), "PYTHONPATH": str(root)}
        with tempfile.TemporaryDirectory() as tmp:
            out = subprocess.run([sys.executable, "-c", CHILD, str(n), str(args.steps), str(root / args.params)],
                                 env=env, cwd=tmp, capture_output=True, text=True, check=True)
        rows.append({"threads": n, "load_1min": load, **json.loads(out.stdout.strip().splitlines()[-1])})
    base = rows[0]
    print(f"{'threads':>7} {'load':>5} {'pretrain s/step wall':>21} {'cpu':>6} {'ratio':>6} "
          f"{'sample s wall':>14} {'cpu':>6} {'ratio':>6}")
    for r in rows:
        print(f"{r['threads']:>7} {r['load_1min']:>5.1f} {r['pretrain_wall']:>21.3f} {r['pretrain_cpu']:>6.3f} "
              f"{base['pretrain_wall'] / r['pretrain_wall']:>6.2f} {r['sample_wall']:>14.2f} {r['sample_cpu']:>6.2f} "
              f"{base['sample_wall'] / r['sample_wall']:>6.2f}")
    print("ratio: speed-up over the first thread count (wall); load: 1-minute load average before each run")


if __name__ == "__main__":
    main()
