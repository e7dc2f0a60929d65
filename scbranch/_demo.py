"""The end-to-end demo on real PBMCs shipped with scanpy (``scbranch demo --out DIR``).

Hierarchy -> training on a stratified 70 % of cells -> generation of every type -> quality
checks and the full evaluation (``tl.evaluate``, with real-vs-real controls) against the
held-out 30 % -> held-out monocytes transmuted into dendritic cells (success against real
dendritic cells, genes ranked by change) -> figures, model, generated and transmuted cells and
reports in ``out``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pandas as pd

from ._versions import package_versions

logger = logging.getLogger(__name__)

#: (max_epochs, batch_size, cells generated per type) of the full and the fast (test) demo;
#: the full demo trains with the package's default budget (``None``), as a user's first model
FULL = {"max_epochs": None, "batch_size": 64, "n_cells": 200}
FAST = {"max_epochs": 3, "batch_size": 64, "n_cells": 30}
#: (source, target) of the demo's transmutation: related myeloid types
TRANSMUTATION = ("CD14+ Monocyte", "Dendritic")


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{str(out)!r} exists and is not a directory.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"Output directory {str(out)!r} is not empty; choose another one or pass --overwrite."
        )
    out.mkdir(parents=True, exist_ok=True)


def run_demo(
    out: str | Path,
    *,
    fast: bool = False,
    seed: int = 0,
    max_epochs: int | None = None,
    overwrite: bool = False,
    progress_bar: bool = True,
) -> dict:
    """Run the whole scbranch pipeline on the shipped PBMC data and write the results.

    Parameters
    ----------
    out
        Output directory (created; must be empty unless ``overwrite``).
    fast
        Tiny training budget, for tests (results are not meaningful).
    seed
        Seed of the split, training and generation.
    max_epochs
        Override the number of training epochs (default: the package's default budget, or
        3 with ``fast``).
    overwrite
        Allow writing into a non-empty ``out``.
    progress_bar
        Show the training and sampling progress bars (`False`: ``scbranch demo -q``).

    Returns
    -------
    Paths of everything written and the headline numbers.

    Examples
    --------
    >>> summary = run_demo("demo_out", fast=True)  # doctest: +SKIP
    """
    import anndata as ad
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc
    import scvi

    import scbranch as sb
    from scbranch._keys import Key
    from scbranch.tl._evaluate import REFERENCE_SPACE

    out = Path(out)
    _prepare_out(out, overwrite)
    cfg = dict(FAST if fast else FULL)
    if max_epochs is not None:
        cfg["max_epochs"] = int(max_epochs)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    scvi.settings.seed = seed

    t0 = time.perf_counter()
    adata = sb.datasets.pbmc68k()
    train_pos, held_pos = sb.datasets.stratified_split(adata.obs["cell_type"], 0.7, seed)
    train, held = adata[train_pos].copy(), adata[held_pos].copy()
    # the model's space is a PCA of the TRAINING cells; held-out cells are projected into it,
    # never fitted on (a PCA of all cells gives them in-sample spread no new cell has)
    sc.pp.pca(train, n_comps=adata.obsm["X_pca"].shape[1], random_state=seed)
    del held.obsm["X_pca"]
    sb.tl.embed_like(held, train, basis="pca")
    # ...and the model learns PC scores that spread like new cells' (in-sample scores spread
    # more, and a generator learns that: docs/benchmarks/out_of_fold.md); it reads the
    # held-out cells' projections, new cells' scores already, from obsm["X_pca"]
    sb.tl.pca_out_of_fold(train, groupby="cell_type", seed=seed)
    logger.info(
        "pbmc68k: %d cells, %d types; training on %d, holding out %d.",
        adata.n_obs,
        adata.obs["cell_type"].nunique(),
        train.n_obs,
        held.n_obs,
    )
    timings["data_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    sb.tl.branch_hierarchy(train, groupby="cell_type", use_rep="X_pca_oof", seed=seed)
    timings["hierarchy_s"] = time.perf_counter() - t0
    newick = train.uns[Key.uns.HIERARCHY]["newick"]

    t0 = time.perf_counter()
    sb.BranchedDiffusion.setup_anndata(
        train, labels_key="cell_type", obsm_key="X_pca_oof", counts_layer="counts"
    )
    model = sb.BranchedDiffusion(train)
    model.train(
        max_epochs=cfg["max_epochs"],
        batch_size=cfg["batch_size"],
        accelerator="cpu",
        enable_progress_bar=progress_bar,
    )
    timings["train_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    gen = model.generate(n_cells=cfg["n_cells"], seed=seed, counts=True, progress_bar=progress_bar)
    timings["generate_s"] = time.perf_counter() - t0

    # quality against the held-out cells, in a PCA of genes fitted on the training cells only
    report = sb.metrics.quality_report(gen, train, held, labels_key="cell_type", seed=seed).loc[
        model.classes
    ]
    # the full protocol (docs/evaluation.md): distances and a real-vs-real control in every row
    t0 = time.perf_counter()
    evaluation = sb.tl.evaluate(gen, held, "cell_type", train=train, seed=seed)
    timings["evaluate_s"] = time.perf_counter() - t0
    means = evaluation[
        (evaluation["group"] == "mean") & (evaluation["space"] == REFERENCE_SPACE)
    ].set_index("metric")
    knn, logreg = report["knn_generated"].mean(), report["logreg_generated"].mean()
    summary_numbers = {
        "label_fidelity_generated": float(knn),
        "label_fidelity_control": float(report["knn_control"].mean()),
        "label_fidelity_ratio": float(knn / report["knn_control"].mean()),
        "logreg_fidelity_ratio": float(logreg / report["logreg_control"].mean()),
        "spread_ratio_mean": float(report["spread_vs_heldout"].mean()),
        "classes_spread_within_25pct": int(((report["spread_vs_heldout"] - 1).abs() <= 0.25).sum()),
        "classes_spread_within_25pct_vs_train": int(
            ((report["spread_vs_train"] - 1).abs() <= 0.25).sum()
        ),
        "n_classes": len(model.classes),
        "auroc_generated": float(means.loc["auroc", "generated"]),
        "auroc_control": float(means.loc["auroc", "control"]),
        "w2_ratio": float(means.loc["w2", "ratio"]),
        # below 1: generated cells nearer the training cells than new real cells come
        "train_distance_ratio": float(means.loc["train_distance", "ratio"]),
    }

    # interpretation: held-out monocytes carried to dendritic cells through their branch point
    t0 = time.perf_counter()
    source, target = TRANSMUTATION
    transmuted = model.transmute(
        held[held.obs["cell_type"] == source], target, mode="ode", seed=seed, progress_bar=False
    )
    success = sb.tl.transmutation_success(transmuted, train, heldout=held, seed=seed)
    sb.tl.rank_transmutation_genes(transmuted)
    top_genes = list(transmuted.uns[Key.uns.TRANSMUTATION_GENES]["names"][target][:10])
    timings["transmute_s"] = time.perf_counter() - t0
    summary_numbers |= {
        "transmutation": f"{source} -> {target}",
        "transmutation_success": float(success["success"].iloc[0]),
        "transmutation_control": float(success["control"].iloc[0]),
        "transmutation_top_genes": [str(g) for g in top_genes],
    }

    # write everything
    paths = {
        "generated": out / "generated.h5ad",
        "report": out / "report.csv",
        "evaluation": out / "evaluation.csv",
        "evaluation_png": out / "evaluation.png",
        "model": out / "model",
        "tree_png": out / "tree.png",
        "similarity_png": out / "similarity.png",
        "embedding_png": out / "embedding.png",
        "transmutation": out / "transmutation.h5ad",
        "transmutation_png": out / "transmutation.png",
        "transmutation_genes_png": out / "transmutation_genes.png",
        "summary": out / "summary.json",
    }
    # generated cells in the real cells' UMAP, so `sc.pl.umap(generated)` works on the file:
    # matched to the training cells in the model's own latent (the train PCA's basis)
    sb.tl.embed_like(gen, train, basis="umap", use_rep="X_pca_oof")
    gen.write_h5ad(paths["generated"])
    transmuted.write_h5ad(paths["transmutation"])
    report.to_csv(paths["report"])
    evaluation.to_csv(paths["evaluation"], index=False)
    model.save(str(paths["model"]), overwrite=overwrite)
    fig = sb.pl.branch_tree(train, return_fig=True)
    fig.savefig(paths["tree_png"], dpi=120, bbox_inches="tight")
    fig = sb.pl.branch_similarity(train, return_fig=True)
    fig.savefig(paths["similarity_png"], dpi=120, bbox_inches="tight")
    fig = sb.pl.evaluation(evaluation, return_fig=True)
    fig.savefig(paths["evaluation_png"], dpi=110, bbox_inches="tight")
    fig = _embedding_figure(held, gen, model.classes)
    fig.savefig(paths["embedding_png"], dpi=120, bbox_inches="tight")
    fig = sb.pl.trajectories(transmuted, adata, basis="umap", return_fig=True)
    fig.savefig(paths["transmutation_png"], dpi=120, bbox_inches="tight")
    fig = sb.pl.transmutation_genes(transmuted, n_genes=8, return_fig=True)
    fig.savefig(paths["transmutation_genes_png"], dpi=120, bbox_inches="tight")
    plt.close("all")

    check = ad.read_h5ad(paths["generated"])
    missing = set(model.classes) - set(check.obs["cell_type"].astype(str))
    if missing:
        raise RuntimeError(f"generated.h5ad lacks cell types {sorted(missing)}")
    timings["total_s"] = time.perf_counter() - t_all
    summary = {
        "tree": newick,
        **summary_numbers,
        **{k: round(v, 2) for k, v in timings.items()},
        "n_network_calls": int(gen.uns[Key.uns.GENERATED]["params"]["n_network_calls"]),
        "settings": cfg,
        "versions": package_versions(),  # what the same seed reproduces these numbers with
    }
    paths["summary"].write_text(json.dumps(summary, indent=2))
    _log_report(report, summary)
    return {
        **{k: str(v) for k, v in paths.items()},
        **summary_numbers,
        "tree": newick,
        "total_s": round(timings["total_s"], 1),
    }


def _embedding_figure(real, gen, classes):
    """Held-out real and generated cells in the real cells' UMAP, coloured by type."""
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), sharex=True, sharey=True)
    for ax, data, title in (
        (axes[0], real, "held-out real cells"),
        (axes[1], gen, "generated cells"),
    ):
        for i, c in enumerate(classes):
            xy = data.obsm["X_umap"][(data.obs["cell_type"] == c).to_numpy(), :2]
            ax.scatter(xy[:, 0], xy[:, 1], s=6, color=cmap(i % cmap.N), label=c, alpha=0.8)
        ax.set_title(title)
        ax.set_xlabel("UMAP1")
    axes[0].set_ylabel("UMAP2")
    axes[1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, markerscale=2)
    fig.tight_layout()
    return fig


