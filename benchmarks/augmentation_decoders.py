"""Why rare-type augmentation fell with the class-ratio decoder: the decoder's parts, measured.

``benchmarks/augmentation.py`` gave branched 0.793 with one mean per gene and 0.736 with the
class ratios (the default since), the per-class Gaussian 0.828 and 0.729. Both draw the same
kind of latents; only the decoder changed. Here no diffusion model is trained: per split, the
per-class Gaussian in the models' 30-PC space (the rows' latent generator) is decoded with
decoders that differ in one part at a time, and the rare types' real cells that were put aside
(their PC scores, decoded the same way) give each decoder's ceiling.

Decoders (all the package's negative binomial, fitted on the reduced train cells):
  one mean per gene                 the decoder before the class ratios
  class ratios (default)            per class and gene (O + 1) / (E + 1), dispersions fitted
                                    around the class means
  class ratios, + k pseudo-cells    the ratio shrunk toward 1 by k cells at the class's decoded
                                    mean as well (a class of 5 cells moves little): tests
                                    whether noisy ratios of a 5-cell type are the cause
  class ratios, dispersions of one mean   the class-ratio means with the other fit's per-gene
                                    dispersions: tests whether the dispersions are the cause
  no noise model / Gaussian noise   the default fit's space decoding to the mean profile
                                    (``residual_noise=False``) or adding Gaussian residuals of
                                    real cells' size (``"gaussian"``): tests whether the
                                    noise model is what the classifier loses

Rows per decoder: ``per-class Gaussian`` (generated) and ``probe: their PC scores, decoded``
(the ceiling of any generator of PC scores with that decoder). References: real only, and new
real rare cells (the known answer: must help). Protocol, classifier and splits are
augmentation.py's (5 splits of pbmc3k, 5 train cells per rare type, 50 cells added).

Usage (from the repository root, in the project's venv):
  python benchmarks/augmentation_decoders.py          # 3-8 min on 2 cores
  python benchmarks/augmentation_decoders.py --fast   # smoke test (numbers meaningless)
Writes docs/benchmarks/augmentation_decoders.md and, under --out, the per-split CSV.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import augmentation as aug
from quality import (
    LABELS,
    SpaceDecodedGaussian,
    _md,
    default_setup,
    prepare_run,
    write_lines,
)

SETTINGS = {
    "cpu": {"splits": [0, 1, 2, 3, 4], "n_rare": 5, "n_aug": 50, "pseudo_cells": [20, 100]},
    "fast": {"splits": [0], "n_rare": 5, "n_aug": 10, "pseudo_cells": [20]},
}
DEFAULT = "class ratios (default)"
#: other noise models of the default fit: decoder name -> ``residual_noise``
NOISE = {"no noise model (mean profile)": False, "Gaussian residual noise": "gaussian"}
ONE_MEAN = "one mean per gene"
GAUSSIAN = "per-class Gaussian"
CEILING = "probe: their PC scores, decoded"


def pseudo_cell_ratios(cells: float):
    """``class_ratios`` with ``cells`` pseudo-cells at the class's own decoded mean added to
    the one pseudo-count: ``(O + 1 + k E / n) / (E + 1 + k E / n)`` for a class of n cells."""
    import scipy.sparse as sp

    from scbranch._validation import to_dense

    def ratios(counts, expected, codes, n_classes=None, *, prior=None):
        codes = np.asarray(codes, dtype=np.int64)
        k = int(codes.max()) + 1 if n_classes is None else int(n_classes)
        onehot = sp.csr_matrix(
            (np.ones(len(codes)), (codes, np.arange(len(codes)))), (k, len(codes))
        )
        observed = to_dense(onehot @ counts).astype(np.float64)
        decoded = np.asarray(onehot @ np.asarray(expected, dtype=np.float64))
        n = np.maximum(np.bincount(codes, minlength=k), 1)[:, None]
        shrink = 1.0 + cells * decoded / n
        return (observed + shrink) / (decoded + shrink)

    return ratios


def decoders(model, setup, cfg) -> dict[str, dict]:
    """Negative-binomial fits of the model's space, one part changed at a time."""
    import scbranch.model._counts as counts

    space = model.space
    n_classes = len(model.classes)
    factors = space.counts.factors_of(setup, "counts", space.layer, space.var_names)
    labels = setup.obs[LABELS].cat.codes.to_numpy()
    default = dict(space.counts.nb)
    one_mean = space._fit_negative_binomial(setup, "counts", factors, None, n_classes)
    fits = {ONE_MEAN: one_mean, DEFAULT: default}
    original = counts.class_ratios
    for cells in cfg["pseudo_cells"]:
        counts.class_ratios = pseudo_cell_ratios(cells)
        try:
            fit = space._fit_negative_binomial(setup, "counts", factors, labels, n_classes)
        finally:
            counts.class_ratios = original
        fits[f"class ratios, + {cells} pseudo-cells"] = fit
    fits["class ratios, dispersions of one mean"] = {
        **default,
        "inverse_dispersion": one_mean["inverse_dispersion"],
    }
    return fits


