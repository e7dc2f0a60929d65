"""Intersphinx inventories written from the installed packages, for builds without a network.

Intersphinx downloads each project's ``objects.inv``; the machines this site is built on reach
package registries only. So the inventories are written here, at build time, from the installed
anndata, scanpy, scvi-tools, numpy, pandas, torch, scipy, matplotlib and Python itself: every
public object becomes an entry that links to where that project's own documentation puts it
(the URL schemes below follow each site's layout). With a network, ``SCBRANCH_DOCS_ONLINE=1``
uses the projects' real inventories instead.
"""

from __future__ import annotations

import importlib
import inspect
import zlib
from collections.abc import Iterable
from pathlib import Path

#: project -> (base URL, modules whose public members are listed, URL of an object)
PROJECTS = {
    "anndata": (
        "https://anndata.readthedocs.io/en/stable/",
        ["anndata"],
        lambda name: f"generated/{name.split('.')[0]}.{_top(name)}.html#{name}",
    ),
    "scanpy": (
        "https://scanpy.readthedocs.io/en/stable/",
        ["scanpy.pp", "scanpy.tl", "scanpy.pl", "scanpy.get", "scanpy.datasets"],
        lambda name: f"generated/{_module_object(name)}.html#{name}",
    ),
    "scvi": (
        "https://docs.scvi-tools.org/en/stable/",
        ["scvi.model", "scvi.train", "scvi.dataloaders", "scvi.module.base", "scvi.data"],
        lambda name: f"api/reference/{_module_object(name)}.html#{name}",
    ),
    "numpy": (
        "https://numpy.org/doc/stable/",
        ["numpy", "numpy.random"],
        lambda name: f"reference/generated/{_module_object(name)}.html#{name}",
    ),
    "pandas": (
        "https://pandas.pydata.org/docs/",
        ["pandas"],
        lambda name: f"reference/api/{name}.html#{name}",
    ),
    "torch": (
        "https://docs.pytorch.org/docs/stable/",
        ["torch", "torch.nn", "torch.optim", "torch.optim.lr_scheduler"],
        lambda name: (
            f"tensors.html#{name}" if name == "torch.Tensor" else f"generated/{name}.html#{name}"
        ),
    ),
    "scipy": (
        "https://docs.scipy.org/doc/scipy/",
        ["scipy.sparse", "scipy.stats"],
        lambda name: f"reference/generated/{name}.html#{name}",
    ),
    "matplotlib": (
        "https://matplotlib.org/stable/",
        ["matplotlib.axes", "matplotlib.figure", "matplotlib.collections", "matplotlib.pyplot"],
        lambda name: f"api/_as_gen/{name}.html#{name}",
    ),
}

#: Python objects that type hints and docstrings name
PYTHON = {
    "py:class": {
        **{n: f"library/functions.html#{n}" for n in ("int", "float", "bool", "str", "tuple")},
        **{n: f"library/stdtypes.html#{n}" for n in ("dict", "list", "set", "frozenset")},
        "object": "library/functions.html#object",
        "type": "library/functions.html#type",
        "pathlib.Path": "library/pathlib.html#pathlib.Path",
        "os.PathLike": "library/os.html#os.PathLike",
        "collections.abc.Mapping": "library/collections.abc.html#collections.abc.Mapping",
        "collections.abc.Sequence": "library/collections.abc.html#collections.abc.Sequence",
        "collections.abc.Callable": "library/collections.abc.html#collections.abc.Callable",
        "collections.abc.Iterable": "library/collections.abc.html#collections.abc.Iterable",
        "collections.abc.Iterator": "library/collections.abc.html#collections.abc.Iterator",
        "logging.Logger": "library/logging.html#logging.Logger",
        "ValueError": "library/exceptions.html#ValueError",
        "KeyError": "library/exceptions.html#KeyError",
        "TypeError": "library/exceptions.html#TypeError",
        "FileExistsError": "library/exceptions.html#FileExistsError",
        "FileNotFoundError": "library/exceptions.html#FileNotFoundError",
        "SystemExit": "library/exceptions.html#SystemExit",
    },
    "py:data": {
        **{n: f"library/constants.html#{n}" for n in ("None", "True", "False", "Ellipsis")},
        **{f"typing.{n}": f"library/typing.html#typing.{n}" for n in ("Any", "Literal")},
    },
    "py:module": {
        "argparse": "library/argparse.html#module-argparse",
        "logging": "library/logging.html#module-logging",
    },
}


def _top(name: str) -> str:
    return name.split(".")[1] if name.count(".") >= 1 else name


def _module_object(name: str) -> str:
    """The documented object of a name: the class of a method, else the name itself."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        head = ".".join(parts[:k])
        try:
            obj = _resolve(head)
        except (ImportError, AttributeError):
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj):
            return head
    return name


def _resolve(name: str):
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:k]))
        except ImportError:
            continue
        for attr in parts[k:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(name)


def _public(module_name: str) -> Iterable[tuple[str, str]]:
    """(full name, role) of the public classes, functions and their methods of a module."""
    module = importlib.import_module(module_name)
    names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
    for n in names:
        obj = getattr(module, n, None)
        if obj is None or inspect.ismodule(obj):
            continue
        full = f"{module_name}.{n}"
        if inspect.isclass(obj):
            yield full, "py:class"
            # inherited members too: the projects' class pages list them (scvi-tools' models
            # get ``train`` from a mixin)
            for m in dir(obj):
                if m.startswith("_"):
                    continue
                member = inspect.getattr_static(obj, m, None)
                role = "py:method" if callable(member) else "py:attribute"
                if isinstance(member, classmethod | staticmethod):
                    role = "py:method"
                if isinstance(member, property):
                    role = "py:property"
                yield f"{full}.{m}", role
        elif callable(obj):
            yield full, "py:function"


def _write(path: Path, project: str, entries: Iterable[tuple[str, str, str]]) -> None:
    lines = [f"{name} {role} 1 {uri} -" for name, role, uri in entries]
    header = (
        "# Sphinx inventory version 2\n"
        f"# Project: {project}\n"
        "# Version: installed\n"
        "# The remainder of this file is compressed using zlib.\n"
    )
    path.write_bytes(header.encode() + zlib.compress("\n".join(lines).encode() + b"\n"))


def write_inventories(directory: Path) -> dict[str, tuple[str, str]]:
    """Write one inventory per project; returns an ``intersphinx_mapping``."""
    directory.mkdir(parents=True, exist_ok=True)
    mapping = {}
    for project, (base, modules, url) in PROJECTS.items():
        entries, seen = [], set()
        for module in modules:
            try:
                for name, role in _public(module):
                    if name not in seen:
                        seen.add(name)
                        entries.append((name, role, url(name)))
            except ImportError:
                continue
        if project == "anndata":
            entries.append(("anndata", "py:module", "index.html#module-anndata"))
        if project == "torch":
            entries += [(n, "py:class", f"generated/{n}.html#{n}")
                        for n in ("torch.Generator", "torch.device",
                                  "torch.nn.parameter.Parameter")]  # fmt: skip
        path = directory / f"{project}.inv"
        _write(path, project, entries)
        mapping[project] = (base, str(path))
    python = [(n, role, uri) for role, objs in PYTHON.items() for n, uri in objs.items()]
    _write(directory / "python.inv", "Python", [(n, r.strip(), u) for n, r, u in python])
    mapping["python"] = ("https://docs.python.org/3/", str(directory / "python.inv"))
    return mapping
