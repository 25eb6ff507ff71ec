"""The ``gdro`` command: each subcommand runs one Prefect flow."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from gdro_core.stages import CHECK_FILE, ROUND_STAGES, STAGE_NAMES, stage


def usage_error(message: str) -> SystemExit:
    """A malformed command line: one line on stderr and exit 2, as argparse and every stage's bad params exit."""
    print(f"gdro: {message}", file=sys.stderr)
    return SystemExit(2)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``--set train.beta=6`` pairs; values are read as YAML (numbers, booleans, lists)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise usage_error(f"--set expects KEY=VALUE (e.g. train.beta=6), got {pair!r}")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise usage_error(f"--set {key}: {value!r} is not a YAML value ({getattr(err, 'problem', err)}); quote "
                             "strings and close brackets, e.g. --set train.beta=6 or --set 'sweep.grid={train.beta: [6, 12]}'")
    return out


EXTRA_COMMANDS = ("serve", "sweep", "compare", "deploy")
IMPORT = "import"
"""The stage that reads your own images and rewards (``data.source: import``), besides the default pipeline's."""
STAGES = STAGE_NAMES
"""The stages in order (gdro_core/stages.py); each is ``flows/<name>.py``'s ``<name>_flow``."""


def round_arg(value: str) -> int:
    """``--round N``: a later round, N >= 2 (round 1 is the stage without ``--round``)."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--round expects a round number >= 2, got {value!r}") from None
    if n < 2:
        raise argparse.ArgumentTypeError(
            f"--round {n}: round 1 is the default pipeline, run the stage without --round; later rounds are 2, 3, ..."
        )
    return n



def is_expected(err: BaseException) -> bool:
    """Errors the library raises on purpose (bad params, missing inputs, a held lock): one clear line, no traceback."""
    return type(err).__module__.startswith("gdro_core") or isinstance(err, (FileNotFoundError, ValueError))


class _NoTracebackForExpected(logging.Filter):
    """Prefect logs a failing run's traceback before the CLI prints the error: keep its line, drop the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and is_expected(record.exc_info[1]):
            record.msg = f"{record.getMessage()} ({type(record.exc_info[1]).__name__})"
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


def quiet_expected_errors() -> None:
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_NoTracebackForExpected())


def pipeline_flow():
    from flows.pipeline import pipeline_flow

    return pipeline_flow


def parse_grid(pairs: list[str]) -> dict[str, list[Any]]:
    """``--grid train.beta=6,12`` pairs; each comma-separated value is read as YAML."""
    out: dict[str, list[Any]] = {}
    for pair in pairs:
        key, sep, values = pair.partition("=")
        if not sep or not key or not values:
            raise usage_error(f"--grid expects KEY=V1,V2,... (e.g. train.beta=6,12), got {pair!r}")
        try:
            out[key] = [yaml.safe_load(v) for v in values.split(",")]
        except yaml.YAMLError as err:
            raise usage_error(f"--grid {key}: {values!r} holds a value that is not YAML "
                              f"({getattr(err, 'problem', err)}): quote strings and close brackets") from None
    return out


def add_server_commands(sub, common: argparse.ArgumentParser) -> None:
    serve = sub.add_parser("serve", parents=[common], help="start the Prefect and MLflow servers (Ctrl-C stops them)")
    serve.add_argument("--prefect-port", type=int, help="Prefect port (default: serve.prefect_port)")
    serve.add_argument("--mlflow-port", type=int, help="MLflow port (default: serve.mlflow_port)")
    serve.add_argument("--no-deployments", dest="deployments", action="store_false", default=None,
                       help="do not serve the pipeline and sweep deployments")
    sweep = sub.add_parser("sweep", parents=[common], help="train + evaluate a grid of configs on the cached rollouts")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                       help="sweep a param over values, e.g. --grid train.beta=6,12 (repeatable; replaces sweep.grid "
                            "and sweep.configs)")
    sweep.add_argument("--name", help="sweep name (default: sweep.name)")
    sweep.add_argument("--max-workers", type=int, help="configs at once (default: sweep.max_workers)")
    sweep.add_argument("--dvc", action="store_true",
                       help="run the configs as DVC experiments (dvc exp run -S ...) in the workspace instead")
    compare = sub.add_parser("compare", parents=[common], help="registered adapter versions side by side")
    compare.add_argument("--out", help="plot path (default: <reports_dir>/registry_versions.png; CSV beside it)")
    sub.add_parser("deploy", parents=[common],
                   help="serve the pipeline and sweep deployments to a running Prefect server")


