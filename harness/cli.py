"""Command line: ``python -m harness VERB``.

Exit codes: 0 success, 2 bad input (usage, config, missing data), 1 a failure while running,
128 + signal when stopped by one (130 Ctrl-C, 143 SIGTERM; runs are KILLED and resumable).
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from core.errors import BadInput, HarnessError, Interrupted
from harness import signals

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
T = TypeVar("T")


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors raise BadInput (one line, exit 2) instead of printing usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise BadInput(f"{self.prog}: {message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m harness", description="Benchmark and ablation harness for self-supervised learning."
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="also the libraries' informational logs (MLflow, FAISS, Ray, ...)"
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)

    run = verbs.add_parser(
        "run",
        help="one trial: pretrain, evaluate, log to MLflow",
        description="Pretrain one method on one dataset, run the evaluation battery and log everything to MLflow.",
    )
    run.add_argument("config", help="run config YAML (e.g. configs/simclr_shapes.yaml)")
    run.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides, e.g. pretrain.epochs=2 method.temperature=0.2",
    )
    run.add_argument(
        "--resume", metavar="CHECKPOINT", help="continue from a checkpoint (same as pretrain.resume=CHECKPOINT)"
    )

    ev = verbs.add_parser(
        "eval",
        help="re-run the evaluation battery on a trained model, into its MLflow run",
        description=(
            "Re-run the evaluation battery (or a part: eval.* overrides) on a trained model "
            "given by MLflow run id or checkpoint file, logging into the run that trained it."
        ),
    )
    ev.add_argument("target", metavar="RUN_ID_OR_CHECKPOINT")
    ev.add_argument(
        "overrides", nargs="*", metavar="key=value", help="eval.* keys, e.g. eval.semi.enabled=false eval.knn.k=200"
    )

    show = verbs.add_parser(
        "config",
        help="print the resolved config (defaults filled in) without running",
        description=(
            "Validate a config with its overrides and print it resolved; with --data, also load the data and build "
            "the model, and print what a run would record about them (fingerprint, counts, classes, each view's "
            "recipe)."
        ),
    )
    show.add_argument("config", help="run config YAML")
    show.add_argument("overrides", nargs="*", metavar="key=value")
    show.add_argument(
        "--data", action="store_true", help="load the data and print its provenance and the views' recipes"
    )

    sweep = verbs.add_parser(
        "sweep",
        help="run a YAML ablation with Ray Tune, log to MLflow, write the tables",
        description=(
            "Run every trial of a sweep (Ray Tune), log a parent run and one child "
            "run per trial to MLflow, then write results/<sweep>/ tables and plots."
        ),
    )
    sweep.add_argument("sweep", help="sweep YAML (e.g. sweeps/temperature.yaml)")
    sweep.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="sweep keys (max_concurrent=1, seeds=[0]) or run keys (pretrain.epochs=2)",
    )
    sweep.add_argument(
        "--resume",
        action="store_true",
        help="continue the last interrupted run of this sweep: finished trials are kept",
    )
    sweep.add_argument(
        "--results", default="results", metavar="DIR", help="where results/<sweep>/ goes (default: results)"
    )

    table = verbs.add_parser(
        "table",
        help="rebuild a sweep's tables and plots from MLflow",
        description="Rebuild results/<sweep>/table.{md,tex,csv} and the plots from the MLflow runs alone.",
    )
    table.add_argument("sweep", help="a sweep YAML or an MLflow experiment name")
    table.add_argument(
        "--results", default="results", metavar="DIR", help="where results/<sweep>/ goes (default: results)"
    )
    table.add_argument("--uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")

    ui = verbs.add_parser(
        "ui",
        help="serve the MLflow UI for the harness's store",
        description="Start MLflow's UI on 127.0.0.1 against the store the harness writes, and print its URL.",
    )
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--workers", type=int, default=1, help="server worker processes (default: 1)")
    ui.add_argument("--uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")

    srv = verbs.add_parser(
        "server",
        help="a tracking server for a cluster: trials log over HTTP (tracking.uri: http://HOST:PORT)",
        description=(
            "Serve an MLflow tracking server (runs in --store, artifacts under "
            "--artifacts, both over HTTP) for sweeps whose trials run on other machines."
        ),
    )
    srv.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1; 0.0.0.0 to serve a cluster)"
    )
    srv.add_argument("--port", type=int, default=5000)
    srv.add_argument("--workers", type=int, default=2, help="server worker processes (default: 2)")
    srv.add_argument(
        "--store", default="sqlite:///mlflow.db", help="backend store URI (default: sqlite:///mlflow.db here)"
    )
    srv.add_argument("--artifacts", default="mlartifacts", help="folder of the artifacts (default: ./mlartifacts)")
    srv.add_argument(
        "--allowed-hosts",
        help="comma-separated names and addresses clients reach the server by (the Host headers it accepts; "
        "default: this machine's names and addresses, localhost and the private address ranges)",
    )
    srv.add_argument(
        "--login",
        action="store_true",
        help="MLflow's login (basic-auth): every request needs a user; the first from MLFLOW_AUTH_ADMIN_USERNAME and "
        "MLFLOW_AUTH_ADMIN_PASSWORD (or --login-config); clients set MLFLOW_TRACKING_USERNAME/_PASSWORD",
    )
    srv.add_argument("--login-config", help="MLflow's basic_auth.ini for --login (users database, first user)")

    lst = verbs.add_parser(
        "list",
        help="list methods, datasets or timm backbones",
        description="List registered methods, datasets, or timm backbones matching a pattern.",
    )
    lst.add_argument("what", nargs="?", choices=["methods", "datasets", "backbones"], default="methods")
    lst.add_argument("pattern", nargs="?", help="shell-style filter, e.g. 'resnet*' or 'vit_*'")
    return parser


UI_BASE = "http://127.0.0.1:5000"
"""Where ``harness ui`` serves by default: the links a sweep prints point there."""
HARNESS = ("python", "-m", "harness")
"""How the printed hints start the harness."""


STARTED = [time.perf_counter()]
"""When the command started (reset by :func:`main`): a sweep's progress lines count from here."""


