"""Rare-type augmentation benchmark: do generated cells help a cell-type classifier?

How users use a generator: a reference has only a handful of cells of a rare type, so a
classifier trained on it misses that type; generated cells of the type are added to the
training set. Protocol, per dataset and split seed (>= 5 splits):

1. Cells are split per class into train (70 %) and test (30 %), stratified and seeded.
2. Rare types (< 5 % of the dataset's cells) are cut down to ``n_rare`` train cells (a handful);
   their other train cells are put aside, seen by nothing (the pool of the known answer below).
3. Genes (pbmc3k: 2,000 HVGs) and the models' 30-PC space are fitted on the reduced train cells
   only; every part is log-normalised over those genes.
4. Every method is fitted on the reduced train cells and adds ``n_aug`` cells of each rare type.
5. Classifier, the CellTypist recipe: genes scaled on the training set (clipped at 10), then a
   multinomial logistic regression; macro-F1 over the rare types on the test cells (and over all
   types, to see that the abundant types do not pay for it).

Rows:
  real only                the reduced train cells, nothing added
  copies of rare cells     the handful of real rare cells, resampled with replacement (the
                           oversampling every generator has to beat)
  per-class Gaussian       Ledoit-Wolf Gaussian per class on the models' latent, decoded by the
                           models' space (negative binomial)
  scVI resampling          latents from the class's aggregated posterior, NB counts, log-normalised
  ..., denoised            the two baselines without their noise model (the Gaussian's latents
                           decoded to the mean profile; scVI's decoder mean, no counts drawn):
                           each baseline at its best for a classifier, next to the models'
                           ``:denoised`` rows
  flat, branched, ...      the diffusion models in the package's default configuration (as in
                           benchmarks/quality.py): out-of-fold PC scores of the reduced train
                           cells, set up with the counts (negative-binomial decoding), the
                           default training budget
Known answers (probes, not methods):
  real rare cells, unseen  the rare types' real train cells that were put aside: new real cells
                           (up to ``n_aug``) must help, or the instrument cannot see help
  their PC scores, decoded the same cells' scores on the models' 30-PC space, decoded by that
                           space (negative binomial) exactly as generated cells are: the best
                           any generator of PC scores can do with this decoder (its ceiling)
  ..., decoded, denoised   the same, decoded to the mean profile: the ceiling of the
                           ``:denoised`` rows
  mislabelled cells        ``n_aug`` real cells of the abundant types labelled as each rare type:
                           wrong cells must not help (with a handful of real cells the rare
                           types' F1 starts near its floor, so it cannot fall much)

Usage (from the repository root, in the project's venv):
  python benchmarks/augmentation.py            # 5 splits of pbmc3k, about 35 min on 2 cores
  python benchmarks/augmentation.py --datasets pbmc3k,pbmc68k   # pbmc68k_reduced too: its
                                               # rare types have 8-31 cells, 2-9 test cells
  python benchmarks/augmentation.py --datasets pbmc68k --splits 20   # more splits for its
                                               # few test cells, about 10 min
  python benchmarks/augmentation.py --fast     # smoke test (numbers meaningless)
More diffusion rows for an earlier run: run them alone (``--architectures branched:per_branch
--no-baselines --out DIR``), append DIR/rows.csv to the earlier rows.csv (and DIR's
environment.json entries to its environment.json, which the page quotes) and rebuild the page
(``--report-only``).
Writes docs/benchmarks/augmentation.md and, under --out, the per-split CSV.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import (
    LABELS,
    PBMC3K,
    _md,
    environment_text,
    fit_methods,
    prepare_run,
    record_environment,
    scvi_epochs_text,
    select_genes,
    write_lines,
)

SETTINGS = {
    "cpu": {
        "steps": None,  # the package's default budget
        "batch_size": 64,
        "scvi_epochs": None,  # the package's own; pages before stop 66 trained 200
        "splits": [0, 1, 2, 3, 4],
        "n_rare": 5,
        "n_aug": 50,
        "accelerator": "cpu",
    },
    "fast": {
        "steps": 20,
        "batch_size": 64,
        "scvi_epochs": 2,
        "splits": [0, 1],
        "n_rare": 5,
        "n_aug": 20,
        "accelerator": "cpu",
    },
}
#: a type is rare below this share of the dataset's cells
RARE_SHARE = 0.05
TEST_SHARE = 0.3
#: rows of the fitted methods that are added as they are (the quality
#: benchmark's probes are left out)
METHOD_ROWS = ("per-class Gaussian", "scVI resampling")
#: the same baselines without their noise model: denoised cells help a classifier more
#: (augmentation_decoders.py), so a ``:denoised`` model row is read against these
DENOISED = ", denoised"
REAL_ONLY = "real only"
COPIES = "copies of rare cells"
UNSEEN = "probe: real rare cells, unseen"
DECODED = "probe: their PC scores, decoded"
MISLABELLED = "probe: mislabelled cells"

logger = logging.getLogger("augmentation")


# ----------------------------------------------------------------------------- data
def raw_counts(name: str):
    """The dataset with raw counts in ``.X`` and ``obs[LABELS]`` as a category."""
    import anndata as ad

    import scbranch as sb

    if name == "pbmc3k":
        adata = ad.read_h5ad(PBMC3K)
    else:
        adata = sb.datasets.pbmc68k()
        adata = ad.AnnData(X=adata.layers["counts"], obs=adata.obs[[LABELS]], var=adata.var)
    adata.obs[LABELS] = adata.obs[LABELS].astype(str).astype("category")
    return adata


def rare_types(labels: pd.Series) -> list[str]:
    """Types below ``RARE_SHARE`` of all cells."""
    share = labels.value_counts(normalize=True)
    return sorted(share.index[share < RARE_SHARE])


def split(adata, rare: list[str], seed: int, n_rare: int, n_hvg: int | None):
    """Train (rare types cut to ``n_rare``), test, and the rare cells put aside, all
    log-normalised over genes chosen on the reduced train cells; the PCA of train only."""
    import scanpy as sc
    import scipy.sparse as sp

    import scbranch as sb

    train_idx, test_idx = sb.datasets.stratified_split(
        adata.obs[LABELS], (1 - TEST_SHARE, TEST_SHARE), seed
    )
    rng = np.random.default_rng(seed)
    labels = adata.obs[LABELS].to_numpy()[train_idx]
    keep = np.ones(len(train_idx), bool)
    for c in rare:
        members = rng.permutation(np.flatnonzero(labels == c))
        keep[members[n_rare:]] = False
    parts = [adata[train_idx[keep]], adata[test_idx], adata[train_idx[~keep]]]
    genes = select_genes(parts[0].copy(), n_hvg, "seurat")
    out = []
    for part in parts:
        part = part[:, genes].copy()
        part.obs[LABELS] = part.obs[LABELS].cat.remove_unused_categories()
        part.layers["counts"] = sp.csr_matrix(part.X, dtype=np.float32)
        sc.pp.normalize_total(part, target_sum=1e4)
        sc.pp.log1p(part)
        part.X = sp.csr_matrix(part.X, dtype=np.float32)
        out.append(part)
    sc.pp.pca(out[0], n_comps=30, random_state=0)
    return tuple(out)


# ----------------------------------------------------------------------------- classifier
def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float32)


def classify(x_train, y_train, x_test, seed: int = 0) -> np.ndarray:
    """The CellTypist recipe: genes scaled on the training set and clipped at 10, then a
    multinomial logistic regression (L2, C = 1). Returns the predicted labels of ``x_test``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_train)
    clf = LogisticRegression(C=1.0, max_iter=1000, random_state=seed)
    clf.fit(np.clip(scaler.transform(x_train), -10, 10), y_train)
    return clf.predict(np.clip(scaler.transform(x_test), -10, 10))


