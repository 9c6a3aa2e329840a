"""``train(config)``: one training run, recorded in its run folder; ``train_pack(configs)``:
several at once, vectorised. Knows nothing of schemes beyond ``apply_scheme``."""

from __future__ import annotations

import dataclasses
import math
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .config import PACK_FIELDS, PER_RUN, RunConfig
from .data import Dataset, batches, normalise, random_batch
from .diagnostics import DIAG_SEED, init_diagnostics, snapshot, weight_dynamics
from .environment import (HEAP_KEEP, environment, hold_freed_memory, native_bf16, numerics,
                          on_device, resolve_device)
from .errors import ConfigError, InitStudyError, RunFailed, WriteError
from .model import INPUT_SHAPE, build_model, check_model, init_layers
from .kernels import why_not
from .optim import pack_optimizer
from .pack import Pack, lenet_path, resolve_engine
from .runfolder import RunFolder
from .schemes import apply_scheme, resolve
from .sources import load_dataset, say_stderr
from .tracking import Tracker, WandbMirror
from .wandbenv import check_wandb_online, wandb_mode

# Images x runs per evaluation pass, by device type (a pack of K runs sees this // K images
# each). A CPU's: the first conv's output is 0.4 MB per image per run, so 200 MB a pass. A
# GPU's: fewer, larger launches (at 500, a pack of 25 evaluated 20 images a pass), at most
# ~2 MB per image per run (bmm's patches), so under 8 GB a pass.
EVAL_BATCH = {"cpu": 500, "cuda": 4000}


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy from logits: the NLL of the model's softmax output, without log(0)."""
    return F.cross_entropy(logits, y)


def _prob_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """nn.CrossEntropyLoss on the model's probabilities: the double softmax, kept for study."""
    return F.cross_entropy(logits.softmax(-1), y)


# The objectives behind config.LOSSES (a test checks the names agree; config names them
# without importing torch).
OBJECTIVES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "ce": _ce, "prob-ce": _prob_ce}


