"""Write an AnnData to ``.h5ad`` or ``.zarr`` a block of rows at a time.

Atlas-sized outputs (generated cells, simulated atlases) do not fit in memory as one AnnData,
so they are written as they are made: sparse matrices grow with anndata's
``sparse_dataset(...).append``, dense ones are resized in place, and ``obs`` (a few columns per
cell) is kept in memory and written last. Everything goes to a hidden temporary name next to
the destination and is renamed to it only when complete, so an interrupted or failed write
never leaves a half-written file under the name the user asked for (and never destroys the
file that was there).
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

logger = logging.getLogger(__name__)

#: suffixes the writer knows; anything else is written as ``.h5ad``
ZARR_SUFFIXES = (".zarr",)
_DENSE_ATTRS = {"encoding-type": "array", "encoding-version": "0.2.0"}


def is_zarr_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a zarr store (by its suffix).

    Parameters
    ----------
    path
        File or store name; it need not exist.

    Returns
    -------
    `True` when the suffix is ``.zarr``, else `False` (written as ``.h5ad``).

    Examples
    --------
    >>> is_zarr_path("cells.zarr"), is_zarr_path("cells.h5ad"), is_zarr_path("cells.ZARR")
    (True, False, True)
    """
    return Path(path).suffix.lower() in ZARR_SUFFIXES  # cells.ZARR is a store too


def check_writable(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing ``path`` unless ``overwrite``, and a destination that cannot be made.

    Nothing is written or removed.

    Parameters
    ----------
    path
        Destination file or store.
    overwrite
        Accept an existing ``path`` (otherwise a `FileExistsError`).

    Returns
    -------
    ``path`` as a :class:`~pathlib.Path`.

    Raises
    ------
    FileExistsError
        ``path`` exists and ``overwrite`` is `False`.
    NotADirectoryError
        The parent of ``path`` is a file.

    Examples
    --------
    >>> check_writable("new_file.h5ad", overwrite=False).name
    'new_file.h5ad'
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{str(path)!r} already exists; choose another name or pass overwrite=True to "
            "replace it."
        )
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise NotADirectoryError(f"Cannot write {str(path)!r}: {str(parent)!r} is a file.")
    return path


