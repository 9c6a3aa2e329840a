"""A worker: trains planned runs (one, or a pack) in this process and records how each
ended, whatever happens. ``python -m initstudy.worker`` with the configs as JSON on stdin is how
a local sweep starts one in a fresh process (on stdin, not in argv: a run records its argv)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .config import RunConfig
from .errors import AlreadyDone, InitStudyError, RunFailed, WriteError
from .runfolder import FINISHED, write_json_atomic
from .training import train_pack


def record_failure(config: RunConfig, error: str, ended_as: str = "failed") -> None:
    """Mark a run ``failed`` (or ``interrupted``) when its own process could not: it died, or
    never started training, or was stopped before it had recorded anything."""
    folder = Path(config.out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "error.txt").exists():  # the run's own traceback, where it wrote one
            (folder / "error.txt").write_text(error + "\n")
        write_json_atomic(folder / "summary.json",
                          config.summary_head(ended_as, config.dataset) | {"error": error})
    except (OSError, WriteError):
        pass  # the folder cannot take it: it stays unfinished, and a sweep redoes it


def run_pack(configs: list[RunConfig]) -> list[str]:
    """Train planned runs together in this process, recording any failure; their statuses."""
    try:
        return [summary["status"] for summary in train_pack(configs)]
    except AlreadyDone as exc:  # finished meanwhile by another process
        return [exc.summary["status"]] * len(configs)
    except (RunFailed, WriteError):
        return ["failed"] * len(configs)  # train_pack recorded what it could
    except InitStudyError as exc:  # before training: missing data, bad device...
        for config in configs:
            record_failure(config, str(exc))
        return ["failed"] * len(configs)


def _worker_main() -> int:
    """``python -m initstudy.worker < CONFIGS_JSON``: one run or pack in a fresh process."""
    configs = [RunConfig.from_dict(data) for data in json.load(sys.stdin)]
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    try:
        results = run_pack(configs)
    except KeyboardInterrupt:
        return 130
    return 0 if all(result in FINISHED for result in results) else 1


if __name__ == "__main__":
    sys.exit(_worker_main())
