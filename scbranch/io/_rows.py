"""Read matrices that may live on disk a block of rows at a time.

A matrix here is anything an AnnData holds per cell: a numpy array, a scipy sparse matrix,
or one left on disk (an h5py or zarr array, anndata's backed sparse dataset). Reading a
contiguous block of rows from disk costs about as much as reading one row (measured on a
200,000 x 2,000 sparse .h5ad: 15 ms for 4,096 contiguous rows, 18 ms for 64 scattered ones),
so everything that streams over cells reads blocks, and scattered rows are read in sorted
order and put back in the order asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import scipy.sparse as sp

#: rows per block when streaming over a matrix (sparse 2,000-gene blocks: ~10 MB)
BLOCK_ROWS = 8192


def is_on_disk(m) -> bool:
    """Whether ``m`` is read from disk on access (h5py/zarr array, backed sparse dataset).

    Examples
    --------
    >>> is_on_disk(np.zeros((2, 2)))
    False
    """
    if isinstance(m, np.ndarray) or sp.issparse(m):
        return False
    from anndata.abc import CSCDataset, CSRDataset

    if isinstance(m, CSRDataset | CSCDataset):
        return True
    return type(m).__module__.split(".")[0] in {"h5py", "zarr"}


def n_rows(m) -> int:
    """Number of rows of ``m``."""
    return int(m.shape[0])


def _as_block(block, dtype) -> np.ndarray | sp.csr_matrix:
    if sp.issparse(block):
        return sp.csr_matrix(block, dtype=dtype)
    return np.asarray(block, dtype=dtype)


def read_block(m, start: int, stop: int, dtype=np.float64):
    """Rows ``start:stop`` of ``m`` in memory (sparse stays sparse, as CSR).

    Examples
    --------
    >>> read_block(np.arange(6).reshape(3, 2), 1, 3).tolist()
    [[2.0, 3.0], [4.0, 5.0]]
    """
    check_store_present(m)
    return _as_block(m[start:stop], dtype)


def zarr_store_root(m):
    """The local directory of the zarr store ``m`` is read from, or `None` (not zarr).

    anndata's on-disk sparse datasets hold it as ``.group.store.root``, dense zarr arrays as
    ``.store.root``.

    Examples
    --------
    >>> zarr_store_root(np.zeros((2, 2))) is None
    True
    """
    root = getattr(getattr(getattr(m, "group", None), "store", None), "root", None)
    return root if root is not None else getattr(getattr(m, "store", None), "root", None)


def check_store_present(m) -> None:
    """Raise if ``m`` is read from a zarr store that has gone (moved or deleted).

    zarr answers reads of chunks that are gone with the fill value, so the cells of a removed
    store read as zeros and a model trained on them without an error. An open ``.h5ad`` file
    keeps its data while open, and is not checked.

    Examples
    --------
    >>> check_store_present(np.zeros((2, 2)))  # in memory: nothing to check
    """
    from pathlib import Path

    root = zarr_store_root(m)
    if root is not None and not Path(root).exists():
        raise FileNotFoundError(
            f"The .zarr store {str(root)!r} these cells are read from is gone (moved or "
            "deleted since it was opened); read now, its cells would be zeros. Open it again "
            "with `sb.io.read_backed` and set the model up on it."
        )


def read_rows(m, rows: np.ndarray, dtype=np.float64):
    """Rows ``rows`` of ``m`` (any order, repeats allowed) in memory, read in sorted order.

    Parameters
    ----------
    m
        Matrix in memory (numpy, scipy sparse) or on disk (h5py, zarr, backed sparse).
    rows
        Integer positions of the rows, in the order wanted; repeats allowed.
    dtype
        Data type of the result.

    Returns
    -------
    The rows, in the order of ``rows``: a dense array, or a CSR matrix when ``m`` is sparse.

    Examples
    --------
    >>> read_rows(np.arange(6).reshape(3, 2), np.array([2, 0])).tolist()
    [[4.0, 5.0], [0.0, 1.0]]
    """
    rows = np.asarray(rows, dtype=np.int64)
    if not is_on_disk(m):
        return _as_block(m[rows], dtype)
    check_store_present(m)
    unique, back = np.unique(rows, return_inverse=True)
    block = _as_block(m[unique], dtype)
    return block[back]


def iter_blocks(
    m, block_rows: int = BLOCK_ROWS, dtype=np.float64, transform: Callable | None = None
) -> Iterator[tuple[int, int, np.ndarray | sp.csr_matrix]]:
    """Yield ``(start, stop, rows start:stop)`` over ``m`` in blocks of ``block_rows`` rows.

    ``transform`` (e.g. log-normalisation of counts) is applied to every block.

    Parameters
    ----------
    m
        Matrix in memory (numpy, scipy sparse) or on disk (h5py, zarr, backed sparse).
    block_rows
        Rows per block (the last block may have fewer).
    dtype
        Data type of the blocks read.
    transform
        Function applied to every block (rows in, rows out), or `None`.

    Yields
    ------
    ``(start, stop, block)``: the block's first row, the row after its last, and its rows (a
    dense array, or a CSR matrix when ``m`` is sparse), transformed.

    Examples
    --------
    >>> [(a, b) for a, b, _ in iter_blocks(np.zeros((5, 2)), block_rows=2)]
    [(0, 2), (2, 4), (4, 5)]
    """
    n = n_rows(m)
    for start in range(0, n, block_rows):
        stop = min(n, start + block_rows)
        block = read_block(m, start, stop, dtype)
        yield start, stop, block if transform is None else transform(block)


def column_moments(
    m, block_rows: int = BLOCK_ROWS, transform: Callable | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and (population) variance of ``m``, streamed over blocks.

    Blocks are combined with Chan et al.'s pairwise update, which stays accurate where the
    textbook ``E[x^2] - E[x]^2`` loses digits (large means, small variances).

    Parameters
    ----------
    m
        Matrix in memory (numpy, sparse) or on disk (h5py, zarr, backed); one row or more.
    block_rows
        Rows read per block.
    transform
        Function applied to every block before the moments are taken (e.g. log-normalisation
        of counts), or `None`.

    Returns
    -------
    ``(mean, variance)``, each an array with one value per column.

    Examples
    --------
    >>> x = np.random.default_rng(0).normal(3.0, 2.0, size=(1000, 2))
    >>> mean, var = column_moments(x, block_rows=128)
    >>> bool(np.allclose(mean, x.mean(0)) and np.allclose(var, x.var(0)))
    True
    """
    count = 0
    mean = var_sum = None
    for _, _, block in iter_blocks(m, block_rows, transform=transform):
        k = block.shape[0]
        if sp.issparse(block):
            b_mean = np.asarray(block.mean(0)).ravel()
            b_sq = np.asarray(block.multiply(block).sum(0)).ravel()
            b_m2 = np.maximum(b_sq - k * b_mean**2, 0.0)
        else:
            b_mean = block.mean(0)
            b_m2 = ((block - b_mean) ** 2).sum(0)
        if mean is None:
            count, mean, var_sum = k, b_mean, b_m2
            continue
        total = count + k
        delta = b_mean - mean
        mean = mean + delta * (k / total)
        var_sum = var_sum + b_m2 + delta**2 * (count * k / total)
        count = total
    if mean is None:
        raise ValueError("The matrix has no rows.")
    return mean, var_sum / count