def run_server_command(args: argparse.Namespace) -> int:
    from flows.context import project_root
    from gdro_core.params import ParamsError
    from gdro_core.servers import ServeError
    from gdro_core.sweep import SweepError

    overrides = parse_overrides(args.overrides)
    try:
        if args.command == "serve":
            from flows.serve import serve

            return serve(args.params, overrides, args.prefect_port, args.mlflow_port, args.deployments)
        if args.command == "deploy":
            from flows.deployments import serve_deployments

            serve_deployments(args.params, overrides)
        elif args.command == "compare":
            from gdro_core.tracking.compare import compare_report
            from gdro_core.params import load_params

            root = project_root()
            params = load_params(root / args.params, overrides)
            text, plot, broken = compare_report(params, root, Path(args.out).resolve() if args.out else None)
            print(text + (f"\nplot: {plot}\ntable: {plot.with_suffix('.csv')}" if plot else ""))
            for line in broken:  # registered versions whose files are gone, or a tracking store that lost them
                print(f"gdro compare: {line}", file=sys.stderr)
            if broken:
                return 1
        elif args.dvc:
            from flows.sweep import run_dvc_experiments

            return run_dvc_experiments(args.params, overrides, parse_grid(args.grid) or None, args.name)
        else:
            from flows.sweep import check_sweep, sweep_flow

            grid = parse_grid(args.grid) or None
            check_sweep(args.params, overrides, grid, args.name, args.max_workers)
            sweep_flow(params_path=args.params, overrides=overrides, grid=grid, name=args.name,
                       max_workers=args.max_workers)
    except (ParamsError, ServeError, SweepError, ValueError, FileNotFoundError) as err:
        print(f"gdro {args.command}: {err}", file=sys.stderr)
        return 2
    return 0


def check_params(args: argparse.Namespace) -> int:
    """Validate every section before DVC runs (and so first deletes the outputs of) any other stage, and write each
    stage's code hash (``reports/code/<stage>.json``), the one code dep of that stage in dvc.yaml."""
    from flows.context import project_root
    from gdro_core.data.store import write_json
    from gdro_core.models import ModelError, check_image_size
    from gdro_core.params import ParamsError, load_params
    from gdro_core import preflight
    from gdro_core.code_closure import code_record
    from gdro_core.dvc_files import dvc_stage_problem
    from gdro_core.rewards.base import RewardError
    from gdro_core.stages import CODE_DIR, code_stages

    root = project_root()
    try:
        params = load_params(root / args.params, parse_overrides(args.overrides))
        check_image_size(params)
        records = {s.name: code_record(s.name, params) for s in code_stages(params)}
    except (ParamsError, ModelError, RewardError, KeyError) as err:  # a reward name is resolved with the code
        print(f"gdro check: {err}", file=sys.stderr)
        return 2
    problems = (preflight.problems(params, root) + untracked_reward_files(params, root)
                + [p for p in [dvc_stage_problem(root, params)] if p])
    for line in problems:
        print(f"gdro check: {line}", file=sys.stderr)
    if problems:
        print("gdro check: nothing ran and no output was deleted; fix what the lines above name and run it again",
              file=sys.stderr)
        return 2
    for line in preflight.warnings(params):
        print(f"gdro check: warning: {line}", file=sys.stderr)
    from gdro_core.tracking.compare import unregistered_outputs

    lost = unregistered_outputs(params, root, open_store=False)
    if lost:
        print(f"gdro check: warning: {lost}", file=sys.stderr)
    reports = root / params.paths.reports_dir
    write_json(reports / CHECK_FILE, {"params": "valid"})  # constant content: a valid change reruns only the stages it affects
    for name, record in records.items():
        write_json(reports / CODE_DIR / f"{name}.json", record)  # unchanged code: the same bytes, nothing reruns
    print(f"params valid: {root / args.params}")
    return 0