def _replace(tmp: Path, path: Path) -> None:
    """Move the finished ``tmp`` to ``path``; a replaced store is deleted only afterwards."""
    if path.is_dir() and not path.is_symlink():
        trash = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(path, trash)
        os.replace(tmp, path)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        if tmp.is_dir() and path.exists():
            path.unlink()
        os.replace(tmp, path)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class ChunkedWriter:
    """Write cells to an ``.h5ad`` file or a ``.zarr`` store in blocks of rows.

    Every block brings the same fields (``X``, ``layers``, ``obsm``: each sparse or dense, as
    in the first block) and its ``obs`` rows. The file appears under ``path`` only at
    ``commit()``; used as a context manager, an exception (or
    Ctrl-C) inside the block removes the temporary file and leaves ``path`` as it was.

    Parameters
    ----------
    path
        Destination; ``.zarr`` writes a zarr store, anything else an ``.h5ad`` file.
    var
        Gene annotation (index: gene names) of ``X`` and the layers, or `None` when the cells
        carry no genes (``X`` is `None`).
    overwrite
        Replace an existing ``path`` (only once the new one is complete).

    Examples
    --------
    >>> import scipy.sparse as sp, pandas as pd
    >>> var = pd.DataFrame(index=["g0", "g1"])
    >>> with ChunkedWriter("cells.h5ad", var=var, overwrite=True) as writer:
    ...     for start in (0, 2):
    ...         obs = pd.DataFrame(index=[f"cell{start}", f"cell{start + 1}"])
    ...         writer.append(sp.csr_matrix(np.eye(2, dtype=np.float32)), obs=obs)
    >>> import anndata; anndata.read_h5ad("cells.h5ad").shape
    (4, 2)
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        var: pd.DataFrame | None = None,
        overwrite: bool = False,
    ):
        self.path = check_writable(path, overwrite)
        self.zarr = is_zarr_path(self.path)
        self.var = var
        self.tmp = self.path.with_name(f".{self.path.name}.partial-{uuid.uuid4().hex[:8]}")
        self.n_obs = 0
        self._obs: list[pd.DataFrame] = []
        self._kinds: dict[str, bool] | None = None  # element path -> is sparse
        self._store = None
        self._done = False
        self._aborting = False

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> ChunkedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.commit()

    # ------------------------------------------------------------------ writing
    def append(
        self,
        X=None,
        *,
        obs: pd.DataFrame,
        layers: Mapping | None = None,
        obsm: Mapping | None = None,
    ) -> None:
        """Add a block of ``len(obs)`` cells.

        Parameters
        ----------
        X
            Expression of the block (sparse or dense), or `None`.
        obs
            Annotation of the block's cells (index: their names).
        layers, obsm
            Further per-cell matrices, as in :class:`~anndata.AnnData`.
        """
        if self._done:
            raise RuntimeError("This writer is closed; open a new one to write another file.")
        layers, obsm = dict(layers or {}), dict(obsm or {})
        elements = {"X": X} if X is not None else {}
        elements |= {f"layers/{k}": v for k, v in layers.items()}
        elements |= {f"obsm/{k}": v for k, v in obsm.items()}
        n = len(obs)
        for name, m in elements.items():
            if m.shape[0] != n:
                raise ValueError(f"{name} has {m.shape[0]} rows but obs has {n}.")
        kinds = {name: sp.issparse(m) for name, m in elements.items()}
        if self._kinds is None:
            self._start(X, obs, layers, obsm)
            self._kinds = kinds
        else:
            if kinds != self._kinds:
                raise ValueError(
                    f"Every block must bring the same fields as the first: {self._kinds} "
                    f"(name -> sparse), got {kinds}."
                )
            for name, m in elements.items():
                self._grow(name, m)
        self._obs.append(obs)
        self.n_obs += n

    def _start(self, X, obs, layers, obsm) -> None:
        """Write the first block as a complete AnnData, then make its dense arrays growable."""
        var = self.var if self.var is not None else None
        first = AnnData(X=X, obs=obs, var=var, layers=layers or None, obsm=obsm or None)
        if self.zarr:
            import zarr

            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*zarr v2.*", category=UserWarning)
                first.write_zarr(self.tmp)
            # anndata consolidates a store's metadata; edit the groups themselves and
            # consolidate again at commit
            self._store = zarr.open_group(str(self.tmp), mode="r+", use_consolidated=False)
        else:
            import h5py

            first.write_h5ad(self.tmp)
            self._store = h5py.File(self.tmp, "r+")
            # h5py datasets need a maximum shape to grow: rewrite the dense ones with one
            dense = ["X"] if X is not None and not sp.issparse(X) else []
            dense += [f"layers/{k}" for k, v in layers.items() if not sp.issparse(v)]
            dense += [f"obsm/{k}" for k, v in obsm.items() if not sp.issparse(v)]
            for name in dense:
                data = np.asarray(self._store[name])
                del self._store[name]
                ds = self._store.create_dataset(
                    name, data=data, maxshape=(None, *data.shape[1:]), chunks=True
                )
                ds.attrs.update(_DENSE_ATTRS)

    def _grow(self, name: str, m) -> None:
        from anndata.io import sparse_dataset

        node = self._store[name]
        if sp.issparse(m):
            target = sparse_dataset(node)
            m = sp.csr_matrix(m) if target.format == "csr" else sp.csc_matrix(m)
            target.append(m.astype(target.dtype, copy=False))
            return
        m = np.asarray(m, dtype=node.dtype)
        if m.shape[1:] != node.shape[1:]:
            raise ValueError(f"{name} has shape {m.shape[1:]} per row, the file {node.shape[1:]}.")
        start = node.shape[0]
        node.resize((start + m.shape[0], *node.shape[1:]))
        node[start:] = m

    def commit(self, uns: Mapping | None = None) -> Path:
        """Write ``obs`` (and ``uns``), close the file and move it to its name.

        Returns
        -------
        The path written.
        """
        from anndata.io import write_elem

        if self._done:
            raise RuntimeError("This writer is already closed.")
        if self._store is None:
            raise ValueError("Nothing was written: append at least one block of cells.")
        try:
            obs = pd.concat(self._obs) if len(self._obs) > 1 else self._obs[0]
            if not obs.index.is_unique:
                raise ValueError("The cells' names (obs index) are not unique across blocks.")
            del self._store["obs"]
            write_elem(self._store, "obs", obs)
            if uns:
                del self._store["uns"]
                write_elem(self._store, "uns", dict(uns))
            self._close_store()
            _replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._done = True
        logger.info("Wrote %d cells to %s.", self.n_obs, self.path)
        return self.path

    def _close_store(self) -> None:
        if self._store is not None and self.zarr and self.tmp.exists() and not self._aborting:
            import zarr

            zarr.consolidate_metadata(str(self.tmp))
        elif self._store is not None and not self.zarr:
            self._store.close()
        self._store = None

    def abort(self) -> None:
        """Discard everything written so far (the destination is left as it was)."""
        self._aborting = True
        try:
            self._close_store()
        finally:
            _remove(self.tmp)
            self._done = True
