"""Adding a type the model's latent was fitted without: tutorial 03's setting, measured.

pbmc68k (700 PBMCs shipped with scanpy) is split 70/30 per type (seed 0). The PCA (30
components) is fitted on the training cells of every type but Dendritic; the known types'
models learn their out-of-fold scores (``sb.tl.pca_out_of_fold``) in the default
configuration and budget, and ``add_classes`` adds the training dendritic cells, projected into
that PCA. Rows (each judged by ``tl.evaluate`` against the held-out cells with a classifier of
all training cells, 200 cells per type, generation seeds 0-2):

  <architecture>, add_classes            the default extension budget (``train()``'s rule)
                                         and options (the conditioned network's new branch
                                         with head blocks of its own)
  conditioned, add_classes, rows only    ``own_head=False``: the new branch's embedding and
                                         adapter rows alone
  conditioned, add_classes, readout      ``own_head="readout"``: the rows and an output layer
                                         of its own, reading the shared head blocks
  ..., 2x / 4x steps                     ``max_epochs`` two / four times the default budget
                                         (2x: about ``train()``'s 1,000-step floor)
  ceiling: held-out real scores, decoded   held-out real dendritic cells' own scores in the
                                         PCA, decoded like generated cells: the best any
                                         generator of PC scores can do with this PCA (the
                                         known answer for the rows above)
  train scores, decoded                  the training dendritic cells' scores (what
                                         ``add_classes`` learns from), decoded the same way

The control of every metric is two halves of the held-out cells (``tl.evaluate``).

Usage (from the repository root, in the project's venv):
  python benchmarks/extension_outside.py          # about 6 min on 2 cores
  python benchmarks/extension_outside.py --fast   # smoke test; numbers meaningless
Writes docs/benchmarks/extension_outside.md and a CSV under --out.
"""

from __future__ import annotations

import argparse
import logging
import math
import time

import numpy as np
import pandas as pd
from quality import _md, decode_in_space, prepare_run, write_lines

NEW = "Dendritic"
LABELS = "cell_type"
METRICS = ["label_fidelity", "mmd_median", "w2"]
#: multiples of add_classes' own number of steps read for each variant (1: the default)
FACTORS = (1, 2, 4)
logger = logging.getLogger("extension_outside")


def split_and_embed():
    """Tutorial 03's data: the train/held-out split, the PCA of the known types' train cells,
    every cell projected into it, the known types' out-of-fold scores."""
    import scanpy as sc

    import scbranch as sb

    adata = sb.datasets.pbmc68k()
    in_train, in_held = sb.datasets.stratified_split(adata.obs[LABELS], 0.7, seed=0)
    train, held = adata[in_train].copy(), adata[in_held].copy()
    old = train[train.obs[LABELS] != NEW].copy()
    old.obs[LABELS] = old.obs[LABELS].cat.remove_unused_categories()
    sc.pp.pca(old, n_comps=30)
    for cells in (train, held):
        del cells.obsm["X_pca"]  # the shipped PCA was fitted on every cell
        sb.tl.embed_like(cells, old, basis="pca")
    sb.tl.pca_out_of_fold(old, groupby=LABELS)
    new = train[train.obs[LABELS] == NEW].copy()
    return train, held, old, new


def judge(gen, train, held, seed: int) -> pd.Series:
    import scbranch as sb

    rep = sb.tl.evaluate(gen, held, LABELS, train=train, groups=[NEW], metrics=METRICS, seed=seed)
    rows = rep[rep["group"] == NEW].set_index("metric")
    return pd.concat([rows["generated"], rows["control"].add_suffix(" (control)")])