def untracked_reward_files(params, root: Path) -> list[str]:
    """The project's own reward files that dvc.yaml's ``check`` stage does not depend on: DVC would not rerun
    ``score`` when they change."""
    from gdro_core.rewards.registry import local_reward_files

    dvc_file = root / "dvc.yaml"
    files = local_reward_files(params, root)
    if not files or not dvc_file.is_file():
        return []
    deps = (yaml.safe_load(dvc_file.read_text()) or {}).get("stages", {}).get("check", {}).get("deps", [])
    return [f"dvc.yaml does not track {f}, a reward rewards.weights names, so an edit to it would not rerun "
            "score: run `gdro stages --write`, then `dvc repro`" for f in files if f not in deps]


def stages_command(args: argparse.Namespace) -> int:
    """``gdro stages``: each stage's params, task parts and code files; ``--write`` regenerates the DVC files."""
    from flows.context import project_root
    from gdro_core.dvc_files import write_dvc_files
    from gdro_core.params import ParamsError, load_params
    from gdro_core.code_closure import stage_files
    from gdro_core.rewards.base import RewardError

    root = project_root()
    try:
        params = load_params(root / args.params, parse_overrides(args.overrides))
        if args.write:  # dvc.yaml's data stages follow data.source; its check stage tracks your reward files
            for path in write_dvc_files(root, params):
                print(f"wrote {path}")
            from gdro_core import preflight

            for line in preflight.rewards(params, root):  # e.g. a reward file not there yet: nothing to track
                print(f"gdro stages: {line}", file=sys.stderr)
            return 0
        files = {name: stage_files(name, params) for name in [*STAGE_NAMES, IMPORT]}
    except (ParamsError, RewardError) as err:
        print(f"gdro stages: {err}", file=sys.stderr)
        return 2
    for name in [*STAGE_NAMES, IMPORT]:
        s = stage(name)
        print(f"{name}: {s.help}\n  params: {', '.join(s.params)}"
              + (f"\n  task {params.task}: {', '.join(s.task_parts)}" if s.task_parts else "")
              + f"\n  code: {len(files[name])} files")
    return 0


def export_command(args: argparse.Namespace) -> int:
    """``gdro export``: the rollouts and reward table as a manifest with its images (docs/import-export.md)."""
    from flows.context import load_layout
    from gdro_core.data.manifest import export_manifest
    from gdro_core.models.identity import base_fingerprint

    try:
        lay = load_layout(args.params, parse_overrides(args.overrides))
        p = lay.params
        out = Path(args.out).resolve() if args.out else lay.root / p.paths.data_dir / "export"
        path = export_manifest(lay.rollout_dir, lay.rewards, out, args.format, dict(p.rewards.weights),
                               base_fingerprint(p.model.source, lay.base_dir))
    except (ValueError, FileNotFoundError) as err:
        print(f"gdro export: {err}", file=sys.stderr)
        return 2
    print(f"exported the rollouts and rewards to {path} (images under {path.parent / 'images'})")
    return 0


def run_data_parallel(args: argparse.Namespace, argv: list[str]) -> int | None:
    """`gdro train` on several processes: start itself under torchrun when ``train.num_processes`` > 1; inside a
    launch (torchrun or ``accelerate launch``) a non-main rank trains its share without Prefect or MLflow.
    None: run the flow here (one process, or the main rank)."""
    import subprocess

    from flows.context import project_root
    from gdro_core.params import load_params
    from gdro_core.training.launch import is_main_rank, launched, torchrun_command

    overrides = parse_overrides(args.overrides)
    if launched():
        if is_main_rank():
            return None
        from flows.train import train_worker

        train_worker(args.params, overrides, args.round or 1)
        return 0
    n = load_params(project_root() / args.params, overrides).train.num_processes
    return subprocess.call(torchrun_command(n, "flows.cli", argv)) if n > 1 else None


