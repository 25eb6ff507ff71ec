"""Which stages an edit reruns, measured on a finished workspace (after `make demo` or `dvc repro`).

For each file: append a comment, let `check` rewrite the code hashes (`dvc repro check`), ask `dvc status` which
stages changed, then restore the file (and the hashes). Prints a Markdown table; nothing else is rerun.

    python benchmarks/rerun_table.py                      # the files below, in this project
    python benchmarks/rerun_table.py gdro_core/x.py ...   # other files
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gdro_core.stages import STAGE_NAMES  # noqa: E402

FILES = (
    "gdro_core/evaluation/vlm_judge.py",
    "gdro_core/tasks/geneval/rules.py",
    "gdro_core/tasks/ocr/reward.py",
    "gdro_core/tasks/registry.py",
    "gdro_core/tracking/registry.py",
    "gdro_core/objectives/group_loss.py",
    "gdro_core/data/fanout.py",
    "gdro_core/models/sampling.py",
)


def dvc(*args: str, root: Path) -> str:
    out = subprocess.run([Path(sys.executable).parent / "dvc", *args], cwd=root, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"dvc {' '.join(args)} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return out.stdout


def stale(root: Path) -> list[str]:
    dvc("repro", "check", root=root)
    changed = json.loads(dvc("status", "--json", "dvc.yaml", root=root) or "{}")
    return [s for s in STAGE_NAMES if s in changed]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", default=list(FILES))
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="the finished workspace (default: here)")
    args = parser.parse_args(argv)
    before = stale(args.root)
    if before:
        raise SystemExit(f"the workspace is not up to date ({', '.join(before)} changed): run `dvc repro` first")
    print("| edited | stages it reruns |\n|---|---|")
    for rel in args.files:
        path = args.root / rel
        text = path.read_text()
        try:
            path.write_text(text + "\n# edited\n")
            reruns = stale(args.root)
        finally:
            path.write_text(text)
        print(f"| `{rel}` | {', '.join(reruns) or 'none'} |", flush=True)
    stale(args.root)  # the hashes of the restored code


if __name__ == "__main__":
    main()
