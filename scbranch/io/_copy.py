"""A copy of an ``.h5ad`` file or ``.zarr`` store with new ``uns`` entries, never read whole.

Results of an analysis of cells left on disk (the tree of an atlas, its support) are small; the
cells are not. Writing them through ``AnnData.write_h5ad`` would read or re-encode the whole
expression matrix, so the copy is byte for byte and only the ``uns`` entries are written into it.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

from ._writer import _remove, _replace, check_writable, is_zarr_path

logger = logging.getLogger(__name__)


def copy_with_uns(
    source: str | os.PathLike,
    dest: str | os.PathLike,
    uns: Mapping[str, object],
    *,
    overwrite: bool = False,
) -> Path:
    """Copy an ``.h5ad`` file or ``.zarr`` store and set ``uns`` entries in the copy.

    The copy is made file by file (the expression is never read into memory nor re-encoded),
    then each entry of ``uns`` is written into its ``uns`` with anndata's own encoding,
    replacing an entry of the same name. This is how the results of tools run on cells left on
    disk (:func:`read_backed`), such as :func:`scbranch.tl.branch_hierarchy`'s tree, reach a
    file that :func:`anndata.read_h5ad` and ``scbranch fit`` read, without copying an atlas
    through memory. ``source`` is never modified.

    The copy appears under ``dest`` only once complete; an error (or Ctrl-C) on the way
    removes it and leaves ``dest`` as it was.

    Parameters
    ----------
    source
        An ``.h5ad`` file or an anndata ``.zarr`` store.
    dest
        The copy; the same kind as ``source`` (``.zarr`` for a store, else an ``.h5ad`` file).
    uns
        Entries to set in the copy's ``uns`` (anything anndata writes: dicts, arrays,
        strings, numbers).
    overwrite
        Replace an existing ``dest``.

    Returns
    -------
    ``dest`` as a :class:`~pathlib.Path`.

    Examples
    --------
    >>> import scbranch as sb
    >>> adata = sb.io.read_backed("atlas.h5ad")  # doctest: +SKIP
    >>> sb.tl.branch_hierarchy(adata, groupby="cell_type", use_rep="X_pca")  # doctest: +SKIP
    >>> key = "scbranch_hierarchy"
    >>> sb.io.copy_with_uns(  # doctest: +SKIP
    ...     "atlas.h5ad", "atlas_tree.h5ad", {key: adata.uns[key]}
    ... )
    """
    source, dest = Path(source), Path(dest)
    zarr_store = is_zarr_path(source)
    if not (source.is_dir() if zarr_store else source.is_file()):
        raise FileNotFoundError(f"No such .h5ad file or .zarr store: {str(source)!r}.")
    if is_zarr_path(dest) != zarr_store:
        want = "a .zarr store" if zarr_store else "an .h5ad file"
        raise ValueError(
            f"{str(dest)!r} would be a copy of {str(source)!r}, which is {want}: name it "
            f"with {'.zarr' if zarr_store else '.h5ad'}."
        )
    if dest.resolve() == source.resolve():
        raise ValueError(f"{str(dest)!r} is the source itself; name a new file for the copy.")
    check_writable(dest, overwrite)
    _check_keys(uns, "uns")
    dest.parent.mkdir(parents=True, exist_ok=True)  # as generate(out=) makes a new folder
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        if zarr_store:
            shutil.copytree(source, tmp)
            _set_zarr_uns(tmp, uns)
        else:
            shutil.copyfile(source, tmp)
            _set_h5ad_uns(tmp, uns)
        _replace(tmp, dest)
    except BaseException:
        _remove(tmp)
        raise
    logger.info("Copied %s to %s with uns %s.", source, dest, sorted(uns))
    return dest


def _set_entries(group, uns: Mapping[str, object]) -> None:
    """Write ``uns`` into ``group['uns']`` (created, with anndata's encoding, when absent)."""
    from anndata.io import write_elem

    if "uns" not in group:
        write_elem(group, "uns", dict(uns))
        return
    for key, value in uns.items():
        if key in group["uns"]:
            del group["uns"][key]
        write_elem(group["uns"], key, value)


def _set_h5ad_uns(path: Path, uns: Mapping[str, object]) -> None:
    import h5py

    with h5py.File(path, "r+") as f:
        _set_entries(f, uns)


def _set_zarr_uns(path: Path, uns: Mapping[str, object]) -> None:
    import zarr

    group = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    _set_entries(group, uns)
    # anndata writes consolidated metadata and reads through it: without it being rewritten,
    # readers of the copy would not see the new entries
    zarr.consolidate_metadata(str(path))


def _check_keys(value, where: str) -> None:
    """Refuse what anndata cannot write as keys: non-strings, and "/" (read back as nesting)."""
    if not isinstance(value, Mapping):
        return
    for key, item in value.items():
        if not isinstance(key, str) or "/" in key:
            raise ValueError(
                f"{where} holds the key {key!r}: keys written to a file must be strings "
                "without '/' (a '/' would come back as a nested entry). Rename it."
            )
        _check_keys(item, f"{where}[{key!r}]")
