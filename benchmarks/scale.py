"""Atlas scale: training from a file on disk and generating to disk, at 10^4 to 10^6 cells.

    python benchmarks/scale.py [--sizes 10000,100000,1000000] [--device cpu|cuda] [--steps 300]

Writes docs/benchmarks/scale.md. The atlas is SIMULATED (``sb.datasets.simulate_atlas``, 60
types on a three-level tree, 2,000 genes, negative-binomial counts whose parameters are fitted
to the labelled pbmc3k cells in ../shared/data, or to scanpy's pbmc68k_reduced when that file
is absent). Every stage runs in its own child process; its peak resident memory is the
child's ``ru_maxrss`` as the kernel reports it at exit (``os.wait4``), so it includes Python,
torch and scvi-tools themselves (about 0.6 GB on import). Stages:

- ``simulate``: write the atlas (.h5ad, counts in .X, CSR) in blocks.
- ``expression``: open it with ``sb.io.read_backed`` (the matrix stays on disk), set up an
  expression model on the 2,000 genes with ``target_sum=1e4`` (log1p(CP10k) computed per block),
  build it (streamed statistics, hierarchy discovery) and train a fixed number of steps with
  the block loader; once with one head per branch (``architecture="branched"``, 119 heads for
  60 types) and once with the branch-conditioned network (``architecture="conditioned"``).
- ``scvi``: train scVI on the counts on disk (block loader, fixed steps), encode every cell
  block by block, build a diffusion model on the latent (in memory) and train it.
- ``generate``: load the scVI-latent model and generate as many cells as the atlas holds,
  counts included, to an .h5ad file (``generate(out=...)``, blocks), without scVI's dense
  normalised expression (``layers=["counts"]``).

Known answer: the atlas's true tree is in ``uns["simulation"]["newick"]``; the expression and
scVI-latent stages compare the tree their set-up discovered with it (``tree_recovery``: share
of the true clades found at each level, and found clades that cross a true one); the scVI
model's topology comes from the normalised counts, its branch times from the latent.

Time per training step excludes the first ``--warmup`` steps and the set-up; "per cell" is per
cell processed (steps x batch) or generated. Throughput ratios between sizes are read within
one run of this script (the machine is shared and noisy).
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

ROOT = Path(__file__).resolve().parents[1]
PBMC3K = ROOT.parent / "shared" / "data" / "pbmc3k_labelled.h5ad"
N_TYPES = 60
N_GENES = 2000
ARCHITECTURES = ("branched", "conditioned")


# ---------------------------------------------------------------------------- child stages
class StepTimer:
    """Lightning callback: wall time of every training step after the warm-up."""

    def __init__(self, warmup: int):
        from lightning.pytorch.callbacks import Callback

        timer = self

        class _Callback(Callback):
            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                timer.times.append(time.perf_counter())

        self.warmup = warmup
        self.times: list[float] = []
        self.callback = _Callback()

    def seconds_per_step(self) -> float:
        t = np.asarray(self.times[self.warmup :])
        return float((t[-1] - t[0]) / max(1, len(t) - 1))


def _accelerator(device: str) -> str:
    return "gpu" if device == "cuda" else "cpu"


def _timed_steps(model, a) -> float:
    """Train ``a.steps`` steps of ``a.batch`` cells; seconds per step after the warm-up."""
    timer = StepTimer(a.warmup)
    model.train(
        max_epochs=10**6, max_steps=a.steps, batch_size=a.batch, accelerator=_accelerator(a.device),
        devices=1, enable_progress_bar=False, callbacks=[timer.callback],
    )  # fmt: skip
    return timer.seconds_per_step()


def true_clades(newick: str) -> dict[frozenset, int]:
    """The simulated tree's clades (two or more types, not all), each at its level (1: a
    reference type's leaves, 2: a level-2 type's); a clade at both levels counts at level 1."""
    from scbranch.module._topology import parse_newick

    root = parse_newick(newick)
    n = len(root.leaves())
    out: dict[frozenset, int] = {}
    for level, nodes in ((1, root.children), (2, [g for c in root.children for g in c.children])):
        for node in nodes:
            clade = frozenset(node.leaves())
            if 1 < len(clade) < n:
                out.setdefault(clade, level)
    return out


def crossing_clades(found, truth) -> int:
    """Found clades that cross a true one: neither inside it, around it, nor apart from it."""
    return sum(any(c & t and not (c <= t or t <= c) for t in truth) for c in found)


def tree_recovery(tree, newick: str) -> dict:
    """The known answer of set-up: how much of the simulated tree the discovered one holds.

    recall: share of the true clades (per level) that are clades of the discovered tree;
    conflicts: discovered clades that cross a true clade (neither inside it, around it, nor
    apart from it); a discovered tree resolves the true tree's multifurcations into further
    clades, which do not cross any true clade and are not errors.
    """
    from scbranch.tl._compare import clades

    truth = true_clades(newick)
    found = set(clades(tree))
    out = {}
    for level in (1, 2):
        want = [c for c, lv in truth.items() if lv == level]
        out[f"recall_level{level}"] = sum(c in found for c in want) / max(len(want), 1)
        out[f"n_true_level{level}"] = len(want)
    out["conflicts"] = crossing_clades(found, truth)
    out["n_found"] = len(found)
    return out


def stage_simulate(a) -> dict:
    import scbranch as sb

    params = sb.datasets.AtlasParameters.load(a.parameters)
    t0 = time.perf_counter()
    path = sb.datasets.simulate_atlas(
        a.atlas, a.n, n_types=N_TYPES, parameters=params, seed=0, overwrite=True,
        progress_bar=False,
    )  # fmt: skip
    return {"seconds": time.perf_counter() - t0, "bytes": Path(path).stat().st_size}


def stage_expression(a) -> dict:
    import scvi
    import torch

    import scbranch as sb

    torch.set_num_threads(os.cpu_count() or 1)
    scvi.settings.seed = 0
    t0 = time.perf_counter()
    adata = sb.io.read_backed(a.atlas)
    sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", target_sum=1e4)
    model = sb.BranchedDiffusion(adata, architecture=a.architecture)
    setup = time.perf_counter() - t0
    step = _timed_steps(model, a)
    return {
        "tree": tree_recovery(model.tree, adata.uns["simulation"]["newick"]),
        "parameters": sum(p.numel() for p in model.module.parameters()),
        "setup_seconds": setup,
        "seconds_per_step": step,
        "cells_per_second": a.batch / step,
        "n_types": len(model.classes),
        "n_genes": int(model.module.n_input),
    }


def stage_scvi(a) -> dict:
    import scvi
    import torch

    import scbranch as sb

    torch.set_num_threads(os.cpu_count() or 1)
    scvi.settings.seed = 0
    adata = sb.io.read_backed(a.atlas)
    timer = StepTimer(a.warmup)
    t0 = time.perf_counter()
    vae = sb.model.fit_scvi(
        adata, counts_layer=None, max_epochs=10**6, max_steps=a.steps, batch_size=128,
        accelerator=_accelerator(a.device), devices=1, callbacks=[timer.callback],
    )  # fmt: skip
    scvi_total = time.perf_counter() - t0
    scvi_step = timer.seconds_per_step()
    t0 = time.perf_counter()
    model = sb.BranchedDiffusion.from_scvi_model(vae, labels_key="cell_type", adata=adata)
    encode_setup = time.perf_counter() - t0
    step = _timed_steps(model, a)
    model.save(a.model, overwrite=True)
    return {
        "tree": tree_recovery(model.tree, adata.uns["simulation"]["newick"]),
        "scvi_seconds": scvi_total,
        "scvi_seconds_per_step": scvi_step,
        "scvi_cells_per_second": 128 / scvi_step,
        "encode_and_setup_seconds": encode_setup,
        "seconds_per_step": step,
        "cells_per_second": a.batch / step,
        "architecture": model.module.architecture,  # the package's default network
        "parameters": sum(p.numel() for p in model.module.net.parameters()),
    }


def stage_generate(a) -> dict:
    import torch

    import scbranch as sb

    torch.set_num_threads(os.cpu_count() or 1)
    accelerator = _accelerator(a.device)
    model = sb.BranchedDiffusion.load(a.model, accelerator=accelerator)
    per_type = a.n // len(model.classes)
    t0 = time.perf_counter()
    path = model.generate(
        per_type, seed=0, out=a.generated, overwrite=True, layers=["counts"], progress_bar=False
    )
    seconds = time.perf_counter() - t0
    import h5py

    # not anndata.read_h5ad(backed="r"): it reads every layer into memory (GBs of counts here),
    # which would be counted in this stage's peak memory
    with h5py.File(path, "r") as f:
        counts = f["layers/counts"]
        n = int(counts.attrs["shape"][0])
        encoding = str(counts.attrs["encoding-type"])
    return {
        "seconds": seconds,
        "cells": n,
        "cells_per_second": n / seconds,
        "bytes": Path(path).stat().st_size,
        "counts_sparse": encoding,
        "architecture": model.module.architecture,
    }


STAGES = {
    "simulate": stage_simulate,
    "expression": stage_expression,
    "scvi": stage_scvi,
    "generate": stage_generate,
}


# ---------------------------------------------------------------------------- parent
def run_stage(stage: str, result: Path, **kwargs) -> dict:
    """Run a stage in a child process; its result plus the child's peak resident memory."""
    cmd = [sys.executable, __file__, "--stage", stage, "--result", str(result)]
    for k, v in kwargs.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=result.parent)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"stage {stage} ({kwargs}) failed with exit code {proc.returncode}")
    out = json.loads(result.read_text())
    out["peak_rss_gb"] = usage.ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux
    out["wall_seconds"] = time.perf_counter() - t0
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}
    print(stage, kwargs.get("n"), shown, flush=True)
    return out