def main(argv: Sequence[str] | None = None) -> int:
    STARTED[0] = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    signals.install()
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        _configure_logging(args.quiet, args.verbose)
        if args.verb is None:
            parser.print_help()
            return EXIT_BAD_INPUT
        return _VERBS[args.verb](args)
    except HarnessError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"interrupted by {signals.stop_reason()}", file=sys.stderr)
        return signals.exit_code()


def _configure_logging(quiet: bool, verbose: bool) -> None:
    """The harness's own loggers at INFO (WARNING with ``-q``); every library's at WARNING unless ``-v``."""
    level = logging.WARNING if quiet else logging.INFO
    logging.basicConfig(
        level=level if verbose else logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for name in ("harness", "methods", "evaluations"):
        logging.getLogger(name).setLevel(level)
    if not verbose:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # MLflow configures its own loggers on import


def _run(args: argparse.Namespace) -> int:
    from harness.config.loading import load_config
    from harness.launch.torchrun import check_launch, torchrun_world

    world = torchrun_world()  # torchrun's variables, all or none
    overrides = list(args.overrides) + ([f"pretrain.resume={args.resume}"] if args.resume else [])
    cfg = load_config(args.config, overrides)  # bad input is reported before the heavy imports
    check_launch(cfg, world)
    try:
        if world is not None:  # torchrun: every rank runs this; rank 0 logs, checkpoints, evaluates
            from harness.launch.workers import run_torchrun

            metrics = _failure_is_one_line("run", lambda: run_torchrun(cfg, world))
            if world.rank != 0:
                return EXIT_OK if metrics is not None else EXIT_FAILED
        elif cfg.distributed.workers > 1:  # W workers through Ray Train
            from harness.launch.workers import run_workers

            metrics = _failure_is_one_line("run", lambda: run_workers(cfg))
        else:
            from harness.trial.run import run

            metrics = _failure_is_one_line("run", lambda: run(cfg))
    except Interrupted as stop:
        again = shlex.join(
            ["python", "-m", "harness", "run", args.config, *args.overrides, "--resume", str(stop.checkpoint)]
        )
        hint = f"; continue it with: {again}" if stop.checkpoint else " before its first checkpoint; run it again"
        print(f"interrupted by {signals.stop_reason()}: the MLflow run is KILLED{hint}", file=sys.stderr)
        return signals.exit_code()
    if metrics is None:
        return EXIT_FAILED
    _print_metrics(metrics, ("eval/", "baseline/"))
    return EXIT_OK


def _eval(args: argparse.Namespace) -> int:
    from harness.trial.reevaluate import reevaluate

    result = _failure_is_one_line("eval", lambda: reevaluate(args.target, args.overrides))
    if result is None:
        return EXIT_FAILED
    run_id, metrics = result
    _print_metrics(metrics, ("eval/",))
    print(f"logged into MLflow run {run_id}")
    return EXIT_OK


def _failure_is_one_line(verb: str, fn: Callable[[], T]) -> T | None:
    """Run ``fn``; a failure while running (not bad input) prints one line and returns None.
    ``HARNESS_DEBUG=1`` shows the traceback instead."""
    try:
        return fn()
    except HarnessError:
        raise
    except Exception as err:
        if os.environ.get("HARNESS_DEBUG"):
            raise
        first = (str(err).strip().splitlines() or [""])[0][:1000]  # one line: a store's or a library's own
        print(f"error: {verb} failed: {type(err).__name__}: {first}", file=sys.stderr)
        return None


def _print_metrics(metrics: dict[str, float], prefixes: tuple[str, ...]) -> None:
    for key in sorted(metrics):
        if key.startswith(prefixes):
            print(f"{key:40s} {metrics[key]:.4f}")


def _sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    from harness.sweep.config import load_sweep

    sweep = load_sweep(args.sweep, args.overrides)  # bad input is reported before the heavy imports
    from harness import tables
    from harness.sweep.driver import run_sweep

    print(
        f"sweep {sweep.cfg.name!r}: {len(sweep.trials)} trials "
        f"({len(sweep.trials) // len(sweep.cfg.seeds)} points x {len(sweep.cfg.seeds)} seeds)",
        flush=True,
    )
    outcome = run_sweep(sweep, resume=args.resume, verbose=0 if args.quiet else 1, started=STARTED[0])
    for key, error in outcome.failed.items():
        print(f"FAILED  {key}: {error}", file=sys.stderr)
    if outcome.interrupted:
        print(
            f"interrupted: {len(outcome.interrupted)} trial(s) unfinished; "
            f"continue with: {shlex.join([*HARNESS, 'sweep', args.sweep, *args.overrides, '--resume'])}",
            file=sys.stderr,
        )
    from harness.track.mlflow import absolute_uri, compare_url, experiment_ids, runs_url, tracking_uri

    uri = absolute_uri(tracking_uri(sweep.configs[sweep.keys[0]].tracking.uri))
    out = Path(args.results) / sweep.cfg.name
    print(
        f"{len(outcome.finished)}/{len(sweep.trials)} trials finished, {len(outcome.failed)} "
        f"failed, {len(outcome.stopped)} stopped early, in {outcome.wall_s:.0f} s"
    )
    if outcome.interrupted:  # an unfinished sweep leaves the tables of the last complete one in place
        print(f"tables: not written (interrupted); --resume writes them, or: python -m harness table {args.sweep}")
    else:
        files = tables.build(sweep.cfg.name, out, uri, table=sweep.cfg.table)
        print(f"tables: {out}/table.md (also {', '.join(p.name for p in files if p.name != 'table.md')})")
    from harness.sweep.state import child_runs

    experiment_id = experiment_ids(uri)[sweep.cfg.name]
    served = uri.startswith(("http://", "https://"))  # a tracking server is its own UI
    base = uri.rstrip("/") if served else UI_BASE
    link = runs_url(base, experiment_id)
    browse = link if served else f"python -m harness ui, then {link}"
    print(f"MLflow: parent run {outcome.parent_run_id} in experiment {sweep.cfg.name!r} of {uri}; browse: {browse}")
    trials = [r["run_id"] for r in reversed(child_runs(sweep.cfg.name, outcome.parent_run_id, uri))]
    print(f"compare the {len(trials)} trials: {compare_url(base, experiment_id, trials)}")
    if outcome.failed:
        print(f"error: {len(outcome.failed)} of {len(sweep.trials)} trials failed", file=sys.stderr)
    return outcome.exit_code


def _table(args: argparse.Namespace) -> int:
    from pathlib import Path

    from harness import tables
    from harness.track.mlflow import absolute_uri, tracking_uri

    name, uri, table = args.sweep, args.uri, None
    if name.endswith((".yaml", ".yml")) or Path(name).is_file():
        from harness.sweep.config import load_sweep

        sweep = load_sweep(name)
        name, uri, table = sweep.cfg.name, uri or sweep.configs[sweep.keys[0]].tracking.uri, sweep.cfg.table
    uri = absolute_uri(tracking_uri(uri))
    out = Path(args.results) / name
    files = tables.build(name, out, uri, table=table)  # the YAML's columns; an experiment name: those of its sweep
    print("\n".join(str(p) for p in files))
    return EXIT_OK


def _ui(args: argparse.Namespace) -> int:
    from harness.track.mlflow import (
        check_port,
        compare_url,
        ensure_store,
        experiment_ids,
        runs_url,
        serve_ui,
        tracking_uri,
    )

    check_port("127.0.0.1", args.port)
    uri = tracking_uri(args.uri)
    base = f"http://127.0.0.1:{args.port}"
    ensure_store(uri)
    print(f"MLflow UI for {uri} at {base} (Ctrl-C stops it); the runs of each experiment:", flush=True)
    from harness.sweep.state import child_runs, latest_parent

    for name, experiment_id in experiment_ids(uri).items():
        print(f"  {name}: {runs_url(base, experiment_id)}", flush=True)
        parent = latest_parent(name, uri)
        trials = [r["run_id"] for r in reversed(child_runs(name, parent["run_id"], uri))] if parent else []
        if trials:
            print(
                f"    compare its last sweep's {len(trials)} trials: {compare_url(base, experiment_id, trials)}",
                flush=True,
            )
    return serve_ui(uri, port=args.port, workers=args.workers)


def _server(args: argparse.Namespace) -> int:
    from pathlib import Path

    from harness.track.mlflow import (
        absolute_uri,
        allowed_hosts,
        check_port,
        ensure_store,
        login_environment,
        serve,
        server_command,
    )

    if args.login_config and not args.login:
        raise BadInput("--login-config: given without --login; add --login to serve with MLflow's login")
    hosts = allowed_hosts(args.host, args.port, args.allowed_hosts)
    check_port(args.host, args.port)
    store, artifacts = absolute_uri(args.store), Path(args.artifacts).resolve()
    env: dict[str, str] = {}
    if args.login:
        env = login_environment(Path(args.login_config) if args.login_config else None, artifacts.parent)
    ensure_store(store)
    artifacts.mkdir(parents=True, exist_ok=True)
    if not args.login and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: serving on {args.host} without a login: anyone who reaches port {args.port} can read and change "
            "every run; add --login",
            file=sys.stderr,
            flush=True,
        )
    print(
        f"MLflow tracking server for {store} (artifacts in {artifacts}) "
        f"at http://{args.host}:{args.port}; set tracking.uri to it",
        flush=True,
    )
    command = server_command(store, artifacts, args.host, args.port, args.workers, hosts, login=args.login)
    return serve(command, env)


