"""Clean-cell estimates at checkpoints: how far from the cells they estimate, at every noise level.

Trajectories and transmutation record, at each checkpoint, an estimate of the clean cell
E[x_0 | x_t]. pbmc68k (700 PBMCs shipped with scanpy) is split 50/50 per type; a model in the
default configuration (out-of-fold PCs of the train half, default budget) is trained per split.
Held-out cells (never seen by the model or its calibration) are noised to x_t at each time
and estimated back; the figure is the mean squared distance to the clean cell (standardised
units, summed over the 30 PCs). The best any estimator can do is the posterior's own spread,
unknown for real cells; two references whose answer is known bracket it:

  mean of the cells       the train cells' mean for every x_t: what an estimate that ignores
                          x_t scores (the total variance); right at t = 1
  Tweedie (network)       (x_t - sigma eps_hat) / alpha: divides the network's error by alpha
  branch Gaussian         the posterior mean under the Gaussian of the row's branch (the
                          mean and shrunk covariance of its classes' reference cells)
  calibrated (package)    the Gaussian plus w(t) x the network's deviation from it, w fitted
                          on the model's stored reference (train) cells; what the package
                          records since scbranch 0.2 (``module/_denoiser.py``)

On the model's own reference cells the calibrated estimate is at least as close as either
part by construction; the held-out rows show whether that carries over to cells it never saw
(the known-answer check of the calibration). The estimator's own known answer, a Gaussian
mixture whose posterior mean is exact, is ``tests/test_denoiser.py``. The spread of the
estimates a user sees (RMS distance to their mean, data units) comes from
``generate(trajectory_times=...)``, 50 cells per type, next to that of the noisy states.

Budget sweep (``--budgets``, first split, conditioned network): the network's distance on
held-out and on training cells at low noise (t <= 0.3) for several training budgets next to
the default's. Where the two part, the network has learned its training cells rather than
their law; the branch Gaussian (no training) is the reference it should beat on held-out cells.

Usage (from the repository root, in the project's venv):
  python benchmarks/clean_estimates.py          # about 5 min on 2 cores
  python benchmarks/clean_estimates.py --fast   # smoke test; numbers meaningless
Writes docs/benchmarks/clean_estimates.md and CSVs under --out.
"""

from __future__ import annotations

import argparse
import logging
import math
import time

import numpy as np
import pandas as pd
from interpretability import LATENT, project_heldout
from quality import LABELS, _md, load_pbmc68k, prepare_run, write_lines

SETTINGS = {"cpu": {"steps": None, "draws": 4}, "fast": {"steps": 20, "draws": 1}}
#: the budget sweep's low-noise times (where a network that learned its training cells shows)
SWEEP_TIMES = [0.3, 0.2, 0.1, 0.05]
TIMES = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05]
SPREAD_TIMES = [1.0, 0.9, 0.7, 0.5, 0.0]
ESTIMATES = ["mean of the cells", "Tweedie (network)", "branch Gaussian", "calibrated (package)"]

logger = logging.getLogger("clean_estimates")


def train_model(train, architecture: str, steps: int | None):
    """The model in the default configuration; ``steps=None``: the default budget."""
    import scbranch as sb

    sb.BranchedDiffusion.setup_anndata(train, labels_key=LABELS, obsm_key=LATENT)
    model = sb.BranchedDiffusion(train, architecture=architecture)
    epochs = None if steps is None else max(1, math.ceil(steps / math.ceil(train.n_obs / 64)))
    model.train(max_epochs=epochs, batch_size=64, accelerator="cpu", enable_progress_bar=False)
    return model


def budget_sweep(train, held, budgets: list[int], draws: int) -> pd.DataFrame:
    """The network's squared distance on held-out and on training cells at low noise, per
    training budget (conditioned network, first split): where the two part, the network has
    learned its training cells rather than their law."""
    rows = []
    for steps in budgets:
        import scvi

        scvi.settings.seed = 0
        model = train_model(train, "conditioned", steps)
        for cells, name in ((held, "held-out"), (train, "train")):
            err = squared_errors(model, cells, draws, 0).set_index("t")
            for t in SWEEP_TIMES:
                rows.append(
                    {
                        "steps": steps,
                        "cells": name,
                        "t": t,
                        "Tweedie (network)": err.loc[t, "Tweedie (network)"],
                        "branch Gaussian": err.loc[t, "branch Gaussian"],
                    }
                )
    return pd.DataFrame(rows)


