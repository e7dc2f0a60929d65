"""A mixture of independently trained models: is the gap to real cells seed noise or bias?

The quality benchmark's default rows vary from one training seed to the next (AUROC sd 0.03
on pbmc3k). If what tells a model's cells from real ones differs between training seeds, a
mixture of models trained with different seeds (each generating a third of the cells) is
closer to real cells than any one of them (MMD^2 is convex in the generating distribution);
if it is shared, the mixture scores as the single models do. This page asks which, on
quality.py's splits (train / held-out / unseen 50 / 30 / 20 % per type), instrument and
protocol:

  single            the default model (conditioned network, default budget), training seeds
                    0-8, each generating 200 cells per type with generation seeds 0-2
  mixture of 3      models of training seeds 3e, 3e + 1, 3e + 2 (e = 0, 1, 2: three mixtures),
                    each generating a third of 200 cells per type (67 / 67 / 66), generation
                    seeds 0-2
  per-class Gaussian, probe: real cells, unseen    quality.py's rows (the baseline; the known
                    answer: it must score like the control)

Mean over the evaluated types of ``tl.evaluate``, then mean ± sd over runs.

Usage (from the repository root, in the project's venv; run nothing else beside it):
  python benchmarks/ensemble.py          # about 11 min on 2 cores
  python benchmarks/ensemble.py --fast   # smoke test; numbers meaningless
Writes docs/benchmarks/ensemble.md and a CSV under --out.
"""

from __future__ import annotations

import argparse
import logging
import time

import anndata as ad
import numpy as np
import pandas as pd
from quality import (
    LABELS,
    LOADERS,
    SETTINGS,
    SPLIT,
    _fixed_rows,
    _md,
    cpu_threads,
    prepare_run,
    train_model,
    write_lines,
)

METRICS = {  # metric -> space of tl.evaluate's report
    "auroc": "reference_pca",
    "mmd": "reference_pca",
    "mmd_median": "reference_pca",
    "w2": "reference_pca",
    "dispersion": "reference_pca",
    "label_fidelity": "reference_pca",
    "de_lfc_spearman": "genes",
}
MEMBERS = 3
logger = logging.getLogger("ensemble")


def mixture_cells(models, n_cells: int, seed: int):
    """``n_cells`` cells per type, split as evenly as possible over ``models``."""
    shares = np.diff(np.linspace(0, n_cells, len(models) + 1).round().astype(int))
    parts = [
        m.generate(n_cells=int(k), seed=1000 * seed + i, progress_bar=False)
        for i, (m, k) in enumerate(zip(models, shares, strict=True))
    ]
    gen = ad.concat(parts, index_unique="-")
    gen.obs[LABELS] = gen.obs[LABELS].astype("category")
    return gen


def summarise(report: pd.DataFrame) -> dict:
    """Mean over the evaluated types of every metric (and its control)."""
    types = report[report["group"] != "all"]
    out = {}
    for metric, space in METRICS.items():
        part = types[(types["metric"] == metric) & (types["space"] == space)]
        out[metric] = part["generated"].mean()
        out[f"{metric} (control)"] = part["control"].mean()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="smoke-test settings")
    parser.add_argument("--datasets", default="pbmc68k,pbmc3k")
    parser.add_argument("--out", default="benchmark_out/ensemble")
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    import scbranch as sb

    markdown = prepare_run(args, "ensemble")
    cfg = SETTINGS["fast" if args.fast else "cpu"]
    n_mixtures = 1 if args.fast else 3
    t_all = time.perf_counter()
    rows = []

    def judge(gen, dataset, row, run, seed, held, train):
        report = sb.tl.evaluate(gen, held, LABELS, train=train, seed=seed)
        rows.append({"dataset": dataset, "row": row, "run": run, "seed": seed, **summarise(report)})

    for dataset in args.datasets.split(","):
        train, held, unseen = LOADERS[dataset](seed=0, fractions=SPLIT)
        models = [
            train_model(train, cfg, seed, "conditioned") for seed in range(MEMBERS * n_mixtures)
        ]
        for seed in cfg["seeds"]:
            for k, model in enumerate(models):
                gen = model.generate(n_cells=cfg["n_cells"], seed=seed, progress_bar=False)
                judge(gen, dataset, "single", k, seed, held, train)
            for e in range(n_mixtures):
                members = models[MEMBERS * e : MEMBERS * (e + 1)]
                gen = mixture_cells(members, cfg["n_cells"], seed)
                judge(gen, dataset, f"mixture of {MEMBERS}", e, seed, held, train)
        fixed, _ = _fixed_rows(train, unseen, {}, {}, lambda name, make, *a: make())
        for name in ("per-class Gaussian", "probe: real cells, unseen"):
            for seed in cfg["seeds"]:
                judge(
                    fixed[name].generate(cfg["n_cells"], seed), dataset, name, 0, seed, held, train
                )
        logger.info("%s done", dataset)
    table = pd.DataFrame(rows)
    table.to_csv("ensemble.csv", index=False)
    wall = (time.perf_counter() - t_all) / 60
    lines = [
        "# A mixture of independently trained models (generated by `benchmarks/ensemble.py`; "
        "do not edit by hand)",
        "",
        f"quality.py's splits and instrument; single models of training seeds "
        f"0-{MEMBERS * n_mixtures - 1}, {n_mixtures} mixture(s) of {MEMBERS} of them, "
        f"generation seeds {cfg['seeds']}, {cfg['n_cells']} cells per type; mean over the "
        "evaluated types, then mean ± sd over runs (model or mixture x generation seed). "
        f"Total wall time {wall:.1f} min on {cpu_threads()}.",
    ]
    for dataset, part in table.groupby("dataset", sort=False):
        stats = part.groupby("row", sort=False)[list(METRICS)].agg(["mean", "std"])
        shown = pd.DataFrame(
            {
                m: stats[(m, "mean")].map("{:.4f}".format)
                + " ± "
                + stats[(m, "std")].map("{:.4f}".format)
                for m in METRICS
            }
        )
        control = part[[f"{m} (control)" for m in METRICS]].mean()
        shown.loc["control (real vs real)"] = [f"{control[f'{m} (control)']:.4f}" for m in METRICS]
        lines += ["", f"## {dataset}", "", _md(shown.reset_index(), index=False)]
    write_lines(markdown, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    logging.getLogger("ensemble").setLevel(logging.INFO)
    raise SystemExit(main())