def _config(args: argparse.Namespace) -> int:
    import yaml

    from harness.config.loading import load_config

    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(cfg.as_dict(), sort_keys=False), end="")
    if not args.data:
        return EXIT_OK
    from harness.trial.prepare import prepare, view_record
    from harness.trial.run import data_record

    trial = prepare(cfg)  # what a run does before it opens: bad data is bad input here too
    record = {"data": data_record(trial.data), "views": view_record(trial)}
    print("---  # what a run records: data.json and views.json")
    print(yaml.safe_dump(record, sort_keys=False, allow_unicode=True), end="")
    return EXIT_OK


def _list(args: argparse.Namespace) -> int:
    if args.what == "methods":
        from methods import list_methods, taxonomy

        names = list_methods(args.pattern)
        width = max((len(n) for n in names), default=0)
        for name in names:
            t = taxonomy(name)
            print(f"{name:{width}s}  negatives={t['uses_negatives']!s:5s} networks={t['networks']}  loss={t['loss']}")
    elif args.what == "datasets":
        from harness.data.datasets import list_datasets

        print("\n".join(n for n in list_datasets() if args.pattern is None or fnmatch.fnmatch(n, args.pattern)))
    else:
        from core.backbones import list_backbones

        print("\n".join(list_backbones(args.pattern)))
    return EXIT_OK


_VERBS = {
    "run": _run,
    "eval": _eval,
    "sweep": _sweep,
    "table": _table,
    "ui": _ui,
    "server": _server,
    "config": _config,
    "list": _list,
}
