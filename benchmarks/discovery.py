"""Discovery benchmark: how much the learned tree depends on the seed, by noise draws averaged.

Hierarchy discovery noises cells with ONE forward-noise draw by default, and its crossover times
are read off those Monte Carlo curves. ``n_noise_draws=k`` averages the curves over k draws.
For k in ``draws`` this script runs ``sb.tl.branch_hierarchy`` (all other options at their
defaults) with ``n_seeds`` seeds and reports:

  topologies      distinct trees (as sets of clades) over the seeds, and the share of seeds
                  giving the most common one
  true tree       (simulated data only) share of seeds recovering the simulated topology
  time sd         sd over seeds of each clade's branch time, averaged over the clades that
                  recur in at least half the seeds
  s / call        wall time of one ``branch_hierarchy`` call
  support         ``sb.tl.branch_stability`` (``n_bootstrap`` replicates of 80 % of each type's
                  cells, each with its own seed) of the seed-0 tree: mean and minimum support
                  over its internal branches (root excluded)

One more row per dataset, "expected curves", discovers the tree with ``curves="expected"``
(seed 0, defaults otherwise): similarity curves with NO Monte Carlo noise, the many-dimension
limit of the expected cosine of two noised cells. It reports whether that tree is the most
common one with the most draws, and the mean absolute difference of their shared branch times
(against those clades' mean times over the seeds).

The seed sets the subsample (types with more than 200 cells) and the noise; for pbmc68k (every
type under 200 cells) it sets the noise alone.

Data: pbmc68k (scanpy's shipped 700 cells, 30 PCs), the train cells of pbmc3k (70 % per type,
30 PCs of 2,000 HVGs; skipped if ../shared/data is absent) and two simulated trees of 16
Gaussian classes whose true topology is known (``SIMULATED``).

Last, on the real cells of pbmc3k (pbmc68k without it), the expected curves on the first d PCs
against 64 averaged sampled draws: largest difference of the (smoothed) between-type curves,
same tree, branch-time difference.

Usage (from the repository root, in the project's venv):
  python benchmarks/discovery.py          # about 10 min on 2 cores
  python benchmarks/discovery.py --fast   # smoke test (numbers meaningless)
Writes docs/benchmarks/discovery.md (--fast: under --out).
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import Counter

import numpy as np
import pandas as pd
from quality import LABELS, PBMC3K, _md, load_pbmc3k, prepare_run, write_lines

SETTINGS = {
    "cpu": {
        "draws": (1, 2, 4, 8, 16),
        "n_seeds": 20,
        "stability_draws": (1, 8),
        "n_bootstrap": 50,
        "dims": (30, 10, 5, 2),
    },
    "fast": {
        "dims": (10, 2),
        "draws": (1, 2),
        "n_seeds": 3,
        "stability_draws": (1, 2),
        "n_bootstrap": 3,
    },
}
#: simulated trees: 16 Gaussian classes; deeper splits shrink by ``decay`` per level, so the
#: closer it is to 1, the closer together the branch times (and the harder the topology)
SIMULATED = [
    {"depth": 4, "n_per_class": 60, "dim": 16, "decay": decay, "seed": 0} for decay in (0.7, 0.8)
]

logger = logging.getLogger("discovery")


def datasets(simulated: list[dict] | None = None) -> dict:
    """name -> (AnnData with ``obsm['X_pca']`` and ``obs[LABELS]``, true clades or None);
    ``simulated``: the ``simulate_tree`` parameters of the simulated sets (default
    :data:`SIMULATED`)."""
    import scbranch as sb
    from scbranch.datasets import simulate_tree

    out = {"pbmc68k": (sb.datasets.pbmc68k(), None)}
    if PBMC3K.exists():
        train, _ = load_pbmc3k(0)
        out["pbmc3k (train cells)"] = (train, None)
    else:
        logger.warning("%s not found: pbmc3k skipped.", PBMC3K)
    for params in SIMULATED if simulated is None else simulated:
        sim = simulate_tree(**params)
        adata = sim.to_anndata(labels_key=LABELS, obsm_key="X_pca")
        name = f"simulated tree ({len(sim.classes)} classes, decay {params['decay']})"
        out[name] = (adata, sim.true_splits)
    return out


def clades(record: dict) -> dict[frozenset, float]:
    """Internal non-root branches of a stored hierarchy: set of type names -> branch time."""
    from scbranch.module import BranchTree

    tree = BranchTree.from_dict(record["tree"])
    return {
        frozenset(tree.classes[c] for c in b.classes): b.t_start
        for b in tree.branches
        if b.children and len(b.classes) < tree.n_classes
    }


def seed_spread(adata, draws: int, n_seeds: int, truth) -> dict:
    """Topology and branch-time spread of branch_hierarchy over seeds, for one draw count."""
    import scbranch as sb

    trees, seconds = [], []
    for seed in range(n_seeds):
        t0 = time.perf_counter()
        rec = sb.tl.branch_hierarchy(
            adata, LABELS, use_rep="X_pca", n_noise_draws=draws, seed=seed, copy=True
        ).uns["scbranch_hierarchy"]
        seconds.append(time.perf_counter() - t0)
        trees.append(clades(rec))
    shapes = Counter(frozenset(t) for t in trees)
    recurring = Counter(c for t in trees for c in t)
    sds = [
        np.std([t[c] for t in trees if c in t]) for c, n in recurring.items() if n >= n_seeds / 2
    ]
    row = {
        "n_noise_draws": draws,
        "topologies": len(shapes),
        "modal share": shapes.most_common(1)[0][1] / n_seeds,
        "time sd": float(np.mean(sds)),
        "s / call": float(np.median(seconds)),
    }
    if truth is not None:
        true = frozenset(c for c in truth if len(c) < max(len(c) for c in truth))
        row["true tree"] = sum(frozenset(t) == true for t in trees) / n_seeds
    modal = shapes.most_common(1)[0][0]
    mean_times = {c: float(np.mean([t[c] for t in trees if c in t])) for c in modal}
    return row, mean_times


def expected_curves_row(adata, reference: dict[frozenset, float], truth) -> dict:
    """The ``curves="expected"`` tree (seed 0, defaults otherwise) vs the sampled trees."""
    import scbranch as sb

    t0 = time.perf_counter()
    found = clades(
        sb.tl.branch_hierarchy(adata, LABELS, use_rep="X_pca", curves="expected", copy=True).uns[
            "scbranch_hierarchy"
        ]
    )
    shared = [c for c in found if c in reference]
    row = {
        "n_noise_draws": "expected curves",
        "topologies": 1,
        "s / call": time.perf_counter() - t0,
        "same tree as most draws": frozenset(found) == frozenset(reference),
        "abs. time difference": float(np.mean([abs(found[c] - reference[c]) for c in shared])),
    }
    if truth is not None:
        true = frozenset(c for c in truth if len(c) < max(len(c) for c in truth))
        row["true tree"] = float(frozenset(found) == true)
    return row


def support(adata, draws: int, n_bootstrap: int) -> dict:
    import scbranch as sb

    data = adata.copy()
    sb.tl.branch_hierarchy(data, LABELS, use_rep="X_pca", n_noise_draws=draws)
    table = sb.tl.branch_stability(data, n_bootstrap=n_bootstrap, progress_bar=False)
    n_members = table["classes"].str.count(", ") + 1  # type names hold no ", "
    inner = table[n_members < data.obs[LABELS].nunique()]  # the root always recurs
    return {
        "n_noise_draws": draws,
        "support (mean)": float(inner["support"].mean()),
        "support (min)": float(inner["support"].min()),
    }


def few_dimensions(adata, dims, n_draws: int) -> pd.DataFrame:
    """Expected vs ``n_draws`` averaged sampled curves on the first ``d`` PCs, for each d.

    The many-dimension limit is least accurate in few dimensions (an scVI latent has 10).
    """
    import scbranch as sb

    rows = []
    for d in dims:
        data = adata.copy()
        data.obsm["X_pca"] = np.ascontiguousarray(data.obsm["X_pca"][:, :d])
        records = {
            curves: sb.tl.branch_hierarchy(data, LABELS, use_rep="X_pca", copy=True, **kw).uns[
                "scbranch_hierarchy"
            ]
            for curves, kw in (
                ("expected", {"curves": "expected"}),
                ("sampled", {"n_noise_draws": n_draws}),
            )
        }
        expected, sampled = (clades(r) for r in records.values())
        shared = [c for c in expected if c in sampled]
        rows.append(
            {
                "PCs": d,
                "max curve difference": float(
                    np.abs(records["expected"]["inter"] - records["sampled"]["inter"]).max()
                ),
                "same tree": frozenset(expected) == frozenset(sampled),
                "abs. time difference": float(
                    np.mean([abs(expected[c] - sampled[c]) for c in shared])
                ),
            }
        )
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="smoke-test settings")
    parser.add_argument("--out", default="benchmark_out/discovery")
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    cfg_name = "fast" if args.fast else "cpu"
    cfg = SETTINGS[cfg_name]
    import scbranch  # noqa: F401  (before prepare_run, which quietens its logger)

    markdown = prepare_run(args, "discovery")
    t_all = time.perf_counter()
    lines = [
        "# Discovery benchmark: seed dependence of the learned tree, by noise draws and curves",
        "",
        f"Generated by `python benchmarks/discovery.py` ({cfg_name} settings: {cfg['n_seeds']} "
        f"seeds, stability with {cfg['n_bootstrap']} replicates); see the script's docstring "
        "for the columns.",
    ]
    data = datasets()
    for name, (adata, truth) in data.items():
        logger.info("%s", name)
        rows = [seed_spread(adata, k, cfg["n_seeds"], truth) for k in cfg["draws"]]
        spread = pd.DataFrame(
            [row for row, _ in rows] + [expected_curves_row(adata, rows[-1][1], truth)]
        )
        stable = pd.DataFrame(
            [support(adata, k, cfg["n_bootstrap"]) for k in cfg["stability_draws"]]
        )
        table = spread.merge(stable, on="n_noise_draws", how="left")
        n_types = adata.obs[LABELS].nunique()
        lines += ["", f"## {name}: {adata.n_obs} cells, {n_types} types", "", _md(table, False)]
        print(name, "\n", table.to_string(index=False), flush=True)
    # the limit in few dimensions, on real cells (pbmc3k where shipped)
    real = "pbmc3k (train cells)" if "pbmc3k (train cells)" in data else "pbmc68k"
    low = few_dimensions(data[real][0], cfg["dims"], 64)
    lines += [
        "",
        f"## Expected curves in few dimensions ({real}, first d PCs; against 64 averaged "
        "sampled draws, seed 0)",
        "",
        _md(low, False),
    ]
    print(low.to_string(index=False), flush=True)
    lines += ["", f"Total {(time.perf_counter() - t_all) / 60:.1f} min on {args.threads} threads."]
    write_lines(markdown, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
