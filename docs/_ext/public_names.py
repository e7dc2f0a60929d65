"""Type hints link to the public name of a class, not the private module that defines it.

``AnnData`` is defined in ``anndata._core.anndata`` and ``DataFrame`` in ``pandas.core.frame``;
sphinx-autodoc-typehints writes those paths, which no project's inventory lists. scanpy's build
maps them with scanpydoc's ``qualname_overrides``; this does the same by looking for the
shortest public path (private segments dropped) that names the same object.
"""

from __future__ import annotations

import importlib
from functools import cache


def _lookup(path: str):
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


@cache
def public_name(qualified: str) -> str | None:
    """The shortest public path to the same object, or `None` when there is none shorter."""
    parts = qualified.split(".")
    target = _lookup(qualified)
    if target is None:
        return None
    head, name = parts[:-1], parts[-1]
    public_head = [p for p in head if not p.startswith("_")]
    for k in range(1, len(public_head) + 1):
        candidate = ".".join([*public_head[:k], name])
        if candidate != qualified and _lookup(candidate) is target:
            return candidate
    return None


def typehints_formatter(annotation, config) -> str | None:
    """sphinx-autodoc-typehints hook: a public cross-reference for private class paths."""
    module = getattr(annotation, "__module__", None)
    qualname = getattr(annotation, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "." in qualname:
        return None
    name = public_name(f"{module}.{qualname}")
    return f":py:class:`~{name}`" if name else None
