"""Model rows against the default model, on quality.py's protocol: what sharing.py and
spaces_quality.py have in common.

Each study trains some rows of ``quality.model_options`` names (3 training seeds x 3 generation
seeds, the quality benchmark's splits, ``tl.evaluate`` in a reference PCA of the train cells),
adds the known answer (unseen real cells, judged like a generator: it must sit at the control)
and writes one page: the headline metrics, per-class AUROC and label fidelity, the network
evaluations per cell and, per class and metric, each row against the default ``branched``.

``--reuse DIR`` takes from an earlier run's ``rows_<dataset>.csv`` / ``timing_<dataset>.csv``
(sharing.py's, quality.py's or this study's own: the same splits and seeds give the same
numbers to the digit) the rows it has of the default model, of the unseen-real probe and of
every requested row; only the rows it lacks are trained. Probes are always computed again.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import pandas as pd
from quality import (
    LABELS,
    LOADERS,
    SETTINGS,
    SPLIT,
    TrainCellsProbe,
    _md,
    generate_options,
    model_options,
    per_class_comparison,
    prepare_run,
    run_dataset,
    summary_table,
    write_lines,
)

logger = logging.getLogger("variants")
#: the package's default model, the row every variant is read against
DEFAULT = "conditioned"
UNSEEN = "probe: real cells, unseen"
HEADLINE = ("auroc", "mmd_median", "dispersion", "label_fidelity", "de_lfc_spearman")


def probe_rows(name: str, probes: dict, train, held, cfg) -> pd.DataFrame:
    """Generators without a training seed (probes), judged for every generation seed."""
    import scbranch as sb

    rows = []
    for method, probe in probes.items():
        for seed in cfg["seeds"]:
            gen = probe.generate(cfg["n_cells"], seed)
            report = sb.tl.evaluate(gen, held, LABELS, train=train, seed=seed)
            rows.append(report.assign(dataset=name, method=method, train_seed=0, seed=seed))
    return pd.concat(rows, ignore_index=True)


def unseen_rows(name: str, train, held, unseen, cfg) -> pd.DataFrame:
    """The known answer: unseen real cells evaluated like a generator, every generation seed."""
    return probe_rows(name, {UNSEEN: TrainCellsProbe(unseen)}, train, held, cfg)


def per_class(rows: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Mean over runs of ``metric`` per class (rows) and method (columns), with the control."""
    r = rows[(rows["metric"] == metric) & (rows["group"] != "mean")]
    table = r.pivot_table(index="group", columns="method", values="generated", sort=False)
    table["control"] = r.groupby("group")["control"].mean()
    return table.round(3)


#: the solver of rows recorded before the timing CSV named it (generate()'s default then)
SOLVER_BEFORE_RECORDING = "heun"


def stale_rows(timing: pd.DataFrame) -> set[str]:
    """Model rows of an earlier run generated with another solver than their name means now
    (``generate()``'s default changed from the ODE to the SDE): they must be run again."""
    from scbranch.module import DEFAULT_SOLVER

    recorded = timing.get("solver", pd.Series(index=timing.index, dtype=object))
    recorded = recorded.fillna("").replace("", SOLVER_BEFORE_RECORDING)
    is_model = timing["network_calls"] > 0  # rows a diffusion model generated
    stale = set()
    for method, solver in zip(timing["method"][is_model], recorded[is_model], strict=True):
        if solver != generate_options(method).get("solver", DEFAULT_SOLVER):
            stale.add(method)
    return stale


def reused_rows(directory: Path, name: str, methods) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The rows (and timing) of ``methods`` and the default model that an earlier run in
    ``directory`` has, with its unseen-real probe (which must be there). Rows generated with
    another solver than their name means now (:func:`stale_rows`) are left out, to be run
    again."""
    rows = pd.read_csv(directory / f"rows_{name}.csv")
    timing = pd.read_csv(directory / f"timing_{name}.csv")
    if UNSEEN not in set(rows["method"]):
        raise ValueError(f"{directory} has no rows of {UNSEEN!r} for {name}.")
    stale = stale_rows(timing)
    if stale:
        logger.info("%s: not reused (generated with another solver): %s", name, sorted(stale))
    keep = (set(methods) | {DEFAULT, UNSEEN}) - stale
    return rows[rows["method"].isin(keep)], timing[timing["method"].isin(keep)]


def _wall_time(cfg, meta: dict) -> str:
    """This run's wall time and where its reused rows come from (runs reusing runs)."""
    text = f"Wall time {meta['wall_s'] / 60:.1f} min"
    sources = [s for s in meta.get("sources", [cfg.get("reuse")]) if s]
    if not sources:
        return text + "."
    earlier = meta.get("reused_wall_s") or 0.0
    before = f", which took {earlier / 60:.1f} min" if earlier else ""
    chain = ", from ".join(f"`{s}`" for s in sources)
    return text + f"; rows of earlier runs reused from {chain}{before}."


