"""Read numpydoc ``Returns`` sections as prose, as scanpy's and scbranch's docstrings write them.

scbranch's docstrings follow scanpy: the return type comes from the annotation (rendered by
sphinx-autodoc-typehints) and ``Returns`` holds a sentence ("The generated cells; ..."), not
numpydoc's ``name : type`` lines. Napoleon would read that sentence's first line as a type and,
with ``nitpicky``, fail on it as a missing class. scanpy's own build solves this with scanpydoc;
this extension does the same small thing without a further dependency.
"""

from __future__ import annotations

from sphinx.application import Sphinx
from sphinx.ext.napoleon.docstring import NumpyDocstring


def _consume_returns_as_prose(self, preprocess_types: bool = False):
    lines = self._dedent(self._consume_to_next_section())
    while lines and not lines[-1].strip():
        lines.pop()
    return [("", "", lines)] if lines else []


def setup(app: Sphinx) -> dict:
    """Register the extension (Sphinx calls this)."""
    NumpyDocstring._consume_returns_section = _consume_returns_as_prose
    return {"parallel_read_safe": True, "parallel_write_safe": True}
