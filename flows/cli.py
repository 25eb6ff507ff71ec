"""The ``gdro`` command: each subcommand runs one Prefect flow."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import yaml


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``--set train.beta=6`` pairs; values are read as YAML (numbers, booleans, lists)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects KEY=VALUE (e.g. train.beta=6), got {pair!r}")
        out[key] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from flows.pipeline import STAGES, pipeline_flow
    from gdro_core.params import ParamsError

    parser = argparse.ArgumentParser(prog="gdro", description="Offline GDRO post-training of text-to-image models.")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, e.g. --set train.beta=6 (repeatable)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in [*STAGES, "pipeline"]:
        sub.add_parser(name, help=f"run the {name} flow")
    args = parser.parse_args(argv)
    flow = pipeline_flow if args.command == "pipeline" else STAGES[args.command]
    try:
        flow(params_path=args.params, overrides=parse_overrides(args.overrides))
    except (ParamsError, ValueError, FileNotFoundError) as err:
        print(f"gdro {args.command}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
