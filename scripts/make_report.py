#!/usr/bin/env python3
"""Regenerate the committed reports from their committed run folders (no training).

    python scripts/make_report.py            # every reports/*/ whose study has finished
    python scripts/make_report.py NAME       # reports/NAME only, finished or not
"""

import sys
from pathlib import Path

from initstudy.report import make_report
from initstudy.results import load_runs
from initstudy.study import load_study

ROOT = Path(__file__).resolve().parents[1]  # where study files' paths start
REPORTS = ROOT / "reports"
TITLES = {"mnist-sample-lenet": "A small-data sample at one learning rate, not a fair ranking: "
                                "LeNet on 4,000 real MNIST digits (mnist-sample, 7 schemes x 5 "
                                "seeds, 5 epochs, SGD lr 0.01 for all)",
          "mnist-lenet-tuned": "Each init at its own best learning rate, chosen on validation "
                               "(full MNIST, 7 schemes, 3 seeds, 3 epochs)",
          "depth-mlp": "Where the init decides whether a plain MLP trains at all: depth 2 to 50 "
                       "(ReLU) and 5 to 30 (tanh), each init at its best learning rate (full "
                       "MNIST, 1 epoch, 3 seeds)",
          "depth-mlp-confirm": "Confirmation on fresh seeds at depth 10 (ReLU MLP, width "
                               "256), where the default is a lottery: each init at the lr "
                               "depth-mlp chose on validation (full MNIST, 1 epoch, 12 seeds)",
          "depth-mlp-confirm-d30": "Confirmation on fresh seeds at depth 30 (ReLU MLP, width "
                                   "256), where Xavier was inconclusive: each init at the lr "
                                   "depth-mlp chose on validation (full MNIST, 1 epoch, 20 "
                                   "seeds)",
          "mnist-lenet-tuned-full": "Each init at its own best learning rate, chosen on "
                                    "validation (full MNIST, 7 schemes, 5 seeds, 10 epochs, "
                                    "TF32 on a GPU)",
          "mnist-lenet-confirm": "Confirmation on fresh seeds: each well-scaled init at the "
                                 "lr mnist-lenet-tuned chose on validation at 3 epochs, "
                                 "trained 10 epochs (full MNIST, 5 schemes, fp32 on a CPU)",
          "mnist-sample-precision": "fp32 against bf16: 3 inits at the lr mnist-lenet-tuned "
                                    "chose, 3 fresh seeds, 3 epochs on mnist-sample, each "
                                    "precision its own comparison (bf16 emulated on an AVX2 "
                                    "CPU)",
          "mnist-sample-precision-native": "fp32 against bf16 where bf16 is native: 3 inits at "
                                           "the lr mnist-lenet-tuned chose, 3 fresh seeds, 3 "
                                           "epochs on mnist-sample, each precision its own "
                                           "comparison (an Intel Xeon with AMX)"}


def unfinished(runs: Path) -> str | None:
    """Why the study of a runs folder is not ready for its report ("N of M runs finished"),
    or None: it has finished, or its folder holds no study file."""
    if not (runs / "study.toml").exists():
        return None
    planned = len(load_study(runs / "study.toml", root=ROOT).runs)
    # Counted by folder, not by planned run id: a study's older runs keep the ids they had.
    done = sum(run.finished for run in load_runs([runs]))
    return None if done >= planned else f"{done} of {planned} runs finished"


def main(names: list[str]) -> None:
    folders = [REPORTS / n for n in names] or sorted(p.parent for p in REPORTS.glob("*/runs"))
    for folder in folders:
        why = None if names else unfinished(folder / "runs")
        if why:
            print(f"skipped {folder.name}: its study has {why} (resume it with its sweep, or "
                  f"name it to report what there is)")
            continue
        readme = make_report([folder / "runs"], folder, title=TITLES.get(folder.name))
        print(f"wrote {readme}")


if __name__ == "__main__":
    main(sys.argv[1:])