def comparison_pairs(cfg: dict, present: set[str]) -> list[tuple[str, str]]:
    """The (row, row) pairs compared per class and metric that this dataset has both rows of.

    Every row against the default, then ``cfg['comparisons']``. A ``--reuse`` or
    ``--report-only`` run can hold a row for one dataset only (a row run with ``--datasets``
    on one of them); its pairs are left out of the other dataset's page, not a crash.

    >>> cfg = {"architectures": ("conditioned", "a", "b"), "comparisons": [("a", "b")]}
    >>> comparison_pairs(cfg, {"conditioned", "a", "b"})
    [('conditioned', 'a'), ('conditioned', 'b'), ('a', 'b')]
    >>> comparison_pairs(cfg, {"conditioned", "a"})
    [('conditioned', 'a')]
    """
    pairs = [(DEFAULT, other) for other in cfg["architectures"] if other != DEFAULT]
    pairs += [tuple(p) for p in cfg.get("comparisons", ()) if tuple(p) not in pairs]
    kept = [p for p in pairs if set(p) <= present]
    for pair in (p for p in pairs if p not in kept):
        logger.info("no per-class comparison of %s vs %s: a row is absent here", *pair)
    return kept


def write_page(path, title: str, intro: str, results: dict, cfg, meta: dict) -> str:
    """The study's page: per dataset the headline table, per-class tables, row vs default."""
    lines = [
        f"# {title} (generated by `benchmarks/{cfg['script']}`; do not edit by hand)",
        "",
        intro,
        "",
        f"Settings `{cfg['name']}`: training seeds {cfg['train_seeds']} x generation seeds "
        f"{cfg['seeds']}, {cfg['n_cells']} cells per type, the default configuration (out-of-fold "
        "scores, counts with negative-binomial decoding, default budget) unless the row says "
        "otherwise; splits, evaluation and reference PCA as in [quality](quality.md). Every "
        "value is the mean over evaluated classes, then mean ± sd over runs. Read each row "
        "against the control (two halves of the held-out cells) and the unseen-real probe (the "
        "known answer: it must sit at the control). " + _wall_time(cfg, meta),
    ]
    for name, res in results.items():
        rows, timing = res["rows"], res["timing"]
        table, _, _ = summary_table(rows)
        table = table[[m for m in cfg.get("headline", HEADLINE) if m in table.columns]]
        cost = timing.groupby("method", sort=False).apply(
            lambda t: (t["row_evaluations"] / t["cells"]).mean(), include_groups=False
        )
        table["row evaluations per cell"] = cost.map(
            lambda v: f"{v:.0f}" if v == v else ""
        ).reindex(table.index)
        solver = timing.get("solver", pd.Series("", index=timing.index)).fillna("")
        solver = solver.replace("", SOLVER_BEFORE_RECORDING).where(timing["network_calls"] > 0, "")
        table["solver"] = solver.groupby(timing["method"], sort=False).first().reindex(table.index)
        fit = timing.groupby("method", sort=False)["fit_s"].mean()
        table["fit (s)"] = fit.map(lambda v: f"{v:.0f}").reindex(table.index)
        if "tree" in timing.columns:
            trees = timing.groupby("method", sort=False)["tree"].first()
            table["tree"] = trees.reindex(table.index)
        lines += ["", f"## {name}", "", _md(table.fillna(""))]
        for metric in ("auroc", "label_fidelity"):
            lines += ["", f"{metric} per class (mean over runs):", "", _md(per_class(rows, metric))]
        for first, other in comparison_pairs(cfg, set(rows["method"])):
            cmp = per_class_comparison(rows, first, other)
            wins = cmp["winner"].value_counts()
            lines += [
                "",
                f"Per class and metric, {first} vs {other} (a win needs a margin above the two "
                f"rows' combined seed sd): {int(wins.get('tie', 0))} of {len(cmp)} tied, "
                f"{int(wins.get(first, 0))} won by {first}, {int(wins.get(other, 0))} by "
                f"{other}.",
            ]
    return write_lines(path, lines)


