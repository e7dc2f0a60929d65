"""A simulated atlas: negative-binomial counts of cell types on a known three-level tree.

Atlas-scale training and generation are measured on data of a size no real labelled dataset
here has, so the cells are simulated from parameters fitted to real cells: per-type mean
profiles, per-gene dispersions and per-type library sizes. The reference types are placed at
the top of a tree and new types are made below them by perturbing their parent's profile,
so the true hierarchy is known. Cells are made and written a block at a time, so the memory
used does not grow with the number of cells (apart from ``obs``).
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._utils import progress
from ._atlas_parameters import AtlasParameters, _default_parameters, fit_atlas_parameters

logger = logging.getLogger(__name__)

#: cells per random stream: block ``b`` is drawn from ``default_rng([seed, 2, b])``, so a file's
#: content depends on the seed only, not on ``chunk_size`` or ``n_jobs``
_BLOCK = 4096
#: means above which counts are drawn as gamma-Poisson rather than by inverting the CDF
_DIRECT_MEAN = 4.0
_NOTE = (
    "SIMULATED data (scbranch.datasets.simulate_atlas): negative-binomial counts with "
    "parameters fitted to real cells, on a known three-level tree of cell types. Not real cells."
)


# ---------------------------------------------------------------------------- tree
@dataclass
class _Tree:
    leaves: list[str]
    level1: np.ndarray  # reference type of every leaf
    level2: list[str]  # parent of every leaf
    profiles: np.ndarray  # (leaves, genes)
    fractions: np.ndarray
    newick: str


def _split(n: int, parts: int) -> list[int]:
    """``n`` split into ``parts`` sizes differing by at most one, larger first."""
    return [n // parts + (i < n % parts) for i in range(parts)]


def _newick_name(name: str) -> str:
    safe = all(c.isalnum() or c in "_.-" for c in name) and name != ""
    return name if safe else "'" + name.replace("'", "''") + "'"


def _perturb(log_profile: np.ndarray, sd: float, fraction: float, rng) -> np.ndarray:
    """A profile whose ``fraction`` of genes (chosen at random) moves by N(0, sd) in log."""
    n_genes = log_profile.size
    moved = rng.choice(n_genes, size=max(1, round(fraction * n_genes)), replace=False)
    out = log_profile.copy()
    out[moved] += rng.normal(0.0, sd, moved.size)
    return out


def _build_tree(
    params: AtlasParameters,
    n_types: int,
    level2_lfc_sd: float,
    level3_lfc_sd: float,
    perturbed_fraction: float,
    min_type_fraction: float,
    rng: np.random.Generator,
) -> _Tree:
    n_ref = params.n_types
    # leaves per reference type: as even as possible, extra ones to the most frequent types
    rank = np.argsort(-params.type_fractions, kind="stable")
    n_leaves = np.full(n_ref, n_types // n_ref)
    n_leaves[rank[: n_types % n_ref]] += 1
    leaves, level1, level2, profiles, fractions, clades = [], [], [], [], [], []
    for k in range(n_ref):
        m = int(n_leaves[k])
        # about sqrt(m) children with two or more leaves each (when m allows)
        n_children = max(1, min(round(np.sqrt(m)), m // 2))
        sizes = _split(m, n_children)
        child_shares = rng.dirichlet(np.ones(n_children))
        base = np.log(params.profiles[k])
        name1 = str(params.types[k])
        inner = []
        for j, size in enumerate(sizes, start=1):
            name2 = f"{name1}.{j}"
            child = _perturb(base, level2_lfc_sd, perturbed_fraction, rng)
            leaf_shares = rng.dirichlet(np.ones(size))
            names3 = []
            for i in range(1, size + 1):
                leaf = np.exp(_perturb(child, level3_lfc_sd, perturbed_fraction, rng))
                profiles.append(leaf / leaf.sum())
                leaves.append(f"{name2}.{i}")
                names3.append(_newick_name(leaves[-1]))
                level1.append(k)
                level2.append(name2)
            fractions.extend(params.type_fractions[k] * child_shares[j - 1] * leaf_shares)
            inner.append(f"({','.join(names3)}){_newick_name(name2)}")
        clades.append(f"({','.join(inner)}){_newick_name(name1)}")
    fractions = np.asarray(fractions) / np.sum(fractions)
    # every type keeps a minimum share, so that all are present even in small atlases
    fractions = min_type_fraction + (1.0 - n_types * min_type_fraction) * fractions
    return _Tree(
        leaves=leaves,
        level1=np.asarray(level1, dtype=np.int64),
        level2=level2,
        profiles=np.vstack(profiles),
        fractions=fractions / fractions.sum(),
        newick=f"({','.join(clades)});",
    )


def _cells_per_type(fractions: np.ndarray, n_cells: int) -> np.ndarray:
    """Exact numbers of cells (largest remainder), each type at least one."""
    raw = fractions * n_cells
    counts = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: n_cells - counts.sum()]] += 1
    while (counts == 0).any():
        counts[np.argmax(counts)] -= 1
        counts[np.flatnonzero(counts == 0)[0]] += 1
    return counts


# ---------------------------------------------------------------------------- sampling
def _walk(u, pk, cdf, k, theta, q) -> np.ndarray:
    """Smallest count with CDF >= ``u``, going on from count ``k`` (``pk``, ``cdf`` at k).

    Steps are taken for all entries at once, in rounds of growing width, so the few entries
    deep in a heavy tail do not cost a Python loop iteration per count.
    """
    out = np.empty(u.size, dtype=np.float32)
    idx = np.arange(u.size)
    width = 4
    while idx.size:
        kk = k[:, None] + np.arange(1, width + 1, dtype=np.float64)
        pks = pk[:, None] * np.cumprod((kk - 1 + theta[:, None]) / kk * q[:, None], axis=1)
        cdfs = cdf[:, None] + np.cumsum(pks, axis=1)
        n_below = (u[:, None] > cdfs).sum(1)
        # pk == 0: the tail has underflowed (u within rounding of 1): stop there
        done = (n_below < width) | (pks[:, -1] <= 0)
        out[idx[done]] = k[done] + n_below[done] + 1
        keep = ~done
        idx, u, theta, q, k = idx[keep], u[keep], theta[keep], q[keep], k[keep] + width
        pk, cdf = pks[keep, -1], cdfs[keep, -1]
        width = min(2 * width, 64)
    return out


def _nb_csr(ratio: np.ndarray, theta: np.ndarray, rng: np.random.Generator) -> sp.csr_matrix:
    """Negative-binomial counts with means ``ratio * theta`` (``ratio``: float32) as CSR float32.

    Gamma-Poisson draws for every entry cost ~100 ns each; most entries are zero, so instead
    one uniform per entry decides zero or not (against P(0) = (1 + mu/theta)^-theta), and only
    the non-zero entries get a count: by inverting the CDF from the same uniform for small
    means, by gamma-Poisson draws conditioned on being positive for larger ones. Exact in
    distribution up to float32 rounding (~1e-7) of the probabilities; about 2x faster.
    """
    n, n_genes = ratio.shape
    theta32 = theta.astype(np.float32)
    p0 = np.log1p(ratio)
    p0 *= -theta32
    np.exp(p0, out=p0)
    u = rng.random(ratio.shape, dtype=np.float32)
    flat = np.flatnonzero(u > p0)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(flat // n_genes, minlength=n), out=indptr[1:])
    cols = (flat % n_genes).astype(np.int32)
    th = theta32[cols]
    mean = ratio.ravel()[flat]
    mean *= th
    u, p0 = u.ravel()[flat], p0.ravel()[flat]
    del flat
    out = np.empty(mean.size, dtype=np.float32)

    big = np.flatnonzero(mean > _DIRECT_MEAN)
    if big.size:
        shape = theta[cols[big]]
        scale = mean[big] / shape
        x = rng.poisson(rng.standard_gamma(shape) * scale)
        redo = np.flatnonzero(x == 0)
        while redo.size:  # rejection of zeros: P(0) < 0.5 here unless theta is tiny
            x[redo] = rng.poisson(rng.standard_gamma(shape[redo]) * scale[redo])
            redo = redo[x[redo] == 0]
        out[big] = x

    small = np.flatnonzero(mean <= _DIRECT_MEAN)
    if small.size:
        m, t, uu, pk = mean[small], th[small], u[small], p0[small]
        q = m / (m + t)
        cdf = pk.copy()
        x = np.ones(small.size, dtype=np.float32)
        # the first counts for all entries at once (no indexing), the rest by _walk
        for k in range(1, 4):
            pk *= (t + (k - 1)) * q / k
            cdf += pk
            x += uu > cdf
        left = np.flatnonzero(uu > cdf)
        if left.size:
            f64 = [a[left].astype(np.float64) for a in (uu, pk, cdf, t, q)]
            x[left] = _walk(f64[0], f64[1], f64[2], np.full(left.size, 3.0), f64[3], f64[4])
        out[small] = x
    return sp.csr_matrix((out, cols, indptr), shape=(n, n_genes))


def _make_block(
    b: int, seed: int, labels: np.ndarray, tree: _Tree, params: AtlasParameters, scaled
) -> sp.csr_matrix:
    rng = np.random.default_rng([seed, 2, b])
    codes = labels[b * _BLOCK : (b + 1) * _BLOCK]
    ref = tree.level1[codes]
    library = np.exp(rng.normal(params.log_library_mean[ref], params.log_library_sd[ref]))
    ratio = scaled[codes]
    ratio *= library.astype(np.float32)[:, None]
    return _nb_csr(ratio, params.theta, rng)


def _blocks(n_blocks: int, n_jobs: int, make) -> Iterator[sp.csr_matrix]:
    """Blocks in order; with ``n_jobs > 1`` made by threads (numpy releases the GIL)."""
    if n_jobs == 1:
        for b in range(n_blocks):
            yield make(b)
        return
    with ThreadPoolExecutor(max_workers=n_jobs) as pool:
        pending: deque = deque()
        submitted = 0
        try:
            while submitted < n_blocks or pending:
                # at most n_jobs + 1 blocks in memory
                while submitted < n_blocks and len(pending) <= n_jobs:
                    pending.append(pool.submit(make, submitted))
                    submitted += 1
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def _rechunk(blocks: Iterator[sp.csr_matrix], size: int) -> Iterator[sp.csr_matrix]:
    """The rows of ``blocks`` in pieces of ``size`` rows (the last one shorter)."""
    pieces, n_rows = [], 0
    for block in blocks:
        pieces.append(block)
        n_rows += block.shape[0]
        if n_rows < size:
            continue
        # one concatenation per chunk (not per block) keeps the copying linear
        buf = pieces[0] if len(pieces) == 1 else sp.vstack(pieces, format="csr")
        if buf.shape[0] == size:
            pieces, n_rows = [], 0
            yield buf
            continue
        offset = 0
        while n_rows - offset >= size:
            yield buf[offset : offset + size]
            offset += size
        pieces = [buf[offset:]] if offset < n_rows else []
        n_rows -= offset
    if pieces:
        yield pieces[0] if len(pieces) == 1 else sp.vstack(pieces, format="csr")


# ---------------------------------------------------------------------------- public
def simulate_atlas(
    path: str | os.PathLike,
    n_cells: int = 100_000,
    *,
    n_types: int = 60,
    n_genes: int | None = None,
    reference: AnnData | None = None,
    parameters: AtlasParameters | None = None,
    labels_key: str = "cell_type",
    counts_layer: str | None = "counts",
    level2_lfc_sd: float = 1.0,
    level3_lfc_sd: float = 0.7,
    perturbed_fraction: float = 0.1,
    min_type_fraction: float = 0.001,
    seed: int = 0,
    chunk_size: int = 4096,
    n_jobs: int = 1,
    overwrite: bool = False,
    progress_bar: bool = True,
) -> Path:
    """Write a SIMULATED atlas of raw counts on a known hierarchy of cell types to disk.

    The cells are simulated, not measured: negative-binomial counts whose parameters are
    fitted to real cells (by default the 700 PBMCs of :func:`pbmc68k`, 10 types; or
    ``reference``, e.g. pbmc3k; see :func:`fit_atlas_parameters`). The reference types are
    the first level of a three-level tree. Each gets about ``sqrt(m)`` children (level 2),
    where ``m`` is its number of leaves (``n_types`` shared as evenly as possible, the extra
    leaves going to the most frequent types), and each child gets the leaves (level 3, the
    cell types of the atlas). A child's log mean profile is its parent's with a random
    ``perturbed_fraction`` of genes moved by N(0, ``level2_lfc_sd``); a leaf's is its
    parent's moved likewise by N(0, ``level3_lfc_sd``), so siblings are closer than cousins.
    Type frequencies are the reference type's share split among its children and leaves by
    flat Dirichlet draws (long-tailed, with rare types), each raised to at least
    ``min_type_fraction``; every type gets exactly its share of ``n_cells`` (rounded, at
    least one cell) and cells are in random order. A cell's total counts are log-normal,
    with the parameters of its reference type; its counts are negative-binomial with mean
    total x leaf profile and the gene's dispersion.

    Cells are made in blocks of 4,096, each from its own random stream
    (``numpy.random.default_rng([seed, 2, block])``), so the file's content depends on
    ``seed`` only, not on ``chunk_size`` or ``n_jobs``; they are written ``chunk_size`` at
    a time with :class:`~scbranch.io.ChunkedWriter`: memory does not grow with ``n_cells``
    (except ``obs``, a few columns per cell), and the file appears under ``path`` only when
    complete.

    Parameters
    ----------
    path
        Destination: ``.zarr`` writes a zarr store, anything else an ``.h5ad`` file.
    n_cells
        Number of cells (at least ``n_types``).
    n_types
        Number of leaf cell types, at least the number of reference types.
    n_genes
        Number of genes: 2,000 when fitting, the parameters' genes when ``parameters`` is
        given.
    reference
        Real cells to fit the parameters to (raw counts in ``counts_layer``, types in
        ``labels_key``), instead of the default PBMCs.
    parameters
        Parameters fitted already (from :func:`fit_atlas_parameters` or
        :meth:`AtlasParameters.load`), instead of fitting.
    labels_key, counts_layer
        Where ``reference`` holds its cell types and raw counts (`None`: ``.X``).
    level2_lfc_sd, level3_lfc_sd
        Standard deviation of the log-fold changes that make the level-2 types from their
        reference type and the leaves from their level-2 type.
    perturbed_fraction
        Share of the genes changed at each level (drawn anew for every new type).
    min_type_fraction
        Smallest share of cells of any type (before rounding to whole cells).
    seed
        Seed of the tree, the type frequencies, the cells and any made-up genes.
    chunk_size
        Cells per write (memory: about ``chunk_size`` cells' counts).
    n_jobs
        Threads making blocks of cells (the result does not depend on it).
    overwrite
        Replace an existing ``path``; otherwise it raises before doing any work.
    progress_bar
        Show a progress bar over the chunks.

    Returns
    -------
    The path written. Its ``X`` holds the counts (CSR, float32 holding integers; kept in
    ``X`` so that ``anndata.read_h5ad(path, backed="r")`` leaves them on disk); ``obs`` has
    ``cell_type`` (the leaf, categories in tree order), ``level1`` (reference type),
    ``level2`` and ``n_counts``; ``var`` has ``source_gene`` (the real gene a made-up one
    copies), ``made_up`` and ``theta`` (dispersion); ``uns["simulation"]`` has the note that
    the data are simulated, the arguments, ``newick`` (the true tree: root, level-1,
    level-2, leaves, internal nodes named), and the truth per leaf: ``leaves``, ``profiles``
    (expected share of the counts per gene, float32), ``type_fractions``,
    ``log_library_mean`` and ``log_library_sd``.

    Examples
    --------
    >>> import anndata, scbranch as sb
    >>> path = sb.datasets.simulate_atlas(
    ...     "atlas.h5ad", n_cells=500, n_types=20, n_genes=100, progress_bar=False
    ... )
    >>> atlas = anndata.read_h5ad(path, backed="r")
    >>> atlas.shape, atlas.obs["cell_type"].nunique(), atlas.obs["level1"].nunique()
    ((500, 100), 20, 10)
    >>> atlas.obs["cell_type"].cat.categories[0]
    'CD4+/CD25 T Reg.1.1'

    A million cells take a few minutes:

    >>> sb.datasets.simulate_atlas("atlas_1m.h5ad", n_cells=10**6)  # doctest: +SKIP
    """
    from ..io._writer import ChunkedWriter, check_writable

    start = time.perf_counter()
    path = check_writable(path, overwrite)
    n_cells, n_types, chunk_size, n_jobs = map(int, (n_cells, n_types, chunk_size, n_jobs))
    if n_types < 1 or n_cells < n_types:
        raise ValueError(
            f"n_cells={n_cells} must be at least n_types={n_types} (>= 1): every type needs a "
            "cell. Ask for more cells or fewer types."
        )
    if chunk_size < 1 or n_jobs < 1:
        raise ValueError(f"chunk_size and n_jobs must be >= 1, got {chunk_size}, {n_jobs}.")
    if int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}.")
    seed = int(seed)
    if not 0 < perturbed_fraction <= 1:
        raise ValueError(f"perturbed_fraction must be in (0, 1], got {perturbed_fraction}.")
    if level2_lfc_sd < 0 or level3_lfc_sd < 0:
        raise ValueError("level2_lfc_sd and level3_lfc_sd must be >= 0.")
    if not 0 <= min_type_fraction * n_types < 1:
        raise ValueError(
            f"min_type_fraction={min_type_fraction} times n_types={n_types} must be in [0, 1); "
            f"use a min_type_fraction below {1 / n_types:.4g}."
        )
    if reference is not None and parameters is not None:
        raise ValueError("Pass either reference= or parameters=, not both.")
    fit_genes = 2000 if n_genes is None else int(n_genes)
    if parameters is not None:
        if n_genes is not None and int(n_genes) != parameters.n_genes:
            raise ValueError(
                f"n_genes={n_genes} but the parameters have {parameters.n_genes} genes; leave "
                "n_genes out, or fit parameters with that many genes."
            )
        source = "parameters given"
    elif reference is not None:
        parameters = fit_atlas_parameters(
            reference, labels_key, counts_layer, n_genes=fit_genes, seed=seed
        )
        source = f"reference AnnData ({reference.n_obs} cells)"
    else:
        parameters = _default_parameters(fit_genes, seed)
        source = "scbranch.datasets.pbmc68k (700 PBMCs shipped with scanpy)"
    if n_types < parameters.n_types:
        raise ValueError(
            f"n_types={n_types} is smaller than the {parameters.n_types} reference types; every "
            f"reference type needs at least one leaf: pass n_types >= {parameters.n_types}."
        )

    tree = _build_tree(
        parameters, n_types, float(level2_lfc_sd), float(level3_lfc_sd),
        float(perturbed_fraction), float(min_type_fraction), np.random.default_rng([seed, 0]),
    )  # fmt: skip
    per_type = _cells_per_type(tree.fractions, n_cells)
    labels = np.random.default_rng([seed, 1]).permutation(
        np.repeat(np.arange(n_types, dtype=np.int32), per_type)
    )
    scaled = (tree.profiles / parameters.theta).astype(np.float32)
    n_blocks = -(-n_cells // _BLOCK)

    def make(b: int) -> sp.csr_matrix:
        return _make_block(b, seed, labels, tree, parameters, scaled)

    leaves = pd.CategoricalDtype(tree.leaves)
    level1 = pd.CategoricalDtype(list(parameters.types))
    level2 = pd.CategoricalDtype(list(dict.fromkeys(tree.level2)))
    leaf_level1 = parameters.types[tree.level1]
    leaf_level2 = np.asarray(tree.level2, dtype=object)
    leaf_names = np.asarray(tree.leaves, dtype=object)
    made_up = parameters.genes != parameters.source_genes
    var = pd.DataFrame(
        {"source_gene": parameters.source_genes, "made_up": made_up, "theta": parameters.theta},
        index=pd.Index(parameters.genes, dtype=object),
    )
    n_chunks = -(-n_cells // chunk_size)
    wrap = progress("Simulating", progress_bar) or (lambda it: it)
    logger.info(
        "Simulating %d cells of %d types x %d genes (seed %d) into %s.",
        n_cells, n_types, parameters.n_genes, seed, path,
    )  # fmt: skip
    done = 0
    with ChunkedWriter(path, var=var, overwrite=overwrite) as writer:
        chunks = _rechunk(_blocks(n_blocks, n_jobs, make), chunk_size)
        for _ in wrap(range(n_chunks)):
            X = next(chunks)
            codes = labels[done : done + X.shape[0]]
            obs = pd.DataFrame(
                {
                    "cell_type": pd.Categorical(leaf_names[codes], dtype=leaves),
                    "level1": pd.Categorical(leaf_level1[codes], dtype=level1),
                    "level2": pd.Categorical(leaf_level2[codes], dtype=level2),
                    "n_counts": np.asarray(X.sum(axis=1)).ravel().astype(np.int64),
                },
                index=[f"cell{i}" for i in range(done, done + X.shape[0])],
            )
            writer.append(X, obs=obs)
            done += X.shape[0]
        writer.commit(
            uns={
                "simulation": {
                    "note": _NOTE,
                    "reference": source,
                    "seed": seed,
                    "n_cells": n_cells,
                    "n_types": n_types,
                    "n_genes": parameters.n_genes,
                    "level2_lfc_sd": float(level2_lfc_sd),
                    "level3_lfc_sd": float(level3_lfc_sd),
                    "perturbed_fraction": float(perturbed_fraction),
                    "min_type_fraction": float(min_type_fraction),
                    "block_size": _BLOCK,
                    "newick": tree.newick,
                    "leaves": leaf_names,
                    "leaf_level1": leaf_level1.astype(object),
                    "leaf_level2": leaf_level2,
                    "profiles": tree.profiles.astype(np.float32),
                    "type_fractions": tree.fractions,
                    "log_library_mean": parameters.log_library_mean[tree.level1],
                    "log_library_sd": parameters.log_library_sd[tree.level1],
                }
            }
        )
    elapsed = time.perf_counter() - start
    logger.info(
        "Simulated %d cells in %.1f s (%.0f cells/s): %s.",
        n_cells, elapsed, n_cells / max(elapsed, 1e-9), path,
    )  # fmt: skip
    return path