def scores(y_true, y_pred, rare: list[str]) -> dict[str, float]:
    """Macro-F1 over the rare types and over all types, and F1 of each rare type."""
    from sklearn.metrics import f1_score

    out = {
        "rare_macro_f1": f1_score(y_true, y_pred, labels=rare, average="macro", zero_division=0),
        "macro_f1": f1_score(y_true, y_pred, average="macro", zero_division=0),
    }
    per_rare = f1_score(y_true, y_pred, labels=rare, average=None, zero_division=0)
    for c, f in zip(rare, per_rare, strict=True):
        out[f"f1: {c}"] = f
    return out


# ----------------------------------------------------------------------------- added cells
def copies(train, rare: list[str], n_aug: int, seed: int):
    """``n_aug`` draws with replacement from each rare type's real train cells."""
    rng = np.random.default_rng(seed)
    labels = train.obs[LABELS].to_numpy()
    idx = np.concatenate([rng.choice(np.flatnonzero(labels == c), n_aug) for c in rare])
    return _dense(train.X[idx]), labels[idx]


def unseen_index(pool, rare: list[str], n_aug: int, seed: int) -> np.ndarray:
    """Rows of up to ``n_aug`` of each rare type's real cells that were put aside (seeded)."""
    rng = np.random.default_rng(seed)
    labels = pool.obs[LABELS].to_numpy()
    return np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:n_aug] for c in rare])


