"""The `fedplatform` command line.

Each command is one `add_*` function that declares its parser and points it at one `cmd_*`
handler returning the exit code; `COMMANDS` lists the top-level ones. A `UserError` (bad
config, missing data, ...) prints `error: <message>` on one line to stderr and exits with 2;
`--debug` adds the traceback. Results go to stdout, progress and warnings to stderr.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import sys
import time
import traceback

from fedplatform import __version__
from fedplatform.errors import NonFinite, RunFailed, RunInterrupted, UserError
from fedplatform.tracking import MLFLOW_QUIET


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as UserError (one line, exit code 2)."""

    def error(self, message: str):
        raise UserError(f"{message} (see `{self.prog} --help`)")


# --debug is accepted before or after the command: `fedplatform --debug data describe x`
# and `fedplatform data describe x --debug` (SUPPRESS keeps the sub-parser from resetting it).
_COMMON = argparse.ArgumentParser(add_help=False)
_COMMON.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                     help="show tracebacks and debug logging")


# ---------------------------------------------------------------------------- version


def add_version(sub) -> None:
    p = sub.add_parser("version", parents=[_COMMON], help="print the fedplatform version")
    p.set_defaults(handler=cmd_version)


def cmd_version(args) -> int:
    print(__version__)
    return 0


# ---------------------------------------------------------------------------- data


def add_data(sub) -> None:
    p = sub.add_parser("data", parents=[_COMMON], help="prepare and inspect federated datasets")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    add_data_describe(data_sub)


def add_data_describe(sub) -> None:
    p = sub.add_parser(
        "describe", parents=[_COMMON],
        help="prepare a pipeline's federated dataset and show its class counts and client histograms",
    )
    p.add_argument("pipeline", help="pipeline YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set data.imbalance_factor=50 (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object and nothing else on stdout")
    p.add_argument("--plot", metavar="FILE.png", help="also draw a client x class heatmap")
    p.add_argument("--rebuild", action="store_true", help="rebuild the prepared data even if cached")
    p.set_defaults(handler=cmd_data_describe)


def cmd_data_describe(args) -> int:
    import fedplatform
    from fedplatform.data import prepare

    cfg = fedplatform.load_config(args.pipeline, args.overrides)
    if args.plot:
        _check_plot_path(args.plot)
    ds = prepare(cfg, rebuild=args.rebuild)
    desc = ds.describe()
    if args.plot:
        from fedplatform.tracking.plots import plot_partition

        plot_partition(desc, args.plot)
        logging.getLogger("fedplatform").info("wrote %s", args.plot)
    if args.json:
        print(json.dumps(desc))
    else:
        _print_description(desc, ds)
    return 0


def _check_plot_path(path: str) -> None:
    """Before any work: the plot's folder exists and is writable, and matplotlib can write its suffix."""
    from pathlib import Path

    from matplotlib.backend_bases import FigureCanvasBase

    p = Path(path)
    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    if p.suffix.lower().lstrip(".") not in formats:
        raise UserError(f"--plot {path!r}: unsupported image type {p.suffix or '(no suffix)'!r}; "
                        f"use one of {', '.join('.' + f for f in formats)}")
    folder = p.parent if str(p.parent) else Path(".")
    if p.is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK):
        what = "is a directory" if p.is_dir() else f"its folder '{folder}' does not exist or is not writable"
        raise UserError(f"--plot {path!r}: {what}; give a file in an existing, writable folder")