def fit_parameters(path: Path) -> str:
    import anndata

    import scbranch as sb

    if PBMC3K.is_file():
        reference = anndata.read_h5ad(PBMC3K)
        params = sb.datasets.fit_atlas_parameters(reference, counts_layer=None, n_genes=N_GENES)
        name = "pbmc3k (labels derived from marker genes)"
    else:
        params = sb.datasets.fit_atlas_parameters(
            sb.datasets.pbmc68k(), counts_layer="counts", n_genes=N_GENES
        )
        name = "scanpy's pbmc68k_reduced (765 genes, extended to 2,000 by jittered copies)"
    params.save(path)
    return name


def _fmt(x, digits=3):
    if isinstance(x, float):
        return f"{x:,.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def tree_lines(rows: dict, sizes: list[int], latent_arch: str, steps: int) -> list[str]:
    """The known answer's table: the simulated tree against the ones set-up found."""
    found = [
        (n, label, rows[n][key]["tree"])
        for n in sizes
        for key, label in (
            *((f"expression_{arch}", f"expression ({arch})") for arch in ARCHITECTURES),
            ("scvi", f"scVI latent ({latent_arch})"),
        )
        if "tree" in rows[n].get(key, {})
    ]
    if not found:  # rows of a run before the check existed
        return []
    first = found[0][2]
    lines = [
        "",
        "### Known answer: the simulated hierarchy, found from the file",
        "",
        "Set-up discovers the hierarchy from the cells: an expression model on a subsample read "
        "from disk, an scVI-latent model its topology on the normalised counts read from disk "
        "(`from_scvi_model`'s default) and its branch times on the latent. The atlas's true "
        "tree is known (`uns['simulation']['newick']`). Found: share "
        "of the true clades of two or more types that the found tree holds, level 1 (a "
        f"reference type's leaves, {first['n_true_level1']} clades) and level 2 (a level-2 "
        f"type's leaves, {first['n_true_level2']} clades). Crossing: found clades that cross a "
        "true clade, the errors; the found tree also splits the true tree's multifurcations "
        "into further clades, which cross none and are not errors. The scVI rows' branch times "
        f"come from the timing run's scVI ({steps} steps of 128 cells), not a fitted one; trees "
        "discovered in scVI latents themselves lose clades ([latent_tree](latent_tree.md)).",
        "",
        "| cells | model | level 1 found | level 2 found | crossing clades | clades in the "
        "found tree |",
        "|---|---|---|---|---|---|",
    ]
    for n, label, t in found:
        lines.append(
            f"| {n:,} | {label} | {t['recall_level1']:.2f} | {t['recall_level2']:.2f} | "
            f"{t['conflicts']} | {t['n_found']} |"
        )
    return lines


