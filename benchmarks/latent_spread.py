"""Where the generated cells' excess spread sits: per latent component, class by class.

Over the splits of benchmarks/split_seeds.py the default's cells on pbmc68k_reduced are more
dispersed than real ones (1.05 against the unseen real cells' 0.98) and farther from the
training cells; the decoder is not the cause (the unseen cells' own PC scores, decoded, sit at
the control). This study looks in the model's latent, the out-of-fold PC scores: for each
split, class and component, the variance of the generated cells' latents over the variance of
real cells' scores on the same PCA (the held-out cells, out-of-sample for it). Rows:

  default              the default model and sampler (reverse SDE, Euler-Maruyama, 25 steps)
  calibrated           the same cells with each type's training spread per component
                       (``generate(calibrate_spread=True)``)
  ei50                 the same model with the exponential integrator, 50 steps: what is left
                       once the sampler follows the model closely
  white                the model trained on the scores with every component scaled to unit
                       within-type variance (quality.py's ``conditioned:white``), scaled back
  probe: train cells' out-of-fold scores   what the model learns from (should be 1)
  probe: unseen real cells                 the known answer: real cells nobody saw (must be 1)

Reported: the geometric mean of the variance ratio over classes and splits, for bands of
components (the leading ones carry the types' differences, the trailing ones little), and the
mean shift of the class centre in units of the real cells' sd. Then, per type, how far the cells
lie from the nearest training cell of their type, in the leading 10 components and in all 30,
over the same distance of the held-out real cells: a generator that fills the space between the
training cells instead of lying where new cells lie reads above 1 at the right variance.

Usage (from the repository root): python benchmarks/latent_spread.py [--splits 3]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import pandas as pd
from quality import (
    LABELS,
    LATENT,
    LOADERS,
    SETTINGS,
    SPLIT,
    _md,
    cpu_threads,
    prepare_run,
    scores_of,
    train_model,
    write_lines,
)

#: components grouped as in the report (1-based, inclusive)
BANDS = ((1, 5), (6, 10), (11, 20), (21, 30))
ROWS = (
    "default",
    "calibrated",
    "ei50",
    "white",
    "probe: train cells' out-of-fold scores",
    "probe: unseen real cells",
)
#: types with at least this many held-out cells are read (pbmc68k_reduced: the four of the
#: quality benchmark)
MIN_CELLS = 20


def spread_rows(latents: dict, reference: np.ndarray, ref_labels, classes) -> pd.DataFrame:
    """Per class and component: variance ratio and centre shift of each set of latents against
    ``reference`` (the real cells' scores), one row per (set, class, component).

    ``latents`` maps a row name to ``(z, labels)``.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> ref = rng.normal(size=(4000, 2))
    >>> lab = np.array(["a"] * 4000)
    >>> out = spread_rows({"x": (2 * rng.normal(size=(4000, 2)), lab)}, ref, lab, ["a"])
    >>> bool(np.allclose(out["ratio"], 4.0, rtol=0.1))  # twice the sd: four times the variance
    True
    """
    rows = []
    for name, (z, labels) in latents.items():
        for c in classes:
            z_c, r_c = z[np.asarray(labels) == c], reference[np.asarray(ref_labels) == c]
            sd = r_c.std(0, ddof=1)
            ratio = z_c.var(0, ddof=1) / np.maximum(sd**2, 1e-12)
            shift = (z_c.mean(0) - r_c.mean(0)) / np.maximum(sd, 1e-12)
            for d in range(z.shape[1]):
                rows.append(
                    {
                        "row": name,
                        "class": c,
                        "component": d + 1,
                        "ratio": ratio[d],
                        "shift": shift[d],
                    }
                )
    return pd.DataFrame(rows)


#: leading components of the nearest-training-cell distance (where the types differ)
LEADING = 10


def nearest_rows(
    latents: dict, train_z: np.ndarray, train_labels, reference: np.ndarray, ref_labels, classes
) -> pd.DataFrame:
    """Per set of latents and class: the mean distance of its cells to the nearest training
    cell of the class, in the leading :data:`LEADING` components and in all, over the same of
    the ``reference`` (held-out real) cells.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> train = rng.normal(size=(300, 3))
    >>> lab = np.array(["a"] * 300)
    >>> same = {"x": (rng.normal(size=(300, 3)), lab)}
    >>> out = nearest_rows(same, train, lab, rng.normal(size=(300, 3)), lab, ["a"])
    >>> bool(abs(out["leading"].iloc[0] - 1) < 0.1)
    True
    """

    def mean_nearest(z, t, dims):
        d = ((z[:, None, :dims] - t[None, :, :dims]) ** 2).sum(-1)
        return np.sqrt(d.min(1)).mean()

    rows = []
    for name, (z, labels) in latents.items():
        for c in classes:
            t = train_z[np.asarray(train_labels) == c]
            z_c, r_c = z[np.asarray(labels) == c], reference[np.asarray(ref_labels) == c]
            entry = {"row": name, "class": c}
            for key, dims in (("leading", LEADING), ("all", z.shape[1])):
                entry[key] = mean_nearest(z_c, t, dims) / mean_nearest(r_c, t, dims)
            rows.append(entry)
    return pd.DataFrame(rows)


def band_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Geometric mean of the variance ratio (and root mean square centre shift) per row and band
    of components, over every class and split in ``rows``.

    Examples
    --------
    >>> rows = pd.DataFrame({"row": "x", "component": [1, 2, 30], "ratio": [1.0, 4.0, 2.0],
    ...                      "shift": [0.0, 0.0, 3.0]})
    >>> band_table(rows).loc["x"].tolist()
    [2.0, nan, nan, 2.0, 0.0, nan, nan, 3.0]
    """
    out = {}
    for lo, hi in BANDS:
        part = rows[(rows["component"] >= lo) & (rows["component"] <= hi)]
        grouped = part.groupby("row")
        out[f"variance, PCs {lo}-{hi}"] = grouped["ratio"].apply(lambda r: np.exp(np.log(r).mean()))
        out[f"shift, PCs {lo}-{hi}"] = grouped["shift"].apply(lambda s: np.sqrt((s**2).mean()))
    table = pd.DataFrame(out)
    order = [c for c in table.columns if c.startswith("variance")]
    order += [c for c in table.columns if c.startswith("shift")]
    return table[order].reindex(
        [r for r in ROWS if r in table.index] + sorted(set(table.index) - set(ROWS))
    )


def nearest_table(nearest: pd.DataFrame) -> pd.DataFrame:
    """Rows x (type, band): the mean over splits of :func:`nearest_rows`' ratios."""
    table = nearest.groupby(["row", "class"])[["leading", "all"]].mean().unstack("class")
    bands = {"leading": f"PCs 1-{LEADING}", "all": "all"}
    table.columns = [f"{c}, {bands[band]}" for band, c in table.columns]
    return table.reindex([r for r in ROWS if r in table.index])


def run_split(name: str, split: int, cfg: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    train, held, unseen = LOADERS[name](seed=split, fractions=SPLIT)
    model = train_model(train, cfg, 0, "conditioned")
    decoder = model.space.decoder
    held_labels = held.obs[LABELS].to_numpy()
    classes = [c for c in model.classes if (held_labels == c).sum() >= MIN_CELLS]
    latents = {}
    rows = (
        ("default", {}),
        ("calibrated", {"calibrate_spread": True}),
        ("ei50", {"solver": "ei", "n_steps": 50}),
    )
    for row, options in rows:
        gen = model.generate(n_cells=cfg["n_cells"], seed=0, progress_bar=False, **options)
        latents[row] = (np.asarray(gen.obsm[LATENT]), gen.obs[LABELS].to_numpy())
    pre = train_model(train, cfg, 0, "conditioned:white")  # quality.py's PreconditionedModel
    gen = pre.model.generate(n_cells=cfg["n_cells"], seed=0, progress_bar=False)
    latents["white"] = (np.asarray(gen.obsm["X_white"]) / pre.factor, gen.obs[LABELS].to_numpy())
    train_z, train_labels = np.asarray(train.obsm[LATENT]), train.obs[LABELS].to_numpy()
    latents[ROWS[4]] = (train_z, train_labels)
    latents[ROWS[5]] = (scores_of(unseen, decoder), unseen.obs[LABELS].to_numpy())
    reference = scores_of(held, decoder)
    spread = spread_rows(latents, reference, held_labels, classes).assign(split=split)
    # the training cells are their own nearest cells: no distance row for them
    others = {k: v for k, v in latents.items() if k != ROWS[4]}
    nearest = nearest_rows(others, train_z, train_labels, reference, held_labels, classes)
    return spread, nearest.assign(split=split)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default="pbmc68k")
    parser.add_argument("--splits", type=int, default=3)
    parser.add_argument("--out", default="benchmark_out/latent_spread")
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fast", action="store_true", help="smoke-test settings")
    args = parser.parse_args(argv)
    cfg = SETTINGS["fast" if args.fast else "cpu"]
    markdown = prepare_run(args, "latent_spread")
    t0 = time.perf_counter()
    lines = [
        "# Where the excess spread sits (generated by `benchmarks/latent_spread.py`; do not edit "
        "by hand)",
        "",
        "Per split, type (at least 20 held-out cells) and component of the models' latent (the "
        "out-of-fold PC scores): the variance of each set of latents over the variance of the "
        "held-out real cells' scores on the same PCA (out-of-sample for it), then the geometric "
        "mean over types and splits per band of components; `shift` is the root mean square "
        "distance of the type's centre from the real cells', in units of their sd. The known "
        "answer, unseen real cells, must read 1 (and a shift of the size two samples of these "
        f"sizes have). The default conditioned model, training seed 0, {cfg['n_cells']} cells "
        "per type, generation seed 0. "
        f"`python benchmarks/latent_spread.py --splits {args.splits}`.",
    ]
    for name in args.datasets.split(","):
        parts = [run_split(name, s, cfg) for s in range(args.splits)]
        rows = pd.concat([p[0] for p in parts], ignore_index=True)
        nearest = pd.concat([p[1] for p in parts], ignore_index=True)
        rows.to_csv(f"rows_{name}.csv", index=False)
        nearest.to_csv(f"nearest_{name}.csv", index=False)
        lines += ["", f"## {name}: {args.splits} splits", "", _md(band_table(rows).round(3))]
        lines += [
            "",
            f"Distance to the nearest training cell of the type, PCs 1-{LEADING} / all, over "
            "the held-out real cells' (mean over splits; unseen real cells must read 1):",
            "",
            _md(nearest_table(nearest).round(3)),
        ]
    lines += ["", f"Wall time {(time.perf_counter() - t0) / 60:.1f} min on {cpu_threads()}."]
    print(write_lines(markdown, lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