def run_flow(flow, args: argparse.Namespace) -> None:
    """Run a stage's flow tagged with this process, after ending flow runs that killed `gdro` commands left Running."""
    from prefect import tags

    from flows.context import crash_orphaned_flow_runs, run_tags

    try:
        crashed = crash_orphaned_flow_runs()
    except Exception as err:  # noqa: BLE001 - bookkeeping of old runs never stops a new one
        print(f"gdro: could not check for flow runs left Running by killed commands: {err}", file=sys.stderr)
    else:
        if crashed:
            print(f"gdro: marked {len(crashed)} flow run(s) left Running by a killed gdro command as Crashed",
                  file=sys.stderr)
    extra = {"round": args.round} if getattr(args, "round", None) else {}
    with tags(*run_tags()):
        flow(params_path=args.params, overrides=parse_overrides(args.overrides), **extra)


STOPPED_EXIT = 128 + 15
"""The exit status of a stage stopped by SIGTERM or Ctrl-C (the shell's convention for SIGTERM)."""


def exit_stopped_nonzero() -> None:
    """A stage stopped from outside never exits 0, which DVC or a scheduler would take as done: depending on
    whether a Prefect server is attached, Prefect re-raises SIGTERM or lets the interpreter end normally after
    marking the run Crashed. Registered first, this runs last at exit."""
    import atexit

    from gdro_core.tracking.runs import STOPPED

    def check() -> None:
        if STOPPED:
            sys.stderr.write(f"gdro: stopped ({STOPPED[0]}); the last checkpoint is kept and the next run resumes "
                             "from it\n")
            sys.stderr.flush()
            os._exit(STOPPED_EXIT)

    atexit.register(check)


STOP_GRACE_S = 20.0
"""How long a stopped stage may spend recording the stop in Prefect and ending its helpers before it exits anyway."""
STOP_POLL_S = 0.5


def exit_soon_after_a_stop() -> None:
    """A stage stopped from outside exits within :data:`STOP_GRACE_S` of the stop, whatever is left undone. A
    terminal's Ctrl-C (or a scheduler's SIGTERM to every process) also stops the temporary Prefect server the stage
    started; Prefect then retries its crash report, and at exit its log and event queues, against the dead server
    for minutes. By then the MLflow run has ended KILLED and the last checkpoint is on disk; the next `gdro` command
    marks the flow run Crashed and stops any server left behind."""
    import threading

    from gdro_core.tracking.runs import STOPPED

    def watch() -> None:
        while not STOPPED:
            time.sleep(STOP_POLL_S)
        time.sleep(STOP_GRACE_S)
        sys.stderr.write(f"gdro: stopped ({STOPPED[0]}); the last checkpoint is kept and the next run resumes from it. "
                         f"Exiting without waiting more than {STOP_GRACE_S:.0f} s for Prefect to record the stop (the "
                         "same signal may have stopped its server); the next gdro command marks the flow run Crashed\n")
        sys.stderr.flush()
        os._exit(STOPPED_EXIT)

    threading.Thread(target=watch, name="gdro-exit-after-stop", daemon=True).start()


def exit_cleanly_on_sigterm() -> None:
    """SIGTERM ends a stage through Python's exit, never the default handler's instant death: Prefect hands a
    SIGTERM back to the handler it found once the flow run is marked, and with the default one the process would
    die before its exit handlers stop the temporary Prefect server it started (and the Dask or Ray workers)."""
    import signal

    def stop(signum, frame) -> None:  # noqa: ARG001
        raise SystemExit(STOPPED_EXIT)

    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, stop)


SHELLS = {"sh", "dash", "bash", "zsh", "ksh", "mksh", "fish", "busybox"}
PARENT_POLL_S = 0.5  # how often a stage under `dvc repro` checks that the repro still runs


