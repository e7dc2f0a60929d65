"""What the tree's sharing costs: the default tree against later branch points and no sharing.

Above a branch point a tree model follows the score of the mixture of the branch's types,
so a type's cells are exact only as far as its types really are indistinguishable there
(docs/method.md, 'Sampling'); the discovery criterion (epsilon) sets that approximation. This
benchmark measures it in the default configuration (out-of-fold scores, counts, default
budget), with the protocol and instrument of ``benchmarks/quality.py`` (same splits, same
``tl.evaluate``, reference PCA fitted on the train cells only).

Rows:
  conditioned          the default model (branch-conditioned network) on the discovered tree
                       (epsilon 0.005); ``branched`` rows (one head per branch) on request
  conditioned:unshared every type alone below t = 0.90 (alpha < 0.02): no sharing where the
                       types differ; the types join one by one above it
  conditioned:late     (--rows ...,conditioned:late) discovery with epsilon 0: later branch
                       points, less sharing
  probe: real cells, unseen   real cells no model or space saw, judged like a generator: the
                       known answer, must sit at the control
Cost: network row evaluations per generated cell (200 cells of every type, fan-out sampling).

Usage (from the repository root, in the project's venv):
  python benchmarks/sharing.py              # about 6 min on 2 cores (run nothing else:
                                            # two torch processes on 2 cores are ~10x slower)
  python benchmarks/sharing.py --fast       # smoke test (numbers meaningless)
  python benchmarks/sharing.py --rows conditioned:late --reuse benchmark_out/sharing
                                            # one more row; the default rows of the last run
Writes docs/benchmarks/sharing.md and, under --out, the per-row CSV (machinery: variants.py).
"""

from __future__ import annotations

import logging
import sys

import variants

ROWS = (variants.DEFAULT, f"{variants.DEFAULT}:unshared")
TITLE = "What the tree's sharing costs"
INTRO = (
    "The default model on its discovered tree against trees that share less: `:unshared` puts "
    "every type alone below t = 0.90, `:late` discovers with epsilon 0. Cost: network row "
    "evaluations per generated cell (fan-out sampling)."
)


def main(argv=None) -> int:
    return variants.main(argv, script="sharing.py", title=TITLE, intro=INTRO, rows=ROWS)


if __name__ == "__main__":
    logging.getLogger("variants").setLevel(logging.INFO)
    sys.exit(main())
