"""The default training budget on real data, 3 x 3 seeds: half, default, twice.

``train()`` makes about 100 passes over the cells (within 1,000-16,000 optimiser steps), read
from a curve of budget against data size on a known truth with one head per branch
(docs/benchmarks/budget_curve.md). The same curve for the branch-conditioned network, the
default since (docs/benchmarks/budget_curve_conditioned.md), is 0.02-0.04 AUROC better at
twice the budget at every scale, about one seed sd; on pbmc68k_reduced the conditioned
network's held-out denoising error at low noise rises past the default budget
(docs/benchmarks/clean_estimates.md). This page asks the real datasets with the protocol of
``benchmarks/quality.py`` (same splits and seeds, ``tl.evaluate`` in a reference PCA of the
train cells):

Rows:
  conditioned              the default model and budget
  conditioned:budget0.5    half the default number of epochs
  conditioned:budget2      twice the default number of epochs
  probe: real cells, unseen   the known answer, must sit at the control

Usage (from the repository root, in the project's venv; run nothing else beside it):
  python benchmarks/budget_real.py --reuse benchmark_out/quality   # the default rows of the
                                       # last quality run: only the other budgets train
  python benchmarks/budget_real.py --fast   # smoke test (numbers meaningless)
Writes docs/benchmarks/budget_real.md and, under --out, the per-row CSV (machinery:
variants.py).
"""

from __future__ import annotations

import logging
import sys

import variants

ROWS = (variants.DEFAULT, f"{variants.DEFAULT}:budget0.5", f"{variants.DEFAULT}:budget2")
TITLE = "The default training budget on real data"
INTRO = (
    "The default model at half, one and two times `train()`'s default number of epochs "
    "(about 100 passes over the train cells, within 1,000-16,000 optimiser steps)."
)


def main(argv=None) -> int:
    return variants.main(argv, script="budget_real.py", title=TITLE, intro=INTRO, rows=ROWS)


if __name__ == "__main__":
    logging.getLogger("variants").setLevel(logging.INFO)
    sys.exit(main())
