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
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

#: everything the check writes (models, a file of cells): removed when the script ends
_SCRATCH = tempfile.TemporaryDirectory(prefix="scbranch-gpu-check-")


def _scratch() -> Path:
    """A fresh folder under the check's scratch directory."""
    return Path(tempfile.mkdtemp(dir=_SCRATCH.name))


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _nonnegative_integers(counts) -> bool:
    """Whether a (sparse or dense) count matrix holds only non-negative integers."""
    values = counts.data if hasattr(counts, "data") else np.asarray(counts).ravel()
    return bool(np.all(values >= 0) and np.all(values == np.round(values)))


def _timed_train(model, *, epochs: int, batch_size: int, accelerator: str) -> float:
    """Train ``model`` on one device; the wall time in seconds (CUDA synchronised)."""
    _sync()
    t0 = time.perf_counter()
    model.train(
        max_epochs=epochs,
        batch_size=batch_size,
        accelerator=accelerator,
        devices=1,
        enable_progress_bar=False,
    )
    _sync()
    return time.perf_counter() - t0


def _multi_device(out: Path, dry: bool) -> dict:
    """DDP on every GPU against one GPU with the same global batch (benchmarks/ddp_train.py).

    Without two GPUs (or in a dry run) it runs two CPU processes, as tests/test_ddp.py does.
    """
    import subprocess
    import sys

    n_gpu = torch.cuda.device_count()
    accelerator, n = ("gpu", n_gpu) if n_gpu >= 2 and not dry else ("cpu", 2)
    script = Path(__file__).with_name("ddp_train.py")
    work = out / "ddp"
    work.mkdir(exist_ok=True)
    size = ["--n-per-class", "90"] if dry or accelerator == "cpu" else ["--n-per-class", "25000"]
    size += ["--global-batch", str(48 if dry or accelerator == "cpu" else 512 * n)]
    for devices in (1, n):
        subprocess.run(
            [sys.executable, str(script), "--devices", str(devices), "--out", str(work),
             "--accelerator", accelerator, *size],
            check=True, cwd=work, env={**os.environ, "MASTER_ADDR": "127.0.0.1"},
        )  # fmt: skip
    one = np.load(work / "devices1_rank0.npz")
    ranks = [np.load(work / f"devices{n}_rank{r}.npz") for r in range(n)]
    weights = [k for k in one.files if k not in ("losses", "seconds")]
    mean_loss = np.mean([r["losses"] for r in ranks], axis=0)
    return {
        "accelerator": accelerator,
        "devices": n,
        "steps": int(len(one["losses"])),
        "max_loss_difference_vs_one_device": float(np.abs(mean_loss - one["losses"]).max()),
        "max_weight_difference_vs_one_device": float(
            max(np.abs(ranks[0][k] - one[k]).max() for k in weights)
        ),
        "max_weight_difference_between_processes": float(
            max(np.abs(r[k] - ranks[0][k]).max() for r in ranks for k in weights)
        ),
        "seconds_one_device": float(one["seconds"]),
        "seconds_n_devices": float(ranks[0]["seconds"]),
    }