@torch.no_grad()
def evaluate(pack: Pack, images: torch.Tensor, labels: torch.Tensor,
             dataset: str) -> list[tuple[float, float]]:
    """(loss, accuracy) of each model of the pack over a whole split, in eval mode; (None,
    None) for an empty split. The loss is always the true cross-entropy of the predicted
    probabilities, whatever the training objective, so runs trained with either loss compare."""
    if not len(labels):
        return [(None, None)] * pack.size
    loss_sum = torch.zeros(pack.size, device=labels.device)
    correct = torch.zeros(pack.size, dtype=torch.long, device=labels.device)
    per_pass = EVAL_BATCH.get(labels.device.type, EVAL_BATCH["cpu"])
    for x, y in batches(images, labels, dataset, max(1, per_pass // pack.size)):
        logits = pack.eval_logits(x)  # K x B x 10
        targets = y.expand(pack.size, -1)
        loss_sum += F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").sum(1)
        correct += (logits.argmax(-1) == targets).sum(1)
    n = len(labels)
    return list(zip((loss_sum / n).tolist(), (correct / n).tolist()))


def train(config: RunConfig) -> dict[str, Any]:
    """Train the model as ``config`` says and return the summary (the dict in ``summary.json``).

    Bad options, data or devices (and wandb online without a key or network) raise
    ``InitStudyError`` before anything trains. A non-finite loss ends the run with status
    ``diverged``: a result, not an error. Any other exception during training is recorded as
    status ``failed`` with ``error.txt`` and raised as ``RunFailed`` (its cause attached);
    Ctrl-C is recorded as ``interrupted`` and re-raised. A record that cannot be written
    raises ``WriteError`` (the summary says ``failed`` and ``io_error`` where it still can). A
    folder that holds this finished run raises ``AlreadyDone`` unless ``config.overwrite``;
    one holding a finished run of other options, or written by another process, is a
    ``ConfigError`` (runfolder). The caller's config and RNG state are left untouched.
    """
    return train_pack([config])[0]


@dataclass
class _Run:
    """One run's bookkeeping inside a pack."""

    config: RunConfig
    folder: RunFolder
    tracker: Tracker
    summary: dict[str, Any]
    order: torch.Generator | None = None  # batch order, on the CPU: the same order on every device
    dropout: torch.Generator | None = None  # dropout masks, on the training device
    diverged_step: int | None = None
    val: tuple[float | None, float | None] = (None, None)  # (loss, accuracy); None: no split
    test: tuple[float, float] = (math.nan, math.nan)
    best: tuple[int | None, float | None, float | None] = (None, None, None)  # (epoch, val
    # acc, test acc) at the epoch of highest validation accuracy (the earliest on ties)
    train_loss: float | None = None
    weights: dict[str, torch.Tensor] = field(default_factory=dict)


def train_pack(configs: list[RunConfig]) -> list[dict[str, Any]]:
    """Train several runs at once, vectorised over the runs (``Pack``), and return their
    summaries in order. The runs may differ only in scheme, seeds and the optimizer's per-run
    scalars (``PACK_FIELDS``, ``PER_RUN``); each gets its own init, data order, dropout masks,
    learning rate and run folder, with the same results as training it alone (to float
    tolerance). Errors as for ``train``; a crash fails every run of the pack."""
    configs = [dataclasses.replace(c) for c in configs]
    for config in configs:
        config.validate()
    first = configs[0]
    for f in PACK_FIELDS:
        if any(getattr(c, f) != getattr(first, f) for c in configs):
            raise ConfigError(f"runs trained as one pack must differ only in scheme, seeds "
                              f"and {', '.join(PER_RUN)}; '{f}' differs")
    schemes = [resolve(c.scheme) for c in configs]  # a bad spec fails before disk or data
    model = check_model(first.model)  # a model that does not fit fails before disk or data
    device = resolve_device(first.device)
    if first.precision == "tf32" and device.type != "cuda":
        raise ConfigError("precision tf32 needs a CUDA device; use fp32 or bf16 on the CPU")
    for config in configs:
        config.wandb = wandb_mode(config.wandb)
    if any(c.wandb == "online" for c in configs):
        check_wandb_online()
    folders: list[RunFolder] = []
    try:
        for c in configs:
            folders.append(RunFolder(c.run_dir, c.run_id, c.overwrite))
        return _train_into(configs, folders, schemes, model, device)
    finally:
        for folder in folders:
            folder.close()


def _train_into(configs: list[RunConfig], folders: list[RunFolder], schemes, model,
                device: torch.device) -> list[dict[str, Any]]:
    """train_pack's work once the folders are claimed."""
    first = configs[0]
    say = (lambda message: None) if first.quiet else say_stderr
    dataset = load_dataset(first.dataset, first.data_dir, first.strict_data, say=say)
    dataset = dataset.split_validation(first.val_size)
    if first.train_subset:
        dataset = dataset.subset_train(first.train_subset, first.subset_seed)
    say(describe(dataset))
    if first.precision == "bf16" and not native_bf16(device):
        say(f"warning: {device} has no bf16 arithmetic of its own (environment.native_bf16): "
            f"bf16 is emulated there, and slower than fp32")
    cpu = device.type == "cpu"
    engine = resolve_engine(first.engine, cpu, len(configs), model.built)
    if first.engine == "bmm" and engine == "vmap":
        say(f"note: the bmm engine writes out the LeNet's layers only: this pack of "
            f"{model.name} trains with vmap")
    path = lenet_path(model.built, engine, cpu)
    if engine == "loop" and path and why_not():
        say(f"note: the LeNet's CPU kernels are not available ({why_not()}): it runs on "
            f"PyTorch's operators, slower (docs/performance.md)")
    held = cpu and hold_freed_memory()
    env = on_device(device, "reading the device's properties", lambda: environment(device)) | {
        "data_source": dataset.source, "data_official": dataset.official,
        "data_sha256": dataset.sha256 or None, "train_images": len(dataset.train_labels),
        "val_images": len(dataset.val_labels), "test_images": len(dataset.test_labels),
        "pack_size": len(configs),
        "pack_engine": engine, "cpu_path": path,
        "malloc_keep": HEAP_KEEP if held else None}

    runs = []
    for config, scheme, folder in zip(configs, schemes, folders):
        config.dataset_used, config.device_used = dataset.name, str(device)
        config.scheme_params, config.model_params, config.env = scheme.params, model.params, env
        folder.write_config(config.to_dict())
        mirror = WandbMirror(config, scheme.name) if config.wandb != "disabled" else None
        summary = config.summary_head("running", dataset.name)
        run = _Run(config, folder, Tracker(folder, mirror), summary)
        run.tracker.summary(summary, final=False)
        runs.append(run)
    cuda = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            models = init_models(configs, dataset)  # before anything touches the device
            data, models = on_device(device, "moving the data and models", lambda: (
                dataset.to(device), [m.to(device) for m in models]))
            if first.diag_batch:
                with numerics("fp32", device):
                    _diagnose(runs, models, data, first.diag_batch)
            with numerics(first.precision, device):
                _fit(runs, data, device, models)
    except BaseException as exc:
        status = "failed" if isinstance(exc, Exception) else "interrupted"  # Ctrl-C, exit
        message = (str(exc).strip().splitlines() or [""])[0]
        for run in runs:
            run.summary |= {"status": status, "error": f"{type(exc).__name__}: {message}"}
            if isinstance(exc, WriteError):
                run.summary["io_error"] = True  # unfinished: a sweep redoes it
            try:  # where the disk still takes it; else the folder stays "running", redone
                run.folder.write_error(traceback.format_exc())
                run.tracker.summary(run.summary)
            except WriteError:
                pass
        if isinstance(exc, InitStudyError):  # a device that cannot take the run, a full
            raise  # disk: one line
        if isinstance(exc, Exception):
            where = runs[0].folder.path / "error.txt"
            raise RunFailed(f"run failed: {runs[0].summary['error']} (traceback in "
                            f"{where})") from exc
        raise
    for run in runs:
        run.tracker.summary(run.summary)
    return [run.summary for run in runs]


def describe(dataset: Dataset) -> str:
    """One line: which data a run trains on, from where, and whether it is the official set."""
    check = {True: "official SHA-256 verified", False: "NOT the official files",
             None: "no official hashes for it"}[dataset.official]
    sizes = dataset.sizes
    return (f"data: {dataset.name} from {dataset.source} ({check}): {sizes['train']:,} train / "
            f"{sizes['val']:,} validation / {sizes['test']:,} test images")


def init_models(configs: list[RunConfig], data: Dataset) -> list[torch.nn.Module]:
    """Each run's initialised model, made on the CPU in fp32 (``apply_scheme``) from the data
    held on the CPU, so that a seed gives the same weights whatever device and precision the
    run then trains with."""
    if data.train_images.device.type != "cpu":
        raise ValueError("init_models takes the dataset as held on the CPU")

    def draw(count: int) -> torch.Tensor:  # for data-dependent inits, seeded by apply_scheme
        return random_batch(data.train_images, data.train_labels, data.name, count)[0]

    return [apply_scheme(build_model(c.model), c.scheme, seed=c.seed, data=draw)
            for c in configs]


def _diagnose(runs: list[_Run], models: list[torch.nn.Module], data: Dataset, images: int) -> None:
    """Record each run's init diagnostics on a fixed batch of training images."""
    x, y = random_batch(data.train_images, data.train_labels, data.name, images,
                        torch.Generator().manual_seed(DIAG_SEED))
    for run, model in zip(runs, models):
        run.tracker.init_diagnostics(init_diagnostics(model, x, y))


def _fit(runs: list[_Run], data: Dataset, device: torch.device,
         models: list[torch.nn.Module]) -> None:
    """The training loop over a pack. Losses stay on the device and are read once per
    ``log_every`` steps, so the hot path never waits for the host."""
    started = time.perf_counter()
    first = runs[0].config
    k_runs, n = len(runs), len(data.train_labels)
    pack = Pack(models, compile=first.compile, engine=first.engine)
    layers = [name for name, _ in init_layers(models[0])]
    for run in runs:
        seed = run.config.effective_data_seed
        run.order = torch.Generator().manual_seed(seed)
        run.dropout = torch.Generator(device=device).manual_seed(seed)
    optimizer = pack_optimizer(pack.parameters(), [r.config for r in runs])
    objective = OBJECTIVES[first.loss]
    _record_epoch(runs, pack, data, 0, 0, None)
    step, train_seconds, images = 0, 0.0, 0  # images: per run, counted on the host
    window = torch.zeros(k_runs, first.log_every, device=device)  # losses since last record
    steps_per_epoch = -(-n // first.batch_size)

    def flush(filled: int) -> None:
        """Record each live run's mean loss over the window and its weight-gradient norms (of
        the last step), or its divergence: the 1-based step of its first non-finite loss.
        This is the hot path's only host sync."""
        stats = torch.cat([window[:, :filled], pack.weight_grad_norms()], 1).cpu()
        for run, row in zip(runs, stats):
            if run.diverged_step:
                continue
            losses, norms = row[:filled], row[filled:].tolist()
            bad = (~torch.isfinite(losses)).nonzero()
            if len(bad):
                run.diverged_step = step - filled + int(bad[0]) + 1
                continue
            run.tracker.step(step, losses.mean().item(), {
                f"grad_norm/{name}": norm if math.isfinite(norm) else None
                for name, norm in zip(layers, norms)})

    with _progress(first, k_runs) as progress:
        for epoch in range(1, first.epochs + 1):
            task = progress.add_task(f"epoch {epoch}/{first.epochs}", total=steps_per_epoch,
                                     info="")
            epoch_start = time.perf_counter()
            loss_sum = torch.zeros(k_runs, device=device)
            correct = torch.zeros(k_runs, dtype=torch.long, device=device)
            order = torch.stack([torch.randperm(n, generator=r.order) for r in runs]).to(device)
            filled = 0
            for start in range(0, n, first.batch_size):
                idx = order[:, start:start + first.batch_size]  # K x B
                batch = idx.shape[1]
                x = normalise(data.train_images[idx.flatten()], data.name).view(
                    k_runs, batch, *INPUT_SHAPE)
                y = data.train_labels[idx]
                masks = pack.draw_masks(batch, [r.dropout for r in runs], device)
                optimizer.zero_grad(set_to_none=True)
                losses, logits = pack.forward_backward(x, y, masks, objective)
                optimizer.step()
                step += 1
                images += batch
                window[:, filled] = losses
                filled += 1
                loss_sum += losses * batch
                correct += (logits.argmax(-1) == y).sum(1)
                if filled == first.log_every:
                    flush(filled)
                    filled = 0
                    if all(r.diverged_step for r in runs):
                        break
                progress.advance(task)
            if filled:
                flush(filled)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_seconds += time.perf_counter() - epoch_start
            if all(r.diverged_step for r in runs):
                progress.update(task, info="[red]diverged")
                break
            train = list(zip((loss_sum / n).tolist(), (correct / n).tolist()))
            _record_epoch(runs, pack, data, epoch, step, train)
            live = [r for r in runs if not r.diverged_step]
            progress.update(task, info=_epoch_info(live, k_runs))
            if not first.quiet and not progress.console.is_terminal:  # a log: a line an epoch
                progress.console.print(f"epoch {epoch}/{first.epochs}: "
                                       f"{_epoch_info(live, k_runs)}  "
                                       f"({time.perf_counter() - epoch_start:.0f} s)")

    diverged = [k for k, r in enumerate(runs) if r.diverged_step]
    if diverged:  # the final state of a diverged run: its weights where it stopped
        vals = evaluate(pack, data.val_images, data.val_labels, data.name)
        tests = evaluate(pack, data.test_images, data.test_labels, data.name)
        for k in diverged:
            runs[k].val, runs[k].test = vals[k], tests[k]
            runs[k].tracker.histograms(epoch, step, init_layers(pack.model(k)))
    wall = time.perf_counter() - started
    for run in runs:
        run.summary |= {
            "status": "diverged" if run.diverged_step else "ok",
            "diverged_step": run.diverged_step, "steps": step,
            "train/loss": None if run.diverged_step else run.train_loss,
            "val/loss": run.val[0], "val/acc": run.val[1],
            "test/loss": run.test[0], "test/acc": run.test[1], "best_epoch": run.best[0],
            "best/val/acc": run.best[1], "best/test/acc": run.best[2],
            "wall_seconds": wall, "train_seconds": train_seconds,
            "images_per_second": images / train_seconds if train_seconds else None}


def _record_epoch(runs: list[_Run], pack: Pack, data: Dataset, epoch: int, step: int,
                  train: list[tuple[float, float]] | None) -> None:
    """Evaluate the pack and write each live run's epoch record and histograms; ``train`` is
    each run's (loss, accuracy) over the epoch, None at init."""
    vals = evaluate(pack, data.val_images, data.val_labels, data.name)
    tests = evaluate(pack, data.test_images, data.test_labels, data.name)
    for k, run in enumerate(runs):
        if run.diverged_step:
            continue
        model = pack.model(k)
        run.val, run.test = vals[k], tests[k]
        if run.val[1] is not None and (run.best[1] is None or run.val[1] > run.best[1]):
            run.best = (epoch, run.val[1], run.test[1])  # chosen on validation, never on test
        run.train_loss = train[k][0] if train else None
        record = {"epoch": epoch, "step": step, "train/loss": run.train_loss,
                  "train/acc": train[k][1] if train else None, "val/loss": run.val[0],
                  "val/acc": run.val[1], "test/loss": run.test[0], "test/acc": run.test[1],
                  "lr": run.config.lr}
        run.tracker.epoch(record | weight_dynamics(model, run.weights or snapshot(model)))
        run.tracker.histograms(epoch, step, init_layers(model))
        run.weights = snapshot(model)


def _epoch_info(live: list[_Run], k_runs: int) -> str:
    """The progress line's end after an epoch: one run's numbers, or a pack's best."""
    if k_runs == 1:
        run = live[0]
        val = f"  val acc {run.val[1]:.4f}" if run.val[1] is not None else ""
        return f"loss {run.train_loss:.4f}{val}  test acc {run.test[1]:.4f}"
    if live[0].val[1] is None:
        return f"best test acc {max(r.test[1] for r in live):.4f}"
    return f"best val acc {max(r.val[1] for r in live):.4f}"


def _progress(config: RunConfig, runs: int) -> Progress:
    label = f"{runs} runs " if runs > 1 else ""
    console = Console(stderr=True)
    # In a log (not a terminal) a line an epoch instead: rich would print every bar at the end.
    return Progress(TextColumn(label + "{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                    console=console, disable=config.quiet or not console.is_terminal)
