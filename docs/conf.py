"""Sphinx configuration of the scbranch documentation (scverse cookiecutter layout)."""

from __future__ import annotations

import os
import sys
import warnings
from datetime import date
from importlib.metadata import version as _version
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "_ext"))

from offline_inventories import write_inventories  # noqa: E402

# sphinx-autodoc-typehints 3.6 calls an API that Sphinx 10 removes; not ours to fix, and a wall
# of Python warnings would hide the build's own (which are errors: -W)
warnings.filterwarnings("ignore", message=".*set_application.*is deprecated")
from public_names import typehints_formatter  # noqa: E402, F401 (read by the extension)

project = "scbranch"
author = "scbranch developers"
copyright = f"{date.today().year}, {author}"
release = _version("scbranch")
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx_autodoc_typehints",
    "sphinxcontrib.bibtex",
    "sphinx_copybutton",
    "sphinxarg.ext",
    "prose_returns",
]

# ---------------------------------------------------------------------------- sources
# .rst first: autosummary writes its pages with the first suffix
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
templates_path = ["_templates"]
master_doc = "index"

myst_enable_extensions = ["colon_fence", "dollarmath", "deflist", "html_image"]
myst_heading_anchors = 4
# notebooks are rendered from their stored outputs, never executed here (the tests run them)
nb_execution_mode = "off"
nb_merge_streams = True


# ---------------------------------------------------------------------------- API
def _own_members() -> dict[str, list[str]]:
    """Public members each documented class defines itself (inherited ones live upstream).

    Autosummary's ``inherited_members`` also lists a method a class overrides (``train``,
    ``save``, ``load`` of scvi-tools' base class), so the template filters on this instead.
    """
    import dataclasses
    import inspect

    import scbranch

    classes = {"scbranch.BranchedDiffusion": scbranch.BranchedDiffusion}
    for sub in ("tl", "pl", "metrics", "datasets", "baselines", "model", "module", "io"):
        module = getattr(scbranch, sub)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj):
                classes[f"scbranch.{sub}.{name}"] = obj
    own = {}
    for full, cls in classes.items():
        names = [n for n in vars(cls) if not n.startswith("_")]
        if dataclasses.is_dataclass(cls):
            names += [f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")]
        own[full] = sorted(set(names))
    return own


autosummary_context = {"own_members": _own_members()}
autosummary_generate = True
autodoc_member_order = "groupwise"
# members are listed by the autosummary template (_templates/autosummary/class.rst), once
autodoc_default_options = {}
# types are rendered by sphinx-autodoc-typehints (into the parameter list), not by autodoc itself
autodoc_typehints = "none"
typehints_defaults = "braces"
always_document_param_types = False
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True
napoleon_use_param = True
# an ``Attributes`` section renders as fields, not as entries that clash with autoattribute's
napoleon_use_ivar = True
bibtex_bibfiles = ["references.bib"]
bibtex_reference_style = "author_year"

# every cross-reference must resolve: a broken one fails the build (-W --keep-going)
nitpicky = True
nitpick_ignore_regex: list = []  # nothing is exempt; private type paths: _ext/public_names.py

# ---------------------------------------------------------------------------- links
if os.environ.get("SCBRANCH_DOCS_ONLINE") == "1":
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3/", None),
        "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
        "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
        "scvi": ("https://docs.scvi-tools.org/en/stable/", None),
        "numpy": ("https://numpy.org/doc/stable/", None),
        "pandas": ("https://pandas.pydata.org/docs/", None),
        "torch": ("https://docs.pytorch.org/docs/stable/", None),
        "scipy": ("https://docs.scipy.org/doc/scipy/", None),
        "matplotlib": ("https://matplotlib.org/stable/", None),
    }
else:  # the build machines reach package registries only: inventories from what is installed
    intersphinx_mapping = {
        k: (url, inv) for k, (url, inv) in write_inventories(HERE / "_build" / "_inv").items()
    }

# ---------------------------------------------------------------------------- HTML
html_theme = "sphinx_book_theme"
html_title = "scbranch"
html_static_path = ["_static"]
html_theme_options = {
    "repository_url": "https://github.com/scverse/scbranch",
    "use_repository_button": False,
    "path_to_docs": "docs/",
    "navigation_with_keys": False,
    "show_toc_level": 2,
}
html_show_sourcelink = False
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True
# config.cache: the type-hint formatter is a function, so Sphinx re-reads all pages on every
# build instead of caching; harmless for a site this size
suppress_warnings = ["config.cache"]