def main(
    argv,
    *,
    script: str,
    title: str,
    intro: str,
    rows: tuple[str, ...],
    probes=None,
    comparisons: tuple[tuple[str, str], ...] = (),
    headline: tuple[str, ...] = HEADLINE,
) -> int:
    """Parse the study's command line, train its rows, write its page.

    ``probes``: row name -> callable of the train cells, the unseen cells and the settings
    returning a generator (no training seed), judged next to the model rows on every run.
    ``comparisons``: pairs of rows compared per class and metric besides every row against
    the default. ``headline``: the metrics of the page's main table.
    """
    name = Path(script).stem
    parser = argparse.ArgumentParser(description=title)
    parser.add_argument("--fast", action="store_true", help="smoke test (numbers meaningless)")
    parser.add_argument("--datasets", default="pbmc68k,pbmc3k")
    parser.add_argument("--rows", default=",".join(rows), help="model rows (quality.py names)")
    parser.add_argument(
        "--reuse", default=None, help=f"earlier run's folder with the {DEFAULT!r} and probe rows"
    )
    parser.add_argument("--out", default=f"benchmark_out/{name}", help="per-row CSV")
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the page from the CSVs in --out"
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.datasets.split(",")) - set(LOADERS))
    if unknown:
        parser.error(f"unknown datasets {unknown}; choose from {sorted(LOADERS)}")
    cfg_name = "fast" if args.fast else "cpu"
    architectures = tuple(args.rows.split(","))
    for row in architectures:  # a misspelt row fails here, not after the first training
        model_options(row, ["A", "B"])
    reuse = Path(args.reuse).resolve() if args.reuse else None
    cfg = {
        **SETTINGS[cfg_name],
        "architectures": (DEFAULT, *[a for a in architectures if a != DEFAULT]),
        "baselines": False,
        "name": cfg_name,
        "script": script,
        "reuse": args.reuse,
        "comparisons": comparisons,
        "headline": tuple(headline),
    }
    markdown = prepare_run(args, name)
    if args.report_only:
        meta = json.loads(Path("meta.json").read_text())
        results = {
            d: {"rows": pd.read_csv(f"rows_{d}.csv"), "timing": pd.read_csv(f"timing_{d}.csv")}
            for d in args.datasets.split(",")
        }
        cfg["reuse"] = meta.get("reuse")
        print(write_page(markdown, title, intro, results, cfg, meta))
        return 0
    t_all = time.perf_counter()
    results = {}
    for dataset in args.datasets.split(","):
        train, held, unseen = LOADERS[dataset](seed=0, fractions=SPLIT)
        old_rows, old_timing = reused_rows(reuse, dataset, architectures) if reuse else (None, None)
        done = set() if old_rows is None else set(old_rows["method"])
        trained = tuple(a for a in cfg["architectures"] if a not in done)
        parts, timing = [], old_timing
        if trained:
            new_rows, new_timing = run_dataset(
                dataset, train, held, unseen, {**cfg, "architectures": trained}
            )
            parts.append(new_rows)
            timing = pd.concat([old_timing, new_timing], ignore_index=True)
        if old_rows is None:
            parts.append(unseen_rows(dataset, train, held, unseen, cfg))
        else:
            parts.insert(0, old_rows)
        fitted = {row: make(train, unseen, cfg) for row, make in (probes or {}).items()}
        if fitted:
            parts.append(probe_rows(dataset, fitted, train, held, cfg))
        all_rows = pd.concat(parts, ignore_index=True)
        all_rows.to_csv(f"rows_{dataset}.csv", index=False)
        timing.to_csv(f"timing_{dataset}.csv", index=False)
        results[dataset] = {"rows": all_rows, "timing": timing}
    meta = {"wall_s": time.perf_counter() - t_all, "reuse": args.reuse, "reused_wall_s": 0.0}
    if reuse and (reuse / "meta.json").exists():  # the reused run's own time, and its sources'
        earlier = json.loads((reuse / "meta.json").read_text())
        meta["reused_wall_s"] = earlier["wall_s"] + earlier.get("reused_wall_s", 0.0)
        meta["sources"] = [args.reuse, *earlier.get("sources", [earlier.get("reuse")])]
    Path("meta.json").write_text(json.dumps(meta))
    print(write_page(markdown, title, intro, results, cfg, meta))
    return 0
