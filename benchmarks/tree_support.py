"""Tree support by class size: how far a tree learned from few cells of a type can be trusted.

A learned tree's clades are read off similarity curves of a few cells per type; with few cells
those curves are noisy and close branch points can swap. ``sb.tl.branch_stability`` measures
that (bootstrap support: the share of replicates on 80 % of each type's cells whose tree has the
same clade). This study reads, for every clade of many learned trees, its support against the
fewest cells of its types, and whether it is a clade of the reference tree, to ground the
package's hint (``scbranch.tl._branch_hierarchy.FEW_CELLS_FOR_TREE``): discovery on a type
with that many cells or fewer logs a warning pointing to ``sb.tl.branch_stability``.

Per dataset, for every cap m (each type subsampled to at most m cells; ``all``: no cap) and
repeat r (the subsample's and discovery's seed): ``sb.tl.branch_hierarchy`` (defaults), then
``sb.tl.branch_stability`` of that tree (``n_bootstrap`` replicates, seed r). Every internal
non-root clade gives a row: the fewest cells of its types, its support, and whether the
reference tree has it. The reference is the simulated truth (the known answer) or, on real
cells, the tree discovered on all cells (seed 0).

Known answer: on simulated trees the true clades are known, so the support can be checked as
an instrument: clades that are true must score high support and clades that are not must score
low, at every cell count. On real cells the reference is itself a learned tree.

Data: ``discovery.py``'s datasets (pbmc68k, pbmc3k's train cells, two simulated trees of 16
types whose branch times crowd as ``decay`` nears 1).

Usage (from the repository root, in the project's venv):
  python benchmarks/tree_support.py          # about 4 min on 1 thread
  python benchmarks/tree_support.py --fast   # smoke test (numbers meaningless)
  python benchmarks/tree_support.py --curves expected \
      --markdown docs/benchmarks/tree_support_expected.md   # noiseless similarity curves
Writes docs/benchmarks/tree_support.md (--fast: under --out).
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import pandas as pd
from discovery import SIMULATED, clades, datasets
from quality import LABELS, _md, cpu_threads, prepare_run, write_lines

SETTINGS = {
    "cpu": {"caps": (5, 10, 20, 40, None), "repeats": 10, "n_bootstrap": 50},
    "fast": {"caps": (5, None), "repeats": 2, "n_bootstrap": 3},
}
#: fewest cells of a clade's types, binned; the hint fires up to the package's threshold (40)
BINS = [0, 5, 10, 19, 40, np.inf]
logger = logging.getLogger("tree_support")


def capped(adata, m: int | None, seed: int):
    """Every type subsampled (without replacement) to at most ``m`` cells; ``None``: all."""
    if m is None:
        return adata.copy()
    rng = np.random.default_rng(seed)
    rows = [
        rng.choice(idx, min(m, len(idx)), replace=False)
        for idx in adata.obs.groupby(LABELS, observed=True).indices.values()
    ]
    return adata[np.sort(np.concatenate(rows))].copy()


def clade_rows(
    adata,
    reference: set,
    n_bootstrap: int,
    seed: int,
    discovery: dict | None = None,
    support_curves: str | None = None,
) -> list[dict]:
    """One row per internal non-root clade of the tree learned on ``adata`` (``discovery``:
    options of ``branch_hierarchy``, which ``branch_stability`` reuses, except the curves when
    ``support_curves`` names the replicates' own)."""
    import scbranch as sb

    sb.tl.branch_hierarchy(adata, groupby=LABELS, use_rep="X_pca", seed=seed, **(discovery or {}))
    learned_with = adata.uns["scbranch_hierarchy"]["params"]["curves"]
    table = sb.tl.branch_stability(
        adata,
        n_bootstrap=n_bootstrap,
        seed=seed,
        curves=support_curves or learned_with,
        progress_bar=False,
    )
    sizes = adata.obs[LABELS].value_counts()
    support = {
        frozenset(c.split(", ")): s for c, s in zip(table["classes"], table["support"], strict=True)
    }
    return [
        {
            "fewest cells": int(min(sizes[c] for c in clade)),
            "support": support[clade],
            "in reference": clade in reference,
        }
        for clade in clades(adata.uns["scbranch_hierarchy"])
    ]


def summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Per bin of the fewest cells: clades, mean support, share under 0.5, share in reference;
    and the mean support of the clades in and not in the reference tree."""
    binned = pd.cut(rows["fewest cells"], BINS, right=True)
    grouped = rows.groupby(binned, observed=True)
    table = pd.DataFrame(
        {
            "clades": grouped.size(),
            "mean support": grouped["support"].mean(),
            "support < 0.5": grouped["support"].apply(lambda s: (s < 0.5).mean()),
            "in reference tree": grouped["in reference"].mean(),
            "support, in reference": grouped.apply(
                lambda g: g.loc[g["in reference"], "support"].mean(), include_groups=False
            ),
            "support, not in reference": grouped.apply(
                lambda g: g.loc[~g["in reference"], "support"].mean(), include_groups=False
            ),
        }
    )
    table.index = [f"{int(b.left) + 1}-{b.right:.0f}" for b in table.index]
    return table.rename_axis("fewest cells of the clade's types").round(2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="smoke-test settings")
    parser.add_argument("--out", default="benchmark_out/tree_support")
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--curves",
        choices=("sampled", "expected"),
        default=None,
        help="discovery's similarity curves (default: the package's)",
    )
    parser.add_argument(
        "--noise-draws", type=int, default=None, help="discovery's n_noise_draws (sampled curves)"
    )
    parser.add_argument(
        "--support-curves",
        choices=("sampled", "expected"),
        default=None,
        help="the bootstrap replicates' curves (default: the learned tree's; branch_stability's "
        "own default is sampled), e.g. sampled replicates around a tree of expected curves",
    )
    parser.add_argument(
        "--decays",
        default=None,
        help="decays of the simulated trees, e.g. 0.9,0.95 (nearer 1: crowded branch times, "
        "where discovery errs and false clades appear; default: discovery.py's)",
    )
    args = parser.parse_args(argv)
    simulated = None
    if args.decays:
        simulated = [{**SIMULATED[0], "decay": float(d)} for d in args.decays.split(",")]
    discovery = {
        key: value
        for key, value in (("curves", args.curves), ("n_noise_draws", args.noise_draws))
        if value is not None
    }
    cfg_name = "fast" if args.fast else "cpu"
    cfg = SETTINGS[cfg_name]
    import scbranch as sb
    from scbranch.tl._branch_hierarchy import FEW_CELLS_FOR_TREE

    markdown = prepare_run(args, "tree_support")
    t_all = time.perf_counter()
    lines = [
        "# Tree support by class size (generated by `benchmarks/tree_support.py`; do not edit "
        "by hand)",
        "",
        f"{cfg_name} settings: each type capped at {[m or 'all' for m in cfg['caps']]} cells, "
        f"{cfg['repeats']} repeats each, `branch_stability` with {cfg['n_bootstrap']} "
        "replicates of 80 % of each type's cells. One row per clade of the learned trees, "
        "binned by the fewest cells of its types; the reference tree is the simulated truth "
        "(the known answer) or the tree of all cells. The package warns when a type has "
        f"{FEW_CELLS_FOR_TREE} cells or fewer. See the script's docstring. Discovery options: "
        f"{discovery or 'the package defaults'} (for every tree, the reference included); "
        f"the replicates' curves: {args.support_curves or 'the same'}.",
    ]
    for name, (adata, truth) in datasets(simulated).items():
        if truth is None:
            sb.tl.branch_hierarchy(adata, groupby=LABELS, use_rep="X_pca", seed=0, **discovery)
            reference = set(clades(adata.uns["scbranch_hierarchy"]))
        else:
            reference = set(truth) - {frozenset(adata.obs[LABELS].astype(str).unique())}
        rows, failed = [], []
        for m in cfg["caps"]:
            for r in range(cfg["repeats"]):
                try:
                    cells = capped(adata, m, r)
                    rows += clade_rows(
                        cells, reference, cfg["n_bootstrap"], r, discovery, args.support_curves
                    )
                except ValueError as err:  # discovery can fail on a few cells; counted
                    logger.warning("%s, cap %s, repeat %d: %s", name, m, r, err)
                    failed.append(f"cap {m or 'all'}, repeat {r}")
        table = summary(pd.DataFrame(rows))
        sizes = adata.obs[LABELS].value_counts()
        runs = len(cfg["caps"]) * cfg["repeats"]
        lines += [
            "",
            f"## {name}: {adata.n_obs} cells, {len(sizes)} types ({sizes.min()}-{sizes.max()} "
            f"a type), reference: {'the true tree' if truth is not None else 'all cells'}",
            "",
            f"Discovery failed (two types never crossed) in {len(failed)} of {runs} learned "
            f"trees{': ' + '; '.join(failed) if failed else ''}.",
            "",
            _md(table),
        ]
        logger.info("%s\n%s", name, table.to_string())
    lines += ["", f"Total {(time.perf_counter() - t_all) / 60:.1f} min on {cpu_threads()}."]
    write_lines(markdown, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
