"""One network for every branch against one head per branch, in the default configuration.

``architecture="conditioned"`` is one network conditioned on the branch (an embedding), with
the same tree, fan-out sharing and extension; ``"branched"`` (the default) gives every branch
its own head. docs/benchmarks/architectures.md compared them with the probability-flow ODE,
one mean per gene and a fixed 1,800 / 4,000-step budget; this page compares them as the
package runs today, with the protocol of ``benchmarks/quality.py`` (same splits and seeds,
``tl.evaluate`` in a reference PCA of the train cells, 3 training x 3 generation seeds):

Rows:
  branched               the default: one head per branch
  conditioned            one branch-conditioned network
  probe: real cells, unseen   the known answer, must sit at the control

Usage (from the repository root, in the project's venv; run nothing else beside it):
  python benchmarks/conditioned.py     # both rows trained in one run (fit times comparable):
                                       # 11.0 min on 2 cores
  python benchmarks/conditioned.py --reuse benchmark_out/anchored   # only conditioned trains
  python benchmarks/conditioned.py --fast   # smoke test (numbers meaningless)
Writes docs/benchmarks/conditioned.md and, under --out, the per-row CSV (machinery:
variants.py).
"""

from __future__ import annotations

import logging
import sys

import variants

ROWS = ("branched", "conditioned")
TITLE = "One head per branch or one branch-conditioned network"
INTRO = (
    "The default model (`branched`: one head per branch) against `architecture='conditioned'` "
    "(one network conditioned on a branch embedding, same tree and sharing), both in the "
    "default configuration and budget."
)


def main(argv=None) -> int:
    return variants.main(argv, script="conditioned.py", title=TITLE, intro=INTRO, rows=ROWS)


if __name__ == "__main__":
    logging.getLogger("variants").setLevel(logging.INFO)
    sys.exit(main())
