"""Spaces benchmark: branched diffusion in PCA, scVI-latent and expression space, to counts.

For each dataset the cells are split per class into train and held-out (as in quality.py); each
space's model is fitted on the train cells only and generates ``n_cells`` per class WITH COUNTS:
  PCA         30 PCs of the train cells, decoded by the PCA map; counts through class size factors
  scVI        scVI (NB) trained on the train counts; diffusion on its latent means; decoded by
              scVI with library sizes drawn from the class, counts sampled from the NB
  expression  the log-normalised genes themselves (no encoder); counts through size factors
Reported per space: fitting time (encoder and diffusion), sampling time, and
``scbranch.tl.evaluate``'s metrics with their real-vs-real controls, plus two count checks on
ALL held-out cells of each class: the Spearman correlation of per-gene mean counts (generated vs
held-out; control: train vs held-out) and the mean over genes of |zero fraction difference|.

Usage (from the repository root, in the project's venv):
  python benchmarks/spaces.py            # CPU settings (about 12 min on 2 cores)
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

import pandas as pd
from quality import LABELS, _md, load_pbmc3k, load_pbmc68k, prepare_run, write_lines

SETTINGS = {
    "cpu": {"steps": 2000, "batch_size": 64, "n_cells": 300, "seed": 0, "scvi_epochs": 200},
    "fast": {"steps": 20, "batch_size": 64, "n_cells": 30, "seed": 0, "scvi_epochs": 2},
}
SPACES = ("PCA", "scVI", "expression")
#: evaluate() metrics shown in the summary (mean over classes), with their space
SUMMARY = [
    ("reference_pca", "label_fidelity"),
    ("reference_pca", "auroc"),
    ("genes", "gene_mean_spearman"),
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


def count_checks(gen, held, train) -> pd.DataFrame:
    """Per class: per-gene mean-count Spearman and zero-fraction error on all held-out cells."""
    from scbranch.metrics import gene_moment_spearman, zero_fraction_error

    held_counts = held.layers["counts"]
    rows = []
    for label in gen.obs[LABELS].cat.categories:
        g = gen.layers["counts"][(gen.obs[LABELS] == label).to_numpy()]
        h = held_counts[(held.obs[LABELS] == label).to_numpy()]
        t = train.layers["counts"][(train.obs[LABELS] == label).to_numpy()]
        if g.shape[0] == 0 or h.shape[0] < 2:
            continue
        rows.append(
            {
                "class": label,
                "n_held": h.shape[0],
                "spearman": gene_moment_spearman(g, h)[0],
                "spearman_control": gene_moment_spearman(t, h)[0],
                "zero_error": zero_fraction_error(g, h),
                "zero_error_control": zero_fraction_error(t, h),
            }
        )
    return pd.DataFrame(rows)


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
        per_class = count_checks(gen, held, train).assign(space=space)
        checks.append(per_class)
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
    by_space = checks.groupby("space", sort=False)
    return pd.DataFrame(
        {
            "count ρ (mean over classes)": by_space["spearman"].mean(),
            "control": by_space["spearman_control"].mean(),
            "classes with ρ ≥ 0.9": by_space["spearman"].apply(lambda r: int((r >= 0.9).sum())),
            "control ≥ 0.9": by_space["spearman_control"].apply(lambda r: int((r >= 0.9).sum())),
            "classes": by_space.size(),
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
        f"scVI {cfg['scvi_epochs']} epochs, seed {cfg['seed']}); total {wall_s / 60:.1f} min on "
        f"{os.cpu_count()} CPU cores. Every model is fitted on the train cells only.",
        "",
        "Summary: mean over classes of `sb.tl.evaluate` (equal-size halves of the held-out cells;"
        " control = real half A vs real half B), times in seconds.",
    ]
    for name, res in results.items():
        lines += [
            "",
            f"## {name} ({res['n_train']} train / {res['n_held']} held-out cells, "
            f"{res['n_genes']} genes)",
            "",
            _md(res["summary"].set_index("space")),
            "",
            "Counts, per class on ALL held-out cells of the class: Spearman correlation of "
            "per-gene mean counts (generated vs held-out; control: the class's real train cells "
            "vs held-out) and mean over genes of |zero-fraction difference|.",
            "",
            _md(count_summary(res["checks"])),
            "",
            _md(res["checks"].set_index(["space", "class"])),
        ]
    return write_lines(path, lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="smoke-test settings")
    parser.add_argument("--datasets", default="pbmc3k,pbmc68k")
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
    loaders = {"pbmc68k": load_pbmc68k, "pbmc3k": load_pbmc3k}
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
        train, held = loaders[name](seed=0)
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
