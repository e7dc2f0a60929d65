"""Which sampler makes the cells closest to real ones: the probability-flow ODE or the SDE.

``generate`` can follow the probability-flow ODE (``solver="heun"``, 2 network calls per step)
or the reverse SDE (``solver="em"``, Euler-Maruyama, 1 call per step), both at the default 25
steps with fan-out sharing. The sampling benchmark (``benchmarks/sampling.py``) compares them
against a 1,000-step reference on one model; this study judges them as generators, with the
protocol and instrument of ``benchmarks/quality.py`` (same splits, same ``tl.evaluate``,
reference PCA fitted on the train cells only, 3 training x 3 generation seeds), for both the
default (branch-conditioned) model and the flat one, so that the comparison of the tree
against flat can be read on either sampler.

This study is why ``generate()``'s default solver is the SDE (it was the ODE before).

Rows (every pair of rows with the same model shares one trained model per training seed):
  conditioned          the default model, generated with the default solver (rows reused from
                       earlier runs say which in the page's ``solver`` column; the SDE since
                       this study)
  conditioned:ode      the same trained models, probability-flow ODE (Heun, 25 steps)
  flat, flat:ode       the flat label-guided model with the default solver, and with the ODE
  (``:sde`` rows, e.g. ``--rows branched,branched:sde,branched:ode``, name the SDE explicitly)
  probe: real cells, unseen   real cells no model or space saw, judged like a generator: the
                       known answer, must sit at the control

Usage (from the repository root, in the project's venv):
  python benchmarks/sampler_quality.py --reuse benchmark_out/quality
                        # about 20 min on 2 cores; run nothing else (two torch processes on
                        # 2 cores are ~10x slower)
  python benchmarks/sampler_quality.py --fast   # smoke test (numbers meaningless)
Writes docs/benchmarks/sampler_quality.md and, under --out, the per-row CSV (machinery:
variants.py).
"""

from __future__ import annotations

import logging
import sys

import variants

ROWS = (variants.DEFAULT, f"{variants.DEFAULT}:ode", "flat", "flat:ode")
TITLE = "Which sampler: probability-flow ODE or reverse SDE"
INTRO = (
    "The same trained models generating with the probability-flow ODE (`:ode`, Heun, 2 network "
    "calls per step) and the reverse SDE (`:sde`, Euler-Maruyama, 1 call per step), both at "
    "the default 25 steps with fan-out sharing; `conditioned` and `flat` use `generate()`'s "
    "default solver of the run that made them (column `solver`: `heun` for rows reused from "
    "runs before the default became the SDE, `em` after)."
)
COMPARISONS = (
    ("flat", variants.DEFAULT),
    ("flat:ode", f"{variants.DEFAULT}:ode"),
    (variants.DEFAULT, f"{variants.DEFAULT}:ode"),
    ("flat", "flat:ode"),
)


def main(argv=None) -> int:
    return variants.main(
        argv,
        script="sampler_quality.py",
        title=TITLE,
        intro=INTRO,
        rows=ROWS,
        comparisons=COMPARISONS,
    )


if __name__ == "__main__":
    logging.getLogger("variants").setLevel(logging.INFO)
    sys.exit(main())
