"""Flow matching (the linear interpolant's velocity) against the default noise prediction.

Recent single-cell generators (CFGen, scDiffusion's successors) train by flow matching: the
network sees x_s = (1 - s) x_0 + s eps and predicts the velocity eps - x_0, times s drawn
uniformly, cells made with Euler steps of the ODE. On the package's VP process that is
``objective="flow"`` (``scbranch/module/_module.py``): the same marginals (the interpolant is
x_t / (alpha + sigma)), another target, loss weight over time and time draw. This study asks
whether it makes cells closer to real ones, with the protocol of ``benchmarks/quality.py``
(same splits and seeds, ``tl.evaluate`` in a reference PCA of the train cells, the default
budget that grows with the cells, 3 training x 3 generation seeds).

Rows:
  conditioned               the default model (noise prediction), reverse SDE, 25 steps
  conditioned:flow          flow matching, the same network and budget, reverse SDE, 25 steps
  conditioned:flow:ddim     the same models with flow matching's own sampler: Euler steps of
                            the ODE uniform in s (DDIM), 25 steps
  conditioned:flow:ddim100  the same, 100 steps
  probe: real cells, unseen   the known answer, must sit at the control

Usage (from the repository root, in the project's venv; run nothing else beside it):
  python benchmarks/flow_matching.py --reuse benchmark_out/quality   # the default rows of
                                       # the last quality run: only the flow models train
  python benchmarks/flow_matching.py --fast   # smoke test (numbers meaningless)
Writes docs/benchmarks/flow_matching.md and, under --out, the per-row CSV (machinery:
variants.py).
"""

from __future__ import annotations

import logging
import sys

import variants

FLOW = f"{variants.DEFAULT}:flow"
ROWS = (variants.DEFAULT, FLOW, f"{FLOW}:ddim", f"{FLOW}:ddim100")
TITLE = "Flow matching against noise prediction"
INTRO = (
    "The default model (the network predicts the noise; times uniform in t) against the same "
    "network trained by flow matching (`objective='flow'`: it sees the linear interpolant "
    "(1 - s) x_0 + s eps and predicts its velocity eps - x_0, times uniform in s), sampled "
    "with the package's reverse SDE (`:flow`) and with flow matching's Euler steps of the "
    "ODE (`:ddim`, `:ddim100`: 25 and 100 steps uniform in s). Same budget, splits and seeds."
)


def main(argv=None) -> int:
    return variants.main(
        argv,
        script="flow_matching.py",
        title=TITLE,
        intro=INTRO,
        rows=ROWS,
        comparisons=((FLOW, f"{FLOW}:ddim"),),
    )


if __name__ == "__main__":
    logging.getLogger("variants").setLevel(logging.INFO)
    sys.exit(main())
