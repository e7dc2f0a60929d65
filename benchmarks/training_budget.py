"""Training budget: quality against optimiser steps, so the default budget follows from a curve.

``model.train()`` defaults to about 4,000 optimiser steps at batch 64 whatever the data size,
and the quality benchmarks train for 2,000. Here each budget is its own training run (the
cosine schedule decays to zero at the end of the budget, so a checkpoint of a longer run is
not what a user with that budget gets), one training seed, every generation seed judged by
``tl.evaluate(gen, held, train=train)`` as in benchmarks/quality.py (reference PCA on the
train cells; the held-out, unseen and generated cells are all out-of-sample for it).

Rows:

  probe: real cells, unseen             real cells nothing saw: must sit at the control
  probe: unseen cells via the PCs, <noise>   the same cells' PC scores decoded without noise
                                        and with "nb": the best a generator of exact PC
                                        scores can reach
  <architecture>, <steps> steps         a model trained for that many steps on the latent
                                        (quality.py row names: ``branched:width512``),
                                        set up with counts (so PCA models decode with "nb",
                                        the default)

Usage (from the repository root, in the project's venv):
  python benchmarks/training_budget.py                       # both datasets, about 60 min
  python benchmarks/training_budget.py --datasets pbmc68k --architectures conditioned
  python benchmarks/training_budget.py --datasets pbmc68k --latent expression \
      --steps 1800,7200,14400 --architectures branched,branched:width512 \
      --markdown docs/benchmarks/training_budget_expression.md   # the expression space
  python benchmarks/training_budget.py --fast                # smoke test; numbers meaningless
Writes docs/benchmarks/training_budget.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import numpy as np
import pandas as pd
from noise_models import fit_rows as noise_probes
from out_of_fold import evaluate_rows, table
from quality import (
    LABELS,
    LOADERS,
    SPLIT,
    _md,
    cpu_threads,
    model_options,
    prepare_run,
    train_model,
    write_lines,
)

SETTINGS = {
    "cpu": {
        "steps": [500, 1000, 2000, 4000, 8000],
        "batch_size": 64,
        "n_cells": 200,
        "seeds": [0, 1, 2],
        "train_seed": 0,
    },
    "fast": {"steps": [10, 20], "batch_size": 64, "n_cells": 40, "seeds": [0], "train_seed": 0},
}
#: space name -> obsm key of the train cells (`None`: the log-normalised genes of ``.X``)
LATENTS = {"in-sample": "X_pca", "rescaled": "X_pca_oof", "expression": None}

#: known-answer rows (from benchmarks/noise_models.py)
PROBES = (
    "probe: real cells, unseen",
    "probe: unseen cells via the PCs, none",
    "probe: unseen cells via the PCs, nb",
)

logger = logging.getLogger("training_budget")


def fit_rows(train, unseen, cfg, architectures, latent, max_steps) -> tuple[dict, list]:
    """Row name -> [(training seed, generator)], and the cost of every fit."""
    # the unseen real cells, and their PC scores decoded as a PCA model decodes (no noise,
    # and "nb", the default of models set up with counts)
    probes = noise_probes(train, unseen, {"probes_only": True})
    rows = {name: probes[name] for name in PROBES}
    costs = []
    for arch in architectures:
        for steps in cfg["steps"]:
            if steps > max_steps.get(arch, np.inf):
                continue
            t0 = time.perf_counter()
            # set up with the counts, so PCA models decode with "nb" (the default)
            model = train_model(
                train,
                {**cfg, "steps": steps, "accelerator": "cpu"},
                cfg["train_seed"],
                arch,
                obsm_key=LATENTS[latent],
            )
            done = int(model.trainer.global_step)
            costs.append(
                {
                    "architecture": arch,
                    "steps": steps,
                    "steps_run": done,
                    "fit_s": time.perf_counter() - t0,
                }
            )
            rows[f"{arch}, {steps} steps"] = [(cfg["train_seed"], model)]
    return rows, costs


def run_dataset(name, loader, cfg, architectures, latent, max_steps):
    import scbranch as sb

    train, held, unseen = loader(seed=0, fractions=SPLIT)
    sb.tl.pca_out_of_fold(train, groupby=LABELS, key_added=LATENTS["rescaled"])
    rows, costs = fit_rows(train, unseen, cfg, architectures, latent, max_steps)
    df = evaluate_rows(name, rows, train, held, cfg)
    meta = {"n_train": train.n_obs, "n_held": held.n_obs, "n_genes": train.n_vars}
    return df, pd.DataFrame(costs), meta


def _max_steps(text: str) -> dict:
    """``"branched=4000,conditioned=8000"`` -> {"branched": 4000, "conditioned": 8000}."""
    out = {}
    for item in filter(None, text.split(",")):
        arch, _, value = item.partition("=")
        out[arch] = int(value)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="smoke-test settings")
    parser.add_argument("--datasets", default="pbmc68k,pbmc3k")
    parser.add_argument("--architectures", default="branched,conditioned")
    parser.add_argument(
        "--latent",
        default="rescaled",
        choices=sorted(LATENTS),
        help="PCA scores (in-sample or out-of-fold rescaled) or expression space",
    )
    parser.add_argument("--steps", default=None, help="budgets, e.g. 2000,8000")
    parser.add_argument(
        "--max-steps",
        default="",
        help="largest budget per architecture and dataset, e.g. 'pbmc3k:branched=4000' "
        "(one head per branch is the slow one on pbmc3k)",
    )
    parser.add_argument("--out", default="benchmark_out/training_budget")
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    cfg_name = "fast" if args.fast else "cpu"
    cfg = dict(SETTINGS[cfg_name])
    if args.steps:
        cfg["steps"] = [int(s) for s in args.steps.split(",")]
    architectures = args.architectures.split(",")
    for arch in architectures:  # a misspelt row fails here, not after the first training
        model_options(arch, ["A", "B"])
    limits: dict[str, dict] = {}
    for item in filter(None, args.max_steps.split(";")):
        dataset, _, rest = item.partition(":")
        limits[dataset] = _max_steps(rest)
    markdown = prepare_run(args, "training_budget")
    loaders = LOADERS
    t_all = time.perf_counter()
    lines = [
        "# Training budget (generated by `benchmarks/training_budget.py`; do not edit by hand)",
        "",
        f"Settings `{cfg_name}`: budgets {cfg['steps']} optimiser steps (batch "
        f"{cfg['batch_size']}, each its own run with the cosine schedule over its budget), "
        f"training seed {cfg['train_seed']}, {cfg['n_cells']} generated cells per class and "
        f"generation seed {cfg['seeds']}; space `{args.latent}` ("
        + (
            f"`obsm['{LATENTS[args.latent]}']`"
            if LATENTS[args.latent]
            else "the log-normalised genes of `.X`"
        )
        + "); split seed 0, train / held-out / unseen 50/30/20 %. "
        "Every row: `tl.evaluate(gen, held, train=train)` (reference PCA on the train cells), "
        "mean over classes, then mean ± sd over generation seeds. `model.train()` defaults to "
        "about 4,000 steps; the quality benchmarks train for 2,000.",
        "",
        "Read every row against the control and the probes: `probe: real cells, unseen` must "
        "sit at the control; `probe: unseen cells via the PCs, nb` is the best a generator of "
        "exact PC scores can reach decoded as the model rows are (models set up with counts "
        "decode with `residual_noise='nb'` by default; expression models add no noise).",
    ]
    for name in args.datasets.split(","):
        df, costs, meta = run_dataset(
            name, loaders[name], cfg, architectures, args.latent, limits.get(name, {})
        )
        df.to_csv(f"rows_{name}.csv", index=False)
        lines += [
            "",
            f"## {name}",
            "",
            f"{meta['n_train']} train / {meta['n_held']} held-out cells, {meta['n_genes']} genes.",
            "",
            _md(table(df)),
            "",
            f"Fit time (set-up and training, {cpu_threads()}, seconds) and the optimiser steps run "
            "(whole epochs, so at least the budget):",
            "",
            _md(costs.round({"fit_s": 0}), index=False),
        ]
    lines += ["", f"Total wall time {(time.perf_counter() - t_all) / 60:.1f} min.", ""]
    print(write_lines(markdown, lines))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