def squared_errors(model, cells, draws: int, seed: int) -> pd.DataFrame:
    """Mean squared distance of each estimate of ``cells`` (AnnData, ``X_pca`` in the model's
    PCs) to the clean cells, per time (standardised units)."""
    import torch

    from scbranch.model._interpretation import clean_estimator
    from scbranch.module import denoise

    module, tree, sde = model.module, model.tree, model.module.sde
    eps_fn = module.eps_fn()
    codes = {c: i for i, c in enumerate(model.classes)}
    z0 = module.standardize(torch.as_tensor(np.asarray(cells.obsm["X_pca"]), dtype=torch.float32))
    labels = torch.as_tensor(cells.obs[LABELS].map(codes).to_numpy().astype(np.int64))
    ref = torch.as_tensor(model.reference_samples_["x"])
    mean = ref.mean(0)  # reference cells stand in for the train cells (at most 200 per type)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    with torch.inference_mode():
        den = clean_estimator(model)
        for t in TIMES:
            tt = torch.tensor(t)
            z = z0.repeat(draws, 1)
            lab = labels.repeat(draws)
            zt = sde.alpha(tt) * z + sde.sigma(tt) * torch.randn(z.shape, generator=gen)
            net, gauss = den.parts(eps_fn, zt, lab, t)
            est = {
                "mean of the cells": mean.expand_as(z),
                "Tweedie (network)": denoise(eps_fn, tree, sde, zt, lab, t),
                "branch Gaussian": gauss,
                "calibrated (package)": gauss + den.weight(t) * (net - gauss),
            }
            row = {"t": t, "weight w(t)": den.weight(t)}
            row.update({k: float(((v - z) ** 2).sum(1).mean()) for k, v in est.items()})
            rows.append(row)
    return pd.DataFrame(rows)


def spreads(model, seed: int) -> pd.DataFrame:
    """RMS distance to their mean of the recorded estimates and of the noisy states."""
    tr = model.generate(n_cells=50, trajectory_times=SPREAD_TIMES, seed=seed, progress_bar=False)
    out = []
    for t in SPREAD_TIMES:
        part = tr[tr.obs["t"] == t]
        row = {"t": t}
        for name, key in (("estimate", LATENT), ("noisy state", "scbranch_state")):
            x = np.asarray(part.obsm[key], dtype=np.float64)
            row[name] = float(np.sqrt(((x - x.mean(0)) ** 2).sum(1).mean()))
        out.append(row)
    return pd.DataFrame(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="smoke-test settings")
    parser.add_argument("--seeds", default="0,1,2", help="split and training seeds")
    parser.add_argument("--architectures", default="conditioned,branched")
    parser.add_argument(
        "--budgets",
        default="250,1100,2200,4400",
        help="training steps of the budget sweep (first split; '' skips it)",
    )
    parser.add_argument("--out", default="benchmark_out/clean_estimates")
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    cfg = SETTINGS["fast" if args.fast else "cpu"]
    import scvi

    import scbranch as sb

    markdown = prepare_run(args, "clean_estimates")
    t_all = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    archs = args.architectures.split(",")
    errors, spread, sweep = [], [], None
    for seed in seeds:
        scvi.settings.seed = seed
        train, held = load_pbmc68k(seed=seed)
        project_heldout(train, held)
        sb.tl.pca_out_of_fold(train, groupby=LABELS, key_added=LATENT)
        train.obsm["X_pca"] = train.obsm[LATENT]
        for arch in archs:
            model = train_model(train, arch, cfg["steps"])
            for cells, name in ((held, "held-out"), (train, "train")):
                part = squared_errors(model, cells, cfg["draws"], seed)
                errors.append(part.assign(architecture=arch, cells=name, seed=seed))
            spread.append(spreads(model, seed).assign(architecture=arch, seed=seed))
            logger.info("seed %d %s done", seed, arch)
        if seed == seeds[0] and args.budgets:
            budgets = [20] if args.fast else [int(b) for b in args.budgets.split(",")]
            sweep = budget_sweep(train, held, budgets, cfg["draws"])
            n_first = train.n_obs
            logger.info("budget sweep done")
    errors, spread = pd.concat(errors), pd.concat(spread)
    errors.to_csv("errors.csv", index=False)
    spread.to_csv("spreads.csv", index=False)
    wall = time.perf_counter() - t_all

    lines = [
        "# Clean-cell estimates (generated by `benchmarks/clean_estimates.py`; do not edit by "
        "hand)",
        "",
        f"pbmc68k, 50/50 split per type, default configuration, seeds {args.seeds} (split and "
        f"training); {cfg['draws']} noise draws per cell and time. Total wall time "
        f"{wall / 60:.1f} min. What each row is: the script's docstring.",
        "",
    ]
    for arch in archs:
        for cells in ("held-out", "train"):
            part = errors[(errors["architecture"] == arch) & (errors["cells"] == cells)]
            mean = part.groupby("t", sort=False)[["weight w(t)", *ESTIMATES]].mean()
            lines += [
                f"## {arch}: mean squared distance to the clean {cells} cells "
                "(standardised, mean over seeds)",
                "",
                _md(mean.reset_index(), index=False),
                "",
            ]
    for arch in archs:
        part = spread[spread["architecture"] == arch]
        mean = part.groupby("t", sort=False)[["estimate", "noisy state"]].mean()
        lines += [
            f"## {arch}: spread of what `generate(trajectory_times=...)` records "
            "(RMS distance to the mean, PC units, mean over seeds)",
            "",
            _md(mean.reset_index(), index=False),
            "",
        ]
    if sweep is not None:
        lines += budget_lines(sweep, errors, seeds[0], n_first, cfg["steps"])
    write_lines(markdown, lines)
    print("\n".join(lines))
    return 0


