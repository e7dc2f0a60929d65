"""Plain data on disk: nested values as JSON plus numeric arrays in an ``.npz``, no pickle.

Everything scbranch saves besides tensors (the registry, init parameters, the hierarchy, a
space's state, the training history) goes through :func:`write_plain` / :func:`read_plain`.
Nothing read back can run code: JSON is parsed, the ``.npz`` is opened with
``allow_pickle=False``, and only the types listed in :func:`pack` are rebuilt.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

#: format marker and version of scbranch's plain files
FORMAT = "scbranch-plain"
VERSION = 1


class PlainFormatError(ValueError):
    """A plain-data file that is not what scbranch wrote (corrupt, partial, or foreign)."""


class NewerFormatError(PlainFormatError):
    """A plain-data file written by a newer scbranch than this one (intact, but unreadable)."""


class _Packer:
    def __init__(self):
        self.arrays: dict[str, np.ndarray] = {}

    def pack(self, obj):
        if obj is None or isinstance(obj, bool | str):
            return obj
        if isinstance(obj, int | np.integer) and not isinstance(obj, np.bool_):
            return int(obj)
        if isinstance(obj, np.bool_):
            return bool(obj)
        if isinstance(obj, float | np.floating):
            value = float(obj)
            return value if math.isfinite(value) else {"__float__": repr(value)}
        if isinstance(obj, np.ndarray):
            if obj.dtype.kind in "biufc":
                key = f"a{len(self.arrays)}"
                self.arrays[key] = obj
                return {"__ndarray__": key}
            # "T": numpy 2's variable-width strings, which anndata reads from zarr stores
            if obj.dtype.kind in "OUST":
                kind = "U" if obj.dtype.kind == "T" else obj.dtype.kind
                return {"__objarray__": [self.pack(v) for v in obj.ravel().tolist()],
                        "shape": list(obj.shape), "kind": kind}  # fmt: skip
            raise TypeError(f"Cannot save arrays of dtype {obj.dtype} as plain data.")
        if isinstance(obj, pd.DataFrame):
            return {
                "__dataframe__": {
                    "columns": [str(c) for c in obj.columns],
                    "index": self.pack(np.asarray(obj.index)),
                    "index_name": obj.index.name,
                    "data": {str(c): self.pack(obj[c].to_numpy()) for c in obj.columns},
                }
            }
        if isinstance(obj, tuple):
            return {"__tuple__": [self.pack(v) for v in obj]}
        if isinstance(obj, list):
            return [self.pack(v) for v in obj]
        if isinstance(obj, dict):
            bad = [k for k in obj if not isinstance(k, str)]
            if bad:
                raise TypeError(f"Cannot save dict keys {bad[:3]} as plain data (not strings).")
            return {k: self.pack(v) for k, v in obj.items()}
        raise TypeError(f"Cannot save a {type(obj).__name__} as plain data.")


def pack(obj) -> tuple[object, dict[str, np.ndarray]]:
    """``obj`` as JSON-ready values plus the numeric arrays they refer to.

    Handled: `None`, bool, int, float (NaN and inf included), str, lists, tuples, str-keyed
    dicts, numpy arrays (numeric ones go to the array store; strings and objects inline) and
    pandas DataFrames.

    Examples
    --------
    >>> value, arrays = pack({"x": np.arange(3), "names": np.array(["a", "b"])})
    >>> value["x"], list(arrays)
    ({'__ndarray__': 'a0'}, ['a0'])
    """
    packer = _Packer()
    return packer.pack(obj), packer.arrays


def unpack(value, arrays) -> object:
    """Inverse of :func:`pack`."""
    if isinstance(value, list):
        return [unpack(v, arrays) for v in value]
    if not isinstance(value, dict):
        return value
    if "__ndarray__" in value:
        key = value["__ndarray__"]
        if key not in arrays:
            raise PlainFormatError(f"array {key!r} is missing from the array file")
        return np.asarray(arrays[key])
    if "__objarray__" in value:
        items = [unpack(v, arrays) for v in value["__objarray__"]]
        dtype = object if value.get("kind") == "O" else str
        return np.array(items, dtype=dtype).reshape(value["shape"])
    if "__float__" in value:
        return float(value["__float__"])
    if "__tuple__" in value:
        return tuple(unpack(v, arrays) for v in value["__tuple__"])
    if "__dataframe__" in value:
        d = value["__dataframe__"]
        index = pd.Index(unpack(d["index"], arrays), name=d.get("index_name"))
        data = {c: unpack(d["data"][c], arrays) for c in d["columns"]}
        return pd.DataFrame(data, index=index, columns=d["columns"])
    return {k: unpack(v, arrays) for k, v in value.items()}


def save_tensors(state: dict, path: Path) -> None:
    """Write tensors with safetensors, with the permissions of any other file written here.

    ``safetensors`` writes through a private temporary file (mode 0600), so colleagues who
    read a shared model directory could read its JSON but not its weights; the file gets the
    mode ``open()`` would give it (0666 less the umask).
    """
    from safetensors.torch import save_file

    save_file(state, str(path))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_plain(obj, json_path: Path, npz_path: Path, *, kind: str) -> None:
    """Write ``obj`` to ``json_path`` (values) and ``npz_path`` (numeric arrays), atomically."""
    value, arrays = pack(obj)
    document = {"format": FORMAT, "version": VERSION, "kind": kind, "content": value}
    for path, write in (
        (npz_path, lambda f: np.savez(f, **arrays)),
        (json_path, lambda f: f.write(json.dumps(document, indent=1).encode())),
    ):
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                write(f)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def read_plain(json_path: Path, npz_path: Path, *, kind: str):
    """Read what :func:`write_plain` wrote; raise :class:`PlainFormatError` otherwise."""
    try:
        document = json.loads(Path(json_path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PlainFormatError(f"{str(json_path)!r} is not readable JSON: {err}") from err
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise PlainFormatError(f"{str(json_path)!r} is not a scbranch file.")
    if document.get("kind") != kind:
        raise PlainFormatError(
            f"{str(json_path)!r} holds a {document.get('kind')!r}, not a {kind!r}."
        )
    if int(document.get("version", -1)) > VERSION:
        raise NewerFormatError(
            f"{str(json_path)!r} was written by a newer scbranch (file format version "
            f"{document.get('version')}, this scbranch reads up to {VERSION}); upgrade scbranch "
            "to read it."
        )
    try:
        with np.load(npz_path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        # a damaged .npz fails as a bad zip archive (CRC, truncation) or a bad deflate stream
        raise PlainFormatError(f"{str(npz_path)!r} is not a plain array file: {err}") from err
    return unpack(document["content"], arrays)