def _print_description(desc: dict, ds) -> None:
    import numpy as np
    from rich.table import Table

    console = _console()
    names, C = desc["class_names"], desc["num_classes"]
    train, test = np.array(desc["train_class_counts"]), np.array(desc["test_class_counts"])
    hist = np.array([c["class_counts"] for c in desc["clients"]])
    sizes, present = hist.sum(1), (hist > 0).sum(1)
    console.print(f"[bold]{desc['dataset']}[/]: {C} classes, {len(desc['clients'])} clients, "
                  f"{train.sum():,} train / {test.sum():,} global test samples  [dim]{ds.path}[/]")

    order = np.argsort(-train, kind="stable")
    if C <= 20:
        console.print("train class counts, head to tail")
        table = Table()
        for col in ("class", "name", "train", "test"):
            table.add_column(col, justify="left" if col == "name" else "right")
        for c in order:
            table.add_row(str(c), names[c], f"{train[c]:,}", f"{test[c]:,}")
        console.print(table)
    else:
        console.print("train class counts, head to tail: " + " ".join(str(train[c]) for c in order))

    # Per-client histogram: one column per class, or per group of consecutive classes when wide.
    width = 1 if C <= 20 else -(-C // 10)
    groups = [(s, min(s + width, C)) for s in range(0, C, width)]
    splits = {s: [len(ds.client_samples(c["id"], s)) for c in desc["clients"]] for s in ("val", "test")}
    console.print("client label histograms (train)" + ("" if width == 1 else f", classes in groups of {width}"))
    table = Table()
    table.add_column("client", justify="right")
    if ds.domain_names:
        table.add_column("domain")
    table.add_column("train", justify="right")
    for s in ("val", "test"):
        if any(splits[s]):
            table.add_column(s, justify="right")
    table.add_column("classes", justify="right")
    for a, b in groups:
        table.add_column(str(a) if b - a == 1 else f"{a}-{b - 1}", justify="right")
    for i, client in enumerate(desc["clients"]):
        cells = [str(client["id"])]
        if ds.domain_names:
            domains = np.unique(ds.domains[ds.client_samples(client["id"])])
            cells.append(", ".join(ds.domain_names[d] for d in domains))
        cells += [f"{sizes[i]:,}"] + [str(splits[s][i]) for s in ("val", "test") if any(splits[s])]
        cells.append(str(present[i]))
        for a, b in groups:
            n = int(hist[i, a:b].sum())
            cells.append(str(n) if n else "[dim]·[/]")
        table.add_row(*cells)
    console.print(table)

    nonzero = train[train > 0]
    summary = Table.grid(padding=(0, 2))
    summary.add_row("clients", str(len(sizes)))
    summary.add_row("train samples per client", f"min {sizes.min():,}  mean {sizes.mean():,.1f}  max {sizes.max():,}")
    summary.add_row("classes per client", f"min {present.min()}  mean {present.mean():.1f}  max {present.max()}")
    summary.add_row("clients holding all classes", str(int((present == C).sum())))
    summary.add_row("imbalance (largest / smallest train class)", f"{nonzero.max() / nonzero.min():.1f}")
    summary.add_row("global test samples", f"{test.sum():,}")
    summary.add_row("fingerprint", ds.fingerprint[:16])
    console.print(summary)


# ---------------------------------------------------------------------------- run


def _add_pipeline_args(p) -> None:
    p.add_argument("pipeline", help="pipeline YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set algorithm.lr=0.05 (repeatable)")


def _add_storage_arg(p) -> None:
    p.add_argument("--storage", metavar="URI",
                   help="where checkpoints and sweep state go: a path or a URI such as s3://bucket/prefix "
                        "(same as --set runtime.storage=URI; default $FEDPLATFORM_STORAGE or fedplatform_runs)")


def _overrides(args) -> list[str]:
    """--set values, then --storage (it wins over a --set runtime.storage)."""
    return args.overrides + ([f"runtime.storage={args.storage}"] if args.storage else [])


def add_run(sub) -> None:
    p = sub.add_parser("run", parents=[_COMMON], help="train one federated experiment on Ray")
    _add_pipeline_args(p)
    _add_storage_arg(p)
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--resume", metavar="RUN", help="continue a run (its id or run directory) from its last checkpoint")
    p.add_argument("--ray-address", help="connect to a running Ray cluster instead of starting a local one")
    p.set_defaults(handler=cmd_run)


def process_start() -> float:
    """This process's start on the `time.perf_counter()` clock: on Linux from its start time in
    /proc (clock ticks since boot, 10 ms), elsewhere now."""
    now = time.perf_counter()
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return now
    return now - max(0.0, age)


def cmd_run(args) -> int:
    import fedplatform
    from fedplatform import experiment

    experiment.COMMAND_STARTED = process_start()  # start-up metrics count from the process start
    cfg = fedplatform.load_config(args.pipeline, _overrides(args))
    try:
        result = fedplatform.run(cfg, tracking_uri=args.tracking_uri, resume=args.resume,
                                 ray_address=args.ray_address, progress=True)
    except RunInterrupted as exc:
        again = ["--ray-address", args.ray_address] if args.ray_address else []
        return _interrupted(args, "run", args.pipeline, *again, "--resume", exc.run_id)
    _print_summary(cfg, result, args.tracking_uri)
    return 0


def _console():
    """A rich console that does not squeeze its output into 80 columns when piped or redirected
    (tables, long paths and commands stay greppable and copyable)."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=200)


def _interrupted(args, command: str, path: str, *resume: str) -> int:
    """Ctrl-C: print the exact command that continues (same file, overrides and tracking URI)."""
    again = ["fedplatform", command, path, *(a for o in args.overrides for a in ("--set", o))]
    again += ["--tracking-uri", args.tracking_uri] if args.tracking_uri else []
    again += ["--storage", args.storage] if args.storage else []
    print(f"interrupted; continue with `{shlex.join(again + list(resume))}`", file=sys.stderr)
    return 130


def _print_summary(cfg, result, tracking_uri: str | None) -> None:
    from rich.table import Table

    from fedplatform.tracking.mlflow_run import resolve_uri

    console = _console()
    console.print(f"{cfg.name}: {cfg.algorithm.name} on {cfg.data.dataset}, {result.summary.get('rounds')} rounds")
    table = Table()  # a title would wrap to the table's narrow width
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.summary.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)
    if cfg.clip.model is not None and cfg.clip.pretrained is None:
        console.print(f"[yellow]note:[/] the CLIP ({cfg.clip.model}) is untrained (random weights): these numbers "
                      "show the pipeline works end to end, not what the method achieves with pretrained CLIP")
    uri = resolve_uri(tracking_uri, cfg.tracking.tracking_uri)
    console.print(f"MLflow run {result.run_id}; checkpoints in {result.run_dir}")
    console.print(f"open the UI: fedplatform ui --tracking-uri {uri}")


# ---------------------------------------------------------------------------- sweep, ui


def add_sweep(sub) -> None:
    p = sub.add_parser("sweep", parents=[_COMMON], help="run a Ray Tune sweep over a search-space file")
    p.add_argument("space", help="search-space YAML (tune_spaces/*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a base-pipeline value for every trial, e.g. --set rounds=10 (repeatable)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    _add_storage_arg(p)
    p.add_argument("--resume", action="store_true", help="continue the latest interrupted sweep of this space")
    p.set_defaults(handler=cmd_sweep)


def cmd_sweep(args) -> int:
    import fedplatform

    try:
        result = fedplatform.sweep(args.space, _overrides(args), tracking_uri=args.tracking_uri, resume=args.resume)
    except KeyboardInterrupt:
        return _interrupted(args, "sweep", args.space, "--resume")
    print(result.table())
    print(f"MLflow parent run {result.parent_run_id}; summary and plots in {result.path}")
    return 0


def add_report(sub) -> None:
    p = sub.add_parser("report", parents=[_COMMON],
                       help="table over seeds (mean ± std per configuration) from a sweep, an experiment or runs")
    p.add_argument("source", nargs="+",
                   help="a sweep directory or name (under <storage>/sweeps), an MLflow experiment name, or run ids")
    p.add_argument("--out", default="report", metavar="DIR",
                   help="where report.md, report.csv, report.tex and accuracy_curves.png go (default: ./report)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: a sweep's own, else $MLFLOW_TRACKING_URI "
                                          "or sqlite:///mlflow.db)")
    _add_storage_arg(p)
    p.set_defaults(handler=cmd_report)


def cmd_report(args) -> int:
    from fedplatform.report import report, to_markdown

    rep, files = report(args.source, args.out, tracking_uri=args.tracking_uri, storage_root=args.storage)
    print(to_markdown(rep))
    print(f"wrote {', '.join(str(p) for p in files.values())}")
    return 0


def add_ui(sub) -> None:
    p = sub.add_parser("ui", parents=[_COMMON], help="open the MLflow UI on the project's tracking store")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    p.set_defaults(handler=cmd_ui)


def cmd_ui(args) -> int:
    from fedplatform.tracking.mlflow_run import absolute_uri, resolve_uri

    uri = absolute_uri(resolve_uri(args.tracking_uri, None))
    print(f"MLflow UI for {uri} at http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    # Become the MLflow server (exec), so a signal to this process reaches it and its worker. One
    # worker serves one user's browser; MLflow's default 4 each import mlflow (seconds of start-up).
    os.execv(sys.executable, [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                              "--host", args.host, "--port", str(args.port), "--workers", "1"])


# ---------------------------------------------------------------------------- cache


def add_cache(sub) -> None:
    p = sub.add_parser("cache", parents=[_COMMON], help="build frozen-CLIP feature caches ahead of time")
    cache_sub = p.add_subparsers(dest="cache_command", required=True, metavar="COMMAND")
    b = cache_sub.add_parser("build", parents=[_COMMON], help="embed every sample with the pipeline's frozen CLIP")
    _add_pipeline_args(b)
    b.add_argument("--ray-address", help="connect to a running Ray cluster instead of starting a local one")
    b.set_defaults(handler=cmd_cache_build)


def cmd_cache_build(args) -> int:
    from fedplatform.config import load_config
    from fedplatform.data import prepare
    from fedplatform.errors import UserError
    from fedplatform.experiment import check_ray_address, ensure_ray
    from fedplatform.models.clip import require_weights
    from fedplatform.models.feature_cache import build_feature_cache

    cfg = load_config(args.pipeline, args.overrides)
    check_ray_address(args.ray_address)
    if cfg.clip.model is None:
        raise UserError(f"pipeline '{args.pipeline}' sets no clip.model; a feature cache needs one (e.g. ViT-B-32)")
    require_weights(cfg.clip.model, cfg.clip.pretrained)
    ds = prepare(cfg)
    ensure_ray(args.ray_address)
    print(build_feature_cache(cfg, ds))
    return 0


# ---------------------------------------------------------------------------- entry point

COMMANDS = [add_version, add_data, add_run, add_sweep, add_report, add_cache, add_ui]
"""Top-level commands, in --help order (run, sweep, cache and ui add themselves here)."""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedplatform", description="Federated learning with CLIP guidance, on Ray.")
    parser.add_argument("--debug", action="store_true", default=False, help="show tracebacks and debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


class _LogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        return msg if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {msg}"


def _setup_logging(debug: bool) -> None:
    """The command's own lines at INFO; MLflow's (database set-up, model validation) only from
    WARNING and without its artifact progress bars, and no notice from Ray that a local Ray uses
    token authentication, its default; all of them with --debug."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogFormatter())
    root = logging.getLogger("fedplatform")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    if debug:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "INFO")  # a sweep's trials follow it
    else:
        for key, value in MLFLOW_QUIET.items():
            os.environ.setdefault(key, value)
        # Ray's notice that a new local Ray uses its default, token authentication (kept as is)
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)