def decoded(model, z, seed: int, n_cells: int):
    """``n_cells`` draws of the latents ``z`` (dendritic cells), decoded by the model's space."""
    rows = np.random.default_rng(seed).choice(len(z), n_cells)
    return decode_in_space(model, np.asarray(z)[rows], np.array([NEW] * n_cells), "auto", seed)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="smoke-test settings")
    parser.add_argument("--out", default="benchmark_out/extension_outside")
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    import scvi

    import scbranch as sb

    markdown = prepare_run(args, "extension_outside")
    t_all = time.perf_counter()
    seeds, n_cells = ([0], 40) if args.fast else ([0, 1, 2], 200)
    train, held, old, new = split_and_embed()
    per_epoch = math.ceil(new.n_obs / 64)  # extension batches of 64
    default_steps = 0  # set by each variant's first (factor 1) run
    results = []
    variants = [
        ("conditioned", None),
        ("conditioned", False),
        ("conditioned", "readout"),
        ("branched", None),
    ]
    for arch, own_head in variants:
        for factor in FACTORS:
            scvi.settings.seed = 0
            sb.BranchedDiffusion.setup_anndata(old, labels_key=LABELS, obsm_key="X_pca_oof")
            model = sb.BranchedDiffusion(old, architecture=arch)
            model.train(
                max_epochs=2 if args.fast else None,
                batch_size=64,
                accelerator="cpu",
                enable_progress_bar=False,
            )
            # factor 1: add_classes' own rule (train()'s, on the new cells); factor k: k times
            # the steps that rule gave
            epochs = None if factor == 1 else factor * math.ceil(default_steps / per_epoch)
            model.add_classes(
                new,
                labels=[NEW],
                max_epochs=1 if args.fast else epochs,
                own_head=own_head,
                progress_bar=False,
            )
            if factor == 1:
                default_steps = model.extensions_[-1]["n_steps"]
            name = f"{arch}, add_classes" + {False: ", rows only", "readout": ", readout"}.get(
                own_head, ""
            )
            name += "" if factor == 1 else f", {factor}x steps"
            for seed in seeds:
                gen = model.generate(n_cells=n_cells, labels=[NEW], seed=seed, progress_bar=False)
                results.append(judge(gen, train, held, seed).rename((name, seed)))
            logger.info("%s: %d extension steps", name, model.extensions_[-1]["n_steps"])
        if (arch, own_head) == variants[
            0
        ]:  # the probes need a model of the known types and the new one
            probes = {
                "ceiling: held-out real scores, decoded": held[held.obs[LABELS] == NEW].obsm[
                    "X_pca"
                ],
                "train scores, decoded": new.obsm["X_pca"],
            }
            for name, z in probes.items():
                for seed in seeds:
                    gen = decoded(model, z, seed, n_cells)
                    gen.obs[LABELS] = gen.obs[LABELS].astype("category")
                    results.append(judge(gen, train, held, seed).rename((name, seed)))
    table = pd.DataFrame(results)
    table.index = pd.MultiIndex.from_tuples(table.index, names=["row", "seed"])
    table.to_csv("extension_outside.csv")
    mean = table.groupby(level="row", sort=False).mean()
    sd = table.groupby(level="row", sort=False).std()
    shown = mean[METRICS].round(3).astype(str) + " ± " + sd[METRICS].round(3).astype(str)
    control = mean[[f"{m} (control)" for m in METRICS]].iloc[0].round(3)
    wall = time.perf_counter() - t_all
    lines = [
        "# A new type outside the latent (generated by `benchmarks/extension_outside.py`; do "
        "not edit by hand)",
        "",
        f"Tutorial 03's setting: pbmc68k, 70/30 split, PCA fitted without {NEW}; mean ± sd "
        f"over generation seeds {seeds}, {n_cells} cells. Total wall time {wall / 60:.1f} min. "
        "What each row is: the script's docstring.",
        "",
        f"Control (two halves of the held-out {NEW} cells): "
        + ", ".join(f"{m} {control[f'{m} (control)']}" for m in METRICS)
        + ".",
        "",
        _md(shown.reset_index(), index=False),
        "",
    ]
    write_lines(markdown, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