def _log_report(report: pd.DataFrame, summary: dict) -> None:
    with pd.option_context("display.width", 160, "display.max_columns", 20, "display.precision", 2):
        logger.info("Per-type quality (generated vs held-out real cells):\n%s", report)
    logger.info(
        "Label fidelity (kNN): generated %.3f vs held-out control %.3f -> ratio %.3f "
        "(logistic regression ratio %.3f). Spread ratio mean %.2f; %d/%d types within 25%%. "
        "Real-vs-generated forest AUROC %.3f (real vs real %.3f; 0.5 = indistinguishable), "
        "W2 %.2fx the real control; distance to the nearest training cell %.2fx held-out "
        "cells' (below 1: copies).",
        summary["label_fidelity_generated"],
        summary["label_fidelity_control"],
        summary["label_fidelity_ratio"],
        summary["logreg_fidelity_ratio"],
        summary["spread_ratio_mean"],
        summary["classes_spread_within_25pct"],
        summary["n_classes"],
        summary["auroc_generated"],
        summary["auroc_control"],
        summary["w2_ratio"],
        summary["train_distance_ratio"],
    )
    logger.info(
        "Transmutation %s: %.0f%% of the cells called the target (real target cells: %.0f%%); "
        "top genes %s.",
        summary["transmutation"],
        100 * summary["transmutation_success"],
        100 * summary["transmutation_control"],
        ", ".join(summary["transmutation_top_genes"][:6]),
    )
