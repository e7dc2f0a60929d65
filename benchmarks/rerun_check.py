"""Rerun check: do the benchmark rows that sample reproduce under another BLAS thread count?

A page's numbers are one draw; whether a rerun elsewhere reproduces them decides whether a
moved number is a finding or a new draw. This fits quality.py's untrained rows (per-class
Gaussian, smoothed bootstrap and the probes) on split 0 and evaluates them with each
generation seed, once per BLAS thread count (``OMP_NUM_THREADS``, a fresh process each), and
reports each row's AUROC per run and whether every run gave it to the digit. The Cholesky
runs also train the package's default model with as many torch threads, to measure whether a
trained row reproduces on another core count.

Two known answers:
  rows that copy or decode real cells (unseen real cells, the probes, the control) must agree
  in every run: they draw nothing that depends on the threads;
  the former sampler (``--sampler svd``: numpy's ``multivariate_normal``, which factors each
  covariance with an SVD) must be caught: on pbmc68k_reduced 6 of 10 types have fewer training
  cells than PCs, their Ledoit-Wolf covariances repeat one eigenvalue, and the SVD's basis of
  it changed with the threads. The package's Cholesky sampler must agree in every run.

Usage (from the repository root, in the project's venv):
  python benchmarks/rerun_check.py            # 11 min on 2 cores beside another run
  python benchmarks/rerun_check.py --fast     # one generation seed
Writes docs/benchmarks/rerun_check.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from quality import LOADERS, SETTINGS, SPLIT, _md, environment, page_path, run_dataset

#: the thread counts every row is drawn under
THREADS = (1, 2)
SAMPLERS = ("cholesky", "svd")
#: rows drawn from a fitted Gaussian: the ones the sampler decides
GAUSSIAN_ROWS = ("per-class Gaussian", "smoothed bootstrap")
#: the package's default model, trained in each Cholesky run with as many torch threads
TRAINED = "conditioned (default model, trained)"


def _svd_noise(covariance, n, rng):
    """The former draw: numpy's multivariate_normal (an SVD of the covariance)."""
    return rng.multivariate_normal(np.zeros(len(covariance)), covariance, size=n)


def worker(dataset: str, seeds: list[int], sampler: str) -> dict:
    """AUROC (mean over types) of every row and the control, per generation seed: quality.py's
    own fitting and evaluation (``run_dataset``), with the default model in Cholesky runs."""
    if sampler == "svd":
        from scbranch.baselines import _bootstrap, _gaussian

        _gaussian.gaussian_noise = _bootstrap.gaussian_noise = _svd_noise
    else:  # a trained row too: training seed 0, the threads of this run
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = {
        **SETTINGS["cpu"],
        "architectures": ("conditioned",) if sampler == "cholesky" else (),
        "probes_only": True,  # the fixed rows, without scVI resampling
        "train_seeds": [0],
        "seeds": seeds,
    }
    train, held, unseen = LOADERS[dataset](seed=0, fractions=SPLIT)
    rows, _ = run_dataset(dataset, train, held, unseen, cfg)
    auroc = rows[(rows["group"] == "mean") & (rows["metric"] == "auroc")]
    out = {
        (TRAINED if method == "conditioned" else method): part["generated"].tolist()
        for method, part in auroc.groupby("method", sort=False)
    }
    control = auroc[auroc["method"] == "probe: real cells, unseen"]
    out["real vs real (control)"] = control["control"].tolist()
    return out


