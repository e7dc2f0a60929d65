"""Spaces benchmark: branched diffusion in PCA, scVI-latent and expression space, to counts.

For each dataset the cells are split per class into train and held-out (as in quality.py); each
space's model is fitted on the train cells only and generates ``n_cells`` per class WITH COUNTS:
  PCA         30 PCs of the train cells, decoded by the PCA map; counts through class size factors
  scVI        scVI (NB) trained on the train counts; diffusion on its latent means; decoded by
              scVI with library sizes drawn from the class, counts sampled from the NB
  expression  the log-normalised genes themselves (no encoder); counts through size factors
Reported per space: fitting time (encoder and diffusion), sampling time, and
``scbranch.tl.evaluate``'s metrics with their real-vs-real controls, plus two count checks on
ALL held-out cells of each class, over ``count_seeds`` generations of ``count_cells`` per class:
the Spearman correlation of per-gene mean counts (generated vs held-out) and the mean over genes
of |zero fraction difference|. Three references put the correlation in context:
  control         the class's real train cells vs its held-out cells
  reconstruction  (scVI only) scVI's expected counts for the held-out cells THEMSELVES (their
                  own latents, their own library sizes): what a generator in scVI's latent space
                  reaches if it reproduces the held-out cells exactly
  ceiling         ``scbranch.metrics.gene_mean_ceiling`` of the held-out counts: what the true
                  per-gene means of the class would reach, given the held-out cells' sampling noise
pbmc3k runs with two HVG sets: ``seurat_v3`` (raw counts; what scvi-tools recommends for count
models; needs scikit-misc, ``pip install -e ".[benchmarks]"``) and scanpy's default ``seurat``
(log-normalised dispersion, as in quality.py).

Usage (from the repository root, in the project's venv):
  python benchmarks/spaces.py            # CPU settings (about 25 min on 2 cores)
  python benchmarks/spaces.py --fast     # smoke test (numbers meaningless)
Writes docs/benchmarks/spaces.md (tables) and CSVs under --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from quality import LABELS, LOADERS, _md, prepare_run, write_lines

SETTINGS = {
    "cpu": {
        "steps": 2000,
        "batch_size": 64,
        "n_cells": 300,
        "seed": 0,
        "scvi_epochs": 200,
        # the count checks: many cells per class, so the generated means carry little noise
        "count_cells": 3000,
        "count_seeds": (0, 1, 2),
    },
    "fast": {
        "steps": 20,
        "batch_size": 64,
        "n_cells": 30,
        "seed": 0,
        "scvi_epochs": 2,
        "count_cells": 40,
        "count_seeds": (0, 1),
    },
}
#: dataset name -> (loader, keyword arguments)
DATASETS = {
    "pbmc3k": ("pbmc3k", {"hvg_flavor": "seurat_v3"}),
    "pbmc3k_seurat": ("pbmc3k", {"hvg_flavor": "seurat"}),
    "pbmc68k": ("pbmc68k", {}),
}
DATASET_TITLES = {
    "pbmc3k": "pbmc3k, 2,000 seurat_v3 HVGs (raw counts; scvi-tools' recommendation)",
    "pbmc3k_seurat": "pbmc3k, 2,000 seurat HVGs (log-normalised; scanpy's default, as quality.py)",
    "pbmc68k": "pbmc68k",
}
SPACES = ("PCA", "scVI", "expression")
#: evaluate() metrics shown in the summary (mean over classes), with their space
SUMMARY = [
    ("reference_pca", "label_fidelity"),
    ("reference_pca", "auroc"),
    ("genes", "gene_mean_spearman"),
    ("genes", "de_lfc_spearman"),
    ("counts", "count_mean_spearman"),
    ("counts", "zero_fraction_error"),
]

logger = logging.getLogger("spaces")


def fit_space(space: str, train, cfg) -> tuple[object, dict]:
    """A trained BranchedDiffusion in ``space``; returns it with encoder and diffusion times."""
    import scbranch as sb

    t0 = time.perf_counter()
    if space == "scVI":
        vae = sb.model.fit_scvi(
            train, counts_layer="counts", max_epochs=cfg["scvi_epochs"], seed=cfg["seed"]
        )
        encoder_s = time.perf_counter() - t0
        model = sb.BranchedDiffusion.from_scvi_model(vae, labels_key=LABELS, adata=train)
    else:
        encoder_s = 0.0  # the PCA is part of the data loading (train cells only)
        obsm_key = "X_pca" if space == "PCA" else None
        sb.BranchedDiffusion.setup_anndata(
            train, labels_key=LABELS, obsm_key=obsm_key, counts_layer="counts"
        )
        model = sb.BranchedDiffusion(train)
    steps_per_epoch = max(1, math.ceil(train.n_obs / cfg["batch_size"]))
    t1 = time.perf_counter()
    model.train(
        max_epochs=max(1, math.ceil(cfg["steps"] / steps_per_epoch)),
        batch_size=cfg["batch_size"],
        enable_progress_bar=False,
    )
    logger.info("%s", model)
    return model, {"encoder_s": encoder_s, "diffusion_s": time.perf_counter() - t1}


def _class_counts(adata, label: str):
    return adata.layers["counts"][(adata.obs[LABELS] == label).to_numpy()]


def scvi_reconstruction(model, held) -> np.ndarray | None:
    """scVI's expected counts for the held-out cells themselves (None for other spaces).

    Each cell's own latent posterior decoded with its own library size: the per-gene means a
    generator in scVI's latent space would give if it reproduced the held-out cells exactly.
    Right for the NB and Poisson likelihoods (fit_scvi's default here): for ZINB the
    normalised expression leaves out the zero inflation, and expected counts are lower.
    """
    vae = model.scvi_model
    if vae is None:
        return None
    scale = vae.get_normalized_expression(held, library_size=1.0, n_samples=20, return_mean=True)
    library = np.asarray(held.layers["counts"].sum(1)).ravel()
    return np.asarray(scale) * library[:, None]


def count_checks(model, held, train, cfg) -> pd.DataFrame:
    """Per class and count seed: mean-count Spearman and zero-fraction error on held-out cells."""
    from scbranch.metrics import gene_mean_ceiling, gene_moment_spearman, zero_fraction_error

    recon = scvi_reconstruction(model, held)
    held_counts, references = {}, {}
    for label in held.obs[LABELS].cat.categories:
        h = _class_counts(held, label)
        if h.shape[0] < 2:
            continue
        t = _class_counts(train, label)
        mask = (held.obs[LABELS] == label).to_numpy()
        held_counts[label] = h
        references[label] = {
            "n_held": h.shape[0],
            "control": gene_moment_spearman(t, h)[0],
            "reconstruction": np.nan if recon is None else gene_moment_spearman(recon[mask], h)[0],
            "ceiling": gene_mean_ceiling(h, seed=cfg["seed"]) if h.shape[0] >= 4 else np.nan,
            "zero_error_control": zero_fraction_error(t, h),
        }
    rows = []
    for seed in cfg["count_seeds"]:
        gen = model.generate(
            n_cells=cfg["count_cells"],
            labels=list(references),
            seed=seed,
            counts=True,
            progress_bar=False,
        )
        for label, ref in references.items():
            g, h = _class_counts(gen, label), held_counts[label]
            rows.append(
                {
                    "class": label,
                    "count_seed": seed,
                    "spearman": gene_moment_spearman(g, h)[0],
                    "zero_error": zero_fraction_error(g, h),
                    **ref,
                }
            )
    return pd.DataFrame(rows)


def per_class(checks: pd.DataFrame) -> pd.DataFrame:
    """Mean (and sd over count seeds) of the per-class count checks."""
    keys = ["space", "class"]
    fixed = ["n_held", "control", "reconstruction", "ceiling", "zero_error_control"]
    by = checks.groupby(keys, sort=False)
    out = by[fixed].first()
    out.insert(1, "spearman", by["spearman"].mean())
    out.insert(2, "spearman_sd", by["spearman"].std(ddof=1))
    out["zero_error"] = by["zero_error"].mean()
    return out[
        ["n_held", "spearman", "spearman_sd", "control", "reconstruction", "ceiling"]
        + ["zero_error", "zero_error_control"]
    ]


def run_dataset(name: str, train, held, cfg) -> dict:
    import scbranch as sb

    logger.info(
        "%s: %d train / %d held-out cells, %d genes", name, train.n_obs, held.n_obs, train.n_vars
    )
    summary, checks = [], []
    for space in SPACES:
        data = train.copy()
        model, times = fit_space(space, data, cfg)
        t0 = time.perf_counter()
        gen = model.generate(
            n_cells=cfg["n_cells"], seed=cfg["seed"], counts=True, progress_bar=False
        )
        sample_s = time.perf_counter() - t0
        report = sb.tl.evaluate(gen, held, LABELS, train=train, seed=cfg["seed"])
        means = report[report.group == "mean"].set_index(["space", "metric"])
        checks.append(count_checks(model, held, train, cfg).assign(space=space))
        row = {"space": space, **times, "sample_s_per_1k": sample_s / gen.n_obs * 1e3}
        for key in SUMMARY:
            if key in means.index:
                row[key[1]] = means.loc[key, "generated"]
                row[f"{key[1]} (control)"] = means.loc[key, "control"]
        summary.append(row)
        logger.info("%s / %s: %s", name, space, row)
    return {
        "summary": pd.DataFrame(summary),
        "checks": pd.concat(checks, ignore_index=True),
        "n_train": train.n_obs,
        "n_held": held.n_obs,
        "n_genes": train.n_vars,
    }


def count_summary(checks: pd.DataFrame) -> pd.DataFrame:
    """Per space: the per-class count checks on all held-out cells, summarised."""
    table = per_class(checks).reset_index()
    by_space = table.groupby("space", sort=False)

    def at_least(column):
        return by_space[column].apply(lambda r: int((r >= 0.9).sum()))

    return pd.DataFrame(
        {
            "count ρ (mean over classes)": by_space["spearman"].mean(),
            "control": by_space["control"].mean(),
            "classes": by_space.size(),
            "ρ ≥ 0.9": at_least("spearman"),
            "control ≥ 0.9": at_least("control"),
            "reconstruction ≥ 0.9": at_least("reconstruction"),
            "ceiling ≥ 0.9": at_least("ceiling"),
            "zero error (mean)": by_space["zero_error"].mean(),
            "zero error control": by_space["zero_error_control"].mean(),
        }
    )


def write_markdown(path: Path, results: dict, cfg_name: str, cfg: dict, wall_s: float) -> str:
    lines = [
        "# Spaces benchmark: PCA vs scVI latent vs expression, to counts",
        "",
        f"Generated by `python benchmarks/spaces.py` ({cfg_name} settings: {cfg['steps']} "
        f"optimiser steps at batch {cfg['batch_size']}, {cfg['n_cells']} cells per class, "
        f"scVI {cfg['scvi_epochs']} epochs, seed {cfg['seed']}; count checks on "
        f"{cfg['count_cells']} cells per class and generation seeds {list(cfg['count_seeds'])})"
        f"; total {wall_s / 60:.1f} min on "
        f"{os.cpu_count()} CPU cores. Every model is fitted on the train cells only.",
        "",
        "Summary: mean over classes of `sb.tl.evaluate` (equal-size halves of the held-out cells;"
        " control = real half A vs real half B), times in seconds. For quality (AUROC, label "
        "fidelity) read [spaces on the corrected instrument](spaces_quality.md): this page's "
        "models diffuse in-sample PC scores.",
    ]
    for name, res in results.items():
        lines += [
            "",
            f"## {DATASET_TITLES.get(name, name)}: {res['n_train']} train / {res['n_held']} "
            f"held-out cells, {res['n_genes']} genes",
            "",
            _md(res["summary"].set_index("space")),
            "",
            "Counts, per class on ALL held-out cells of the class: Spearman correlation of "
            "per-gene mean counts, generated vs held-out (mean and sd over the count seeds); "
            "control: the class's real train cells vs held-out; reconstruction: scVI's "
            "expected counts for the held-out cells themselves; ceiling: "
            "`gene_mean_ceiling` of the held-out cells (what the class's true means would "
            "reach). Zero error: mean over genes of |zero-fraction difference|.",
            "",
            _md(count_summary(res["checks"])),
            "",
            _md(per_class(res["checks"])),
        ]
    return write_lines(path, lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="smoke-test settings")
    parser.add_argument("--datasets", default=",".join(DATASETS), help=f"of {list(DATASETS)}")
    parser.add_argument("--out", default="benchmark_out/spaces", help="CSVs")
    parser.add_argument("--markdown", default=None, help="default: docs/benchmarks/spaces.md")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--n-cells", type=int, default=None, help="generated cells per class (default: 300)"
    )
    parser.add_argument(
        "--report-only", action="store_true", help="rebuild the markdown from the CSVs in --out"
    )
    args = parser.parse_args(argv)
    cfg_name = "fast" if args.fast else "cpu"
    cfg = dict(SETTINGS[cfg_name])
    if args.n_cells:
        cfg["n_cells"] = args.n_cells

    markdown = prepare_run(args, "spaces")
    loaders = LOADERS
    unknown = set(args.datasets.split(",")) - set(DATASETS)
    if unknown:
        parser.error(f"unknown dataset(s) {sorted(unknown)}; choose from {list(DATASETS)}")
    results = {}
    t0 = time.perf_counter()
    if args.report_only:
        meta = json.loads(Path("meta.json").read_text())
        for name in args.datasets.split(","):
            results[name] = {
                "summary": pd.read_csv(f"summary_{name}.csv"),
                "checks": pd.read_csv(f"checks_{name}.csv"),
                **meta[name],
            }
        print(write_markdown(markdown, results, cfg_name, cfg, meta["wall_s"]))
        return 0
    meta = {}
    for name in args.datasets.split(","):
        loader, kwargs = DATASETS[name]
        train, held = loaders[loader](seed=0, **kwargs)
        results[name] = run_dataset(name, train, held, cfg)
        results[name]["summary"].to_csv(f"summary_{name}.csv", index=False)
        results[name]["checks"].to_csv(f"checks_{name}.csv", index=False)
        meta[name] = {k: results[name][k] for k in ("n_train", "n_held", "n_genes")}
    meta["wall_s"] = time.perf_counter() - t0
    Path("meta.json").write_text(json.dumps(meta))
    print(write_markdown(markdown, results, cfg_name, cfg, meta["wall_s"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
