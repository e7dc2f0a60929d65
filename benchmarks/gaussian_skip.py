"""The per-branch Gaussian skip on real data, in the default configuration, 3 x 3 seeds.

Every network predicts a correction to an analytic Gaussian noise prediction
(``scbranch/module/_gaussian_skip.py``): by default one Gaussian of all cells (``"global"``);
with ``gaussian_skip="per_branch"`` each branch function's own Gaussian, so an untrained head
samples its type's Gaussian. On the known truth at pbmc68k_reduced's size it is the best tree
network at every budget, and at 4 x that size it barely learns past its Gaussian
(docs/benchmarks/budget_curve_recipe.md). This page asks the real datasets, with the
protocol of ``benchmarks/quality.py`` (same splits and seeds, ``tl.evaluate`` in a reference
PCA of the train cells, the default budget that grows with the cells):

Rows:
  conditioned              the default model (branch-conditioned network, global skip)
  conditioned:per_branch   the same model with the per-branch Gaussian skip
  (``--rows branched,branched:per_branch``: the same with one head per branch)
  probe: real cells, unseen   the known answer, must sit at the control

Usage (from the repository root, in the project's venv; run nothing else beside it):
  python benchmarks/gaussian_skip.py --reuse benchmark_out/quality   # the default rows of
                                       # the last quality run: only per_branch trains
  python benchmarks/gaussian_skip.py --fast   # smoke test (numbers meaningless)
Writes docs/benchmarks/gaussian_skip.md and, under --out, the per-row CSV (machinery:
variants.py).
"""

from __future__ import annotations

import logging
import sys

import variants

ROWS = (variants.DEFAULT, f"{variants.DEFAULT}:per_branch")
TITLE = "The per-branch Gaussian skip"
INTRO = (
    "The default model (one Gaussian of all cells as the analytic part of the noise "
    "prediction) against `gaussian_skip='per_branch'` (each branch function corrects the "
    "Gaussian of the cells it serves), both in the default configuration and budget."
)


def main(argv=None) -> int:
    return variants.main(argv, script="gaussian_skip.py", title=TITLE, intro=INTRO, rows=ROWS)


if __name__ == "__main__":
    logging.getLogger("variants").setLevel(logging.INFO)
    sys.exit(main())