def run(dataset: str, seeds: list[int], sampler: str, threads: int, out: Path) -> dict:
    """One worker in a fresh process with ``threads`` BLAS threads; its rows."""
    env = {**os.environ, **{v: str(threads) for v in
           ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}  # fmt: skip
    path = out / f"{dataset}_{sampler}_{threads}.json"
    subprocess.run(
        [sys.executable, __file__, "--worker", dataset, "--sampler", sampler,
         "--seeds", ",".join(map(str, seeds)), "--result", str(path)],
        env=env, check=True, cwd=out,
    )  # fmt: skip
    return json.loads(path.read_text())


def table(results: dict[tuple[str, int], dict]) -> pd.DataFrame:
    """One row per method and sampler: mean AUROC per thread count, and whether runs agree."""
    rows = []
    for sampler in SAMPLERS:
        runs = {t: results[(sampler, t)] for t in THREADS if (sampler, t) in results}
        if not runs:
            continue
        for name in next(iter(runs.values())):
            values = [np.asarray(r[name]) for r in runs.values()]
            rows.append(
                {
                    "sampler": sampler,
                    "row": name,
                    **{
                        f"auroc, {t} thread(s)": float(v.mean())
                        for t, v in zip(runs, values, strict=True)
                    },
                    "largest difference": float(max(np.abs(v - values[0]).max() for v in values)),
                    "same in every run": all(np.array_equal(v, values[0]) for v in values),
                }
            )
    return pd.DataFrame(rows)


def verdicts(summary: pd.DataFrame) -> list[str]:
    """The known answers, each with its measured value."""
    lines = []
    fixed = summary[~summary["row"].isin((*GAUSSIAN_ROWS, TRAINED))]
    ok = bool(fixed["same in every run"].all())
    lines.append(
        "- Rows that draw nothing from a fitted Gaussian agree in every run: "
        f"**{'yes' if ok else 'NO'}** (largest difference {fixed['largest difference'].max():.2g})."
    )
    trained = summary[summary["row"] == TRAINED]
    if not trained.empty:  # a measurement, not a known answer: float sums in other orders
        lines.append(
            f"- The default model trained and sampled under each thread count (torch and BLAS): "
            f"largest AUROC difference {trained['largest difference'].max():.3g}"
            f"{' (the same to the digit)' if trained['same in every run'].all() else ''}."
        )
    for sampler, expect in (("cholesky", True), ("svd", False)):
        part = summary[(summary["sampler"] == sampler) & summary["row"].isin(GAUSSIAN_ROWS)]
        if part.empty:
            continue
        same = bool(part["same in every run"].all())
        met = same == expect
        lines.append(
            f"- The {sampler} sampler's Gaussian rows {'agree' if same else 'differ'} between "
            f"thread counts (largest AUROC difference {part['largest difference'].max():.3f}); "
            f"expected: {'agree' if expect else 'differ'}: **{'met' if met else 'NOT MET'}**."
        )
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default="pbmc68k")
    parser.add_argument("--out", default="benchmark_out/rerun_check")
    parser.add_argument("--markdown", default=None, help="default: docs/benchmarks/rerun_check.md")
    parser.add_argument("--fast", action="store_true", help="one generation seed")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--sampler", default="cholesky", choices=SAMPLERS, help=argparse.SUPPRESS)
    parser.add_argument("--seeds", default="0,1,2", help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.worker:
        import logging

        logging.getLogger("scbranch").setLevel(logging.WARNING)
        Path(args.result).write_text(json.dumps(worker(args.worker, seeds, args.sampler)))
        return 0
    seeds = seeds[:1] if args.fast else seeds
    unknown = [d for d in args.datasets.split(",") if d not in LOADERS]
    if unknown:  # before any worker starts: a worker's traceback would hide the cause
        parser.error(f"--datasets: unknown {', '.join(unknown)}; choose from {', '.join(LOADERS)}")
    markdown = page_path(args.markdown, "rerun_check", args.fast)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    lines = [
        "# Rerun check: the sampled rows under another BLAS thread count",
        "",
        "Generated by `python benchmarks/rerun_check.py`. quality.py's untrained rows on split 0 "
        f"(generation seeds {seeds}), each fitted and evaluated in a fresh process per BLAS "
        f"thread count ({', '.join(map(str, THREADS))}; `OMP_NUM_THREADS`), with the package's "
        "Cholesky sampler and with the former SVD one (numpy's `multivariate_normal`). AUROC: "
        "mean over evaluated types, then over generation seeds; `same in every run`: every "
        "seed's value equal to the digit in every run. Known answers: rows that draw nothing "
        "from a fitted Gaussian agree in every run; the SVD sampler's Gaussian rows differ, the "
        'Cholesky sampler\'s agree (docs/evaluation.md, "What a rerun reproduces"). The '
        f"Cholesky runs also train the default model (`{TRAINED}`, training seed 0) with as "
        "many torch threads: a measurement of what a trained row does on another core count.",
    ]
    for dataset in args.datasets.split(","):
        results = {
            (sampler, t): run(dataset, seeds, sampler, t, out)
            for sampler in SAMPLERS
            for t in THREADS
        }
        summary = table(results)
        summary.to_csv(out / f"rerun_{dataset}.csv", index=False)
        lines += ["", f"## {dataset}", "", _md(summary, index=False), "", *verdicts(summary)]
    lines += [
        "",
        f"Wall time {(time.perf_counter() - t0) / 60:.1f} min. Environment: {environment()}.",
    ]
    text = "\n".join(lines) + "\n"
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
