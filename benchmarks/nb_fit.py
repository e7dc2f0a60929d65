"""The negative-binomial decoder's fit: library sizes, zeros and the decoder's known answer.

``generate(residual_noise="nb")`` (the default for PCA models set up with counts) draws counts
around the decoded profile from a per-gene negative binomial fitted at set-up
(``scbranch.model._counts.fit_negative_binomial``). Four fits of the same decoder are compared
on the same cells:

  moments only         per-gene scale matching the genes' total counts, dispersion by the
                       method of moments on the raw counts (no log-space refinement)
  scales raised        the fit until 53c488c: moments, then the scales raised in four rounds
                       until the log-normalised draws match each gene's mean expression
  dispersion bisected  dispersion bisected per gene so the log-normalised draws match each
                       gene's mean expression, then the scales, then one common factor so the
                       genes' summed mean is the real total (two rounds)
  default              the same around each class's own mean: the decoded mean times the
                       class's ratio of observed to decoded counts per gene (class ratios,
                       benchmarks/class_ratios.py)

Every fit decodes as the package does since the per-cell library means
(``scbranch.model._counts.cell_means``): a cell's means sum to its library size. The column
``total spread / real`` (per type, the sd of log totals over the real cells', geometric mean
over types) reads 1 for the real cells.

Rows are the decoder's known answer: the PC scores of real cells nothing saw (the unseen
split), decoded with each fit, judged by ``tl.evaluate(gen, held, train=train)`` (reference PCA
on the train cells) next to the real unseen cells themselves, which must sit at the control.
Count columns compare the drawn counts with the unseen cells' real counts (same genes).

Usage (from the repository root, in the project's venv):
  python benchmarks/nb_fit.py          # about 6 min on 2 cores
  python benchmarks/nb_fit.py --fast   # smoke test; numbers meaningless
Writes docs/benchmarks/nb_fit.md.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

import numpy as np
import pandas as pd
from out_of_fold import METRICS
from quality import (
    LABELS,
    LOADERS,
    SPLIT,
    _fmt,
    _md,
    cpu_threads,
    decode_in_space,
    default_setup,
    prepare_run,
    scores_of,
    write_lines,
)


def total_spread(totals, real_totals, labels, min_cells: int = 10) -> float:
    """Per type, the sd of log totals over the real cells' (geometric mean over types).

    A type's cells have their own depth; the decoded mean used to set it too, and spread
    generated totals wider than real ones. The real cells themselves read 1.
    """
    ratios = [
        np.std(np.log(np.maximum(totals[labels == c], 1)))
        / np.std(np.log(np.maximum(real_totals[labels == c], 1)))
        for c in np.unique(labels)
        if (labels == c).sum() >= min_cells
    ]
    return float(np.exp(np.mean(np.log(ratios))))


SETTINGS = {"cpu": {"seeds": [0, 1, 2]}, "fast": {"seeds": [0]}}


def scales_raised(counts, factors, expected, expression, n_rounds: int = 4, seed: int = 0):
    """The fit until 53c488c: moments, then per-gene scales raised to match log means."""
    from scbranch._validation import to_dense
    from scbranch.model._counts import (
        MAX_INVERSE_DISPERSION,
        fit_negative_binomial,
        sample_negative_binomial,
    )

    fit = fit_negative_binomial(counts, factors, expected)  # moments only
    c = to_dense(counts).astype(np.float64)
    mu0 = factors[:, None] * np.expm1(np.clip(np.asarray(expected, np.float64), 0.0, None))
    scale, target = fit["scale"].astype(np.float64), fit["target_sum"]

    def dispersion(scale):
        mu = mu0 * scale
        excess, square = ((c - mu) ** 2 - mu).sum(0), (mu**2).sum(0)
        phi = np.divide(excess, square, out=np.zeros_like(excess), where=square > 0)
        return np.clip(phi, 0.0, MAX_INVERSE_DISPERSION)

    phi, rng = dispersion(scale), np.random.default_rng(seed)
    real_mean = to_dense(expression).astype(np.float64).mean(0)
    for _ in range(n_rounds):
        draws = sample_negative_binomial(mu0 * scale, phi, rng)
        totals = np.maximum(draws.sum(1, keepdims=True), 1.0)
        scale = scale * np.exp(
            np.clip(real_mean - np.log1p(draws * (target / totals)).mean(0), -1, 1)
        )
        phi = dispersion(scale)
    return {
        "scale": scale.astype(np.float32),
        "inverse_dispersion": phi.astype(np.float32),
        "target_sum": target,
    }


#: the fit set-up makes
DEFAULT_FIT = "default: bisected, class ratios"


@contextlib.contextmanager
def depth_from_the_profile():
    """Decode (and fit) as before the per-cell library means: the decoded profile set depth.

    Both modules' ``cell_means`` are replaced by the identity for the block, so the one run
    reads the change against what it changed.
    """
    import scbranch.model._counts as fit_module
    import scbranch.model._spaces._gene_counts as decode_module

    saved = fit_module.cell_means, decode_module.cell_means

    def as_decoded(mu, factors, target_sum):
        return np.asarray(mu, dtype=np.float64)

    fit_module.cell_means = decode_module.cell_means = as_decoded
    try:
        yield
    finally:
        fit_module.cell_means, decode_module.cell_means = saved


def fits(adata, space, only: str | None = None) -> dict:
    """Fit name -> (negative binomial parameters, seconds); ``only``: that fit alone."""
    from scbranch._validation import to_dense
    from scbranch.model._counts import fit_negative_binomial
    from scbranch.model._decoding import decode
    from scbranch.model._spaces import _SizeFactorCounts

    factors = _SizeFactorCounts.factors_of(adata, "counts", None, space.var_names)
    expected = decode(space.decoder, np.asarray(adata.obsm[space.obsm_key], np.float32))
    counts, expression = adata.layers["counts"], to_dense(adata.X)
    codes = adata.obs[LABELS].cat.codes.to_numpy()
    n_classes = len(adata.obs[LABELS].cat.categories)
    out = {}
    for name, fit in {
        "moments only": lambda: fit_negative_binomial(counts, factors, expected),
        "scales raised": lambda: scales_raised(counts, factors, expected, expression),
        "dispersion bisected": lambda: fit_negative_binomial(counts, factors, expected, expression),
        # what set-up fits: the same, around each class's own mean (benchmarks/class_ratios.py)
        DEFAULT_FIT: lambda: fit_negative_binomial(
            counts, factors, expected, expression, codes=codes, n_classes=n_classes
        ),
    }.items():
        if only is not None and name != only:
            continue
        t0 = time.perf_counter()
        out[name] = (fit(), time.perf_counter() - t0)
    return out


def run_dataset(name, loader, cfg) -> tuple[pd.DataFrame, dict]:
    import scbranch as sb

    train, held, unseen = loader(seed=0, fractions=SPLIT)
    model = sb.BranchedDiffusion(default_setup(train))
    space = model.space
    z = scores_of(unseen, space.decoder)
    labels = unseen.obs[LABELS].astype(str).to_numpy()
    real_counts = unseen[:, space.var_names].layers["counts"]
    real_totals = np.asarray(real_counts.sum(1)).ravel()
    real_zeros = 1 - real_counts.nnz / np.prod(real_counts.shape)
    records = []

    def judge(row, gen, seed, counts=None, fit_s=np.nan):
        report = sb.tl.evaluate(gen, held, LABELS, train=train, seed=seed)
        values = report[report["group"] == "mean"].set_index(["space", "metric"])
        rec = {"row": row, "seed": seed, "fit_s": fit_s}
        for space_, m in METRICS:
            rec[m] = values.loc[(space_, m), "generated"]
            rec[f"{m} control"] = values.loc[(space_, m), "control"]
        if counts is not None:
            totals = np.asarray(counts.sum(1)).ravel()
            rec["mean total / real"] = totals.mean() / real_totals.mean()
            rec["median total / real"] = np.median(totals) / np.median(real_totals)
            rec["zero fraction"] = 1 - counts.nnz / np.prod(counts.shape)
            rec["total spread / real"] = total_spread(totals, real_totals, labels)
        records.append(rec)

    from quality import TrainCellsProbe

    for seed in cfg["seeds"]:
        gen = TrainCellsProbe(unseen).generate(10**6, seed)
        judge("probe: real cells, unseen", gen, seed, real_counts)
        records[-1]["zero fraction"] = real_zeros
    codes = np.array([model.classes.index(c) for c in labels])
    options = space.resolve_options(counts=True, batch=None, residual_noise="nb")

    def decode_all(row, nb, fit_s):
        space.counts.nb = nb
        for seed in cfg["seeds"]:
            counts = space.decode(np.asarray(z, np.float32), codes, options, seed).layers["counts"]
            gen = decode_in_space(model, z, labels, "nb", seed)
            judge(row, gen, seed, counts, fit_s)

    with depth_from_the_profile():  # the decoder before per-cell library means, fitted so too
        ((nb, fit_s),) = fits(default_setup(train), space, only=DEFAULT_FIT).values()
        decode_all(
            "unseen cells' PC scores, default fit, depth from the profile (before)", nb, fit_s
        )
    for fit_name, (nb, fit_s) in fits(default_setup(train), space).items():
        decode_all(f"unseen cells' PC scores, {fit_name} fit", nb, fit_s)
    meta = {
        "n_train": train.n_obs,
        "n_unseen": unseen.n_obs,
        "n_genes": train.n_vars,
        "real_mean_total": real_totals.mean(),
        "real_zeros": real_zeros,
    }
    return pd.DataFrame(records), meta


def table(df: pd.DataFrame) -> pd.DataFrame:
    order = list(dict.fromkeys(df["row"]))
    metrics = [m for _, m in METRICS]
    cols = [
        "mean total / real", "median total / real", "total spread / real", "zero fraction",
        *metrics, "fit_s",
    ]  # fmt: skip
    out = {}
    for row in order:
        g = df[df["row"] == row]
        out[row] = {c: _fmt(g[c].mean(), g[c].std(ddof=0)) if c in g else "n/a" for c in cols}
    out["real vs real (control)"] = {
        c: _fmt(df[f"{c} control"].mean(), df[f"{c} control"].std(ddof=0)) if c in metrics else ""
        for c in cols
    }
    return pd.DataFrame(out).T[cols]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="smoke-test settings")
    parser.add_argument("--datasets", default="pbmc68k,pbmc3k")
    parser.add_argument("--out", default="benchmark_out/nb_fit")
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    cfg_name = "fast" if args.fast else "cpu"
    cfg = SETTINGS[cfg_name]
    markdown = prepare_run(args, "nb_fit")
    loaders = LOADERS
    t_all = time.perf_counter()
    lines = [
        "# The negative-binomial decoder's fit (generated by `benchmarks/nb_fit.py`; do not "
        "edit by hand)",
        "",
        f"Settings `{cfg_name}`: generation seeds {cfg['seeds']}; split seed 0, train / "
        "held-out / unseen 50/30/20 %; the decoder of a model set up as the package's default "
        "(out-of-fold PC scores of the train cells, `counts_layer`). Rows decode the unseen "
        "cells' PC scores (out-of-sample projections) with each fit; metrics: `tl.evaluate(gen, "
        "held, train=train)`, mean over classes, then mean ± sd over seeds. Count columns: the "
        "drawn counts against the unseen cells' real counts (`probe` row: the real counts "
        f"themselves). `fit_s`: seconds to fit on the train cells ({cpu_threads()}).",
        "",
        "Read every row against the control and `probe: real cells, unseen`, which must sit at "
        "the control.",
    ]
    for name in args.datasets.split(","):
        df, meta = run_dataset(name, loaders[name], cfg)
        df.to_csv(f"rows_{name}.csv", index=False)
        lines += [
            "",
            f"## {name}",
            "",
            f"{meta['n_train']} train / {meta['n_unseen']} unseen cells, {meta['n_genes']} "
            f"genes; the unseen cells' mean total {meta['real_mean_total']:.0f} counts, zero "
            f"fraction {meta['real_zeros']:.3f}.",
            "",
            _md(table(df)),
        ]
    lines += ["", f"Total wall time {(time.perf_counter() - t_all) / 60:.1f} min.", ""]
    print(write_lines(markdown, lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
