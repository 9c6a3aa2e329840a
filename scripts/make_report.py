#!/usr/bin/env python3
"""Regenerate the committed reports from their committed run folders (no training).

    python scripts/make_report.py            # every reports/*/ that has a runs/ folder
    python scripts/make_report.py NAME       # reports/NAME only
"""

import sys
from pathlib import Path

from initstudy.report import make_report

REPORTS = Path(__file__).resolve().parents[1] / "reports"
TITLES = {"mnist-sample-lenet": "How the init changes LeNet's training on real MNIST digits "
                                "(mnist-sample, 7 schemes x 5 seeds, 5 epochs, one lr)",
          "mnist-lenet-tuned": "Each init at its own best learning rate, chosen on validation "
                               "(full MNIST, 7 schemes, 3 seeds, 3 epochs)",
          "depth-mlp": "Where the init decides whether a plain MLP trains at all: depth 2 to 50 "
                       "(ReLU) and 5 to 30 (tanh), each init at its best learning rate (full "
                       "MNIST, 1 epoch, 3 seeds)"}


def main(names: list[str]) -> None:
    folders = [REPORTS / n for n in names] or sorted(p.parent for p in REPORTS.glob("*/runs"))
    for folder in folders:
        readme = make_report([folder / "runs"], folder, title=TITLES.get(folder.name))
        print(f"wrote {readme}")


if __name__ == "__main__":
    main(sys.argv[1:])
