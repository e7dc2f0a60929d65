"""Open an ``.h5ad`` file or an AnnData ``.zarr`` store with its expression left on disk."""

from __future__ import annotations

import os
from pathlib import Path

from anndata import AnnData

from ._rows import zarr_store_root
from ._writer import is_zarr_path


def read_backed(path: str | os.PathLike) -> AnnData:
    """Open cells whose expression stays on disk; everything else is read into memory.

    ``.h5ad`` files open as :func:`anndata.read_h5ad` with ``backed="r"`` (read-only: scbranch
    never writes into them). ``.zarr`` stores open with ``.X`` (and sparse layers) as
    anndata's on-disk sparse datasets. ``obs``, ``var``, ``obsm``, ``varm`` (the PCA's
    loadings), ``obsp``, ``varp`` and ``uns`` are read into memory: a latent of a million cells
    is small, the expression matrix is not (``raw`` is not read). Note that
    anndata reads an ``.h5ad`` file's layers into memory even in backed mode: keep an atlas's
    counts in ``.X`` (and train on them with ``setup_anndata(..., target_sum=1e4)``).

    Parameters
    ----------
    path
        An ``.h5ad`` file or a ``.zarr`` store written by anndata.

    Returns
    -------
    The cells, with ``.X`` on disk.

    Examples
    --------
    >>> import scbranch as sb
    >>> path = sb.datasets.simulate_atlas("atlas.h5ad", n_cells=2_000)  # doctest: +SKIP
    >>> adata = sb.io.read_backed(path)  # doctest: +SKIP
    >>> sb.BranchedDiffusion.setup_anndata(  # doctest: +SKIP
    ...     adata, labels_key="cell_type", target_sum=1e4
    ... )
    """
    import anndata

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No such .h5ad file or .zarr store: {str(path)!r}.")
    if not is_zarr_path(path):
        try:
            return anndata.read_h5ad(path, backed="r")
        except OSError as err:
            raise ValueError(f"Could not read {str(path)!r} as an .h5ad file: {err}") from err
    import zarr
    from anndata.io import read_elem, sparse_dataset

    group = zarr.open_group(str(path), mode="r")

    def on_disk(node):
        kind = node.attrs.get("encoding-type", "")
        return sparse_dataset(node) if kind in ("csr_matrix", "csc_matrix") else node

    def read(key):
        return read_elem(group[key]) if key in group else None

    layers = group["layers"] if "layers" in group else {}
    # everything but the expression in memory, as read_h5ad(backed="r") does: varm holds the
    # PCA loadings a model decodes its PCA with (left out, its cells had no genes)
    return AnnData(
        X=on_disk(group["X"]) if "X" in group else None,
        obs=read("obs"),
        var=read("var"),
        obsm=read("obsm"),
        varm=read("varm"),
        obsp=read("obsp"),
        varp=read("varp"),
        uns=read("uns"),
        layers={k: on_disk(layers[k]) for k in layers},
    )


def backing_paths(*datasets: AnnData | None) -> set[Path]:
    """The files and stores that the expression of ``datasets`` is read from (resolved).

    A backed ``.h5ad`` file (``adata.filename``) and the ``.zarr`` stores behind on-disk
    matrices (:func:`read_backed`). Writing generated cells over one of them would destroy the
    cells a model is reading, so the writers refuse them even with ``overwrite=True``.

    Parameters
    ----------
    *datasets
        AnnData objects (`None` is skipped), or models: their cells and the file they were
        trained from, when known (``model.data_source_``, recorded when the cells were
        backed or read from a file by the command line).

    Returns
    -------
    The resolved paths; empty for data held in memory.

    Examples
    --------
    >>> import anndata, numpy as np
    >>> backing_paths(anndata.AnnData(np.zeros((2, 2))), None)
    set()
    """
    paths: set[Path] = set()
    for adata in datasets:
        if adata is not None and not isinstance(adata, AnnData):  # a model
            source = getattr(adata, "data_source_", None)
            if source:  # the file it was trained from (recorded when saved)
                paths.add(Path(source).resolve())
            adata = getattr(adata, "adata", None)
        if adata is None:
            continue
        if adata.isbacked and adata.filename is not None:
            paths.add(Path(adata.filename).resolve())
        for matrix in (adata.X, *adata.layers.values()):
            root = zarr_store_root(matrix)
            if root is not None:  # a zarr store's local directory
                paths.add(Path(root).resolve())
    return paths