def write_page(rows: dict, args, reference: str, page: Path) -> None:
    sizes = sorted(rows)
    lines = [
        "# Atlas scale: training from disk, generating to disk",
        "",
        f"Generated by `python benchmarks/scale.py --sizes {','.join(map(str, sizes))} "
        f"--device {args.device} --steps {args.steps}` ({os.cpu_count()} CPU cores"
        f"{'' if args.device == 'cpu' else ', CUDA'}). The atlas is SIMULATED: "
        f"`sb.datasets.simulate_atlas` with {N_TYPES} types on a three-level tree and "
        f"{N_GENES:,} genes, negative-binomial parameters fitted to {reference}. Each stage runs "
        "in a child process; peak memory is its resident set at its highest (`ru_maxrss`), "
        "Python, torch and scvi-tools included.",
        *(
            [
                "",
                f"Rerun by a second invocation: {', '.join(args.stages_run)} "
                f"(`--stages {','.join(args.stages_run)}`, same sizes and settings"
                f"{'' if 'scvi' in args.stages_run else ', the models of the first run'}); "
                "the other rows are the first run's. Ratios below compare sizes within one "
                "invocation.",
            ]
            if set(args.stages_run) != set(STAGES)
            else []
        ),
        "",
        "## Training from the file on disk",
        "",
        "### Expression model (2,000 genes, read from the file a block at a time)",
        "",
        "| cells | file (GB) | simulate (s) | network | parameters | set-up (s) | ms / step "
        "| cells / s | peak memory (GB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n in sizes:
        s = rows[n]["simulate"]
        for arch in ARCHITECTURES:
            e = rows[n][f"expression_{arch}"]
            lines.append(
                f"| {n:,} | {s['bytes'] / 1e9:.2f} | {s['seconds']:.0f} | {arch} | "
                f"{e['parameters'] / 1e6:.1f} M | {e['setup_seconds']:.1f} | "
                f"{1000 * e['seconds_per_step']:.1f} | {e['cells_per_second']:,.0f} | "
                f"{e['peak_rss_gb']:.2f} |"
            )
    # runs before the result recorded it used one head per branch, the default then
    latent_arch = rows[sizes[0]]["scvi"].get("architecture", "branched")
    gen_arch = rows[sizes[0]]["generate"].get("architecture", "branched")
    lines += [
        "",
        f"### scVI fitted on the file, diffusion on its latent ({latent_arch} network)",
        "",
        "| cells | scVI: ms / step | encode + set-up (s) | diffusion: ms / step | "
        "peak memory (GB) |",
        "|---|---|---|---|---|",
    ]
    for n in sizes:
        v = rows[n]["scvi"]
        lines.append(
            f"| {n:,} | {1000 * v['scvi_seconds_per_step']:.1f} | "
            f"{v['encode_and_setup_seconds']:.1f} | {1000 * v['seconds_per_step']:.1f} | "
            f"{v['peak_rss_gb']:.2f} |"
        )
    lines += tree_lines(rows, sizes, latent_arch, args.steps)
    lines += [
        "",
        f"Steps: {args.steps} per model (batch {args.batch} for the diffusion, 128 for scVI), "
        f"timed after {args.warmup} warm-up steps. Set-up reads the whole matrix a few times "
        "(per-gene moments, size factors, the discovery subsample; for the scVI model the "
        "encoding and the normalised counts' moments for the tree's topology): it grows with "
        "the cells; a step does not.",
        "",
        "## Generating to disk",
        "",
        f"The scVI-latent model above ({gen_arch} network) generates as many cells as the atlas "
        "holds with `generate(out=...)`'s default sampler (reverse SDE, fan-out sharing), "
        "decodes them with scVI and writes counts only (`layers=['counts']`) block by block.",
        "",
        "| cells | seconds | cells / s | file (GB) | peak memory (GB) | counts |",
        "|---|---|---|---|---|---|",
    ]
    for n in sizes:
        g = rows[n]["generate"]
        lines.append(
            f"| {g['cells']:,} | {g['seconds']:.0f} | {g['cells_per_second']:,.0f} | "
            f"{g['bytes'] / 1e9:.2f} | {g['peak_rss_gb']:.2f} | {g['counts_sparse']} |"
        )
    big = [n for n in sizes if n >= 100_000]
    if len(big) >= 2:
        a, b = big[-2], big[-1]
        ratio = lambda stage, key: rows[b][stage][key] / rows[a][stage][key]  # noqa: E731
        per_cell_gen = (rows[b]["generate"]["seconds"] / rows[b]["generate"]["cells"]) / (
            rows[a]["generate"]["seconds"] / rows[a]["generate"]["cells"]
        )
        lines += [
            "",
            f"## Linear cost ({b:,} against {a:,} cells, this run)",
            "",
            "| what | time per cell, ratio |",
            "|---|---|",
            *(
                f"| expression model ({arch}), training step | "
                f"{ratio(f'expression_{arch}', 'seconds_per_step'):.2f} |"
                for arch in ARCHITECTURES
            ),
            f"| scVI, training step | {ratio('scvi', 'scvi_seconds_per_step'):.2f} |",
            "| diffusion on scVI latent, training step | "
            f"{ratio('scvi', 'seconds_per_step'):.2f} |",
            f"| generation to disk, with counts | {per_cell_gen:.2f} |",
            "",
            "A ratio of 1 is linear cost; the goal is at most 1.5.",
        ]
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("\n".join(lines) + "\n")
    print(f"wrote {page}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--work", "--out", dest="work", default=str(ROOT / "benchmark_out" / "scale")
    )
    parser.add_argument("--page", default=None, help="default: docs/benchmarks/scale.md")
    parser.add_argument(
        "--fast",
        action="store_true",
        help="smoke test: 10,000 and 12,000 cells (the rarest of 60 types needs 3), 20 steps "
        "(numbers meaningless); the page goes to --work",
    )
    parser.add_argument(
        "--stages",
        default="simulate,expression,scvi,generate",
        help="stages to run; the others are read from a previous run's scale.json in --work "
        "(generate needs the models that run saved)",
    )
    # child-process arguments
    parser.add_argument("--stage", choices=sorted(STAGES))
    parser.add_argument("--result")
    parser.add_argument("--n", type=int)
    parser.add_argument("--atlas")
    parser.add_argument("--parameters")
    parser.add_argument("--model")
    parser.add_argument("--generated")
    parser.add_argument("--architecture", choices=ARCHITECTURES)
    args = parser.parse_args()
    if args.stage:
        out = STAGES[args.stage](args)
        Path(args.result).write_text(json.dumps(out))
        return
    if args.fast:
        args.sizes, args.steps, args.warmup = "10000,12000", 20, 5
    if args.page is None:  # a smoke run's page never replaces the committed one
        page = Path(args.work) / "scale.md" if args.fast else ROOT / "docs/benchmarks/scale.md"
        args.page = str(page)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    params = work / "atlas_parameters.npz"
    reference = fit_parameters(params)
    common = {
        "device": args.device, "steps": args.steps, "warmup": args.warmup, "batch": args.batch
    }  # fmt: skip
    stages = set(args.stages.split(","))
    unknown = stages - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; choose from {sorted(STAGES)}")
    previous = {}
    if stages != set(STAGES):
        previous = {int(k): v for k, v in json.loads((work / "scale.json").read_text()).items()}
    rows = {}
    for n in [int(s) for s in args.sizes.split(",")]:
        atlas, model = work / f"atlas_{n}.h5ad", work / f"model_{n}"
        generated = work / f"generated_{n}.h5ad"
        result = work / "result.json"
        rows[n] = dict(previous.get(n, {}))
        try:
            if "simulate" in stages:
                rows[n]["simulate"] = run_stage(
                    "simulate", result, n=n, atlas=atlas, parameters=params
                )
            if "expression" in stages:
                for arch in ARCHITECTURES:
                    rows[n][f"expression_{arch}"] = run_stage(
                        "expression", result, n=n, atlas=atlas, architecture=arch, **common
                    )
            if "scvi" in stages:
                rows[n]["scvi"] = run_stage("scvi", result, n=n, atlas=atlas, model=model, **common)
            if "generate" in stages:
                rows[n]["generate"] = run_stage(
                    "generate", result, n=n, model=model, generated=generated, device=args.device
                )
        finally:  # also after a failed stage: files of a million cells are many GB
            generated.unlink(missing_ok=True)
            atlas.unlink(missing_ok=True)
        (work / "scale.json").write_text(json.dumps(rows, indent=1))
    args.stages_run = sorted(stages, key=list(STAGES).index)
    write_page(rows, args, reference, Path(args.page))


if __name__ == "__main__":
    main()