MAX_ERROR_CHARS = 2000


def _one_line(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """An error message as one line, cut to `limit` characters (it may echo a user's value)."""
    line = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", text).split())  # no terminal colour codes from Ray
    return line if len(line) <= limit else f"{line[:limit]}... (message cut at {limit} characters)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        _setup_logging(args.debug)
        return args.handler(args)
    except UserError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except RunFailed as exc:  # a client raised or a round timed out: show its own traceback
        if debug:
            traceback.print_exc()
        print(f"error: {_one_line(str(exc)) if isinstance(exc, NonFinite) else exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - anything else (a lost node, a bug): one line unless --debug
        if debug:
            raise
        first = _one_line(str(exc).strip().splitlines()[0]) if str(exc).strip() else ""
        print(f"error: {type(exc).__name__}: {first} - this is a bug in fedplatform; please report it on the "
              "project's issue tracker with the output of the same command run with --debug", file=sys.stderr)
        return 1
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0


def _kill_idle_autoscaler() -> None:
    """A local Ray started by this process runs an autoscaler monitor with nothing to scale. On
    `ray.shutdown` it is stopped after the GCS and takes Ray's full 1 s grace before Ray SIGKILLs
    it: killed first, the command ends a second sooner. Only a process this one started is touched
    (a connected-to cluster's node lists none)."""
    from ray._private import worker

    node = getattr(worker, "_global_node", None)
    for info in (getattr(node, "all_processes", None) or {}).get("monitor", []):
        info.process.kill()
        info.process.wait(timeout=5)


def entry() -> None:
    """The `fedplatform` command: `main`, then a quick exit. Everything is written by then (MLflow
    and checkpoints synchronously); Ray is shut down here, and the interpreter's own teardown of
    torch, Ray and MLflow (~2 s) is skipped."""
    code = main()
    try:
        ray = sys.modules.get("ray")  # imported only by the commands that use it
        if ray is not None and ray.is_initialized():
            _kill_idle_autoscaler()
            ray.shutdown()
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    entry()