def _defaults(accel: str, dry: bool) -> dict:
    """The default configuration of stops 32-33 on the GPU: counts layer (negative-binomial
    decoder with class ratios), the reverse-SDE sampler, the default training budget.

    Training speed, generation throughput with counts (and without the decoder's noise, to
    see what it costs), the blocks spread over ``devices`` (two threads on one GPU: the
    multi-GPU generation path) against one device and against the CPU, save -> load on the
    GPU, streaming to an ``.h5ad`` file, and quality judged by ``tl.evaluate``. Data and
    set-up are benchmarks/quality.py's (pbmc68k_reduced split 50/30/20, out-of-fold PC
    scores, counts layer), so the quality figures read against its page (one training seed
    here).
    """
    import anndata as ad
    import pandas as pd
    from quality import LATENT, SPLIT, default_setup, load_pbmc68k

    import scbranch as sb

    train, held, _ = load_pbmc68k(seed=0, fractions=SPLIT)
    train = default_setup(train)
    model = sb.BranchedDiffusion(train)
    _sync()
    t0 = time.perf_counter()
    model.train(
        **({"max_epochs": 3} if dry else {}),  # else the package's default budget
        batch_size=64, accelerator=accel, devices=1, enable_progress_bar=False,
    )  # fmt: skip
    _sync()
    seconds = time.perf_counter() - t0
    steps = int(model.trainer.global_step)
    res: dict = {
        "train": {"steps": steps, "seconds": round(seconds, 2),
                  "ms_per_step": round(1000 * seconds / max(steps, 1), 2)},
        "solver": sb.module.DEFAULT_SOLVER,
    }  # fmt: skip
    print(res["train"], flush=True)
    model.generate(n_cells=10, seed=0, progress_bar=False)  # warm-up
    throughput = []
    for total in [200, 2000] if dry else [10_000, 100_000]:
        per_class = total // len(model.classes)
        for noise, counts in (("nb", True), (False, False)):
            _sync()
            t0 = time.perf_counter()
            g = model.generate(
                n_cells=per_class, seed=1, residual_noise=noise, counts=counts,
                progress_bar=False,
            )  # fmt: skip
            _sync()
            dt = time.perf_counter() - t0
            row = {
                "cells": g.n_obs,
                "decoder": "nb counts" if noise else "mean profile",
                "seconds": round(dt, 3),
                "cells_per_s": round(g.n_obs / dt),
                "network_calls": int(g.uns["scbranch"]["params"]["n_network_calls"]),
            }
            if counts:
                row["counts_nonnegative_integers"] = _nonnegative_integers(g.layers["counts"])
            throughput.append(row)
            print(row, flush=True)
    res["throughput"] = throughput

    # the blocks of one request spread over devices: identical on devices of one type
    request = {"n_cells": 3000 // len(model.classes), "seed": 7, "block_size": 1024,
               "progress_bar": False, "counts": True}  # fmt: skip
    one = model.generate(**request)
    gpu = "cpu" if dry else "cuda:0"
    two = model.generate(**request, devices=[gpu, gpu])
    cpu = model.generate(**request, devices=["cpu"])
    key = LATENT  # the generated latents, under the set-up key
    z = one.obsm[key]
    res["devices"] = {
        "n_blocks": int(one.uns["scbranch"]["params"]["n_blocks"]),
        "two_threads_one_gpu_identical_latent": bool(np.array_equal(z, two.obsm[key])),
        "two_threads_one_gpu_identical_counts": bool(
            (one.layers["counts"] != two.layers["counts"]).nnz == 0
        ),
        "cpu_blocks_max_latent_difference": float(np.abs(z - cpu.obsm[key]).max()),
        "latent_scale": float(np.abs(z).max()),
    }
    print(res["devices"], flush=True)

    # save on the GPU, load there: the same cells and counts, class ratios kept
    model_dir = _scratch() / "model"
    model.save(str(model_dir))
    loaded = sb.BranchedDiffusion.load(str(model_dir), accelerator=accel)
    a = model.generate(n_cells=20, seed=5, counts=True, progress_bar=False)
    b = loaded.generate(n_cells=20, seed=5, counts=True, progress_bar=False)
    res["save_load"] = {
        "identical_counts": bool((a.layers["counts"] != b.layers["counts"]).nnz == 0),
        "class_ratios_kept": bool(np.array_equal(
            model.space.counts.nb["class_ratio"], loaded.space.counts.nb["class_ratio"])),
        "loaded_device": str(loaded.module.shift.device),
    }  # fmt: skip

    # streaming to disk: one block at a time. pandas 3 (the device image's) makes string
    # indexes that anndata 0.12 (which asks for pandas < 3) writes only when told to
    if int(pd.__version__.split(".")[0]) >= 3:
        ad.settings.allow_write_nullable_strings = True
    res["pandas"] = pd.__version__
    path = _scratch() / "cells.h5ad"
    n_stream = 20 if dry else 10_000
    _sync()
    t0 = time.perf_counter()
    model.generate(n_cells=n_stream, seed=2, counts=True, out=path, progress_bar=False)
    dt = time.perf_counter() - t0
    back = ad.read_h5ad(path, backed="r")
    n_obs = back.n_obs
    res["stream_to_h5ad"] = {
        "cells": n_obs,
        "seconds": round(dt, 2),
        "cells_per_s": round(n_obs / dt),
        "file_MB": round(path.stat().st_size / 1e6, 1),
        "reads_back_with_counts": "counts" in back.layers,
    }
    print(res["stream_to_h5ad"], flush=True)
    back.file.close()
    path.unlink()

    # quality of the GPU-trained default model, judged like the CPU benchmarks
    gen = model.generate(n_cells=200, seed=0, progress_bar=False)
    report = sb.tl.evaluate(gen, held, "cell_type", train=train, seed=0)
    mean = report[report["group"] == "mean"].set_index(["space", "metric"])
    res["quality"] = {
        f"{space}/{metric}": [round(float(mean.loc[(space, metric), "generated"]), 3),
                              round(float(mean.loc[(space, metric), "control"]), 3)]
        for space, metric in [("reference_pca", "auroc"), ("reference_pca", "label_fidelity"),
                              ("reference_pca", "dispersion"), ("genes", "de_lfc_spearman")]
        if (space, metric) in mean.index
    }  # fmt: skip
    print(res["quality"], flush=True)
    return res


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="gpu_check_out")
    parser.add_argument("--dry-run", action="store_true", help="tiny settings on CPU")
    parser.add_argument(
        "--sections",
        default="main,scvi,scaling",
        help="comma-separated: main (training, quality, throughput, save/load, DDP), train "
        "(training and quality only), scvi (count-level cells through scVI), scaling (ms per "
        "step against batch size, stacked heads against the per-head loop), multi (DDP on all "
        "GPUs against one GPU with the same global batch; two CPU processes without 2 GPUs), "
        "defaults (the default configuration: counts, SDE sampler, blocks over devices, "
        "streaming to h5ad, quality)",
    )
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import scvi

    import scbranch as sb
    from scbranch.datasets import stratified_split

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

    if sections & {"main", "train"}:
        # 1. training speed on one GPU (same settings as the CPU demo)
        model = sb.BranchedDiffusion(train)
        dt = _timed_train(model, epochs=epochs, batch_size=64, accelerator=accel)
        steps = epochs * int(np.ceil(train.n_obs / 64))
        res["train"] = {
            "epochs": epochs,
            "steps": steps,
            "seconds": round(dt, 2),
            "ms_per_step": round(1000 * dt / steps, 2),
        }

        # 1b. the same model on this machine's CPU cores for a few epochs: a ratio in one run
        cpu_epochs = 2 if dry else 25
        cpu_s = _timed_train(
            sb.BranchedDiffusion(train), epochs=cpu_epochs, batch_size=64, accelerator="cpu"
        )
        cpu_ms = 1000 * cpu_s / (cpu_epochs * int(np.ceil(train.n_obs / 64)))
        res["train"]["cpu_ms_per_step"] = round(cpu_ms, 2)
        res["train"]["cpu_threads"] = torch.get_num_threads()
        res["train"]["gpu_speedup"] = round(cpu_ms / res["train"]["ms_per_step"], 2)

        # 2. quality of the GPU-trained model (same checks as the demo)
        gen = model.generate(n_cells=200, seed=0, progress_bar=False)
        report = sb.metrics.quality_report(
            gen, train, held, labels_key="cell_type", use_rep="X_pca"
        )
        res["quality"] = {
            "label_fidelity_ratio": round(
                float(report["knn_generated"].mean() / report["knn_control"].mean()), 3
            ),
            "spread_ratio_per_class": report["spread_vs_heldout"].round(2).to_dict(),
        }

    if "main" in sections:
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
                        n_cells=per_class,
                        seed=1,
                        solver=solver,
                        n_steps=n_steps,
                        progress_bar=False,
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

        model_dir = _scratch() / "model"
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

    if "scvi" in sections:
        # 6. count-level cells (issue 4) on the GPU: scVI trained there, diffusion in its latent,
        #    counts decoded there; save -> load (no AnnData) -> identical counts on the same device
        from scbranch.metrics import gene_moment_spearman

        strain = train.copy()
        t0 = time.perf_counter()
        vae = sb.model.fit_scvi(
            strain,
            counts_layer="counts",
            max_epochs=2 if dry else 200,
            accelerator=accel,
            devices=1,
            enable_progress_bar=False,
        )
        scvi_s = time.perf_counter() - t0
        ms = sb.BranchedDiffusion.from_scvi_model(vae, labels_key="cell_type", adata=strain)
        diffusion_s = _timed_train(ms, epochs=epochs, batch_size=64, accelerator=accel)
        n_count_cells = 50 if dry else 10_000
        t0 = time.perf_counter()
        gc = ms.generate(n_cells=n_count_cells, seed=3, counts=True, progress_bar=False)
        _sync()
        gen_s = time.perf_counter() - t0
        counts = gc.layers["counts"]
        rho = {}
        for label in held.obs["cell_type"].cat.categories:
            h = held.layers["counts"][(held.obs["cell_type"] == label).to_numpy()]
            if h.shape[0] >= 2:
                g = counts[(gc.obs["cell_type"] == label).to_numpy()]
                rho[str(label)] = round(float(gene_moment_spearman(g, h)[0]), 3)
        scvi_dir = _scratch() / "scvi_model"
        ms.save(str(scvi_dir))
        same = sb.BranchedDiffusion.load(str(scvi_dir), accelerator=accel)
        cpu = sb.BranchedDiffusion.load(str(scvi_dir))
        a = ms.generate(n_cells=20, seed=5, counts=True, progress_bar=False).layers["counts"]
        b = same.generate(n_cells=20, seed=5, counts=True, progress_bar=False).layers["counts"]
        c = cpu.generate(n_cells=20, seed=5, counts=True, progress_bar=False).layers["counts"]
        res["scvi_counts"] = {
            "scvi_epochs": 2 if dry else 200,
            "scvi_train_s": round(scvi_s, 2),
            "diffusion_train_s": round(diffusion_s, 2),
            "generate_with_counts_s": round(gen_s, 3),
            "cells": gc.n_obs,
            "counts_cells_per_s": round(gc.n_obs / gen_s),
            "counts_nonnegative_integers": _nonnegative_integers(counts),
            "count_mean_spearman_vs_heldout": rho,
            "model_devices": [
                str(ms.module.shift.device),
                str(next(vae.module.parameters()).device),
            ],
            "loaded_same_device_identical_counts": bool((a != b).nnz == 0)
            if hasattr(a, "nnz")
            else bool(np.array_equal(a, b)),
            "loaded_default_device": str(next(cpu.scvi_model.module.parameters()).device),
            "loaded_default_counts_valid": _nonnegative_integers(c),
        }
        print(res["scvi_counts"], flush=True)

    if "scaling" in sections:
        # 7. training time per step against batch size: is a GPU step launch-bound?
        #    (simulated 8-class tree, 20,000 cells in 30 dimensions; about 100 steps per size)
        sim = sb.datasets.simulate_tree(depth=3, n_per_class=2500, dim=30, seed=0).to_anndata()
        sb.BranchedDiffusion.setup_anndata(sim, labels_key="cell_type", obsm_key="X_latent")
        rows = []
        from scbranch.module import _networks

        stacked_devices = _networks.STACKED_HEAD_DEVICES
        targets = [("cpu", 64, "loop"), ("cpu", 1024, "loop")]
        targets += [(accel, b, "loop") for b in (64, 1024)]
        targets += [(accel, b, "stacked") for b in (64, 256, 1024, 4096)]
        for where, batch, heads in targets if not dry else [("cpu", 64, "loop")]:
            # the per-head loop on every device, or the library's default (stacked on CUDA)
            _networks.STACKED_HEAD_DEVICES = () if heads == "loop" else stacked_devices
            per_epoch = int(np.ceil(sim.n_obs / batch))
            n_epochs = 1 if dry else max(1, int(np.ceil(100 / per_epoch)))
            dt = _timed_train(
                sb.BranchedDiffusion(sim), epochs=n_epochs, batch_size=batch, accelerator=where
            )
            steps = n_epochs * per_epoch
            rows.append(
                {
                    "accelerator": where,
                    "heads": heads,
                    "batch_size": batch,
                    "steps": steps,
                    "ms_per_step": round(1000 * dt / steps, 2),
                    "cells_per_s": round(steps * batch / dt),
                }
            )
            print(rows[-1], flush=True)
        _networks.STACKED_HEAD_DEVICES = stacked_devices
        res["train_batch_scaling"] = rows

    if "defaults" in sections:
        res["defaults"] = _defaults(accel, dry)

    if "multi" in sections:
        res["multi_device"] = _multi_device(out, dry)
        print(res["multi_device"], flush=True)

    (out / "gpu_check.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    main()
