"""Anchored generation: new cells made from the training cells, against generation from noise.

``model.generate_anchored`` noises real cells of a type to ``anchor_time`` and brings them back
down the reverse SDE of their own type (an SDE transmutation into the same type). This study
judges the same trained models (the default configuration) generating from noise (the
default ``generate()``) and anchored on their training cells at several anchor times, with the
protocol and instrument of ``benchmarks/quality.py`` (same splits, ``tl.evaluate``, reference
PCA fitted on the train cells only, 3 training x 3 generation seeds).

Anchored cells start from training cells, so they can copy them; ``train_distance`` (each
cell's distance to its nearest training cell, against new real cells': ratio 1 = as new as
new real cells) says how far they moved. Two references with no network read it:
  probe: smoothed bootstrap    a training cell plus Gaussian noise of its type's covariance,
                       shrunk to keep the type's covariance (a kernel density estimate,
                       bandwidth 1): what blurring the training cells without a model gives
  probe: train cells' out-of-fold scores   the training cells as the models see them,
                       decoded: copies, the target of every model (train_distance 0 by far)
  probe: real cells, unseen   real cells no model or space saw, judged like a generator: the
                       known answer, must sit at the control

Usage (from the repository root, in the project's venv):
  python benchmarks/anchored.py --reuse benchmark_out/quality   # the default rows of a
                                           # quality run; run nothing else beside it
  python benchmarks/anchored.py --fast     # smoke test (numbers meaningless)
Writes docs/benchmarks/anchored.md and, under --out, the per-row CSV (machinery: variants.py).
"""

from __future__ import annotations

import logging
import sys

import variants
from quality import LATENT, DecodedProbe, SpaceDecodedGaussian, default_setup

ROWS = (
    "conditioned",
    "conditioned:anchored10",
    "conditioned:anchored20",
    "conditioned:anchored25",
    "conditioned:anchored30",
    "conditioned:anchored50",
)
TITLE = "Anchored generation"
INTRO = (
    "The same trained models (the default configuration) generating from noise (`conditioned`, "
    "the default `generate()`) and from their training cells with `generate_anchored` "
    "(`:anchored<T>`: each training cell noised to t = T/100 and brought back down its "
    "type's reverse SDE, 25 steps; anchors used in turn). `train_distance` below 1 x the "
    "control's means cells nearer the training cells than new real cells are. References "
    "without a network: `probe: smoothed bootstrap` (a training cell plus its type's "
    "Gaussian noise at bandwidth 1, variance kept) and `probe: train cells' out-of-fold "
    "scores` (copies of the training cells as the models see them)."
)
#: the smoothed bootstrap's bandwidth, in units of the type's covariance: at 1 its cells sit
#: about as far from the training cells as new real cells do on both datasets (0.96 x, 0.93 x)
BANDWIDTH = 1.0


def _smoothed_bootstrap(train, unseen=None, cfg=None):
    """``sb.baselines.SmoothedBootstrap`` at :data:`BANDWIDTH` in the models' latent, decoded by
    their space (negative binomial): the same estimator and draws as quality.py's baseline row
    (``quality.SpaceDecodedGaussian``), so the two pages' numbers agree."""
    import scbranch as sb

    adata = default_setup(train)
    # an untrained model: its space's decoder is all the probe uses
    return SpaceDecodedGaussian(adata, sb.BranchedDiffusion(adata), bandwidth=BANDWIDTH)


def _train_copies(train, unseen=None, cfg=None):
    import scbranch as sb

    adata = default_setup(train)
    return DecodedProbe(sb.BranchedDiffusion(adata), adata, adata.obsm[LATENT])


PROBES = {
    "probe: smoothed bootstrap": _smoothed_bootstrap,
    "probe: train cells' out-of-fold scores": _train_copies,
}


def main(argv=None) -> int:
    return variants.main(
        argv,
        script="anchored.py",
        title=TITLE,
        intro=INTRO,
        rows=ROWS,
        probes=PROBES,
        comparisons=(("conditioned:anchored25", "probe: smoothed bootstrap"),),
        headline=(*variants.HEADLINE, "train_distance"),
    )


if __name__ == "__main__":
    logging.getLogger("variants").setLevel(logging.INFO)
    sys.exit(main())
