"""Cells on disk: open atlases without loading their expression, write cells in blocks.

:func:`read_backed` opens an ``.h5ad`` file or a ``.zarr`` store with its expression left on
disk, which :class:`~scbranch.BranchedDiffusion` trains from in blocks of rows;
:class:`ChunkedWriter` writes cells block by block (what ``generate(out=...)`` and
:func:`scbranch.datasets.simulate_atlas` use), under the final name only once complete;
:func:`copy_with_uns` copies a file or store with new ``uns`` entries (a tree learned on cells
left on disk) without reading its expression.
"""

from ._backed import read_backed
from ._copy import copy_with_uns
from ._rows import column_moments, iter_blocks, read_rows
from ._writer import ChunkedWriter, check_writable, is_zarr_path

__all__ = [
    "ChunkedWriter",
    "check_writable",
    "column_moments",
    "copy_with_uns",
    "is_zarr_path",
    "iter_blocks",
    "read_backed",
    "read_rows",
]
