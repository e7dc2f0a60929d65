"""Generation in blocks of cells: in memory or straight to disk, on one device or several.

A request ``{class index: n}`` is cut into ``K = ceil(total / block_rows)`` blocks. Every
class's count is spread evenly over the blocks, so each block holds (almost) every requested
class and the fan-out (the reverse path shared above branch points) still pays off inside a
block. Block ``k`` is sampled and decoded with its own seed (:func:`block_seed`; block 0 uses
the call's seed), so it is fully determined by (model, request, seed, ``block_rows``): whether
the blocks are kept in memory or written to disk, on one device or several, the cells are the
same. A request that fits in one block is exactly the single call scbranch always made.

Memory: a block is sampled, decoded, written (``out=``) and dropped before the next one is
decoded; only the cells' annotation (``obs``, a few small columns per cell) is kept until the
file is complete. ``block_rows`` depends on the model only (never on ``counts`` or other
options), so asking for counts does not change the latent of a seed.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import logging
import math
import os
import queue
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from .._keys import Key
from ..io import ChunkedWriter, check_writable, is_zarr_path
from ..io._backed import backing_paths
from ._calibration import TypeCalibration, calibrated
from ._output import generated_block, generation_params, requested_nodes, uns_record

if TYPE_CHECKING:
    from ..module import BranchedDiffusionModule
    from ..module._sampling import SampleResult
    from ._model import BranchedDiffusion
    from ._spaces import Space

logger = logging.getLogger(__name__)

#: memory a block may use while it is sampled and decoded (with counts), in bytes
BLOCK_BYTES = 256 * 2**20
#: bounds of the default number of cells per block
MIN_BLOCK_ROWS = 1_024
MAX_BLOCK_ROWS = 65_536
#: second word of a block's seed sequence (any constant: it separates block seeds from the
#: sampler's per-branch streams, which use 0 and 1 there)
_BLOCK_STREAM = 0xB10C


def default_block_rows(space: Space) -> int:
    """Cells per block: what fits in :data:`BLOCK_BYTES` when decoding with counts.

    Derived from the model alone (its dimension and genes), never from a call's options, so
    that ``counts=True`` does not change how a request is cut (nor, therefore, its cells).

    Examples
    --------
    >>> from scbranch.model import PcaSpace
    >>> default_block_rows(PcaSpace(obsm_key="X_pca", n_dims=50))  # latent only: the maximum
    65536
    """
    from ._output import _SAMPLER_BYTES

    options = {"counts": True, "residual_noise": True, "batch": None}
    per_cell = space.n_input * _SAMPLER_BYTES + space.bytes_per_cell(options)
    rows = BLOCK_BYTES // max(int(per_cell), 1)
    return int(min(max(rows, MIN_BLOCK_ROWS), MAX_BLOCK_ROWS))


def check_block_size(block_size: int | None) -> int | None:
    """``block_size`` as an int, checked (`None` stays `None`: the model's default)."""
    if block_size is None:
        return None
    if isinstance(block_size, bool) or int(block_size) != block_size or int(block_size) < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}.")
    return int(block_size)


def check_output(out: str | os.PathLike, overwrite: bool, *, reading: Iterable = ()) -> Path:
    """``out`` as a path that may be written (before any work), or the error saying why not.

    An existing ``out`` needs ``overwrite``; a directory is replaced only by a zarr store
    (never a folder of other files by an ``.h5ad`` file); the file or store that the data in
    ``reading`` (the model's cells, anchors; a model also names the file it was trained from)
    are read from is never replaced, ``overwrite``
    or not; a name that ends in neither ``.h5ad`` nor ``.zarr`` is written as ``.h5ad`` with
    a warning.

    Examples
    --------
    >>> check_output("cells.zarr", overwrite=False).suffix
    '.zarr'
    """
    path = check_writable(out, overwrite)
    if path.is_dir() and not is_zarr_path(path):
        raise IsADirectoryError(
            f"{str(path)!r} is a directory; give a file name ending in .h5ad, or a zarr store "
            "ending in .zarr."
        )
    if path.is_dir() and not any((path / marker).exists() for marker in (".zgroup", "zarr.json")):
        # a folder named like a store (notes.zarr/ of the user's files) is not replaced
        raise IsADirectoryError(
            f"{str(path)!r} is a directory but not a zarr store (no .zgroup or zarr.json); "
            "scbranch replaces only stores it could have written. Choose another name."
        )
    if path.resolve() in backing_paths(*reading):
        raise ValueError(
            f"{str(path)!r} holds the cells the model is reading or was trained from; writing "
            "generated cells there would destroy them, even with overwrite=True. Choose "
            "another name."
        )
    if path.suffix.lower() not in (".h5ad", ".zarr"):
        logger.warning("Writing an .h5ad file to %s, whose name does not end in .h5ad.", path)
    return path


