"""Which representation finds a simulated atlas's true tree: expression, PCs or an scVI latent.

    python benchmarks/latent_tree.py [--seeds 0,1] [--steps 1000,3000,10000] [--n-latent 10,30]

Writes docs/benchmarks/latent_tree.md. The atlas is SIMULATED (``sb.datasets.simulate_atlas``:
60 types on a three-level tree, 2,000 genes, 10,000 cells, negative-binomial parameters fitted
to the labelled pbmc3k cells in ../shared/data, or to scanpy's pbmc68k_reduced when that file
is absent), so its tree is known (``uns["simulation"]["newick"]``): that is the known answer
every row is read against. The hierarchy is discovered (``sb.tl.branch_hierarchy``, default
options) from:

- ``expression``: log1p(CP10k) of the counts (``target_sum=1e4``), what an expression model's
  set-up discovers from (``scale.py``'s known answer);
- ``PCA (30)``: the first 30 PCs of the same log-normalised expression (scanpy's ``pca``);
- ``scVI latent``: the latent means of ``sb.model.fit_scvi`` trained for the given number of
  steps (batch 128) with ``n_latent`` dimensions, what ``from_scvi_model`` discovered its
  tree from until it took the expression's topology (it times that topology on the latent).

Columns (``scale.tree_recovery``): share of the true clades of two or more types found, at
level 1 (a reference type's leaves) and level 2 (a level-2 type's leaves); crossing: found
clades that cross a true clade (the errors; splits of the true tree's multifurcations cross
none).

Real cells, further sections: scanpy's pbmc68k_reduced (700 PBMCs, 10 types) and, when
../shared/data holds it, the labelled pbmc3k (2,638 PBMCs, 8 types, labels derived from marker
genes), each against its annotation hierarchy (``compartment`` > ``lineage`` >
``cell_type``; pbmc68k_reduced: lymphoid, T cell, myeloid; pbmc3k: lymphoid, T cell,
monocyte, myeloid), from the same representations (30 PCs of the log-normalised genes:
pbmc68k_reduced's 765, pbmc3k's 2,000 HVGs) and scVI latents at the same budgets. The
annotation is a biologist's grouping, not a known truth: its rows say which representation
agrees with it, not which is right.

Usage: python benchmarks/latent_tree.py           # about 25 min on 2 cores
       python benchmarks/latent_tree.py --fast    # smoke test: one seed, 50 steps, 3,000 cells
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import pandas as pd
from quality import _md, write_lines
from scale import crossing_clades, fit_parameters, tree_recovery

ROOT = Path(__file__).resolve().parents[1]
N_TYPES = 60


def atlas_study(args, page: str) -> tuple[Path, Path, str, object]:
    """``(out, markdown, reference, params)`` of a study on simulated atlases: the output
    folder (made), the page (``--fast``: under ``out``), what the atlas parameters were fitted
    on, and the parameters (fitted once, kept in ``out``). Shared with batch_topology.py."""
    import scbranch as sb

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    default_page = out if args.fast else ROOT / "docs" / "benchmarks"
    markdown = Path(args.markdown) if args.markdown else default_page / page
    reference = fit_parameters(out / "atlas_parameters.npz")
    return out, markdown, reference, sb.datasets.AtlasParameters.load(out / "atlas_parameters.npz")


def simulated_atlas(out: Path, cells: int, params, seed: int) -> Path:
    """A simulated atlas of :data:`N_TYPES` types written to ``out`` (the caller deletes it)."""
    import scbranch as sb

    path = out / f"atlas_{seed}.h5ad"
    sb.datasets.simulate_atlas(
        path, cells, n_types=N_TYPES, parameters=params, seed=seed, overwrite=True,
        progress_bar=False,
    )  # fmt: skip
    return path


def trees_of(atlas_path: Path, steps: list[int], latents: list[int], seed: int) -> list[dict]:
    """Every representation's discovered tree against the atlas's true one."""
    import anndata as ad
    import scanpy as sc
    import scvi

    import scbranch as sb
    from scbranch.tl._branch_hierarchy import read_hierarchy

    adata = ad.read_h5ad(atlas_path)
    newick = adata.uns["simulation"]["newick"]
    rows = []

    def found(label: str, fit_seconds: float = 0.0, **kwargs) -> None:
        t0 = time.perf_counter()
        key = f"found_{len(rows)}"
        row = {"seed": seed, "representation": label}
        try:
            sb.tl.branch_hierarchy(adata, groupby="cell_type", key_added=key, **kwargs)
        except ValueError as err:  # discovery refused these data: a result, reported as such
            rows.append(row | {"failed": str(err).split(". ")[0]})
            return
        tree = read_hierarchy(adata, key)[0]
        rows.append(
            row
            | tree_recovery(tree, newick)
            | {"seconds": time.perf_counter() - t0 + fit_seconds, "failed": ""}
        )

    found("expression", target_sum=1e4)
    normed = adata.copy()
    sc.pp.normalize_total(normed, target_sum=1e4)
    sc.pp.log1p(normed)
    sc.pp.pca(normed, n_comps=30, random_state=seed)
    adata.obsm["X_pca30"] = normed.obsm["X_pca"]
    del normed
    found("PCA (30)", use_rep="X_pca30")
    for n_latent in latents:
        for n_steps in steps:
            scvi.settings.seed = seed
            t0 = time.perf_counter()
            vae = sb.model.fit_scvi(
                adata, counts_layer=None, n_latent=n_latent, max_epochs=10**6,
                max_steps=n_steps, batch_size=128, accelerator="cpu", devices=1,
                enable_progress_bar=False,
            )  # fmt: skip
            key = f"X_scVI_{n_latent}_{n_steps}"
            adata.obsm[key] = vae.get_latent_representation(adata)
            fit = time.perf_counter() - t0
            found(f"scVI latent ({n_latent} dims, {n_steps:,} steps)", fit, use_rep=key)
            print(rows[-1], flush=True)
    return rows


def real_datasets() -> list[tuple[str, object, str]]:
    """(name, AnnData with a ``counts`` layer and an ``X_pca``, description) of each real set."""
    import anndata as ad
    import scanpy as sc
    from quality import PBMC3K

    import scbranch as sb

    sets = [
        (
            "pbmc68k_reduced",
            sb.datasets.pbmc68k(),
            "700 PBMCs, 10 types, 765 genes; X_pca: the 30 PCs `sb.datasets.pbmc68k()` computes",
        )
    ]
    if PBMC3K.exists():  # as quality.py uses it: 2,000 HVGs, scVI on their counts
        adata = ad.read_h5ad(PBMC3K)
        adata.layers["counts"] = adata.X.copy()
        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)
        sc.pp.highly_variable_genes(adata, n_top_genes=2000, flavor="seurat")
        adata = adata[:, adata.var["highly_variable"]].copy()
        sc.pp.pca(adata, n_comps=30, random_state=0)
        text = (
            "2,638 PBMCs, 8 types (labels DERIVED from marker genes, ../shared/data), 2,000 "
            "HVGs (scanpy's seurat flavour); X_pca: 30 PCs of them"
        )
        sets.append(("pbmc3k", adata, text))
    return sets


def annotation_trees(adata, steps: list[int], latents: list[int]) -> list[dict]:
    """A real dataset's discovered trees against its annotation hierarchy.

    The annotation is ``compartment`` > ``lineage`` > ``cell_type``; its clades of two or
    more types are the reference each representation's tree is read against.
    """
    import scvi

    import scbranch as sb
    from scbranch.tl._branch_hierarchy import read_hierarchy
    from scbranch.tl._compare import clades

    sb.tl.branch_hierarchy(
        adata, groupby="cell_type", use_rep="X_pca", hierarchy=["compartment", "lineage"],
        key_added="annotation",
    )  # fmt: skip
    truth = list(clades(read_hierarchy(adata, "annotation")[0]))
    rows = []

    def found(label: str, **kwargs) -> None:
        key = f"found_{len(rows)}"
        sb.tl.branch_hierarchy(adata, groupby="cell_type", key_added=key, **kwargs)
        got = set(clades(read_hierarchy(adata, key)[0]))
        rows.append(
            {
                "representation": label,
                f"annotation clades found (of {len(truth)})": sum(c in got for c in truth),
                "crossing clades": crossing_clades(got, truth),
                "annotation clades": "; ".join(
                    "{" + ", ".join(sorted(c)) + "}" + ("" if c in got else " (missed)")
                    for c in sorted(truth, key=len)
                ),
            }
        )

    found("expression", layer="counts", target_sum=1e4)
    found(f"PCA (X_pca, {adata.obsm['X_pca'].shape[1]})", use_rep="X_pca")
    for n_latent in latents:
        for n_steps in steps:
            scvi.settings.seed = 0
            vae = sb.model.fit_scvi(
                adata, counts_layer="counts", n_latent=n_latent, max_epochs=10**6,
                max_steps=n_steps, batch_size=128, accelerator="cpu", devices=1,
                enable_progress_bar=False,
            )  # fmt: skip
            key = f"X_scVI_{n_latent}_{n_steps}"
            adata.obsm[key] = vae.get_latent_representation(adata)
            found(f"scVI latent ({n_latent} dims, {n_steps:,} steps)", use_rep=key)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1", help="atlas (and scVI) seeds")
    parser.add_argument("--steps", default="1000,3000,10000", help="scVI training steps")
    parser.add_argument("--n-latent", default="10,30", help="scVI latent sizes")
    parser.add_argument("--cells", type=int, default=10_000)
    parser.add_argument("--out", default=str(ROOT / "benchmark_out" / "latent_tree"))
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--reuse-simulated",
        default=None,
        help="latent_tree.csv of an earlier run with the same settings: its simulated rows are "
        "reused (the page says so) and only the real-cell section runs",
    )
    parser.add_argument("--fast", action="store_true", help="smoke test; numbers meaningless")
    args = parser.parse_args(argv)
    if args.fast:
        args.seeds, args.steps, args.n_latent, args.cells = "0", "50", "10", 3000
    import torch

    torch.set_num_threads(args.threads)
    out, markdown, reference, params = atlas_study(args, "latent_tree.md")
    t_all = time.perf_counter()
    steps = [int(s) for s in args.steps.split(",")]
    latents = [int(s) for s in args.n_latent.split(",")]
    rows = []
    if args.reuse_simulated:  # an earlier run's simulated rows (same settings), recorded below
        rows = pd.read_csv(args.reuse_simulated, keep_default_na=False).to_dict("records")
    for seed in [] if args.reuse_simulated else [int(s) for s in args.seeds.split(",")]:
        path = simulated_atlas(out, args.cells, params, seed)
        try:
            rows += trees_of(path, steps, latents, seed)
        finally:
            path.unlink(missing_ok=True)
    real_sections = []
    for name, adata, text in real_datasets():
        real = pd.DataFrame(annotation_trees(adata, steps, latents))
        real.to_csv(out / f"annotation_tree_{name}.csv", index=False)
        real_sections += [
            f"## Real cells: {name} against its annotation hierarchy",
            "",
            f"{text}; the annotation (compartment > lineage) is a biologist's grouping, not a "
            "known truth (see the docstring). scVI: seed 0.",
            "",
            _md(real, index=False),
            "",
        ]
    table = pd.DataFrame(rows)
    table.to_csv(out / "latent_tree.csv", index=False)
    first = next(r for r in rows if not r["failed"]) if any(not r["failed"] for r in rows) else {}
    shown = table.rename(
        columns={
            "recall_level1": f"level 1 found (of {first.get('n_true_level1')})",
            "recall_level2": f"level 2 found (of {first.get('n_true_level2')})",
            "conflicts": "crossing clades",
            "n_found": "clades in the found tree",
        }
    ).drop(columns=["n_true_level1", "n_true_level2"], errors="ignore")
    lines = [
        "# Which representation finds the true tree of a simulated atlas",
        "",
        f"Generated by `python benchmarks/latent_tree.py --seeds {args.seeds} --steps "
        f"{args.steps} --n-latent {args.n_latent}` in {(time.perf_counter() - t_all) / 60:.1f} "
        f"min ({args.threads} torch threads on {os.cpu_count()} CPU cores). SIMULATED atlas: "
        f"{args.cells:,} cells, "
        f"{N_TYPES} types on a three-level tree, 2,000 genes, parameters fitted to {reference}; "
        "the known answer is its true tree. What each row and column is: the script's "
        "docstring. Seconds: discovery, plus scVI's training for its rows. failed: "
        "discovery refused the representation (its message)."
        + (
            " The simulated rows are reused from an earlier run with these settings "
            f"(`--reuse-simulated {Path(args.reuse_simulated).name}`); this run's time is the "
            "real-cell section's."
            if args.reuse_simulated
            else ""
        ),
        "",
        _md(shown.round(3), index=False),
        "",
        *real_sections,
    ]
    print(write_lines(markdown, lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
