"""Interpretability benchmark on pbmc68k: transmutation, hybrids, gene ranking, tree stability.

pbmc68k (700 PBMCs shipped with scanpy) is split 50/50 per type. A branched model is trained on
the train half in the 30 PCs of the train cells (held-out cells are projected onto them). The
transmutation table is repeated over three splits (``--seeds``); the rest uses the first.
Then, with held-out cells (never seen by the model) as sources:

  transmutation success   fraction of transmuted cells a kNN classifier (15 neighbours, fitted
                          on the train cells' PCs) calls the target type, against the control:
                          the fraction of held-out real target cells it calls the target
  identity retention      per cell, the correlation of its deviation from the source cells'
                          mean with its endpoint's deviation from the endpoints' mean (PC
                          space); the control re-pairs cells at random (about 0)
  invertibility           A -> B -> A with the ODE: median relative distance to the start
  genes                   genes ranked by mean change along CD14+ Monocyte -> Dendritic
                          (endpoint vs its own source; also by paired t statistic), against
                          real DE (Dendritic vs CD14+ Monocyte, scanpy's t-test on all real
                          cells) and known DC markers
  hybrids                 CD4+/CD25 T Reg / CD8+ Cytotoxic T pairs: distance within pairs vs
                          between random partners
  stability               bootstrap support and spread of each branch point (all cells)

Usage (from the repository root, in the project's venv):
  python benchmarks/interpretability.py          # CPU settings (about 6 min on 2 cores)
  python benchmarks/interpretability.py --fast   # smoke test (numbers meaningless)
Writes docs/benchmarks/interpretability.md and CSVs under --out.
"""

from __future__ import annotations

import argparse
import logging
import math
import time

import numpy as np
import pandas as pd
from quality import LABELS, _md, load_pbmc68k, prepare_run, write_lines

SETTINGS = {
    "cpu": {"steps": 2000, "batch_size": 64, "n_bootstrap": 50, "n_pairs": 200},
    "fast": {"steps": 20, "batch_size": 64, "n_bootstrap": 3, "n_pairs": 10},
}
PAIRS = [
    ("CD14+ Monocyte", "Dendritic"),
    ("Dendritic", "CD14+ Monocyte"),
    ("CD4+/CD25 T Reg", "CD8+ Cytotoxic T"),
    ("CD8+ Cytotoxic T", "CD4+/CD25 T Reg"),
    ("CD8+/CD45RA+ Naive Cytotoxic", "CD8+ Cytotoxic T"),
]
GENE_PAIR = ("CD14+ Monocyte", "Dendritic")
HYBRID_PAIR = ("CD4+/CD25 T Reg", "CD8+ Cytotoxic T")
#: markers of conventional dendritic cells (MHC class II, antigen presentation, cDC2) found
#: among pbmc68k's 765 genes
DC_MARKERS = [
    "FCER1A", "CLEC10A", "CD74", "HLA-DRA", "HLA-DRB1", "HLA-DPA1", "HLA-DPB1", "HLA-DQA1",
    "HLA-DQB1", "HLA-DMA", "HLA-DMB", "IRF8", "LGALS2",
]  # fmt: skip
N_TOP = 20
#: the model's latent: the train cells' out-of-fold PC scores (the package's default
#: configuration); held-out cells carry their projection into the train PCA under this key,
#: so the kNN that judges transmutation compares out-of-sample scores on both sides
LATENT = "X_pca_oof"

logger = logging.getLogger("interpretability")


def project_heldout(train, held):
    """Held-out cells in the train PCA (the centring mean is the train cells' mean)."""
    from scbranch._validation import to_dense

    mean = to_dense(train.X).mean(0)
    held.obsm["X_pca"] = (to_dense(held.X) - mean) @ train.varm["PCs"]


def train_model(train, cfg):
    import scbranch as sb

    steps_per_epoch = max(1, math.ceil(train.n_obs / cfg["batch_size"]))
    sb.BranchedDiffusion.setup_anndata(train, labels_key=LABELS, obsm_key=LATENT)
    model = sb.BranchedDiffusion(train)
    t0 = time.perf_counter()
    model.train(
        max_epochs=max(1, math.ceil(cfg["steps"] / steps_per_epoch)),
        batch_size=cfg["batch_size"],
        accelerator="cpu",
        enable_progress_bar=False,
    )
    return model, time.perf_counter() - t0