def plan_blocks(requested: Mapping[int, int], block_rows: int) -> list[dict[int, int]]:
    """Cut ``requested`` (cells per class index) into blocks of at most ``block_rows`` cells.

    ``K = ceil(total / block_rows)`` blocks; each class gets ``n // K`` cells in every block
    and its remainder one cell per block, the remainders of successive classes continuing
    where the previous class's stopped (round robin): block sizes then differ by at most one,
    so none exceeds ``block_rows``. Classes keep the request's order inside a block. One block
    is the request itself.

    Examples
    --------
    >>> plan_blocks({0: 5, 1: 3}, 10)
    [{0: 5, 1: 3}]
    >>> plan_blocks({0: 5, 1: 3}, 3)
    [{0: 2, 1: 1}, {0: 2, 1: 1}, {0: 1, 1: 1}]
    """
    total = sum(int(n) for n in requested.values())
    n_blocks = max(1, math.ceil(total / int(block_rows)))
    if n_blocks == 1:
        return [dict(requested)]
    blocks: list[dict[int, int]] = [{} for _ in range(n_blocks)]
    cursor = 0  # block that receives the next remainder cell
    for c, n in requested.items():
        base, extra = divmod(int(n), n_blocks)
        for k in range(n_blocks):
            # block k gets an extra cell if it lies in [cursor, cursor + extra) cyclically
            share = base + int((k - cursor) % n_blocks < extra)
            if share:
                blocks[k][c] = share
        cursor = (cursor + extra) % n_blocks
    return blocks


def block_seed(seed: int, k: int) -> int:
    """Seed of block ``k`` of a call with ``seed``: the seed itself for block 0.

    Examples
    --------
    >>> block_seed(7, 0)
    7
    >>> block_seed(7, 1) != block_seed(7, 2) != 7
    True
    """
    if k == 0:
        return int(seed)
    state = np.random.SeedSequence([int(seed) % 2**32, _BLOCK_STREAM, int(k)])
    return int(state.generate_state(1)[0])


def block_origins(
    origins: Mapping[int, list[tuple[str, int]]], plan: Sequence[Mapping[int, int]]
) -> list[dict[int, list[tuple[str, int]]]]:
    """``origins`` (which request each class's cells answer) cut along the blocks of ``plan``.

    A class's cells answer its requests in order (as :func:`requested_nodes` assigns them);
    block ``k`` gets the next ``plan[k][c]`` of them.

    Examples
    --------
    >>> block_origins({0: [("A", 2), ("node", 3)]}, [{0: 3}, {0: 2}])
    [{0: [('A', 2), ('node', 1)]}, {0: [('node', 2)]}]
    """
    out: list[dict[int, list[tuple[str, int]]]] = [{} for _ in plan]
    for c, parts in origins.items():
        runs = collections.deque([name, int(n)] for name, n in parts if int(n) > 0)
        for k, counts in enumerate(plan):
            need = int(counts.get(c, 0))
            taken: list[tuple[str, int]] = []
            while need > 0 and runs:
                name, left = runs[0]
                n = min(need, left)
                taken.append((name, n))
                need -= n
                if n == left:
                    runs.popleft()
                else:
                    runs[0][1] = left - n
            out[k][c] = taken
    return out


