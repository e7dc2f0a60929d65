"""Counts of the expression space: library sizes, with and without the profile bounds.

An expression-space model diffuses log-normalised genes; with ``counts_layer`` it draws counts
around its generated values with the class's size factors. Drawn around the raw values, the
small values of the many genes a type does not express add up, and a value far above any
training cell's takes a whole library. Since 2026-12-06 counts are drawn around the values
capped at each gene's training maximum and rescaled to the total every training cell shares
(``ExpressionSpace.count_profiles``); ``.X`` keeps the generated values.

Every decoding is applied to the same trained models and latents (the bounds switched off for
the "before" rows): library sizes of the counts (median, 99th percentile, largest), and
``tl.evaluate`` of ``.X`` (AUROC, MMD-median, label fidelity) for the variants that would also
bound ``.X``. The known answer: real cells nobody saw (the unseen 20 %) must have the training
cells' library sizes and score at the control. pbmc68k_reduced, split per type 50 % train /
30 % held out / 20 % unseen, the default network and budget, one training seed per split,
200 cells per type.

Usage (from the repository root, in the project's venv):
  python benchmarks/expression_counts.py            # about 7 min on 2 cores (3 splits)
  python benchmarks/expression_counts.py --fast     # smoke test; numbers meaningless
Writes docs/benchmarks/expression_counts.md.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import numpy as np
import pandas as pd
from quality import LABELS, _md, _split, cpu_threads, page_path, write_lines

SETTINGS = {
    "cpu": {"splits": 3, "n_cells": 200, "epochs": None},
    "fast": {"splits": 1, "n_cells": 20, "epochs": 2},
}


def _libraries(counts) -> np.ndarray:
    return np.asarray(counts.sum(1), dtype=np.float64).ravel()


def _library_row(lib: np.ndarray) -> dict:
    return {
        "library median": float(np.median(lib)),
        "library 99th pct": float(np.percentile(lib, 99)),
        "library max": float(lib.max()),
    }


def _quality(cells, held, train) -> dict:
    import scbranch as sb

    report = sb.tl.evaluate(cells, held, LABELS, train=train)
    mean = report.query("group == 'mean'").set_index("metric")
    return {
        "auroc": float(mean.loc["auroc", "generated"]),
        "auroc control": float(mean.loc["auroc", "control"]),
        "mmd_median": float(mean.loc["mmd_median", "generated"]),
        "label fidelity": float(mean.loc["label_fidelity", "generated"]),
        "label fidelity control": float(mean.loc["label_fidelity", "control"]),
    }


def one_split(seed: int, settings: dict) -> list[dict]:
    import scvi

    import scbranch as sb

    adata = sb.datasets.pbmc68k()
    train, held, unseen = _split(adata, (0.5, 0.3, 0.2), seed)
    scvi.settings.seed = seed
    sb.BranchedDiffusion.setup_anndata(train, labels_key=LABELS, counts_layer="counts")
    model = sb.BranchedDiffusion(train)
    model.train(max_epochs=settings["epochs"], enable_progress_bar=False)
    space = model.space
    bounds = (space.gene_max, space.total)
    rows = [
        {
            "split": seed,
            "decoding": "real cells, training",
            **_library_row(_libraries(train.layers["counts"])),
        },
        {
            "split": seed,
            "decoding": "probe: real cells, unseen (the known answer)",
            **_library_row(_libraries(unseen.layers["counts"])),
            **_quality(unseen, held, train),
        },
    ]
    variants = {
        "before: counts around the raw values": (None, None),
        "counts around capped + rescaled values (today)": bounds,
    }
    for name, (gene_max, total) in variants.items():
        space.gene_max, space.total = gene_max, total
        cells = model.generate(n_cells=settings["n_cells"], seed=0, counts=True, progress_bar=False)
        rows.append(
            {
                "split": seed,
                "decoding": name,
                **_library_row(_libraries(cells.layers["counts"])),
                **_quality(cells, held, train),
            }  # fmt: skip
        )
    # what bounding .X itself would do to the judged cells (counts as today)
    space.gene_max, space.total = bounds
    cells = model.generate(n_cells=settings["n_cells"], seed=0, counts=True, progress_bar=False)
    for name, cap, rescale in (
        (".X capped too", True, False),
        (".X capped + rescaled too", True, True),
        (".X rescaled too (no cap)", False, True),
    ):
        space.gene_max, space.total = (bounds[0] if cap else None), (bounds[1] if rescale else None)
        bounded = cells.copy()
        bounded.X = space.count_profiles(np.asarray(cells.X))
        rows.append({"split": seed, "decoding": name, **_quality(bounded, held, train)})
    space.gene_max, space.total = bounds
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="smoke test; numbers meaningless")
    parser.add_argument(
        "--markdown", default=None, help="default: docs/benchmarks/ (--fast: benchmark_out/)"
    )
    args = parser.parse_args(argv)
    settings = SETTINGS["fast" if args.fast else "cpu"]
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("scbranch").setLevel(logging.ERROR)
    began = time.perf_counter()
    rows = []
    for seed in range(settings["splits"]):
        rows += one_split(seed, settings)
        print(pd.DataFrame(rows).tail(7).round(3).to_string(), flush=True)
    table = pd.DataFrame(rows).drop(columns="split")
    order = list(dict.fromkeys(table["decoding"]))
    means = table.groupby("decoding", sort=False).mean().loc[order].round(3)
    minutes = (time.perf_counter() - began) / 60
    lines = [
        "# Counts of the expression space (generated by `benchmarks/expression_counts.py`; "
        "do not edit by hand)",
        "",
        f"pbmc68k_reduced (765 genes), {settings['splits']} split(s) per type into 50 % train / "
        "30 % held out / 20 % unseen, an expression-space model with `counts_layer` (default "
        f"network and budget, one training seed per split), {settings['n_cells']} cells per "
        "type; every decoding applied to the same models and latents. Library sizes are the "
        "counts' totals per cell (the generated types are balanced, the real ones are not, so "
        "medians differ by the mix). AUROC, MMD-median and label fidelity are `tl.evaluate` of "
        "`.X` against the held-out cells (reference PCA on the train cells), read against the "
        "control (two halves of the held-out cells) and the known answer, real cells nobody "
        "saw, which must sit at it. Mean over splits; blank where a row has no such value. "
        f"Wall time {minutes:.1f} min on {cpu_threads()}.",
        "",
        _md(means.rename_axis("decoding")),
        "",
        "Per split:",
        "",
        _md(pd.DataFrame(rows).round(3), index=False),
        "",
    ]
    write_lines(page_path(args.markdown, "expression_counts", args.fast), lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
