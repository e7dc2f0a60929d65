"""Does a batch effect mislead the scVI model's default tree? A known tree, batches added.

``from_scvi_model`` learns its tree's topology on the normalised counts, which carry any batch
effect, while scVI's latent (set up with ``batch_key``) is corrected for it. This study asks
whether that choice fails on batched data: the simulated atlas of ``latent_tree.py``
(``sb.datasets.simulate_atlas``, 60 types on a three-level tree, 2,000 genes, 10,000 cells; the
true tree is known) gets two batches. Each type has a home batch (drawn at random), and each of
its cells lies there with probability ``--confounding`` (0.8: batch and type confounded, as in
real atlases where donors or protocols cover types unevenly). In batch 1 every gene's rate is
multiplied by its own factor ``exp(N(0, sd))``; both batches' counts are then drawn again
(Poisson) alike, so that only the factor tells them apart. ``sd = 0`` is the control: the same
resampling and no batch effect.

Rows, per atlas seed and batch strength:
  scVI model's default tree   ``BranchedDiffusion.from_scvi_model(vae)``'s tree: the
                              expression's topology, branch times from the latent
  scVI latent (N steps)       the tree ``sb.tl.branch_hierarchy`` discovers in the latent of
                              scVI trained with ``batch_key="batch"`` (what scVI models used
                              before the expression's topology)

Columns (``scale.tree_recovery``): share of the true clades of two or more types found, at level
1 and level 2, and found clades that cross a true one (the errors).

Usage: python benchmarks/batch_topology.py          # about 13 min on 2 cores
       python benchmarks/batch_topology.py --fast   # smoke test: one seed, 50 steps
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import pandas as pd
from latent_tree import N_TYPES, ROOT, atlas_study, simulated_atlas
from quality import _md, write_lines
from scale import tree_recovery


def add_batches(adata, sd: float, confounding: float, seed: int):
    """``adata`` (counts in ``.X``) with two batches in ``obs['batch']``: each type mostly in
    its home batch, batch 1's genes scaled by ``exp(N(0, sd))``, every count drawn again."""
    import scipy.sparse as sp

    types = adata.obs["cell_type"].astype(str).to_numpy()
    names = np.unique(types)
    rng = np.random.default_rng(seed)
    home = dict(zip(names, rng.integers(0, 2, len(names)), strict=True))
    draws = np.random.default_rng(100 + seed)
    at_home = draws.random(len(types)) < confounding
    homes = np.array([home[t] for t in types])
    batch = np.where(at_home, homes, 1 - homes)
    factor = np.exp(draws.normal(0.0, sd, adata.n_vars))
    counts = sp.coo_matrix(adata.X)
    rate = counts.data * np.where(batch[counts.row] == 1, factor[counts.col], 1.0)
    data = draws.poisson(rate).astype(np.float32)
    out = adata.copy()
    out.X = sp.csr_matrix((data, (counts.row, counts.col)), shape=counts.shape)
    out.X.eliminate_zeros()
    out.obs["batch"] = pd.Categorical(batch.astype(str))
    return out