def run_split(adata, rare: list[str], seed: int, cfg: dict) -> list[dict]:
    import scbranch as sb

    train, test, pool = aug.split(adata, rare, seed, cfg["n_rare"], 2000)
    x_train, y_train = aug._dense(train.X), train.obs[LABELS].astype(str).to_numpy()
    x_test, y_test = aug._dense(test.X), test.obs[LABELS].astype(str).to_numpy()
    setup = default_setup(train)
    model = sb.BranchedDiffusion(setup)  # untrained: only its space is used
    gaussian = SpaceDecodedGaussian(default_setup(train), model)
    unseen = pool[aug.unseen_index(pool, rare, cfg["n_aug"], seed)]
    added = {
        ("reference", "real only"): (x_train[:0], y_train[:0]),
        ("reference", aug.UNSEEN): aug.unseen_real(pool, rare, cfg["n_aug"], seed),
    }
    fits = decoders(model, setup, cfg)
    specs = [(name, fits[DEFAULT], noise) for name, noise in NOISE.items()]
    specs += [(name, nb, "nb") for name, nb in fits.items()]
    for name, nb, noise in specs:
        model.space.counts.nb, gaussian.noise = nb, noise
        added[(name, GAUSSIAN)] = aug.generated(gaussian, train, rare, cfg["n_aug"], seed)
        added[(name, CEILING)] = aug.through_space(model, unseen, train, noise, seed)
    info = {
        name: {
            "median dispersion": float(np.median(nb["inverse_dispersion"])),
            "median scale": float(np.median(nb["scale"])),
        }
        for name, nb in fits.items()
    }
    rows = []
    for (decoder, row), (x_add, y_add) in added.items():
        pred = aug.classify(np.vstack([x_train, x_add]), np.concatenate([y_train, y_add]), x_test)
        rows.append(
            {"split": seed, "decoder": decoder, "row": row, **info.get(decoder, {}),
             **aug.scores(y_test, pred, rare)}
        )  # fmt: skip
    return rows


def summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean ± sd over splits; gain over the default decoder's same row, paired by split."""
    out = {}
    for (decoder, row), r in rows.groupby(["decoder", "row"], sort=False):
        f = r.set_index("split")["rare_macro_f1"]
        entry = {"rare macro-F1": f"{f.mean():.3f} ± {f.std(ddof=1):.3f}"}
        base = rows[(rows["decoder"] == DEFAULT) & (rows["row"] == row)]
        if len(base) and decoder != DEFAULT:
            gain = f - base.set_index("split")["rare_macro_f1"].loc[f.index]
            entry["vs default decoder, paired"] = f"{gain.mean():+.3f} ± {gain.std(ddof=1):.3f}"
            entry["splits better"] = f"{int((gain > 0).sum())} / {len(gain)}"
        for col in ("median dispersion", "median scale"):
            if col in r and r[col].notna().any():
                entry[col] = f"{r[col].mean():.3g}"
        out[(decoder, row)] = entry
    table = pd.DataFrame(out).T.fillna("")
    table.index = [f"{d}: {r}" if d != "reference" else r for d, r in table.index]
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="smoke-test settings")
    parser.add_argument("--out", default="benchmark_out/augmentation_decoders")
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    cfg_name = "fast" if args.fast else "cpu"
    cfg = SETTINGS[cfg_name]
    markdown = prepare_run(args, "augmentation_decoders")
    t0 = time.perf_counter()
    adata = aug.raw_counts("pbmc3k")
    rare = aug.rare_types(adata.obs[LABELS])
    rows = []
    for seed in cfg["splits"]:
        rows += run_split(adata, rare, seed, cfg)
        pd.DataFrame(rows).to_csv("rows.csv", index=False)
    rows = pd.DataFrame(rows)
    lines = [
        "# Augmentation and the decoder's parts (generated by "
        "`benchmarks/augmentation_decoders.py`; do not edit by hand)",
        "",
        f"Settings `{cfg_name}`: pbmc3k, split seeds {cfg['splits']}, rare types "
        f"({', '.join(rare)}) cut to {cfg['n_rare']} train cells, {cfg['n_aug']} cells added "
        "per rare type; "
        "protocol and classifier of [augmentation](augmentation.md). No diffusion model: the "
        "per-class Gaussian in the models' 30-PC space, decoded by each decoder; `probe: their "
        "PC scores, decoded` decodes the rare types' real cells that were put aside (the "
        "ceiling of any generator of PC scores with that decoder). Read every row against "
        f"`{aug.UNSEEN}` (new real cells: the known answer, must help) and `real only`. "
        f"Rare macro-F1, mean ± sd over splits. Wall time {(time.perf_counter() - t0) / 60:.1f} "
        "min.",
        "",
        _md(summary(rows)),
        "",
    ]
    print(write_lines(markdown, lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
