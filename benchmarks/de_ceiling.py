"""What DE agreement can a generator that learns from the training cells reach?

``de_lfc_spearman`` correlates, across genes, each type's log fold change against the rest in
the generated cells with that in held-out half B; the control is half A against B. A generator
cannot be judged like half A: whatever it learns of a type's mean comes from the training cells
(an estimate with its own sampling noise), and the cells it draws add theirs. Half A carries
only the second. This page measures that floor with no model, from references whose answers
are known (split seed 0 and the splits of ``benchmarks/quality.py``; genes: pbmc3k's 2,000 HVGs
chosen on the train cells, pbmc68k_reduced's 765):

  probe: real cells, unseen     real cells nothing saw: the known answer, must sit at the control
  train cells, distinct         real training cells, each drawn at most once: real cells, but
                                the genes were chosen on them (pbmc3k) and the reference space
                                fitted on them
  train cells, bootstrap        drawn with replacement: the training cells' empirical
                                distribution, which a generator that learned exactly its
                                training cells samples; its type means carry the training
                                sample's noise and its own draws'
  unseen cells via the PCs      unseen cells' own PC scores decoded by the default space (the
                                negative binomial with class ratios): the decoder's ceiling
  train cells' out-of-fold scores via the PCs   the models' target, decoded the same way

Every row: ``tl.evaluate(gen, held, train=train, metrics=...)`` over ``seeds`` generation seeds
(200 cells per type), mean over types, then mean ± sd over seeds.

Usage (from the repository root, in the project's venv):
  python benchmarks/de_ceiling.py          # about 3 min on 2 cores
  python benchmarks/de_ceiling.py --fast   # smoke test; numbers meaningless
Writes docs/benchmarks/de_ceiling.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import pandas as pd
from quality import (
    LABELS,
    LATENT,
    LOADERS,
    SPLIT,
    DecodedProbe,
    TrainCellsProbe,
    _fmt,
    _md,
    default_setup,
    prepare_run,
    scores_of,
    write_lines,
)

SETTINGS = {
    "cpu": {"n_cells": 200, "seeds": list(range(10))},
    "fast": {"n_cells": 40, "seeds": [0, 1]},
}
METRICS = ("de_lfc_spearman", "de_marker_overlap", "gene_mean_spearman")
KNOWN_ANSWER = "probe: real cells, unseen"

logger = logging.getLogger("de_ceiling")


def fit_rows(train, unseen) -> dict:
    """Row name -> generator (``generate(n_cells, seed)``)."""
    import scbranch as sb

    adata = default_setup(train)
    space = sb.BranchedDiffusion(adata)  # untrained: its decoder is all the rows use
    return {
        KNOWN_ANSWER: TrainCellsProbe(unseen),
        "train cells, distinct": TrainCellsProbe(train),
        "train cells, bootstrap": TrainCellsProbe(train, replace=True),
        "unseen cells via the PCs": DecodedProbe(
            space, unseen, scores_of(unseen, space.space.decoder)
        ),
        "train cells' out-of-fold scores via the PCs": DecodedProbe(
            space, adata, adata.obsm[LATENT]
        ),
    }


def evaluate_rows(rows: dict, train, held, cfg) -> pd.DataFrame:
    """One record per row, generation seed and metric: mean over types, and the control."""
    import scbranch as sb

    records = []
    for name, method in rows.items():
        for seed in cfg["seeds"]:
            gen = method.generate(cfg["n_cells"], seed)
            report = sb.tl.evaluate(gen, held, LABELS, train=train, seed=seed, metrics=METRICS)
            mean = report[report["group"] == "mean"].set_index("metric")
            for metric in METRICS:
                records.append(
                    {
                        "row": name,
                        "seed": seed,
                        "metric": metric,
                        "value": mean.loc[metric, "generated"],
                        "control": mean.loc[metric, "control"],
                    }
                )
        logger.info("%s done", name)
    return pd.DataFrame(records)


def table(df: pd.DataFrame) -> pd.DataFrame:
    """Rows x metrics (mean ± sd over seeds), the control, and each row's ratio to it."""
    stats = df.groupby(["row", "metric"], sort=False)["value"].agg(["mean", "std"])
    control = df.groupby("metric")["control"].agg(["mean", "std"])
    out = {}
    for (row, metric), s in stats.iterrows():
        out.setdefault(row, {})[metric] = _fmt(s["mean"], s["std"])
        out[row][f"{metric} / control"] = f"{s['mean'] / control.loc[metric, 'mean']:.3f}"
    out["real vs real (control)"] = {
        m: _fmt(control.loc[m, "mean"], control.loc[m, "std"]) for m in control.index
    }
    columns = [c for m in METRICS for c in (m, f"{m} / control")]
    return pd.DataFrame(out).T.reindex(columns=columns).fillna("")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="smoke-test settings")
    parser.add_argument("--datasets", default="pbmc3k,pbmc68k")
    parser.add_argument("--out", default="benchmark_out/de_ceiling")
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    cfg_name = "fast" if args.fast else "cpu"
    cfg = SETTINGS[cfg_name]
    markdown = prepare_run(args, "de_ceiling")
    loaders = LOADERS
    t_all = time.perf_counter()
    lines = [
        "# The DE ceiling of a generator (generated by `benchmarks/de_ceiling.py`; do not edit "
        "by hand)",
        "",
        f"Settings `{cfg_name}`: no model trained; {cfg['n_cells']} cells per type, generation "
        f"seeds {cfg['seeds']}; split seed 0, train / held-out / unseen "
        f"{' / '.join(f'{f:.0%}' for f in SPLIT)} per type. Every row: "
        "`tl.evaluate(gen, held, train=train)` (DE and gene metrics only), mean over types, "
        "then mean ± sd over seeds; `/ control`: the row's mean over the control's.",
        "",
        f"Read every row against the control and `{KNOWN_ANSWER}`, the known answer, which must "
        "sit at the control. `train cells, bootstrap` is the training cells' empirical "
        "distribution: what a generator that learned exactly its training cells draws. Its "
        "type means carry the noise of the training sample as well as that of its own draws, "
        "where half A of the control carries only the second.",
    ]
    for name in args.datasets.split(","):
        train, held, unseen = loaders[name](seed=0, fractions=SPLIT)
        df = evaluate_rows(fit_rows(train, unseen), train, held, cfg)
        df.to_csv(f"rows_{name}.csv", index=False)
        lines += [
            "",
            f"## {name}",
            "",
            f"{train.n_obs} train / {held.n_obs} held-out / {unseen.n_obs} unseen cells, "
            f"{train.n_vars} genes.",
            "",
            _md(table(df)),
        ]
    lines += ["", f"Total wall time {(time.perf_counter() - t_all) / 60:.1f} min.", ""]
    print(write_lines(markdown, lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