def requested_node_categories(
    classes: Sequence[str], origins: Mapping[int, list[tuple[str, int]]]
) -> list[str] | None:
    """Categories of ``obs['scbranch_requested_node']``, or `None` when no node was asked for.

    Sorted names that answer at least one cell: what ``pd.Categorical`` infers from the
    column of a whole request, fixed here so that every block has the same categories.
    """
    if all(name in classes for parts in origins.values() for name, _ in parts):
        return None
    return sorted({name for parts in origins.values() for name, n in parts if int(n) > 0})


class StepBar:
    """One progress bar over the sampler steps of every block (thread-safe).

    :meth:`wrap` is what the sampler takes as ``progress=`` (a wrapper of its step
    iterator); each block's steps advance the same bar.

    Examples
    --------
    >>> bar = StepBar(4, enabled=False)
    >>> list(bar.wrap(range(2))), bar.wrap is not None
    ([0, 1], True)
    >>> bar.close()
    """

    def __init__(self, total: int, *, description: str = "Sampling", enabled: bool = True):
        self._bar = None
        if enabled:
            from scvi.utils import track

            # scvi-tools' tqdm bar (its style and notebook fixes), advanced by hand
            self._bar = track(range(int(total)), description=description, style="tqdm")
        self._lock = threading.Lock()

    @property
    def progress(self) -> Callable[[Iterable], Iterable] | None:
        """The wrapper to pass as ``progress=``, or `None` without a bar."""
        return None if self._bar is None else self.wrap

    def wrap(self, steps: Iterable) -> Iterator:
        """Yield ``steps``, advancing the bar after each."""
        for step in steps:
            yield step
            if self._bar is not None:
                with self._lock:
                    self._bar.update(1)

    def close(self) -> None:
        """Close the bar."""
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> StepBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def sample_blocks(
    module: BranchedDiffusionModule,
    plan: Sequence[Mapping[int, int]],
    seeds: Sequence[int],
    *,
    devices: Sequence[torch.device] | None = None,
    progress: Callable | None = None,
    **options,
) -> Iterator[SampleResult]:
    """Sample the blocks of ``plan`` (block ``k`` with ``seeds[k]``), yielded in block order.

    Without ``devices`` the blocks run one after another on the module's device. With
    ``devices`` each device gets a copy of the module and a thread; blocks go to whichever
    device is free, at most two per device are ahead of the consumer (memory stays bounded),
    and results come back in block order. Every block's noise comes from its own seeded
    generators, so the cells do not depend on which device sampled which block (up to float
    rounding between device types). torch releases the GIL in its kernels, so the threads
    run in parallel.

    ``options`` go to :meth:`~scbranch.module.BranchedDiffusionModule.sample_cells`.
    """
    if not devices:
        for counts, seed in zip(plan, seeds, strict=True):
            yield module.sample_cells(counts, seed=seed, progress=progress, **options)
        return
    replicas: queue.SimpleQueue = queue.SimpleQueue()
    for device in devices:
        replicas.put(copy.deepcopy(module).to(device))

    def run(k: int) -> SampleResult:
        replica = replicas.get()  # one per worker thread: always one free
        try:
            return replica.sample_cells(plan[k], seed=seeds[k], progress=progress, **options)
        finally:
            replicas.put(replica)

    pool = ThreadPoolExecutor(max_workers=len(devices), thread_name_prefix="scbranch-block")
    pending: collections.deque = collections.deque()
    window = 2 * len(devices)
    done = False
    try:
        k = 0
        while pending or k < len(plan):
            while k < len(plan) and len(pending) < window:
                pending.append(pool.submit(run, k))
                k += 1
            yield pending.popleft().result()
        done = True
    finally:
        # on an error (or Ctrl-C) drop the blocks not started; running ones finish on their own
        pool.shutdown(wait=done, cancel_futures=not done)