def stop_with_parent() -> None:
    """Under `dvc repro` (which sets DVC_STAGE), end with the repro: DVC exits on SIGTERM without signalling its
    stage's command, which would otherwise train on, orphaned. DVC runs the command through ``$SHELL -c`` (or
    ``/bin/sh``); bash replaces itself with the command but dash stays between them, still alive after DVC is
    gone. So a daemon thread watches the nearest ancestor that is not a shell and, once it is gone, sends this
    process SIGTERM, which Prefect turns into a Crashed run whose MLflow run ends KILLED, with the last
    checkpoint kept for the rerun."""
    if "DVC_STAGE" not in os.environ:
        return
    import signal
    import threading

    import psutil

    try:
        repro = psutil.Process(os.getppid())
        while repro.name() in SHELLS and repro.ppid() > 1:
            repro = psutil.Process(repro.ppid())
    except psutil.Error:
        os.kill(os.getpid(), signal.SIGTERM)  # the repro was gone before the watch began
        return

    def alive() -> bool:
        try:
            return repro.is_running() and repro.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def watch() -> None:
        while alive():
            time.sleep(PARENT_POLL_S)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="gdro-stop-with-dvc", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    stop_with_parent()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if (argv if argv is not None else sys.argv[1:])[:1] != ["serve"]:
        from gdro_core.servers import attach_to_running_server, mark_owner, reap_orphaned_temporary_servers

        for pid in reap_orphaned_temporary_servers():
            print(f"gdro: stopped Prefect temporary server {pid} left running by a killed gdro command", file=sys.stderr)
        mark_owner()
        attach_to_running_server(Path(os.environ.get("GDRO_ROOT", Path.cwd())).resolve())

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, e.g. --set train.beta=6 (repeatable)")
    parser = argparse.ArgumentParser(prog="gdro", description="Offline GDRO post-training of text-to-image models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in [*STAGES, IMPORT, "pipeline"]:
        stage = sub.add_parser(name, parents=[common], help=f"run the {name} flow")
        if name in ROUND_STAGES:
            stage.add_argument("--round", type=round_arg, metavar="N",
                               help="run a later round (N >= 2): sample from round N-1's adapter and train it further "
                                    "(see rounds/dvc.yaml)")
        if name == IMPORT:
            stage.add_argument("--manifest", metavar="FILE",
                               help="the manifest to import: .jsonl, .csv or .parquet with prompt, image (relative to "
                                    "it), reward, optional group and target (default: data.manifest)")
    export = sub.add_parser("export", parents=[common],
                            help="write the rollouts and reward table as a manifest with its images, to score elsewhere "
                                 "and `gdro import` back")
    export.add_argument("--out", metavar="DIR", help="output folder (default: <paths.data_dir>/export)")
    export.add_argument("--format", choices=("jsonl", "csv", "parquet"), default="jsonl",
                        help="manifest format (default: jsonl)")
    sub.add_parser("check", parents=[common], help="validate the params file (dvc.yaml's first stage)")
    stages = sub.add_parser("stages", parents=[common], help="each stage's params and code; --write regenerates dvc.yaml")
    stages.add_argument("--write", action="store_true",
                        help="regenerate dvc.yaml and rounds/dvc.yaml from gdro_core/stages.py")
    sub.add_parser("rewards", help="the rewards rewards.weights can name: built-in and installed (gdro.rewards)")
    add_server_commands(sub, common)
    args = parser.parse_args(argv)
    if args.command == "rewards":
        from gdro_core.rewards.registry import BUILTIN, reward_names

        for name, spec in sorted(reward_names().items()):
            print(f"{name:14} {spec}{'' if name in BUILTIN else '  (installed)'}")
        print("or a class of yours: 'module:Class' or 'path/to/file.py:Class' (relative to the project root)")
        return 0
    if args.command in EXTRA_COMMANDS:
        return run_server_command(args)
    if args.command == "export":
        return export_command(args)
    if getattr(args, "manifest", None):
        import json

        args.overrides.append(f"data.manifest={json.dumps(str(Path(args.manifest).resolve()))}")
    if args.command == "check":
        return check_params(args)
    if args.command == "stages":
        return stages_command(args)
    from flows.context import stage_flow

    try:  # bad params or --set fail now, before a Prefect server starts (5-20 s)
        from flows.context import project_root
        from gdro_core.models import check_image_size
        from gdro_core.params import load_params

        check_image_size(load_params(project_root() / args.params, parse_overrides(args.overrides)))
    except ValueError as err:
        print(f"gdro {args.command}: {err}", file=sys.stderr)
        return 2
    flow = pipeline_flow() if args.command == "pipeline" else stage_flow(args.command)
    quiet_expected_errors()
    exit_stopped_nonzero()
    exit_soon_after_a_stop()
    exit_cleanly_on_sigterm()
    try:
        if args.command == "train":
            code = run_data_parallel(args, argv if argv is not None else sys.argv[1:])
            if code is not None:
                return code
        run_flow(flow, args)
    except Exception as err:
        if not is_expected(err):
            raise
        print(f"gdro {args.command}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
