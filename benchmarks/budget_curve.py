"""Training budget against data size on a known truth: what the default budget should grow with.

``model.train()`` defaults to about 4,000 optimiser steps at batch 64, at most 300 epochs. On
pbmc68k_reduced (351 train cells) that is 300 epochs and the cells come out under-dispersed
(0.88, docs/benchmarks/training_budget.md); on a known truth of 5,600 train cells it is 46 epochs
and underfits (docs/benchmarks/known_truth_budget.md). Whether the budget should be counted in
steps or in epochs, and where it may stop growing, is read here from one grid: scales of
benchmarks/known_truth.py's truth (1x is pbmc68k_reduced's class sizes) x budgets in optimiser
steps, each budget its own training run (the cosine schedule ends with the budget).

Rows per scale, judged as in known_truth.py (``tl.evaluate(gen, held, train=train)`` on its four
types, mean over types, mean ± sd over generation seeds):

  probe: truth cells, unseen     cells of the truth nothing saw: must sit at the control
  probe: train cells' out-of-fold scores, decoded
                                 the memoriser: its train_distance is what copying looks like
  per-class Gaussian             fitted on the train cells
  <row>, <steps> steps (<epochs> epochs)
                                 a model trained for that budget: ``branched`` (the default
                                 model) or any row of ``--rows``, named as in quality.py
                                 (``flat``, ``branched:per_branch``, ``branched:ema0``,
                                 ``branched:balance1``, ``branched:batch256``, ...)

The jobs are independent processes (``--workers``, one thread each), so the grid fits a machine
with many cores; ``--gpu-from`` sends budgets of at least that many steps to a CUDA GPU.
Results are written as each job ends, so a run stopped at ``--deadline`` keeps what finished.

Usage (from the repository root, in the project's venv):
  python benchmarks/budget_curve.py --workers 16 --gpu-from 8000 --deadline 470
      # 7 min on 16 cores + an H200 (the 16,000-step budgets need longer)
  python benchmarks/budget_curve.py --scales 16,64 --steps 16000 --threads 2 \
      --markdown docs/benchmarks/budget_curve_cap.md   # those two on 2 CPU cores, 33 min
  python benchmarks/budget_curve.py --steps "1:250,500,1000,2000;4:500,1000,2000,4000" --workers 2 \
      --rows branched,flat,branched:per_branch,branched:ema0,branched:balance1 \
      --markdown docs/benchmarks/budget_curve_recipe.md   # the recipe's levers, small data
  python benchmarks/budget_curve.py --fast      # smoke test; numbers meaningless
Writes docs/benchmarks/budget_curve.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import logging
import multiprocessing
import os
import sys
import time
from pathlib import Path

import pandas as pd
from known_truth import SETTINGS as TRUTH_SETTINGS
from known_truth import TYPES, Truth, judge, rows_of, sizes_line, table
from quality import (
    SPLIT,
    _md,
    _model_pca,
    _split,
    model_options,
    prepare_run,
    train_model,
    write_lines,
)

#: scale -> budgets in optimiser steps (batch 64); 1x spans pbmc68k_reduced's 80-670 epochs
GRID = {
    1: [500, 1000, 2000, 4000],
    4: [1000, 2000, 4000, 8000],
    16: [2000, 4000, 8000, 16000],
    64: [4000, 8000, 16000],
}
FAST_GRID = {1: [20]}

logger = logging.getLogger("budget_curve")


def _data(truth: Truth, scale: int):
    train, held, unseen = _split(truth.sample(scale, seed=scale), SPLIT, seed=0)
    _model_pca(train)
    return train, held, unseen


def run_job(spec: str, scale: int, steps: int | None, cfg: dict, workdir: str) -> list[dict]:
    """One job in its own process: the probes of a scale (``steps=None``) or one budget of
    the model of row name ``spec`` (``quality.model_options``)."""
    import scvi
    import torch

    torch.set_num_threads(cfg["threads"])
    logging.getLogger("scbranch").setLevel(logging.WARNING)
    Path(workdir).mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)  # lightning_logs of parallel jobs must not collide
    scvi.settings.seed = 0
    train, held, unseen = _data(Truth(cfg["components"]), scale)
    t0 = time.perf_counter()
    if steps is None:
        rows = rows_of(train, unseen, cfg, model=False)
        extra = {}
    else:
        accelerator = "gpu" if cfg["gpu_from"] and steps >= cfg["gpu_from"] else "cpu"
        model = train_model(train, {**cfg, "steps": steps, "accelerator": accelerator}, 0, spec)
        run_steps = int(model.trainer.global_step)
        epochs = int(model.trainer.max_epochs)  # train_model's passes for this budget
        rows = {f"{spec}, {steps} steps ({epochs} epochs)": model}
        extra = {
            "steps_run": run_steps,
            "epochs": epochs,
            "fit_s": time.perf_counter() - t0,
            "accelerator": accelerator,
        }
    records = []
    for row, method in rows.items():
        records += [{**r, **extra} for r in judge(row, scale, method, train, held, cfg)]
    return records


def jobs_of(grid: dict, specs=("branched",)) -> list[tuple[str, int, int | None]]:
    """Longest first, so the pool ends together; the cheap probe jobs last."""
    jobs = [(spec, scale, n) for spec in specs for scale, budgets in grid.items() for n in budgets]
    jobs.sort(key=lambda j: -j[2])
    return jobs + [("", scale, None) for scale in grid]


def job_name(spec: str, scale: int, steps: int | None) -> str:
    return f"x{scale} {f'{spec} {steps} steps' if steps else 'probes'}"


def report(df: pd.DataFrame, cfg: dict, sizes: dict, wall: float, missing=()) -> list[str]:
    order = {row: i for i, row in enumerate(df["row"].unique())}
    budget = df["row"].str.extract(r"^(.*), (\d+) steps \(")
    specs = {spec: i for i, spec in enumerate(cfg.get("rows", ["branched"]))}
    df = df.assign(
        _probe=budget[0].isna(),
        _spec=budget[0].map(specs),
        _steps=budget[1].astype(float),
        _order=df["row"].map(order),
    ).sort_values(
        ["scale", "_probe", "_spec", "_steps", "_order"], ascending=[True, False, True, True, True]
    )
    timing = (
        df.dropna(subset=["fit_s"])
        .groupby(["scale", "row"], sort=False)[["steps_run", "epochs", "fit_s", "accelerator"]]
        .first()
    )
    timing[["steps_run", "epochs"]] = timing[["steps_run", "epochs"]].astype(int)
    return [
        "# Training budget against data size on a known truth (generated by "
        "`benchmarks/budget_curve.py`; do not edit by hand)",
        "",
        f"Truth: benchmarks/known_truth.py's (components {cfg['components']}) of all "
        "pbmc68k_reduced cells, synthetic datasets of scale x its class sizes, split 50/30/20 %; "
        f"each budget its own training run (batch {cfg['batch_size']}, cosine schedule over the "
        f"budget), training seed 0, generation seeds {cfg['seeds']}, {cfg['n_cells']} cells per "
        f"type. Judged by `tl.evaluate(gen, held, train=train, groups=TYPES)` on {TYPES}; mean "
        "over the types, then mean ± sd over generation seeds. `probe: truth cells, unseen` "
        "must sit at the control; train_distance 1 is a new cell, 0 a copy.",
        "",
        sizes_line(sizes),
        "",
        _md(table(df.drop(columns=["_probe", "_spec", "_steps", "_order"]))),
        "",
        f"Fit time (set-up and training, {cfg['threads']} CPU thread(s) per job or the GPU, "
        "seconds):",
        "",
        _md(timing.assign(fit_s=timing["fit_s"].round(0))),
        "",
        f"Total wall time {wall / 60:.1f} min ({cfg['workers']} parallel jobs).",
        "",
        *(
            ["Not ended by the deadline (no row): " + ", ".join(missing) + ".", ""]
            if missing
            else []
        ),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="smoke-test settings")
    parser.add_argument("--scales", default=None, help="e.g. 1,16 (default: all of GRID)")
    parser.add_argument(
        "--steps",
        default=None,
        help="1000,4000: every scale's budgets; 1:500;4:1000,2000: per scale",
    )
    parser.add_argument(
        "--rows", default="branched", help="models (quality.model_options names), e.g. flat"
    )
    parser.add_argument("--components", type=int, default=3, help="1: a Gaussian truth")
    parser.add_argument("--workers", type=int, default=1, help="parallel jobs")
    parser.add_argument("--gpu-from", type=int, default=0, help="budgets >= this use the GPU")
    parser.add_argument("--deadline", type=float, default=None, help="seconds; keep what ended")
    parser.add_argument("--out", default="benchmark_out/budget_curve")
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    args = parser.parse_args(argv)
    grid = dict(FAST_GRID if args.fast else GRID)
    if args.scales:
        grid = {int(s): grid[int(s)] for s in args.scales.split(",")}
    if args.steps and ":" in args.steps:  # per scale: "1:250,500;4:500,1000"
        grid = {
            int(scale): [int(n) for n in budgets.split(",")]
            for scale, budgets in (item.split(":") for item in args.steps.split(";"))
        }
    elif args.steps:
        grid = {scale: [int(n) for n in args.steps.split(",")] for scale in grid}
    cfg = dict(TRUTH_SETTINGS["fast" if args.fast else "cpu"])
    cfg.update(components=args.components, workers=args.workers, gpu_from=args.gpu_from)
    cfg["threads"] = args.threads
    cfg["rows"] = args.rows.split(",")
    for spec in cfg["rows"]:  # a misspelt row fails here, not after the first training
        model_options(spec, TYPES)
    markdown = prepare_run(args, "budget_curve")
    out = Path.cwd()
    t_all = time.perf_counter()
    sizes = {}
    truth = Truth(cfg["components"])
    for scale in grid:
        counts = truth.sizes * scale
        sizes[scale] = {t: int(round(counts[t] * SPLIT[0])) for t in TYPES}  # approximate
    records, ended = [], set()
    jobs = jobs_of(grid, cfg["rows"])
    name = {job: job_name(*job) for job in jobs}
    pool = cf.ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"))
    futures = {
        pool.submit(run_job, *job, cfg, str(out / name[job].replace(" ", "_"))): job for job in jobs
    }

    def write(missing=()):
        df = pd.DataFrame(records)
        df.to_csv("rows.csv", index=False)
        for column in ("fit_s", "steps_run", "epochs", "accelerator"):
            if column not in df:
                df[column] = None
        lines = report(df, cfg, sizes, time.perf_counter() - t_all, missing)
        write_lines(markdown, lines)

    try:
        for future in cf.as_completed(futures, timeout=args.deadline):
            records += future.result()
            ended.add(futures[future])
            logger.info("done %s (%d/%d)", name[futures[future]], len(ended), len(jobs))
            write()
    except cf.TimeoutError:
        missing = [name[j] for j in jobs if j not in ended]
        logger.warning("deadline: %s did not end; the report holds the rest", missing)
        if ended:
            write(missing)
        for process in list(pool._processes.values()):
            process.terminate()
    pool.shutdown(wait=False, cancel_futures=True)
    print(markdown.read_text() if markdown.exists() else "no job ended")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    sys.exit(main())