@contextlib.contextmanager
def interrupts_noted() -> Iterator[list[int]]:
    """Note every Ctrl-C (and still raise it), so that one a library swallowed is not lost.

    h5py runs writes in C and may catch the KeyboardInterrupt raised in its callbacks: the
    block "succeeds" and the file would be completed although the user stopped the run. The
    caller checks the list before committing; an error raised after a noted Ctrl-C becomes
    the KeyboardInterrupt it follows from. Only Python's default handler is replaced, and
    only in the main thread (signals are delivered there).
    """
    noted: list[int] = []
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield noted
        return

    def handler(signum, frame):
        noted.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield noted
    except Exception as err:
        if noted:  # an error that followed a swallowed Ctrl-C (e.g. a half-written block)
            raise KeyboardInterrupt from err
        raise
    finally:
        signal.signal(signal.SIGINT, previous)


def concat_blocks(blocks: Sequence[AnnData]) -> AnnData:
    """One AnnData of blocks with the same fields (no ``uns``): rows in block order.

    The blocks are emptied as their matrices are copied into the result, so the cells are
    held about once at the peak, not twice (all blocks, then their concatenation).
    """
    if len(blocks) == 1:
        return blocks[0]
    first = blocks[0]
    x = None
    if first.X is not None:
        parts = [b.X for b in blocks]
        for b in blocks:
            b.X = None
        x = _stack_releasing(parts)
    layers, obsm = {}, {}
    for field, out in ((lambda b: b.layers, layers), (lambda b: b.obsm, obsm)):
        for key in list(field(first)):
            parts = [field(b).pop(key) for b in blocks]
            out[key] = _stack_releasing(parts)
    obs = pd.concat([b.obs for b in blocks])
    return AnnData(X=x, obs=obs, var=first.var, obsm=obsm or None, layers=layers or None)


def _stack_releasing(parts: list):
    """Row blocks stacked into one dense or CSR matrix, each block released once copied.

    The same matrix as ``np.concatenate`` / ``sp.vstack(format="csr")``; ``parts`` ends empty.
    """
    n = sum(p.shape[0] for p in parts)
    if sp.issparse(parts[0]):
        parts[:] = [sp.csr_matrix(p) for p in parts]
        nnz = sum(p.nnz for p in parts)
        index = np.int32 if max(nnz, n, parts[0].shape[1]) < 2**31 else np.int64
        data = np.empty(nnz, dtype=np.result_type(*(p.dtype for p in parts)))
        indices, indptr = np.empty(nnz, dtype=index), np.empty(n + 1, dtype=index)
        row = pos = 0
        while parts:
            p = parts.pop(0)
            m, k = p.shape[0], p.nnz
            data[pos : pos + k], indices[pos : pos + k] = p.data, p.indices
            indptr[row : row + m] = p.indptr[:-1] + pos
            row, pos = row + m, pos + k
        indptr[n] = nnz
        return sp.csr_matrix((data, indices, indptr), shape=(n, p.shape[1]))
    out = np.empty((n, *parts[0].shape[1:]), dtype=np.result_type(*parts))
    row = 0
    while parts:
        p = np.asarray(parts.pop(0))
        out[row : row + len(p)] = p
        row += len(p)
    return out


