"""One prepared GPU check: CUDA training speed, sampling throughput, DDP code path, save/load.

Run on a machine with a CUDA GPU (it falls back to CPU with tiny settings for a dry run):

    python benchmarks/gpu_check.py --out results/   [--dry-run]

Prints a JSON summary (also written to OUT/gpu_check.json). Timings are wall-clock with CUDA
synchronisation; ratios are measured in this one run.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="gpu_check_out")
    parser.add_argument("--dry-run", action="store_true", help="tiny settings on CPU")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import scvi

    import scbranch as sb
    from scbranch._demo import stratified_split

    dry = args.dry_run or not torch.cuda.is_available()
    accel = "cpu" if dry else "gpu"
    epochs = 5 if dry else 250
    sizes = [200, 2000] if dry else [10_000, 100_000, 1_000_000]
    res: dict = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "dry_run": dry,
    }
    scvi.settings.seed = 0
    adata = sb.datasets.pbmc68k()
    tr, te = stratified_split(adata.obs["cell_type"], 0.7, 0)
    train, held = adata[tr].copy(), adata[te].copy()
    sb.BranchedDiffusion.setup_anndata(train, labels_key="cell_type", obsm_key="X_pca")

    # 1. training speed on one GPU (same settings as the CPU demo)
    model = sb.BranchedDiffusion(train)
    t0 = time.perf_counter()
    model.train(
        max_epochs=epochs, batch_size=64, accelerator=accel, devices=1, enable_progress_bar=False
    )
    _sync()
    dt = time.perf_counter() - t0
    steps = epochs * int(np.ceil(train.n_obs / 64))
    res["train"] = {
        "epochs": epochs,
        "steps": steps,
        "seconds": round(dt, 2),
        "ms_per_step": round(1000 * dt / steps, 2),
    }

    # 2. quality of the GPU-trained model (same checks as the demo)
    gen = model.generate(n_cells=200, seed=0, progress_bar=False)
    report = sb.metrics.quality_report(gen, train, held, labels_key="cell_type", use_rep="X_pca")
    res["quality"] = {
        "label_fidelity_ratio": round(
            float(report["knn_generated"].mean() / report["knn_control"].mean()), 3
        ),
        "spread_ratio_per_class": report["spread_vs_heldout"].round(2).to_dict(),
    }

    # 3. sampling throughput, all classes, decoded to genes (warm-up first)
    model.generate(n_cells=10, seed=0, progress_bar=False)
    thr = []
    for total in sizes:
        per_class = total // len(model.classes)
        for solver, n_steps in (("heun", 25), ("dpm2m", 25)):
            try:
                _sync()
                t0 = time.perf_counter()
                g = model.generate(
                    n_cells=per_class, seed=1, solver=solver, n_steps=n_steps, progress_bar=False
                )
                _sync()
                dt = time.perf_counter() - t0
                thr.append(
                    {
                        "cells": g.n_obs,
                        "solver": solver,
                        "n_steps": n_steps,
                        "seconds": round(dt, 3),
                        "cells_per_s": round(g.n_obs / dt),
                        "network_calls": int(g.uns["scbranch"]["params"]["n_network_calls"]),
                    }
                )
            except torch.OutOfMemoryError as err:  # report the largest batch that fits
                thr.append({"cells": total, "solver": solver, "error": f"OOM: {err}"[:200]})
            print(thr[-1], flush=True)
    res["throughput"] = thr
    if torch.cuda.is_available():
        res["max_memory_allocated_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)

    # 4. save on GPU, load, identical samples
    import tempfile

    model_dir = Path(tempfile.mkdtemp()) / "model"
    model.save(str(model_dir))
    loaded = sb.BranchedDiffusion.load(str(model_dir))
    a = model.generate(n_cells=20, seed=5, progress_bar=False).obsm["X_pca"]
    b = loaded.generate(n_cells=20, seed=5, progress_bar=False).obsm["X_pca"]
    res["save_load_identical"] = bool(np.array_equal(a, b))
    res["loaded_device"] = str(loaded.module.shift.device)

    # 5. the DDP code path: one process on one GPU, Lightning's DDP strategy, scvi's sampler
    m2 = sb.BranchedDiffusion(train, width=64)
    t0 = time.perf_counter()
    m2.train(
        max_epochs=3 if dry else 20,
        accelerator=accel,
        devices=1,
        strategy="ddp_find_unused_parameters_true",
        enable_progress_bar=False,
    )
    res["ddp_one_device"] = {
        "ok": bool(m2.is_trained),
        "seconds": round(time.perf_counter() - t0, 2),
    }

    (out / "gpu_check.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    main()
