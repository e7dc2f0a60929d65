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
mixture whose posterior mean is exact, is ``tests/test_denoiser.py`` on three dimensions and,
at this benchmark's scale, the mixture section (``--mixture``, on by default): per class, a
Gaussian with the mean and covariance of the first split's train cells (30 PCs; covariance
plus 5 % of its mean variance, so that small classes have a full-rank one) is the truth;
cells drawn from it in the split's class sizes train a model in the same configuration, and
fresh cells (4x the held-out sizes) are noised and estimated. The exact posterior mean
E[x_0 | x_t, branch] (the mixture of the branch's classes in their training proportions,
standardised as the model standardises) is the floor no estimator can beat; the table gives
each estimate's distance and its ratio to the floor. The spread of the
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
EXACT = "exact posterior mean (floor)"

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


def squared_errors(model, cells, draws: int, seed: int, exact=None) -> pd.DataFrame:
    """Mean squared distance of each estimate of ``cells`` (AnnData, ``X_pca`` in the model's
    PCs) to the clean cells, per time (standardised units); ``exact(zt, labels, t)``: the
    known posterior mean, added as a further estimate."""
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
            if exact is not None:
                est[EXACT] = exact(zt, lab, t)
            row = {"t": t, "weight w(t)": den.weight(t)}
            row.update({k: float(((v - z) ** 2).sum(1).mean()) for k, v in est.items()})
            rows.append(row)
    return pd.DataFrame(rows)


def simulate_mixture(train, held, seed: int):
    """Cells of per-class Gaussians fitted to ``train``'s PCs (the known truth): a train set of
    the same class sizes and fresh cells (4x ``held``'s sizes), with the truth's parameters."""
    import anndata as ad

    rng = np.random.default_rng(seed)
    x = np.asarray(train.obsm["X_pca"], dtype=np.float64)
    names = list(train.obs[LABELS].cat.categories)
    codes = train.obs[LABELS].cat.codes.to_numpy()
    ridge = 0.05 * x.var(0).mean()  # full rank for classes with fewer cells than PCs
    means, covs = [], []
    for c in range(len(names)):
        part = x[codes == c]
        means.append(part.mean(0))
        covs.append(np.cov(part, rowvar=False) + ridge * np.eye(x.shape[1]))
    means, covs = np.asarray(means), np.asarray(covs)

    def draw(sizes) -> ad.AnnData:
        lab = np.repeat(np.arange(len(names)), sizes)
        cells = np.concatenate(
            [rng.multivariate_normal(means[c], covs[c], int(k)) for c, k in enumerate(sizes)]
        )
        obs = pd.DataFrame(
            {LABELS: pd.Categorical.from_codes(lab, names)},
            index=[f"sim{i}" for i in range(len(lab))],
        )
        cells_ad = ad.AnnData(obs=obs)
        cells_ad.obsm[LATENT] = cells_ad.obsm["X_pca"] = cells.astype(np.float32)
        return cells_ad

    sizes = np.bincount(codes, minlength=len(names))
    held_sizes = 4 * held.obs[LABELS].value_counts().reindex(names).to_numpy()
    return draw(sizes), draw(held_sizes), means, covs


def exact_posterior_mean(model, zt, labels, t: float, means, covs):
    """E[x_0 | x_t, branch] under the true mixture, in the model's standardised units: on each
    row's branch, the classes' Gaussian posteriors weighted by their responsibilities (prior:
    the training cells' class proportions, as the held-out cells are drawn)."""
    import torch

    module, tree, sde = model.module, model.tree, model.module.sde
    scale = float(module.scale)
    m = module.standardize(torch.as_tensor(means, dtype=torch.float32)).double()
    cov = torch.as_tensor(covs, dtype=torch.float64) / scale**2
    prior = torch.as_tensor(model.class_counts_, dtype=torch.float64)
    tt = torch.tensor(float(t))
    a, s = float(sde.alpha(tt)), float(sde.sigma(tt))
    branch = tree.lookup(labels, tt)
    x = zt.double()
    out = torch.empty_like(x)
    eye = torch.eye(x.shape[1], dtype=torch.float64)
    for b in torch.unique(branch).tolist():
        rows = branch == b
        classes = tree.branches[b].classes
        logp, post = [], []
        for c in classes:
            marginal = a**2 * cov[c] + s**2 * eye
            diff = x[rows] - a * m[c]
            solved = torch.linalg.solve(marginal, diff.T).T
            logp.append(
                torch.log(prior[c]) - 0.5 * (diff * solved).sum(1) - 0.5 * torch.logdet(marginal)
            )
            post.append(m[c] + a * solved @ cov[c])  # m + a S (a^2 S + s^2 I)^-1 (x - a m)
        w = torch.softmax(torch.stack(logp), dim=0)
        out[rows] = (w.unsqueeze(-1) * torch.stack(post)).sum(0)
    return out.float()


def mixture_check(train, held, steps: int | None, draws: int, seed: int) -> pd.DataFrame:
    """The estimates against the exact posterior mean on a mixture with this data's shape."""
    import scvi

    sim_train, sim_held, means, covs = simulate_mixture(train, held, seed)
    rows = []
    for arch in ("conditioned", "branched"):
        scvi.settings.seed = seed
        model = train_model(sim_train, arch, steps)
        exact = lambda zt, lab, t, m=model: exact_posterior_mean(m, zt, lab, t, means, covs)  # noqa: E731
        part = squared_errors(model, sim_held, draws, seed, exact=exact)
        rows.append(part.assign(architecture=arch))
    return pd.concat(rows, ignore_index=True)


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
    parser.add_argument(
        "--mixture",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the known answer: a Gaussian mixture shaped like the first split",
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
    errors, spread, sweep, mixture = [], [], None, None
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
        if seed == seeds[0] and args.mixture:
            mixture = mixture_check(train, held, cfg["steps"], cfg["draws"], seed)
            mixture.to_csv("mixture.csv", index=False)
            logger.info("mixture check done")
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
    if mixture is not None:
        lines += mixture_lines(mixture, seeds[0])
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


def mixture_lines(mixture: pd.DataFrame, seed: int) -> list[str]:
    """The known answer's table: each estimate's distance, and as a ratio to the exact floor."""
    lines = [
        f"## Known answer: a Gaussian mixture shaped like split {seed} (exact posterior known)",
        "",
        "Per class a Gaussian with the train cells' mean and covariance is the truth; a model "
        "in the same configuration is trained on cells drawn from it, and fresh cells are "
        "estimated. The exact posterior mean is the floor (ratio 1); the calibrated estimate "
        "should sit at or near it at every time, and never above both of its parts. Cells: "
        "mean squared distance to the clean cells (standardised); ratio: to the floor.",
        "",
    ]
    for arch, part in mixture.groupby("architecture", sort=False):
        table = part.set_index("t")[["weight w(t)", EXACT, *ESTIMATES[1:]]].copy()
        for name in ESTIMATES[1:]:
            table[f"{name.split(' (')[0]} / floor"] = table[name] / table[EXACT]
        lines += [f"### {arch}", "", _md(table.reset_index(), index=False), ""]
    return lines


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