def unseen_real(pool, rare: list[str], n_aug: int, seed: int):
    """Up to ``n_aug`` of each rare type's real cells that were put aside, without replacement."""
    idx = unseen_index(pool, rare, n_aug, seed)
    return _dense(pool.X[idx]), pool.obs[LABELS].to_numpy()[idx]


def through_space(model, cells, train, noise, seed: int):
    """Real ``cells``' scores on ``model``'s PCA, decoded with ``residual_noise=noise`` as
    generated latents are, in the train cells' genes."""
    from quality import decode_in_space, scores_of

    z = scores_of(cells, model.space.decoder)
    labels = cells.obs[LABELS].astype(str).to_numpy()
    gen = decode_in_space(model, z, labels, noise, seed)[:, train.var_names]
    return _dense(gen.X), gen.obs[LABELS].astype(str).to_numpy()


def decoded_unseen(train, pool, rare: list[str], n_aug: int, seed: int, noise="nb"):
    """The cells of :func:`unseen_real`, through the models' space: their scores on its PCA,
    decoded (negative binomial, or ``noise=False``: the mean profile) as the generated cells
    are. What the space can carry of new real cells, so the ceiling of any generator of its
    latents decoded that way."""
    from quality import default_setup

    import scbranch as sb

    space = sb.BranchedDiffusion(default_setup(train))  # untrained: only its space is used
    return through_space(space, pool[unseen_index(pool, rare, n_aug, seed)], train, noise, seed)


def mislabelled(train, rare: list[str], n_aug: int, seed: int):
    """``n_aug`` real train cells of the abundant types per rare type, labelled as that type."""
    rng = np.random.default_rng(seed)
    abundant = np.flatnonzero(~train.obs[LABELS].isin(rare).to_numpy())
    idx = rng.choice(abundant, n_aug * len(rare), replace=False)
    return _dense(train.X[idx]), np.repeat(rare, n_aug)


def generated(method, train, rare: list[str], n_aug: int, seed: int):
    """``n_aug`` generated cells of each rare type, in the train cells' genes."""
    gen = method.generate(n_cells={c: n_aug for c in rare}, seed=seed)
    gen = gen[:, train.var_names]
    return _dense(gen.X), gen.obs[LABELS].astype(str).to_numpy()


def denoised(method):
    """A fitted baseline row generating without its noise model (``residual_noise=False``)."""
    from quality import SpaceDecodedGaussian, _Generator

    if isinstance(method, SpaceDecodedGaussian):
        quiet = copy.copy(method)
        quiet.noise = False
        return quiet
    return _Generator(method.method, residual_noise=False)  # scVI resampling


# ----------------------------------------------------------------------------- run
def run_split(name: str, adata, rare: list[str], seed: int, cfg: dict) -> list[dict]:
    """Every row of one split seed: fit the methods on the reduced train cells, add their cells,
    classify the test cells."""
    n_hvg = 2000 if name == "pbmc3k" else None
    train, test, pool = split(adata, rare, seed, cfg["n_rare"], n_hvg)
    logger.info(
        "%s split %d: %d train cells (%s of each rare type), %d test, %d put aside",
        name,
        seed,
        train.n_obs,
        cfg["n_rare"],
        test.n_obs,
        pool.n_obs,
    )
    fit_cfg = {**cfg, "train_seeds": [seed]}
    t0 = time.perf_counter()
    fitted, cost = fit_methods(train, pool, fit_cfg, train_seed=seed)
    logger.info("fitted in %.0f s", time.perf_counter() - t0)
    x_train, y_train = _dense(train.X), train.obs[LABELS].astype(str).to_numpy()
    x_test, y_test = _dense(test.X), test.obs[LABELS].astype(str).to_numpy()
    added = {
        REAL_ONLY: (x_train[:0], y_train[:0]),
        COPIES: copies(train, rare, cfg["n_aug"], seed),
        UNSEEN: unseen_real(pool, rare, cfg["n_aug"], seed),
        DECODED: decoded_unseen(train, pool, rare, cfg["n_aug"], seed),
        DECODED + DENOISED: decoded_unseen(train, pool, rare, cfg["n_aug"], seed, noise=False),
        MISLABELLED: mislabelled(train, rare, cfg["n_aug"], seed),
    }
    baselines = METHOD_ROWS if cfg.get("baselines", True) else ()
    for row in (*cfg["architectures"], *baselines):
        added[row] = generated(fitted[row], train, rare, cfg["n_aug"], seed)
    for row in baselines:
        added[row + DENOISED] = generated(denoised(fitted[row]), train, rare, cfg["n_aug"], seed)
    rows = []
    for row, (x_add, y_add) in added.items():
        pred = classify(np.vstack([x_train, x_add]), np.concatenate([y_train, y_add]), x_test)
        rows.append(
            {
                "dataset": name,
                "split": seed,
                "method": row,
                "n_added": len(y_add),
                "fit_s": cost.get(row, {}).get("fit_s", 0.0),
                "tree": cost.get(row, {}).get("newick", ""),  # diffusion rows: the model's tree
                **scores(y_test, pred, rare),
            }
        )
        f1 = rows[-1]["rare_macro_f1"]
        logger.info("%s split %d %-32s rare macro-F1 %.3f", name, seed, row, f1)
    return rows


