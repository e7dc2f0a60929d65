"""Expected log-normalised counts through scVI: the exact sum against averaging 20 draws.

The scVI space's denoised profile (``generate(counts=False)``, trajectory and transmutation
``.X``, ``ScviResampling(residual_noise=False)``) is each latent's expected log-normalised
counts. Development builds before 2026-12-06 gave the mean of 20 seeded draws of counts, each
normalised by its own total; it is now summed exactly over the likelihood's probability mass
function (``scbranch.model._expected_log1p``), each gene normalised by the draws' expected
total.

Both are judged against a reference: the mean of 2,000 draws of counts from the same
likelihoods, each log-normalised by its own total as real cells are. Per value (cell x gene):
the difference to the reference, the same divided by the reference's own standard error (|z|
averages 0.80 when the difference is the reference's Monte-Carlo error alone), and the wall
time of each on the same latents, with their ratio measured in this run.

Rows: scVI (100 epochs, the latents of the cells themselves) on pbmc68k_reduced (765 genes) and
pbmc3k (2,000 HVGs), with negative-binomial and zero-inflated likelihoods.

Usage (from the repository root, in the project's venv):
  python benchmarks/expected_counts.py          # about 6 min on 2 cores
  python benchmarks/expected_counts.py --fast   # smoke test; numbers meaningless
Writes docs/benchmarks/expected_counts.md.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import pandas as pd
import scipy.sparse as sp
from quality import LOADERS, _md, cpu_threads, page_path, write_lines

SETTINGS = {
    "cpu": {"epochs": 100, "rows": 5000, "reference_rows": 200, "reference_draws": 2000},
    "fast": {"epochs": 2, "rows": 300, "reference_rows": 20, "reference_draws": 50},
}
MC_DRAWS = 20  # what scbranch averaged before


def mean_of_draws(vae, likelihoods, n_draws: int, first_seed: int = 0):
    """Mean and standard error of ``n_draws`` draws of counts, each log-normalised by its total."""
    from scbranch.model._counts import log_normalize
    from scbranch.model._scvi import _draws

    total = total_sq = 0.0
    for s in range(first_seed, first_seed + n_draws):
        x = log_normalize(sp.csr_matrix(np.concatenate(_draws(vae, likelihoods, s)))).toarray()
        x = x.astype(np.float64)
        total, total_sq = total + x, total_sq + x * x
    mean = total / n_draws
    var = np.maximum(total_sq / n_draws - mean * mean, 0.0)
    return mean, np.sqrt(var / n_draws)


def one_row(name: str, adata, likelihood: str, settings: dict) -> dict:
    import scvi

    import scbranch as sb
    from scbranch.model._scvi import _likelihoods, expected_log_counts

    scvi.settings.seed = 0
    vae = sb.model.fit_scvi(
        adata, counts_layer="counts", gene_likelihood=likelihood, max_epochs=settings["epochs"]
    )
    z = vae.get_latent_representation()
    rows = np.resize(np.arange(len(z)), settings["rows"])  # the cells, repeated to the size
    z = z[rows]
    library = np.asarray(adata.layers["counts"].sum(1)).ravel()[rows].astype(np.float32)
    batch = np.zeros(len(z), dtype=int)
    start = time.perf_counter()
    exact = expected_log_counts(vae, z, library, batch)
    t_exact = time.perf_counter() - start
    start = time.perf_counter()
    mc, _ = mean_of_draws(vae, _likelihoods(vae, z, library, batch), MC_DRAWS, first_seed=10**6)
    t_mc = time.perf_counter() - start
    n = settings["reference_rows"]
    reference, se = mean_of_draws(
        vae, _likelihoods(vae, z[:n], library[:n], batch[:n]), settings["reference_draws"]
    )
    seen = se > 0
    out = {"dataset": name, "likelihood": likelihood, "values": exact.size}
    for label, estimate in (("exact", exact[:n]), (f"mean of {MC_DRAWS} draws", mc[:n])):
        diff = estimate - reference
        out[f"{label}: mean difference"] = diff.mean()
        out[f"{label}: mean abs difference"] = np.abs(diff).mean()
        out[f"{label}: max abs difference"] = np.abs(diff).max()
        out[f"{label}: mean abs z"] = np.abs(diff[seen] / se[seen]).mean()
    out["reference's mean standard error"] = se.mean()
    out["exact (s)"], out[f"{MC_DRAWS} draws (s)"] = t_exact, t_mc
    out["time ratio (draws / exact)"] = t_mc / t_exact
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="smoke test; numbers meaningless")
    parser.add_argument(
        "--markdown", default=None, help="default: docs/benchmarks/ (--fast: benchmark_out/)"
    )
    args = parser.parse_args(argv)
    settings = SETTINGS["fast" if args.fast else "cpu"]
    began = time.perf_counter()
    datasets = {
        "pbmc68k_reduced (765 genes)": LOADERS["pbmc68k"](0)[0],
        "pbmc3k (2,000 HVGs)": LOADERS["pbmc3k"](0)[0],
    }
    results = []
    for name, adata in datasets.items():
        for likelihood in ("nb", "zinb"):
            results.append(one_row(name, adata, likelihood, settings))
            print(results[-1], flush=True)
    table = pd.DataFrame(results)
    table.index = table.pop("dataset") + ", " + table.pop("likelihood")
    table = table.T
    minutes = (time.perf_counter() - began) / 60
    lines = [
        "# Expected log-normalised counts through scVI (generated by "
        "`benchmarks/expected_counts.py`; do not edit by hand)",
        "",
        "Each row: per value (cell x gene), the exact expectation and the mean of "
        f"{MC_DRAWS} draws (what scbranch averaged before) against a reference, the mean of "
        f"{settings['reference_draws']} draws of counts from the same likelihoods, each "
        "log-normalised by its own total as real cells are "
        f"({settings['reference_rows']} cells). z is a difference over the reference's "
        "standard error: its absolute value averages 0.80 when the difference is the "
        "reference's Monte-Carlo error alone. Times on the same "
        f"{settings['rows']:,} latents (scVI {settings['epochs']} epochs, the cells' own "
        f"latents; the train part of quality.py's split 0), {cpu_threads()}. "
        f"Wall time {minutes:.1f} min.",
        "",
        _md(table.rename_axis("per value")),
        "",
    ]
    write_lines(page_path(args.markdown, "expected_counts", args.fast), lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