def write_anndata(adata: AnnData, out: Path, overwrite: bool) -> Path:
    """Write an in-memory AnnData (trajectories) through the chunked writer, in one block."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with (
        interrupts_noted() as noted,
        ChunkedWriter(
            out, var=adata.var if adata.X is not None else None, overwrite=overwrite
        ) as writer,
    ):
        writer.append(adata.X, obs=adata.obs, layers=dict(adata.layers), obsm=dict(adata.obsm))
        if noted:
            raise KeyboardInterrupt
        return writer.commit(uns=dict(adata.uns))


@dataclass
class _Cost:
    """Network calls of all blocks (what :func:`generation_params` reads from a result)."""

    n_network_calls: int = 0
    n_row_evaluations: int = 0


def generate_blocks(
    model: BranchedDiffusion,
    requested: dict[int, int],
    origins: dict[int, list[tuple[str, int]]],
    *,
    options: Mapping,
    seed: int,
    block_rows: int,
    sample_options: Mapping,
    settings: Mapping,
    out: Path | None = None,
    overwrite: bool = False,
    devices: Sequence[torch.device] | None = None,
    progress_bar: bool = True,
    calibrations: Mapping[int, TypeCalibration] | None = None,
) -> AnnData | Path:
    """Generate the cells of ``requested`` block by block (see the module docstring).

    Parameters
    ----------
    model
        The trained model.
    requested, origins
        Cells per class index and the requests they answer (:func:`requested_cells`).
    options
        Resolved ``counts``, ``batch`` and ``residual_noise`` (the space's decoding options).
    seed
        The call's seed; block ``k`` uses :func:`block_seed`.
    block_rows
        At most this many cells per block.
    sample_options
        ``solver``, ``n_steps``, ``share``, ``spacing``, ``batch_size`` of the sampler.
    settings
        Further entries of ``uns['scbranch']['params']`` (solver, seed, ...).
    out
        Write to this ``.h5ad`` file or ``.zarr`` store instead of returning an AnnData.
    overwrite
        Replace an existing ``out`` (only once the new one is complete).
    devices
        Devices to spread the blocks over (see :func:`sample_blocks`).
    progress_bar
        Show one progress bar over the steps of all blocks.
    calibrations
        Per type, the spread calibration applied to its sampled cells before they are
        decoded (:mod:`scbranch.model._calibration`); `None`: the cells as sampled.

    Returns
    -------
    The AnnData (``out=None``), or the path written.
    """
    plan = plan_blocks(requested, block_rows)
    seeds = [block_seed(seed, k) for k in range(len(plan))]
    pieces = block_origins(origins, plan)
    categories = requested_node_categories(model.classes, origins)
    cost = _Cost()
    kept: list[AnnData] = []
    n_steps = int(sample_options["n_steps"])
    description = "Sampling" if len(plan) == 1 else f"Sampling {len(plan)} blocks"
    decoded = False
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(
            StepBar(len(plan) * n_steps, description=description, enabled=progress_bar)
        )
        noted = stack.enter_context(interrupts_noted()) if out is not None else []
        results = stack.enter_context(
            contextlib.closing(
                sample_blocks(
                    model.module,
                    plan,
                    seeds,
                    devices=devices,
                    progress=bar.progress,
                    **sample_options,
                )
            )
        )
        writer = None
        start = 0
        for k, res in enumerate(results):
            cost.n_network_calls += res.n_network_calls
            cost.n_row_evaluations += res.n_row_evaluations
            codes = res.labels.cpu().numpy()
            z = res.x.float().cpu().numpy()
            del res  # the sampler's tensors (on the device) go before decoding
            if calibrations is not None:
                z = calibrated(z, codes, calibrations)
            block = generated_block(model, z, codes, options, seeds[k], start=start)
            if categories is not None:
                block.obs[Key.obs.REQUESTED_NODE] = pd.Categorical(
                    requested_nodes(codes, pieces[k]), categories=categories
                )
            start += block.n_obs
            decoded = block.X is not None
            if out is None:
                kept.append(block)
                continue
            if writer is None:  # the genes are known once the first block is decoded
                out.parent.mkdir(parents=True, exist_ok=True)
                var = block.var if block.X is not None else None
                writer = stack.enter_context(ChunkedWriter(out, var=var, overwrite=overwrite))
            writer.append(block.X, obs=block.obs, layers=dict(block.layers), obsm=dict(block.obsm))
            del block
        bar.close()  # before the file is completed (and logged)
        params = generation_params(
            model.classes, requested, cost, options,
            **settings, block_rows=int(block_rows), n_blocks=len(plan),
        )  # fmt: skip
        record = uns_record(model, params, decoded)
        if out is None:
            gen = concat_blocks(kept)
            gen.uns[Key.uns.GENERATED] = record
            return gen
        if noted:  # a Ctrl-C that a library swallowed: do not complete the file
            raise KeyboardInterrupt
        return writer.commit(uns={Key.uns.GENERATED: record})
