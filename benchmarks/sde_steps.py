"""How many steps the reverse SDE needs: the default 25 against 50 and 100.

``generate()`` follows the reverse SDE (Euler-Maruyama) with 25 steps by default. Euler-
Maruyama's error shrinks with the step, so more steps bring the cells closer to what the
trained score describes (at one network call per step more). This study judges the same
trained models generating with 25, 50 and 100 steps, with the protocol and instrument of
``benchmarks/quality.py`` (same splits, ``tl.evaluate``, reference PCA fitted on the train
cells only, 3 training x 3 generation seeds).

Rows (one trained model per training seed, shared by all rows):
  conditioned          the default model: the SDE at 25 steps
  conditioned:sde50    the same models, 50 steps
  conditioned:sde100   the same models, 100 steps
  probe: real cells, unseen   real cells no model or space saw, judged like a generator: the
                       known answer, must sit at the control

Usage (from the repository root, in the project's venv):
  python benchmarks/sde_steps.py --reuse benchmark_out/quality --datasets pbmc68k,pbmc3k
                        # 4.5 min on 2 cores (10.3 with one head per branch); run nothing else
  python benchmarks/sde_steps.py --fast   # smoke test (numbers meaningless)
Writes docs/benchmarks/sde_steps.md and, under --out, the per-row CSV (machinery: variants.py).
"""

from __future__ import annotations

import logging
import sys

import variants

ROWS = (variants.DEFAULT, f"{variants.DEFAULT}:sde50", f"{variants.DEFAULT}:sde100")
TITLE = "How many steps the reverse SDE needs"
INTRO = (
    "The same trained models (the default configuration) generating with the reverse SDE "
    "(Euler-Maruyama, fan-out sharing) at the default 25 steps (`branched`), 50 and 100 "
    "steps (`:sde50`, `:sde100`: one network call per step, so 2x and 4x the cost)."
)


def main(argv=None) -> int:
    return variants.main(argv, script="sde_steps.py", title=TITLE, intro=INTRO, rows=ROWS)


if __name__ == "__main__":
    logging.getLogger("variants").setLevel(logging.INFO)
    sys.exit(main())