def budget_lines(
    sweep: pd.DataFrame, errors: pd.DataFrame, seed: int, n_train: int, steps: int | None
) -> list[str]:
    """The budget sweep's table, with the default budget's row from the main run."""
    from scbranch.module._recipe import default_max_epochs

    per_epoch = math.ceil(n_train / 64)
    main_steps = (
        f"{default_max_epochs(n_train, 64) * per_epoch} (default)" if steps is None else steps
    )
    first = errors[(errors["architecture"] == "conditioned") & (errors["seed"] == seed)]
    rows = []
    for cells in ("held-out", "train"):
        part = first[(first["cells"] == cells) & first["t"].isin(SWEEP_TIMES)]
        for _, r in part.iterrows():
            rows.append({"steps": main_steps, "cells": cells, "t": r["t"],
                         "Tweedie (network)": r["Tweedie (network)"],
                         "branch Gaussian": r["branch Gaussian"]})  # fmt: skip
    table = pd.concat([sweep, pd.DataFrame(rows)], ignore_index=True)
    table.to_csv("budget_sweep.csv", index=False)
    net = table.pivot_table(
        index="steps", columns=["t", "cells"], values="Tweedie (network)", sort=False
    )
    shown = pd.DataFrame(index=net.index)
    for t in SWEEP_TIMES:
        shown[f"t = {t}: held-out / train"] = [
            f"{h:.2f} / {tr:.2f}"
            for h, tr in zip(net[(t, "held-out")], net[(t, "train")], strict=True)
        ]
    gauss = table[table["cells"] == "held-out"].groupby("t")["branch Gaussian"].first()
    return [
        "## Training budget: the network on held-out and on training cells at low noise "
        f"(conditioned, split seed {seed})",
        "",
        "Squared distance of the network's estimate (Tweedie) to the clean cells, held-out / "
        "train; where the two part, the network has learned its training cells rather than "
        "their law. The branch Gaussian on held-out cells (no training): "
        + ", ".join(f"t = {t}: {gauss[t]:.2f}" for t in SWEEP_TIMES)
        + f". `(default)`: `train()`'s budget for the {n_train} training cells.",
        "",
        _md(shown.reset_index(), index=False),
        "",
    ]


if __name__ == "__main__":
    raise SystemExit(main())