def trees_of(adata, newick: str, steps: list[int], seed: int) -> list[dict]:
    """The scVI model's default tree and the latents' trees against the true one."""
    import scvi

    import scbranch as sb
    from scbranch.tl._branch_hierarchy import read_hierarchy

    rows = []
    for n_steps in steps:
        scvi.settings.seed = seed
        t0 = time.perf_counter()
        vae = sb.model.fit_scvi(
            adata, counts_layer=None, batch_key="batch", max_epochs=10**6, max_steps=n_steps,
            batch_size=128, accelerator="cpu", devices=1, enable_progress_bar=False,
        )  # fmt: skip
        fit = time.perf_counter() - t0
        cells = adata.copy()
        if n_steps == steps[0]:  # the default's topology does not depend on scVI's training
            t0 = time.perf_counter()
            model = sb.BranchedDiffusion.from_scvi_model(vae, labels_key="cell_type", adata=cells)
            rows.append(
                {"representation": "scVI model's default tree", "seconds": time.perf_counter() - t0}
                | tree_recovery(model.tree, newick)
            )
        else:
            sb.model.ScviSpace.store_latent(vae, cells, "X_scVI", "cell_type")
        t0 = time.perf_counter()
        sb.tl.branch_hierarchy(cells, groupby="cell_type", use_rep="X_scVI", key_added="latent")
        rows.append(
            {
                "representation": f"scVI latent ({n_steps:,} steps)",
                "seconds": fit + time.perf_counter() - t0,
            }
            | tree_recovery(read_hierarchy(cells, "latent")[0], newick)
        )
    return rows


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per batch strength and representation: mean clades found and crossing, over seeds."""
    table = df.assign(
        level1=df["recall_level1"] * df["n_true_level1"],
        level2=df["recall_level2"] * df["n_true_level2"],
    )
    out = table.groupby(["batch sd", "representation"], sort=False).agg(
        level1=("level1", "mean"), level2=("level2", "mean"), crossing=("conflicts", "mean")
    )
    n1, n2 = int(df["n_true_level1"].iloc[0]), int(df["n_true_level2"].iloc[0])
    return out.rename(
        columns={
            "level1": f"level 1 found (of {n1})",
            "level2": f"level 2 found (of {n2})",
            "crossing": "crossing clades",
        }
    ).round(1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1", help="atlas, batch and scVI seeds")
    parser.add_argument("--steps", default="1000,3000", help="scVI training steps")
    parser.add_argument("--batch-sd", default="0,0.25,0.5", help="sd of log batch factors")
    parser.add_argument("--confounding", type=float, default=0.8)
    parser.add_argument("--cells", type=int, default=10_000)
    parser.add_argument("--out", default=str(ROOT / "benchmark_out" / "batch_topology"))
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--fast", action="store_true", help="smoke test; numbers meaningless")
    args = parser.parse_args(argv)
    if args.fast:
        args.seeds, args.steps, args.batch_sd = "0", "50", "0.5"
    import anndata as ad
    import torch

    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    out, markdown, reference, params = atlas_study(args, "batch_topology.md")
    steps = [int(s) for s in args.steps.split(",")]
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        path = simulated_atlas(out, args.cells, params, seed)
        try:
            atlas = ad.read_h5ad(path)
        finally:
            path.unlink(missing_ok=True)
        newick = atlas.uns["simulation"]["newick"]
        for sd in [float(s) for s in args.batch_sd.split(",")]:
            batched = add_batches(atlas, sd, args.confounding, seed)
            for row in trees_of(batched, newick, steps, seed):
                rows.append({"seed": seed, "batch sd": sd} | row)
                print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    df.to_csv(out / "batch_topology.csv", index=False)
    minutes = (time.perf_counter() - t_all) / 60
    lines = [
        "# Batch effects and the scVI model's default tree (generated by "
        "`benchmarks/batch_topology.py`; do not edit by hand)",
        "",
        f"The atlas is SIMULATED (`sb.datasets.simulate_atlas`, {N_TYPES} types on a "
        f"three-level tree, {args.cells:,} cells; negative-binomial parameters fitted on "
        f"{reference}); its true tree is known. Two batches: each type lies in its home batch "
        f"with probability {args.confounding:g}, batch 1's genes are scaled by exp(N(0, sd)), "
        "and every count is drawn again (Poisson) in both batches; sd 0 is the control (the "
        "same resampling, no batch effect). scVI is trained with `batch_key='batch'` (batch "
        "128). Seeds "
        f"{args.seeds}; {torch.get_num_threads()} torch threads. Wall time {minutes:.1f} min.",
        "",
        "Known answer: the true tree. Found: true clades of two or more types that the found "
        "tree holds (level 1: a reference type's leaves; level 2: a level-2 type's leaves), "
        "mean over seeds; crossing: found clades that cross a true one (the errors).",
        "",
        _md(summary(df)),
        "",
        "Every run:",
        "",
        _md(df, index=False),
    ]
    print(write_lines(markdown, lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