def count_nonfinite(m, block_rows: int = BLOCK_ROWS) -> int:
    """Number of NaN or infinite values of ``m``, streamed over blocks."""
    bad = 0
    for _, _, block in iter_blocks(m, block_rows):
        values = block.data if sp.issparse(block) else block
        bad += int((~np.isfinite(values)).sum())
    return bad


def row_sums(m, block_rows: int = BLOCK_ROWS, transform: Callable | None = None) -> np.ndarray:
    """Per-row sums of ``m`` (e.g. library sizes of counts), streamed over blocks.

    ``transform`` is applied to every block first (e.g. ``expm1`` of log-normalised rows).
    """
    out = np.empty(n_rows(m), dtype=np.float64)
    for start, stop, block in iter_blocks(m, block_rows, transform=transform):
        out[start:stop] = np.asarray(block.sum(1)).ravel()
    return out


class RowMatrix:
    """A cells x features matrix read in blocks of rows, with an optional per-block transform.

    What a model trains on when the data are on disk or change on the way in (raw counts that
    are log-normalised per cell): indexing rows reads them (sorted) and transforms them, and
    :meth:`blocks` streams over all cells, so statistics over every cell never hold the
    whole matrix.

    Parameters
    ----------
    matrix
        Matrix in memory (numpy, scipy sparse) or on disk (h5py, zarr, backed sparse).
    transform
        Applied to every block of rows read (rows of the raw matrix in, rows out).
    block_rows
        Rows per block when streaming.
    n_features
        Features of a transformed row when the transform changes their number (it selects
        columns); default: the matrix's.

    Examples
    --------
    >>> m = RowMatrix(np.arange(6.0).reshape(3, 2), transform=lambda b: 2 * b)
    >>> m[np.array([2, 0])].tolist(), m.shape
    ([[8.0, 10.0], [0.0, 2.0]], (3, 2))
    """

    def __init__(
        self,
        matrix,
        transform: Callable | None = None,
        block_rows: int = BLOCK_ROWS,
        n_features: int | None = None,
    ):
        self.matrix = matrix
        self.transform = transform
        self.block_rows = int(block_rows)
        self.n_features = int(matrix.shape[1] if n_features is None else n_features)

    @property
    def shape(self) -> tuple[int, int]:
        """``(cells, features)``."""
        return int(self.matrix.shape[0]), self.n_features

    @property
    def on_disk(self) -> bool:
        """Whether rows are read from disk."""
        return is_on_disk(self.matrix)

    def _apply(self, block):
        return block if self.transform is None else self.transform(block)

    def __getitem__(self, rows):
        if isinstance(rows, slice):
            start, stop, step = rows.indices(self.shape[0])
            if step == 1:
                return self._apply(read_block(self.matrix, start, stop))
            rows = np.arange(start, stop, step)
        return self._apply(read_rows(self.matrix, np.asarray(rows)))

    def blocks(self, block_rows: int | None = None):
        """Yield ``(start, stop, rows)`` over all cells (transformed)."""
        return iter_blocks(self.matrix, block_rows or self.block_rows, transform=self.transform)

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-feature mean and variance over all cells (streamed)."""
        return column_moments(self.matrix, self.block_rows, transform=self.transform)


def is_streamed(m) -> bool:
    """Whether statistics of ``m`` must be streamed over blocks (on disk or a RowMatrix)."""
    return isinstance(m, RowMatrix) or is_on_disk(m)


def moments(m) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and variance of a streamed matrix (see :func:`is_streamed`)."""
    return m.moments() if isinstance(m, RowMatrix) else column_moments(m)


def row_blocks(m, block_rows: int = BLOCK_ROWS):
    """Yield ``(start, stop, rows)`` over all cells of ``m``, transformed if a RowMatrix.

    Examples
    --------
    >>> [(a, b) for a, b, _ in row_blocks(np.zeros((3, 2)), block_rows=2)]
    [(0, 2), (2, 3)]
    """
    if isinstance(m, RowMatrix):
        return m.blocks(block_rows)
    return iter_blocks(m, block_rows)