# ----------------------------------------------------------------------------- report
#: rows that are no generator: first and last on the page, never paired with a baseline
HEAD_ROWS = [REAL_ONLY, COPIES]
PROBE_ROWS = [UNSEEN, DECODED, DECODED + DENOISED, MISLABELLED]


def _order(methods) -> list[str]:
    return HEAD_ROWS + [m for m in methods if m not in HEAD_ROWS + PROBE_ROWS] + PROBE_ROWS


def summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean ± sd over splits, and the gain over real-only and over copies paired by split."""
    base = rows[rows["method"] == REAL_ONLY].set_index("split")["rare_macro_f1"]
    copy = rows[rows["method"] == COPIES].set_index("split")["rare_macro_f1"]
    out = {}
    for method, r in rows.groupby("method", sort=False):
        f = r.set_index("split")["rare_macro_f1"]
        gain, over_copies = f - base.loc[f.index], f - copy.loc[f.index]
        out[method] = {
            "rare macro-F1": f"{f.mean():.3f} ± {f.std(ddof=1):.3f}",
            "gain over real only": f"{gain.mean():+.3f} ± {gain.std(ddof=1):.3f}",
            "gain over copies": f"{over_copies.mean():+.3f} ± {over_copies.std(ddof=1):.3f}",
            "splits better than copies": f"{int((over_copies > 0).sum())} / {len(f)}",
            "macro-F1, all types": f"{r['macro_f1'].mean():.3f} ± {r['macro_f1'].std(ddof=1):.3f}",
        }
    table = pd.DataFrame(out).T
    return table.loc[_order(table.index)]


def against_baselines(rows: pd.DataFrame) -> pd.DataFrame | None:
    """Each generator's rare macro-F1 minus each baseline's, paired by split: mean ± sd over
    splits and the splits where the generator is higher (the must-show's "improves over every
    baseline's augmentation", read row by row)."""
    table = rows.pivot_table(index="split", columns="method", values="rare_macro_f1")
    baselines = [m for m in table if m.split(DENOISED)[0] in METHOD_ROWS]
    fixed = HEAD_ROWS + PROBE_ROWS
    models = [m for m in _order(table) if m not in fixed and m not in baselines]
    if not baselines or not models:
        return None
    out = {}
    for model in models:
        out[model] = {}
        for base in baselines:
            d = (table[model] - table[base]).dropna()
            out[model][f"minus {base}"] = (
                f"{d.mean():+.3f} ± {d.std(ddof=1):.3f} ({int((d > 0).sum())} up, "
                f"{int((d < 0).sum())} down)"
            )
    return pd.DataFrame(out).T


#: a row variant read against the same row without it, paired by split
TREE_VARIANT = ":latenttree"


def against_tree(rows: pd.DataFrame) -> pd.DataFrame | None:
    """Each scVI row against the same row with the tree of scVI's latent (``:latenttree``, the
    default before the expression's topology), paired by split; the splits where the two
    models' trees differ are counted (where they are the same, so are the rows)."""
    table = rows.pivot_table(index="split", columns="method", values="rare_macro_f1")
    trees = rows.pivot_table(index="split", columns="method", values="tree", aggfunc="first")
    out = {}
    for variant in [m for m in _order(table) if TREE_VARIANT in m]:
        model = variant.replace(TREE_VARIANT, "")
        if model not in table:
            continue
        d = (table[model] - table[variant]).dropna()
        differ = (trees[model] != trees[variant]).loc[d.index] if model in trees else None
        out[model] = {
            "minus the same row with the latent's tree": f"{d.mean():+.3f} ± {d.std(ddof=1):.3f} "
            f"({int((d > 0).sum())} up, {int((d < 0).sum())} down)",
            "splits whose trees differ": ""
            if differ is None
            else f"{int(differ.sum())} / {len(d)}",
            "mean difference where they differ": (
                "" if differ is None or not differ.any() else f"{d[differ].mean():+.3f}"
            ),
        }
    return pd.DataFrame(out).T if out else None


def per_type(rows: pd.DataFrame) -> pd.DataFrame:
    """F1 of each rare type, mean over splits."""
    cols = [c for c in rows.columns if c.startswith("f1: ")]
    table = rows.groupby("method", sort=False)[cols].mean().round(3).dropna(axis=1, how="all")
    table.columns = [c[4:] for c in table.columns]
    return table.loc[_order(table.index)]


def total_wall_s(rows: pd.DataFrame) -> float:
    """Wall time of the runs whose rows ``rows`` holds: each run's last value, added up (rows
    of a ``--no-baselines`` run appended to an earlier run's carry their own ``run``)."""
    if "wall_s" not in rows:
        return float("nan")
    runs = rows["run"].fillna("") if "run" in rows else pd.Series("", index=rows.index)
    return float(rows.groupby(runs)["wall_s"].max().sum())


def write_markdown(path: Path, rows: pd.DataFrame, info: dict, cfg_name: str, cfg: dict, wall_s):
    budget = "the default budget" if cfg["steps"] is None else f"{cfg['steps']} optimiser steps"
    lines = [
        "# Rare-type augmentation (generated by `benchmarks/augmentation.py`; do not edit by hand)",
        "",
        f"Settings `{cfg_name}`: split seeds {cfg['splits']}; per split, train / test "
        f"{1 - TEST_SHARE:.0%} / {TEST_SHARE:.0%} per class, rare types (< {RARE_SHARE:.0%} of the "
        f"cells) cut to {cfg['n_rare']} train cells, {cfg['n_aug']} cells added per rare type; "
        f"diffusion models {budget} (batch {cfg['batch_size']}) on the out-of-fold scores of a "
        f"30-PC space of the reduced train cells, negative-binomial decoding (`:scvi` rows: "
        "in the latent of an scVI model of the same cells, decoded by it), scVI "
        f"trained {scvi_epochs_text(cfg['scvi_epochs'])}. Classifier: genes "
        "scaled on the training set (clipped at 10), multinomial logistic regression (the "
        "CellTypist recipe)."
        + (f" Total wall time {wall_s / 60:.1f} min." if np.isfinite(wall_s) else "")
        + " "
        + environment_text(),
        "",
        "Read every row against the two known answers: new real cells of the rare types "
        "(`probe: real rare cells, unseen`, the rare train cells that were put aside, at most "
        f"{cfg['n_aug']} per type) must raise the rare types' F1, and real cells of other types "
        "labelled as rare (`probe: mislabelled cells`) must not raise it. The same new real cells "
        "through the models' 30-PC space (`probe: their PC scores, decoded`) are the ceiling of "
        "every generator of PC scores with this decoder, and decoded to the mean profile "
        "(`..., denoised`) the ceiling of the rows that generate without the noise model "
        "(`:denoised`; the baselines' `, denoised` rows are the same baselines generating that "
        "way, their fair comparison; scVI's denoised profile, like the scVI-space rows', is "
        "each latent's expected log-normalised counts: the mean of 20 draws in runs before "
        "2026-12-06, the exact expectation since). Gains are paired by "
        "split (same train and test cells): mean ± sd over splits.",
    ]
    for name, r in rows.groupby("dataset", sort=False):
        meta = info[name]
        lines += [
            "",
            f"## {name}",
            "",
            f"{meta['n_cells']} cells, {meta['n_genes']} genes in the classifier; rare types "
            f"({meta['rare_shares']}); per split {meta['n_test']} test cells, of them "
            f"{meta['n_test_rare']} of rare types.",
            "",
            _md(summary(r)),
        ]
        paired = against_baselines(r)
        if paired is not None:
            lines += [
                "",
                "Each generator against each baseline, paired by split (rare macro-F1 minus the "
                "baseline's: mean ± sd over splits; splits up and down):",
                "",
                _md(paired),
            ]
        by_tree = against_tree(r)
        if by_tree is not None:
            lines += [
                "",
                "Each scVI row against the same row with the tree of scVI's latent (the default "
                "before the expression's topology), paired by split (mean ± sd over splits):",
                "",
                _md(by_tree),
            ]
        lines += [
            "",
            "F1 per rare type (mean over splits):",
            "",
            _md(per_type(r)),
        ]
    return write_lines(path, lines, environment_line=False)  # each run's, from environment.json


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="smoke-test settings")
    parser.add_argument("--datasets", default="pbmc3k")
    parser.add_argument("--out", default="benchmark_out/augmentation", help="per-split CSV")
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--splits",
        type=int,
        default=None,
        help="number of split seeds (0, 1, ...; default 5); pbmc68k_reduced's rare types have "
        "2-9 test cells each, so it needs more splits than pbmc3k for the same spread",
    )
    parser.add_argument(
        "--first-split",
        type=int,
        default=0,
        help="first split seed (more splits for an earlier run: its rows.csv and this run's "
        "concatenated, then --report-only)",
    )
    parser.add_argument(
        "--architectures",
        default="branched,flat",
        help="diffusion models to compare (branched, flat, conditioned); empty: the baselines "
        "and probes only (rows to replace in an earlier run's rows.csv)",
    )
    parser.add_argument(
        "--no-baselines",
        action="store_true",
        help="fit only the diffusion models (append the rows to an earlier run's rows.csv "
        "and rebuild the page with --report-only)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild the markdown from rows.csv of a previous run in --out",
    )
    args = parser.parse_args(argv)
    cfg_name = "fast" if args.fast else "cpu"
    cfg = {
        **SETTINGS[cfg_name],
        "architectures": tuple(a for a in args.architectures.split(",") if a),
        "baselines": not args.no_baselines,
    }
    if args.splits is not None and args.splits < 2:
        parser.error(f"--splits must be at least 2 (gains are read over splits), got {args.splits}")
    if args.first_split < 0:
        parser.error(f"--first-split must be at least 0, got {args.first_split}")
    if args.splits is not None or args.first_split:
        n_splits = len(cfg["splits"]) if args.splits is None else args.splits
        cfg["splits"] = list(range(args.first_split, args.first_split + n_splits))
    markdown = prepare_run(args, "augmentation")
    t_all = time.perf_counter()
    run = time.strftime("%Y-%m-%dT%H:%M:%S")  # rows of several runs (--no-baselines) add up
    rows, info = [], {}
    if not args.report_only:
        record_environment(run, add=False)  # once: this run's rows.csv holds this run only
    if args.report_only:
        previous = pd.read_csv("rows.csv")
        rows = previous[previous["dataset"].isin(args.datasets.split(","))].to_dict("records")
        cfg["splits"] = sorted({int(r["split"]) for r in rows})  # the page names what it holds
        wall_s = total_wall_s(previous)
    for name in args.datasets.split(","):
        adata = raw_counts(name)
        rare = rare_types(adata.obs[LABELS])
        counts = adata.obs[LABELS].value_counts()
        _, test, _ = split(adata, rare, cfg["splits"][0], cfg["n_rare"], None)
        info[name] = {
            "n_cells": adata.n_obs,
            "n_genes": 2000 if name == "pbmc3k" else "all detected",
            "rare_shares": ", ".join(f"{c}: {counts[c]} cells" for c in rare),
            "n_test": test.n_obs,
            "n_test_rare": int(test.obs[LABELS].isin(rare).sum()),
        }
        for seed in [] if args.report_only else cfg["splits"]:
            rows += run_split(name, adata, rare, seed, cfg)
            wall_s = time.perf_counter() - t_all
            pd.DataFrame(rows).assign(wall_s=wall_s, run=run).to_csv("rows.csv", index=False)
    rows = pd.DataFrame(rows)
    print(write_markdown(markdown, rows, info, cfg_name, cfg, wall_s))
    return 0


if __name__ == "__main__":
    logging.getLogger("augmentation").setLevel(logging.INFO)
    sys.exit(main())
