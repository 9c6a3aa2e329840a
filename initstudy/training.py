"""``train(config)``: one training run, recorded in its run folder. Knows nothing of schemes
beyond ``apply_scheme``."""

from __future__ import annotations

import dataclasses
import math
import time
import traceback
from typing import Any, Callable

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .config import RunConfig, environment, resolve_device
from .data import Dataset, batches, load_dataset, random_batch
from .diagnostics import init_diagnostics, snapshot, weight_dynamics
from .errors import RunFailed
from .model import LeNet, init_layers
from .schemes import apply_scheme, resolve
from .tracking import RunFolder, Tracker, WandbMirror, check_wandb_online, wandb_mode

EVAL_BATCH = 1000  # images per evaluation batch: no gradients, so larger than training batches
DIAG_SEED = 0  # the init diagnostics batch: the same images for every run of a dataset


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy from logits: the NLL of the model's softmax output, without log(0)."""
    return F.cross_entropy(logits, y)


def _prob_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """nn.CrossEntropyLoss on the model's probabilities: the double softmax, kept for study."""
    return F.cross_entropy(logits.softmax(-1), y)


OBJECTIVES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "ce": _ce, "prob-ce": _prob_ce}


def make_optimizer(params, config: RunConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay)


@torch.no_grad()
def evaluate(model: LeNet, images: torch.Tensor, labels: torch.Tensor,
             dataset: str) -> tuple[float, float]:
    """(loss, accuracy) over a whole split in eval mode. The loss is always the true
    cross-entropy of the predicted probabilities, whatever the training objective, so runs
    trained with either loss compare."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=labels.device)
    correct = torch.zeros((), dtype=torch.long, device=labels.device)
    for x, y in batches(images, labels, dataset, EVAL_BATCH):
        logits = model.logits(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    model.train(was_training)
    n = len(labels)
    return (loss_sum / n).item(), (correct / n).item()


def train(config: RunConfig) -> dict[str, Any]:
    """Train LeNet as ``config`` says and return the summary (the dict in ``summary.json``).

    Bad options, data or devices (and wandb online without a key or network) raise
    ``InitStudyError`` before anything trains. A non-finite loss ends the run with status
    ``diverged``: a result, not an error. Any other exception during training is recorded as
    status ``failed`` with ``error.txt`` and raised as ``RunFailed`` (its cause attached);
    Ctrl-C is recorded as ``interrupted`` and re-raised. The caller's config and RNG state are
    left untouched.
    """
    config = dataclasses.replace(config)
    config.validate()
    scheme = resolve(config.scheme)  # fail on a bad spec before touching disk or data
    device = resolve_device(config.device)
    config.wandb = wandb_mode(config.wandb)
    if config.wandb == "online":
        check_wandb_online()
    folder = RunFolder(config.run_dir)
    dataset = load_dataset(config.dataset, config.data_dir, config.strict_data)
    if config.train_subset:
        dataset = dataset.subset_train(config.train_subset, config.subset_seed)
    dataset = dataset.to(device)

    config.dataset_used = dataset.name
    config.device_used = str(device)
    config.scheme_params = scheme.params
    config.env = environment(device) | {
        "data_source": dataset.source, "train_images": len(dataset.train_labels),
        "test_images": len(dataset.test_labels)}
    folder.write_config(config.to_dict())
    mirror = WandbMirror(config, scheme.name) if config.wandb != "disabled" else None
    tracker = Tracker(folder, mirror)

    summary: dict[str, Any] = {
        "status": "running", "run_name": config.run_name, "scheme": config.scheme,
        "seed": config.seed, "data_seed": config.effective_data_seed,
        "dataset": dataset.name, "epochs": config.epochs}
    tracker.summary(summary, final=False)
    cuda = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            summary |= _fit(config, dataset, device, tracker)
    except BaseException as exc:
        status = "failed" if isinstance(exc, Exception) else "interrupted"  # Ctrl-C, exit
        summary |= {"status": status, "error": f"{type(exc).__name__}: {exc}"}
        folder.write_error(traceback.format_exc())
        tracker.summary(summary)
        if isinstance(exc, Exception):
            raise RunFailed(f"run failed: {summary['error']} (traceback in "
                            f"{folder.path / 'error.txt'})") from exc
        raise
    tracker.summary(summary)
    return summary


def _fit(config: RunConfig, data: Dataset, device: torch.device,
         tracker: Tracker) -> dict[str, Any]:
    """The training loop. Losses stay on the device and are read once per ``log_every`` steps,
    so the hot path never waits for the host."""
    started = time.perf_counter()
    # Init on the CPU, so a seed gives the same weights on every device.
    model = apply_scheme(LeNet(), config.scheme, seed=config.seed, data=lambda n: random_batch(
        data.train_images, data.train_labels, data.name, n)[0].cpu()).to(device)
    if config.diag_batch:
        x, y = random_batch(data.train_images, data.train_labels, data.name, config.diag_batch,
                            torch.Generator().manual_seed(DIAG_SEED))
        tracker.init_diagnostics(init_diagnostics(model, x, y))
    torch.manual_seed(config.effective_data_seed)  # dropout masks (inside train's fork_rng)
    order = torch.Generator().manual_seed(config.effective_data_seed)
    optimizer = make_optimizer(model.parameters(), config)
    objective = OBJECTIVES[config.loss]
    layers = init_layers(model)
    test = evaluate(model, data.test_images, data.test_labels, data.name)
    tracker.histograms(0, 0, layers)
    weights = snapshot(model)
    tracker.epoch({"epoch": 0, "step": 0, "train/loss": None, "train/acc": None,
                   "test/loss": test[0], "test/acc": test[1], "lr": config.lr}
                  | weight_dynamics(model, weights))
    best_acc, step, train_seconds, images_seen = test[1], 0, 0.0, 0
    window = torch.zeros(config.log_every, device=device)  # losses since the last record
    diverged_step = None
    steps_per_epoch = -(-len(data.train_labels) // config.batch_size)

    def flush(filled: int) -> int | None:
        """Record the window's mean loss and each layer's weight-gradient norm (of the last
        step); return the 1-based step of the first non-finite loss in the window, if any.
        This is the hot path's only host sync."""
        grads = torch.stack([torch.linalg.vector_norm(layer.weight.grad) for _, layer in layers])
        stats = torch.cat([window[:filled], grads]).cpu()
        losses, norms = stats[:filled], stats[filled:].tolist()
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            return step - filled + int(bad[0]) + 1
        tracker.step(step, losses.mean().item(), {
            f"grad_norm/{name}": norm if math.isfinite(norm) else None
            for (name, _), norm in zip(layers, norms)})
        return None

    with _progress(config) as progress:
        for epoch in range(1, config.epochs + 1):
            task = progress.add_task(f"epoch {epoch}/{config.epochs}", total=steps_per_epoch,
                                     info="")
            model.train()
            epoch_start = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), dtype=torch.long, device=device)
            filled = 0
            for x, y in batches(data.train_images, data.train_labels, data.name,
                                config.batch_size, order):
                logits = model.logits(x)
                loss = objective(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                images_seen += len(y)
                window[filled] = loss.detach()
                filled += 1
                loss_sum += loss.detach() * len(y)
                correct += (logits.argmax(1) == y).sum()
                if filled == config.log_every:
                    diverged_step = flush(filled)
                    filled = 0
                    if diverged_step:
                        break
                progress.advance(task)
            if filled and not diverged_step:
                diverged_step = flush(filled)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_seconds += time.perf_counter() - epoch_start
            if diverged_step:
                progress.update(task, info=f"[red]diverged at step {diverged_step}")
                break
            n = len(data.train_labels)
            train_loss, train_acc = (loss_sum / n).item(), (correct / n).item()
            test = evaluate(model, data.test_images, data.test_labels, data.name)
            best_acc = max(best_acc, test[1])
            tracker.epoch({"epoch": epoch, "step": step, "train/loss": train_loss,
                           "train/acc": train_acc, "test/loss": test[0], "test/acc": test[1],
                           "lr": config.lr} | weight_dynamics(model, weights))
            weights = snapshot(model)
            tracker.histograms(epoch, step, layers)
            progress.update(task, info=f"loss {train_loss:.4f}  test acc {test[1]:.4f}")

    if diverged_step:
        test = evaluate(model, data.test_images, data.test_labels, data.name)
        tracker.histograms(epoch, step, layers)
    return {
        "status": "diverged" if diverged_step else "ok",
        "diverged_step": diverged_step,
        "steps": step,
        "train/loss": None if diverged_step else train_loss,
        "test/loss": test[0], "test/acc": test[1], "best/test/acc": best_acc,
        "wall_seconds": time.perf_counter() - started,
        "train_seconds": train_seconds,
        "images_per_second": images_seen / train_seconds if train_seconds else None,
    }


def _progress(config: RunConfig) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                    console=Console(stderr=True), disable=config.quiet)
