"""The validation loss during training: does it say when more training stops helping new cells?

``model.train(train_size=0.9, check_val_every_n_epoch=k)`` scores, every k epochs, the EMA
weights on the held-out tenth at fixed times and draws (``model.history["validation_loss"]``;
``get_denoising_error``'s quantity, known answer in tests/test_diagnostics.py), and
``early_stopping=True`` watches it. This page is its use on quality.py's splits (train /
held-out / unseen 50 / 30 / 20 % per type; the models learn the train cells' out-of-fold PC
scores): the default network trains on 90 % of the train cells, once at the default budget
(1 x) and once at 4 x (the learning rate's cosine follows each run's own length), validated
on the other 10 % every 1/20 of the default epochs.

Known answer: the validation cells are new cells like quality.py's ``unseen`` cells, which no
run sees, so the change of the validation loss from the 1 x to the 4 x model must match the
change of the unseen cells' denoising error (``get_denoising_error`` at the validation times,
seed 0) between the two models. ``early stop`` is where ``early_stopping=True`` would have
stopped the 4 x run with a patience of 5 checks (a quarter of the default epochs): the first
check after which 5 checks bring no new minimum (the same run without stopping, so the same
curve). Epochs are given as multiples of the default budget.

Usage (from the repository root, in the project's venv; run nothing else beside it):
  python benchmarks/validation_curve.py          # about 10 min on 2 cores
  python benchmarks/validation_curve.py --fast   # smoke test; numbers meaningless
Writes docs/benchmarks/validation_curve.md and CSVs under --out.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import pandas as pd
from quality import (
    LATENT,
    LOADERS,
    SETTINGS,
    SPLIT,
    _md,
    cpu_threads,
    default_setup,
    prepare_run,
    write_lines,
)

FACTORS = (1, 4)
CHECKS_PER_BUDGET = 20  # validation points per default budget
PATIENCE = 5  # checks without a new minimum before early stopping would stop
TRAIN_SIZE = 0.9
logger = logging.getLogger("validation_curve")


def early_stop(curve: np.ndarray, patience: int) -> int:
    """Index of the check at which early stopping with ``patience`` checks stops (the last if
    it never does), as Lightning's ``EarlyStopping`` (min mode, ``min_delta=0``) counts.

    Examples
    --------
    >>> early_stop(np.array([3.0, 2.0, 2.5, 2.4, 2.1]), patience=2)
    3
    """
    best, waited = np.inf, 0
    for i, value in enumerate(curve):
        if value < best:
            best, waited = value, 0
        else:
            waited += 1
            if waited >= patience:
                return i
    return len(curve) - 1


def run(train, unseen, seed: int, factor: int, batch_size: int, fast: bool = False):
    """One training run; its validation curve and the unseen cells' error at the end."""
    import scvi

    import scbranch as sb
    from scbranch.model._diagnostics import DEFAULT_TIMES
    from scbranch.module._recipe import default_max_epochs

    default = 10 if fast else default_max_epochs(round(train.n_obs * TRAIN_SIZE), batch_size)
    every = max(1, round(default / CHECKS_PER_BUDGET))
    scvi.settings.seed = seed
    model = sb.BranchedDiffusion(default_setup(train, LATENT))
    t0 = time.perf_counter()
    model.train(
        max_epochs=factor * default,
        batch_size=batch_size,
        train_size=TRAIN_SIZE,
        check_val_every_n_epoch=every,
        enable_progress_bar=False,
    )
    seconds = time.perf_counter() - t0
    history = model.history["validation_loss"].astype(float)
    curve = pd.DataFrame(
        {
            "epochs / default": (history.index.to_numpy() + 1) / default,
            "validation_loss": history.iloc[:, 0].to_numpy(),
        }
    )
    report = model.get_denoising_error(unseen, times=DEFAULT_TIMES, seed=0)
    unseen_error = float(report[report["group"] == "all"]["error"].mean())
    return curve, unseen_error, seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="smoke-test settings")
    parser.add_argument("--datasets", default="pbmc68k,pbmc3k")
    parser.add_argument("--out", default="benchmark_out/validation_curve")
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    import scbranch as sb

    markdown = prepare_run(args, "validation_curve")
    cfg = SETTINGS["fast" if args.fast else "cpu"]
    t_all = time.perf_counter()
    curves, finals = [], []
    for dataset in args.datasets.split(","):
        train, _, unseen = LOADERS[dataset](seed=0, fractions=SPLIT)
        sb.tl.embed_like(unseen, train, basis="pca")  # the model reads X_pca without OOF
        for seed in cfg["train_seeds"]:
            for factor in FACTORS:
                curve, unseen_error, seconds = run(
                    train, unseen, seed, factor, cfg["batch_size"], args.fast
                )
                curves.append(curve.assign(dataset=dataset, train_seed=seed, budget=factor))
                values = curve["validation_loss"].to_numpy()
                stop = early_stop(values, PATIENCE)
                finals.append(
                    {
                        "dataset": dataset,
                        "train_seed": seed,
                        "budget": factor,
                        "validation, end": values[-1],
                        "validation, minimum": values.min(),
                        "minimum at": curve["epochs / default"].iloc[int(values.argmin())],
                        "early stop at": curve["epochs / default"].iloc[stop],
                        "unseen cells, end": unseen_error,
                        "fit s": seconds,
                    }
                )
                logger.info("%s", finals[-1])
    curves = pd.concat(curves, ignore_index=True)
    finals = pd.DataFrame(finals)
    curves.to_csv("validation_curves.csv", index=False)
    finals.to_csv("validation_finals.csv", index=False)
    wall = (time.perf_counter() - t_all) / 60
    lines = [
        "# The validation loss during training (generated by `benchmarks/validation_curve.py`; "
        "do not edit by hand)",
        "",
        f"The default network on {TRAIN_SIZE:.0%} of quality.py's train cells, validated on "
        f"the rest every 1/{CHECKS_PER_BUDGET} of the default epochs, at {FACTORS[0]} x and "
        f"{FACTORS[1]} x the default budget; training seeds {cfg['train_seeds']}; mean "
        "squared noise-prediction error per dimension over the times "
        "(0.05, 0.1, 0.2, 0.3, 0.5). Known answer: from the 1 x to the 4 x model the "
        "validation loss must change as the unseen cells' error does (both are new cells). "
        f"Early stopping: patience {PATIENCE} checks. Total wall time {wall:.1f} min on "
        f"{cpu_threads()}.",
    ]
    for dataset, part in finals.groupby("dataset", sort=False):
        by_budget = part.set_index(["train_seed", "budget"])
        change = (
            by_budget.xs(FACTORS[1], level="budget")[["validation, end", "unseen cells, end"]]
            - by_budget.xs(FACTORS[0], level="budget")[["validation, end", "unseen cells, end"]]
        )
        change.columns = ["validation: 4 x - 1 x", "unseen cells: 4 x - 1 x"]
        lines += [
            "",
            f"## {dataset}",
            "",
            "Every run:",
            "",
            _md(part.drop(columns="dataset").round(4), index=False),
            "",
            "The known answer, per training seed (change from the 1 x to the 4 x model):",
            "",
            _md(change.round(4).reset_index(), index=False),
        ]
        long = curves[(curves["dataset"] == dataset) & (curves["budget"] == FACTORS[1])]
        marks = long[np.isclose(long["epochs / default"] % 0.5, 0) | (long.index == long.index[-1])]
        table = marks.pivot_table(
            index="epochs / default", columns="train_seed", values="validation_loss"
        )
        lines += [
            "",
            f"The {FACTORS[1]} x runs' validation loss along the run, by training seed:",
            "",
            _md(table.round(4).reset_index(), index=False),
        ]
    write_lines(markdown, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    logging.getLogger("validation_curve").setLevel(logging.INFO)
    raise SystemExit(main())