def transmutations(model, train, held, seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """Success, retention, invertibility and cost of every pair in both modes."""
    import scbranch as sb

    rows, kept = [], {}
    for source, target in PAIRS:
        cells = held[held.obs[LABELS] == source].copy()
        for mode in ("ode", "sde"):
            t0 = time.perf_counter()
            tm = model.transmute(cells, target, mode=mode, seed=seed, progress_bar=False)
            seconds = time.perf_counter() - t0
            success = sb.tl.transmutation_success(tm, train, heldout=held, use_rep=LATENT)
            retention = sb.tl.identity_retention(tm)
            row = {
                "source": source,
                "target": target,
                "mode": mode,
                "n_cells": cells.n_obs,
                "t*": float(tm.uns["scbranch"]["params"]["branch_times"][0]),
                "success": float(success["success"].iloc[0]),
                "control": float(success["control"].iloc[0]),
                "ratio": float(success["ratio"].iloc[0]),
                "still source": float(success["stayed"].iloc[0]),
                "retention": float(retention["median"].iloc[0]),
                "retention (shuffled)": float(retention["control"].iloc[0]),
                "rank retention": float(retention["rank_retention"].iloc[0]),
                "network calls": int(tm.uns["scbranch"]["params"]["n_network_calls"]),
                "seconds": seconds,
            }
            if mode == "ode":
                end = tm[tm.obs["phase"] == "endpoint"].copy()
                back = model.transmute(end, source, source=target, progress_bar=False)
                start = cells.obsm[LATENT]
                returned = back[back.obs["phase"] == "endpoint"].obsm[LATENT]
                rel = np.linalg.norm(returned - start, axis=1) / np.linalg.norm(start, axis=1)
                row["A->B->A median rel. error"] = float(np.median(rel))
            rows.append(row)
            kept[(source, target, mode)] = tm
            logger.info("%s", row)
    return pd.DataFrame(rows), kept


def gene_ranking(tm, adata) -> dict:
    """Top genes of the transmutation (both scores) vs real DE and the DC markers."""
    import scanpy as sc

    import scbranch as sb

    real = adata.copy()
    sc.tl.rank_genes_groups(
        real, LABELS, groups=[GENE_PAIR[1]], reference=GENE_PAIR[0], method="t-test"
    )
    real_df = sc.get.rank_genes_groups_df(real, group=GENE_PAIR[1])
    real_up = set(real_df.head(N_TOP)["names"])
    real_down = set(real_df.tail(N_TOP)["names"])
    out = {}
    for method in ("t-test_paired", "mean_change"):  # the default last: it stays in tm
        sb.tl.rank_transmutation_genes(tm, method=method)
        key = "scbranch_transmutation_genes"
        ranked = sc.get.rank_genes_groups_df(tm, group=GENE_PAIR[1], key=key)
        top = list(ranked.head(N_TOP)["names"])
        record = tm.uns[key]
        t_onset = dict(
            zip(record["names"][GENE_PAIR[1]], record["onset_t"][GENE_PAIR[1]], strict=True)
        )
        out[method] = {
            "top_up": top,
            "top_down": list(ranked.tail(10)["names"][::-1]),
            "overlap_real_up": len(set(top) & real_up),
            "overlap_real_down": len(set(ranked.tail(N_TOP)["names"]) & real_down),
            "markers_in_top": [g for g in top if g in DC_MARKERS],
            "spearman_scores": float(
                ranked.set_index("names")["scores"].corr(
                    real_df.set_index("names")["scores"], method="spearman"
                )
            ),
            "onset_top": [round(float(t_onset[g]), 3) for g in top],
        }
    return out


def hybrid_pairs(model, n_pairs: int) -> dict:
    hy = model.hybrids(*HYBRID_PAIR, n_cells=n_pairs, seed=0, progress_bar=False)
    a = hy.obsm[LATENT][:n_pairs]
    b = hy.obsm[LATENT][n_pairs:]
    partners = np.random.default_rng(0).permutation(n_pairs)
    return {
        "t*": float(hy.uns["scbranch"]["params"]["branch_time"]),
        "within pairs": float(np.linalg.norm(a - b, axis=1).mean()),
        "random partners": float(np.linalg.norm(a - b[partners], axis=1).mean()),
        "network calls": int(hy.uns["scbranch"]["params"]["n_network_calls"]),
    }


def stability(adata, n_bootstrap: int) -> tuple[pd.DataFrame, float]:
    import scbranch as sb

    real = adata.copy()
    sb.tl.branch_hierarchy(real, groupby=LABELS, use_rep="X_pca")
    t0 = time.perf_counter()
    table = sb.tl.branch_stability(real, n_bootstrap=n_bootstrap, progress_bar=False)
    return table, time.perf_counter() - t0


def seed_summary(all_seeds: pd.DataFrame) -> pd.DataFrame:
    """Per pair and mode: the ratio of every split, its minimum and the mean retention."""
    rows = []
    for (source, target, mode), part in all_seeds.groupby(["source", "target", "mode"], sort=False):
        part = part.sort_values("seed")
        rows.append(
            {
                "source": source,
                "target": target,
                "mode": mode,
                "ratio per split": " / ".join(f"{r:.2f}" for r in part["ratio"]),
                "min ratio": round(float(part["ratio"].min()), 3),
                "mean retention": round(float(part["retention"].mean()), 3),
            }
        )
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="smoke-test settings")
    parser.add_argument("--out", default="benchmark_out/interpretability", help="CSVs")
    parser.add_argument("--markdown", default=None, help="default: docs/benchmarks/...")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--seeds", default="0,1,2", help="split/training seeds; the first is shown in full"
    )
    args = parser.parse_args(argv)
    cfg = SETTINGS["fast" if args.fast else "cpu"]
    import matplotlib

    matplotlib.use("Agg")
    import scvi

    import scbranch as sb

    markdown = prepare_run(args, "interpretability")
    t_all = time.perf_counter()
    seeds = [int(x) for x in args.seeds.split(",")]
    repeats = []
    for seed in seeds:  # the split (and training) seed; seed 0 is the headline run
        scvi.settings.seed = seed
        train, held = load_pbmc68k(seed=seed)
        project_heldout(train, held)
        sb.tl.pca_out_of_fold(train, groupby=LABELS, key_added=LATENT)
        held.obsm[LATENT] = held.obsm["X_pca"]
        model, seconds = train_model(train, cfg)
        per_seed, kept_seed = transmutations(model, train, held, seed)
        repeats.append(per_seed.assign(seed=seed))
        if seed == seeds[0]:
            table, kept, first_model, fit_s = per_seed, kept_seed, model, seconds
    table.to_csv("transmutation.csv", index=False)
    all_seeds = pd.concat(repeats, ignore_index=True)
    all_seeds.to_csv("transmutation_seeds.csv", index=False)
    genes = gene_ranking(kept[(*GENE_PAIR, "ode")], sb.datasets.pbmc68k())
    hybrid = hybrid_pairs(first_model, cfg["n_pairs"])
    stab, stab_s = stability(sb.datasets.pbmc68k(), cfg["n_bootstrap"])
    stab.to_csv("stability.csv", index=False)
    wall = time.perf_counter() - t_all

    shown = table.copy()
    for col in shown.columns:
        if col == "A->B->A median rel. error":
            shown[col] = [f"{v:.1e}" if np.isfinite(v) else "" for v in shown[col]]
        elif shown[col].dtype == float:
            shown[col] = shown[col].round(3)
    ok = table[table["mode"] == "ode"].groupby(["source", "target"])["ratio"].first()
    lines = [
        "# Interpretability on pbmc68k",
        "",
        f"`python benchmarks/interpretability.py{' --fast' if args.fast else ''}`: "
        f"{wall / 60:.1f} min on {args.threads} threads; model fitted in {fit_s:.0f} s "
        f"({cfg['steps']} steps, the train half's 30 out-of-fold PC scores, "
        "`sb.tl.pca_out_of_fold`; held-out cells projected into the train PCA). Sources are "
        "HELD-OUT cells.",
        "",
        "## Transmutation",
        "",
        "success: fraction of endpoints a kNN (train cells) calls the target; control: fraction "
        "of held-out real target cells it calls the target; ratio = success / control; "
        "'still source': endpoints still called the source type; retention: median "
        "correlation of a cell's deviation from the sources' mean with its endpoint's "
        "deviation from the endpoints' mean (shuffled: random partners); rank retention: "
        "Spearman correlation of distance-to-mean before and after.",
        "",
        _md(shown, index=False),
        "",
        f"ODE pairs with ratio >= 0.9: {int((ok >= 0.9).sum())} of {len(ok)}.",
        "",
        f"### Over {len(seeds)} splits (seeds {args.seeds}: split, training, transmutation)",
        "",
        "Success / control ratio per split, and retention, mean over splits:",
        "",
        _md(seed_summary(all_seeds), index=False),
        "",
        f"## Genes along {GENE_PAIR[0]} -> {GENE_PAIR[1]} (ODE)",
        "",
        "Real DE: scanpy's t-test, Dendritic vs CD14+ Monocyte, all 700 real cells. Known DC "
        f"markers looked for: {', '.join(DC_MARKERS)}.",
        "",
        "| score | DC markers in top 20 | top-20 overlap with real DE (up / down) "
        "| Spearman of all scores with real DE |",
        "|---|---|---|---|",
    ]
    for method, g in genes.items():
        lines.append(
            f"| {method} | {len(g['markers_in_top'])} ({', '.join(g['markers_in_top'])}) "
            f"| {g['overlap_real_up']} / {g['overlap_real_down']} | {g['spearman_scores']:.2f} |"
        )
    best = genes["mean_change"]
    lines += [
        "",
        f"Top {N_TOP} up by mean change (the default): {', '.join(best['top_up'])}.",
        "",
        f"Top 10 down: {', '.join(best['top_down'])}.",
        "",
        "Onset (t on the way down where half the change is reached; t* is the branch point) of "
        "the top genes: "
        + ", ".join(f"{g} {t}" for g, t in zip(best["top_up"], best["onset_top"], strict=True))
        + ".",
    ]
    lines += [
        "",
        f"## Hybrids {HYBRID_PAIR[0]} / {HYBRID_PAIR[1]}",
        "",
        f"{cfg['n_pairs']} pairs through t* = {hybrid['t*']:.3f}: mean PC distance within "
        f"pairs {hybrid['within pairs']:.2f}, between random partners "
        f"{hybrid['random partners']:.2f} ({hybrid['network calls']} network calls).",
        "",
        "## Stability of the branch points",
        "",
        f"{cfg['n_bootstrap']} replicates of 80 % of each type's cells ({stab_s:.1f} s), all "
        "700 cells, 30 PCs:",
        "",
        _md(stab.round(3), index=False),
        "",
    ]
    print(write_lines(markdown, lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
